//! The cachefiles on-demand event loop: io_uring for the kernel I/O, a worker pool for the backend.
//!
//! Design. One loop thread owns the io_uring instance. It polls `/dev/cachefiles` for POLLIN, reads
//! messages (one per read, until a read returns 0; docs/kernel.md A.5), writes `copen` replies, and writes
//! filled object data to the anonymous fds, each submission owning its buffer and fd in a slab keyed by
//! `user_data` (the private `sys::uring` module). Everything that may block on the network (the [`Backend`]'s
//! `open`/`fill`/`close`) runs on a small pool of worker threads, which post their results back through
//! a queue and wake the loop with an eventfd that the loop also reads through io_uring. So a slow fetch
//! occupies one worker, never the loop: other OPENs and READs keep flowing, up to the pool size in
//! parallel. We chose blocking workers over an async runtime because the backend API is synchronous
//! (it is shared with the fanotify frontend) and the kernel-facing I/O is what io_uring is good at.
//!
//! Per READ: a worker asks the backend for the block-aligned window around the range (clipped to the
//! object size; the rest stays zero, docs/kernel.md B.5) into a page-aligned buffer, checks every byte was
//! written, and posts the buffer; the loop writes it with IORING_OP_WRITE at the aligned offset (the
//! 6.1 direct-I/O pitfall of docs/kernel.md A.4), continues short writes, retries ENOBUFS after a timeout op,
//! then completes the READ with the READ_COMPLETE ioctl (a short synchronous call). A backend error
//! completes the READ without data, which the kernel reports to the reader as EIO.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::backend::{Backend, Errno, ObjectKey};
use crate::cachefiles::{self, enobufs_backoff, Device, ObjectFd, OpenRequest, ReadRequest, Request};
use crate::proto::opcode;
use crate::sys::aligned::BLOCK;
use crate::sys::uring::{Done, FdHold, Op, Uring, WriteBuf};
use crate::{pool::Pool, sys};

pub mod timing;
mod work;
use timing::{Kind, Timings};
use work::{fill_window, FillGuard, OpenGuard, Posted, Shared};

/// Loop settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// io_uring submission queue size.
    pub entries: u32,
    /// Worker threads for backend calls (the number of fetches in flight).
    pub workers: usize,
    /// Largest READ served; larger ones fail (EROFS asks for at most one chunk / readahead window).
    pub max_read_len: u64,
    /// Answer a READ by writing the whole object (when it is at most `max_read_len`), so later reads of
    /// it never reach the daemon: the backend verifies whole objects anyway, and the cache file then
    /// holds all of it. Off: only the block-aligned window around the READ is written.
    pub fill_whole: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config { entries: 256, workers: 16, max_read_len: 64 << 20, fill_whole: false }
    }
}

/// Errors that stop the loop.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    /// The kernel's io_uring lacks opcodes the loop needs.
    #[error("io_uring lacks {0:?}: the cachefiles loop needs Linux >= 5.6 with io_uring enabled")]
    Unsupported(Vec<&'static str>),
    /// io_uring could not be set up (ENOSYS, or EPERM under kernel.io_uring_disabled).
    #[error("io_uring setup failed (is io_uring disabled by sysctl kernel.io_uring_disabled?): {0}")]
    Setup(#[source] std::io::Error),
    /// Starting worker threads or the wake eventfd failed.
    #[error("starting the cachefiles loop: {0}")]
    Start(#[source] std::io::Error),
    /// Waiting for completions failed.
    #[error("io_uring wait: {0}")]
    Wait(#[source] std::io::Error),
    /// The device stopped working (poll or read error).
    #[error("{DEVICE}: {0}", DEVICE = cachefiles::DEVICE_PATH)]
    Device(#[source] std::io::Error),
}

/// An object the kernel opened and the backend accepted.
pub(crate) struct Object<O> {
    id: u32,
    fd: ObjectFd,
    object: O,
    size: u64,
}

impl<O> AsFd for Object<O> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Stops a running loop from another thread.
#[derive(Clone)]
pub struct Stopper(Arc<dyn StopTarget>);

trait StopTarget: Send + Sync {
    fn stop(&self);
}

impl<O: Send + Sync> StopTarget for Shared<O> {
    fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.kick();
    }
}

impl Stopper {
    /// Asks the loop to return from [`Server::run`] after its current batch.
    pub fn stop(&self) {
        self.0.stop();
    }
}

impl std::fmt::Debug for Stopper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Stopper")
    }
}

/// What each submission is for.
enum Tag<O> {
    DevPoll,
    DevRead,
    Wake,
    Fill { msg_id: u32, obj: Arc<Object<O>>, attempt: u32 },
    Backoff { msg_id: u32, obj: Arc<Object<O>>, attempt: u32, buf: WriteBuf, offset: u64, done: usize },
}

/// The cachefiles frontend: serves one [`Device`] (already bound, or restored) with a [`Backend`].
pub struct Server<B: Backend> {
    dev: Arc<Device>,
    wake: FdHold,
    backend: Arc<B>,
    config: Config,
    uring: Uring<Tag<B::Object>>,
    shared: Arc<Shared<B::Object>>,
    objects: HashMap<u32, Arc<Object<B::Object>>>,
    pool: Pool,
    /// When each unanswered request's message was read, for [`Timings`].
    started: HashMap<u32, (Kind, Instant)>,
    timings: Arc<Timings>,
}

impl<B: Backend> std::fmt::Debug for Server<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("objects", &self.objects.len()).finish_non_exhaustive()
    }
}

