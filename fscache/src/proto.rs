//! The cachefiles on-demand wire protocol, as pure data: messages the kernel hands to the daemon through
//! `read(2)` on `/dev/cachefiles`, and the ASCII commands the daemon writes back.
//!
//! Layouts follow `include/uapi/linux/cachefiles.h` (Linux 6.1): every field is a plain `__u32`/`__u64`
//! and therefore **host-endian** (see docs/kernel.md A.2). Command syntax follows `fs/cachefiles/daemon.c`
//! (docs/kernel.md A.1, A.3).
//!
//! Nothing here performs I/O. In particular the anonymous fd number carried by an OPEN message is only a
//! number at this level; [`crate::cachefiles`] turns it into an `OwnedFd` right after the `read(2)`.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use zerocopy::byteorder::{NativeEndian, U32, U64};
use zerocopy::{FromBytes, Immutable, KnownLayout, Unaligned};

/// `CACHEFILES_MSG_MAX_SIZE`: the kernel never produces a larger message, and a smaller read buffer gets
/// `EMSGSIZE`.
pub const MSG_MAX_SIZE: usize = 1024;

/// `CACHEFILES_IOC_READ_COMPLETE = _IOW(0x98, 1, int)`; the READ's `msg_id` is passed by value.
pub const IOC_READ_COMPLETE: u32 = 0x4004_9801;

/// Largest command the kernel accepts in one write (`PAGE_SIZE - 1` on x86-64).
pub const COMMAND_MAX: usize = 4095;

/// fscache limits a cookie (index) key to 255 bytes.
pub const COOKIE_KEY_MAX: usize = 255;

/// A volume key is at most 255 bytes plus its trailing NUL (its length is stored in a byte).
pub const VOLUME_KEY_MAX: usize = 256;

/// Opcodes of `enum cachefiles_opcode`.
pub mod opcode {
    /// `CACHEFILES_OP_OPEN`
    pub const OPEN: u32 = 0;
    /// `CACHEFILES_OP_CLOSE`
    pub const CLOSE: u32 = 1;
    /// `CACHEFILES_OP_READ`
    pub const READ: u32 = 2;
}

/// `struct cachefiles_msg` without its flexible `data[]`.
#[derive(Debug, Clone, Copy, FromBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawHeader {
    /// Request id; echoed in `copen` and in the READ_COMPLETE ioctl.
    pub msg_id: U32<NativeEndian>,
    /// One of [`opcode`].
    pub opcode: U32<NativeEndian>,
    /// Total length including this header.
    pub len: U32<NativeEndian>,
    /// The cache object the request is about.
    pub object_id: U32<NativeEndian>,
}
const _: () = assert!(size_of::<RawHeader>() == 16);

/// `struct cachefiles_open` without its flexible `data[]` (volume key, then cookie key).
#[derive(Debug, Clone, Copy, FromBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawOpen {
    /// Bytes of the volume key, including its trailing NUL.
    pub volume_key_size: U32<NativeEndian>,
    /// Bytes of the (binary) cookie key.
    pub cookie_key_size: U32<NativeEndian>,
    /// Anonymous fd installed in the process that read the message.
    pub fd: U32<NativeEndian>,
    /// Always 0 in 6.1.
    pub flags: U32<NativeEndian>,
}
const _: () = assert!(size_of::<RawOpen>() == 16);

/// `struct cachefiles_read`.
#[derive(Debug, Clone, Copy, FromBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawRead {
    /// Byte offset within the cache object.
    pub off: U64<NativeEndian>,
    /// Byte length.
    pub len: U64<NativeEndian>,
}
const _: () = assert!(size_of::<RawRead>() == 16);

const HEADER_LEN: usize = size_of::<RawHeader>();
const OPEN_FIXED_LEN: usize = HEADER_LEN + size_of::<RawOpen>();
const READ_LEN: usize = HEADER_LEN + size_of::<RawRead>();

