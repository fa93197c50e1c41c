//! The cachefiles on-demand frontend of the daemon (Linux 5.19+ with CONFIG_CACHEFILES_ONDEMAND and
//! CONFIG_EROFS_FS_ONDEMAND; the 6.1 kernel of vm-tests/).
//!
//! * The supervisor opens `/dev/cachefiles`, binds it (`dir CACHE/cachefiles`, `tag wisp`,
//!   `bind ondemand`: [`open_bound`]) and holds the session for the daemon's lifetime, so a dead worker
//!   never releases it (that would fail every outstanding request and break every mount for good,
//!   docs/kernel.md A.6). Each worker receives a copy over SCM_RIGHTS and sends `restore` first
//!   ([`start`]), which hands it again every request its predecessor had read but not answered;
//!   objects whose anonymous fds died with it are re-OPENed by the kernel.
//! * Requests (OPEN / READ / CLOSE) are served by [`fscache::ring::Server`] (io_uring loop + a pool of
//!   fill threads) over the daemon [`Core`] and the mounts' primary blobs ([`Served`]). A READ is
//!   answered with the whole object (`fill_whole`): the core fetches and verifies whole objects
//!   anyway, and once the kernel's cache file holds all of it, no later read of that object reaches
//!   the daemon.
//! * Every image is mounted in one fscache domain, [`DOMAIN`]: an object shared by several images is
//!   one cookie, one OPEN, one cache file, fetched once. The kernel's cache files under
//!   `CACHE/cachefiles` are the node cache; nothing is copied to `CACHE/objects`.
//! * Each mount's primary blob (its EROFS index) is named by a per-mount fsid (the image id, with a
//!   `.N` suffix for a second concurrent mount of the same image: a domain refuses an fsid that is
//!   already live, docs/kernel.md B.2), recorded in the mount record ([`MountRecord::fsid`]) and
//!   served from the state directory ([`Primaries`]).
//!
//! Anonymous fds: the kernel hands one fd per OPEN (one per distinct object in the domain, plus one
//! primary per mount), and the loop keeps it until the object's CLOSE (last unmount using it): a
//! complete object still holds its fd, as the kernel would otherwise re-OPEN it on the next cache miss
//! (page cache dropped). So the worker raises RLIMIT_NOFILE ([`raise_nofile_limit`]); the budget is
//! the number of distinct objects over all mounted images.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{Context, Result};
use fscache::backend::{Backend, Errno, FillSink, ObjectKey, Opened};
use fscache::cachefiles::{Device, Error as DevError};
use fscache::ring::timing::Timings;
use fscache::ring::{Config as RingConfig, Server};

use super::Frontend;
use crate::daemon::cache::NodeCache;
use crate::daemon::core::{Core, Handle};
use crate::daemon::images::Image;
use crate::daemon::mounts::{MountRecord, Mounts};
use crate::daemon::protocol::FrontendKind;
use crate::daemon::{worker, Config};
use crate::object::ObjectEntry;

/// Label of the fd message the supervisor sends (/dev/cachefiles session + control listener).
pub const FDS_LABEL: &str = "wisp-daemon cachefiles";

/// The fscache domain of every wisp mount.
pub const DOMAIN: &str = "wisp";
/// The cache's tag (several caches could be bound on one node; this one is wisp's).
pub const TAG: &str = "wisp";

/// The cachefiles cache directory under the daemon's cache (must be on ext4/xfs, not tmpfs).
pub fn cache_dir(cache: &Path) -> PathBuf {
    cache.join("cachefiles")
}

/// Opens `/dev/cachefiles` and binds an on-demand cache in `CACHE/cachefiles`, with errors that name
/// what the kernel lacks.
pub fn open_bound(cache: &Path) -> Result<Device> {
    let dir = cache_dir(cache);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let dev = Device::open().map_err(|e| match e {
        DevError::NoDevice => anyhow::anyhow!(
            "{e}: /dev/cachefiles is missing: the kernel has no cachefiles (CONFIG_CACHEFILES) or the module is not loaded (modprobe cachefiles)"
        ),
        DevError::Busy => anyhow::anyhow!("{e}: /dev/cachefiles is busy: another cache daemon (cachefilesd, nydusd, another wisp) holds it"),
        e => anyhow::Error::new(e).context("opening /dev/cachefiles"),
    })?;
    if let Err(e) = dev.bind(&dir, Some(TAG)) {
        return Err(match e {
            DevError::NoOndemand => anyhow::anyhow!(
                "{e}: `bind ondemand` refused: the kernel's cachefiles has no on-demand mode (CONFIG_CACHEFILES_ONDEMAND is not set)"
            ),
            e => anyhow::Error::new(e).context(format!("binding the cachefiles cache in {}", dir.display())),
        });
    }
    Ok(dev)
}