impl<B: Backend> Server<B> {
    /// Sets up io_uring (probing its opcodes), the wake eventfd and the worker pool.
    pub fn new(device: Device, backend: Arc<B>, config: Config) -> Result<Self, RingError> {
        let uring = match Uring::new(config.entries) {
            Ok(u) => u,
            Err(Ok(missing)) => return Err(RingError::Unsupported(missing)),
            Err(Err(e)) => return Err(RingError::Setup(e)),
        };
        let wake = sys::eventfd().map_err(RingError::Start)?;
        let wake_hold: FdHold = Arc::new(wake.try_clone().map_err(RingError::Start)?);
        let shared = Arc::new(Shared { posted: Mutex::new(Vec::new()), wake, stop: AtomicBool::new(false) });
        let pool = Pool::new(config.workers, "wisp-cachefiles").map_err(RingError::Start)?;
        let dev = Arc::new(device);
        Ok(Server {
            dev,
            wake: wake_hold,
            backend,
            config,
            uring,
            shared,
            objects: HashMap::new(),
            pool,
            started: HashMap::new(),
            timings: Arc::default(),
        })
    }

    /// Handling times of the requests answered so far (a live view).
    pub fn timings(&self) -> Arc<Timings> {
        self.timings.clone()
    }

    fn answered(&mut self, msg_id: u32) {
        if let Some((kind, t0)) = self.started.remove(&msg_id) {
            self.timings.record(kind, t0.elapsed());
        }
    }

    /// Completes a READ (data written or not) and records its handling time.
    fn complete_read(&mut self, obj: &Object<B::Object>, msg_id: u32) {
        complete_read(obj, msg_id);
        self.answered(msg_id);
    }

    /// A handle that stops [`Server::run`].
    pub fn stopper(&self) -> Stopper {
        Stopper(self.shared.clone())
    }

    /// The device being served (e.g. to `dup` it for a supervisor).
    pub fn device(&self) -> &Device {
        &self.dev
    }

    /// Serves requests until stopped or the device fails.
    pub fn run(&mut self) -> Result<(), RingError> {
        self.push(Tag::DevPoll, Op::Poll { fd: self.dev.clone(), events: libc::POLLIN as u32 });
        self.push(Tag::Wake, Op::ReadCounter { fd: self.wake.clone() });
        while !self.shared.stop.load(Ordering::SeqCst) {
            for (tag, done) in self.uring.wait().map_err(RingError::Wait)? {
                self.complete(tag, done)?;
            }
            let posted = self.shared.posted.lock().map(|mut q| std::mem::take(&mut *q)).unwrap_or_default();
            for p in posted {
                self.on_posted(p);
            }
        }
        Ok(())
    }

    fn push(&mut self, tag: Tag<B::Object>, op: Op) {
        if let Err(e) = self.uring.push(tag, op) {
            // Only fails if io_uring_enter fails while flushing a full queue.
            tracing::error!(error = %e, "io_uring submission failed");
        }
    }

