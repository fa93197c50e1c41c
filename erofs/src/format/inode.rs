//! Compact (32-byte) and extended (64-byte) inodes (`struct erofs_inode_compact` /
//! `erofs_inode_extended`; docs/kernel.md C.3).
//!
//! `i_u` is one 32-bit field whose meaning depends on type and layout: `raw_blkaddr` for flat layouts,
//! `rdev` for device nodes, or `chunk_info` (`le16 format`, `le16 reserved`) for chunk-based files;
//! chunk_info is stored here as the low 16 bits of `i_u`.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// `struct erofs_inode_compact`: mtime comes from the superblock's build time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct InodeCompact {
    pub i_format: U16,
    pub i_xattr_icount: U16,
    pub i_mode: U16,
    pub i_nlink: U16,
    pub i_size: U32,
    pub i_reserved: U32,
    pub i_u: U32,
    /// Ignored by 6.1 (32-bit stat compatibility).
    pub i_ino: U32,
    pub i_uid: U16,
    pub i_gid: U16,
    pub i_reserved2: U32,
}
const _: () = assert!(size_of::<InodeCompact>() == 32);

/// `struct erofs_inode_extended`: 32-bit ids, 64-bit size, its own mtime.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct InodeExtended {
    pub i_format: U16,
    pub i_xattr_icount: U16,
    pub i_mode: U16,
    pub i_reserved: U16,
    pub i_size: U64,
    pub i_u: U32,
    pub i_ino: U32,
    pub i_uid: U32,
    pub i_gid: U32,
    /// Seconds, read by the kernel as s64 (see [`super::time_to_disk`]).
    pub i_mtime: U64,
    pub i_mtime_nsec: U32,
    pub i_nlink: U32,
    pub i_reserved2: [u8; 16],
}
const _: () = assert!(size_of::<InodeExtended>() == 64);

/// Low 16 bits of `i_u`: the chunk format of a chunk-based inode.
pub fn chunk_format_of(i_u: u32) -> u16 {
    u16::try_from(i_u & 0xffff).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::offset_of;

    #[test]
    fn compact_offsets() {
        let table = [
            (offset_of!(InodeCompact, i_format), 0),
            (offset_of!(InodeCompact, i_xattr_icount), 2),
            (offset_of!(InodeCompact, i_mode), 4),
            (offset_of!(InodeCompact, i_nlink), 6),
            (offset_of!(InodeCompact, i_size), 8),
            (offset_of!(InodeCompact, i_reserved), 12),
            (offset_of!(InodeCompact, i_u), 16),
            (offset_of!(InodeCompact, i_ino), 20),
            (offset_of!(InodeCompact, i_uid), 24),
            (offset_of!(InodeCompact, i_gid), 26),
            (offset_of!(InodeCompact, i_reserved2), 28),
        ];
        for (got, want) in table {
            assert_eq!(got, want);
        }
    }

    #[test]
    fn extended_offsets() {
        let table = [
            (offset_of!(InodeExtended, i_format), 0),
            (offset_of!(InodeExtended, i_xattr_icount), 2),
            (offset_of!(InodeExtended, i_mode), 4),
            (offset_of!(InodeExtended, i_reserved), 6),
            (offset_of!(InodeExtended, i_size), 8),
            (offset_of!(InodeExtended, i_u), 16),
            (offset_of!(InodeExtended, i_ino), 20),
            (offset_of!(InodeExtended, i_uid), 24),
            (offset_of!(InodeExtended, i_gid), 28),
            (offset_of!(InodeExtended, i_mtime), 32),
            (offset_of!(InodeExtended, i_mtime_nsec), 40),
            (offset_of!(InodeExtended, i_nlink), 44),
            (offset_of!(InodeExtended, i_reserved2), 48),
        ];
        for (got, want) in table {
            assert_eq!(got, want);
        }
    }

    #[test]
    fn chunk_format_is_low_half() {
        let i_u = u32::from_le_bytes([0x2c, 0x00, 0x00, 0x00]);
        assert_eq!(chunk_format_of(i_u), 0x2c);
        assert_eq!(chunk_format_of(0xffff_0021), 0x21);
    }
}
