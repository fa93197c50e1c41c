//! Shared helpers for wisp's integration tests: requirements checks, tree comparison, fixtures.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

pub mod daemon;
pub mod registry;
pub mod tls;

/// Skips (returns false) with a reason, or panics when `WISP_REQUIRE_ALL=1` (CI: a skip is a failure).
pub fn require(ok: bool, why: &str) -> bool {
    if ok {
        return true;
    }
    if std::env::var_os("WISP_REQUIRE_ALL").is_some_and(|v| v == "1") {
        panic!("required test cannot run: {why}");
    }
    eprintln!("skipped: {why}");
    false
}

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

pub fn have(cmd: &str) -> bool {
    Command::new("sh").arg("-c").arg(format!("command -v {cmd}")).output().map(|o| o.status.success()).unwrap_or(false)
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn wisp_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_wisp"))
}

/// Runs a command, panicking with its output when it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The OCI digest of `bytes`: `sha256:<hex>`.
pub fn oci_digest(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

/// `chroot DIR sh -c CMD`; panics when it fails, returns stdout.
pub fn chroot(dir: &Path, cmd: &str) -> String {
    run(Command::new("chroot").arg(dir).args(["sh", "-c", cmd]))
}

/// `setpriv` as the unprivileged user nobody (uid and gid 65534, no supplementary groups); the caller
/// adds setpriv's further options and the command.
pub fn as_nobody() -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"]);
    cmd
}

/// The corpus's OCI layouts directory (`WISP_CORPUS_OCI` of `scripts/corpus env`), after building
/// `families` if they are missing.
pub fn corpus_oci(families: &[&str]) -> PathBuf {
    if !families.is_empty() {
        run(Command::new(repo_root().join("scripts/corpus")).arg("build").args(families));
    }
    let env = run(Command::new(repo_root().join("scripts/corpus")).arg("env"));
    PathBuf::from(env.lines().find_map(|l| l.strip_prefix("WISP_CORPUS_OCI=")).expect("WISP_CORPUS_OCI"))
}

/// A Debian bookworm minbase root file system made with debootstrap, cached across runs
/// (`scripts/debian-rootfs`).
pub fn debian_rootfs() -> PathBuf {
    let out = run(&mut Command::new(repo_root().join("scripts/debian-rootfs")));
    PathBuf::from(out.trim())
}

