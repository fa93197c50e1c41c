//! Every `unsafe` block of the crate, each with its `// SAFETY:` argument. The rest of the crate sees safe
//! functions whose kernel-handed fds are already `OwnedFd`s and whose buffers are owned by whoever must
//! keep them alive.

pub mod aligned;
pub mod cachefiles;
pub mod fanotify;
pub mod fdpass;
pub mod uring;

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Takes ownership of an fd number the kernel has just installed in this process on our behalf.
///
/// Private to `sys`: every caller names the syscall that installed `raw` and argues that nothing else in
/// the process knows the number yet.
fn adopt(raw: RawFd) -> io::Result<OwnedFd> {
    if raw < 0 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    // SAFETY: callers (all in this module tree) pass only an fd the kernel installed for this process
    // during the syscall they just made (an OPEN message read from /dev/cachefiles, a fanotify event,
    // an SCM_RIGHTS message, fanotify_init, eventfd, F_DUPFD_CLOEXEC). Nobody else owns it, so the OwnedFd is its only
    // owner and closes it exactly once.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    Ok(fd)
}

/// Sets FD_CLOEXEC on `fd`.
pub fn set_cloexec(fd: BorrowedFd<'_>) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    let flags = fcntl(fd.as_raw_fd(), FcntlArg::F_GETFD)?;
    let flags = FdFlag::from_bits_truncate(flags) | FdFlag::FD_CLOEXEC;
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFD(flags))?;
    Ok(())
}

/// A close-on-exec duplicate of `fd` at the lowest free number >= `min` (`F_DUPFD_CLOEXEC`).
pub fn dup_at_least(fd: BorrowedFd<'_>, min: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) takes two integers and returns a new fd or -1.
    let raw = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, min) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    adopt(raw)
}

/// A blocking, close-on-exec eventfd (wakes the io_uring loop from worker threads; blocking so that an
/// io_uring read of it waits instead of failing with EAGAIN).
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd(2) takes no pointers; it returns a new fd or -1.
    let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    adopt(raw)
}
