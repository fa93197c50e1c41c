//! Directory entries (`struct erofs_dirent`, 12 bytes; docs/kernel.md C.5).
//!
//! A directory block holds an array of dirents followed by their names; `de[0].nameoff / 12` is the
//! entry count, names are not NUL-terminated, and neither a dirent nor its name crosses a block.

use zerocopy::little_endian::{U16, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// `struct erofs_dirent`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct Dirent {
    pub nid: U64,
    /// Byte offset of the name within its block.
    pub nameoff: U16,
    pub file_type: u8,
    pub reserved: u8,
}
const _: () = assert!(size_of::<Dirent>() == 12);

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::offset_of;

    #[test]
    fn offsets() {
        assert_eq!(offset_of!(Dirent, nid), 0);
        assert_eq!(offset_of!(Dirent, nameoff), 8);
        assert_eq!(offset_of!(Dirent, file_type), 10);
        assert_eq!(offset_of!(Dirent, reserved), 11);
        let d = Dirent { nid: 0x0102.into(), nameoff: 24.into(), file_type: 2, reserved: 0 };
        assert_eq!(d.as_bytes(), &[2, 1, 0, 0, 0, 0, 0, 0, 24, 0, 2, 0]);
    }
}
