//! The daemon core: which objects the mounted images need, where each can be fetched, and the
//! [`fscache::backend::Backend`] that fills them. It knows nothing of the kernel interface: the fanotify
//! frontend (and later the cachefiles one) asks it for "object X" and it writes X's verified content
//! through the frontend's sink, then records the object as complete in the node cache.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use anyhow::Context as _;
use erofs::tree::Digest;
use fscache::backend::{Backend, Errno, FillSink, ObjectKey, Opened};

use super::cache::NodeCache;
use super::fetcher::{Fetcher, Joined};
use super::stats::{ImageStats, StatsReport};
use crate::object::ObjectEntry;
use crate::store::ObjectStore;

/// An object some mounted image needs.
struct Needed {
    entry: ObjectEntry,
    /// Stores that hold it (one per image that registered it, first registrant first).
    stores: Vec<Arc<dyn ObjectStore>>,
    /// Images that reference it, in registration order (the first is charged for its fetch).
    images: Vec<String>,
}

/// What the frontend hands back to `fill`.
pub struct Handle {
    entry: ObjectEntry,
    stores: Vec<Arc<dyn ObjectStore>>,
    charge: String,
    /// Set for the EROFS index of a mount (cachefiles: the primary blob named by its fsid), served
    /// from the state directory.
    primary: Option<PathBuf>,
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
    /// The object files under CACHE/objects are the node cache (fanotify). False for cachefiles, whose
    /// own cache files hold the objects: no second copy, no completeness record of ours.
    node_files: bool,
    /// cachefiles: primary blob names (fsids) -> (EROFS index file, size, mount charged).
    primaries: Mutex<HashMap<String, (PathBuf, u64, String)>>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core").field("cache", &self.cache).finish_non_exhaustive()
    }
}

/// What registering an object found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Registered {
    /// No other mounted image referenced it before: the frontend must start watching it.
    pub first: bool,
    /// The cache already holds it whole.
    pub complete: bool,
}

impl Core {
    pub fn new(cache: NodeCache, fetcher: Fetcher) -> Self {
        Core {
            cache,
            fetcher,
            objects: Mutex::new(HashMap::new()),
            stats: Mutex::new(HashMap::new()),
            node_files: true,
            primaries: Mutex::new(HashMap::new()),
        }
    }

    /// A core for the cachefiles frontend: the kernel's cache files are the node cache, so no object
    /// files are created under CACHE/objects and nothing is recorded there.
    pub fn for_cachefiles(cache: NodeCache, fetcher: Fetcher) -> Self {
        Core { node_files: false, ..Core::new(cache, fetcher) }
    }

    /// cachefiles: serves the EROFS index `path` as the primary blob named `fsid` (for mount `image`).
    pub fn add_primary(&self, fsid: &str, path: &Path, image: &str) -> anyhow::Result<()> {
        let size = std::fs::metadata(path).with_context(|| format!("stat {}", path.display()))?.len();
        let mut p = self.primaries.lock().unwrap_or_else(|p| p.into_inner());
        p.insert(fsid.to_owned(), (path.to_owned(), size, image.to_owned()));
        Ok(())
    }

    /// cachefiles: picks a free fsid for a new mount of image `id` (the id, then `id.1`, `id.2`, ...:
    /// a domain refuses an fsid that is live) and serves `path` under it.
    pub fn claim_primary(&self, id: &str, path: &Path, image: &str) -> anyhow::Result<String> {
        let size = std::fs::metadata(path).with_context(|| format!("stat {}", path.display()))?.len();
        let mut p = self.primaries.lock().unwrap_or_else(|p| p.into_inner());
        let fsid = (0..)
            .map(|n| if n == 0 { id.to_owned() } else { format!("{id}.{n}") })
            .find(|f| !p.contains_key(f))
            .expect("an unbounded range has a free name");
        p.insert(fsid.clone(), (path.to_owned(), size, image.to_owned()));
        Ok(fsid)
    }

    pub fn remove_primary(&self, fsid: &str) {
        self.primaries.lock().unwrap_or_else(|p| p.into_inner()).remove(fsid);
    }

    pub fn cache(&self) -> &NodeCache {
        &self.cache
    }

    /// Whether the object files under CACHE/objects are the node cache (the fanotify frontend), so
    /// that their completeness records say what the node holds.
    pub fn node_files(&self) -> bool {
        self.node_files
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

    /// Records that `image` needs `entry`, fetchable from `store`. Creates the sparse object file.
    pub fn register(
        &self,
        image: &str,
        entry: &ObjectEntry,
        store: &Arc<dyn ObjectStore>,
    ) -> anyhow::Result<Registered> {
        let complete = if self.node_files { self.cache.prepare(&entry.digest, entry.size)? } else { false };
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
        Ok(Registered { first, complete })
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
}

impl Backend for Core {
    type Object = Handle;

    fn open(&self, key: &ObjectKey<'_>) -> Result<Opened<Handle>, Errno> {
        if let Some((path, size, image)) = self.primaries.lock().unwrap_or_else(|p| p.into_inner()).get(key.name) {
            let entry = ObjectEntry {
                digest: [0; 32],
                blob: [0; 32],
                size: *size,
                stored_size: *size,
                compression: crate::object::Compression::None,
            };
            let h = Handle { entry, stores: Vec::new(), charge: image.clone(), primary: Some(path.clone()) };
            return Ok(Opened { object: h, size: *size });
        }
        let mut digest = [0u8; 32];
        hex::decode_to_slice(key.name, &mut digest).map_err(|_| Errno::ENOENT)?;
        let objects = self.objects();
        let n = objects.get(&digest).ok_or(Errno::ENOENT)?;
        let charge = n.images.first().cloned().unwrap_or_default();
        let object = Handle { entry: n.entry, stores: n.stores.clone(), charge, primary: None };
        Ok(Opened { object, size: n.entry.size })
    }

    fn fill(&self, h: &Handle, _range: Range<u64>, sink: &mut dyn FillSink) -> Result<(), Errno> {
        if let Some(path) = &h.primary {
            return fill_primary(path, sink);
        }
        // Whole objects only: the verified unit is the object, and the frontend drops its mark after.
        let start = Instant::now();
        let (outcome, joined) = self.fetcher.get(&h.entry, &h.stores);
        let result = outcome.and_then(|content| {
            content.for_each_piece(&mut |off, bytes| sink.write_at(off, bytes))?;
            if !self.node_files {
                return Ok(());
            }
            // Verified bytes are written: the reader may go on. The durable record follows off this path.
            self.cache.complete_later(&h.entry.digest);
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

/// Writes the EROFS index file (pulled and verified into the state directory) through `sink`.
fn fill_primary(path: &Path, sink: &mut dyn FillSink) -> Result<(), Errno> {
    let bytes = std::fs::read(path).map_err(|e| {
        tracing::error!(path = %path.display(), error = %e, "reading the EROFS index");
        Errno::EIO
    })?;
    for (i, c) in bytes.chunks(1 << 20).enumerate() {
        sink.write_at((i << 20) as u64, c)?;
    }
    Ok(())
}
