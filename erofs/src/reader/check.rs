//! `check`: a file-system check of a whole image. Walks every directory from the root and validates
//! what the 6.1 kernel relies on: bounds of every data block, chunk and inline tail; dirent order
//! (strictly ascending bytes, `.` and `..` included) and name offsets; `.`/`..` targets; file types;
//! nlink against the entries found; device ids and per-device block counts; xattr bodies whose entry
//! sizes add up exactly; no directory reached twice (no loops).

use std::collections::{HashMap, HashSet, VecDeque};

use super::{corrupt, Image, InodeInfo, ReadAt, ReadError};
use crate::format::{
    file_type_of_mode, BLOCK_SIZE, FT_DIR, LAYOUT_CHUNK_BASED, LAYOUT_FLAT_INLINE, NULL_ADDR, S_IFDIR, S_IFLNK, S_IFREG,
};

/// What `check` walked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Distinct inodes reached from the root.
    pub inodes: u64,
    pub directories: u64,
    pub regular_files: u64,
    /// Regular files whose data lives on an extra device.
    pub external_files: u64,
    /// Directory entries, `.` and `..` excluded.
    pub dirents: u64,
    pub devices: u64,
}

struct Seen {
    offset: u64,
    is_dir: bool,
    nlink: u32,
    /// Entries naming this inode (`.`/`..` excluded).
    links: u64,
    subdirs: u64,
}

impl<R: ReadAt> Image<R> {
    /// Checks the whole image; the first problem found is returned as an error naming the nid and byte
    /// offset.
    pub fn check(&self) -> Result<CheckReport, ReadError> {
        let mut report = CheckReport { devices: self.devices.len() as u64, ..Default::default() };
        let mut shared_seen: HashSet<u32> = HashSet::new();
        for (i, d) in self.devices.iter().enumerate() {
            if d.tag[0] == 0 {
                return Err(ReadError::Superblock { reason: format!("device {} has an empty tag", i + 1) });
            }
        }
        let root_nid = self.root_nid();
        let root = self.inode(root_nid)?;
        if root.file_type() != S_IFDIR {
            return Err(ReadError::WrongType { nid: root_nid, expected: "directory (root)" });
        }
        self.check_inode(&root, &mut report, &mut shared_seen)?;
        let mut seen: HashMap<u64, Seen> = HashMap::new();
        seen.insert(root_nid, Seen { offset: root.offset, is_dir: true, nlink: root.nlink, links: 0, subdirs: 0 });
        let mut queue = VecDeque::from([(root, root_nid)]);
        while let Some((dir, parent)) = queue.pop_front() {
            let entries = self.read_dir(&dir)?;
            let (mut dot, mut dotdot, mut subdirs) = (false, false, 0u64);
            for (k, e) in entries.iter().enumerate() {
                let at = e.pos;
                if k > 0 && entries[k - 1].name >= e.name {
                    return Err(corrupt(dir.nid, at, "directory entries not strictly sorted by bytes"));
                }
                if e.name.contains(&b'/') || e.name.contains(&0) {
                    return Err(corrupt(dir.nid, at, "name contains `/` or NUL"));
                }
                if e.name == b"." || e.name == b".." {
                    let (want, which) = if e.name == b"." { (dir.nid, &mut dot) } else { (parent, &mut dotdot) };
                    if e.nid != want {
                        return Err(corrupt(
                            dir.nid,
                            at,
                            format!("`{}` names nid {} instead of {want}", String::from_utf8_lossy(&e.name), e.nid),
                        ));
                    }
                    if e.file_type != FT_DIR {
                        return Err(corrupt(dir.nid, at, "`.`/`..` without the directory file type"));
                    }
                    *which = true;
                    continue;
                }
                report.dirents += 1;
                if let Some(s) = seen.get_mut(&e.nid) {
                    if s.is_dir {
                        return Err(corrupt(
                            dir.nid,
                            at,
                            format!("directory nid {} reached twice (hard link or loop)", e.nid),
                        ));
                    }
                    s.links += 1;
                    let ino = self.inode(e.nid)?;
                    check_file_type(&dir, at, e.file_type, &ino)?;
                    continue;
                }
                let ino = self.inode(e.nid)?;
                check_file_type(&dir, at, e.file_type, &ino)?;
                self.check_inode(&ino, &mut report, &mut shared_seen)?;
                let is_dir = ino.file_type() == S_IFDIR;
                seen.insert(e.nid, Seen { offset: ino.offset, is_dir, nlink: ino.nlink, links: 1, subdirs: 0 });
                if is_dir {
                    subdirs += 1;
                    queue.push_back((ino, dir.nid));
                }
            }
            if !dot || !dotdot {
                return Err(corrupt(dir.nid, dir.offset, "directory without `.` or `..`"));
            }
            if let Some(s) = seen.get_mut(&dir.nid) {
                s.subdirs = subdirs;
            }
        }
        for (&nid, s) in &seen {
            let want = if s.is_dir { 2 + s.subdirs } else { s.links };
            if u64::from(s.nlink) != want {
                return Err(corrupt(
                    nid,
                    s.offset,
                    format!("nlink {} but {want} expected from the directory entries", s.nlink),
                ));
            }
        }
        report.inodes = seen.len() as u64;
        Ok(report)
    }

