//! On-disk structures and constants of EROFS as a Linux 6.1 kernel accepts them
//! (`fs/erofs/erofs_fs.h` of 6.1; docs/kernel.md sections C.1-C.8). One definition, shared by the writer and
//! the reader. Every struct is `#[repr(C)]` plain data with little-endian field types and a compile-time
//! size assertion.
//!
//! Only the uncompressed subset is described: flat and chunk-based layouts, directories, xattrs (6.1
//! name indexes, no long prefixes), the device table.

mod chunk;
mod device;
mod dirent;
mod inode;
mod superblock;
mod xattr;

pub use chunk::ChunkIndex;
pub use device::DeviceSlot;
pub use dirent::Dirent;
pub use inode::{chunk_format_of, InodeCompact, InodeExtended};
pub use superblock::SuperBlock;
pub use xattr::{
    join_xattr_name, split_xattr_name, xattr_entry_size, XattrEntry, XattrIbodyHeader, XATTR_INDEX_LUSTRE,
    XATTR_INDEX_POSIX_ACL_ACCESS, XATTR_INDEX_POSIX_ACL_DEFAULT, XATTR_INDEX_SECURITY, XATTR_INDEX_TRUSTED,
    XATTR_INDEX_USER,
};

/// log2 of the only block size this crate writes (and the page size fscache mode requires in 6.1).
pub const BLOCK_BITS: u8 = 12;
/// Block size in bytes.
pub const BLOCK_SIZE: u64 = 1 << BLOCK_BITS;
/// [`BLOCK_SIZE`] as a `usize`, for buffers.
pub const BLOCK_BYTES: usize = 1 << BLOCK_BITS;
/// The superblock's byte offset in the primary device.
pub const SUPER_OFFSET: u64 = 1024;
/// `EROFS_SUPER_MAGIC_V1`.
pub const MAGIC: u32 = 0xE0F5_E1E2;
/// Inode slots are 32 bytes: `byte offset = meta_blkaddr * BLOCK_SIZE + nid * 32`.
pub const ISLOT_BITS: u8 = 5;
/// Size of one inode slot.
pub const ISLOT_SIZE: u64 = 1 << ISLOT_BITS;
/// Longest name a directory entry may hold.
pub const NAME_LEN: usize = 255;
/// Size of one device-table slot; `devt_slotoff` counts in these units.
pub const DEVT_SLOT_SIZE: u64 = 128;
/// Length of a device tag (the fscache cookie name).
pub const DEVICE_TAG_LEN: usize = 64;
/// A chunk index or block-map entry that is a hole.
pub const NULL_ADDR: u32 = u32::MAX;

/// `feature_compat`: the superblock checksum is valid.
pub const FEATURE_COMPAT_SB_CHKSUM: u32 = 0x1;
/// `feature_compat`: per-inode mtime (informational).
pub const FEATURE_COMPAT_MTIME: u32 = 0x2;
/// `feature_incompat`: chunk-based regular files.
pub const FEATURE_INCOMPAT_CHUNKED_FILE: u32 = 0x4;
/// `feature_incompat`: the device table is valid.
pub const FEATURE_INCOMPAT_DEVICE_TABLE: u32 = 0x8;
/// Every `feature_incompat` bit a 6.1 kernel knows; others make the mount fail.
pub const FEATURE_INCOMPAT_ALL_6_1: u32 = 0x3F;
/// The incompat bits this crate's reader supports (no compression).
pub const FEATURE_INCOMPAT_SUPPORTED: u32 = FEATURE_INCOMPAT_CHUNKED_FILE | FEATURE_INCOMPAT_DEVICE_TABLE;

/// `i_format` bit 0: extended (64-byte) inode.
pub const I_VERSION_EXTENDED: u16 = 0x1;
/// Shift of the data layout inside `i_format`.
pub const I_DATALAYOUT_BIT: u16 = 1;
/// Every `i_format` bit 6.1 knows.
pub const I_ALL_6_1: u16 = 0xF;

/// Data blocks at `raw_blkaddr`, no tail packing.
pub const LAYOUT_FLAT_PLAIN: u16 = 0;
/// Compressed (legacy), not used.
pub const LAYOUT_COMPRESSED_FULL: u16 = 1;
/// Data blocks at `raw_blkaddr`, the tail right after the inode and its xattrs.
pub const LAYOUT_FLAT_INLINE: u16 = 2;
/// Compressed (compact), not used.
pub const LAYOUT_COMPRESSED_COMPACT: u16 = 3;
/// Chunk-based: an array of chunk indexes after the inode.
pub const LAYOUT_CHUNK_BASED: u16 = 4;

/// `chunk_info.format` bits holding `chunkbits - blkbits`.
pub const CHUNK_FORMAT_BLKBITS_MASK: u16 = 0x1F;
/// `chunk_info.format` bit: 8-byte chunk indexes instead of a 4-byte block map.
pub const CHUNK_FORMAT_INDEXES: u16 = 0x20;
/// Every chunk format bit 6.1 knows.
pub const CHUNK_FORMAT_ALL_6_1: u16 = 0x3F;

