//! Rebuilding a [`Tree`] from an image, and serving its in-image file bytes as a [`ContentSource`].

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;

use zerocopy::FromBytes;

use super::{corrupt, Image, InodeInfo, ReadAt, ReadError};
use crate::format::{
    chunk_format_of, decode_rdev, ChunkIndex, BLOCK_SIZE, CHUNK_FORMAT_INDEXES, LAYOUT_CHUNK_BASED, NULL_ADDR, S_IFBLK,
    S_IFCHR, S_IFDIR, S_IFIFO, S_IFLNK, S_IFREG, S_IFSOCK,
};
use crate::tree::{Extent, FileData, Inode, InodeId, Kind, Metadata, Tree};
use crate::writer::ContentSource;

/// Longest symlink target accepted (PATH_MAX - 1).
const MAX_SYMLINK: u64 = 4095;

/// Decoded xattr bytes `read_tree` accepts in all: shared entries are stored once but copied into every
/// inode naming them, so a small damaged image could otherwise expand into gigabytes.
pub const MAX_TREE_XATTR_BYTES: u64 = 512 << 20;

impl<R: ReadAt> Image<R> {
    /// Rebuilds the tree: inode 0 is the root, the others in breadth-first order. Inline files get
    /// `source` = their nid (see [`Image::read_file_at`]); external files get the digest of their
    /// device's tag. Empty regular files come back as `Inline` with no extents.
    pub fn read_tree(&self) -> Result<Tree, ReadError> {
        let root_nid = self.root_nid();
        let root = self.inode(root_nid)?;
        if root.file_type() != S_IFDIR {
            return Err(ReadError::WrongType { nid: root_nid, expected: "directory (root)" });
        }
        let mut budget = MAX_TREE_XATTR_BYTES;
        let mut tree = Tree { inodes: vec![self.tree_inode(&root, &mut budget)?] };
        let mut id_of: HashMap<u64, InodeId> = HashMap::from([(root_nid, 0)]);
        let mut queue = VecDeque::from([(root, 0usize)]);
        while let Some((dir, dir_id)) = queue.pop_front() {
            let mut map = BTreeMap::new();
            for e in self.read_dir(&dir)? {
                if e.name == b"." || e.name == b".." {
                    continue;
                }
                let child = match id_of.get(&e.nid) {
                    Some(&cid) => {
                        if matches!(tree.inodes[cid].kind, Kind::Directory(_)) {
                            return Err(corrupt(
                                dir.nid,
                                e.pos,
                                format!("directory nid {} linked twice (loop?)", e.nid),
                            ));
                        }
                        cid
                    }
                    None => {
                        let ino = self.inode(e.nid)?;
                        let cid = tree.push(self.tree_inode(&ino, &mut budget)?);
                        id_of.insert(e.nid, cid);
                        if ino.file_type() == S_IFDIR {
                            queue.push_back((ino, cid));
                        }
                        cid
                    }
                };
                if map.insert(e.name, child).is_some() {
                    return Err(corrupt(dir.nid, e.pos, "duplicate name"));
                }
            }
            tree.inodes[dir_id].kind = Kind::Directory(map);
        }
        Ok(tree)
    }

    /// The tree form of one inode (directories come back empty).
    fn tree_inode(&self, ino: &InodeInfo, xattr_budget: &mut u64) -> Result<Inode, ReadError> {
        let nid = ino.nid;
        let kind = match ino.file_type() {
            S_IFDIR => Kind::Directory(BTreeMap::new()),
            S_IFREG => Kind::Regular(self.file_data(ino)?),
            S_IFLNK => {
                if ino.size > MAX_SYMLINK {
                    return Err(corrupt(nid, ino.offset, format!("symlink target of {} bytes", ino.size)));
                }
                let mut target = vec![0u8; usize::try_from(ino.size).unwrap_or(0)];
                self.read_data(ino, 0, &mut target)?;
                Kind::Symlink(target)
            }
            S_IFCHR | S_IFBLK => {
                let (major, minor) = decode_rdev(ino.i_u);
                if ino.file_type() == S_IFCHR {
                    Kind::CharDevice { major, minor }
                } else {
                    Kind::BlockDevice { major, minor }
                }
            }
            S_IFIFO => Kind::Fifo,
            S_IFSOCK => Kind::Socket,
            _ => return Err(corrupt(nid, ino.offset, format!("bogus i_mode {:#o}", ino.mode))),
        };
        let meta = Metadata {
            perm: ino.mode & 0o7777,
            uid: ino.uid,
            gid: ino.gid,
            mtime: ino.mtime,
            mtime_nsec: ino.mtime_nsec,
        };
        let mut xattrs = BTreeMap::new();
        for (name, value) in self.xattrs(ino)? {
            *xattr_budget = xattr_budget.checked_sub((name.len() + value.len()) as u64).ok_or_else(|| {
                ReadError::Unsupported { nid, what: format!("xattrs beyond {MAX_TREE_XATTR_BYTES} bytes in all") }
            })?;
            if xattrs.insert(name, value).is_some() {
                return Err(corrupt(nid, ino.offset, "duplicate xattr name"));
            }
        }
        Ok(Inode { kind, meta, xattrs })
    }

