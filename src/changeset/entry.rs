//! One tar member as the merge sees it: a validated path, a type, metadata, xattrs.
//!
//! Formats: ustar, GNU (long names `L`/`K`, base-256 numbers, old sparse `S`: all decoded by the
//! `tar` crate) and PAX (`path`, `linkpath`, `size`, `uid`, `gid` by the crate; `mtime` with
//! nanoseconds, `SCHILY.xattr.*` and the GNU 1.0 sparse keys here).

use std::collections::BTreeMap;
use std::io::{self, Read};

use erofs::tree::Metadata;

use super::sparse::{self, SparseMap};
use super::tarstream::Member;
use super::{show_bytes, split_name, PathError};

/// Largest regular file accepted (a sanity bound against absurd size fields).
pub const MAX_FILE_SIZE: u64 = 1 << 40;
/// Largest xattr value accepted (Linux's XATTR_SIZE_MAX).
pub const MAX_XATTR_VALUE: usize = 65536;

/// What a member is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    Directory,
    /// A regular file of `size` bytes; `sparse` is set for PAX 1.0 sparse members, whose stored data
    /// starts with the map.
    Regular {
        size: u64,
        sparse: Option<SparseMap>,
    },
    /// A hard link to another path (components, relative to the root).
    HardLink(Vec<Vec<u8>>),
    Symlink(Vec<u8>),
    CharDevice {
        major: u32,
        minor: u32,
    },
    BlockDevice {
        major: u32,
        minor: u32,
    },
    Fifo,
}

/// A parsed member.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The member name as written (for messages).
    pub name: Vec<u8>,
    pub path: Vec<Vec<u8>>,
    pub kind: EntryKind,
    pub meta: Metadata,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// Why a member was rejected.
#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    #[error("entry {name}: {reason}")]
    Path { name: String, reason: PathError },
    #[error("entry {name}: hard link target {target}: {reason}")]
    LinkPath { name: String, target: String, reason: PathError },
    #[error("entry {name}: {what} has no target")]
    NoTarget { name: String, what: &'static str },
    #[error("entry {name}: symlink target of {len} bytes (must be 1..=4095)")]
    SymlinkTarget { name: String, len: usize },
    #[error("entry {name}: size {size} exceeds the limit of {MAX_FILE_SIZE} bytes")]
    TooLarge { name: String, size: u64 },
    #[error("entry {name}: unsupported tar entry type {flag:?}")]
    UnsupportedType { name: String, flag: char },
    #[error("entry {name}: PAX record {key}: {why}")]
    Pax { name: String, key: String, why: String },
    #[error("entry {name}: {what}")]
    Header { name: String, what: String },
    #[error("entry {name}: {reason}")]
    Sparse { name: String, reason: sparse::SparseError },
    #[error("entry {name}: reading the tar stream")]
    Io { name: String, source: io::Error },
}

