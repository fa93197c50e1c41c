//! The superblock (`struct erofs_super_block`, 128 bytes at byte 1024; docs/kernel.md C.1).

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// `struct erofs_super_block` with 6.1 field names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct SuperBlock {
    pub magic: U32,
    /// crc32c of block 0 from byte 1024, only checked with `FEATURE_COMPAT_SB_CHKSUM`.
    pub checksum: U32,
    pub feature_compat: U32,
    pub blkszbits: u8,
    pub sb_extslots: u8,
    /// 16-bit in 6.1: the root inode must have a nid <= 65535.
    pub root_nid: U16,
    /// Total inode count (statfs only).
    pub inos: U64,
    /// Time stamp of every compact inode (seconds; read as s64).
    pub build_time: U64,
    pub build_time_nsec: U32,
    /// Blocks of the primary device.
    pub blocks: U32,
    /// Base block of the nid space.
    pub meta_blkaddr: U32,
    /// Base block of the shared xattr ids.
    pub xattr_blkaddr: U32,
    pub uuid: [u8; 16],
    /// Must hold a NUL.
    pub volume_name: [u8; 16],
    pub feature_incompat: U32,
    /// available_compr_algs / lz4_max_distance; 0 when uncompressed.
    pub u1: U16,
    pub extra_devices: U16,
    /// Device table at `devt_slotoff * 128` bytes.
    pub devt_slotoff: U16,
    /// Must be 0.
    pub dirblkbits: u8,
    pub reserved: [u8; 5],
    pub packed_nid: U64,
    pub reserved2: [u8; 24],
}
const _: () = assert!(size_of::<SuperBlock>() == 128);

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::offset_of;

    #[test]
    fn field_offsets_match_erofs_fs_h() {
        let table = [
            (offset_of!(SuperBlock, magic), 0),
            (offset_of!(SuperBlock, checksum), 4),
            (offset_of!(SuperBlock, feature_compat), 8),
            (offset_of!(SuperBlock, blkszbits), 12),
            (offset_of!(SuperBlock, sb_extslots), 13),
            (offset_of!(SuperBlock, root_nid), 14),
            (offset_of!(SuperBlock, inos), 16),
            (offset_of!(SuperBlock, build_time), 24),
            (offset_of!(SuperBlock, build_time_nsec), 32),
            (offset_of!(SuperBlock, blocks), 36),
            (offset_of!(SuperBlock, meta_blkaddr), 40),
            (offset_of!(SuperBlock, xattr_blkaddr), 44),
            (offset_of!(SuperBlock, uuid), 48),
            (offset_of!(SuperBlock, volume_name), 64),
            (offset_of!(SuperBlock, feature_incompat), 80),
            (offset_of!(SuperBlock, u1), 84),
            (offset_of!(SuperBlock, extra_devices), 86),
            (offset_of!(SuperBlock, devt_slotoff), 88),
            (offset_of!(SuperBlock, dirblkbits), 90),
            (offset_of!(SuperBlock, reserved), 91),
            (offset_of!(SuperBlock, packed_nid), 96),
            (offset_of!(SuperBlock, reserved2), 104),
        ];
        for (got, want) in table {
            assert_eq!(got, want);
        }
    }

    #[test]
    fn little_endian_bytes() {
        let sb = SuperBlock { magic: super::super::MAGIC.into(), root_nid: 0x1234.into(), ..Default::default() };
        let b = sb.as_bytes();
        assert_eq!(&b[0..4], &[0xE2, 0xE1, 0xF5, 0xE0]);
        assert_eq!(&b[14..16], &[0x34, 0x12]);
    }
}
