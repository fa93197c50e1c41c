//! proptest strategies for random trees: every inode kind, hard links, shared and long xattrs, big
//! directories, sizes around block boundaries, sparse files, long and non-UTF-8 names, 32-bit ids and
//! times far from the epoch.

use std::collections::BTreeMap;

use erofs::{Extent, FileData, Inode, InodeId, Kind, Metadata, Tree};
use proptest::prelude::*;

#[derive(Clone, Debug)]
pub enum Spec {
    Dir,
    File { size: u64, holes: Vec<(u64, u64)>, external: Option<u8> },
    Symlink(usize),
    Chr(u32, u32),
    Blk(u32, u32),
    Fifo,
    Sock,
    HardLink(usize),
    BigDir(usize),
}

#[derive(Clone, Debug)]
pub struct NodeSpec {
    pub parent: usize,
    pub name: Vec<u8>,
    pub spec: Spec,
    pub meta: Metadata,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

fn name() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => proptest::collection::vec(prop::sample::select(b"ab-.~_Z0".to_vec()), 1..4),
        2 => proptest::collection::vec(any::<u8>().prop_filter("no / or NUL", |b| *b != b'/' && *b != 0), 1..256),
        1 => (1usize..=255).prop_map(|n| vec![b'x'; n]),
    ]
    .prop_filter("not . or ..", |n| n != b"." && n != b"..")
}

fn size() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1),
        Just(4095),
        Just(4096),
        Just(4097),
        Just(8191),
        Just(8192),
        Just(12289),
        0u64..300_000,
    ]
}

fn meta() -> impl Strategy<Value = Metadata> {
    let id = prop_oneof![4 => Just(0u32), 1 => Just(1000), 1 => Just(65535), 1 => Just(65536), 1 => Just(u32::MAX)];
    let mtime = prop_oneof![
        6 => Just(1_700_000_000i64), 1 => Just(-1), 1 => Just(-2_208_988_800), 1 => Just(4_102_444_800),
        1 => Just(i64::MIN), 1 => Just(i64::MAX), 1 => any::<i64>(),
    ];
    let nsec = prop_oneof![4 => Just(0u32), 1 => 0u32..1_000_000_000];
    (0u16..=0o7777, id.clone(), id, mtime, nsec).prop_map(|(perm, uid, gid, mtime, mtime_nsec)| Metadata {
        perm,
        uid,
        gid,
        mtime,
        mtime_nsec,
    })
}

fn xattr() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
    let prefix = prop::sample::select(vec![
        &b"user."[..],
        b"trusted.",
        b"security.",
        b"system.posix_acl_access",
        b"system.posix_acl_default",
    ]);
    let shared = prop::sample::select(vec![
        (b"security.capability".to_vec(), vec![1u8, 0, 0, 2, 0x20, 0, 0, 0]),
        (b"trusted.overlay.opaque".to_vec(), b"y".to_vec()),
        (b"user.common".to_vec(), b"same value".to_vec()),
    ]);
    let value = prop_oneof![
        4 => proptest::collection::vec(any::<u8>(), 0..40),
        1 => (0usize..3).prop_map(|k| vec![0xAB; [65535, 5000, 4093][k]]),
    ];
    prop_oneof![
        2 => shared,
        3 => (prefix, proptest::collection::vec(b'a'..=b'z', 1..30), value).prop_map(|(p, s, v)| {
            let mut n = p.to_vec();
            if p.ends_with(b"_access") || p.ends_with(b"_default") {
                // the kernel parses ACLs (an invalid one makes open fail), so store a valid one
                return (n, super::valid_acl());
            }
            n.extend(s);
            (n, v)
        }),
    ]
}

fn spec() -> impl Strategy<Value = Spec> {
    let holes = proptest::collection::vec((0u64..300_000, 1u64..70_000), 0..4);
    let aligned = |x: u64| x & !4095;
    prop_oneof![
        3 => Just(Spec::Dir),
        6 => (size(), holes.clone(), proptest::option::weighted(0.3, any::<u8>()))
            .prop_map(|(size, holes, external)| Spec::File { size, holes, external }),
        2 => (size(), holes, any::<bool>()).prop_map(move |(size, holes, al)| Spec::File {
            size,
            holes: if al { holes.into_iter().map(|(o, l)| (aligned(o), aligned(l) + 4096)).collect() } else { holes },
            external: None,
        }),
        2 => prop_oneof![1usize..100, 4000usize..4096, Just(4095)].prop_map(Spec::Symlink),
        1 => (0u32..4096, 0u32..(1 << 20)).prop_map(|(a, b)| Spec::Chr(a, b)),
        1 => (0u32..4096, 0u32..(1 << 20)).prop_map(|(a, b)| Spec::Blk(a, b)),
        1 => Just(Spec::Fifo),
        1 => Just(Spec::Sock),
        2 => any::<usize>().prop_map(Spec::HardLink),
        1 => prop_oneof![10usize..400, 1000usize..3000].prop_map(Spec::BigDir),
    ]
}

