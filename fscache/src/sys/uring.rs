//! A small owner of an io_uring instance: every submission's buffer and fd live in a slab entry keyed by
//! the SQE's `user_data` until its completion has been reaped, so nothing the kernel may still touch is
//! ever freed early. Dropping the ring cancels what is in flight and waits for it.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use io_uring::{opcode, types, IoUring, Probe};

use crate::proto::MSG_MAX_SIZE;
use crate::sys::aligned::AlignedBuf;

/// An fd kept alive by an in-flight operation.
pub type FdHold = Arc<dyn AsFd + Send + Sync>;

/// Bytes an in-flight write owns. (Commands to the devnode are plain write(2) calls, not io_uring
/// ops: see `Server::copen`.)
#[derive(Debug)]
pub enum WriteBuf {
    /// A page-aligned buffer (direct-I/O object data).
    Aligned(AlignedBuf),
}

impl WriteBuf {
    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        match self {
            WriteBuf::Aligned(a) => a,
        }
    }
}

/// An operation to submit; it owns everything the kernel will access.
pub enum Op {
    /// One-shot poll for `events` (POLLIN ...).
    Poll { fd: FdHold, events: u32 },
    /// Read one cachefiles message into a fresh 1024-byte buffer.
    ReadMessage { fd: FdHold },
    /// Read 8 bytes (an eventfd counter).
    ReadCounter { fd: FdHold },
    /// Write `buf[done..]` at `offset + done` (`offset` None: the fd's own position, for devnodes).
    Write { fd: FdHold, buf: WriteBuf, offset: Option<u64>, done: usize },
    /// Complete after `delay`.
    Sleep { delay: Duration },
}

/// What came back: the op's resources plus the result.
pub enum Done {
    /// Poll finished: revents or error.
    Poll { fd: FdHold, result: io::Result<u32> },
    /// A message read: `n` bytes (0 = nothing pending) and, for an OPEN, the adopted anonymous fd.
    ReadMessage { fd: FdHold, result: io::Result<(Vec<u8>, Option<io::Result<OwnedFd>>)> },
    /// The eventfd was read (or failed, e.g. EAGAIN).
    ReadCounter { fd: FdHold, result: io::Result<u64> },
    /// A write finished (possibly short: compare `done` with the buffer length).
    Write { buf: WriteBuf, offset: Option<u64>, done: usize, result: io::Result<usize> },
    /// The delay elapsed (or was cancelled).
    Sleep,
}

enum Held {
    Poll(FdHold, u32),
    ReadMessage(FdHold, Box<[u8; MSG_MAX_SIZE]>),
    ReadCounter(FdHold, Box<[u8; 8]>),
    Write(FdHold, WriteBuf, Option<u64>, usize),
    Sleep(Box<types::Timespec>),
}

struct Slot<T> {
    tag: T,
    held: Held,
}

const CANCEL_TAG: u64 = u64::MAX;
#[allow(clippy::cast_possible_truncation)] // 1024 fits, asserted below
const MSG_LEN_U32: u32 = MSG_MAX_SIZE as u32;
const _: () = assert!(MSG_MAX_SIZE <= u32::MAX as usize);

/// The ring plus its in-flight slab, generic over the caller's per-op tag.
pub struct Uring<T> {
    ring: IoUring,
    slots: Vec<Option<Slot<T>>>,
    free: Vec<usize>,
    in_flight: usize,
}

