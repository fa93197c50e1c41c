//! The fanotify pre-content frontend of the daemon (Linux 6.14+; the host kernel).
//!
//! * The supervisor creates the fanotify group ([`open_session`]: it must take pre-content marks on
//!   `CACHE/objects`) and holds it for the daemon's lifetime: if it closed with events pending, the
//!   kernel would allow them and unfilled holes would read as zeros (docs/kernel.md G.4). Each worker
//!   receives it over SCM_RIGHTS.
//! * Each object a mounted image needs is a sparse file of the node cache, `CACHE/objects/<2 hex>/<64
//!   hex>` ([`crate::daemon::cache`]), marked for pre-content events until it is complete. The first
//!   read of a marked file blocks in the kernel; [`fscache::fanotify::Frontend`] (a pool of fill threads)
//!   asks the [`Core`] for the whole object, writes it, answers the event and drops the mark. The
//!   completeness record follows off the reader's path ([`NodeCache::complete_later`]).
//! * A mount is the EROFS index file-backed with one `device=` per object file, always with direct
//!   I/O ([`crate::mount::mount_erofs_file`]).
//! * A worker that dies leaves events read and unanswered: they are recorded in a journal
//!   (`STATE/inflight`, `fscache::fanotify::journal`), and its successor answers them
//!   ([`fscache::fanotify::Frontend::recover`]) once the mounts are restored.
//!
//! [`NodeCache::complete_later`]: crate::daemon::cache::NodeCache::complete_later

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use anyhow::{Context, Result};
use fscache::backend::{Backend, Errno, FillSink, ObjectKey, Opened};
use fscache::fanotify::journal::{self, Journal};
use fscache::fanotify::{Frontend as Server, Group, Recovery};

use super::Frontend;
use crate::daemon::cache::NodeCache;
use crate::daemon::core::{Core, Handle};
use crate::daemon::images::Image;
use crate::daemon::mounts::{MountRecord, Mounts};
use crate::daemon::protocol::FrontendKind;
use crate::daemon::{worker, Config};
use crate::object::ObjectEntry;

/// Label of the fd message the supervisor sends (fanotify group + control listener).
pub const FDS_LABEL: &str = "wisp-daemon";

/// Creates the fanotify group the supervisor holds, after checking that it can mark the object files.
pub fn open_session(cache: &NodeCache) -> Result<Group> {
    let group = Group::new().context("the fanotify frontend needs fanotify pre-content events (Linux 6.14+)")?;
    group
        .probe(&cache.root().join("objects"))
        .context("the fanotify frontend needs pre-content marks on the cache directory")?;
    Ok(group)
}

/// The core as the fanotify loop serves it: a filled object is then recorded complete in the node
/// cache (off the reader's path).
#[derive(Debug)]
pub struct Objects(Arc<Core>);

impl Backend for Objects {
    type Object = Handle;

    fn open(&self, key: &ObjectKey<'_>) -> Result<Opened<Handle>, Errno> {
        self.0.open(key.name)
    }

    fn fill(&self, h: &Handle, _range: std::ops::Range<u64>, sink: &mut dyn FillSink) -> Result<(), Errno> {
        // Verified bytes are written: the reader may go on. The durable record follows off this path.
        self.0.fill(h, sink, &|digest| self.0.cache().complete_later(digest))
    }
}

/// The worker's fanotify frontend.
pub struct Fanotify {
    core: Arc<Core>,
    server: Server<Objects>,
    /// What the worker did with its predecessor's unanswered events (set once the mounts are restored).
    recovered: OnceLock<Recovery>,
}

impl std::fmt::Debug for Fanotify {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fanotify").field("recovered", &self.recovered).finish_non_exhaustive()
    }
}

impl Fanotify {
    /// The frontend over `group`, with `fill_workers` fill threads (not serving until
    /// [`Server::run`]).
    pub fn new(group: Group, core: Arc<Core>, fill_workers: usize) -> Result<Fanotify> {
        let server = Server::new(group, Arc::new(Objects(Arc::clone(&core))), "wisp", fill_workers)?;
        Ok(Fanotify { core, server, recovered: OnceLock::new() })
    }
}

impl Frontend for Fanotify {
    fn kind(&self) -> FrontendKind {
        FrontendKind::Fanotify
    }

    fn object_files(&self) -> bool {
        true
    }

