//! The fanotify event loop: one thread reads events and answers them; fills run on worker threads.
//!
//! Per object (keyed by device and inode) the state is idle, filling (with the fds of the events waiting
//! for it) or done. The first event starts one whole-object fill; events arriving meanwhile wait for the
//! same fill (single flight); after a successful fill the mark is removed before anyone is allowed in.
//! A failed fill denies every waiter and returns the object to idle, so the next read retries.
//!
//! With a [`Journal`] set, every event's fd number is recorded before the event is acted on and cleared
//! after it is answered, so that [`Frontend::recover`] in a restarted worker can answer the events a
//! killed worker had read (see [`super::journal`]).

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::journal::{Journal, Leftovers};
use super::{Error, Event, Group, Response, FAN_PRE_ACCESS};
use crate::backend::{clip, Backend, Coverage, Errno, FillSink, ObjectKey};
use crate::pool::Pool;
use crate::sys;

type Key = (u64, u64);

enum State {
    Idle,
    Filling(Vec<OwnedFd>),
    Done,
}

struct Entry {
    name: String,
    path: PathBuf,
    state: State,
    /// Events of a dead worker waiting for this object, by fd number (answered with the waiters).
    orphans: Vec<i32>,
}

/// Counters, for tests and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Permission events read.
    pub events: u64,
    /// Whole-object fills that succeeded.
    pub fills: u64,
    /// Fills that failed (their readers were denied).
    pub failures: u64,
}

/// What [`Frontend::recover`] did with a dead worker's unanswered events.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Recorded events for objects still to fill: they are answered once the object is filled.
    pub resumed: u64,
    /// Recorded events for complete or foreign objects: allowed at once.
    pub allowed: u64,
    /// Events read but never recorded (the worker died between read and journal): denied with EIO.
    pub denied_unrecorded: u64,
}

struct Inner<B: Backend> {
    group: Group,
    backend: Arc<B>,
    domain: String,
    objects: Mutex<HashMap<Key, Entry>>,
    stop: AtomicBool,
    wake: OwnedFd,
    events: AtomicU64,
    fills: AtomicU64,
    failures: AtomicU64,
    journal: OnceLock<Journal>,
}

/// Stops [`Frontend::run`] from another thread.
#[derive(Clone)]
pub struct Stopper(Arc<dyn Fn() + Send + Sync>);

impl Stopper {
    /// Asks the loop to return.
    pub fn stop(&self) {
        (self.0)()
    }
}

impl std::fmt::Debug for Stopper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Stopper")
    }
}

/// Serves a [`Group`]'s pre-content events with a [`Backend`].
pub struct Frontend<B: Backend> {
    inner: Arc<Inner<B>>,
    pool: Pool,
}

impl<B: Backend> std::fmt::Debug for Frontend<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Frontend").field("domain", &self.inner.domain).finish_non_exhaustive()
    }
}

impl<B: Backend> Frontend<B> {
    /// `domain` is passed to the backend as [`ObjectKey::domain`]; `workers` fills run in parallel.
    pub fn new(group: Group, backend: Arc<B>, domain: &str, workers: usize) -> Result<Self, Error> {
        let wake = sys::eventfd().map_err(|source| Error::Io { what: "creating an eventfd", source })?;
        let pool =
            Pool::new(workers, "wisp-fanotify").map_err(|source| Error::Io { what: "starting workers", source })?;
        let inner = Inner {
            group,
            backend,
            domain: domain.to_owned(),
            objects: Mutex::new(HashMap::new()),
            stop: AtomicBool::new(false),
            wake,
            events: AtomicU64::new(0),
            fills: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            journal: OnceLock::new(),
        };
        Ok(Frontend { inner: Arc::new(inner), pool })
    }

    /// The group (e.g. to probe, or to hand its fd to a supervisor).
    pub fn group(&self) -> &Group {
        &self.inner.group
    }

