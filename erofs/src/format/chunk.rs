//! Chunk indexes of chunk-based inodes (`struct erofs_inode_chunk_index`, 8 bytes; docs/kernel.md C.4).
//! They follow the inode and its xattrs, aligned to 8, one per `chunk size` of the file.

use zerocopy::little_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// `struct erofs_inode_chunk_index`. `blkaddr == NULL_ADDR` is a hole.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct ChunkIndex {
    /// Unused by 6.1 (`startblk_hi` with 48-bit layouts).
    pub advise: U16,
    /// 0 = primary device, 1..=N = device-table slot N-1; masked by `device_id_mask`.
    pub device_id: U16,
    pub blkaddr: U32,
}
const _: () = assert!(size_of::<ChunkIndex>() == 8);

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::offset_of;

    #[test]
    fn offsets() {
        assert_eq!(offset_of!(ChunkIndex, advise), 0);
        assert_eq!(offset_of!(ChunkIndex, device_id), 2);
        assert_eq!(offset_of!(ChunkIndex, blkaddr), 4);
        let c = ChunkIndex { advise: 0.into(), device_id: 3.into(), blkaddr: super::super::NULL_ADDR.into() };
        assert_eq!(c.as_bytes(), &[0, 0, 3, 0, 0xff, 0xff, 0xff, 0xff]);
    }
}
