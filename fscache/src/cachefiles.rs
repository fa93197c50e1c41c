//! The `/dev/cachefiles` session in on-demand mode (docs/kernel.md A.1-A.6, A.9), with blocking,
//! one-call-per-syscall methods. [`crate::ring`] drives the same device from an io_uring loop; this type
//! is also what a VM self-test or a supervisor uses directly.
//!
//! ```no_run
//! use fscache::cachefiles::{Device, Request};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dev = Device::open()?;
//! dev.bind(std::path::Path::new("/var/cache/wisp"), Some("wisp"))?;
//! // ... mount -t erofs -o fsid=img,domain_id=d none /mnt ...
//! while let Some(req) = dev.read_message()? {
//!     match req {
//!         Request::Open(open) => dev.copen(open.msg_id, Err(libc::ENOENT))?, // drop(open) closes its fd
//!         Request::Read(_) | Request::Close { .. } => {}
//!     }
//! }
//! # Ok(()) }
//! ```

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::proto::{self, Command, Message, ProtoError, MSG_MAX_SIZE};
use crate::sys;
pub use crate::sys::aligned::{AlignedBuf, BLOCK};

/// Path of the misc device.
pub const DEVICE_PATH: &str = "/dev/cachefiles";

/// Errors of the cachefiles session.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No devnode: the kernel was built without cachefiles.
    #[error(
        "{DEVICE_PATH} does not exist: the kernel lacks CONFIG_CACHEFILES (or the cachefiles module is not loaded)"
    )]
    NoDevice,
    /// The single-opener device is held elsewhere.
    #[error("{DEVICE_PATH} is busy: another daemon (e.g. cachefilesd, or a previous wisp whose fds are still open) holds it")]
    Busy,
    /// Not allowed to open the device.
    #[error("opening {DEVICE_PATH} needs CAP_SYS_ADMIN: {0}")]
    Permission(#[source] io::Error),
    /// Any other open failure.
    #[error("opening {DEVICE_PATH}: {0}")]
    Open(#[source] io::Error),
    /// `bind ondemand` was refused with EINVAL after `dir` succeeded.
    #[error("`bind ondemand` rejected: the kernel lacks CONFIG_CACHEFILES_ONDEMAND")]
    NoOndemand,
    /// The cache directory's filesystem cannot back a cache.
    #[error("cache directory {dir:?} is unusable for cachefiles ({source}): it needs a writable ext4/xfs with user xattrs, sync_fs and SEEK_HOLE (not tmpfs)")]
    UnsuitableDir { dir: PathBuf, source: io::Error },
    /// A command the kernel refused.
    #[error("cachefiles command {command:?} failed: {source}")]
    Command { command: String, source: io::Error },
    /// A command argument that cannot be encoded.
    #[error(transparent)]
    Encode(ProtoError),
    /// `read(2)` of the devnode failed.
    #[error("reading {DEVICE_PATH}: {0}")]
    Read(#[source] io::Error),
    /// The kernel sent something that does not parse. For an OPEN its fd has been closed already; reply
    /// with [`Device::copen`] and an errno so the mount does not hang.
    #[error("malformed message (msg_id {msg_id:?}, opcode {opcode:?}): {source}")]
    Malformed { msg_id: Option<u32>, opcode: Option<u32>, source: ProtoError },
    /// An OPEN's anonymous fd could not be adopted.
    #[error("OPEN {msg_id}: anonymous fd: {source}")]
    AnonFd { msg_id: u32, source: io::Error },
    /// A write to an object would violate the direct-I/O alignment rule (docs/kernel.md A.4).
    #[error("object write at {offset}+{len} is not 4 KiB-aligned")]
    Unaligned { offset: u64, len: usize },
    /// Writing object data failed.
    #[error("writing object data at {offset}: {source}")]
    Write { offset: u64, source: io::Error },
    /// The READ_COMPLETE ioctl failed.
    #[error("READ_COMPLETE for msg {msg_id}: {source}")]
    ReadComplete { msg_id: u32, source: io::Error },
    /// `inuse`/`cull` could not run.
    #[error("culling {name:?} in {dir:?}: {source}")]
    Cull { dir: PathBuf, name: String, source: io::Error },
}

/// A request read from the device.
#[derive(Debug)]
pub enum Request {
    /// Reply with [`Device::copen`]. Dropping the request closes its fd.
    Open(OpenRequest),
    /// The object is withdrawn: close its fd. No reply.
    Close {
        /// Request id (informational).
        msg_id: u32,
        /// The object to close.
        object_id: u32,
    },
    /// Fill `[off, off + len)` of the object, then [`ObjectFd::read_complete`].
    Read(ReadRequest),
}

/// An OPEN: a cookie has been taken into use.
#[derive(Debug)]
pub struct OpenRequest {
    /// Echo in `copen`.
    pub msg_id: u32,
    /// Later READ/CLOSE messages name the object by this id.
    pub object_id: u32,
    /// Volume key without its NUL, e.g. `erofs,<domain>`.
    pub volume_key: Vec<u8>,
    /// Cookie key, e.g. the fsid or a device tag.
    pub cookie_key: Vec<u8>,
    /// Flags (0 in 6.1).
    pub flags: u32,
    /// The object's anonymous fd (close-on-exec).
    pub fd: ObjectFd,
}

impl OpenRequest {
    /// EROFS domain (or fsid when there is no domain).
    pub fn domain(&self) -> Option<&str> {
        proto::erofs_domain(&self.volume_key)
    }

    /// EROFS cookie name: fsid of the primary blob, or a device tag.
    pub fn tag(&self) -> Option<&str> {
        proto::erofs_tag(&self.cookie_key)
    }
}

/// A READ: the kernel waits until the range is written and completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadRequest {
    /// Echo in READ_COMPLETE.
    pub msg_id: u32,
    /// The object.
    pub object_id: u32,
    /// Offset within the object (a multiple of 4096 for EROFS).
    pub off: u64,
    /// Length (a multiple of 4096 for EROFS; may extend past the object's end).
    pub len: u64,
}

/// Whether a cull happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CullOutcome {
    /// The object file was removed.
    Culled,
    /// The object is in use by a live cookie (`inuse` said EBUSY).
    InUse,
    /// No such object file.
    Missing,
}