    fn complete(&mut self, tag: Tag<B::Object>, done: Done) -> Result<(), RingError> {
        match (tag, done) {
            (Tag::DevPoll, Done::Poll { fd, result }) => {
                tracing::trace!(?result, "device poll");
                result.map_err(RingError::Device)?;
                self.push(Tag::DevRead, Op::ReadMessage { fd });
            }
            (Tag::DevRead, Done::ReadMessage { fd, result }) => {
                let (msg, anon) = result.map_err(RingError::Device)?;
                tracing::trace!(len = msg.len(), "device read");
                if msg.is_empty() {
                    self.push(Tag::DevPoll, Op::Poll { fd, events: libc::POLLIN as u32 });
                } else {
                    self.on_message(&msg, anon);
                    self.push(Tag::DevRead, Op::ReadMessage { fd });
                }
            }
            (Tag::Wake, Done::ReadCounter { fd, result }) => {
                if let Err(e) = result {
                    tracing::error!(error = %e, "reading the wake eventfd");
                }
                self.push(Tag::Wake, Op::ReadCounter { fd });
            }
            (Tag::Fill { msg_id, obj, attempt }, Done::Write { buf, offset, done, result, .. }) => {
                self.on_fill_written(msg_id, obj, attempt, buf, offset.unwrap_or(0), done, result)
            }
            (Tag::Backoff { msg_id, obj, attempt, buf, offset, done }, Done::Sleep) => {
                let fd: FdHold = obj.clone();
                self.push(Tag::Fill { msg_id, obj, attempt }, Op::Write { fd, buf, offset: Some(offset), done });
            }
            _ => tracing::error!("io_uring completion does not match its submission"),
        }
        Ok(())
    }

    fn on_message(&mut self, msg: &[u8], anon: Option<std::io::Result<OwnedFd>>) {
        tracing::trace!(len = msg.len(), fd = anon.is_some(), "cachefiles message");
        match cachefiles::request_from_bytes(msg, anon) {
            Ok(Request::Open(open)) => self.on_open(open),
            Ok(Request::Read(read)) => self.on_read(read),
            Ok(Request::Close { object_id, .. }) => {
                let Some(obj) = self.objects.remove(&object_id) else {
                    tracing::warn!(object_id, "CLOSE for an unknown object");
                    return;
                };
                let backend = self.backend.clone();
                self.pool.spawn(move || backend.close(&obj.object));
            }
            Err(cachefiles::Error::Malformed { msg_id: Some(msg_id), opcode: Some(opcode::OPEN), source }) => {
                tracing::error!(msg_id, error = %source, "malformed OPEN; failing it");
                self.copen(msg_id, 0, Err(Errno::EINVAL), None);
            }
            Err(cachefiles::Error::AnonFd { msg_id, source }) => {
                tracing::error!(msg_id, error = %source, "OPEN without a usable fd; failing it");
                self.copen(msg_id, 0, Err(Errno::EBADF), None);
            }
            Err(e) => tracing::error!(error = %e, "unusable cachefiles message"),
        }
    }

    fn on_open(&mut self, open: OpenRequest) {
        self.started.insert(open.msg_id, (Kind::Open, Instant::now()));
        let backend = self.backend.clone();
        let (domain, name) = (open.domain().map(str::to_owned), open.tag().map(str::to_owned));
        let (msg_id, object_id) = (open.msg_id, open.object_id);
        let mut guard = OpenGuard { shared: self.shared.clone(), msg_id, object_id, fd: Some(open.fd) };
        self.pool.spawn(move || {
            let result = match (&domain, &name) {
                (Some(domain), Some(name)) => backend.open(&ObjectKey { domain, name }),
                _ => Err(Errno::EINVAL),
            };
            guard.finish(result);
        });
    }

    fn on_read(&mut self, read: ReadRequest) {
        let ReadRequest { msg_id, object_id, off, len } = read;
        let Some(obj) = self.objects.get(&object_id).cloned() else {
            // Without the object's fd the READ cannot even be completed; the kernel re-OPENs objects
            // whose fds were closed, so this means a protocol error.
            tracing::error!(msg_id, object_id, "READ for an unknown object");
            return;
        };
        self.started.insert(msg_id, (Kind::Read, Instant::now()));
        let mut start = off / BLOCK as u64 * BLOCK as u64;
        let mut end = off.saturating_add(len).div_ceil(BLOCK as u64).saturating_mul(BLOCK as u64);
        let whole = obj.size.div_ceil(BLOCK as u64).saturating_mul(BLOCK as u64);
        if self.config.fill_whole && whole <= self.config.max_read_len && end <= whole {
            (start, end) = (0, whole);
        }
        if end - start > self.config.max_read_len {
            tracing::error!(msg_id, object_id, off, len, "READ larger than max_read_len; failing it");
            self.complete_read(&obj, msg_id);
            return;
        }
        let backend = self.backend.clone();
        let mut guard = FillGuard { shared: self.shared.clone(), msg_id, obj: Some(obj), offset: start };
        self.pool.spawn(move || {
            let Some(obj) = guard.obj.clone() else { return };
            let result = fill_window(&*backend, &obj, start..end);
            guard.finish(result);
        });
    }