/// Opcodes the loop needs, with names for the error message.
const NEEDED: [(u8, &str); 5] = [
    (opcode::PollAdd::CODE, "POLL_ADD"),
    (opcode::Read::CODE, "READ"),
    (opcode::Write::CODE, "WRITE"),
    (opcode::Timeout::CODE, "TIMEOUT"),
    (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
];

impl<T> Uring<T> {
    /// Creates a ring and checks the opcodes the loop uses; `Err(Ok(missing))` names unsupported ones.
    pub fn new(entries: u32) -> Result<Self, Result<Vec<&'static str>, io::Error>> {
        let ring = IoUring::new(entries).map_err(Err)?;
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe).map_err(Err)?;
        let missing: Vec<_> = NEEDED.iter().filter(|(c, _)| !probe.is_supported(*c)).map(|(_, n)| *n).collect();
        if !missing.is_empty() {
            return Err(Ok(missing));
        }
        Ok(Uring { ring, slots: Vec::new(), free: Vec::new(), in_flight: 0 })
    }

    /// Queues `op` (submitting first if the submission queue is full).
    pub fn push(&mut self, tag: T, op: Op) -> io::Result<()> {
        let index = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        });
        let held = match op {
            Op::Poll { fd, events } => Held::Poll(fd, events),
            Op::ReadMessage { fd } => Held::ReadMessage(fd, Box::new([0; MSG_MAX_SIZE])),
            Op::ReadCounter { fd } => Held::ReadCounter(fd, Box::new([0; 8])),
            Op::Write { fd, buf, offset, done } => Held::Write(fd, buf, offset, done),
            Op::Sleep { delay } => {
                Held::Sleep(Box::new(types::Timespec::new().sec(delay.as_secs()).nsec(delay.subsec_nanos())))
            }
        };
        let slot = self.slots[index].insert(Slot { tag, held });
        let user_data = index as u64;
        let sqe = match &mut slot.held {
            Held::Poll(fd, events) => opcode::PollAdd::new(types::Fd(fd.as_fd().as_raw_fd()), *events).build(),
            Held::ReadMessage(fd, buf) => {
                opcode::Read::new(types::Fd(fd.as_fd().as_raw_fd()), buf.as_mut_ptr(), MSG_LEN_U32)
                    .offset(u64::MAX)
                    .build()
            }
            Held::ReadCounter(fd, buf) => {
                opcode::Read::new(types::Fd(fd.as_fd().as_raw_fd()), buf.as_mut_ptr(), 8).offset(u64::MAX).build()
            }
            Held::Write(fd, buf, offset, done) => {
                let rest = &buf.bytes()[*done..];
                let len = u32::try_from(rest.len()).unwrap_or(!4095);
                let off = offset.map_or(u64::MAX, |o| o + *done as u64);
                opcode::Write::new(types::Fd(fd.as_fd().as_raw_fd()), rest.as_ptr(), len).offset(off).build()
            }
            Held::Sleep(ts) => opcode::Timeout::new(&**ts as *const types::Timespec).build(),
        };
        let sqe = sqe.user_data(user_data);
        self.in_flight += 1;
        self.push_sqe(&sqe)
    }

    fn push_sqe(&mut self, sqe: &io_uring::squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: every pointer in `sqe` (buffers, timespec) points into a heap allocation owned by the
            // slab slot named by its user_data (or, for cancels, into nothing); that slot is only freed in
            // `reap` after the kernel posted the op's completion, or at drop after all ops completed.
            let pushed = unsafe { self.ring.submission().push(sqe) };
            if pushed.is_ok() {
                return Ok(());
            }
            self.ring.submit()?;
        }
    }

    /// Submits queued operations and blocks until at least one completes; returns all completions.
    pub fn wait(&mut self) -> io::Result<Vec<(T, Done)>> {
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => break, // CQ full: reap first
                Err(e) => return Err(e),
            }
        }
        Ok(self.reap())
    }

    fn reap(&mut self) -> Vec<(T, Done)> {
        let cqes: Vec<(u64, i32)> = self.ring.completion().map(|c| (c.user_data(), c.result())).collect();
        let mut out = Vec::with_capacity(cqes.len());
        for (user_data, res) in cqes {
            if user_data == CANCEL_TAG {
                continue;
            }
            let Ok(index) = usize::try_from(user_data) else {
                continue;
            };
            let Some(slot) = self.slots.get_mut(index).and_then(Option::take) else {
                tracing::error!(user_data, "io_uring completion for an unknown slot");
                continue;
            };
            self.free.push(index);
            self.in_flight -= 1;
            let result = |res: i32| {
                if res < 0 {
                    Err(io::Error::from_raw_os_error(-res))
                } else {
                    Ok(res as u32)
                }
            };
            let done = match slot.held {
                Held::Poll(fd, _) => Done::Poll { fd, result: result(res) },
                Held::ReadMessage(fd, buf) => {
                    let result = result(res).map(|n| {
                        let msg = buf[..(n as usize).min(MSG_MAX_SIZE)].to_vec();
                        // The read just completed for this process: adopt an OPEN's fd now.
                        let anon = if msg.is_empty() { None } else { super::cachefiles::adopt_open_fd(&msg) };
                        (msg, anon)
                    });
                    Done::ReadMessage { fd, result }
                }
                Held::ReadCounter(fd, buf) => {
                    Done::ReadCounter { fd, result: result(res).map(|_| u64::from_ne_bytes(*buf)) }
                }
                Held::Write(_fd, buf, offset, done) => {
                    Done::Write { buf, offset, done, result: result(res).map(|n| n as usize) }
                }
                Held::Sleep(_) => Done::Sleep,
            };
            out.push((slot.tag, done));
        }
        out
    }
}

impl<T> Drop for Uring<T> {
    fn drop(&mut self) {
        let live: Vec<u64> =
            self.slots.iter().enumerate().filter(|(_, s)| s.is_some()).map(|(i, _)| i as u64).collect();
        for user_data in live {
            let sqe = opcode::AsyncCancel::new(user_data).build().user_data(CANCEL_TAG);
            if self.push_sqe(&sqe).is_err() {
                break;
            }
        }
        while self.in_flight > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => drop(self.reap()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => {
                    // Cannot prove the kernel is done with the buffers: keep them allocated forever
                    // rather than risk a use-after-free (the kernel holds its own file references, so
                    // the fds may close).
                    tracing::error!(error = %e, in_flight = self.in_flight, "io_uring teardown failed; leaking buffers");
                    for slot in std::mem::take(&mut self.slots).into_iter().flatten() {
                        leak_buffers(slot.held);
                    }
                    return;
                }
            }
        }
    }
}

fn leak_buffers(held: Held) {
    match held {
        Held::Poll(..) => {}
        Held::ReadMessage(_, buf) => drop(Box::leak(buf)),
        Held::ReadCounter(_, buf) => drop(Box::leak(buf)),
        Held::Write(_, WriteBuf::Aligned(a), ..) => drop(Box::leak(Box::new(a))),
        Held::Sleep(ts) => drop(Box::leak(ts)),
    }
}
