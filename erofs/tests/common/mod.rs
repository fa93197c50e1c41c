//! Shared helpers of the erofs integration tests: a deterministic content source, tree comparison
//! through the reader, and small tree builders.
#![allow(dead_code, clippy::cast_possible_truncation)]

pub mod gen;

use std::collections::{BTreeMap, HashMap};
use std::io;

use erofs::{ContentSource, FileData, Image, Inode, InodeId, Kind, Metadata, Tree, WriteOptions, WriteStats};

/// Content byte of file `source` at `offset`: a cheap hash, so every file and position differs.
pub fn pattern_byte(source: u64, offset: u64) -> u8 {
    let x = source.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ offset.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    (x ^ (x >> 29) ^ (x >> 47)) as u8
}

/// A [`ContentSource`] generating [`pattern_byte`]s, counting the largest single request.
#[derive(Debug, Default)]
pub struct PatternSource {
    pub max_request: usize,
    pub requests: u64,
}

impl ContentSource for PatternSource {
    fn read_at(&mut self, source: u64, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.max_request = self.max_request.max(buf.len());
        self.requests += 1;
        for (i, b) in buf.iter_mut().enumerate() {
            *b = pattern_byte(source, offset + i as u64);
        }
        Ok(())
    }
}

/// The bytes a file written from [`PatternSource`] must read back as.
pub fn expected_byte(data: &FileData, offset: u64) -> u8 {
    match data {
        FileData::Inline { extents, source, .. } => {
            if extents.iter().any(|e| offset >= e.offset && offset < e.offset + e.len) {
                pattern_byte(*source, offset)
            } else {
                0
            }
        }
        FileData::External { .. } => 0,
    }
}

pub fn meta(perm: u16, mtime: i64) -> Metadata {
    Metadata { perm, uid: 0, gid: 0, mtime, mtime_nsec: 0 }
}

/// Adds `name` -> new inode under `dir`.
pub fn add(tree: &mut Tree, dir: InodeId, name: &[u8], inode: Inode) -> InodeId {
    let id = tree.push(inode);
    tree.entries_mut(dir).unwrap().insert(name.to_vec(), id);
    id
}

pub fn write(tree: &Tree) -> (Vec<u8>, WriteStats) {
    let mut out = Vec::new();
    let stats = erofs::write_image(tree, &mut PatternSource::default(), &mut out, &WriteOptions::default())
        .expect("write_image");
    assert_eq!(out.len() as u64, stats.blocks * 4096);
    (out, stats)
}

/// Asserts that `read` (from the image `img`) equals `written`: same names, kinds, metadata, xattrs and
/// hard-link structure; inline file bytes compared through the reader; `source` handles ignored;
/// empty files equal whatever their form.
pub fn assert_same_tree(written: &Tree, read: &Tree, img: &Image<&[u8]>) {
    assert_same_tree_from(written, read, img, None)
}

/// Like [`assert_same_tree`], but the written tree's inline bytes come from `origin` (an image whose
/// nids are the written tree's `source` handles) instead of [`PatternSource`].
pub fn assert_same_tree_from(written: &Tree, read: &Tree, img: &Image<&[u8]>, origin: Option<&Image<&[u8]>>) {
    let mut map: HashMap<InodeId, InodeId> = HashMap::new();
    let mut back: HashMap<InodeId, InodeId> = HashMap::new();
    let mut stack = vec![(erofs::ROOT, erofs::ROOT, "/".to_string())];
    let nids = nid_map(img);
    while let Some((w, r, path)) = stack.pop() {
        if let Some(&prev) = map.get(&w) {
            assert_eq!(prev, r, "{path}: hard link structure differs");
            continue;
        }
        assert!(back.insert(r, w).is_none(), "{path}: two written inodes read back as one");
        map.insert(w, r);
        let (wi, ri) = (&written.inodes[w], &read.inodes[r]);
        assert_eq!(wi.meta, ri.meta, "{path}: metadata");
        assert_eq!(wi.xattrs, ri.xattrs, "{path}: xattrs");
        match (&wi.kind, &ri.kind) {
            (Kind::Directory(we), Kind::Directory(re)) => {
                let wn: Vec<_> = we.keys().collect();
                let rn: Vec<_> = re.keys().collect();
                assert_eq!(wn, rn, "{path}: entry names");
                for (name, &wc) in we {
                    let p = format!("{}/{}", path.trim_end_matches('/'), String::from_utf8_lossy(name));
                    stack.push((wc, re[name], p));
                }
            }
            (Kind::Regular(wd), Kind::Regular(rd)) => {
                assert_eq!(wd.size(), rd.size(), "{path}: size");
                match (wd, rd) {
                    (_, _) if wd.size() == 0 => {}
                    (FileData::External { digest: a, .. }, FileData::External { digest: b, .. }) => {
                        assert_eq!(a, b, "{path}: digest")
                    }
                    (FileData::Inline { .. }, FileData::Inline { source, .. }) => {
                        assert_eq!(*source, nids[&r], "{path}: source is the nid");
                        compare_bytes(&path, wd, img, *source, origin);
                    }
                    _ => panic!("{path}: file data form differs: {wd:?} vs {rd:?}"),
                }
            }
            (a, b) => assert_eq!(a, b, "{path}: kind"),
        }
    }
}