/// How often a write that fails with ENOBUFS is retried, and how long to wait before retry `attempt`
/// (0-based). Right after `copen` the kernel may not have attached the backing file yet (docs/kernel.md A.3);
/// below `bstop` ENOBUFS persists and the last error is returned.
pub fn enobufs_backoff(attempt: u32) -> Option<Duration> {
    const ATTEMPTS: u32 = 6;
    (attempt < ATTEMPTS).then(|| Duration::from_millis(10u64 << attempt.min(10)))
}

/// The open `/dev/cachefiles` session.
#[derive(Debug)]
pub struct Device {
    fd: OwnedFd,
}

impl Device {
    /// Opens `/dev/cachefiles` (close-on-exec), mapping the common failures to clear errors.
    pub fn open() -> Result<Self, Error> {
        Self::open_path(Path::new(DEVICE_PATH))
    }

    /// Opens a devnode at another path (tests, containers with a bind-mounted /dev).
    pub fn open_path(path: &Path) -> Result<Self, Error> {
        match std::fs::OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => Ok(Device { fd: f.into() }),
            Err(e) => Err(match e.raw_os_error() {
                Some(libc::ENOENT | libc::ENXIO | libc::ENODEV) => Error::NoDevice,
                Some(libc::EBUSY) => Error::Busy,
                Some(libc::EPERM | libc::EACCES) => Error::Permission(e),
                _ => Error::Open(e),
            }),
        }
    }

    /// Wraps an already open session, e.g. one a supervisor kept across a restart (then call
    /// [`Device::restore`] instead of [`Device::bind`]).
    pub fn from_owned_fd(fd: OwnedFd) -> Self {
        Device { fd }
    }

    /// Gives the session fd back (to hand it to a supervisor).
    pub fn into_owned_fd(self) -> OwnedFd {
        self.fd
    }

    /// Writes one command.
    pub fn command(&self, cmd: &Command<'_>) -> Result<(), Error> {
        let bytes = cmd.encode().map_err(Error::Encode)?;
        write_command(self.fd.as_fd(), &bytes)
    }

    /// `dir <dir>`, optionally `tag <tag>`, then `bind ondemand`.
    pub fn bind(&self, dir: &Path, tag: Option<&str>) -> Result<(), Error> {
        self.command(&Command::Dir(dir))?;
        if let Some(tag) = tag {
            self.command(&Command::Tag(tag))?;
        }
        match self.command(&Command::BindOndemand) {
            Err(Error::Command { source, .. }) => Err(match source.raw_os_error() {
                Some(libc::EINVAL) => Error::NoOndemand,
                Some(libc::EOPNOTSUPP | libc::EROFS) => Error::UnsuitableDir { dir: dir.to_owned(), source },
                _ => Error::Command { command: "bind ondemand".into(), source },
            }),
            other => other,
        }
    }

    /// `restore`: after taking over a session, make every outstanding request readable again.
    pub fn restore(&self) -> Result<(), Error> {
        self.command(&Command::Restore)
    }

    /// Reads one message; `Ok(None)` when nothing is pending (the device never blocks).
    pub fn read_message(&self) -> Result<Option<Request>, Error> {
        let mut buf = [0u8; MSG_MAX_SIZE];
        let (n, fd) = sys::cachefiles::read_message(self.fd.as_fd(), &mut buf).map_err(Error::Read)?;
        if n == 0 {
            return Ok(None);
        }
        request_from_bytes(&buf[..n], fd).map(Some)
    }

    /// `copen <msg_id>,<size>` on success or `copen <msg_id>,-<errno>` on failure (errno in 1..=4095).
    /// On failure, also drop the request's fd.
    pub fn copen(&self, msg_id: u32, result: Result<u64, i32>) -> Result<(), Error> {
        self.command(&Command::Copen { msg_id, result })
    }

    /// Removes one object file if it is not in use: `fanout_dir` is `<dir>/cache/I<volume>/@xx` and
    /// `name` the encoded object name (see [`crate::cookie::object_path`]). Runs `inuse` and `cull` on a
    /// short-lived thread that unshares its cwd, so the process's cwd never changes.
    pub fn cull(&self, fanout_dir: &Path, name: &OsStr) -> Result<CullOutcome, Error> {
        let cull_err =
            |source| Error::Cull { dir: fanout_dir.to_owned(), name: name.to_string_lossy().into_owned(), source };
        let inuse = Command::Inuse(name).encode().map_err(Error::Encode)?;
        let cull = Command::Cull(name).encode().map_err(Error::Encode)?;
        let dev = self.fd.as_fd();
        std::thread::scope(|s| {
            s.spawn(|| {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_FS).map_err(|e| cull_err(e.into()))?;
                nix::unistd::chdir(fanout_dir).map_err(|e| cull_err(e.into()))?;
                for (cmd, busy) in [(&inuse, CullOutcome::InUse), (&cull, CullOutcome::Culled)] {
                    match write_raw(dev, cmd) {
                        Ok(()) => {}
                        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Ok(busy),
                        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(CullOutcome::Missing),
                        Err(e) => return Err(cull_err(e)),
                    }
                }
                Ok(CullOutcome::Culled)
            })
            .join()
            .unwrap_or_else(|_| Err(cull_err(io::Error::other("cull thread panicked"))))
        })
    }
}