/// `S_IFMT` and the file type bits of `i_mode`.
pub const S_IFMT: u16 = 0o170000;
pub const S_IFSOCK: u16 = 0o140000;
pub const S_IFLNK: u16 = 0o120000;
pub const S_IFREG: u16 = 0o100000;
pub const S_IFBLK: u16 = 0o060000;
pub const S_IFDIR: u16 = 0o040000;
pub const S_IFCHR: u16 = 0o020000;
pub const S_IFIFO: u16 = 0o010000;

/// Directory entry `file_type` values (`EROFS_FT_*`).
pub const FT_UNKNOWN: u8 = 0;
pub const FT_REG_FILE: u8 = 1;
pub const FT_DIR: u8 = 2;
pub const FT_CHRDEV: u8 = 3;
pub const FT_BLKDEV: u8 = 4;
pub const FT_FIFO: u8 = 5;
pub const FT_SOCK: u8 = 6;
pub const FT_SYMLINK: u8 = 7;

/// The dirent `file_type` matching the type bits of `mode`, or `None` for an invalid type.
pub fn file_type_of_mode(mode: u16) -> Option<u8> {
    Some(match mode & S_IFMT {
        S_IFREG => FT_REG_FILE,
        S_IFDIR => FT_DIR,
        S_IFCHR => FT_CHRDEV,
        S_IFBLK => FT_BLKDEV,
        S_IFIFO => FT_FIFO,
        S_IFSOCK => FT_SOCK,
        S_IFLNK => FT_SYMLINK,
        _ => return None,
    })
}

/// Size of the inline xattr region for `i_xattr_icount` (`erofs_xattr_ibody_size`).
pub fn xattr_ibody_size(icount: u16) -> u32 {
    if icount == 0 {
        0
    } else {
        12 + 4 * (u32::from(icount) - 1)
    }
}

/// The kernel's `new_encode_dev`: 12-bit major, 20-bit minor. `None` when a number does not fit.
pub fn encode_rdev(major: u32, minor: u32) -> Option<u32> {
    if major >= 1 << 12 || minor >= 1 << 20 {
        return None;
    }
    Some((minor & 0xff) | (major << 8) | ((minor & !0xff) << 12))
}

/// The kernel's `new_decode_dev`: `(major, minor)`.
pub fn decode_rdev(dev: u32) -> (u32, u32) {
    ((dev & 0xfff00) >> 8, (dev & 0xff) | ((dev >> 12) & 0xfff00))
}

/// Splits an `i_format` into (extended?, datalayout).
pub fn split_i_format(i_format: u16) -> (bool, u16) {
    (i_format & I_VERSION_EXTENDED != 0, (i_format >> I_DATALAYOUT_BIT) & 0x7)
}

/// Builds an `i_format` from (extended?, datalayout).
pub fn make_i_format(extended: bool, layout: u16) -> u16 {
    u16::from(extended) | (layout << I_DATALAYOUT_BIT)
}

/// Stores a signed time in the on-disk u64 field. Linux reads `le64_to_cpu(i_mtime)` into a `time64_t`
/// (s64), so the two's complement bit pattern round-trips negative times (fs/erofs/inode.c, 6.1).
pub fn time_to_disk(t: i64) -> u64 {
    u64::from_le_bytes(t.to_le_bytes())
}

/// Inverse of [`time_to_disk`].
pub fn time_from_disk(t: u64) -> i64 {
    i64::from_le_bytes(t.to_le_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rdev_round_trips() {
        for (ma, mi) in [(0, 0), (1, 3), (8, 1), (4095, 0xfffff), (259, 65536), (10, 256)] {
            let d = encode_rdev(ma, mi).unwrap();
            assert_eq!(decode_rdev(d), (ma, mi));
        }
        assert_eq!(encode_rdev(8, 1), Some(0x801));
        assert_eq!(encode_rdev(4096, 0), None);
        assert_eq!(encode_rdev(0, 1 << 20), None);
    }

    #[test]
    fn xattr_ibody_sizes() {
        assert_eq!(xattr_ibody_size(0), 0);
        assert_eq!(xattr_ibody_size(1), 12);
        assert_eq!(xattr_ibody_size(2), 16);
        assert_eq!(xattr_ibody_size(u16::MAX), 12 + 4 * 65534);
    }

    #[test]
    fn times_round_trip() {
        for t in [0, -1, i64::MIN, i64::MAX, -2_208_988_800, 4_102_444_800] {
            assert_eq!(time_from_disk(time_to_disk(t)), t);
        }
        assert_eq!(time_to_disk(-1), u64::MAX);
    }

    #[test]
    fn i_format_round_trips() {
        for ext in [false, true] {
            for l in [LAYOUT_FLAT_PLAIN, LAYOUT_FLAT_INLINE, LAYOUT_CHUNK_BASED] {
                assert_eq!(split_i_format(make_i_format(ext, l)), (ext, l));
            }
        }
        assert_eq!(make_i_format(true, LAYOUT_CHUNK_BASED), 9);
    }
}