/// Why a message or a command was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// Fewer bytes than the message kind needs.
    #[error("short cachefiles message: {got} bytes, need at least {need}")]
    Short { need: usize, got: usize },
    /// More bytes than the kernel ever sends.
    #[error("oversized cachefiles message: {got} bytes (max {MSG_MAX_SIZE})")]
    Oversized { got: usize },
    /// The header's `len` disagrees with what `read(2)` returned.
    #[error("cachefiles message {msg_id}: header len {header_len} but {read} bytes read")]
    LengthMismatch { msg_id: u32, header_len: u32, read: usize },
    /// An opcode this daemon does not know.
    #[error("cachefiles message {msg_id}: unknown opcode {opcode}")]
    UnknownOpcode { msg_id: u32, opcode: u32 },
    /// The OPEN key sizes do not add up to the payload, or exceed the kernel's bounds.
    #[error("cachefiles OPEN {msg_id}: volume key {volume} + cookie key {cookie} bytes vs payload {payload}")]
    KeySizes { msg_id: u32, volume: u32, cookie: u32, payload: usize },
    /// The volume key lacks its trailing NUL or has an embedded one.
    #[error("cachefiles OPEN {msg_id}: volume key is not a NUL-terminated string")]
    VolumeKey { msg_id: u32 },
    /// A CLOSE or READ with a payload of the wrong size.
    #[error("cachefiles message {msg_id} (opcode {opcode}): payload of {payload} bytes, expected {expected}")]
    Payload { msg_id: u32, opcode: u32, payload: usize, expected: usize },
    /// A READ whose range overflows 64 bits.
    #[error("cachefiles READ {msg_id}: range {off}+{len} overflows")]
    ReadRange { msg_id: u32, off: u64, len: u64 },
    /// A command argument the kernel would reject or misparse.
    #[error("invalid cachefiles command argument {arg:?}: {why}")]
    BadArgument { arg: String, why: &'static str },
    /// A `copen` errno outside `1..=4095`.
    #[error("copen errno {0} outside 1..=4095")]
    BadErrno(i32),
}

/// The header fields common to every message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Request id.
    pub msg_id: u32,
    /// Object id (1..INT_MAX, cyclic, freed when the object's last anon fd closes).
    pub object_id: u32,
}

/// An OPEN message, borrowing its keys from the read buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenMsg<'a> {
    /// Common header.
    pub header: Header,
    /// Volume key without its trailing NUL (for EROFS `erofs,<domain>`).
    pub volume_key: &'a [u8],
    /// Cookie key (for EROFS the fsid or device tag).
    pub cookie_key: &'a [u8],
    /// Anonymous fd number, valid in the process that read the message.
    pub fd: u32,
    /// Flags (0 in 6.1).
    pub flags: u32,
}

/// A READ message: fill `[off, off + len)` of the object, then complete it by ioctl.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadMsg {
    /// Common header.
    pub header: Header,
    /// Byte offset within the object.
    pub off: u64,
    /// Byte length.
    pub len: u64,
}

/// One parsed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message<'a> {
    /// A cookie is taken into use: reply with `copen`.
    Open(OpenMsg<'a>),
    /// The object is withdrawn; no reply.
    Close(Header),
    /// Data is wanted.
    Read(ReadMsg),
}

impl Message<'_> {
    /// The common header.
    pub fn header(&self) -> Header {
        match self {
            Message::Open(o) => o.header,
            Message::Close(h) => *h,
            Message::Read(r) => r.header,
        }
    }
}