pub fn node() -> impl Strategy<Value = NodeSpec> {
    (any::<usize>(), name(), spec(), meta(), proptest::collection::vec(xattr(), 0..4))
        .prop_map(|(parent, name, spec, meta, xattrs)| NodeSpec { parent, name, spec, meta, xattrs })
}

pub fn tree() -> impl Strategy<Value = Tree> {
    (meta(), proptest::collection::vec(node(), 0..60)).prop_map(|(root, nodes)| build(root, &nodes))
}

/// Builds a tree from specs; names that collide are skipped.
pub fn build(root: Metadata, nodes: &[NodeSpec]) -> Tree {
    let mut t = Tree::new(root);
    let mut dirs: Vec<InodeId> = vec![0];
    let mut files: Vec<InodeId> = Vec::new();
    let mut next_source = 1u64;
    for n in nodes {
        let dir = dirs[n.parent % dirs.len()];
        if t.entries(dir).unwrap().contains_key(&n.name) {
            continue;
        }
        let kind = match &n.spec {
            Spec::HardLink(sel) => {
                if files.is_empty() {
                    continue;
                }
                let target = files[sel % files.len()];
                t.entries_mut(dir).unwrap().insert(n.name.clone(), target);
                continue;
            }
            Spec::Dir | Spec::BigDir(_) => Kind::Directory(BTreeMap::new()),
            Spec::File { size, holes, external: Some(e) } => {
                let mut digest = [0u8; 32];
                digest[0] = *e % 8; // a few shared objects
                digest[1] = (size % 251) as u8;
                let size =
                    if *size == 0 { 0 } else { 1 + u64::from(*e % 8) * 7919 + size % 251 * 1_000_003 % 9_000_000 };
                let _ = holes;
                Kind::Regular(FileData::External { size, digest })
            }
            Spec::File { size, holes, external: None } => {
                next_source += 1;
                Kind::Regular(FileData::Inline { size: *size, extents: extents(*size, holes), source: next_source })
            }
            Spec::Symlink(len) => Kind::Symlink((0..*len).map(|i| b'a' + (i % 26) as u8).collect()),
            Spec::Chr(a, b) => Kind::CharDevice { major: *a, minor: *b },
            Spec::Blk(a, b) => Kind::BlockDevice { major: *a, minor: *b },
            Spec::Fifo => Kind::Fifo,
            Spec::Sock => Kind::Socket,
        };
        let mut inode = Inode::new(kind, n.meta.clone());
        inode.xattrs = n.xattrs.iter().cloned().collect();
        let id = t.push(inode);
        t.entries_mut(dir).unwrap().insert(n.name.clone(), id);
        match &n.spec {
            Spec::Dir => dirs.push(id),
            Spec::BigDir(count) => {
                dirs.push(id);
                for i in 0..*count {
                    let len = 1 + (i * 37) % 255;
                    let mut name: Vec<u8> = format!("{i:06}-").into_bytes();
                    name.extend((0..len).map(|k| b'a' + ((i + k) % 26) as u8));
                    name.truncate(255);
                    let child = t.push(Inode::new(Kind::Fifo, n.meta.clone()));
                    t.entries_mut(id).unwrap().insert(name, child);
                }
            }
            _ => files.push(id),
        }
    }
    // An unreachable inode the writer must ignore.
    t.push(Inode::new(Kind::Fifo, Metadata::default()));
    t
}

/// Data extents of a file of `size` bytes with the given holes punched in (sorted, merged).
fn extents(size: u64, holes: &[(u64, u64)]) -> Vec<Extent> {
    let mut holes: Vec<(u64, u64)> = holes.iter().map(|&(o, l)| (o.min(size), (o + l).min(size))).collect();
    holes.sort();
    let mut out = Vec::new();
    let mut pos = 0u64;
    for (s, e) in holes {
        if s > pos {
            out.push(Extent { offset: pos, len: s - pos });
        }
        pos = pos.max(e);
    }
    if pos < size {
        out.push(Extent { offset: pos, len: size - pos });
    }
    out
}
