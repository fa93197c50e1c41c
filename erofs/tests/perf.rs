//! Scale check (ignored by default; run in release):
//! `cargo test -p erofs --release --test perf -- --ignored --nocapture`
//! A 100k-file tree (1,000 directories, 5% inline files, one 20k-entry directory, security xattrs):
//! prints write/check/read_tree times, image size and peak RSS.

#![allow(clippy::cast_possible_truncation)]

mod common;

use std::collections::BTreeMap;
use std::time::Instant;

use common::*;
use erofs::{Extent, FileData, Image, Inode, Kind, Tree};

fn peak_rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()).unwrap_or(0)
}

fn big_tree(files: u64) -> Tree {
    let mut t = Tree::new(meta(0o755, 1_700_000_000));
    let mut dirs = Vec::new();
    for d in 0..1000u64 {
        dirs.push(add(
            &mut t,
            0,
            format!("dir{d:04}").as_bytes(),
            Inode::new(Kind::Directory(BTreeMap::new()), meta(0o755, 1_700_000_000)),
        ));
    }
    let huge = add(&mut t, 0, b"huge", Inode::new(Kind::Directory(BTreeMap::new()), meta(0o755, 1_700_000_000)));
    for i in 0..files {
        let dir = if i % 5 == 0 { huge } else { dirs[(i % 1000) as usize] };
        let kind = if i % 20 == 0 {
            let size = 1 + i % 3000;
            Kind::Regular(FileData::Inline { size, extents: vec![Extent { offset: 0, len: size }], source: i })
        } else {
            let mut digest = [0u8; 32];
            digest[..8].copy_from_slice(&(i % 60_000).to_le_bytes());
            Kind::Regular(FileData::External { size: 1000 + (i % 60_000) * 7, digest })
        };
        let mut inode = Inode::new(kind, meta(0o644, 1_700_000_000 + (i % 7 == 0) as i64));
        if i % 10 == 0 {
            inode.xattrs.insert(
                b"security.capability".to_vec(),
                vec![1, 0, 0, 2, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            );
        }
        add(&mut t, dir, format!("some-file-name-{i:08}.py").as_bytes(), inode);
    }
    t
}

#[test]
#[ignore]
fn write_100k_files() {
    let tree = big_tree(100_000);
    let before = peak_rss_kib();
    let start = Instant::now();
    let mut out = Vec::new();
    let stats = erofs::write_image(&tree, &mut PatternSource::default(), &mut out, &Default::default()).unwrap();
    let write = start.elapsed();
    let after_write = peak_rss_kib();
    let image = Image::open(out.as_slice()).unwrap();
    let t = Instant::now();
    image.check().unwrap();
    let check = t.elapsed();
    let t = Instant::now();
    let read = image.read_tree().unwrap();
    let read_time = t.elapsed();
    assert_eq!(read.inodes.len() as u64, stats.inodes);
    eprintln!(
        "100k files: write {write:?}, check {check:?}, read_tree {read_time:?}; image {} KiB, {} devices, \
         {} compact / {} extended inodes; peak RSS before write {before} KiB, after {after_write} KiB",
        out.len() / 1024,
        stats.devices.len(),
        stats.compact_inodes,
        stats.extended_inodes,
    );
}
