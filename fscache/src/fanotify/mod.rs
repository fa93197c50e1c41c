//! The fanotify pre-content frontend (Linux 6.14+, `FAN_PRE_ACCESS`; docs/kernel.md G).
//!
//! Objects are files on a local ext4/xfs/btrfs cache directory, created sparse with their final size
//! and marked for pre-content events. The first read of a marked file blocks in the kernel until the
//! daemon answers: [`Frontend`] fills the **whole** object through the event's fd (which raises no
//! events of its own), removes the mark (so later reads run at native speed, with readahead back on) and
//! allows the access. A failed fill denies it with an errno (`FAN_DENY_ERRNO`, 6.14+), so the reader sees
//! an error, never zeros.
//!
//! Keep the [`Group`] fd alive across daemon restarts (see [`crate::fdpass`]): if the group closes
//! with events pending, the kernel allows them and unfilled holes read as zeros.

pub mod event;
pub mod journal;
mod serve;

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::backend::Errno;
use crate::sys::fanotify::{self as sys, Target};
pub use crate::sys::fanotify::{Event, FAN_PRE_ACCESS};
pub use serve::{Frontend, Recovery, Stats, Stopper};

/// Errors of the fanotify frontend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// fanotify is missing or not permitted.
    #[error(
        "fanotify_init(FAN_CLASS_PRE_CONTENT) failed: {0} (needs CAP_SYS_ADMIN and CONFIG_FANOTIFY_ACCESS_PERMISSIONS)"
    )]
    Init(#[source] io::Error),
    /// The kernel (or the cache directory's filesystem) refuses pre-content marks.
    #[error("FAN_PRE_ACCESS marks are not supported on {dir:?} ({source}): needs Linux >= 6.14 with CONFIG_FANOTIFY_ACCESS_PERMISSIONS and an ext4/xfs/btrfs cache directory")]
    NoPreContent { dir: PathBuf, source: io::Error },
    /// Marking or unmarking failed.
    #[error("fanotify_mark {path:?}: {source}")]
    Mark { path: PathBuf, source: io::Error },
    /// Reading events failed.
    #[error("reading fanotify events: {0}")]
    Read(#[source] io::Error),
    /// Writing a response failed.
    #[error("answering a fanotify event: {0}")]
    Respond(#[source] io::Error),
    /// Other I/O (stat, the probe file, the wake-up fd, worker threads).
    #[error("{what}: {source}")]
    Io { what: &'static str, source: io::Error },
}

/// The answer to a permission event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Response {
    /// Let the access proceed.
    Allow,
    /// Fail the access with this errno.
    Deny(Errno),
}

/// Errnos the kernel accepts in `FAN_DENY_ERRNO` (fs/notify/fanotify/fanotify_user.c, 6.14+); others
/// are sent as EIO.
const DENY_ERRNOS: [Errno; 7] =
    [Errno::EPERM, Errno::EIO, Errno::EBUSY, Errno::ETXTBSY, Errno::EAGAIN, Errno::ENOSPC, Errno::EDQUOT];

impl Response {
    /// The `response` word of `struct fanotify_response`.
    pub fn encode(self) -> u32 {
        match self {
            Response::Allow => libc::FAN_ALLOW,
            Response::Deny(e) => {
                let e = if DENY_ERRNOS.contains(&e) { e } else { Errno::EIO };
                libc::FAN_DENY | ((e as u32 & 0xff) << sys::FAN_ERRNO_SHIFT)
            }
        }
    }
}

/// A pre-content fanotify group.
#[derive(Debug)]
pub struct Group {
    fd: OwnedFd,
}

impl Group {
    /// Creates the group (non-blocking, close-on-exec, event fds opened read-write).
    pub fn new() -> Result<Self, Error> {
        sys::init().map(|fd| Group { fd }).map_err(Error::Init)
    }

    /// Wraps a group fd kept by a supervisor across a restart.
    pub fn from_owned_fd(fd: OwnedFd) -> Self {
        Group { fd }
    }

    /// Gives the group fd back (to hand it to a supervisor).
    pub fn into_owned_fd(self) -> OwnedFd {
        self.fd
    }

    /// Checks that pre-content marks work for files in `dir`: marks and unmarks an unnamed temporary
    /// file there. Call at start-up so an unsupported kernel or filesystem is reported clearly.
    pub fn probe(&self, dir: &Path) -> Result<(), Error> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_TMPFILE)
            .open(dir)
            .map_err(|source| Error::Io { what: "creating an O_TMPFILE probe file", source })?;
        let target = Target::Fd(file.as_fd());
        let mark = |flags| sys::mark(self.fd.as_fd(), flags, FAN_PRE_ACCESS, target);
        match mark(libc::FAN_MARK_ADD) {
            Ok(()) => mark(libc::FAN_MARK_REMOVE).map_err(|source| Error::Mark { path: dir.into(), source }),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) => {
                Err(Error::NoPreContent { dir: dir.into(), source: e })
            }
            Err(source) => Err(Error::Mark { path: dir.into(), source }),
        }
    }

    /// Marks a file for pre-content events.
    pub fn mark(&self, path: &Path) -> Result<(), Error> {
        sys::mark(self.fd.as_fd(), libc::FAN_MARK_ADD, FAN_PRE_ACCESS, Target::Path(path))
            .map_err(|source| Error::Mark { path: path.into(), source })
    }

    /// Removes the mark of a file.
    pub fn unmark(&self, path: &Path) -> Result<(), Error> {
        sys::mark(self.fd.as_fd(), libc::FAN_MARK_REMOVE, FAN_PRE_ACCESS, Target::Path(path))
            .map_err(|source| Error::Mark { path: path.into(), source })
    }

    /// Removes the mark of the file behind `fd` (e.g. an event fd).
    pub fn unmark_fd(&self, fd: BorrowedFd<'_>) -> Result<(), Error> {
        sys::mark(self.fd.as_fd(), libc::FAN_MARK_REMOVE, FAN_PRE_ACCESS, Target::Fd(fd))
            .map_err(|source| Error::Mark { path: "<event fd>".into(), source })
    }

    /// Reads the queued events (empty if none). Events before a malformed record are returned, the
    /// malformed rest is logged: their fds (if any) cannot be identified.
    pub fn read_events(&self) -> Result<Vec<Event>, Error> {
        let mut buf = vec![0u8; 64 * 1024];
        let (events, err) = sys::read_events(self.fd.as_fd(), &mut buf).map_err(Error::Read)?;
        if let Some(err) = err {
            tracing::error!(error = %err, "malformed fanotify event data");
        }
        Ok(events)
    }

    /// Answers the permission event whose fd is `event_fd`.
    pub fn respond(&self, event_fd: BorrowedFd<'_>, response: Response) -> Result<(), Error> {
        self.respond_number(std::os::fd::AsRawFd::as_raw_fd(&event_fd), response)
    }

    /// Answers the permission event that was read with fd number `fd`, possibly by another process
    /// holding the same group (the kernel matches responses by number; see [`journal`]). A number
    /// with no pending event fails with ENOENT.
    pub fn respond_number(&self, fd: i32, response: Response) -> Result<(), Error> {
        let mut bytes = [0u8; 8];
        bytes[..4].copy_from_slice(&fd.to_ne_bytes());
        bytes[4..].copy_from_slice(&response.encode().to_ne_bytes());
        loop {
            match nix::unistd::write(&self.fd, &bytes) {
                Ok(_) => return Ok(()),
                Err(Errno::EINTR) => {}
                Err(e) => return Err(Error::Respond(e.into())),
            }
        }
    }
}

impl AsFd for Group {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deny_carries_allowed_errnos_only() {
        assert_eq!(Response::Allow.encode(), 0x01);
        assert_eq!(Response::Deny(Errno::EIO).encode(), 0x02 | (5 << 24));
        assert_eq!(Response::Deny(Errno::EPERM).encode(), 0x02 | (1 << 24));
        assert_eq!(Response::Deny(Errno::ENOENT).encode(), 0x02 | (5 << 24));
    }
}
