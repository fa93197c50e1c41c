//! Syscalls on `/dev/cachefiles` and on the anonymous object fds it hands out (docs/kernel.md A.2, A.4).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use crate::proto;

/// Adopts the anonymous fd carried by a message that was just read from `/dev/cachefiles`, if the
/// message is an OPEN (even a malformed one: the kernel installed the fd before `read` returned), and
/// marks it close-on-exec (the kernel installs it without O_CLOEXEC).
pub(super) fn adopt_open_fd(msg: &[u8]) -> Option<io::Result<OwnedFd>> {
    let raw = proto::open_fd_hint(msg)?;
    let Ok(raw) = i32::try_from(raw) else {
        return Some(Err(io::Error::from_raw_os_error(libc::EBADF)));
    };
    // The kernel installed `raw` for this process while completing the read of this OPEN message
    // (ondemand.c: cachefiles_ondemand_get_fd + fd_install after copy_to_user); no one else knows it.
    Some(super::adopt(raw).and_then(|fd| {
        super::set_cloexec(fd.as_fd())?;
        Ok(fd)
    }))
}

/// One `read(2)` of the devnode into `buf`; returns the byte count (0: nothing pending) and, for an OPEN,
/// the adopted anonymous fd.
pub fn read_message(dev: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Option<io::Result<OwnedFd>>)> {
    let n = loop {
        match nix::unistd::read(dev.as_raw_fd(), buf) {
            Ok(n) => break n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    let fd = if n > 0 { adopt_open_fd(&buf[..n]) } else { None };
    Ok((n, fd))
}

/// `ioctl(anon_fd, CACHEFILES_IOC_READ_COMPLETE, msg_id)`.
pub fn read_complete(anon: BorrowedFd<'_>, msg_id: u32) -> io::Result<()> {
    let request = libc::Ioctl::from(proto::IOC_READ_COMPLETE);
    // SAFETY: this ioctl takes its argument by value (an int msg_id), not as a pointer, so no memory is
    // read or written through it; `anon` is a valid open fd for the duration of the call.
    let rc = unsafe { libc::ioctl(anon.as_raw_fd(), request, libc::c_ulong::from(msg_id)) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
