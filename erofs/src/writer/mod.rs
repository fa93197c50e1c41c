//! The image writer: a [`Tree`] in, an EROFS image out, written strictly sequentially.
//!
//! Two passes over one description: [`plan`] assigns every byte offset (superblock, device table,
//! shared xattrs, inodes with their xattrs/inline tails/chunk indexes, then data blocks), and [`emit`]
//! writes the bytes in that order through a position-checked sink that fails with
//! [`WriteError::LayoutDrift`] if what it writes ever disagrees with the plan.
//!
//! Image layout (4 KiB blocks):
//! ```text
//! [0, 1024) zero | superblock | device table (slot 9 on) | shared xattrs | inodes (root first) |
//! pad to block | data blocks (directory blocks, flat file blocks, sparse chunks) in inode order
//! ```
//! The root is the first inode and the device table starts at byte 1152, which keeps the 16-bit
//! `root_nid` and `devt_slotoff` fields in range (docs/kernel.md B.4, G.6).

mod collect;
mod data;
mod dirs;
mod emit;
mod plan;
mod xattrs;

use std::collections::HashMap;
use std::io;

use crate::tree::{Digest, InodeId, Tree};

/// Where the writer gets the bytes of [`crate::FileData::Inline`] files.
pub trait ContentSource {
    /// Fills `buf` with the bytes of file `source` starting at `offset`. Only ranges inside the file's
    /// extents are asked for.
    fn read_at(&mut self, source: u64, offset: u64, buf: &mut [u8]) -> io::Result<()>;
}

/// A [`ContentSource`] holding whole files in memory, keyed by source handle (tests, small trees).
#[derive(Clone, Debug, Default)]
pub struct MemorySource {
    pub files: HashMap<u64, Vec<u8>>,
}

impl MemorySource {
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores `bytes` as the content of `source`.
    pub fn insert(&mut self, source: u64, bytes: Vec<u8>) {
        self.files.insert(source, bytes);
    }
}

impl ContentSource for MemorySource {
    fn read_at(&mut self, source: u64, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let file = self
            .files
            .get(&source)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no content for source {source}")))?;
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let end = start.checked_add(buf.len()).ok_or(io::ErrorKind::UnexpectedEof)?;
        let src = file.get(start..end).ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

/// Image-wide choices.
#[derive(Clone, Debug, Default)]
pub struct WriteOptions {
    /// The superblock uuid (default all zeros, which keeps output deterministic).
    pub uuid: [u8; 16],
    /// At most 15 bytes (the field must hold a NUL).
    pub volume_name: Vec<u8>,
    /// The time of every compact inode. `None`: the most common mtime in the tree, which makes the
    /// most inodes compact.
    pub build_time: Option<(i64, u32)>,
}

/// One extra device (blob) of the image: device id = position in [`WriteStats::devices`] + 1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceRef {
    pub digest: Digest,
    /// Content size in bytes (the slot records `ceil(size / 4096)` blocks).
    pub size: u64,
}

/// What the writer produced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Extra devices in device-id order (slot i = device id i + 1).
    pub devices: Vec<DeviceRef>,
    /// Inodes written (reachable from the root; hard links count once).
    pub inodes: u64,
    pub compact_inodes: u64,
    pub extended_inodes: u64,
    /// Image size in 4 KiB blocks (the image is exactly `blocks * 4096` bytes).
    pub blocks: u64,
    /// Bytes of the metadata area (inodes, xattrs, inline tails, chunk indexes).
    pub meta_bytes: u64,
    /// Bytes of regular-file data stored in the image (data blocks and inline tails, padding excluded).
    pub inline_data_bytes: u64,
    /// Distinct shared xattr entries.
    pub shared_xattrs: u64,
    /// The superblock build time (seconds, nanoseconds).
    pub build_time: (i64, u32),
    /// The root inode's nid.
    pub root_nid: u64,
}