/// Opens the session the supervisor holds: checks that EROFS can mount over fscache, then opens and
/// binds `/dev/cachefiles` ([`open_bound`]).
pub fn open_session(cache: &NodeCache) -> Result<Device> {
    check_erofs_ondemand()?;
    open_bound(cache.root())
}

/// Checks that the kernel's EROFS can mount over fscache (CONFIG_EROFS_FS_ONDEMAND): `fsid` is refused
/// at fsconfig time otherwise. No mount is made.
pub fn check_erofs_ondemand() -> Result<()> {
    use rustix::mount::{fsconfig_set_string, fsopen, FsOpenFlags};
    let fs = fsopen("erofs", FsOpenFlags::FSOPEN_CLOEXEC)
        .context("fsopen(erofs): the kernel has no EROFS (CONFIG_EROFS_FS, or modprobe erofs)")?;
    fsconfig_set_string(&fs, "fsid", "wisp-probe").map_err(|e| {
        anyhow::anyhow!(
            "EROFS refuses fsid= ({e}): the kernel's EROFS has no fscache mode (CONFIG_EROFS_FS_ONDEMAND is not set)"
        )
    })?;
    Ok(())
}

/// Raises the soft RLIMIT_NOFILE to the hard limit (and, as root, the hard limit to
/// min(1 Mi, fs.nr_open)): one anonymous fd per distinct object of all mounted images.
pub fn raise_nofile_limit() -> Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, mut hard) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit(RLIMIT_NOFILE)")?;
    let nr_open: u64 =
        std::fs::read_to_string("/proc/sys/fs/nr_open").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(1 << 20);
    let want = nr_open.min(1 << 20);
    if want > hard && setrlimit(Resource::RLIMIT_NOFILE, want, want).is_ok() {
        hard = want;
    }
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).context("setrlimit(RLIMIT_NOFILE)")?;
    Ok(hard)
}

/// Prepares to serve the session: `restore` (a no-op for a fresh session; after a worker restart it
/// re-queues what the dead worker had read), then the io_uring loop, which [`Server::run`] runs on the
/// caller's thread.
pub fn start(dev: Device, served: Arc<Served>, fill_workers: usize) -> Result<Server<Served>> {
    dev.restore().context("cachefiles `restore` (the kernel needs the 6.8 failover backport, 6.1.95+)")?;
    let config = RingConfig { workers: fill_workers.max(1), fill_whole: true, ..RingConfig::default() };
    Server::new(dev, served, config).context("starting the cachefiles loop")
}

/// The handling times as the control socket reports them (`wisp stats`).
pub fn timings_json(t: &Timings) -> serde_json::Value {
    let one = |s: fscache::ring::timing::Summary| {
        serde_json::json!({
            "count": s.count, "sampled": s.sampled,
            "p50_ms": s.p50_ms, "p90_ms": s.p90_ms, "p99_ms": s.p99_ms, "max_ms": s.max_ms,
        })
    };
    serde_json::json!({ "open": one(t.open()), "read": one(t.read()) })
}

/// The primary blobs of the live mounts: fsid -> (EROFS index file, size).
#[derive(Debug, Default)]
pub struct Primaries(Mutex<HashMap<String, (PathBuf, u64)>>);

impl Primaries {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, (PathBuf, u64)>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serves the EROFS index `path` as the primary blob named `fsid`.
    pub fn add(&self, fsid: &str, path: &Path) -> Result<()> {
        let size = std::fs::metadata(path).with_context(|| format!("stat {}", path.display()))?.len();
        self.map().insert(fsid.to_owned(), (path.to_owned(), size));
        Ok(())
    }