    fn prepare(&self, entry: &ObjectEntry) -> Result<bool> {
        self.core.cache().prepare(&entry.digest, entry.size)
    }

    fn watch(&self, entry: &ObjectEntry, complete: bool) -> Result<()> {
        let path = self.core.cache().path(&entry.digest);
        if complete {
            // A mark a killed worker left on an object it had completed: drop it (no-op otherwise).
            let _ = self.server.group().unmark(&path);
            Ok(())
        } else {
            self.server.add(&path, &hex::encode(entry.digest)).context("marking an object file for pre-content events")
        }
    }

    fn unwatch(&self, entry: &ObjectEntry) {
        let path = self.core.cache().path(&entry.digest);
        if let Err(err) = self.server.remove(&path) {
            tracing::warn!(error = %err, path = %path.display(), "unwatching an object file");
        }
    }

    fn claim(&self, _rec: &mut MountRecord, _img: &Image) -> Result<()> {
        Ok(())
    }

    fn mount_lower(&self, rec: &MountRecord, img: &Image) -> Result<()> {
        let devices: Vec<PathBuf> = img.devices.iter().map(|e| self.core.cache().path(&e.digest)).collect();
        // Always direct I/O, even when every object is already complete (no marks): measured with
        // scripts/bench-warm, a buffered mount of complete objects read cold at 0.70x plain+overlay
        // against 0.77x for direct I/O in the same run (each object is its own file, so buffered
        // readahead cannot run past it, and pages are cached twice).
        crate::mount::mount_erofs_file(&img.erofs_path(), &rec.lower, &devices, true)
    }

    fn reclaim(&self, _rec: &MountRecord, _img: &Image) -> Result<()> {
        Ok(())
    }

    fn release(&self, _rec: &MountRecord) {}

    fn stats(&self) -> serde_json::Value {
        let s = self.server.stats();
        serde_json::json!({"kind": "fanotify", "events": s.events, "fills": s.fills, "failures": s.failures})
    }

    fn status(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        if let Some(rec) = self.recovered.get() {
            m.insert(
                "recovered".into(),
                serde_json::json!({"resumed": rec.resumed, "allowed": rec.allowed, "denied_unrecorded": rec.denied_unrecorded}),
            );
        }
        m
    }

    /// Receives the fanotify group, watches the objects of the images still mounted, answers what a
    /// killed predecessor left unanswered, then serves events on this thread.
    fn run_worker(cfg: &Config, group: OwnedFd, listener: OwnedFd) -> Result<()> {
        // Before anything else is opened: no fd of this process may take the number of an event a dead
        // worker read and nobody has answered yet (the kernel matches responses by fd number). Move the
        // fds held so far above the highest such number and hold every number below it (journal docs).
        let (mut journal, left) =
            Journal::open(&cfg.state.join("inflight")).context("opening the in-flight journal")?;
        let (group, listener, _reserved) = match left.ceiling() {
            None => (group, listener, None),
            Some(top) => {
                let group = journal::lift(group, top).context("moving the fanotify group fd")?;
                let listener = journal::lift(listener, top).context("moving the control socket fd")?;
                journal.lift(top).context("moving the journal fd")?;
                let r = journal::Reservation::claim(Some(top)).context("holding the fd numbers of pending events")?;
                if !r.strays().is_empty() {
                    tracing::error!(fds = ?r.strays(), "fds open at start-up below a pending event's number");
                }
                (group, listener, Some(r))
            }
        };
        let group = Group::from_owned_fd(group);
        let listener = UnixListener::from(listener);

        let core = worker::open_core(cfg)?;
        let frontend = Arc::new(Fanotify::new(group, Arc::clone(&core), cfg.fill_workers)?);
        frontend.server.set_journal(journal);
        let mounts = Arc::new(Mounts::new(&cfg.state, core, Arc::clone(&frontend) as Arc<dyn Frontend>));
        let restored = mounts.restore().context("restoring mounts")?;
        let rec = frontend.server.recover(&left);
        let _ = frontend.recovered.set(rec);
        tracing::info!(restored, ?rec, pid = std::process::id(), "worker ready");
        worker::write_pid(cfg)?;

        worker::control_thread(listener, mounts)?;
        frontend.server.run().context("serving fanotify events")?;
        Ok(())
    }
}
