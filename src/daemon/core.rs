//! The daemon core: which objects the mounted images need, where each can be fetched, and how one is
//! filled. It knows nothing of the kernel interface: each frontend (super::frontend) serves it as its
//! [`fscache::backend::Backend`], asking for "object X" ([`Core::open`]); the core writes X's verified
//! content through the frontend's sink ([`Core::fill`]) and charges the fill to the image that
//! registered X first. What happens around that (marks, object files, completeness records, the
//! EROFS index of a cachefiles mount) is the frontend's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use erofs::tree::Digest;
use fscache::backend::{Errno, FillSink, Opened};

use super::cache::NodeCache;
use super::fetcher::{Fetcher, Joined};
use super::stats::{ImageStats, StatsReport};
use crate::oci::objmap::ObjectEntry;
use crate::store::ObjectStore;

/// An object some mounted image needs.
struct Needed {
    entry: ObjectEntry,
    /// Stores that hold it (one per image that registered it, first registrant first).
    stores: Vec<Arc<dyn ObjectStore>>,
    /// Images that reference it, in registration order (the first is charged for its fetch).
    images: Vec<String>,
}

/// What the frontend hands back to [`Core::fill`].
pub struct Handle {
    entry: ObjectEntry,
    stores: Vec<Arc<dyn ObjectStore>>,
    charge: String,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle").field("object", &hex::encode(self.entry.digest)).finish_non_exhaustive()
    }
}

/// The core shared by every frontend.
pub struct Core {
    cache: NodeCache,
    fetcher: Fetcher,
    objects: Mutex<HashMap<Digest, Needed>>,
    stats: Mutex<HashMap<String, ImageStats>>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core").field("cache", &self.cache).finish_non_exhaustive()
    }
}

impl Core {
    pub fn new(cache: NodeCache, fetcher: Fetcher) -> Self {
        Core { cache, fetcher, objects: Mutex::new(HashMap::new()), stats: Mutex::new(HashMap::new()) }
    }

    pub fn cache(&self) -> &NodeCache {
        &self.cache
    }

    /// Downloads `entry` from `stores` ahead of its first read ([`Fetcher::warm`]).
    pub fn warm(&self, entry: &ObjectEntry, stores: &[Arc<dyn ObjectStore>]) -> bool {
        self.fetcher.warm(entry, stores)
    }

    fn objects(&self) -> MutexGuard<'_, HashMap<Digest, Needed>> {
        self.objects.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn stats(&self) -> MutexGuard<'_, HashMap<String, ImageStats>> {
        self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts the statistics of a mounted image (kept until [`Core::forget_image`]).
    pub fn add_image(&self, image: &str, reference: &str, objects: u64, bytes: u64, stored: u64) {
        let mut s = self.stats();
        let e = s.entry(image.to_owned()).or_insert_with(|| ImageStats::new(reference));
        e.objects = objects;
        e.content_bytes = bytes;
        e.stored_bytes = stored;
    }

    /// Counts objects of `image` found complete in the cache when it was mounted.
    pub fn count_cache_hits(&self, image: &str, n: u64) {
        if let Some(s) = self.stats().get_mut(image) {
            s.cache_hits += n;
        }
    }

    /// The objects filled for `image` so far, in order.
    pub fn fill_order(&self, image: &str) -> Vec<Digest> {
        self.stats().get(image).map(|s| s.order.clone()).unwrap_or_default()
    }

    /// Prefetch progress of `image` (src/daemon/prefetch.rs).
    pub fn prefetch_listed(&self, image: &str, n: u64) {
        if let Some(s) = self.stats().get_mut(image) {
            s.prefetch_listed = n;
        }
    }

    pub fn count_prefetched(&self, image: &str) {
        if let Some(s) = self.stats().get_mut(image) {
            s.prefetched += 1;
        }
    }

    pub fn prefetch_done(&self, image: &str) {
        if let Some(s) = self.stats().get_mut(image) {
            s.prefetch_done = true;
        }
    }

    pub fn forget_image(&self, image: &str) {
        self.stats().remove(image);
    }

    /// Records that `image` needs `entry`, fetchable from `store`. Returns true when no other mounted
    /// image referenced it before (the frontend must start watching it).
    pub fn register(&self, image: &str, entry: &ObjectEntry, store: &Arc<dyn ObjectStore>) -> bool {
        let mut objects = self.objects();
        let n = objects.entry(entry.digest).or_insert_with(|| Needed {
            entry: *entry,
            stores: Vec::new(),
            images: Vec::new(),
        });
        let first = n.images.is_empty();
        if !n.images.iter().any(|i| i == image) {
            n.images.push(image.to_owned());
            n.stores.push(Arc::clone(store));
        }
        first
    }

    /// Drops `image`'s claim on `digest`. Returns true when no mounted image needs the object anymore.
    pub fn release(&self, image: &str, digest: &Digest) -> bool {
        let mut objects = self.objects();
        let Some(n) = objects.get_mut(digest) else { return false };
        if let Some(i) = n.images.iter().position(|x| x == image) {
            n.images.remove(i);
            n.stores.remove(i);
        }
        if n.images.is_empty() {
            objects.remove(digest);
            true
        } else {
            false
        }
    }

    /// Statistics of every mounted image.
    pub fn report(&self) -> Vec<StatsReport> {
        let mut v: Vec<StatsReport> = self.stats().iter().map(|(id, s)| s.report(id)).collect();
        v.sort_by(|a, b| a.reference.cmp(&b.reference));
        v
    }

    /// The object named `name` (its sha256 in hex), for a frontend's [`fscache::backend::Backend::open`]:
    /// ENOENT unless a mounted image registered it.
    pub fn open(&self, name: &str) -> Result<Opened<Handle>, Errno> {
        let mut digest = [0u8; 32];
        hex::decode_to_slice(name, &mut digest).map_err(|_| Errno::ENOENT)?;
        let objects = self.objects();
        let n = objects.get(&digest).ok_or(Errno::ENOENT)?;
        let charge = n.images.first().cloned().unwrap_or_default();
        let object = Handle { entry: n.entry, stores: n.stores.clone(), charge };
        Ok(Opened { object, size: n.entry.size })
    }

    /// Writes the whole verified content of `h` through `sink`, for a frontend's
    /// [`fscache::backend::Backend::fill`]; `written` runs once every byte is written (before the
    /// statistics are counted), with the object's digest.
    pub fn fill(&self, h: &Handle, sink: &mut dyn FillSink, written: &dyn Fn(&Digest)) -> Result<(), Errno> {
        // Whole objects only: the verified unit is the object, and the frontend drops its mark after.
        let start = Instant::now();
        let (outcome, joined) = self.fetcher.get(&h.entry, &h.stores);
        let result = outcome.and_then(|content| {
            content.for_each_piece(&mut |off, bytes| sink.write_at(off, bytes))?;
            written(&h.entry.digest);
            Ok(())
        });
        let ms = start.elapsed().as_secs_f64() * 1e3;
        if let Some(s) = self.stats().get_mut(&h.charge) {
            match (&result, joined) {
                (Ok(()), Joined::Fetched) => {
                    s.objects_fetched += 1;
                    s.bytes_fetched += h.entry.stored_size;
                    s.content_fetched += h.entry.size;
                }
                (Ok(()), Joined::Shared) => s.shared += 1,
                (Err(_), _) => s.failures += 1,
            }
            if result.is_ok() {
                s.push_filled(h.entry.digest);
            }
            s.push_latency(ms);
        }
        result
    }
}
