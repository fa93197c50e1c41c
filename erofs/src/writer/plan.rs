//! The layout pass: decides every inode's form (compact/extended), data layout, byte offset and data
//! blocks before a single byte is written.

use super::collect::Collected;
use super::xattrs::SharedXattrs;
use super::{data, dirs, WriteError};
use crate::format::{
    DEVT_SLOT_SIZE, ISLOT_SIZE, LAYOUT_CHUNK_BASED, LAYOUT_FLAT_INLINE, LAYOUT_FLAT_PLAIN, SUPER_OFFSET,
};
use crate::tree::{FileData, Kind, Tree};

const BLOCK: u64 = crate::format::BLOCK_SIZE;

/// Where a regular file's (or directory's, or symlink's) bytes go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Data {
    /// No data (device nodes, fifos, sockets, empty files).
    None,
    /// Flat: blocks at `blkaddr`, maybe an inline tail.
    Flat,
    /// Chunk-based on device 0 with holes.
    Sparse { bits: u8 },
    /// Chunk-based on an extra device.
    External { bits: u8, device: u16 },
}

#[derive(Clone, Debug)]
pub(crate) struct InodePlan {
    /// Byte offset of the inode in the image.
    pub pos: u64,
    pub extended: bool,
    pub layout: u16,
    pub size: u64,
    /// Inline tail bytes (FLAT_INLINE).
    pub tail: u32,
    pub data: Data,
    /// First data block in the image, 0 when there are none.
    pub blkaddr: u32,
    pub data_blocks: u64,
    /// Bytes from `pos` to the end of the inode's metadata (inode, xattrs, tail or chunk indexes).
    pub meta_len: u64,
    pub xattr_icount: u16,
}

#[derive(Debug)]
pub(crate) struct Plan {
    pub inodes: Vec<InodePlan>,
    pub devt_off: u64,
    pub xattr_start: u64,
    pub xattr_blkaddr: u32,
    /// Shared xattr id of the first byte of the shared area.
    pub shared_base_id: u64,
    pub meta_blkaddr: u32,
    pub meta_end: u64,
    pub data_start: u64,
    pub total_blocks: u32,
}

impl Plan {
    pub fn nid(&self, index: u32) -> u64 {
        (self.inodes[index as usize].pos - u64::from(self.meta_blkaddr) * BLOCK) / ISLOT_SIZE
    }
}

fn round_up(x: u64, to: u64) -> Result<u64, WriteError> {
    x.checked_next_multiple_of(to).ok_or(WriteError::Overflow { what: "image offset" })
}