    /// Registers the object file `path` (created with its final size) under `name` and marks it.
    pub fn add(&self, path: &Path, name: &str) -> Result<(), Error> {
        let meta = std::fs::metadata(path).map_err(|source| Error::Io { what: "stat of an object file", source })?;
        let entry = Entry { name: name.to_owned(), path: path.to_owned(), state: State::Idle, orphans: Vec::new() };
        self.inner.lock().insert((meta.dev(), meta.ino()), entry);
        if let Err(e) = self.inner.group.mark(path) {
            self.inner.lock().remove(&(meta.dev(), meta.ino()));
            return Err(e);
        }
        Ok(())
    }

    /// Forgets an object file (unmarking it if it was never filled).
    pub fn remove(&self, path: &Path) -> Result<(), Error> {
        let meta = std::fs::metadata(path).map_err(|source| Error::Io { what: "stat of an object file", source })?;
        let mut entry = self.inner.lock().remove(&(meta.dev(), meta.ino()));
        if let Some(e) = entry.as_mut() {
            let orphans = std::mem::take(&mut e.orphans);
            self.inner.respond_orphans(orphans, Response::Deny(Errno::EIO));
        }
        match entry {
            Some(Entry { state: State::Done, .. }) | None => Ok(()),
            Some(_) => self.inner.group.unmark(path),
        }
    }

    /// Records in-flight events in `journal` from now on (set it before [`Frontend::run`]).
    pub fn set_journal(&self, journal: Journal) {
        if self.inner.journal.set(journal).is_err() {
            tracing::warn!("a journal was already set; keeping the first");
        }
    }

    /// Answers the events a killed worker left unanswered, before this frontend reads any event:
    /// numbers read but never recorded are denied with EIO; recorded events for registered objects
    /// that are not filled yet wait for a fill (started here by a one-byte read of the object file in
    /// a helper thread, which raises a fresh event); the others are allowed. Call after every object
    /// has been [`add`](Frontend::add)ed again and before [`run`](Frontend::run) (which must then run
    /// for the resumed readers to be answered).
    ///
    /// The process must hold every fd number up to [`Leftovers::ceiling`] for as long as those events
    /// may be pending (see [`super::journal::Reservation`]): the kernel finds the event a response is
    /// for by fd number alone, so a new event read into such a number would have its answer applied
    /// to the old event, letting its reader see an unfilled (zero) range.
    pub fn recover(&self, left: &Leftovers) -> Recovery {
        let inner = &self.inner;
        let mut r = Recovery::default();
        let recorded: std::collections::HashSet<i32> = left.orphans.iter().map(|o| o.fd).collect();
        for n in 0..=left.high_water {
            if !recorded.contains(&n) && inner.group.respond_number(n, Response::Deny(Errno::EIO)).is_ok() {
                r.denied_unrecorded += 1;
            }
        }
        let mut kicks = Vec::new();
        {
            let mut objects = inner.lock();
            for o in &left.orphans {
                match objects.get_mut(&(o.dev, o.ino)) {
                    Some(e) if !matches!(e.state, State::Done) => {
                        if e.orphans.is_empty() {
                            kicks.push(e.path.clone());
                        }
                        e.orphans.push(o.fd);
                        r.resumed += 1;
                    }
                    _ => {
                        if inner.group.respond_number(o.fd, Response::Allow).is_ok() {
                            r.allowed += 1;
                        }
                        inner.journal_end(o.fd);
                    }
                }
            }
        }
        for path in kicks {
            let spawned = std::thread::Builder::new().name("wisp-fanotify-kick".into()).spawn(move || {
                // The read blocks until the fill it triggers is done; its result does not matter.
                if let Ok(f) = std::fs::File::open(&path) {
                    let mut b = [0u8; 1];
                    let _ = std::os::unix::fs::FileExt::read_at(&f, &mut b, 0);
                }
            });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "starting a recovery read");
            }
        }
        r
    }

    /// Counters so far.
    pub fn stats(&self) -> Stats {
        let i = &self.inner;
        Stats {
            events: i.events.load(Ordering::SeqCst),
            fills: i.fills.load(Ordering::SeqCst),
            failures: i.failures.load(Ordering::SeqCst),
        }
    }

    /// A handle that makes [`Frontend::run`] return.
    pub fn stopper(&self) -> Stopper {
        let inner = Arc::clone(&self.inner);
        Stopper(Arc::new(move || {
            inner.stop.store(true, Ordering::SeqCst);
            let _ = nix::unistd::write(&inner.wake, &1u64.to_ne_bytes());
        }))
    }

    /// Reads and answers events until stopped.
    pub fn run(&self) -> Result<(), Error> {
        let inner = &self.inner;
        while !inner.stop.load(Ordering::SeqCst) {
            let mut fds = [
                PollFd::new(inner.group.as_fd(), PollFlags::POLLIN),
                PollFd::new(inner.wake.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => return Err(Error::Io { what: "poll of the fanotify group", source: e.into() }),
            }
            for event in inner.group.read_events()? {
                self.on_event(event);
            }
        }
        Ok(())
    }

    fn on_event(&self, event: Event) {
        let Some(fd) = event.fd else {
            tracing::warn!(mask = event.mask, "fanotify event without fd (queue overflow?)");
            return;
        };
        let inner = &self.inner;
        if event.mask & FAN_PRE_ACCESS == 0 {
            inner.respond(&fd, Response::Allow);
            return;
        }
        inner.events.fetch_add(1, Ordering::SeqCst);
        let meta = match nix::sys::stat::fstat(fd.as_raw_fd()) {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(error = %e, "fstat of a fanotify event fd");
                inner.respond(&fd, Response::Deny(Errno::EIO));
                return;
            }
        };
        let key = (meta.st_dev, meta.st_ino);
        if let Some(j) = inner.journal.get() {
            if let Err(e) = j.begin(fd.as_raw_fd(), key.0, key.1) {
                tracing::error!(error = %e, "recording an event in the journal");
            }
        }
        let mut objects = inner.lock();
        let Some(entry) = objects.get_mut(&key) else {
            drop(objects);
            inner.respond(&fd, Response::Allow); // not (or no longer) ours
            return;
        };
        match &mut entry.state {
            State::Done => {
                drop(objects);
                inner.respond(&fd, Response::Allow);
            }
            State::Filling(waiters) => waiters.push(fd),
            State::Idle => {
                let writer = match fd.try_clone() {
                    Ok(w) => w,
                    Err(e) => {
                        drop(objects);
                        tracing::error!(error = %e, "dup of a fanotify event fd");
                        inner.respond(&fd, Response::Deny(Errno::EIO));
                        return;
                    }
                };
                entry.state = State::Filling(vec![fd]);
                let name = entry.name.clone();
                drop(objects);
                let mut guard = FillGuard { inner: Arc::clone(inner), key, done: false };
                self.pool.spawn(move || {
                    let result = fill_whole(&*guard.inner, &name, &writer);
                    guard.finish(result, &writer);
                });
            }
        }
    }
}