    /// Where a regular file's bytes live.
    pub fn file_data(&self, ino: &InodeInfo) -> Result<FileData, ReadError> {
        let (nid, size) = (ino.nid, ino.size);
        if ino.layout != LAYOUT_CHUNK_BASED {
            let extents = if size > 0 { vec![Extent { offset: 0, len: size }] } else { Vec::new() };
            return Ok(FileData::Inline { size, extents, source: nid });
        }
        let bits = ino.chunk_bits();
        let per_chunk = 1u64 << (bits - crate::format::BLOCK_BITS);
        let mut extents: Vec<Extent> = Vec::new();
        let mut external: Option<u16> = None;
        let mut local = false;
        self.for_each_chunk(ino, |i, device, blkaddr, at| {
            if blkaddr == NULL_ADDR {
                local = true;
            } else if device == 0 {
                local = true;
                let start = i << bits;
                let end = (start + (1u64 << bits)).min(size);
                match extents.last_mut() {
                    Some(last) if last.offset + last.len == start => last.len = end - last.offset,
                    _ => extents.push(Extent { offset: start, len: end - start }),
                }
            } else {
                if external.is_some_and(|d| d != device) || u64::from(blkaddr) != i * per_chunk {
                    return Err(ReadError::Unsupported { nid, what: format!("chunk layout at byte offset {at}") });
                }
                external = Some(device);
            }
            Ok(())
        })?;
        match external {
            None => Ok(FileData::Inline { size, extents, source: nid }),
            Some(_) if local => Err(ReadError::Unsupported { nid, what: "file mixing image and device chunks".into() }),
            Some(device) => {
                let dev = self.devices.get(usize::from(device) - 1).ok_or_else(|| {
                    corrupt(nid, ino.offset, format!("device id {device} beyond {} devices", self.devices.len()))
                })?;
                let digest = dev.digest.ok_or_else(|| ReadError::Unsupported {
                    nid,
                    what: format!("device {device} tag is not a sha256 in hex"),
                })?;
                Ok(FileData::External { size, digest })
            }
        }
    }

    /// Calls `f(chunk number, device id (masked), blkaddr, byte offset of the index)` for every chunk of a
    /// chunk-based inode, reading the index array a block at a time.
    pub(crate) fn for_each_chunk(
        &self,
        ino: &InodeInfo,
        mut f: impl FnMut(u64, u16, u32, u64) -> Result<(), ReadError>,
    ) -> Result<(), ReadError> {
        let nid = ino.nid;
        let bits = ino.chunk_bits();
        let count = ino.size.div_ceil(1u64 << bits);
        let indexes = chunk_format_of(ino.i_u) & CHUNK_FORMAT_INDEXES != 0;
        let unit: u64 = if indexes { 8 } else { 4 };
        let start = ino.body_end().next_multiple_of(unit);
        let total = count.checked_mul(unit).ok_or_else(|| corrupt(nid, start, "chunk index array size"))?;
        if start.checked_add(total).exceeds(self.limit) {
            return Err(corrupt(nid, start, format!("{count} chunk indexes run past the image end")));
        }
        let mut buf = vec![0u8; crate::format::BLOCK_BYTES];
        let mut i = 0u64;
        while i < count {
            let at = start + i * unit;
            let n = usize::try_from(((BLOCK_SIZE - at % BLOCK_SIZE) / unit).min(count - i)).unwrap_or(1);
            let width = if indexes { 8 } else { 4 };
            let bytes = &mut buf[..n * width];
            self.read_meta(nid, bytes, at)?;
            for (k, raw) in bytes.chunks_exact(width).enumerate() {
                let (device, blkaddr) = if indexes {
                    let ci = ChunkIndex::read_from_bytes(raw).map_err(|_| corrupt(nid, at, "short chunk index"))?;
                    (ci.device_id.get() & self.device_id_mask, ci.blkaddr.get())
                } else {
                    (0, u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]))
                };
                f(i + k as u64, device, blkaddr, at + k as u64 * unit)?;
            }
            i += n as u64;
        }
        Ok(())
    }
}

use super::ExceedsLimit;

impl<R: ReadAt> ContentSource for Image<R> {
    /// `source` is a nid, as set by [`Image::read_tree`].
    fn read_at(&mut self, source: u64, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let n = self.read_file_at(source, offset, buf).map_err(io::Error::other)?;
        if n != buf.len() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }
}