impl AsFd for Device {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn write_raw(dev: BorrowedFd<'_>, bytes: &[u8]) -> io::Result<()> {
    loop {
        match nix::unistd::write(dev, bytes) {
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

pub(crate) fn write_command(dev: BorrowedFd<'_>, bytes: &[u8]) -> Result<(), Error> {
    write_raw(dev, bytes)
        .map_err(|source| Error::Command { command: String::from_utf8_lossy(bytes).into_owned(), source })
}

/// Turns the bytes of one read (and the fd adopted from it, if any) into a [`Request`].
pub(crate) fn request_from_bytes(buf: &[u8], fd: Option<io::Result<OwnedFd>>) -> Result<Request, Error> {
    let message = match proto::parse(buf) {
        Ok(m) => m,
        Err(source) => {
            drop(fd); // closes the anon fd of a malformed OPEN
            let hint = proto::header_hint(buf);
            return Err(Error::Malformed { msg_id: hint.map(|h| h.0), opcode: hint.map(|h| h.1), source });
        }
    };
    Ok(match message {
        Message::Open(o) => {
            let msg_id = o.header.msg_id;
            let fd = match fd {
                Some(Ok(fd)) => fd,
                Some(Err(source)) => return Err(Error::AnonFd { msg_id, source }),
                None => return Err(Error::AnonFd { msg_id, source: io::Error::from_raw_os_error(libc::EBADF) }),
            };
            Request::Open(OpenRequest {
                msg_id,
                object_id: o.header.object_id,
                volume_key: o.volume_key.to_vec(),
                cookie_key: o.cookie_key.to_vec(),
                flags: o.flags,
                fd: ObjectFd(fd),
            })
        }
        Message::Close(h) => Request::Close { msg_id: h.msg_id, object_id: h.object_id },
        Message::Read(r) => Request::Read(ReadRequest {
            msg_id: r.header.msg_id,
            object_id: r.header.object_id,
            off: r.off,
            len: r.len,
        }),
    })
}

/// The anonymous fd of one cache object: write-only, direct I/O underneath.
#[derive(Debug)]
pub struct ObjectFd(OwnedFd);

impl ObjectFd {
    /// Wraps an fd (tests; or a `dup` of an object fd).
    pub fn from_owned_fd(fd: OwnedFd) -> Self {
        ObjectFd(fd)
    }

    /// Writes `buf` at `offset`. Both must be 4 KiB-aligned (pad the tail with zeros: see
    /// [`AlignedBuf::pad_to_block`]); short writes are continued and ENOBUFS is retried per
    /// [`enobufs_backoff`].
    pub fn write_blocks(&self, offset: u64, buf: &AlignedBuf) -> Result<(), Error> {
        check_aligned(offset, buf.len())?;
        let mut done = 0usize;
        let mut attempt = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            let pos = i64::try_from(at).map_err(|_| Error::Write { offset: at, source: einval() })?;
            match nix::sys::uio::pwrite(self.0.as_fd(), &buf[done..], pos) {
                Ok(0) => return Err(Error::Write { offset: at, source: io::ErrorKind::WriteZero.into() }),
                Ok(n) => done += n,
                Err(nix::errno::Errno::EINTR) => {}
                Err(nix::errno::Errno::ENOBUFS) => match enobufs_backoff(attempt) {
                    Some(delay) => {
                        attempt += 1;
                        tracing::debug!(offset = at, ?delay, "object write got ENOBUFS, retrying");
                        std::thread::sleep(delay);
                    }
                    None => return Err(Error::Write { offset: at, source: nix::errno::Errno::ENOBUFS.into() }),
                },
                Err(e) => return Err(Error::Write { offset: at, source: e.into() }),
            }
        }
        Ok(())
    }

    /// Tells the kernel that READ `msg_id` is done. If the range was not fully written, the reader gets
    /// EIO: this is also how a READ is failed.
    pub fn read_complete(&self, msg_id: u32) -> Result<(), Error> {
        sys::cachefiles::read_complete(self.0.as_fd(), msg_id).map_err(|source| Error::ReadComplete { msg_id, source })
    }
}

impl AsFd for ObjectFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl AsRawFd for ObjectFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

pub(crate) fn check_aligned(offset: u64, len: usize) -> Result<(), Error> {
    if offset % BLOCK as u64 != 0 || len % BLOCK != 0 {
        return Err(Error::Unaligned { offset, len });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_of_missing_device_names_the_kernel_option() {
        let err = Device::open_path(Path::new("/nonexistent/cachefiles")).unwrap_err();
        assert!(matches!(err, Error::NoDevice));
        assert!(err.to_string().contains("CONFIG_CACHEFILES"));
        assert!(Error::NoOndemand.to_string().contains("CONFIG_CACHEFILES_ONDEMAND"));
    }

    #[test]
    fn object_writes_must_be_block_aligned() {
        let tmp = tempfile::tempfile().unwrap();
        let obj = ObjectFd::from_owned_fd(tmp.into());
        let mut buf = AlignedBuf::zeroed(100);
        assert!(matches!(obj.write_blocks(0, &buf), Err(Error::Unaligned { .. })));
        buf.pad_to_block();
        assert!(matches!(obj.write_blocks(512, &buf), Err(Error::Unaligned { .. })));
        obj.write_blocks(8192, &buf).unwrap();
    }

    #[test]
    fn malformed_open_closes_its_fd_and_reports_the_msg_id() {
        // An OPEN whose volume key lacks its NUL, carrying a real fd that must be closed.
        let file = tempfile::tempfile().unwrap();
        let fd: OwnedFd = file.into();
        let raw = fd.as_raw_fd();
        let mut msg = Vec::new();
        for x in [4u32, proto::opcode::OPEN, 34, 1, 1, 1, u32::try_from(raw).unwrap(), 0] {
            msg.extend_from_slice(&x.to_ne_bytes());
        }
        msg.extend_from_slice(b"vc");
        let err = request_from_bytes(&msg, Some(Ok(fd))).unwrap_err();
        assert!(matches!(err, Error::Malformed { msg_id: Some(4), opcode: Some(0), .. }), "{err}");
        // the fd number is free again
        assert_eq!(nix::fcntl::fcntl(raw, nix::fcntl::FcntlArg::F_GETFD), Err(nix::errno::Errno::EBADF));
    }

    #[test]
    fn backoff_is_bounded() {
        let total: Duration = (0..).map_while(enobufs_backoff).sum();
        assert!(total < Duration::from_secs(2) && total > Duration::from_millis(100), "{total:?}");
    }

    #[test]
    fn cull_runs_on_its_own_cwd() {
        // Without a cachefiles device, use /dev/null as the "device": inuse/cull writes succeed there.
        let dir = tempfile::tempdir().unwrap();
        let before = std::env::current_dir().unwrap();
        let null = std::fs::OpenOptions::new().write(true).open("/dev/null").unwrap();
        let dev = Device::from_owned_fd(null.into());
        assert_eq!(dev.cull(dir.path(), OsStr::new("Dabc")).unwrap(), CullOutcome::Culled);
        assert_eq!(std::env::current_dir().unwrap(), before);
        assert!(dev.cull(dir.path(), OsStr::new("a/b")).is_err());
    }
}