impl<B: Backend> Inner<B> {
    fn lock(&self) -> MutexGuard<'_, HashMap<Key, Entry>> {
        self.objects.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn respond(&self, fd: &OwnedFd, response: Response) {
        if let Err(e) = self.group.respond(fd.as_fd(), response) {
            tracing::error!(error = %e, ?response, "fanotify response failed");
        }
        self.journal_end(fd.as_raw_fd());
    }

    fn journal_end(&self, fd: i32) {
        if let Some(j) = self.journal.get() {
            if let Err(e) = j.end(fd) {
                tracing::error!(error = %e, "clearing an event in the journal");
            }
        }
    }

    /// Answers events left by a dead worker (by number; ENOENT means already answered).
    fn respond_orphans(&self, orphans: Vec<i32>, response: Response) {
        for n in orphans {
            if let Err(e) = self.group.respond_number(n, response) {
                tracing::debug!(error = %e, fd = n, "answering a recovered event");
            }
            self.journal_end(n);
        }
    }
}

/// Fills the object behind `writer` from the backend, whole.
fn fill_whole<B: Backend>(inner: &Inner<B>, name: &str, writer: &OwnedFd) -> Result<(), Errno> {
    let file_size = u64::try_from(nix::sys::stat::fstat(writer.as_raw_fd())?.st_size).map_err(|_| Errno::EIO)?;
    let opened = inner.backend.open(&ObjectKey { domain: &inner.domain, name })?;
    let result = (|| {
        if opened.size > file_size {
            tracing::error!(name, size = opened.size, file_size, "object file is smaller than the object");
            return Err(Errno::EIO);
        }
        let want = 0..opened.size;
        let mut sink = FileSink { fd: writer, limit: want.clone(), coverage: Coverage::default() };
        inner.backend.fill(&opened.object, want.clone(), &mut sink)?;
        if !sink.coverage.covers(&want) {
            tracing::error!(name, "backend left part of the object unwritten");
            return Err(Errno::EIO);
        }
        Ok(())
    })();
    inner.backend.close(&opened.object);
    result
}

