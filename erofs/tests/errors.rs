//! Invalid trees are typed errors, never panics or silent truncation.

#![allow(clippy::cast_possible_truncation)]

mod common;

use std::collections::BTreeMap;

use common::*;
use erofs::{write_image, Extent, FileData, Inode, Kind, Tree, WriteError, WriteOptions};

fn try_write(tree: &Tree) -> Result<erofs::WriteStats, WriteError> {
    write_image(tree, &mut PatternSource::default(), &mut Vec::new(), &WriteOptions::default())
}

fn file(size: u64) -> Inode {
    Inode::new(
        Kind::Regular(FileData::Inline { size, extents: vec![Extent { offset: 0, len: size }], source: 1 }),
        meta(0o644, 0),
    )
}

#[test]
fn invalid_names_are_rejected() {
    for (name, _) in [(&b""[..], "empty"), (b".", "dot"), (b"..", "dotdot"), (b"a/b", "slash"), (b"a\0b", "nul")] {
        let mut t = Tree::new(meta(0o755, 0));
        t.push(file(1));
        t.entries_mut(0).unwrap().insert(name.to_vec(), 1);
        assert!(matches!(try_write(&t), Err(WriteError::InvalidName { .. })), "{name:?}");
    }
    let mut t = Tree::new(meta(0o755, 0));
    add(&mut t, 0, &[b'n'; 256], file(1));
    assert!(matches!(try_write(&t), Err(WriteError::InvalidName { .. })));
    let mut t = Tree::new(meta(0o755, 0));
    add(&mut t, 0, &[b'n'; 255], file(1));
    add(&mut t, 0, &[0xff, 0xfe, b'x'], file(1));
    try_write(&t).unwrap();
}

#[test]
fn unknown_xattr_prefix_names_the_path() {
    let mut t = Tree::new(meta(0o755, 0));
    let d = add(&mut t, 0, b"dir", Inode::new(Kind::Directory(BTreeMap::new()), meta(0o755, 0)));
    let mut f = file(3);
    f.xattrs.insert(b"system.nfs4_acl".to_vec(), vec![1]);
    add(&mut t, d, b"f", f);
    let e = try_write(&t).unwrap_err();
    assert!(matches!(&e, WriteError::UnknownXattrPrefix { path, .. } if path == "/dir/f"), "{e}");
    for bad in [&b"user."[..], b"system.posix_acl_access.x", b"foo.bar"] {
        let mut t = Tree::new(meta(0o755, 0));
        t.inodes[0].xattrs.insert(bad.to_vec(), vec![]);
        assert!(matches!(try_write(&t), Err(WriteError::UnknownXattrPrefix { .. })));
    }
}

#[test]
fn oversized_xattrs_are_rejected() {
    let mut t = Tree::new(meta(0o755, 0));
    t.inodes[0].xattrs.insert(b"user.v".to_vec(), vec![0; 65536]);
    assert!(matches!(try_write(&t), Err(WriteError::XattrTooLong { .. })));
    let mut t = Tree::new(meta(0o755, 0));
    let mut name = b"user.".to_vec();
    name.extend([b'n'; 256]);
    t.inodes[0].xattrs.insert(name, vec![]);
    assert!(matches!(try_write(&t), Err(WriteError::XattrTooLong { .. })));
    // 5 values of 64 KiB - 1: more than the 16-bit xattr icount can describe
    let mut t = Tree::new(meta(0o755, 0));
    for i in 0..5 {
        t.inodes[0].xattrs.insert(format!("user.{i}").into_bytes(), vec![0; 65535]);
    }
    assert!(matches!(try_write(&t), Err(WriteError::XattrsTooLarge { .. })));
}

#[test]
fn structural_errors() {
    // hard-linked directory
    let mut t = Tree::new(meta(0o755, 0));
    let d = add(&mut t, 0, b"a", Inode::new(Kind::Directory(BTreeMap::new()), meta(0o755, 0)));
    t.entries_mut(0).unwrap().insert(b"b".to_vec(), d);
    assert!(matches!(try_write(&t), Err(WriteError::DirectoryHardLink { .. })));
    // loop back to the root
    let mut t = Tree::new(meta(0o755, 0));
    let d = add(&mut t, 0, b"a", Inode::new(Kind::Directory(BTreeMap::new()), meta(0o755, 0)));
    t.entries_mut(d).unwrap().insert(b"up".to_vec(), 0);
    assert!(matches!(try_write(&t), Err(WriteError::RootLinked { .. })));
    // dangling entry
    let mut t = Tree::new(meta(0o755, 0));
    t.entries_mut(0).unwrap().insert(b"x".to_vec(), 99);
    assert!(matches!(try_write(&t), Err(WriteError::MissingInode { id: 99, .. })));
    // root not a directory, empty tree
    assert!(matches!(try_write(&Tree { inodes: vec![file(1)] }), Err(WriteError::RootNotDirectory)));
    assert!(matches!(try_write(&Tree::default()), Err(WriteError::NoRoot)));
}

