//! The kernel interfaces the daemon serves, one module each, behind one trait, [`Frontend`]:
//!
//! * [`fanotify`]: fanotify pre-content events (Linux 6.14+). Each object is a sparse file under
//!   `CACHE/objects`, marked until it is filled; a mount is the EROFS index file-backed with one
//!   `device=` per object file.
//! * [`cachefiles`]: cachefiles on-demand (CONFIG_CACHEFILES_ONDEMAND, the 6.1 kernel of vm-tests/).
//!   The kernel's cache files are the node cache; a mount is EROFS over fscache, its index the primary
//!   blob of a per-mount fsid.
//!
//! The choice is made once, when the supervisor opens the kernel session ([`Session::open`], from
//! `--frontend`); the session is handed to each worker with a label naming it, and the worker runs
//! that frontend ([`run_worker`]). A third kernel interface is one more module implementing
//! [`Frontend`], one arm in [`Session`] and one in [`run_worker`].

pub mod cachefiles;
pub mod fanotify;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use anyhow::{bail, Result};

use super::cache::NodeCache;
use super::images::Image;
use super::mounts::MountRecord;
use super::protocol::FrontendKind;
use super::Config;
use crate::object::ObjectEntry;

/// What a kernel interface does for the daemon's worker. [`super::mounts::Mounts`] calls it around the
/// core's bookkeeping: per object as images register and release it, per mount as its EROFS lower is
/// mounted, restored and unmounted; the worker asks it for `stats` and `status`.
pub trait Frontend: Send + Sync {
    /// The interface, as `status`, `stats` and mount answers name it.
    fn kind(&self) -> FrontendKind;

    /// Whether the object files under `CACHE/objects` are the node cache, so that their completeness
    /// records say what the node holds (fanotify). False when the kernel's own cache files hold the
    /// objects (cachefiles).
    fn object_files(&self) -> bool;

    /// Before `entry` is registered for a mount: gets its object ready (fanotify: the sparse object
    /// file). Returns whether the node cache holds it whole already.
    fn prepare(&self, entry: &ObjectEntry) -> Result<bool>;

    /// The first mounted image to need `entry` registered it: start watching it (fanotify: mark its
    /// object file unless it is `complete`).
    fn watch(&self, entry: &ObjectEntry, complete: bool) -> Result<()>;

    /// No mounted image needs `entry` anymore: stop watching it.
    fn unwatch(&self, entry: &ObjectEntry);

    /// Before a new mount's lower is mounted: takes what it needs and records it in `rec`
    /// (cachefiles: a free fsid for its primary blob). Undone by [`Frontend::release`].
    fn claim(&self, rec: &mut MountRecord, img: &Image) -> Result<()>;

    /// Mounts the EROFS index of `img` at `rec.lower`, read through this interface.
    fn mount_lower(&self, rec: &MountRecord, img: &Image) -> Result<()>;

    /// After a worker restart, for a mount the kernel still has: takes back what
    /// [`Frontend::claim`] took.
    fn reclaim(&self, rec: &MountRecord, img: &Image) -> Result<()>;

    /// The mount `rec` is gone (or failed): releases what [`Frontend::claim`] took.
    fn release(&self, rec: &MountRecord);

    /// The interface's counters for `wisp stats` (`kind` names it).
    fn stats(&self) -> serde_json::Value;

    /// Fields of its own in `wisp status`.
    fn status(&self) -> serde_json::Map<String, serde_json::Value>;

    /// The worker's life with this interface: takes the kernel session and the control listener from
    /// the supervisor, restores the mounts, starts the control thread and serves the kernel on this
    /// thread until the session ends.
    fn run_worker(cfg: &Config, session: OwnedFd, listener: OwnedFd) -> Result<()>
    where
        Self: Sized;
}

/// The kernel session the supervisor holds for its workers (a worker that dies must not close it).
#[derive(Debug)]
pub enum Session {
    Fanotify(fscache::fanotify::Group),
    Cachefiles(fscache::cachefiles::Device),
}

impl Session {
    /// Opens the session `kind` asks for. `auto`: fanotify when the kernel has pre-content events
    /// (6.14+), else cachefiles.
    pub fn open(kind: FrontendKind, cache: &NodeCache) -> Result<Session> {
        let fanotify = || fanotify::open_session(cache).map(Session::Fanotify);
        let cachefiles = || cachefiles::open_session(cache).map(Session::Cachefiles);
        match kind {
            FrontendKind::Fanotify => fanotify(),
            FrontendKind::Cachefiles => cachefiles(),
            FrontendKind::Auto => fanotify().or_else(|fe| {
                tracing::info!(reason = %format!("{fe:#}"), "fanotify frontend unavailable; trying cachefiles");
                cachefiles()
                    .map_err(|ce| anyhow::anyhow!("no usable kernel interface: fanotify: {fe:#}; cachefiles: {ce:#}"))
            }),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Session::Fanotify(_) => "fanotify",
            Session::Cachefiles(_) => "cachefiles",
        }
    }

    /// The label of the fd message to a worker, and the session's fd.
    pub fn handover(&self) -> (&'static str, BorrowedFd<'_>) {
        match self {
            Session::Fanotify(g) => (fanotify::FDS_LABEL, g.as_fd()),
            Session::Cachefiles(d) => (cachefiles::FDS_LABEL, d.as_fd()),
        }
    }
}

/// Runs the worker of the frontend the supervisor's fd message names (`label`, see
/// [`Session::handover`]).
pub fn run_worker(cfg: &Config, label: &str, session: OwnedFd, listener: OwnedFd) -> Result<()> {
    match label {
        fanotify::FDS_LABEL => fanotify::Fanotify::run_worker(cfg, session, listener),
        cachefiles::FDS_LABEL => cachefiles::Cachefiles::run_worker(cfg, session, listener),
        _ => bail!("unexpected fd message {label:?} from the supervisor"),
    }
}
