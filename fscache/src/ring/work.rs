//! The worker side of the cachefiles loop: backend calls on pool threads, results posted back to the
//! loop thread through a queue plus an eventfd wake-up. Guards make sure every OPEN and READ is answered
//! once, even if a backend call panics.

use std::os::fd::OwnedFd;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use super::Object;
use crate::backend::{clip, Backend, Coverage, Errno, FillSink, Opened};
use crate::cachefiles::ObjectFd;
use crate::sys::aligned::AlignedBuf;

/// Results posted by workers.
pub(super) enum Posted<O> {
    Opened { msg_id: u32, object_id: u32, fd: ObjectFd, result: Result<Opened<O>, Errno> },
    Filled { msg_id: u32, obj: Arc<Object<O>>, offset: u64, result: Result<AlignedBuf, Errno> },
}

pub(super) struct Shared<O> {
    pub(super) posted: Mutex<Vec<Posted<O>>>,
    pub(super) wake: OwnedFd,
    pub(super) stop: AtomicBool,
}

impl<O> Shared<O> {
    pub(super) fn post(&self, p: Posted<O>) {
        if let Ok(mut q) = self.posted.lock() {
            q.push(p);
        }
        self.kick();
    }

    pub(super) fn kick(&self) {
        // An eventfd write of 1 only fails on counter overflow, which cannot happen here.
        let _ = nix::unistd::write(&self.wake, &1u64.to_ne_bytes());
    }
}

/// Asks the backend for the aligned window `win` of `obj` into a page-aligned buffer; bytes past the
/// object's end stay zero. Fails with EIO if the backend left a gap.
pub(super) fn fill_window<B: Backend>(
    backend: &B,
    obj: &Object<B::Object>,
    win: std::ops::Range<u64>,
) -> Result<AlignedBuf, Errno> {
    let len = usize::try_from(win.end - win.start).map_err(|_| Errno::EFBIG)?;
    let want = clip(win.clone(), &(0..obj.size));
    let mut sink = BufSink { base: win.start, buf: AlignedBuf::zeroed(len), coverage: Coverage::default() };
    if !want.is_empty() {
        backend.fill(&obj.object, want.clone(), &mut sink)?;
        if !sink.coverage.covers(&want) {
            tracing::error!(object_id = obj.id, ?want, "backend left part of the range unwritten");
            return Err(Errno::EIO);
        }
    }
    Ok(sink.buf)
}

/// Collects fill bytes for one aligned window; bytes outside it are dropped.
struct BufSink {
    base: u64,
    buf: AlignedBuf,
    coverage: Coverage,
}

impl FillSink for BufSink {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), Errno> {
        let window = self.base..self.base + self.buf.len() as u64;
        let end = offset.checked_add(data.len() as u64).ok_or(Errno::EINVAL)?;
        let keep = clip(offset..end, &window);
        if keep.is_empty() {
            return Ok(());
        }
        let idx = |x: u64| usize::try_from(x).map_err(|_| Errno::EINVAL);
        let (from, to, at) = (idx(keep.start - offset)?, idx(keep.end - offset)?, idx(keep.start - self.base)?);
        self.buf[at..at + (to - from)].copy_from_slice(&data[from..to]);
        self.coverage.add(keep);
        Ok(())
    }
}

/// Answers an OPEN exactly once, with EIO if the worker panicked before answering.
pub(super) struct OpenGuard<O> {
    pub(super) shared: Arc<Shared<O>>,
    pub(super) msg_id: u32,
    pub(super) object_id: u32,
    pub(super) fd: Option<ObjectFd>,
}

impl<O> OpenGuard<O> {
    pub(super) fn finish(&mut self, result: Result<Opened<O>, Errno>) {
        if let Some(fd) = self.fd.take() {
            self.shared.post(Posted::Opened { msg_id: self.msg_id, object_id: self.object_id, fd, result });
        }
    }
}

impl<O> Drop for OpenGuard<O> {
    fn drop(&mut self) {
        self.finish(Err(Errno::EIO));
    }
}

/// Answers a READ exactly once, with EIO if the worker panicked before answering.
pub(super) struct FillGuard<O> {
    pub(super) shared: Arc<Shared<O>>,
    pub(super) msg_id: u32,
    pub(super) obj: Option<Arc<Object<O>>>,
    pub(super) offset: u64,
}

impl<O> FillGuard<O> {
    pub(super) fn finish(&mut self, result: Result<AlignedBuf, Errno>) {
        if let Some(obj) = self.obj.take() {
            self.shared.post(Posted::Filled { msg_id: self.msg_id, obj, offset: self.offset, result });
        }
    }
}

impl<O> Drop for FillGuard<O> {
    fn drop(&mut self) {
        self.finish(Err(Errno::EIO));
    }
}
