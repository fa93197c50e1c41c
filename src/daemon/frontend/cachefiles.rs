//! The cachefiles on-demand frontend of the daemon (Linux 5.19+ with CONFIG_CACHEFILES_ONDEMAND and
//! CONFIG_EROFS_FS_ONDEMAND; the 6.1 kernel of vm-tests/).
//!
//! * The supervisor opens `/dev/cachefiles`, binds it (`dir CACHE/cachefiles`, `tag wisp`,
//!   `bind ondemand`: [`open_bound`]) and holds the session for the daemon's lifetime, so a dead worker
//!   never releases it (that would fail every outstanding request and break every mount for good,
//!   docs/kernel.md A.6). Each worker receives a copy over SCM_RIGHTS and sends `restore` first ([`serve`]),
//!   which hands it again every request its predecessor had read but not answered; objects whose
//!   anonymous fds died with it are re-OPENed by the kernel.
//! * Requests (OPEN / READ / CLOSE) are served by [`fscache::ring::Server`] (io_uring loop + a pool of
//!   fill threads) over the daemon [`Core`]. A READ is answered with the whole object
//!   (`fill_whole`): the core fetches and verifies whole objects anyway, and once the kernel's cache
//!   file holds all of it, no later read of that object reaches the daemon.
//! * Every image is mounted in one fscache domain, [`DOMAIN`]: an object shared by several images is
//!   one cookie, one OPEN, one cache file, fetched once. The kernel's cache files under
//!   `CACHE/cachefiles` are the node cache; nothing is copied to `CACHE/objects`.
//! * Each mount's primary blob (its EROFS index) is named by a per-mount fsid (the image id, with a
//!   `.N` suffix for a second concurrent mount of the same image: a domain refuses an fsid that is
//!   already live, docs/kernel.md B.2).
//!
//! Anonymous fds: the kernel hands one fd per OPEN (one per distinct object in the domain, plus one
//! primary per mount), and the loop keeps it until the object's CLOSE (last unmount using it): a
//! complete object still holds its fd, as the kernel would otherwise re-OPEN it on the next cache miss
//! (page cache dropped). So the worker raises RLIMIT_NOFILE ([`raise_nofile_limit`]); the budget is
//! the number of distinct objects over all mounted images.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use fscache::cachefiles::{Device, Error as DevError};
use fscache::ring::timing::Timings;
use fscache::ring::{Config as RingConfig, Server};

use crate::daemon::core::Core;

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
pub fn start(dev: Device, core: Arc<Core>, fill_workers: usize) -> Result<Server<Core>> {
    dev.restore().context("cachefiles `restore` (the kernel needs the 6.8 failover backport, 6.1.95+)")?;
    let config = RingConfig { workers: fill_workers.max(1), fill_whole: true, ..RingConfig::default() };
    Server::new(dev, core, config).context("starting the cachefiles loop")
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