    fn check_inode(
        &self,
        ino: &InodeInfo,
        report: &mut CheckReport,
        shared_seen: &mut HashSet<u32>,
    ) -> Result<(), ReadError> {
        let nid = ino.nid;
        self.validate_xattrs(ino, &mut |id| shared_seen.insert(id))?;
        let ty = ino.file_type();
        match ty {
            S_IFDIR => report.directories += 1,
            S_IFREG => report.regular_files += 1,
            S_IFLNK if ino.size == 0 || ino.size > 4095 => {
                return Err(corrupt(nid, ino.offset, format!("symlink target of {} bytes", ino.size)));
            }
            _ => {}
        }
        if !matches!(ty, S_IFDIR | S_IFREG | S_IFLNK) {
            return Ok(());
        }
        if ty == S_IFDIR && ino.size == 0 {
            return Err(corrupt(nid, ino.offset, "empty directory data (no `.` and `..`)"));
        }
        let blocks = u64::from(self.sb.blocks.get());
        if ino.layout == LAYOUT_CHUNK_BASED {
            let bits = ino.chunk_bits();
            let mut external = false;
            self.for_each_chunk(ino, |i, device, blkaddr, at| {
                if blkaddr == NULL_ADDR {
                    return Ok(());
                }
                let start = i << bits;
                let len_blocks = (1u64 << bits).min((ino.size - start).next_multiple_of(BLOCK_SIZE)) / BLOCK_SIZE;
                let end = u64::from(blkaddr) + len_blocks;
                let limit = if device == 0 {
                    blocks
                } else {
                    external = true;
                    let d = self.devices.get(usize::from(device) - 1).ok_or_else(|| {
                        corrupt(nid, at, format!("device id {device} beyond {} devices", self.devices.len()))
                    })?;
                    u64::from(d.blocks)
                };
                if end > limit {
                    return Err(corrupt(
                        nid,
                        at,
                        format!("chunk {i} (blocks {blkaddr}..{end}) beyond device {device}'s {limit} blocks"),
                    ));
                }
                Ok(())
            })?;
            if external {
                report.external_files += 1;
            }
        } else {
            let nblocks = ino.size.div_ceil(BLOCK_SIZE);
            let inline = ino.layout == LAYOUT_FLAT_INLINE;
            let flat = nblocks - u64::from(inline && nblocks > 0);
            if flat > 0 && u64::from(ino.i_u) + flat > blocks {
                return Err(corrupt(
                    nid,
                    ino.offset,
                    format!("data blocks {}..{} beyond the image's {blocks}", ino.i_u, u64::from(ino.i_u) + flat),
                ));
            }
            if inline && ino.size > 0 {
                let tail = ino.size - flat * BLOCK_SIZE;
                let start = ino.body_end();
                if start % BLOCK_SIZE + tail > BLOCK_SIZE {
                    return Err(corrupt(nid, start, "inline tail crosses a block boundary"));
                }
                if start + tail > blocks * BLOCK_SIZE {
                    return Err(corrupt(nid, start, "inline tail beyond the image end"));
                }
            }
        }
        Ok(())
    }
}

fn check_file_type(dir: &InodeInfo, at: u64, file_type: u8, ino: &InodeInfo) -> Result<(), ReadError> {
    let want = file_type_of_mode(ino.mode).unwrap_or(0);
    if file_type != want {
        return Err(corrupt(dir.nid, at, format!("dirent file type {file_type} but nid {} has type {want}", ino.nid)));
    }
    Ok(())
}