/// Parses one message of exactly `buf.len()` bytes (what one `read(2)` returned).
pub fn parse(buf: &[u8]) -> Result<Message<'_>, ProtoError> {
    if buf.len() > MSG_MAX_SIZE {
        return Err(ProtoError::Oversized { got: buf.len() });
    }
    let (raw, payload) =
        RawHeader::read_from_prefix(buf).map_err(|_| ProtoError::Short { need: HEADER_LEN, got: buf.len() })?;
    let header = Header { msg_id: raw.msg_id.get(), object_id: raw.object_id.get() };
    let msg_id = header.msg_id;
    if usize::try_from(raw.len.get()).ok() != Some(buf.len()) {
        return Err(ProtoError::LengthMismatch { msg_id, header_len: raw.len.get(), read: buf.len() });
    }
    match raw.opcode.get() {
        opcode::OPEN => parse_open(header, payload).map(Message::Open),
        opcode::CLOSE if payload.is_empty() => Ok(Message::Close(header)),
        opcode::CLOSE => {
            Err(ProtoError::Payload { msg_id, opcode: opcode::CLOSE, payload: payload.len(), expected: 0 })
        }
        opcode::READ => {
            let (read, rest) =
                RawRead::read_from_prefix(payload).map_err(|_| ProtoError::Short { need: READ_LEN, got: buf.len() })?;
            if !rest.is_empty() {
                let expected = size_of::<RawRead>();
                return Err(ProtoError::Payload { msg_id, opcode: opcode::READ, payload: payload.len(), expected });
            }
            let (off, len) = (read.off.get(), read.len.get());
            if off.checked_add(len).is_none() {
                return Err(ProtoError::ReadRange { msg_id, off, len });
            }
            Ok(Message::Read(ReadMsg { header, off, len }))
        }
        opcode => Err(ProtoError::UnknownOpcode { msg_id, opcode }),
    }
}

fn parse_open(header: Header, payload: &[u8]) -> Result<OpenMsg<'_>, ProtoError> {
    let msg_id = header.msg_id;
    let (raw, keys) = RawOpen::read_from_prefix(payload)
        .map_err(|_| ProtoError::Short { need: OPEN_FIXED_LEN, got: HEADER_LEN + payload.len() })?;
    let (volume, cookie) = (raw.volume_key_size.get(), raw.cookie_key_size.get());
    let bad_sizes = ProtoError::KeySizes { msg_id, volume, cookie, payload: keys.len() };
    let (Ok(v), Ok(c)) = (usize::try_from(volume), usize::try_from(cookie)) else {
        return Err(bad_sizes);
    };
    if v == 0 || v > VOLUME_KEY_MAX || c > COOKIE_KEY_MAX || v.checked_add(c) != Some(keys.len()) {
        return Err(bad_sizes);
    }
    let (volume_key, cookie_key) = keys.split_at(v);
    let Some((&0, volume_key)) = volume_key.split_last() else {
        return Err(ProtoError::VolumeKey { msg_id });
    };
    if volume_key.contains(&0) {
        return Err(ProtoError::VolumeKey { msg_id });
    }
    Ok(OpenMsg { header, volume_key, cookie_key, fd: raw.fd.get(), flags: raw.flags.get() })
}

/// The anonymous fd number of a message that claims to be an OPEN with its fixed part complete, even if
/// the rest of it is malformed. The kernel installed that fd before the read returned, so the caller must
/// take ownership of it (and close it) whether or not [`parse`] accepts the message.
pub fn open_fd_hint(buf: &[u8]) -> Option<u32> {
    let (raw, payload) = RawHeader::read_from_prefix(buf).ok()?;
    if raw.opcode.get() != opcode::OPEN || usize::try_from(raw.len.get()).ok() != Some(buf.len()) {
        return None;
    }
    let (open, _) = RawOpen::read_from_prefix(payload).ok()?;
    Some(open.fd.get())
}

/// The msg_id and opcode of a message, if at least its header is present (for error replies).
pub fn header_hint(buf: &[u8]) -> Option<(u32, u32)> {
    RawHeader::read_from_prefix(buf).ok().map(|(h, _)| (h.msg_id.get(), h.opcode.get()))
}