/// Writes fill bytes straight into the object file through the event fd (no events are raised for it).
struct FileSink<'a> {
    fd: &'a OwnedFd,
    limit: std::ops::Range<u64>,
    coverage: Coverage,
}

impl FillSink for FileSink<'_> {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), Errno> {
        let end = offset.checked_add(data.len() as u64).ok_or(Errno::EINVAL)?;
        let keep = clip(offset..end, &self.limit);
        if keep.is_empty() {
            return Ok(());
        }
        let idx = |x: u64| usize::try_from(x).map_err(|_| Errno::EINVAL);
        let bytes = &data[idx(keep.start - offset)?..idx(keep.end - offset)?];
        let mut done = 0usize;
        while done < bytes.len() {
            let at = i64::try_from(keep.start + done as u64).map_err(|_| Errno::EFBIG)?;
            match nix::sys::uio::pwrite(self.fd, &bytes[done..], at) {
                Ok(0) => return Err(Errno::EIO),
                Ok(n) => done += n,
                Err(Errno::EINTR) => {}
                Err(e) => return Err(e),
            }
        }
        self.coverage.add(keep);
        Ok(())
    }
}

/// Finishes a fill exactly once: unmark + allow on success, deny on failure (also on a panic).
struct FillGuard<B: Backend> {
    inner: Arc<Inner<B>>,
    key: Key,
    done: bool,
}

impl<B: Backend> FillGuard<B> {
    fn finish(&mut self, result: Result<(), Errno>, writer: &OwnedFd) {
        self.done = true;
        let inner = &self.inner;
        match result {
            // Drop the mark before letting anyone in, so no read after this one raises an event.
            Ok(()) => {
                if let Err(e) = inner.group.unmark_fd(writer.as_fd()) {
                    tracing::error!(error = %e, "removing the mark of a filled object");
                }
            }
            Err(errno) => tracing::warn!(%errno, "object fill failed; denying its readers"),
        }
        let (waiters, orphans) = {
            let mut objects = inner.lock();
            match objects.get_mut(&self.key) {
                Some(entry) => {
                    let next = if result.is_ok() { State::Done } else { State::Idle };
                    if result.is_ok() {
                        tracing::debug!(path = ?entry.path, "object filled");
                    }
                    let orphans = std::mem::take(&mut entry.orphans);
                    match std::mem::replace(&mut entry.state, next) {
                        State::Filling(w) => (w, orphans),
                        _ => (Vec::new(), orphans),
                    }
                }
                None => (Vec::new(), Vec::new()),
            }
        };
        let response = match result {
            Ok(()) => {
                inner.fills.fetch_add(1, Ordering::SeqCst);
                Response::Allow
            }
            Err(errno) => {
                inner.failures.fetch_add(1, Ordering::SeqCst);
                Response::Deny(errno)
            }
        };
        for fd in waiters {
            inner.respond(&fd, response);
        }
        inner.respond_orphans(orphans, response);
    }
}

impl<B: Backend> Drop for FillGuard<B> {
    fn drop(&mut self) {
        if !self.done {
            // The fill panicked: deny the waiters rather than leave their reads hanging.
            let (waiters, orphans) = match self.inner.lock().get_mut(&self.key) {
                Some(entry) => {
                    let orphans = std::mem::take(&mut entry.orphans);
                    match std::mem::replace(&mut entry.state, State::Idle) {
                        State::Filling(w) => (w, orphans),
                        _ => (Vec::new(), orphans),
                    }
                }
                None => (Vec::new(), Vec::new()),
            };
            for fd in waiters {
                self.inner.respond(&fd, Response::Deny(Errno::EIO));
            }
            self.inner.respond_orphans(orphans, Response::Deny(Errno::EIO));
        }
    }
}
