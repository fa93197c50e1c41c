//! First step of the writer: walk the tree from the root (breadth-first, entries in byte order),
//! validate every reachable inode, count links, pick the build time and number the external objects.

use std::collections::{HashMap, VecDeque};

use super::{data, path_of, WriteError, WriteOptions};
use crate::format::{encode_rdev, split_xattr_name, NAME_LEN};
use crate::tree::{Digest, FileData, Inode, InodeId, Kind, Tree, ROOT};

/// Plan indexes are u32: the order in which inodes are laid out (root = 0).
pub(crate) const NONE: u32 = u32::MAX;

/// Longest symlink target the kernel follows without truncation (PATH_MAX - 1).
pub(crate) const MAX_SYMLINK: usize = 4095;

/// The reachable inodes in layout order, with link counts and external objects.
#[derive(Debug)]
pub(crate) struct Collected {
    /// Plan index -> inode id.
    pub ids: Vec<InodeId>,
    /// Inode id -> plan index, or [`NONE`] if unreachable.
    pub index_of: Vec<u32>,
    /// Plan index -> plan index of the parent directory (directories only; the root is its own parent).
    pub parent: Vec<u32>,
    /// Plan index -> link count as stored on disk.
    pub nlink: Vec<u32>,
    pub build_time: (i64, u32),
    /// Distinct external objects in device-id order (device id = position + 1).
    pub devices: Vec<(Digest, u64)>,
    pub device_of: HashMap<Digest, u16>,
}

pub(crate) fn collect(tree: &Tree, opts: &WriteOptions) -> Result<Collected, WriteError> {
    let root = tree.inodes.get(ROOT).ok_or(WriteError::NoRoot)?;
    if !matches!(root.kind, Kind::Directory(_)) {
        return Err(WriteError::RootNotDirectory);
    }
    if opts.volume_name.len() > 15 {
        return Err(WriteError::VolumeName { len: opts.volume_name.len() });
    }
    let mut c = Collected {
        ids: vec![ROOT],
        index_of: vec![NONE; tree.inodes.len()],
        parent: vec![0],
        nlink: vec![2],
        build_time: (0, 0),
        devices: Vec::new(),
        device_of: HashMap::new(),
    };
    c.index_of[ROOT] = 0;
    let mut queue = VecDeque::from([ROOT]);
    while let Some(dir) = queue.pop_front() {
        let dir_index = c.index_of[dir];
        let Some(entries) = tree.entries(dir) else {
            continue;
        };
        let mut subdirs: u32 = 0;
        for (name, &child) in entries {
            check_name(tree, dir, name)?;
            let inode = tree.inodes.get(child).ok_or_else(|| WriteError::MissingInode {
                path: format!("{}/{}", path_of(tree, dir).trim_end_matches('/'), String::from_utf8_lossy(name)),
                id: child,
            })?;
            if child == ROOT {
                return Err(WriteError::RootLinked { path: path_of(tree, dir) });
            }
            let is_dir = matches!(inode.kind, Kind::Directory(_));
            if is_dir {
                subdirs = subdirs.checked_add(1).ok_or(WriteError::Overflow { what: "directory nlink" })?;
            }
            let existing = c.index_of[child];
            if existing != NONE {
                if is_dir {
                    return Err(WriteError::DirectoryHardLink { path: path_of(tree, child) });
                }
                let n = &mut c.nlink[existing as usize];
                *n = n.checked_add(1).ok_or(WriteError::Overflow { what: "nlink" })?;
                continue;
            }
            let index: u32 = super::fit(c.ids.len(), "inode count")?;
            if index == NONE {
                return Err(WriteError::Overflow { what: "inode count" });
            }
            c.index_of[child] = index;
            c.ids.push(child);
            c.parent.push(if is_dir { dir_index } else { NONE });
            c.nlink.push(if is_dir { 2 } else { 1 });
            if is_dir {
                queue.push_back(child);
            }
        }
        c.nlink[dir_index as usize] = subdirs.checked_add(2).ok_or(WriteError::Overflow { what: "directory nlink" })?;
    }
    let mut times: HashMap<(i64, u32), u64> = HashMap::new();
    for &id in &c.ids {
        let inode = &tree.inodes[id];
        validate_inode(tree, id, inode)?;
        *times.entry((inode.meta.mtime, inode.meta.mtime_nsec)).or_default() += 1;
        if let Kind::Regular(FileData::External { size, digest }) = &inode.kind {
            if *size == 0 {
                continue;
            }
            if let Some(&dev) = c.device_of.get(digest) {
                let known = c.devices[usize::from(dev) - 1].1;
                if known != *size {
                    return Err(WriteError::DigestSizeConflict { digest: hex::encode(digest), a: known, b: *size });
                }
            } else {
                let id: u16 = u16::try_from(c.devices.len() + 1)
                    .map_err(|_| WriteError::TooManyDevices { count: c.devices.len() + 1 })?;
                c.device_of.insert(*digest, id);
                c.devices.push((*digest, *size));
            }
        }
    }
    // The most common mtime; ties go to the smallest, so the choice is deterministic.
    c.build_time = match opts.build_time {
        Some(t) => t,
        None => times.into_iter().max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0))).map(|(t, _)| t).unwrap_or((0, 0)),
    };
    Ok(c)
}

