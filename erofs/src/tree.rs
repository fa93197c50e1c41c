//! The filesystem model shared by the writer, the reader and every producer of trees (directory walker,
//! OCI layer merge): an arena of inodes, where hard links are several directory entries naming the same
//! [`InodeId`], directories keep their entries sorted by bytes, and timestamps keep nanoseconds.

use std::collections::BTreeMap;

/// Index of an inode in [`Tree::inodes`].
pub type InodeId = usize;

/// sha256 of a file's content.
pub type Digest = [u8; 32];

/// The root directory is always the first inode.
pub const ROOT: InodeId = 0;

/// Ownership, permissions and modification time.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct Metadata {
    /// Permission bits including setuid, setgid and sticky (`mode & 0o7777`); the file type comes from
    /// [`Kind`].
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    /// Seconds since the epoch; negative before 1970.
    pub mtime: i64,
    pub mtime_nsec: u32,
}

/// A range of a regular file that holds data; bytes outside every extent of a file are a hole.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
}

/// Where a regular file's bytes live.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum FileData {
    /// Stored inside the image. `extents` are sorted, non-overlapping and within `size`; the writer asks
    /// its [`crate::writer::ContentSource`] for their bytes by `source`, a handle chosen by whoever built
    /// the tree (a reader sets it to the inode's nid).
    Inline { size: u64, extents: Vec<Extent>, source: u64 },
    /// Stored outside the image as an object named by the sha256 of its `size` bytes, reached through a
    /// device-table slot whose tag is that digest in hex.
    External { size: u64, digest: Digest },
}

impl FileData {
    pub fn size(&self) -> u64 {
        match self {
            FileData::Inline { size, .. } | FileData::External { size, .. } => *size,
        }
    }
}

/// The type of an inode and its type-specific payload.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Entries by name (never `.` or `..`: the writer adds those), sorted by bytes.
    Directory(BTreeMap<Vec<u8>, InodeId>),
    Regular(FileData),
    /// The link target, without a trailing NUL.
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
    Socket,
}

/// One inode: what it is, who owns it, and its extended attributes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Inode {
    pub kind: Kind,
    pub meta: Metadata,
    /// Full xattr names (`security.capability`, `trusted.overlay.opaque`, `user.x`,
    /// `system.posix_acl_access`) to raw values.
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Inode {
    pub fn new(kind: Kind, meta: Metadata) -> Self {
        Inode { kind, meta, xattrs: BTreeMap::new() }
    }
}

/// A whole filesystem tree. `inodes[ROOT]` is the root directory. Inodes not reachable from the root are
/// ignored by the writer.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Tree {
    pub inodes: Vec<Inode>,
}

impl Tree {
    /// A tree holding only an empty root directory with the given metadata.
    pub fn new(root_meta: Metadata) -> Self {
        Tree { inodes: vec![Inode::new(Kind::Directory(BTreeMap::new()), root_meta)] }
    }

    /// Adds an inode to the arena (not linked anywhere yet) and returns its id.
    pub fn push(&mut self, inode: Inode) -> InodeId {
        self.inodes.push(inode);
        self.inodes.len() - 1
    }

    /// The entries of directory `dir`, or `None` when `dir` is not a directory.
    pub fn entries(&self, dir: InodeId) -> Option<&BTreeMap<Vec<u8>, InodeId>> {
        match &self.inodes.get(dir)?.kind {
            Kind::Directory(e) => Some(e),
            _ => None,
        }
    }

    /// Mutable entries of directory `dir`, or `None` when `dir` is not a directory.
    pub fn entries_mut(&mut self, dir: InodeId) -> Option<&mut BTreeMap<Vec<u8>, InodeId>> {
        match &mut self.inodes.get_mut(dir)?.kind {
            Kind::Directory(e) => Some(e),
            _ => None,
        }
    }
}
