//! A generated tree that exercises every case the EROFS writer must handle: all file types, sizes at
//! block boundaries, sparse files, big directories, long and non-UTF-8 names, hard links, xattrs of
//! every namespace (inline, shared, long), large ids, times before 1970 and after 2038, special modes.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use rustix::fs::{AtFlags, FileType, Mode, Timestamps, XattrFlags, CWD};

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24).to_le_bytes()[0]
        })
        .collect()
}

fn write(path: &Path, data: &[u8]) {
    fs::write(path, data).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

fn xattr(path: &Path, name: &str, value: &[u8]) {
    rustix::fs::lsetxattr(path, name, value, XattrFlags::empty())
        .unwrap_or_else(|e| panic!("setxattr {name} on {}: {e}", path.display()));
}

fn chown(path: &Path, uid: u32, gid: u32) {
    // SAFETY-free: from_raw is a plain constructor for ids.
    rustix::fs::chownat(
        CWD,
        path,
        Some(rustix::fs::Uid::from_raw(uid)),
        Some(rustix::fs::Gid::from_raw(gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
}

fn mknod(path: &Path, ft: FileType, major: u32, minor: u32) {
    rustix::fs::mknodat(CWD, path, ft, Mode::from_raw_mode(0o640), rustix::fs::makedev(major, minor))
        .unwrap_or_else(|e| panic!("mknod {}: {e}", path.display()));
}

fn set_mtime(path: &Path, sec: i64, nsec: i64) {
    let ts = rustix::fs::Timespec { tv_sec: sec, tv_nsec: nsec as _ };
    rustix::fs::utimensat(CWD, path, &Timestamps { last_access: ts, last_modification: ts }, AtFlags::SYMLINK_NOFOLLOW)
        .unwrap_or_else(|e| panic!("utimensat {}: {e}", path.display()));
}

/// A vfs_cap_data (revision 2) value granting CAP_NET_BIND_SERVICE, as `setcap` writes it.
const CAPABILITY_V2: [u8; 20] = [0, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

/// Builds the edge-case tree under `root` (which must exist and be empty). Needs root privileges.
pub fn make_edge_tree(root: &Path) {
    let p = |rel: &str| root.join(rel);
    // Regular files at and around block boundaries, and inline tails that end exactly on a block.
    fs::create_dir(p("sizes")).unwrap();
    let sizes = [
        0usize, 1, 2, 31, 32, 33, 100, 1000, 3968, 4000, 4031, 4032, 4033, 4064, 4095, 4096, 4097, 8191, 8192, 8193,
        12_288, 65_553, 1_048_579,
    ];
    for (i, &n) in sizes.iter().enumerate() {
        write(&p(&format!("sizes/f{n}")), &pseudo_random(i as u64 + 1, n));
    }
    // Tails of every length near a block, so some inline tail ends exactly at a block boundary
    // whatever the inode and xattr sizes are.
    for n in (4096 - 160..=4096).step_by(8).chain((8192 - 48..8192).step_by(4)) {
        write(&p(&format!("sizes/t{n}")), &pseudo_random(n as u64, n));
    }
    for n in [3000usize, 3900, 4000] {
        let f = p(&format!("sizes/x{n}"));
        write(&f, &pseudo_random(n as u64 * 7, n));
        xattr(&f, "user.pad", &[b'x'; 60]);
    }
    // Same content in several files (dedup of objects in --external mode).
    fs::create_dir(p("dups")).unwrap();
    for i in 0..5 {
        write(&p(&format!("dups/d{i}")), &pseudo_random(42, 10_000));
    }

    // Sparse files.
    fs::create_dir(p("sparse")).unwrap();
    let f = File::create(p("sparse/big")).unwrap();
    f.set_len(1 << 30).unwrap();
    f.write_all_at(&pseudo_random(5, 4096), 0).unwrap();
    f.write_all_at(&pseudo_random(6, 8192), 512 << 20).unwrap();
    f.write_all_at(b"end", (1 << 30) - 3).unwrap();
    let f = File::create(p("sparse/empty-10M")).unwrap();
    f.set_len(10 << 20).unwrap();
    let f = File::create(p("sparse/unaligned")).unwrap();
    f.set_len(3 << 20).unwrap();
    f.write_all_at(&pseudo_random(7, 100), (1 << 20) + 123).unwrap();
    f.write_all_at(&pseudo_random(8, 5000), (2 << 20) + 4000).unwrap();
    drop(f);

    // Directories: empty, deep, and one spanning many blocks.
    fs::create_dir_all(p("dirs/empty")).unwrap();
    fs::create_dir_all(p("dirs/a/b/c/d/e/f/g/h")).unwrap();
    write(&p("dirs/a/b/c/d/e/f/g/h/leaf"), b"leaf\n");
    fs::create_dir(p("dirs/big")).unwrap();
    for i in 0..3000 {
        let name = format!("entry-{i:05}-{}", "n".repeat(i % 40));
        if i % 500 == 0 {
            fs::create_dir(p(&format!("dirs/big/{name}"))).unwrap();
        } else {
            write(&p(&format!("dirs/big/{name}")), format!("{}\n", i % 10).as_bytes());
        }
    }

    // Names: 255 bytes, non-UTF-8, odd characters, sort-order traps.
    fs::create_dir(p("names")).unwrap();
    let names: Vec<Vec<u8>> = vec![
        vec![b'L'; 255],
        b"\xff\xfe-not-utf8-\xe9\x80".to_vec(),
        b"with space".to_vec(),
        b"new\nline".to_vec(),
        b".hidden".to_vec(),
        b"..dotdot".to_vec(),
        b"-dash".to_vec(),
        "\u{65e5}\u{672c}".as_bytes().to_vec(),
        b"~tilde".to_vec(),
        b"\x01ctl".to_vec(),
    ];
    for (i, n) in names.iter().enumerate() {
        write(&p("names").join(OsStr::from_bytes(n)), format!("name {i}\n").as_bytes());
    }

    // Symlinks, devices, fifo, socket.
    fs::create_dir(p("special")).unwrap();
    std::os::unix::fs::symlink("../sizes/f1", p("special/rel")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", p("special/abs")).unwrap();
    std::os::unix::fs::symlink("does/not/exist", p("special/dangling")).unwrap();
    std::os::unix::fs::symlink("t".repeat(3000), p("special/long-target")).unwrap();
    mknod(&p("special/null"), FileType::CharacterDevice, 1, 3);
    mknod(&p("special/sda1"), FileType::BlockDevice, 8, 1);
    mknod(&p("special/bigdev"), FileType::CharacterDevice, 4000, 300_000);
    mknod(&p("special/fifo"), FileType::Fifo, 0, 0);
    let sock = p("special/sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());

    // Hard links: across directories, to an empty file, to a symlink, to a device.
    fs::create_dir(p("links")).unwrap();
    write(&p("links/target"), &pseudo_random(9, 5000));
    fs::hard_link(p("links/target"), p("links/second")).unwrap();
    fs::hard_link(p("links/target"), p("dirs/third-link")).unwrap();
    write(&p("links/empty"), b"");
    fs::hard_link(p("links/empty"), p("links/empty2")).unwrap();
    rustix::fs::linkat(CWD, p("special/rel"), CWD, p("links/symlink-link"), AtFlags::empty()).unwrap();
    fs::hard_link(p("special/null"), p("links/null-link")).unwrap();

    // Xattrs of every namespace; inline, shared (same pair on many inodes), long.
    fs::create_dir(p("xattrs")).unwrap();
    let cap = p("xattrs/capable");
    write(&cap, b"\x7fELF pretend\n");
    xattr(&cap, "security.capability", &CAPABILITY_V2);
    fs::create_dir(p("xattrs/opaque")).unwrap();
    xattr(&p("xattrs/opaque"), "trusted.overlay.opaque", b"y");
    write(&p("xattrs/redirected"), b"r");
    xattr(&p("xattrs/redirected"), "trusted.overlay.redirect", b"/some/where/else");
    let many = p("xattrs/many");
    write(&many, b"many xattrs\n");
    for i in 0..20 {
        xattr(&many, &format!("user.k{i:02}"), format!("value {i}").as_bytes());
    }
    xattr(&many, "user.empty", b"");
    let long = p("xattrs/long");
    write(&long, b"long xattr value\n");
    xattr(&long, "user.long", &pseudo_random(11, 3000));
    for i in 0..12 {
        let f = p(&format!("xattrs/shared{i}"));
        write(&f, format!("shared {i}\n").as_bytes());
        xattr(&f, "user.shared", b"the same name and value on twelve inodes");
        xattr(&f, "trusted.shared", b"another shared pair");
    }
    std::os::unix::fs::symlink("capable", p("xattrs/symlink-with-xattr")).unwrap();
    xattr(&p("xattrs/symlink-with-xattr"), "trusted.sym", b"on a symlink");
    let acl = p("xattrs/acl");
    write(&acl, b"acl\n");
    fs::create_dir(p("xattrs/acl-dir")).unwrap();
    let status = Command::new("setfacl").args(["-m", "u:1234:rwx,g:5678:r-x"]).arg(&acl).status().unwrap();
    assert!(status.success(), "setfacl (package acl) failed");
    let status = Command::new("setfacl").args(["-d", "-m", "u:1234:rwx"]).arg(p("xattrs/acl-dir")).status().unwrap();
    assert!(status.success(), "setfacl -d failed");

    // Ownership and modes.
    fs::create_dir(p("owners")).unwrap();
    for (name, uid, gid) in
        [("small", 1000, 1000), ("big-uid", 70_000, 5), ("big-gid", 5, 100_000), ("max", 4_294_967_294, 4_294_967_294)]
    {
        let f = p(&format!("owners/{name}"));
        write(&f, name.as_bytes());
        chown(&f, uid, gid);
    }
    std::os::unix::fs::symlink("small", p("owners/symlink-owned")).unwrap();
    chown(&p("owners/symlink-owned"), 80_000, 80_001);
    fs::create_dir(p("modes")).unwrap();
    for (name, mode) in
        [("suid", 0o4755), ("sgid", 0o2755), ("none", 0o000), ("all", 0o777), ("suid-sgid-sticky", 0o7777)]
    {
        let f = p(&format!("modes/{name}"));
        write(&f, name.as_bytes());
        fs::set_permissions(&f, fs::Permissions::from_mode(mode)).unwrap();
    }
    fs::create_dir(p("modes/sticky-dir")).unwrap();
    fs::set_permissions(p("modes/sticky-dir"), fs::Permissions::from_mode(0o1777)).unwrap();
    fs::create_dir(p("modes/sgid-dir")).unwrap();
    fs::set_permissions(p("modes/sgid-dir"), fs::Permissions::from_mode(0o2750)).unwrap();

    // Times: before 1970, after 2038, nanoseconds, and the same time on many files.
    fs::create_dir(p("times")).unwrap();
    let times: [(&str, i64, i64); 6] = [
        ("epoch", 0, 0),
        ("before-1970", -1, 500_000_000),
        ("year-1900", -2_208_988_800, 1),
        ("after-2038", 2_200_000_000, 999_999_999),
        ("year-2100", 4_102_444_800, 0),
        ("nanos", 1_700_000_000, 123_456_789),
    ];
    for (name, _, _) in times {
        write(&p(&format!("times/{name}")), name.as_bytes());
    }

    // Finally every mtime, deepest first so directory times are not disturbed afterwards.
    let mut all: Vec<PathBuf> = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        all.push(d.clone());
        if fs::symlink_metadata(&d).unwrap().is_dir() {
            for e in fs::read_dir(&d).unwrap() {
                stack.push(e.unwrap().path());
            }
        }
    }
    all.sort_by_key(|x| std::cmp::Reverse(x.components().count()));
    for path in &all {
        set_mtime(path, 1_600_000_000, 0);
    }
    for (name, sec, nsec) in times {
        set_mtime(&p(&format!("times/{name}")), sec, nsec);
    }
    set_mtime(&p("times"), 1_650_000_000, 42);
    set_mtime(root, 1_650_000_001, 7);
}