fn compare_bytes(path: &str, wd: &FileData, img: &Image<&[u8]>, nid: u64, origin: Option<&Image<&[u8]>>) {
    let size = wd.size();
    let mut buf = vec![0u8; 65536];
    let mut want = vec![0u8; 65536];
    let mut off = 0u64;
    while off < size {
        let n = img.read_file_at(nid, off, &mut buf).expect("read_file_at");
        assert!(n > 0, "{path}: short read at {off}");
        match (origin, wd) {
            (Some(o), FileData::Inline { source, .. }) => {
                assert_eq!(o.read_file_at(*source, off, &mut want[..n]).unwrap(), n);
                assert!(buf[..n] == want[..n], "{path}: bytes at {off}..{}", off + n as u64);
            }
            _ => {
                for (i, &b) in buf[..n].iter().enumerate() {
                    let o = off + i as u64;
                    assert_eq!(b, expected_byte(wd, o), "{path}: byte {o}");
                }
            }
        }
        off += n as u64;
    }
    assert_eq!(img.read_file_at(nid, size, &mut buf).unwrap(), 0, "{path}: read past the end");
}

/// InodeId of the read tree -> nid, recomputed by walking the image the same way `read_tree` does.
fn nid_map(img: &Image<&[u8]>) -> HashMap<InodeId, u64> {
    let tree = img.read_tree().unwrap();
    let mut out = HashMap::new();
    for (id, inode) in tree.inodes.iter().enumerate() {
        if let Kind::Regular(FileData::Inline { source, .. }) = &inode.kind {
            out.insert(id, *source);
        }
    }
    out
}

/// A small tree with one of everything.
pub fn sample_tree() -> Tree {
    let mut t = Tree::new(meta(0o755, 1_700_000_000));
    let etc = add(&mut t, 0, b"etc", Inode::new(Kind::Directory(BTreeMap::new()), meta(0o755, 1_700_000_000)));
    let mut f = Inode::new(
        Kind::Regular(FileData::Inline { size: 5, extents: vec![erofs::Extent { offset: 0, len: 5 }], source: 1 }),
        meta(0o644, 1_700_000_000),
    );
    f.xattrs.insert(b"security.capability".to_vec(), vec![1, 0, 0, 2, 0, 0, 0, 0]);
    let hosts = add(&mut t, etc, b"hosts", f);
    t.entries_mut(0).unwrap().insert(b"hosts-link".to_vec(), hosts);
    add(
        &mut t,
        etc,
        b"passwd",
        Inode::new(Kind::Regular(FileData::External { size: 10_000, digest: [7; 32] }), meta(0o644, 5)),
    );
    add(&mut t, 0, b"lnk", Inode::new(Kind::Symlink(b"etc/hosts".to_vec()), meta(0o777, 1_700_000_000)));
    add(&mut t, 0, b"null", Inode::new(Kind::CharDevice { major: 1, minor: 3 }, meta(0o666, 1_700_000_000)));
    add(&mut t, 0, b"sda", Inode::new(Kind::BlockDevice { major: 8, minor: 0 }, meta(0o660, 1_700_000_000)));
    add(&mut t, 0, b"fifo", Inode::new(Kind::Fifo, meta(0o600, 1_700_000_000)));
    add(&mut t, 0, b"sock", Inode::new(Kind::Socket, meta(0o600, -5)));
    add(
        &mut t,
        0,
        b"empty",
        Inode::new(Kind::Regular(FileData::Inline { size: 0, extents: vec![], source: 2 }), meta(0o644, 1_700_000_000)),
    );
    let big = 3 * 4096 + 100;
    add(
        &mut t,
        0,
        b"big",
        Inode::new(
            Kind::Regular(FileData::Inline {
                size: big,
                extents: vec![erofs::Extent { offset: 0, len: big }],
                source: 3,
            }),
            meta(0o644, 1_700_000_000),
        ),
    );
    add(
        &mut t,
        0,
        b"sparse",
        Inode::new(
            Kind::Regular(FileData::Inline {
                size: 1 << 20,
                extents: vec![erofs::Extent { offset: 4096, len: 100 }, erofs::Extent { offset: 900_000, len: 5000 }],
                source: 4,
            }),
            meta(0o644, 1_700_000_000),
        ),
    );
    t
}

/// A valid POSIX ACL xattr blob (version 2; user::rw-, group::r--, other::r--), which the kernel parses.
pub fn valid_acl() -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for (tag, perm) in [(1u16, 6u16), (4, 4), (0x20, 4)] {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&u32::MAX.to_le_bytes());
    }
    v
}
