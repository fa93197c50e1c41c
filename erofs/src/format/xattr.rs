//! Extended attributes (`struct erofs_xattr_ibody_header`, `struct erofs_xattr_entry`; docs/kernel.md C.6)
//! and the 6.1 name-index table.
//!
//! The inline region after an inode is a 12-byte header, `h_shared_count` le32 shared-xattr ids, then
//! entries (4-byte header, name suffix, value, padded to 4). Shared xattr id `k` lives at
//! `xattr_blkaddr * BLOCK_SIZE + 4 * k` in the same entry format.

use zerocopy::little_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// `struct erofs_xattr_ibody_header`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct XattrIbodyHeader {
    /// Reserved in 6.1 (a name bloom filter in newer kernels, where 0 bits mean "maybe present").
    pub h_reserved: U32,
    pub h_shared_count: u8,
    pub h_reserved2: [u8; 7],
}
const _: () = assert!(size_of::<XattrIbodyHeader>() == 12);

/// `struct erofs_xattr_entry`, followed by `e_name_len` name bytes and `e_value_size` value bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct XattrEntry {
    pub e_name_len: u8,
    pub e_name_index: u8,
    pub e_value_size: U16,
}
const _: () = assert!(size_of::<XattrEntry>() == 4);

/// Bytes an entry with this name suffix and value length takes, padded to 4.
pub fn xattr_entry_size(name_len: usize, value_len: usize) -> usize {
    (4 + name_len + value_len).div_ceil(4) * 4
}

pub const XATTR_INDEX_USER: u8 = 1;
pub const XATTR_INDEX_POSIX_ACL_ACCESS: u8 = 2;
pub const XATTR_INDEX_POSIX_ACL_DEFAULT: u8 = 3;
pub const XATTR_INDEX_TRUSTED: u8 = 4;
pub const XATTR_INDEX_LUSTRE: u8 = 5;
pub const XATTR_INDEX_SECURITY: u8 = 6;

/// (index, full-name prefix, whether the prefix is the whole name).
const PREFIXES: [(u8, &[u8], bool); 5] = [
    (XATTR_INDEX_USER, b"user.", false),
    (XATTR_INDEX_POSIX_ACL_ACCESS, b"system.posix_acl_access", true),
    (XATTR_INDEX_POSIX_ACL_DEFAULT, b"system.posix_acl_default", true),
    (XATTR_INDEX_TRUSTED, b"trusted.", false),
    (XATTR_INDEX_SECURITY, b"security.", false),
];

/// Splits a full xattr name into its 6.1 name index and the stored suffix. `None` when no 6.1 prefix
/// matches, or when a namespace prefix (`user.` ...) has an empty suffix.
pub fn split_xattr_name(name: &[u8]) -> Option<(u8, &[u8])> {
    for (index, prefix, whole) in PREFIXES {
        if whole {
            if name == prefix {
                return Some((index, &[]));
            }
        } else if let Some(rest) = name.strip_prefix(prefix) {
            return if rest.is_empty() { None } else { Some((index, rest)) };
        }
    }
    None
}

/// The full name for a stored (index, suffix), or `None` for an index 6.1 does not expose.
pub fn join_xattr_name(index: u8, suffix: &[u8]) -> Option<Vec<u8>> {
    let (_, prefix, whole) = PREFIXES.iter().find(|p| p.0 == index)?;
    if *whole && !suffix.is_empty() {
        return None;
    }
    if !*whole && suffix.is_empty() {
        return None;
    }
    let mut full = Vec::with_capacity(prefix.len() + suffix.len());
    full.extend_from_slice(prefix);
    full.extend_from_slice(suffix);
    Some(full)
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::offset_of;

    #[test]
    fn offsets() {
        assert_eq!(offset_of!(XattrIbodyHeader, h_reserved), 0);
        assert_eq!(offset_of!(XattrIbodyHeader, h_shared_count), 4);
        assert_eq!(offset_of!(XattrIbodyHeader, h_reserved2), 5);
        assert_eq!(offset_of!(XattrEntry, e_name_len), 0);
        assert_eq!(offset_of!(XattrEntry, e_name_index), 1);
        assert_eq!(offset_of!(XattrEntry, e_value_size), 2);
    }

    #[test]
    fn name_table() {
        type Row<'a> = (&'a [u8], Option<(u8, &'a [u8])>);
        let table: [Row; 10] = [
            (b"user.x", Some((1, b"x"))),
            (b"trusted.overlay.opaque", Some((4, b"overlay.opaque"))),
            (b"security.capability", Some((6, b"capability"))),
            (b"system.posix_acl_access", Some((2, b""))),
            (b"system.posix_acl_default", Some((3, b""))),
            (b"system.posix_acl_access.x", None),
            (b"system.foo", None),
            (b"user.", None),
            (b"other.x", None),
            (b"", None),
        ];
        for (name, want) in table {
            assert_eq!(split_xattr_name(name), want, "{}", String::from_utf8_lossy(name));
            if let Some((i, s)) = want {
                assert_eq!(join_xattr_name(i, s).as_deref(), Some(name));
            }
        }
        assert_eq!(join_xattr_name(5, b"x"), None);
        assert_eq!(join_xattr_name(0, b"x"), None);
        assert_eq!(join_xattr_name(1, b""), None);
    }

    #[test]
    fn entry_sizes() {
        assert_eq!(xattr_entry_size(0, 0), 4);
        assert_eq!(xattr_entry_size(1, 0), 8);
        assert_eq!(xattr_entry_size(10, 65535), (4 + 10 + 65535usize).div_ceil(4) * 4);
    }
}
