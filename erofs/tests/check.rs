//! `Image::check` finds damage: each test writes a valid image, breaks one thing, and expects an error
//! that names the right nid.

#![allow(clippy::cast_possible_truncation)]

mod common;

use std::collections::BTreeMap;

use common::*;
use erofs::reader::Target;
use erofs::{Extent, FileData, Image, Inode, Kind, ReadError, Tree};

fn tree() -> Tree {
    let mut t = Tree::new(meta(0o755, 0));
    let d = add(&mut t, 0, b"d", Inode::new(Kind::Directory(BTreeMap::new()), meta(0o755, 0)));
    let mut f = Inode::new(
        Kind::Regular(FileData::Inline { size: 100, extents: vec![Extent { offset: 0, len: 100 }], source: 1 }),
        meta(0o644, 0),
    );
    f.xattrs.insert(b"user.k".to_vec(), b"value".to_vec());
    add(&mut t, d, b"a1", f);
    add(
        &mut t,
        d,
        b"a2",
        Inode::new(Kind::Regular(FileData::External { size: 9000, digest: [3; 32] }), meta(0o644, 0)),
    );
    t
}

struct Fixture {
    img: Vec<u8>,
    dir_nid: u64,
    a1: u64,
    a2: u64,
}

fn fixture() -> Fixture {
    let (img, _) = write(&tree());
    let image = Image::open(img.as_slice()).unwrap();
    image.check().unwrap();
    let root = image.inode(image.root_nid()).unwrap();
    let find = |dir: &erofs::reader::InodeInfo, name: &[u8]| {
        image.read_dir(dir).unwrap().into_iter().find(|e| e.name == name).unwrap().nid
    };
    let dir_nid = find(&root, b"d");
    let dir = image.inode(dir_nid).unwrap();
    let (a1, a2) = (find(&dir, b"a1"), find(&dir, b"a2"));
    Fixture { img, dir_nid, a1, a2 }
}

fn check_err(img: &[u8]) -> ReadError {
    let image = Image::open(img).unwrap();
    image.check().expect_err("check accepted a damaged image")
}

fn assert_corrupt(e: ReadError, want_nid: u64, what: &str) {
    match &e {
        ReadError::Corrupt { nid, reason, .. } => {
            assert_eq!(*nid, want_nid, "{e}");
            assert!(reason.contains(what), "{e}");
        }
        other => panic!("expected Corrupt({what}), got {other}"),
    }
}

fn inode_offset(img: &[u8], nid: u64) -> usize {
    Image::open(img).unwrap().inode(nid).unwrap().offset as usize
}

/// Physical offset of directory `dir`'s entry named `name`.
fn dirent_offset(img: &[u8], dir: u64, name: &[u8]) -> usize {
    let image = Image::open(img).unwrap();
    let ino = image.inode(dir).unwrap();
    let e = image.read_dir(&ino).unwrap().into_iter().find(|e| e.name == name).unwrap();
    match image.map(&ino, e.pos).unwrap().target {
        Target::Image(p) => p as usize,
        t => panic!("{t:?}"),
    }
}

#[test]
fn nlink_mismatch() {
    let f = fixture();
    let mut img = f.img.clone();
    let off = inode_offset(&img, f.a1);
    img[off + 6] = 5; // compact i_nlink
    assert_corrupt(check_err(&img), f.a1, "nlink");
}

#[test]
fn unsorted_entries() {
    let f = fixture();
    let mut img = f.img.clone();
    let image = Image::open(img.as_slice()).unwrap();
    let dir = image.inode(f.dir_nid).unwrap();
    let names: Vec<u64> = image.read_dir(&dir).unwrap().iter().map(|e| e.pos).collect();
    drop(image);
    // swap the names "a1" and "a2" in place (same length): the order breaks
    let base = dirent_offset(&img, f.dir_nid, b".") - names[0] as usize;
    let nameoff = |i: usize, img: &[u8]| u16::from_le_bytes([img[base + 12 * i + 8], img[base + 12 * i + 9]]) as usize;
    let (p1, p2) = (base + nameoff(2, &img), base + nameoff(3, &img));
    assert_eq!(&img[p1..p1 + 2], b"a1");
    img[p1 + 1] = b'2';
    img[p2 + 1] = b'1';
    assert_corrupt(check_err(&img), f.dir_nid, "sorted");
}

