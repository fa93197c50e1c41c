//! fanotify syscalls (fanotify_init, fanotify_mark) and event reads that adopt the event fds.
//!
//! Constants newer than the libc crate are taken from `include/uapi/linux/fanotify.h` of Linux 6.14+.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::fanotify::event::{self, EventError};

/// `FAN_PRE_ACCESS` (uapi fanotify.h, Linux 6.14): pre-content access hook.
pub const FAN_PRE_ACCESS: u64 = 0x0010_0000;
/// `FAN_ERRNO_SHIFT` (uapi fanotify.h, 6.14): `FAN_DENY_ERRNO(e) = FAN_DENY | (e & 0xff) << 24`.
pub const FAN_ERRNO_SHIFT: u32 = 24;

/// What to mark: a path, or the file an fd refers to.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    /// A path (relative paths resolve against the cwd).
    Path(&'a Path),
    /// The file behind an fd (pathname NULL).
    Fd(BorrowedFd<'a>),
}

/// `fanotify_init(FAN_CLASS_PRE_CONTENT | FAN_CLOEXEC | FAN_NONBLOCK, O_RDWR | O_LARGEFILE | O_CLOEXEC)`:
/// event fds are writable (to fill through them) and close-on-exec; reads of the group never block.
pub fn init() -> io::Result<OwnedFd> {
    let flags = libc::FAN_CLASS_PRE_CONTENT | libc::FAN_CLOEXEC | libc::FAN_NONBLOCK;
    let event_flags = (libc::O_RDWR | libc::O_LARGEFILE | libc::O_CLOEXEC) as libc::c_uint;
    // SAFETY: fanotify_init takes two integers and returns a new fd or -1.
    let raw = unsafe { libc::fanotify_init(flags, event_flags) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    super::adopt(raw)
}

/// `fanotify_mark(group, flags, mask, ...)`.
pub fn mark(group: BorrowedFd<'_>, flags: u32, mask: u64, target: Target<'_>) -> io::Result<()> {
    let path;
    let (dirfd, path_ptr) = match target {
        Target::Path(p) => {
            path = CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
            (libc::AT_FDCWD, path.as_ptr())
        }
        Target::Fd(fd) => (fd.as_raw_fd(), std::ptr::null()),
    };
    // SAFETY: `path_ptr` is null or points to the NUL-terminated `path`, which outlives the call; the
    // fds are valid for the call's duration.
    let rc = unsafe { libc::fanotify_mark(group.as_raw_fd(), flags, mask, dirfd, path_ptr) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One event, its fd adopted.
#[derive(Debug)]
pub struct Event {
    /// Event bits.
    pub mask: u64,
    /// The fd opened for this event (None for FAN_NOFD, e.g. queue overflow).
    pub fd: Option<OwnedFd>,
    /// Accessing pid.
    pub pid: i32,
    /// Accessed range (pre-content events).
    pub range: Option<std::ops::Range<u64>>,
}

/// Reads what is queued (EAGAIN: nothing) and adopts each event's fd. Events before a malformed record
/// come back with the error.
pub fn read_events(group: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(Vec<Event>, Option<EventError>)> {
    let n = loop {
        match nix::unistd::read(group.as_raw_fd(), buf) {
            Ok(n) => break n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(nix::errno::Errno::EAGAIN) => return Ok((Vec::new(), None)),
            Err(e) => return Err(e.into()),
        }
    };
    let (raw, err) = event::parse(&buf[..n]);
    let mut events = Vec::with_capacity(raw.len());
    for e in raw {
        // Each non-negative fd in an event was installed for this process by this read
        // (fanotify's copy_event_to_user); no one else knows the number.
        let fd = if e.fd >= 0 { Some(super::adopt(e.fd)?) } else { None };
        events.push(Event { mask: e.mask, fd, pid: e.pid, range: e.range });
    }
    Ok((events, err))
}