fn check_name(tree: &Tree, dir: InodeId, name: &[u8]) -> Result<(), WriteError> {
    let reason = if name.is_empty() {
        "empty"
    } else if name.len() > NAME_LEN {
        "longer than 255 bytes"
    } else if name == b"." || name == b".." {
        "`.` and `..` are added by the writer"
    } else if name.contains(&b'/') {
        "contains `/`"
    } else if name.contains(&0) {
        "contains NUL"
    } else {
        return Ok(());
    };
    Err(WriteError::InvalidName { path: path_of(tree, dir), name: String::from_utf8_lossy(name).into_owned(), reason })
}

fn validate_inode(tree: &Tree, id: InodeId, inode: &Inode) -> Result<(), WriteError> {
    if inode.meta.perm > 0o7777 {
        return Err(WriteError::BadPermissions { path: path_of(tree, id), perm: inode.meta.perm });
    }
    match &inode.kind {
        Kind::Symlink(target) => {
            if target.is_empty() || target.len() > MAX_SYMLINK {
                return Err(WriteError::SymlinkTarget { path: path_of(tree, id), len: target.len() });
            }
        }
        Kind::CharDevice { major, minor } | Kind::BlockDevice { major, minor } => {
            if encode_rdev(*major, *minor).is_none() {
                return Err(WriteError::DeviceNumber { path: path_of(tree, id), major: *major, minor: *minor });
            }
        }
        Kind::Regular(FileData::Inline { size, extents, .. }) => {
            data::check_extents(*size, extents)
                .map_err(|reason| WriteError::BadExtents { path: path_of(tree, id), reason })?;
            if i64::try_from(*size).is_err() {
                return Err(WriteError::FileTooLarge { path: path_of(tree, id), size: *size, reason: "above 2^63-1" });
            }
        }
        Kind::Regular(FileData::External { size, .. }) => {
            if size.div_ceil(crate::format::BLOCK_SIZE) > u64::from(u32::MAX) {
                return Err(WriteError::FileTooLarge {
                    path: path_of(tree, id),
                    size: *size,
                    reason: "an object holds at most 2^32 blocks",
                });
            }
        }
        Kind::Directory(_) | Kind::Fifo | Kind::Socket => {}
    }
    for (name, value) in &inode.xattrs {
        let lossy = || String::from_utf8_lossy(name).into_owned();
        let Some((_, suffix)) = split_xattr_name(name) else {
            return Err(WriteError::UnknownXattrPrefix { path: path_of(tree, id), name: lossy() });
        };
        if suffix.len() > 255 {
            return Err(WriteError::XattrTooLong {
                path: path_of(tree, id),
                name: lossy(),
                what: "name suffix",
                len: suffix.len(),
                max: 255,
            });
        }
        if value.len() > usize::from(u16::MAX) {
            return Err(WriteError::XattrTooLong {
                path: path_of(tree, id),
                name: lossy(),
                what: "value",
                len: value.len(),
                max: 65535,
            });
        }
    }
    Ok(())
}