    fn on_posted(&mut self, p: Posted<B::Object>) {
        tracing::trace!("posted result");
        match p {
            Posted::Opened { msg_id, object_id, fd, result: Ok(opened) } => {
                let size = opened.size;
                let obj = Arc::new(Object { id: object_id, fd, object: opened.object, size });
                if self.objects.insert(object_id, obj).is_some() {
                    tracing::warn!(object_id, "OPEN replaced a live object with the same id");
                }
                self.copen(msg_id, object_id, Ok(size), None);
            }
            Posted::Opened { msg_id, object_id, fd, result: Err(errno) } => {
                tracing::warn!(msg_id, object_id, %errno, "backend refused OPEN");
                self.copen(msg_id, object_id, Err(errno), Some(fd));
            }
            Posted::Filled { msg_id, obj, offset, result: Ok(buf) } => {
                if buf.is_empty() {
                    self.complete_read(&obj, msg_id);
                } else {
                    let fd: FdHold = obj.clone();
                    let op = Op::Write { fd, buf: WriteBuf::Aligned(buf), offset: Some(offset), done: 0 };
                    self.push(Tag::Fill { msg_id, obj, attempt: 0 }, op);
                }
            }
            Posted::Filled { msg_id, obj, offset, result: Err(errno) } => {
                tracing::warn!(msg_id, object_id = obj.id, offset, %errno, "fill failed; reader gets EIO");
                self.complete_read(&obj, msg_id);
            }
        }
    }

    fn copen(&mut self, msg_id: u32, object_id: u32, result: Result<u64, Errno>, fd: Option<ObjectFd>) {
        // A plain write(2), not an io_uring op: the devnode has no FMODE_NOWAIT, so io_uring would arm a
        // POLLOUT poll for the write, and /dev/cachefiles reports POLLOUT only in the cull state, so the
        // copen would never be sent (seen on 6.1.192). The command is short and never blocks.
        let ok = result.is_ok();
        if let Err(e) = self.dev.copen(msg_id, result.map_err(|e| e as i32)) {
            tracing::error!(msg_id, object_id, error = %e, "copen rejected by the kernel");
            if ok {
                self.objects.remove(&object_id);
            }
        }
        drop(fd); // a refused OPEN's anonymous fd is closed after its copen
        self.answered(msg_id);
    }

    #[allow(clippy::too_many_arguments)]
    fn on_fill_written(
        &mut self,
        msg_id: u32,
        obj: Arc<Object<B::Object>>,
        attempt: u32,
        buf: WriteBuf,
        offset: u64,
        done: usize,
        result: std::io::Result<usize>,
    ) {
        let total = buf.bytes().len();
        match result {
            Ok(n) if n > 0 && done + n < total => {
                let op = Op::Write { fd: obj.clone(), buf, offset: Some(offset), done: done + n };
                self.push(Tag::Fill { msg_id, obj, attempt }, op);
            }
            Ok(n) if n > 0 => self.complete_read(&obj, msg_id),
            Ok(_) => {
                tracing::error!(msg_id, object_id = obj.id, offset, "object write made no progress");
                self.complete_read(&obj, msg_id);
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)) => {
                let op = Op::Write { fd: obj.clone(), buf, offset: Some(offset), done };
                self.push(Tag::Fill { msg_id, obj, attempt }, op);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) && enobufs_backoff(attempt).is_some() => {
                let delay = enobufs_backoff(attempt).unwrap_or_default();
                tracing::debug!(msg_id, object_id = obj.id, ?delay, "object write got ENOBUFS, retrying");
                let tag = Tag::Backoff { msg_id, obj, attempt: attempt + 1, buf, offset, done };
                self.push(tag, Op::Sleep { delay });
            }
            Err(e) => {
                tracing::error!(msg_id, object_id = obj.id, offset, error = %e, "object write failed; reader gets EIO");
                self.complete_read(&obj, msg_id);
            }
        }
    }
}

fn complete_read<O>(obj: &Object<O>, msg_id: u32) {
    if let Err(e) = obj.fd.read_complete(msg_id) {
        tracing::error!(msg_id, object_id = obj.id, error = %e, "READ_COMPLETE failed");
    }
}

#[cfg(test)]
mod tests;