/// Parses member `m`; `data` is its stored data (a PAX 1.0 sparse map is read from its start).
/// `Ok(None)` for members that carry nothing for the tree.
pub fn parse(m: &Member, data: &mut impl Read) -> Result<Option<Entry>, EntryError> {
    let raw_name = m.name.clone();
    let name = show_bytes(&raw_name);
    let header_err = |what: String| EntryError::Header { name: name.clone(), what };
    let h = &m.header;
    let ty = h.entry_type();
    let perm =
        u16::try_from(h.mode().map_err(|err| header_err(format!("mode: {err}")))? & 0o7777).expect("masked to 12 bits");
    let mut uid = h.uid().map_err(|err| header_err(format!("uid: {err}")))?;
    let mut gid = h.gid().map_err(|err| header_err(format!("gid: {err}")))?;
    let mut mtime = (header_mtime(h).map_err(&header_err)?, 0u32);
    let link = m.link.clone();
    let dev = (h.device_major().ok().flatten().unwrap_or(0), h.device_minor().ok().flatten().unwrap_or(0));
    let mut size = m.size;

    // PAX records (path, linkpath and size are folded in by the reader).
    let mut xattrs = BTreeMap::new();
    let mut sparse_major = None;
    let mut sparse_name = None;
    let mut sparse_realsize = None;
    for (key, value) in &m.pax {
        let value = value.clone();
        let pax_err = |why: String| EntryError::Pax { name: name.clone(), key: show_bytes(key), why };
        if let Some(x) = key.strip_prefix(b"SCHILY.xattr.") {
            if x.is_empty() || x.len() > 255 {
                return Err(pax_err(format!("xattr name of {} bytes", x.len())));
            }
            if value.len() > MAX_XATTR_VALUE {
                return Err(pax_err(format!("xattr value of {} bytes (at most {MAX_XATTR_VALUE})", value.len())));
            }
            xattrs.insert(x.to_vec(), value);
            continue;
        }
        let text = || std::str::from_utf8(&value).map_err(|_| pax_err("value is not UTF-8".into()));
        let number = || text()?.parse::<u64>().map_err(|_| pax_err("not a number".into()));
        match key.as_slice() {
            b"mtime" => mtime = parse_pax_time(text()?).ok_or_else(|| pax_err("not a decimal time".into()))?,
            b"uid" => uid = number()?,
            b"gid" => gid = number()?,
            b"GNU.sparse.major" => sparse_major = Some(text()?.to_string()),
            b"GNU.sparse.name" => sparse_name = Some(value.clone()),
            b"GNU.sparse.realsize" => sparse_realsize = Some(number()?),
            b"GNU.sparse.size"
            | b"GNU.sparse.map"
            | b"GNU.sparse.numblocks"
            | b"GNU.sparse.offset"
            | b"GNU.sparse.numbytes" => {
                return Err(pax_err("PAX sparse format 0.x is not supported (only 1.0)".into()));
            }
            _ => {}
        }
    }
    let uid = u32::try_from(uid).map_err(|_| header_err(format!("uid {uid} does not fit 32 bits")))?;
    let gid = u32::try_from(gid).map_err(|_| header_err(format!("gid {gid} does not fit 32 bits")))?;

    let mut path_bytes = raw_name.clone();
    let mut sparse_map = m.gnu_sparse.clone();
    if let Some(major) = sparse_major {
        if major != "1" {
            return Err(EntryError::Pax {
                name,
                key: "GNU.sparse.major".into(),
                why: format!("version {major} is not supported"),
            });
        }
        path_bytes = sparse_name.ok_or_else(|| EntryError::Pax {
            name: name.clone(),
            key: "GNU.sparse.name".into(),
            why: "missing in a PAX 1.0 sparse member".into(),
        })?;
        let real = sparse_realsize.ok_or_else(|| EntryError::Pax {
            name: name.clone(),
            key: "GNU.sparse.realsize".into(),
            why: "missing in a PAX 1.0 sparse member".into(),
        })?;
        let map =
            sparse::read_map(data, size, real).map_err(|reason| EntryError::Sparse { name: name.clone(), reason })?;
        sparse_map = Some(map);
        size = real;
    }
    let path = split_name(&path_bytes).map_err(|reason| EntryError::Path { name: name.clone(), reason })?;

    use tar::EntryType as T;
    let kind = match ty {
        T::Regular | T::Continuous | T::GNUSparse => {
            if m.stored_size > MAX_FILE_SIZE {
                return Err(EntryError::TooLarge { name, size: m.stored_size });
            }
            if size > MAX_FILE_SIZE {
                return Err(EntryError::TooLarge { name, size });
            }
            EntryKind::Regular { size, sparse: sparse_map }
        }
        T::Directory => EntryKind::Directory,
        T::Link => {
            let target = link.ok_or_else(|| EntryError::NoTarget { name: name.clone(), what: "hard link" })?;
            let comps = split_name(&target).map_err(|reason| EntryError::LinkPath {
                name: name.clone(),
                target: show_bytes(&target),
                reason,
            })?;
            EntryKind::HardLink(comps)
        }
        T::Symlink => {
            let target = link.ok_or_else(|| EntryError::NoTarget { name: name.clone(), what: "symlink" })?;
            if target.is_empty() || target.len() > super::PATH_MAX || target.contains(&0) {
                return Err(EntryError::SymlinkTarget { name, len: target.len() });
            }
            EntryKind::Symlink(target)
        }
        T::Char => EntryKind::CharDevice { major: dev.0, minor: dev.1 },
        T::Block => EntryKind::BlockDevice { major: dev.0, minor: dev.1 },
        T::Fifo => EntryKind::Fifo,
        other => return Err(EntryError::UnsupportedType { name, flag: char::from(other.as_byte()) }),
    };
    Ok(Some(Entry {
        name: raw_name,
        path,
        kind,
        meta: Metadata { perm, uid, gid, mtime: mtime.0, mtime_nsec: mtime.1 },
        xattrs,
    }))
}

/// The header's mtime field as a signed number: octal, or GNU base-256 (two's complement when the
/// first byte is 0xff, which is how GNU tar writes times before 1970).
fn header_mtime(h: &tar::Header) -> Result<i64, String> {
    if h.as_ustar().is_none() && h.as_gnu().is_none() && h.as_old().mtime[0] & 0x80 != 0 {
        return Err("mtime: base-256 in a non-GNU header".into());
    }
    let field = &h.as_old().mtime;
    if field[0] == 0xff {
        let mut v: i64 = -1;
        for &b in &field[1..] {
            v = (v << 8) | i64::from(b);
        }
        return Ok(v);
    }
    let m = h.mtime().map_err(|e| format!("mtime: {e}"))?;
    i64::try_from(m).map_err(|_| format!("mtime {m} out of range"))
}

/// A PAX time `[-]SECONDS[.FRACTION]` as (seconds, nanoseconds), floor semantics for negatives.
pub fn parse_pax_time(s: &str) -> Option<(i64, u32)> {
    let (neg, body) = match s.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, s),
    };
    let (secs, frac) = body.split_once('.').unwrap_or((body, ""));
    if secs.is_empty() || !secs.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs: i64 = secs.parse().ok()?;
    let mut nanos: u32 = 0;
    for (i, d) in frac.bytes().take(9).enumerate() {
        nanos += u32::from(d - b'0') * 10u32.pow(8 - u32::try_from(i).ok()?);
    }
    if !neg {
        return Some((secs, nanos));
    }
    if nanos == 0 {
        Some((-secs, 0))
    } else {
        Some((-secs - 1, 1_000_000_000 - nanos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_times() {
        assert_eq!(parse_pax_time("1700000000.5"), Some((1700000000, 500_000_000)));
        assert_eq!(parse_pax_time("-1.25"), Some((-2, 750_000_000)));
        assert_eq!(parse_pax_time("-315619200"), Some((-315619200, 0)));
        assert_eq!(parse_pax_time("1.123456789123"), Some((1, 123_456_789)));
        assert_eq!(parse_pax_time("x"), None);
    }
}