/// A command written to `/dev/cachefiles` (one command per `write(2)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command<'a> {
    /// `dir <path>`: the cache directory (mandatory, once).
    Dir(&'a Path),
    /// `tag <name>`: cache tag (cosmetic for EROFS).
    Tag(&'a str),
    /// `bind ondemand`.
    BindOndemand,
    /// `restore`: after a takeover, mark every outstanding request as new.
    Restore,
    /// `inuse <name>`: is this entry of the current directory in use (EBUSY)?
    Inuse(&'a OsStr),
    /// `cull <name>`: remove this entry of the current directory.
    Cull(&'a OsStr),
    /// `copen <msg_id>,<size or -errno>`.
    Copen {
        /// The OPEN being answered.
        msg_id: u32,
        /// Object size on success, errno (positive) on failure.
        result: Result<u64, i32>,
    },
}

impl Command<'_> {
    /// The bytes to write, checked against the kernel's command rules.
    pub fn encode(&self) -> Result<Vec<u8>, ProtoError> {
        let mut out = Vec::new();
        match self {
            Command::Dir(path) => {
                out.extend_from_slice(b"dir ");
                out.extend_from_slice(checked_arg(path.as_os_str().as_bytes(), false)?);
            }
            Command::Tag(tag) => {
                out.extend_from_slice(b"tag ");
                let tag = checked_arg(tag.as_bytes(), true)?;
                out.extend_from_slice(tag);
            }
            Command::BindOndemand => out.extend_from_slice(b"bind ondemand"),
            Command::Restore => out.extend_from_slice(b"restore"),
            Command::Inuse(name) | Command::Cull(name) => {
                let verb: &[u8] = if matches!(self, Command::Inuse(_)) { b"inuse " } else { b"cull " };
                let name = checked_arg(name.as_bytes(), true)?;
                if name.contains(&b'/') || name == b"." || name == b".." {
                    return Err(bad_arg(name, "must be a single directory entry name"));
                }
                out.extend_from_slice(verb);
                out.extend_from_slice(name);
            }
            Command::Copen { msg_id, result } => match result {
                Ok(size) => out.extend_from_slice(format!("copen {msg_id},{size}").as_bytes()),
                Err(errno) if (1..=4095).contains(errno) => {
                    out.extend_from_slice(format!("copen {msg_id},-{errno}").as_bytes())
                }
                Err(errno) => return Err(ProtoError::BadErrno(*errno)),
            },
        }
        if out.len() > COMMAND_MAX {
            return Err(bad_arg(&out, "command longer than PAGE_SIZE - 1"));
        }
        Ok(out)
    }
}

fn bad_arg(arg: &[u8], why: &'static str) -> ProtoError {
    ProtoError::BadArgument { arg: String::from_utf8_lossy(arg).into_owned(), why }
}

fn checked_arg(arg: &[u8], single_word: bool) -> Result<&[u8], ProtoError> {
    if arg.is_empty() {
        return Err(bad_arg(arg, "empty"));
    }
    if arg.contains(&0) {
        return Err(bad_arg(arg, "contains a NUL byte"));
    }
    if arg.contains(&b'\n') {
        return Err(bad_arg(arg, "contains a newline"));
    }
    if single_word && arg.iter().any(u8::is_ascii_whitespace) {
        return Err(bad_arg(arg, "contains whitespace"));
    }
    Ok(arg)
}

/// The EROFS domain of a volume key: `erofs,<domain_id or fsid>` → `<domain>` (trailing NUL already
/// stripped by [`parse`], but tolerated here).
pub fn erofs_domain(volume_key: &[u8]) -> Option<&str> {
    let key = volume_key.strip_suffix(b"\0").unwrap_or(volume_key);
    let domain = key.strip_prefix(b"erofs,")?;
    std::str::from_utf8(domain).ok().filter(|d| !d.is_empty())
}

/// The EROFS cookie key as text: the fsid (primary blob) or the device tag (a sha256 hex digest in wisp).
pub fn erofs_tag(cookie_key: &[u8]) -> Option<&str> {
    std::str::from_utf8(cookie_key).ok().filter(|t| !t.is_empty() && !t.contains('\0'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header(msg_id: u32, op: u32, len: usize, object_id: u32) -> Vec<u8> {
        let mut v = Vec::new();
        for x in [msg_id, op, u32::try_from(len).unwrap(), object_id] {
            v.extend_from_slice(&x.to_ne_bytes());
        }
        v
    }

    fn open_msg(msg_id: u32, volume: &[u8], cookie: &[u8], fd: u32) -> Vec<u8> {
        let len = 32 + volume.len() + cookie.len();
        let mut v = header(msg_id, opcode::OPEN, len, 7);
        for x in [volume.len(), cookie.len()] {
            v.extend_from_slice(&u32::try_from(x).unwrap().to_ne_bytes());
        }
        v.extend_from_slice(&fd.to_ne_bytes());
        v.extend_from_slice(&0u32.to_ne_bytes());
        v.extend_from_slice(volume);
        v.extend_from_slice(cookie);
        v
    }

    #[test]
    fn parses_open_with_erofs_keys() {
        let buf = open_msg(3, b"erofs,d1\0", b"0123abcd", 42);
        let Message::Open(o) = parse(&buf).unwrap() else { panic!("not an OPEN") };
        assert_eq!(o.header, Header { msg_id: 3, object_id: 7 });
        assert_eq!(o.volume_key, b"erofs,d1");
        assert_eq!(o.cookie_key, b"0123abcd");
        assert_eq!((o.fd, o.flags), (42, 0));
        assert_eq!(erofs_domain(o.volume_key), Some("d1"));
        assert_eq!(erofs_tag(o.cookie_key), Some("0123abcd"));
        assert_eq!(open_fd_hint(&buf), Some(42));
    }

    #[test]
    fn parses_close_and_read() {
        assert_eq!(
            parse(&header(9, opcode::CLOSE, 16, 5)).unwrap(),
            Message::Close(Header { msg_id: 9, object_id: 5 })
        );
        let mut buf = header(10, opcode::READ, 32, 5);
        buf.extend_from_slice(&8192u64.to_ne_bytes());
        buf.extend_from_slice(&131072u64.to_ne_bytes());
        let want = ReadMsg { header: Header { msg_id: 10, object_id: 5 }, off: 8192, len: 131072 };
        assert_eq!(parse(&buf).unwrap(), Message::Read(want));
        assert_eq!(open_fd_hint(&buf), None);
    }

    #[test]
    fn rejects_malformed_messages() {
        assert_eq!(parse(&[0; 8]), Err(ProtoError::Short { need: 16, got: 8 }));
        assert!(matches!(parse(&[0; 1025]), Err(ProtoError::Oversized { got: 1025 })));
        // len disagrees with bytes read
        assert!(matches!(parse(&header(1, opcode::CLOSE, 17, 1)), Err(ProtoError::LengthMismatch { .. })));
        assert!(matches!(parse(&header(1, 9, 16, 1)), Err(ProtoError::UnknownOpcode { opcode: 9, .. })));
        // CLOSE with payload, READ without
        let mut close = header(1, opcode::CLOSE, 20, 1);
        close.extend_from_slice(&[0; 4]);
        assert!(matches!(parse(&close), Err(ProtoError::Payload { .. })));
        assert!(matches!(parse(&header(1, opcode::READ, 16, 1)), Err(ProtoError::Short { need: 32, .. })));
        // READ range overflow
        let mut read = header(1, opcode::READ, 32, 1);
        read.extend_from_slice(&u64::MAX.to_ne_bytes());
        read.extend_from_slice(&1u64.to_ne_bytes());
        assert!(matches!(parse(&read), Err(ProtoError::ReadRange { .. })));
    }

    #[test]
    fn rejects_bad_open_keys_but_still_reports_the_fd() {
        // volume key without NUL
        let buf = open_msg(2, b"erofs,d1", b"x", 11);
        assert_eq!(parse(&buf), Err(ProtoError::VolumeKey { msg_id: 2 }));
        assert_eq!(open_fd_hint(&buf), Some(11));
        // embedded NUL in volume key
        assert!(matches!(parse(&open_msg(2, b"ero\0s\0", b"x", 11)), Err(ProtoError::VolumeKey { .. })));
        // empty volume key
        assert!(matches!(parse(&open_msg(2, b"", b"x", 11)), Err(ProtoError::KeySizes { .. })));
        // cookie key too long
        let long = vec![b'a'; 256];
        assert!(matches!(parse(&open_msg(2, b"v\0", &long, 11)), Err(ProtoError::KeySizes { .. })));
        // sizes not matching payload: claim a bigger cookie key than present
        let mut buf = open_msg(2, b"v\0", b"abc", 11);
        buf[20..24].copy_from_slice(&10u32.to_ne_bytes());
        assert!(matches!(parse(&buf), Err(ProtoError::KeySizes { .. })));
        // huge sizes that would overflow when added
        buf[16..20].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(matches!(parse(&buf), Err(ProtoError::KeySizes { .. })));
    }

    #[test]
    fn encodes_commands() {
        let enc = |c: Command| String::from_utf8(c.encode().unwrap()).unwrap();
        assert_eq!(enc(Command::Dir(Path::new("/var/cache/wisp fs"))), "dir /var/cache/wisp fs");
        assert_eq!(enc(Command::Tag("wisp")), "tag wisp");
        assert_eq!(enc(Command::BindOndemand), "bind ondemand");
        assert_eq!(enc(Command::Restore), "restore");
        assert_eq!(enc(Command::Inuse(OsStr::new("Dabc"))), "inuse Dabc");
        assert_eq!(enc(Command::Cull(OsStr::new("Dabc"))), "cull Dabc");
        assert_eq!(enc(Command::Copen { msg_id: 5, result: Ok(1 << 33) }), "copen 5,8589934592");
        assert_eq!(enc(Command::Copen { msg_id: 5, result: Err(libc::ENOENT) }), "copen 5,-2");
    }

    #[test]
    fn rejects_bad_command_arguments() {
        assert!(Command::Copen { msg_id: 1, result: Err(0) }.encode().is_err());
        assert!(Command::Copen { msg_id: 1, result: Err(4096) }.encode().is_err());
        assert!(Command::Copen { msg_id: 1, result: Err(-5) }.encode().is_err());
        assert!(Command::Cull(OsStr::new("a/b")).encode().is_err());
        assert!(Command::Cull(OsStr::new("..")).encode().is_err());
        assert!(Command::Inuse(OsStr::new("a b")).encode().is_err());
        assert!(Command::Tag("").encode().is_err());
        assert!(Command::Dir(Path::new("/a\nb")).encode().is_err());
        assert!(Command::Dir(Path::new("/a\0b")).encode().is_err());
        let long = "x".repeat(5000);
        assert!(Command::Dir(Path::new(&long)).encode().is_err());
    }

    #[test]
    fn erofs_key_helpers() {
        assert_eq!(erofs_domain(b"erofs,img\0"), Some("img"));
        assert_eq!(erofs_domain(b"erofs,"), None);
        assert_eq!(erofs_domain(b"nfs,abc"), None);
        assert_eq!(erofs_domain(b"erofs,\xff"), None);
        assert_eq!(erofs_tag(b""), None);
        assert_eq!(erofs_tag(b"\xfe"), None);
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..1100)) {
            let _ = parse(&buf);
            let _ = open_fd_hint(&buf);
            let _ = header_hint(&buf);
        }

        #[test]
        fn well_formed_open_round_trips(
            vol in proptest::collection::vec(1u8..=255, 0..255),
            cookie in proptest::collection::vec(any::<u8>(), 0..=255),
            fd in any::<u32>(),
        ) {
            let mut v = vol.clone();
            v.push(0);
            let buf = open_msg(1, &v, &cookie, fd);
            let Ok(Message::Open(o)) = parse(&buf) else { panic!("rejected") };
            prop_assert_eq!(o.volume_key, &vol[..]);
            prop_assert_eq!(o.cookie_key, &cookie[..]);
            prop_assert_eq!(o.fd, fd);
        }

        #[test]
        fn header_fields_survive_mutation(buf in proptest::collection::vec(any::<u8>(), 16..64), cut in 0usize..64) {
            // any truncation of any buffer is either rejected or parsed with len == bytes read
            let cut = cut.min(buf.len());
            if let Ok(m) = parse(&buf[..cut]) {
                let (msg_id, _) = header_hint(&buf[..cut]).unwrap();
                prop_assert_eq!(m.header().msg_id, msg_id);
            }
        }
    }
}
