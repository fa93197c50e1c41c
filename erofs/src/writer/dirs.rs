//! Directory contents (docs/kernel.md C.5): every entry including `.` and `..`, sorted by bytes, packed
//! greedily into 4 KiB blocks so that no dirent or name crosses a block.

use std::ops::Range;

use zerocopy::IntoBytes;

use super::collect::Collected;
use crate::format::{Dirent, BLOCK_SIZE, FT_BLKDEV, FT_CHRDEV, FT_DIR, FT_FIFO, FT_REG_FILE, FT_SOCK, FT_SYMLINK};
use crate::tree::{Kind, Tree};

const DIRENT_SIZE: usize = 12;
const BLOCK: usize = crate::format::BLOCK_BYTES;

/// One directory entry: name and the plan index of its inode.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Entry<'t> {
    pub name: &'t [u8],
    pub index: u32,
}

/// The packed directory: its entries, the entry range of each block, and the directory size.
#[derive(Debug)]
pub(crate) struct Packed<'t> {
    pub entries: Vec<Entry<'t>>,
    pub blocks: Vec<Range<usize>>,
    pub size: u64,
}

/// The dirent file type of an inode kind.
pub(crate) fn file_type(kind: &Kind) -> u8 {
    match kind {
        Kind::Directory(_) => FT_DIR,
        Kind::Regular(_) => FT_REG_FILE,
        Kind::Symlink(_) => FT_SYMLINK,
        Kind::CharDevice { .. } => FT_CHRDEV,
        Kind::BlockDevice { .. } => FT_BLKDEV,
        Kind::Fifo => FT_FIFO,
        Kind::Socket => FT_SOCK,
    }
}

/// Entries of directory `dir_index` (a plan index), `.` and `..` merged in byte order, packed.
pub(crate) fn pack<'t>(tree: &'t Tree, c: &Collected, dir_index: u32) -> Packed<'t> {
    let id = c.ids[dir_index as usize];
    let mut entries: Vec<Entry<'t>> = Vec::new();
    if let Some(map) = tree.entries(id) {
        entries.reserve(map.len() + 2);
        entries.extend(map.iter().map(|(name, &child)| Entry { name: name.as_slice(), index: c.index_of[child] }));
    }
    for (dot, index) in [(&b"."[..], dir_index), (&b".."[..], c.parent[dir_index as usize])] {
        let at = entries.partition_point(|e| e.name < dot);
        entries.insert(at, Entry { name: dot, index });
    }
    let mut blocks = Vec::new();
    let (mut start, mut used) = (0usize, 0usize);
    for (i, e) in entries.iter().enumerate() {
        let need = DIRENT_SIZE + e.name.len();
        if used + need > BLOCK {
            blocks.push(start..i);
            start = i;
            used = 0;
        }
        used += need;
    }
    blocks.push(start..entries.len());
    let size = (blocks.len() as u64 - 1) * BLOCK_SIZE + used as u64;
    Packed { entries, blocks, size }
}

/// Encodes one directory block; `nid_of` maps a plan index to its nid. Returns the used bytes (a
/// caller pads non-last blocks to the block size).
pub(crate) fn encode_block(
    tree: &Tree,
    c: &Collected,
    entries: &[Entry<'_>],
    nid_of: &dyn Fn(u32) -> u64,
    out: &mut Vec<u8>,
) {
    let start = out.len();
    let mut nameoff = entries.len() * DIRENT_SIZE;
    for e in entries {
        let kind = &tree.inodes[c.ids[e.index as usize]].kind;
        let d = Dirent {
            nid: nid_of(e.index).into(),
            // < 4096 by construction of `pack`
            nameoff: u16::try_from(nameoff).unwrap_or(u16::MAX).into(),
            file_type: file_type(kind),
            reserved: 0,
        };
        out.extend_from_slice(d.as_bytes());
        nameoff += e.name.len();
    }
    for e in entries {
        out.extend_from_slice(e.name);
    }
    debug_assert!(out.len() - start <= BLOCK);
}