#[test]
fn file_type_mismatch() {
    let f = fixture();
    let mut img = f.img.clone();
    let off = dirent_offset(&img, f.dir_nid, b"a1");
    img[off + 10] = 2; // claims a directory
    assert_corrupt(check_err(&img), f.dir_nid, "file type");
}

#[test]
fn dirent_loop_to_root() {
    let f = fixture();
    let mut img = f.img.clone();
    let root = Image::open(img.as_slice()).unwrap().root_nid();
    let off = dirent_offset(&img, f.dir_nid, b"a1");
    img[off..off + 8].copy_from_slice(&root.to_le_bytes());
    img[off + 10] = 2;
    assert_corrupt(check_err(&img), f.dir_nid, "reached twice");
}

#[test]
fn device_id_out_of_range() {
    let f = fixture();
    let mut img = f.img.clone();
    let ino = Image::open(img.as_slice()).unwrap().inode(f.a2).unwrap();
    let idx = ino.body_end().next_multiple_of(8) as usize;
    assert_eq!(u16::from_le_bytes([img[idx + 2], img[idx + 3]]), 1);
    img[idx + 2] = 0;
    img[idx + 4..idx + 8].copy_from_slice(&1000u32.to_le_bytes()); // device 0, beyond the image
    assert_corrupt(check_err(&img), f.a2, "beyond");
}

#[test]
fn xattr_sizes_do_not_add_up() {
    let f = fixture();
    let mut img = f.img.clone();
    let ino = Image::open(img.as_slice()).unwrap().inode(f.a1).unwrap();
    let entry = (ino.offset + ino.inode_isize() + 12) as usize;
    img[entry + 2] = 200; // e_value_size
    assert_corrupt(check_err(&img), f.a1, "add up");
}

#[test]
fn inline_tail_crossing_a_block() {
    let f = fixture();
    let mut img = f.img.clone();
    let off = inode_offset(&img, f.a1);
    img[off + 8..off + 12].copy_from_slice(&4095u32.to_le_bytes()); // i_size: a tail that cannot fit
    assert_corrupt(check_err(&img), f.a1, "crosses");
}

#[test]
fn truncated_image_is_an_error() {
    let f = fixture();
    for len in [0, 1000, 1100, 1151] {
        assert!(Image::open(&f.img[..len]).is_err(), "len {len}");
    }
    // cut anywhere after the superblock: errors or a consistent result, never a panic
    for len in (1152..f.img.len()).step_by(97) {
        let Ok(image) = Image::open(&f.img[..len]) else {
            continue;
        };
        let _ = image.check();
        let _ = image.read_tree();
    }
}

/// Regression (found by the fuzzer): a chunk index naming a device id within `device_id_mask` but
/// beyond the device table made `read_tree` index out of bounds.
#[test]
fn device_id_within_mask_but_beyond_table() {
    let mut t = Tree::new(meta(0o755, 0));
    for i in 0..5u8 {
        add(
            &mut t,
            0,
            &[b'f', b'0' + i],
            Inode::new(Kind::Regular(FileData::External { size: 10, digest: [i; 32] }), meta(0o644, 0)),
        );
    }
    let (mut img, _) = write(&t);
    let image = Image::open(img.as_slice()).unwrap();
    let root = image.inode(image.root_nid()).unwrap();
    let nid = image.read_dir(&root).unwrap().into_iter().find(|e| e.name == b"f0").unwrap().nid;
    let idx = image.inode(nid).unwrap().body_end().next_multiple_of(8) as usize;
    drop(image);
    img[idx + 2..idx + 4].copy_from_slice(&6u16.to_le_bytes()); // mask is 7, only 5 devices
    let image = Image::open(img.as_slice()).unwrap();
    assert!(image.read_tree().is_err());
    assert_corrupt(image.check().unwrap_err(), nid, "beyond");
    let mut buf = [0u8; 10];
    assert!(image.read_file_at(nid, 0, &mut buf).is_err());
}
