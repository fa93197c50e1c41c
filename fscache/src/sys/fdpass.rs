//! SCM_RIGHTS over a unix socket: the received fds are adopted here.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

/// At most this many fds per message (the kernel's SCM_MAX_FD is 253).
pub const MAX_FDS: usize = 64;

/// Sends `payload` (at least one byte) with `fds` attached.
pub fn send(sock: BorrowedFd<'_>, payload: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
    if payload.is_empty() || fds.len() > MAX_FDS {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsgs = if raw.is_empty() { Vec::new() } else { vec![ControlMessage::ScmRights(&raw)] };
    loop {
        match sendmsg::<()>(sock.as_raw_fd(), &[IoSlice::new(payload)], &cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(n) => return Ok(n),
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// What one `recv` returned.
#[derive(Debug)]
pub struct Received {
    /// Payload bytes read into the caller's buffer.
    pub len: usize,
    /// The fds that came with it (close-on-exec).
    pub fds: Vec<OwnedFd>,
    /// The payload or the fd list was cut short (MSG_TRUNC / MSG_CTRUNC).
    pub truncated: bool,
}

/// Receives one message; fds arrive close-on-exec.
pub fn recv(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Received> {
    let mut cmsg_space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = loop {
        match recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut cmsg_space), MsgFlags::MSG_CMSG_CLOEXEC) {
            Ok(m) => break m,
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    };
    let mut raw = Vec::new();
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            raw.extend(fds);
        }
    }
    // Adopt every fd first, so that none leaks whatever happens next. Each came from this recvmsg, which
    // installed it for this process (scm_detach_fds); no one else knows its number.
    let fds = raw.into_iter().map(super::adopt).collect::<io::Result<Vec<_>>>()?;
    let truncated = msg.flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
    Ok(Received { len: msg.bytes, fds, truncated })
}