/// What one path looks like, for comparison.
#[derive(Debug, PartialEq, Eq)]
struct Entry {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: (i64, i64),
    size: u64,
    rdev: u64,
    target: Option<Vec<u8>>,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

fn kind_of(ft: fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_dir() {
        "dir"
    } else if ft.is_file() {
        "file"
    } else if ft.is_symlink() {
        "symlink"
    } else if ft.is_char_device() {
        "chr"
    } else if ft.is_block_device() {
        "blk"
    } else if ft.is_fifo() {
        "fifo"
    } else if ft.is_socket() {
        "sock"
    } else {
        "?"
    }
}

/// Every path under `root` (relative, as bytes), depth first, with its lstat.
fn list(root: &Path) -> Vec<(Vec<u8>, fs::Metadata)> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let abs = root.join(&rel);
        let meta = fs::symlink_metadata(&abs).unwrap_or_else(|e| panic!("lstat {}: {e}", abs.display()));
        if meta.is_dir() {
            for e in fs::read_dir(&abs).unwrap_or_else(|e| panic!("readdir {}: {e}", abs.display())) {
                stack.push(rel.join(e.unwrap().file_name()));
            }
        }
        out.push((rel.as_os_str().as_bytes().to_vec(), meta));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Every extended attribute of every path under `root` (relative path bytes -> name -> value), read
/// by `getfattr` (package attr), not by wisp's own code: `-R -P -h` walks without following symlinks
/// and reads a symlink's own xattrs, `-m -` takes every namespace, `-e hex` keeps binary values
/// intact. Paths without xattrs are absent.
pub fn tree_xattrs(root: &Path) -> HashMap<Vec<u8>, BTreeMap<Vec<u8>, Vec<u8>>> {
    let out = Command::new("getfattr")
        .env("LC_ALL", "C")
        .args(["-R", "-P", "-h", "-d", "-m", "-", "-e", "hex", "--absolute-names", "--"])
        .arg(root)
        .output()
        .unwrap_or_else(|e| panic!("spawning getfattr (package attr): {e}"));
    assert!(
        out.status.success(),
        "getfattr -R {} failed with {}: {}",
        root.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let prefix = root.as_os_str().as_bytes();
    let mut map: HashMap<Vec<u8>, BTreeMap<Vec<u8>, Vec<u8>>> = HashMap::new();
    let mut current: Option<Vec<u8>> = None;
    for line in out.stdout.split(|&b| b == b'\n') {
        if let Some(file) = line.strip_prefix(b"# file: ") {
            let file = unescape_getfattr(file);
            let rel = file
                .strip_prefix(prefix)
                .unwrap_or_else(|| panic!("getfattr printed {} outside {}", file.escape_ascii(), root.display()));
            let rel = rel.strip_prefix(b"/").unwrap_or(rel);
            current = Some(rel.to_vec());
        } else if !line.is_empty() {
            let file = current.as_ref().unwrap_or_else(|| panic!("getfattr: {} before a file", line.escape_ascii()));
            // Names have `=` escaped, so the first one separates the value.
            let eq = line.iter().position(|&b| b == b'=').expect("getfattr -d prints name=value");
            let hexv = line[eq + 1..].strip_prefix(b"0x").expect("getfattr -e hex prints 0x...");
            let value = hex::decode(hexv).unwrap_or_else(|e| panic!("getfattr value {}: {e}", line.escape_ascii()));
            map.entry(file.clone()).or_default().insert(unescape_getfattr(&line[..eq]), value);
        }
    }
    map
}

/// Undoes getfattr's quoting: `\ooo` (three octal digits) stands for one byte.
fn unescape_getfattr(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'\\' && i + 3 < s.len() && s[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b)) {
            out.push((s[i + 1] - b'0') * 64 + (s[i + 2] - b'0') * 8 + (s[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    out
}

fn same_content(a: &Path, b: &Path) -> Result<(), String> {
    let mut fa = File::open(a).map_err(|e| format!("open {}: {e}", a.display()))?;
    let mut fb = File::open(b).map_err(|e| format!("open {}: {e}", b.display()))?;
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    let mut off = 0u64;
    loop {
        let na = read_full(&mut fa, &mut ba).map_err(|e| format!("read {} at {off}: {e}", a.display()))?;
        let nb = read_full(&mut fb, &mut bb).map_err(|e| format!("read {} at {off}: {e}", b.display()))?;
        if na != nb || ba[..na] != bb[..nb] {
            let first = ba[..na.min(nb)].iter().zip(&bb[..na.min(nb)]).position(|(x, y)| x != y).unwrap_or(na.min(nb));
            return Err(format!("content differs at byte {}", off + first as u64));
        }
        if na == 0 {
            return Ok(());
        }
        off += na as u64;
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Options for [`compare_trees`].
#[derive(Debug, Clone, Default)]
pub struct CompareOptions {
    /// Compare the root directory's own metadata too.
    pub root_metadata: bool,
    /// Xattr names to ignore on both sides (e.g. ones the mount adds).
    pub ignore_xattrs: Vec<Vec<u8>>,
}

/// Compares two trees path by path: type, mode, uid, gid, mtime (ns), size, content, symlink target,
/// rdev, xattrs, and which paths share an inode. Nothing is read through wisp's code: metadata comes
/// from std's lstat, content from read(2), xattrs from `getfattr` ([`tree_xattrs`]). Returns one line per difference (empty = equal).
pub fn compare_trees(expected: &Path, actual: &Path, opts: &CompareOptions) -> Vec<String> {
    let a = list(expected);
    let b = list(actual);
    let (xa, xb) = (tree_xattrs(expected), tree_xattrs(actual));
    let mut diffs = Vec::new();
    let bmap: HashMap<&[u8], &fs::Metadata> = b.iter().map(|(p, m)| (p.as_slice(), m)).collect();
    let amap: HashMap<&[u8], &fs::Metadata> = a.iter().map(|(p, m)| (p.as_slice(), m)).collect();
    for (p, _) in &b {
        if !amap.contains_key(p.as_slice()) {
            diffs.push(format!("{}: unexpected path", String::from_utf8_lossy(p)));
        }
    }
    // Hard-link groups: paths sharing an inode, as sets of paths, on each side.
    let mut groups_a: HashMap<(u64, u64), Vec<&[u8]>> = HashMap::new();
    let mut groups_b: HashMap<(u64, u64), Vec<&[u8]>> = HashMap::new();
    for (p, ma) in &a {
        let name = String::from_utf8_lossy(p).into_owned();
        let Some(mb) = bmap.get(p.as_slice()) else {
            diffs.push(format!("{name}: missing"));
            continue;
        };
        let pa = expected.join(std::ffi::OsStr::from_bytes(p));
        let pb = actual.join(std::ffi::OsStr::from_bytes(p));
        if !ma.is_dir() {
            groups_a.entry((ma.dev(), ma.ino())).or_default().push(p);
            groups_b.entry((mb.dev(), mb.ino())).or_default().push(p);
        }
        if p.is_empty() && !opts.root_metadata {
            continue;
        }
        let entry = |path: &Path, m: &fs::Metadata, xattrs: &HashMap<Vec<u8>, BTreeMap<Vec<u8>, Vec<u8>>>| {
            let mut x = xattrs.get(p.as_slice()).cloned().unwrap_or_default();
            for n in &opts.ignore_xattrs {
                x.remove(n);
            }
            Entry {
                kind: kind_of(m.file_type()),
                mode: m.mode(),
                uid: m.uid(),
                gid: m.gid(),
                mtime: (m.mtime(), m.mtime_nsec()),
                size: if m.is_dir() { 0 } else { m.len() },
                rdev: m.rdev(),
                target: m.is_symlink().then(|| fs::read_link(path).unwrap().as_os_str().as_bytes().to_vec()),
                xattrs: x,
            }
        };
        let (ea, eb) = (entry(&pa, ma, &xa), entry(&pb, mb, &xb));
        if ea != eb {
            diffs.push(format!("{name}: metadata differs\n  expected {ea:?}\n  actual   {eb:?}"));
            continue;
        }
        if ma.is_file() {
            if let Err(e) = same_content(&pa, &pb) {
                diffs.push(format!("{name}: {e}"));
            }
        }
    }
    fn norm(g: HashMap<(u64, u64), Vec<&[u8]>>) -> Vec<Vec<&[u8]>> {
        let mut v: Vec<Vec<&[u8]>> = g
            .into_values()
            .map(|mut x| {
                x.sort();
                x
            })
            .filter(|x| x.len() > 1)
            .collect();
        v.sort();
        v
    }
    let (ga, gb) = (norm(groups_a), norm(groups_b));
    if ga != gb {
        let show = |g: &Vec<Vec<&[u8]>>| {
            g.iter()
                .map(|x| x.iter().map(|p| String::from_utf8_lossy(p).into_owned()).collect::<Vec<_>>().join(" = "))
                .collect::<Vec<_>>()
        };
        diffs.push(format!("hard-link groups differ:\n  expected {:?}\n  actual   {:?}", show(&ga), show(&gb)));
    }
    diffs
}

/// Data extents of a file as the kernel reports them through SEEK_DATA/SEEK_HOLE.
pub fn data_extents(path: &Path) -> Vec<(u64, u64)> {
    let f = File::open(path).unwrap();
    let size = f.metadata().unwrap().len();
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < size {
        let start = match rustix::fs::seek(&f, rustix::fs::SeekFrom::Data(pos)) {
            Ok(s) => s,
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => panic!("SEEK_DATA {}: {e}", path.display()),
        };
        let end = rustix::fs::seek(&f, rustix::fs::SeekFrom::Hole(start)).unwrap().min(size);
        out.push((start, end));
        pos = end;
    }
    out
}

/// `umoci unpack` of `layout:tag` under `tmp` (returns its rootfs); layers umoci cannot read (zstd, plain tar) are first
/// recompressed to gzip by skopeo (the tar bytes, and so the tree, stay the same).
pub fn umoci_unpack(layout: &Path, tag: &str, tmp: &Path) -> PathBuf {
    let gz = tmp.join(format!("gz-{tag}"));
    run(Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-compress", "--dest-compress-format", "gzip"])
        .arg(format!("oci:{}:{tag}", layout.display()))
        .arg(format!("oci:{}:{tag}", gz.display())));
    let bundle = tmp.join(format!("umoci-{tag}"));
    run(Command::new("umoci").args(["unpack", "--image"]).arg(format!("{}:{tag}", gz.display())).arg(&bundle));
    bundle.join("rootfs")
}