pub(crate) fn plan(tree: &Tree, c: &Collected, shared: &SharedXattrs<'_>) -> Result<Plan, WriteError> {
    let devt_off = SUPER_OFFSET + 128;
    let xattr_start = devt_off + DEVT_SLOT_SIZE * c.devices.len() as u64;
    let xattr_blkaddr: u32 =
        if shared.entries.is_empty() { 0 } else { super::fit(xattr_start / BLOCK, "xattr_blkaddr")? };
    let shared_base_id = (xattr_start - u64::from(xattr_blkaddr) * BLOCK) / 4;
    let meta_start = round_up(xattr_start + shared.area_len, ISLOT_SIZE)?;
    // The block holding the slot before the root, so the root's nid is never 0 (st_ino 0 confuses
    // userspace) and stays far below the 16-bit limit.
    let meta_blkaddr: u32 = super::fit((meta_start - ISLOT_SIZE) / BLOCK, "meta_blkaddr")?;

    let mut inodes = Vec::with_capacity(c.ids.len());
    let mut pos = meta_start;
    for (index, &id) in c.ids.iter().enumerate() {
        let inode = &tree.inodes[id];
        let x = shared.split(tree, id, inode)?;
        let (size, data) = match &inode.kind {
            Kind::Directory(_) => (dirs::pack(tree, c, super::fit(index, "inode index")?).size, Data::Flat),
            Kind::Symlink(t) => (t.len() as u64, Data::Flat),
            Kind::Regular(FileData::Inline { size: 0, .. }) | Kind::Regular(FileData::External { size: 0, .. }) => {
                (0, Data::None)
            }
            Kind::Regular(FileData::Inline { size, extents, .. }) => {
                if data::is_dense(*size, extents) {
                    (*size, Data::Flat)
                } else {
                    (*size, Data::Sparse { bits: data::choose_sparse_chunkbits(*size, extents) })
                }
            }
            Kind::Regular(FileData::External { size, digest }) => {
                let bits = u8::try_from(data::ceil_log2(*size))
                    .unwrap_or(data::MAX_CHUNK_BITS)
                    .clamp(crate::format::BLOCK_BITS, data::MAX_CHUNK_BITS);
                (*size, Data::External { bits, device: c.device_of[digest] })
            }
            Kind::CharDevice { .. } | Kind::BlockDevice { .. } | Kind::Fifo | Kind::Socket => (0, Data::None),
        };
        let m = &inode.meta;
        let extended = m.uid > 0xffff
            || m.gid > 0xffff
            || size > u64::from(u32::MAX)
            || c.nlink[index] > 0xffff
            || (m.mtime, m.mtime_nsec) != c.build_time;
        let isize: u64 = if extended { 64 } else { 32 };
        let head = isize + u64::from(x.ibody);
        let mut p = InodePlan {
            pos,
            extended,
            layout: LAYOUT_FLAT_PLAIN,
            size,
            tail: 0,
            data,
            blkaddr: 0,
            data_blocks: 0,
            meta_len: head,
            xattr_icount: x.icount,
        };
        match data {
            Data::None => {}
            Data::Sparse { bits } | Data::External { bits, .. } => {
                p.layout = LAYOUT_CHUNK_BASED;
                let count = data::chunk_count(size, bits);
                p.meta_len = count
                    .checked_mul(8)
                    .and_then(|b| b.checked_add(head.next_multiple_of(8)))
                    .ok_or(WriteError::Overflow { what: "chunk index bytes" })?;
                if let (Data::Sparse { bits }, Kind::Regular(FileData::Inline { extents, .. })) = (data, &inode.kind) {
                    p.data_blocks = data::sparse_blocks(size, extents, bits)?;
                }
            }
            Data::Flat => {
                let nblocks = size.div_ceil(BLOCK);
                let tail = size % BLOCK;
                p.data_blocks = nblocks;
                if tail != 0 {
                    // 6.1 reads a symlink as a fast symlink only when its target sits in the block
                    // holding the inode's last byte (fs/erofs/inode.c, erofs_fill_symlink); other
                    // inline tails only must not cross a block.
                    let fits_here = if matches!(inode.kind, Kind::Symlink(_)) {
                        (pos + isize - 1) % BLOCK + 1 + u64::from(x.ibody) + tail <= BLOCK
                    } else {
                        (pos + head) % BLOCK + tail <= BLOCK
                    };
                    let next = round_up(pos, BLOCK)?;
                    let fits_next = head % BLOCK + tail <= BLOCK && (next - pos) + tail < BLOCK;
                    if fits_here || fits_next {
                        if !fits_here {
                            p.pos = next;
                        }
                        p.layout = LAYOUT_FLAT_INLINE;
                        p.tail = super::fit(tail, "inline tail")?;
                        p.meta_len = head + tail;
                        p.data_blocks = nblocks - 1;
                    }
                }
            }
        }
        pos = round_up(p.pos + p.meta_len, ISLOT_SIZE)?;
        inodes.push(p);
    }
    let meta_end = pos;
    let data_start = round_up(meta_end, BLOCK)? / BLOCK;
    let mut next = data_start;
    for p in &mut inodes {
        if p.data_blocks > 0 {
            p.blkaddr = super::fit(next, "data block address")?;
            next = next.checked_add(p.data_blocks).ok_or(WriteError::Overflow { what: "image blocks" })?;
        }
    }
    Ok(Plan {
        inodes,
        devt_off,
        xattr_start,
        xattr_blkaddr,
        shared_base_id,
        meta_blkaddr,
        meta_end,
        data_start,
        total_blocks: super::fit(next, "image blocks")?,
    })
}
