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

#[cfg(test)]
pub(crate) mod tests {
    use std::path::Path;
    use std::time::Duration;

    use sha2::Digest as _;

    use super::*;
    use crate::daemon::fetcher::FetchOptions;
    use crate::object::{Compression, ObjectEntry};
    use crate::store::dir::DirStore;

    fn core(cache: &Path) -> Core {
        let cache = NodeCache::open(cache).unwrap();
        let fetcher = Fetcher::new(FetchOptions {
            concurrency: 2,
            attempts: 1,
            backoff: Duration::from_millis(10),
            deadline: Duration::from_secs(30),
            min_rate: 0.0,
            spool_dir: cache.tmp_dir(),
            delay: Duration::ZERO,
        });
        Core::new(cache, fetcher)
    }

    /// An uncompressed object of `content`, written by hand into a `dir:` store at the path
    /// docs/convert.md gives (`objects/<2 hex>/<hex>`).
    fn stored(root: &Path, content: &[u8]) -> (ObjectEntry, Arc<dyn ObjectStore>) {
        let store = DirStore::open(root, true).unwrap();
        let digest: Digest = sha2::Sha256::digest(content).into();
        let hex = hex::encode(digest);
        let path = root.join("objects").join(&hex[..2]).join(&hex);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, content).unwrap();
        let size = content.len() as u64;
        let entry = ObjectEntry { digest, blob: digest, size, stored_size: size, compression: Compression::None };
        (entry, Arc::new(store))
    }

    /// A sink that collects what a fill writes.
    #[derive(Default)]
    pub(crate) struct Collect(pub(crate) Vec<u8>);

    impl FillSink for Collect {
        fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), Errno> {
            let start = usize::try_from(offset).map_err(|_| Errno::EFBIG)?;
            let end = start + data.len();
            if self.0.len() < end {
                self.0.resize(end, 0);
            }
            self.0[start..end].copy_from_slice(data);
            Ok(())
        }
    }

    fn entry(n: u8) -> ObjectEntry {
        ObjectEntry { digest: [n; 32], blob: [n; 32], size: 100, stored_size: 100, compression: Compression::None }
    }

    #[test]
    fn registration_counts_images() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let c = core(&dir.path().join("cache"));
        let store: Arc<dyn ObjectStore> = Arc::new(DirStore::open(&dir.path().join("store"), true).unwrap());
        let (e, name) = (entry(1), hex::encode([1u8; 32]));
        assert!(matches!(c.open(&name), Err(Errno::ENOENT)), "unregistered");
        assert!(c.register("a", &e, &store), "the first image to need an object");
        assert!(!c.register("b", &e, &store), "a second image");
        assert!(!c.register("a", &e, &store), "the same image again");
        assert_eq!(c.open(&name).unwrap().size, 100);
        assert!(!c.release("a", &e.digest), "b still needs it");
        assert!(c.open(&name).is_ok());
        assert!(c.release("b", &e.digest), "the last image let it go");
        assert!(matches!(c.open(&name), Err(Errno::ENOENT)), "forgotten once released");
        assert!(!c.release("b", &e.digest), "nothing left to release");
        // "a" registered twice but holds one claim: one release frees it.
        assert!(c.register("a", &e, &store));
        assert!(!c.register("a", &e, &store));
        assert!(c.release("a", &e.digest));
        assert!(matches!(c.open("not hex"), Err(Errno::ENOENT)));
        assert!(matches!(c.open(&name[..10]), Err(Errno::ENOENT)));
    }

    #[test]
    fn fill_writes_verified_content_and_charges_the_first_registrant() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let c = core(&dir.path().join("cache"));
        let content: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let (e, store) = stored(&dir.path().join("store"), &content);
        c.add_image("a", "docker://r/a:1", 1, e.size, e.stored_size);
        c.add_image("b", "docker://r/b:1", 1, e.size, e.stored_size);
        c.register("a", &e, &store);
        c.register("b", &e, &store);
        let h = c.open(&hex::encode(e.digest)).unwrap();
        assert_eq!(h.size, content.len() as u64);
        let mut sink = Collect::default();
        let written = Mutex::new(Vec::new());
        c.fill(&h.object, &mut sink, &|d| written.lock().unwrap().push(*d)).unwrap();
        assert!(sink.0 == content, "the sink holds the object's content");
        assert_eq!(*written.lock().unwrap(), vec![e.digest], "`written` runs once, with the digest");
        let report = c.report();
        assert_eq!(
            report.iter().map(|r| r.reference.as_str()).collect::<Vec<_>>(),
            ["docker://r/a:1", "docker://r/b:1"]
        );
        let (a, b) = (&report[0], &report[1]);
        assert_eq!((a.objects_fetched, a.bytes_fetched, a.content_fetched, a.requests), (1, e.stored_size, e.size, 1));
        assert_eq!((b.objects_fetched, b.requests), (0, 0), "only the first registrant is charged");
        assert_eq!(c.fill_order("a"), vec![e.digest]);
        assert!(c.fill_order("b").is_empty());
        // Once "a" lets go, "b" is charged.
        assert!(!c.release("a", &e.digest));
        let h = c.open(&hex::encode(e.digest)).unwrap();
        c.fill(&h.object, &mut Collect::default(), &|_| {}).unwrap();
        assert_eq!(c.fill_order("b"), vec![e.digest]);
    }

    #[test]
    fn fill_of_content_that_does_not_verify_fails_before_writing() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let c = core(&dir.path().join("cache"));
        let (e, store) = stored(&dir.path().join("store"), b"the content the object map names");
        // The stored file is replaced by other bytes of the same length.
        let hex = hex::encode(e.digest);
        std::fs::write(
            dir.path().join("store/objects").join(&hex[..2]).join(&hex),
            b"other content of the same size!!",
        )
        .unwrap();
        c.add_image("a", "docker://r/a:1", 1, e.size, e.stored_size);
        c.register("a", &e, &store);
        let h = c.open(&hex).unwrap();
        let mut sink = Collect::default();
        let written = Mutex::new(0);
        assert!(c.fill(&h.object, &mut sink, &|_| *written.lock().unwrap() += 1).is_err());
        assert!(sink.0.is_empty(), "no byte of unverified content reaches the sink");
        assert_eq!(*written.lock().unwrap(), 0);
        let r = &c.report()[0];
        assert_eq!((r.failures, r.objects_fetched, r.requests), (1, 0, 1));
        assert!(c.fill_order("a").is_empty());
    }

    #[test]
    fn image_statistics() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let c = core(dir.path());
        c.add_image("m2", "oci:/b", 3, 30, 20);
        c.add_image("m1", "oci:/a", 2, 10, 5);
        c.count_cache_hits("m1", 2);
        c.count_cache_hits("gone", 7);
        c.prefetch_listed("m2", 4);
        c.count_prefetched("m2");
        c.count_prefetched("m2");
        c.prefetch_done("m2");
        let r = c.report();
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].image.as_str(), r[0].reference.as_str()), ("m1", "oci:/a"), "sorted by reference");
        assert_eq!((r[0].objects, r[0].content_bytes, r[0].stored_bytes, r[0].cache_hits), (2, 10, 5, 2));
        assert_eq!((r[1].prefetch_listed, r[1].prefetched, r[1].prefetch_done), (4, 2, true));
        // Mounting the same key again updates the sizes and keeps the counters.
        c.add_image("m1", "oci:/a", 4, 40, 50);
        let r = c.report();
        assert_eq!((r[0].objects, r[0].content_bytes, r[0].stored_bytes, r[0].cache_hits), (4, 40, 50, 2));
        c.forget_image("m1");
        assert_eq!(c.report().len(), 1);
        assert!(c.fill_order("m1").is_empty());
    }
}