    /// Picks a free fsid for a new mount of image `id` (the id, then `id.1`, `id.2`, ...: a domain
    /// refuses an fsid that is live) and serves `path` under it.
    pub fn claim(&self, id: &str, path: &Path) -> Result<String> {
        let size = std::fs::metadata(path).with_context(|| format!("stat {}", path.display()))?.len();
        let mut p = self.map();
        let fsid = (0..)
            .map(|n| if n == 0 { id.to_owned() } else { format!("{id}.{n}") })
            .find(|f| !p.contains_key(f))
            .expect("an unbounded range has a free name");
        p.insert(fsid.clone(), (path.to_owned(), size));
        Ok(fsid)
    }

    pub fn remove(&self, fsid: &str) {
        self.map().remove(fsid);
    }

    /// The index file and size served as `fsid`.
    pub fn get(&self, fsid: &str) -> Option<(PathBuf, u64)> {
        self.map().get(fsid).cloned()
    }
}

/// What the cachefiles loop serves: the mounts' primary blobs (their EROFS index files, by fsid), and
/// the objects of the [`Core`] (by sha256). The kernel's cache files hold what is filled: no object file
/// of ours, no completeness record.
#[derive(Debug)]
pub struct Served {
    core: Arc<Core>,
    primaries: Primaries,
}

/// A blob the kernel opened.
#[derive(Debug)]
pub enum Blob {
    /// A mount's EROFS index, read from the state directory.
    Primary(PathBuf),
    /// An object of the core.
    Object(Handle),
}

impl Backend for Served {
    type Object = Blob;

    fn open(&self, key: &ObjectKey<'_>) -> Result<Opened<Blob>, Errno> {
        if let Some((path, size)) = self.primaries.get(key.name) {
            return Ok(Opened { object: Blob::Primary(path), size });
        }
        let o = self.core.open(key.name)?;
        Ok(Opened { object: Blob::Object(o.object), size: o.size })
    }

