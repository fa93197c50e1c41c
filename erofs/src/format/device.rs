//! Device-table slots (`struct erofs_deviceslot`, 128 bytes; docs/kernel.md C.8). Slot `i` is device id
//! `i + 1`; its tag names the blob (the fscache cookie key, or matched with `device=` options).

use zerocopy::little_endian::U32;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// `struct erofs_deviceslot` (6.1 names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct DeviceSlot {
    pub tag: [u8; 64],
    /// Blocks of the device (statfs only in 6.1).
    pub blocks: U32,
    /// Base of a unified address space; 0 = none.
    pub mapped_blkaddr: U32,
    pub reserved: [u8; 56],
}
const _: () = assert!(size_of::<DeviceSlot>() == 128);

impl Default for DeviceSlot {
    fn default() -> Self {
        DeviceSlot { tag: [0; 64], blocks: 0.into(), mapped_blkaddr: 0.into(), reserved: [0; 56] }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::offset_of;

    #[test]
    fn offsets() {
        assert_eq!(offset_of!(DeviceSlot, tag), 0);
        assert_eq!(offset_of!(DeviceSlot, blocks), 64);
        assert_eq!(offset_of!(DeviceSlot, mapped_blkaddr), 68);
        assert_eq!(offset_of!(DeviceSlot, reserved), 72);
    }
}