/// Why an image could not be written. Paths are shown lossily (non-UTF-8 bytes escaped).
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("the tree has no root inode")]
    NoRoot,
    #[error("the root inode is not a directory")]
    RootNotDirectory,
    #[error("{path}: entry names inode {id}, which does not exist")]
    MissingInode { path: String, id: InodeId },
    #[error("{path}: invalid entry name {name:?}: {reason}")]
    InvalidName { path: String, name: String, reason: &'static str },
    #[error("{path}: the root directory is linked from a directory entry")]
    RootLinked { path: String },
    #[error("{path}: directory reached from more than one entry (hard-linked directory or loop)")]
    DirectoryHardLink { path: String },
    #[error("{path}: unknown or unsupported xattr name {name:?} (6.1 knows user., trusted., security., system.posix_acl_access/default)")]
    UnknownXattrPrefix { path: String, name: String },
    #[error("{path}: xattr {name:?}: {what} is {len} bytes, at most {max} fit")]
    XattrTooLong { path: String, name: String, what: &'static str, len: usize, max: usize },
    #[error("{path}: inline xattrs take {bytes} bytes, more than an inode's xattr body can hold")]
    XattrsTooLarge { path: String, bytes: u64 },
    #[error("{path}: invalid extents: {reason}")]
    BadExtents { path: String, reason: &'static str },
    #[error("{path}: permission bits {perm:#o} outside 0o7777")]
    BadPermissions { path: String, perm: u16 },
    #[error("{path}: device number {major}:{minor} does not fit the 12:20-bit encoding")]
    DeviceNumber { path: String, major: u32, minor: u32 },
    #[error("{path}: symlink target of {len} bytes (must be 1..=4095)")]
    SymlinkTarget { path: String, len: usize },
    #[error("{path}: file of {size} bytes is too large ({reason})")]
    FileTooLarge { path: String, size: u64, reason: &'static str },
    #[error("object {digest} is used with two sizes, {a} and {b}")]
    DigestSizeConflict { digest: String, a: u64, b: u64 },
    #[error("{count} distinct external objects; the device table holds at most 65535")]
    TooManyDevices { count: usize },
    #[error("volume name of {len} bytes; at most 15 fit")]
    VolumeName { len: usize },
    #[error("{what} overflows its on-disk field")]
    Overflow { what: &'static str },
    #[error("reading {len} bytes of content source {source_id} at offset {offset}")]
    Content {
        source_id: u64,
        offset: u64,
        len: usize,
        #[source]
        error: io::Error,
    },
    #[error("writing the image")]
    Io(#[source] io::Error),
    #[error("internal error: layout drift at {what}: planned offset {planned}, actual {actual}")]
    LayoutDrift { what: &'static str, planned: u64, actual: u64 },
}

/// Writes `tree` as an EROFS image to `out`, sequentially (no seeking), reading inline file data from
/// `content` in bounded pieces. Returns what was written, including the device list the image
/// references.
pub fn write_image(
    tree: &Tree,
    content: &mut dyn ContentSource,
    out: &mut dyn io::Write,
    opts: &WriteOptions,
) -> Result<WriteStats, WriteError> {
    let collected = collect::collect(tree, opts)?;
    let shared = xattrs::SharedXattrs::build(tree, &collected)?;
    let plan = plan::plan(tree, &collected, &shared)?;
    emit::emit(tree, &collected, &shared, &plan, content, out, opts)
}

/// Converts with `try_from`, mapping failure to [`WriteError::Overflow`].
pub(crate) fn fit<T, U: TryFrom<T>>(v: T, what: &'static str) -> Result<U, WriteError> {
    U::try_from(v).map_err(|_| WriteError::Overflow { what })
}

/// A human-readable path of inode `id` for error messages (found by a walk from the root, so only
/// computed when an error is reported).
pub(crate) fn path_of(tree: &Tree, id: InodeId) -> String {
    use crate::tree::Kind;
    if id == crate::tree::ROOT {
        return "/".to_string();
    }
    let mut parent: HashMap<InodeId, (InodeId, &[u8])> = HashMap::new();
    let mut queue = std::collections::VecDeque::from([crate::tree::ROOT]);
    let mut seen = std::collections::HashSet::from([crate::tree::ROOT]);
    while let Some(dir) = queue.pop_front() {
        let Some(Kind::Directory(entries)) = tree.inodes.get(dir).map(|i| &i.kind) else {
            continue;
        };
        for (name, &child) in entries {
            parent.entry(child).or_insert((dir, name.as_slice()));
            if child == id {
                let mut parts = vec![name.as_slice()];
                let mut cur = dir;
                while cur != crate::tree::ROOT {
                    let Some(&(p, n)) = parent.get(&cur) else {
                        break;
                    };
                    parts.push(n);
                    cur = p;
                }
                let mut s = String::new();
                for p in parts.iter().rev() {
                    s.push('/');
                    s.push_str(&String::from_utf8_lossy(p));
                }
                return s;
            }
            if seen.insert(child) {
                queue.push_back(child);
            }
        }
    }
    format!("<inode {id}>")
}