    fn fill(&self, b: &Blob, _range: std::ops::Range<u64>, sink: &mut dyn FillSink) -> Result<(), Errno> {
        match b {
            Blob::Primary(path) => fill_primary(path, sink),
            Blob::Object(h) => self.core.fill(h, sink, &|_| {}),
        }
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

/// The worker's cachefiles frontend.
#[derive(Debug)]
pub struct Cachefiles {
    served: Arc<Served>,
    /// The loop's handling times (set once it is started).
    timings: OnceLock<Arc<Timings>>,
}

impl Cachefiles {
    pub fn new(core: Arc<Core>) -> Cachefiles {
        Cachefiles { served: Arc::new(Served { core, primaries: Primaries::default() }), timings: OnceLock::new() }
    }
}

impl Frontend for Cachefiles {
    fn kind(&self) -> FrontendKind {
        FrontendKind::Cachefiles
    }

    fn object_files(&self) -> bool {
        false
    }

    fn prepare(&self, _entry: &ObjectEntry) -> Result<bool> {
        Ok(false)
    }

    fn watch(&self, _entry: &ObjectEntry, _complete: bool) -> Result<()> {
        Ok(())
    }

    fn unwatch(&self, _entry: &ObjectEntry) {}

    fn claim(&self, rec: &mut MountRecord, img: &Image) -> Result<()> {
        rec.fsid = Some(self.served.primaries.claim(&img.id, &img.erofs_path())?);
        Ok(())
    }

    fn mount_lower(&self, rec: &MountRecord, _img: &Image) -> Result<()> {
        let fsid = rec.fsid.as_deref().context("a cachefiles mount without an fsid")?;
        crate::mount::mount_erofs_fscache(fsid, DOMAIN, &rec.lower)
    }

    fn reclaim(&self, rec: &MountRecord, img: &Image) -> Result<()> {
        match &rec.fsid {
            Some(f) => self.served.primaries.add(f, &img.erofs_path()),
            None => Ok(()),
        }
    }

    fn release(&self, rec: &MountRecord) {
        if let Some(f) = &rec.fsid {
            self.served.primaries.remove(f);
        }
    }

    fn stats(&self) -> serde_json::Value {
        let mut frontend = match self.timings.get() {
            Some(t) => timings_json(t),
            None => serde_json::json!({}),
        };
        frontend["kind"] = "cachefiles".into();
        frontend
    }

    fn status(&self) -> serde_json::Map<String, serde_json::Value> {
        serde_json::Map::new()
    }

    /// Receives the bound /dev/cachefiles session, registers the objects of the images still mounted,
    /// then `restore` and the io_uring loop on this thread ([`start`]).
    fn run_worker(cfg: &Config, session: OwnedFd, listener: OwnedFd) -> Result<()> {
        let dev = Device::from_owned_fd(session);
        let listener = UnixListener::from(listener);
        let nofile = raise_nofile_limit()?;
        let core = worker::open_core(cfg)?;
        let frontend = Arc::new(Cachefiles::new(Arc::clone(&core)));
        let mounts = Arc::new(Mounts::new(&cfg.state, core, Arc::clone(&frontend) as Arc<dyn Frontend>));
        let restored = mounts.restore().context("restoring mounts")?;
        tracing::info!(restored, nofile, pid = std::process::id(), frontend = "cachefiles", "worker ready");
        worker::write_pid(cfg)?;
        let mut server = start(dev, Arc::clone(&frontend.served), cfg.fill_workers)?;
        let _ = frontend.timings.set(server.timings());
        worker::control_thread(listener, mounts)?;
        tracing::debug!("serving /dev/cachefiles");
        server.run().context("serving /dev/cachefiles")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::core::tests::Collect;

    #[test]
    fn a_second_mount_of_an_image_gets_the_next_fsid() {
        let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
        let index = tmp.path().join("index.erofs");
        std::fs::write(&index, vec![7u8; 5000]).unwrap();
        let p = Primaries::default();
        assert_eq!(p.claim("img", &index).unwrap(), "img");
        assert_eq!(p.claim("img", &index).unwrap(), "img.1");
        assert_eq!(p.claim("img", &index).unwrap(), "img.2");
        assert_eq!(p.claim("other", &index).unwrap(), "other");
        p.remove("img.1");
        assert_eq!(p.claim("img", &index).unwrap(), "img.1", "a released fsid is free again");
        assert_eq!(p.get("img.2"), Some((index.clone(), 5000)));
        // After a worker restart the recorded fsid is taken back as it is.
        p.add("img.7", &index).unwrap();
        assert_eq!(p.get("img.7"), Some((index.clone(), 5000)));
        // A missing index file takes no fsid.
        let e = format!("{:#}", p.claim("img", &tmp.path().join("missing")).unwrap_err());
        assert!(e.contains("missing"), "{e}");
        assert_eq!(p.claim("img", &index).unwrap(), "img.3");
    }

    #[test]
    fn primaries_are_served_from_the_index_file() {
        let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
        let cache = NodeCache::open(&tmp.path().join("cache")).unwrap();
        let fetcher = crate::daemon::fetcher::Fetcher::new(crate::daemon::fetcher::FetchOptions {
            concurrency: 1,
            attempts: 1,
            backoff: std::time::Duration::from_millis(10),
            deadline: std::time::Duration::from_secs(10),
            min_rate: 0.0,
            spool_dir: cache.tmp_dir(),
            delay: std::time::Duration::ZERO,
        });
        let f = Cachefiles::new(Arc::new(Core::new(cache, fetcher)));
        // Larger than the 1 MiB pieces it is written in.
        let index = tmp.path().join("index.erofs");
        let bytes: Vec<u8> = (0..(5u32 << 19) + 123).map(|i| (i % 253) as u8).collect();
        std::fs::write(&index, &bytes).unwrap();
        let fsid = f.served.primaries.claim("img", &index).unwrap();
        fn key(name: &str) -> ObjectKey<'_> {
            ObjectKey { domain: DOMAIN, name }
        }
        let o = f.served.open(&key(&fsid)).unwrap();
        assert_eq!(o.size, bytes.len() as u64);
        let mut sink = Collect::default();
        f.served.fill(&o.object, 0..o.size, &mut sink).unwrap();
        assert!(sink.0 == std::fs::read(&index).unwrap(), "the sink holds the index file");
        // Neither another fsid nor an unregistered object is known.
        assert!(matches!(f.served.open(&key("img.1")), Err(Errno::ENOENT)));
        assert!(matches!(f.served.open(&key(&"ab".repeat(32))), Err(Errno::ENOENT)));
        f.served.primaries.remove(&fsid);
        assert!(matches!(f.served.open(&key(&fsid)), Err(Errno::ENOENT)));
    }
}
