//! Handing fds to a supervisor and back across a worker restart (SCM_RIGHTS over a unix socket).
//!
//! The point (docs/kernel.md A.6, G.4): the `/dev/cachefiles` session and the fanotify group must outlive a
//! daemon process, or mounts break (cachefiles) or unfilled holes read as zeros (fanotify). A supervisor
//! keeps them; a restarted worker receives them, then sends `restore` (cachefiles) or just resumes
//! reading events (fanotify).
//!
//! Each message carries a short label (e.g. `cachefiles`, `fanotify`) and the fds it names, so the
//! receiver knows what it got.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use crate::sys::fdpass as sys;
pub use crate::sys::fdpass::MAX_FDS;

/// Errors of fd passing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Labels must be 1..=255 bytes.
    #[error("fd label of {0} bytes (must be 1..=255)")]
    Label(usize),
    /// More fds than one message may carry.
    #[error("{0} fds in one message (max {MAX_FDS})")]
    TooMany(usize),
    /// The socket failed.
    #[error("fd passing: {0}")]
    Io(#[from] std::io::Error),
    /// The peer closed the socket.
    #[error("fd passing: peer closed the socket")]
    Closed,
    /// The message or its fds were cut short (the received fds were closed).
    #[error("fd passing: message truncated")]
    Truncated,
}

/// Sends `label` with `fds` over `sock`.
pub fn send_fds(sock: &UnixStream, label: &str, fds: &[BorrowedFd<'_>]) -> Result<(), Error> {
    let len = label.len();
    let Ok(len_byte) = u8::try_from(len) else {
        return Err(Error::Label(len));
    };
    if len == 0 {
        return Err(Error::Label(0));
    }
    if fds.len() > MAX_FDS {
        return Err(Error::TooMany(fds.len()));
    }
    // One length byte then the label: the receiver reads exactly one message per call on a stream
    // socket because fds attach to the first byte and the label is read with a bounded buffer.
    let mut payload = Vec::with_capacity(len + 1);
    payload.push(len_byte);
    payload.extend_from_slice(label.as_bytes());
    let n = sys::send(sock.as_fd(), &payload, fds)?;
    if n != payload.len() {
        return Err(Error::Truncated);
    }
    Ok(())
}

/// Receives one labelled set of fds (close-on-exec) sent by [`send_fds`].
pub fn recv_fds(sock: &UnixStream) -> Result<(String, Vec<OwnedFd>), Error> {
    // Read the length byte with the fds, then the label.
    let mut first = [0u8; 1];
    let got = sys::recv(sock.as_fd(), &mut first)?;
    if got.len == 0 {
        return Err(Error::Closed);
    }
    if got.truncated {
        return Err(Error::Truncated); // dropping `got.fds` closes them
    }
    let mut label = vec![0u8; usize::from(first[0])];
    std::io::Read::read_exact(&mut &*sock, &mut label)?;
    let label = String::from_utf8(label).map_err(|_| Error::Label(0))?;
    Ok((label, got.fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsRawFd;

    #[test]
    fn fds_survive_the_trip_and_are_cloexec() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut f1 = tempfile::tempfile().unwrap();
        f1.write_all(b"one").unwrap();
        let f2 = tempfile::tempfile().unwrap();
        send_fds(&a, "cachefiles", &[f1.as_fd(), f2.as_fd()]).unwrap();
        send_fds(&a, "fanotify", &[]).unwrap();
        let (label, fds) = recv_fds(&b).unwrap();
        assert_eq!(label, "cachefiles");
        assert_eq!(fds.len(), 2);
        for fd in &fds {
            let flags = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFD).unwrap();
            assert_ne!(flags & libc::FD_CLOEXEC, 0);
        }
        // the received fd is the same open file
        let mut got = std::fs::File::from(fds.into_iter().next().unwrap());
        got.rewind().unwrap();
        let mut s = String::new();
        got.read_to_string(&mut s).unwrap();
        assert_eq!(s, "one");
        let (label, fds) = recv_fds(&b).unwrap();
        assert_eq!((label.as_str(), fds.len()), ("fanotify", 0));
        drop(a);
        assert!(matches!(recv_fds(&b), Err(Error::Closed)));
    }

    #[test]
    fn rejects_bad_labels_and_too_many_fds() {
        let (a, _b) = UnixStream::pair().unwrap();
        assert!(matches!(send_fds(&a, "", &[]), Err(Error::Label(0))));
        assert!(matches!(send_fds(&a, &"x".repeat(256), &[]), Err(Error::Label(256))));
        let f = tempfile::tempfile().unwrap();
        let many: Vec<_> = (0..MAX_FDS + 1).map(|_| f.as_fd()).collect();
        assert!(matches!(send_fds(&a, "x", &many), Err(Error::TooMany(_))));
    }
}