#[test]
fn field_overflows_are_errors() {
    type Case = (Inode, fn(&WriteError) -> bool);
    let cases: Vec<Case> = vec![
        (Inode::new(Kind::CharDevice { major: 4096, minor: 0 }, meta(0o600, 0)), |e| {
            matches!(e, WriteError::DeviceNumber { .. })
        }),
        (Inode::new(Kind::BlockDevice { major: 0, minor: 1 << 20 }, meta(0o600, 0)), |e| {
            matches!(e, WriteError::DeviceNumber { .. })
        }),
        (Inode::new(Kind::Symlink(vec![b'a'; 4096]), meta(0o777, 0)), |e| {
            matches!(e, WriteError::SymlinkTarget { .. })
        }),
        (Inode::new(Kind::Symlink(vec![]), meta(0o777, 0)), |e| matches!(e, WriteError::SymlinkTarget { .. })),
        (Inode::new(Kind::Fifo, meta(0o10000, 0)), |e| matches!(e, WriteError::BadPermissions { .. })),
        (Inode::new(Kind::Regular(FileData::External { size: (1 << 44) + 1, digest: [1; 32] }), meta(0o644, 0)), |e| {
            matches!(e, WriteError::FileTooLarge { .. })
        }),
        (
            Inode::new(
                Kind::Regular(FileData::Inline { size: 10, extents: vec![Extent { offset: 5, len: 6 }], source: 0 }),
                meta(0o644, 0),
            ),
            |e| matches!(e, WriteError::BadExtents { .. }),
        ),
        (
            Inode::new(
                Kind::Regular(FileData::Inline {
                    size: 10,
                    extents: vec![Extent { offset: 0, len: 5 }, Extent { offset: 4, len: 2 }],
                    source: 0,
                }),
                meta(0o644, 0),
            ),
            |e| matches!(e, WriteError::BadExtents { .. }),
        ),
    ];
    for (inode, ok) in cases {
        let mut t = Tree::new(meta(0o755, 0));
        add(&mut t, 0, b"x", inode.clone());
        let e = try_write(&t).unwrap_err();
        assert!(ok(&e), "{inode:?}: {e}");
    }
    let mut t = Tree::new(meta(0o755, 0));
    add(&mut t, 0, b"a", Inode::new(Kind::Regular(FileData::External { size: 5, digest: [1; 32] }), meta(0o644, 0)));
    add(&mut t, 0, b"b", Inode::new(Kind::Regular(FileData::External { size: 6, digest: [1; 32] }), meta(0o644, 0)));
    assert!(matches!(try_write(&t), Err(WriteError::DigestSizeConflict { .. })));
    let opts = WriteOptions { volume_name: vec![b'v'; 16], ..Default::default() };
    let e = write_image(&Tree::new(meta(0o755, 0)), &mut PatternSource::default(), &mut Vec::new(), &opts).unwrap_err();
    assert!(matches!(e, WriteError::VolumeName { len: 16 }));
}

#[test]
fn too_many_devices() {
    let mut t = Tree::new(meta(0o755, 0));
    for i in 0..65536u32 {
        let mut digest = [0u8; 32];
        digest[..4].copy_from_slice(&i.to_le_bytes());
        add(
            &mut t,
            0,
            format!("{i}").as_bytes(),
            Inode::new(Kind::Regular(FileData::External { size: 1, digest }), meta(0o644, 0)),
        );
    }
    assert!(matches!(try_write(&t), Err(WriteError::TooManyDevices { count: 65536 })));
    // 65535 is the limit, and the root nid and device table offset stay in range
    let last = t.inodes.len() - 1;
    t.entries_mut(0).unwrap().retain(|_, id| *id != last);
    let (img, stats) = write(&t);
    assert_eq!(stats.devices.len(), 65535);
    let image = erofs::Image::open(img.as_slice()).unwrap();
    assert_eq!(image.devices().len(), 65535);
    assert!(image.root_nid() < 65536);
    image.check().unwrap();
}

#[test]
fn content_source_errors_are_reported() {
    let mut t = Tree::new(meta(0o755, 0));
    add(&mut t, 0, b"f", file(10_000));
    let mut empty = erofs::MemorySource::new();
    let e = write_image(&t, &mut empty, &mut Vec::new(), &WriteOptions::default()).unwrap_err();
    assert!(matches!(e, WriteError::Content { source_id: 1, .. }), "{e}");
}

#[test]
fn file_data_is_streamed_in_bounded_pieces() {
    let mut t = Tree::new(meta(0o755, 0));
    add(&mut t, 0, b"big", file(10 << 20));
    let mut src = PatternSource::default();
    write_image(&t, &mut src, &mut Vec::new(), &WriteOptions::default()).unwrap();
    assert!(src.max_request <= 128 * 1024, "{}", src.max_request);
}
