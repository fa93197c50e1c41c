//! Tests that need the VM kernel (6.1 with cachefiles on-demand, vm-tests/kernel.config): the
//! cachefiles session of the `fscache` crate against EROFS images written by the `erofs` crate.
//!
//! Each test is a plain `#[test]` that runs in two places. On the host it re-executes its own test binary
//! inside a fresh VM (`vm-tests/run -- <this binary> --exact <name> --nocapture --test-threads=1`, with
//! `WISP_IN_VM=1`) and asserts that exactly that test passed there; in the VM (`WISP_IN_VM=1`) it runs its
//! body. One VM per test: `/dev/cachefiles` has a single opener and a bound cache lives until the
//! session ends, so tests must not share a kernel. On the host the tests are opt-in: without
//! `WISP_VM_TESTS=1` they print why and pass, unless `WISP_REQUIRE_ALL=1` (scripts/test), which makes the
//! skip a failure. `WISP_VM_TIMEOUT` (seconds) overrides the runner's timeout.

use std::collections::{BTreeSet, HashMap};
use std::ffi::CString;
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use erofs::tree::{Digest, FileData, Inode, Kind, Metadata, Tree, ROOT};
use erofs::writer::{write_image, MemorySource, WriteOptions};
use fscache::cachefiles::{AlignedBuf, Device, ObjectFd, OpenRequest, Request, BLOCK};
use nix::poll::{PollFd, PollFlags, PollTimeout};
use rustix::mount::{mount, unmount, MountFlags, UnmountFlags};
use sha2::{Digest as _, Sha256};

mod common;

/// The name of the enclosing test function, as libtest's `--exact` wants it (no crate prefix).
macro_rules! test_name {
    () => {{
        fn f() {}
        let name = std::any::type_name_of_val(&f);
        let name = name.strip_suffix("::f").unwrap_or(name);
        name.split_once("::").map_or(name, |(_crate, rest)| rest)
    }};
}

/// True when the calling test should run its body here (inside the VM). On the host, runs the test in
/// the VM and checks its result, or skips; then returns false.
fn in_vm(name: &str) -> bool {
    in_vm_env(name, &[])
}

/// True on the host when the VM tests run (the host side of a test prepares its fixtures then).
fn vm_tests_enabled() -> bool {
    std::env::var_os("WISP_IN_VM").is_none() && std::env::var("WISP_VM_TESTS").as_deref() == Ok("1")
}

/// [`in_vm`] with extra environment variables for the guest (e.g. where the host put fixtures).
fn in_vm_env(name: &str, extra: &[(&str, String)]) -> bool {
    let env = |k: &str| std::env::var(k).ok();
    if env("WISP_IN_VM").is_some() {
        wisp_from_ram();
        return true;
    }
    if env("WISP_VM_TESTS").as_deref() != Some("1") {
        if env("WISP_REQUIRE_ALL").as_deref() == Some("1") {
            panic!("{name} runs in the VM: set WISP_VM_TESTS=1 (WISP_REQUIRE_ALL=1 makes skipping a failure)");
        }
        eprintln!("skipped: set WISP_VM_TESTS=1 to run {name} inside the VM (vm-tests/run)");
        return false;
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    let runner = Path::new(env!("CARGO_MANIFEST_DIR")).join("vm-tests/run");
    let mut cmd = Command::new(&runner);
    if let Some(t) = env("WISP_VM_TIMEOUT") {
        cmd.args(["--timeout", &t]);
    }
    for (k, v) in extra {
        cmd.args(["--env", &format!("{k}={v}")]);
    }
    cmd.args(["--env", "WISP_IN_VM=1", "--"]).arg(&exe).args(["--exact", name, "--nocapture", "--test-threads=1"]);
    let start = Instant::now();
    let out = cmd.output().unwrap_or_else(|e| panic!("running {}: {e}", runner.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    // Shown by libtest when the test fails, or with --nocapture.
    println!("--- {name} in the VM ({:.1}s, {}) ---\n{stdout}", start.elapsed().as_secs_f64(), out.status);
    println!("--- vm-tests/run stderr ---\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{name} failed in the VM ({}); its output is above", out.status);
    assert!(
        stdout.contains("test result: ok. 1 passed"),
        "{name}: the VM run passed but did not run exactly this test (name filter?)"
    );
    false
}

/// Guest side: the `wisp` binary (97 MB with debug info) runs from a copy in the guest's RAM, bind-mounted
/// over its 9p path. Twice, under host load 8-10 and after a full cold walk (4,469 files read through
/// 9p, the page cache dropped), a `wisp umount` client died of SIGSEGV before it had printed anything,
/// while its daemon (started earlier, its pages resident) kept working; the same test passed at lower
/// load. Its text pages are read from 9p again after `drop_caches`; running from tmpfs takes 9p out of
/// the picture. The test binary itself still runs from 9p. (GuestDaemon prints dmesg on failure.)
fn wisp_from_ram() {
    let bin = common::wisp_bin();
    let copy = Path::new("/tmp/wisp-bin");
    if copy.exists() {
        return;
    }
    std::fs::copy(&bin, copy).expect("copying the wisp binary into the guest's /tmp");
    common::run(Command::new("mount").arg("--bind").arg(copy).arg(&bin));
}

// ---- fixtures ----------------------------------------------------------------------------------------

/// An EROFS image whose regular files all live in external objects (device-table tags = sha256 hex).
struct Fixture {
    image: Arc<Vec<u8>>,
    /// name -> content, for every file in the root directory.
    files: Vec<(String, Vec<u8>)>,
    /// tag (sha256 hex) -> object content, for every device the image names.
    objects: HashMap<String, Arc<Vec<u8>>>,
    /// Device tags in device-table order.
    device_tags: Vec<String>,
}

fn sha256(bytes: &[u8]) -> Digest {
    Sha256::digest(bytes).into()
}

/// Three files of different sizes (one block, several blocks with a partial tail, tiny), written by
/// wisp's EROFS writer with their data external.
fn fixture() -> Fixture {
    let meta = |perm| Metadata { perm, uid: 0, gid: 0, mtime: 1_700_000_000, mtime_nsec: 0 };
    let pattern =
        |seed: u8, len: usize| (0..len).map(|i| seed.wrapping_add(u8::try_from(i % 251).unwrap())).collect::<Vec<u8>>();
    let files = vec![
        ("block".to_string(), pattern(1, BLOCK)),
        ("several".to_string(), pattern(7, 3 * BLOCK + 123)),
        ("tiny".to_string(), b"hello from an external object\n".to_vec()),
    ];
    let mut tree = Tree::new(meta(0o755));
    for (name, content) in &files {
        let size = u64::try_from(content.len()).unwrap();
        let data = FileData::External { size, digest: sha256(content) };
        let id = tree.push(Inode::new(Kind::Regular(data), meta(0o644)));
        tree.entries_mut(ROOT).unwrap().insert(name.clone().into_bytes(), id);
    }
    let mut image = Vec::new();
    let stats = write_image(&tree, &mut MemorySource::new(), &mut image, &WriteOptions::default())
        .expect("writing the EROFS image");
    assert_eq!(image.len() % BLOCK, 0, "the writer pads images to whole blocks");
    let device_tags: Vec<String> = stats.devices.iter().map(|d| hex::encode(d.digest)).collect();
    let objects: HashMap<String, Arc<Vec<u8>>> =
        files.iter().map(|(_, c)| (hex::encode(sha256(c)), Arc::new(c.clone()))).collect();
    assert_eq!(device_tags.iter().collect::<BTreeSet<_>>(), objects.keys().collect::<BTreeSet<_>>());
    Fixture { image: Arc::new(image), files, objects, device_tags }
}

/// A fresh cache on the scratch disk (ext4: tmpfs cannot back cachefiles on 6.1), bound on-demand.
fn bind_cache() -> Device {
    let dir = Path::new("/scratch/cache");
    std::fs::create_dir_all(dir).unwrap();
    let dev = Device::open().expect("opening /dev/cachefiles");
    dev.bind(dir, Some("wisp")).expect("dir /scratch/cache, tag wisp, bind ondemand");
    dev
}

// ---- a minimal daemon ----------------------------------------------------------------------------------

/// Decides an OPEN: `Some(bytes)` serves the object with these bytes, `None` refuses it with ENOENT.
type Policy<'a> = Box<dyn Fn(&OpenRequest) -> Option<Arc<Vec<u8>>> + 'a>;

/// Answers the kernel's requests from memory: each OPEN is asked of `policy` (Some(bytes): serve this
/// object; None: refuse with ENOENT), READs are filled from the object's bytes (zero-padded to whole
/// blocks), CLOSEs drop the object. Everything seen is recorded for the assertions.
struct Server<'a> {
    dev: &'a Device,
    policy: Policy<'a>,
    open_objects: HashMap<u32, (ObjectFd, Arc<Vec<u8>>)>,
    /// (volume key, cookie key, accepted) of every OPEN, in arrival order.
    opens: Vec<(String, String, bool)>,
    /// object ids of accepted OPENs, then of CLOSEs.
    accepted: Vec<u32>,
    closed: Vec<u32>,
    reads: usize,
}

impl<'a> Server<'a> {
    fn new(dev: &'a Device, policy: impl Fn(&OpenRequest) -> Option<Arc<Vec<u8>>> + 'a) -> Self {
        Server {
            dev,
            policy: Box::new(policy),
            open_objects: HashMap::new(),
            opens: Vec::new(),
            accepted: Vec::new(),
            closed: Vec::new(),
            reads: 0,
        }
    }

    /// Handles every pending request, waiting up to `wait` for the first.
    fn step(&mut self, wait: Duration) {
        let ms = u16::try_from(wait.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(self.dev.as_fd(), PollFlags::POLLIN)];
        nix::poll::poll(&mut fds, PollTimeout::from(ms)).expect("poll /dev/cachefiles");
        while let Some(req) = self.dev.read_message().expect("reading /dev/cachefiles") {
            self.handle(req);
        }
    }

    fn handle(&mut self, req: Request) {
        match req {
            Request::Open(open) => {
                let volume = String::from_utf8_lossy(&open.volume_key).into_owned();
                let cookie = String::from_utf8_lossy(&open.cookie_key).into_owned();
                match (self.policy)(&open) {
                    Some(bytes) => {
                        let size = u64::try_from(bytes.len().div_ceil(BLOCK) * BLOCK).unwrap();
                        self.dev.copen(open.msg_id, Ok(size)).expect("copen");
                        self.accepted.push(open.object_id);
                        self.opens.push((volume, cookie, true));
                        self.open_objects.insert(open.object_id, (open.fd, bytes));
                    }
                    None => {
                        self.dev.copen(open.msg_id, Err(libc::ENOENT)).expect("copen -ENOENT");
                        self.opens.push((volume, cookie, false));
                    }
                }
            }
            Request::Read(read) => {
                self.reads += 1;
                let (fd, bytes) = self
                    .open_objects
                    .get(&read.object_id)
                    .unwrap_or_else(|| panic!("READ for object {} that was never opened", read.object_id));
                let off = usize::try_from(read.off).unwrap();
                let len = usize::try_from(read.len).unwrap();
                assert!(off % BLOCK == 0 && len % BLOCK == 0, "unaligned READ {off}+{len}");
                let mut buf = AlignedBuf::zeroed(len);
                let end = (off + len).min(bytes.len());
                if off < end {
                    buf[..end - off].copy_from_slice(&bytes[off..end]);
                }
                fd.write_blocks(read.off, &buf).expect("writing object data");
                fd.read_complete(read.msg_id).expect("READ_COMPLETE");
            }
            Request::Close { object_id, .. } => {
                self.open_objects.remove(&object_id);
                self.closed.push(object_id);
            }
        }
    }

    /// Serves requests until `work` (a blocking mount, read or umount on another thread) returns.
    fn serve_while<T>(&mut self, what: &str, work: JoinHandle<T>, timeout: Duration) -> T {
        let deadline = Instant::now() + timeout;
        while !work.is_finished() {
            assert!(
                Instant::now() < deadline,
                "{what} did not finish within {timeout:?}; OPENs so far: {:?}",
                self.opens
            );
            self.step(Duration::from_millis(50));
        }
        work.join().unwrap_or_else(|_| panic!("{what} panicked"))
    }

    /// Serves requests until `done` holds or `timeout` passes; returns whether `done` held.
    fn serve_until(&mut self, timeout: Duration, done: impl Fn(&Self) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        while !done(self) {
            if Instant::now() >= deadline {
                return false;
            }
            self.step(Duration::from_millis(50));
        }
        true
    }
}

/// `mount -t erofs none TARGET -o <options>` through mount(2) on a new thread (it blocks until the
/// daemon has answered the primary blob's OPEN and READs).
fn spawn_mount(target: &Path, options: &str) -> JoinHandle<io::Result<()>> {
    let target = target.to_owned();
    let data = CString::new(options).unwrap();
    std::thread::spawn(move || {
        mount("none", &target, "erofs", MountFlags::RDONLY, data.as_c_str()).map_err(io::Error::from)
    })
}

fn spawn_umount(target: &Path) -> JoinHandle<io::Result<()>> {
    let target = target.to_owned();
    std::thread::spawn(move || unmount(&target, UnmountFlags::empty()).map_err(io::Error::from))
}

fn mountpoint() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap(); // the guest's /tmp (tmpfs)
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    (dir, mnt)
}

const WAIT: Duration = Duration::from_secs(120);

// ---- tests ---------------------------------------------------------------------------------------------

/// The VM itself: the kernel, the 9p root, the scratch disk and the environment vm-tests/run promises.
#[test]
fn vm_environment() {
    if !in_vm(test_name!()) {
        return;
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert!(release.starts_with("6.1."), "guest kernel {release}");
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let fstype = |dir: &str| {
        mounts.lines().find_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.get(1) == Some(&dir)).then(|| f[2].to_string())
        })
    };
    assert_eq!(fstype("/scratch").as_deref(), Some("ext4"), "{mounts}");
    assert_eq!(fstype("/tmp").as_deref(), Some("tmpfs"), "{mounts}");
    assert_eq!(fstype("/sys/fs/cgroup").as_deref(), Some("cgroup2"), "{mounts}");
    assert_eq!(fstype("/work").or(fstype("/usr")).as_deref(), Some("9p"), "{mounts}");
    let filesystems = std::fs::read_to_string("/proc/filesystems").unwrap();
    for fs in ["erofs", "overlay", "ext4"] {
        assert!(filesystems.split_whitespace().any(|f| f == fs), "no {fs} in /proc/filesystems");
    }
    assert!(Path::new("/dev/cachefiles").exists());
    assert_eq!(std::env::var("HOME").as_deref(), Ok("/scratch"));
    assert_eq!(std::env::current_dir().unwrap(), Path::new(env!("CARGO_MANIFEST_DIR")));
    let err = std::fs::write(Path::new(env!("CARGO_MANIFEST_DIR")).join(".vm-write-probe"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "the host root must be read-only: {err}");
}

/// The primary blob's OPEN names the volume `erofs,<domain_id>` (or `erofs,<fsid>` without a domain) and
/// the cookie `<fsid>`; refusing it with copen -ENOENT makes mount(2) fail instead of hang.
#[test]
fn cachefiles_refused_primary_fails_mount() {
    if !in_vm(test_name!()) {
        return;
    }
    let dev = bind_cache();
    for (options, volume) in [
        ("fsid=wisp-vm-nodomain", "erofs,wisp-vm-nodomain"),
        ("fsid=wisp-vm-img1,domain_id=wisp-vm-d1", "erofs,wisp-vm-d1"),
    ] {
        let fsid = options.split(',').next().unwrap().strip_prefix("fsid=").unwrap();
        let (_dir, mnt) = mountpoint();
        let mut srv = Server::new(&dev, |_| None);
        let result = srv.serve_while("mount", spawn_mount(&mnt, options), WAIT);
        println!("mount -o {options}: {result:?}; OPENs: {:?}", srv.opens);
        let err = result.expect_err("the mount must fail when the primary blob is refused");
        assert_ne!(err.raw_os_error(), Some(libc::EBUSY), "{err}");
        assert_eq!(srv.opens, vec![(volume.to_string(), fsid.to_string(), false)]);
        assert_eq!(srv.reads, 0);
    }
}

/// With the primary blob served from an image written by wisp's writer, the mount succeeds and every
/// device-table slot becomes an OPEN whose cookie key is the slot's tag (the sha256 hex of the object) in
/// the image's volume; refusing those with -ENOENT makes reads fail with an error (not hang, not zeros).
#[test]
fn cachefiles_device_opens_carry_object_tags() {
    if !in_vm(test_name!()) {
        return;
    }
    let fx = fixture();
    let dev = bind_cache();
    let (_dir, mnt) = mountpoint();
    let fsid = "wisp-vm-img2";
    let image = fx.image.clone();
    let mut srv = Server::new(&dev, |open| (open.cookie_key == fsid.as_bytes()).then(|| image.clone()));
    srv.serve_while("mount", spawn_mount(&mnt, &format!("fsid={fsid},domain_id=wisp-vm-d2")), WAIT)
        .expect("mounting with the primary blob served");
    // Device cookies are looked up asynchronously: their OPENs may arrive after mount(2) returns.
    let n = fx.device_tags.len();
    let all = srv.serve_until(WAIT, |s| s.opens.len() > n);
    println!("OPENs: {:?}; READs: {}", srv.opens, srv.reads);
    assert!(all, "expected {} OPENs (primary + {n} devices), got {:?}", n + 1, srv.opens);
    assert_eq!(srv.opens[0], ("erofs,wisp-vm-d2".to_string(), fsid.to_string(), true), "the primary comes first");
    assert!(srv.reads > 0, "the superblock must have been read through the daemon");
    let volumes: BTreeSet<&str> = srv.opens.iter().map(|(v, _, _)| v.as_str()).collect();
    assert_eq!(volumes, BTreeSet::from(["erofs,wisp-vm-d2"]));
    let tags: BTreeSet<&str> = srv.opens[1..].iter().map(|(_, c, _)| c.as_str()).collect();
    let want: BTreeSet<&str> = fx.device_tags.iter().map(String::as_str).collect();
    assert_eq!(tags, want, "device OPENs must name the device-table tags");
    for (tag, content) in &fx.objects {
        assert_eq!(*tag, hex::encode(sha256(content)));
    }

    // Every device was refused: reading a file must fail, promptly.
    let path = mnt.join(&fx.files[0].0);
    let read = srv.serve_while("read", std::thread::spawn(move || std::fs::read(path)), WAIT);
    println!("read of a refused object: {read:?}");
    assert!(read.is_err(), "a file whose object was refused read as {:?} bytes", read.map(|b| b.len()));

    srv.serve_while("umount", spawn_umount(&mnt), WAIT).expect("umount");
    let primary = srv.accepted[0];
    assert!(srv.serve_until(Duration::from_secs(30), |s| s.closed.contains(&primary)), "no CLOSE for the primary blob");
}

/// End to end: primary and objects served by the daemon, every file of the image reads back byte-exact
/// through the kernel (cachefiles READ, anon-fd writes, READ_COMPLETE); after dropping the page cache, a
/// second pass is served from the cache files on /scratch without a single READ.
#[test]
fn cachefiles_serves_external_files() {
    if !in_vm(test_name!()) {
        return;
    }
    let fx = fixture();
    let dev = bind_cache();
    let (_dir, mnt) = mountpoint();
    let fsid = "wisp-vm-img3";
    let image = fx.image.clone();
    let objects = fx.objects.clone();
    let mut srv = Server::new(&dev, |open| {
        if open.cookie_key == fsid.as_bytes() {
            Some(image.clone())
        } else {
            std::str::from_utf8(&open.cookie_key).ok().and_then(|tag| objects.get(tag).cloned())
        }
    });
    srv.serve_while("mount", spawn_mount(&mnt, &format!("fsid={fsid},domain_id=wisp-vm-d3")), WAIT)
        .expect("mounting with everything served");
    for pass in 0..2 {
        let reads_before = srv.reads;
        for (name, content) in &fx.files {
            let path = mnt.join(name);
            let got = srv
                .serve_while("read", std::thread::spawn(move || std::fs::read(path)), WAIT)
                .unwrap_or_else(|e| panic!("reading {name}: {e}"));
            assert!(got == *content, "{name}: {} bytes read, {} expected, contents differ", got.len(), content.len());
        }
        println!("pass {pass}: {} READs", srv.reads - reads_before);
        if pass == 1 {
            assert_eq!(srv.reads, reads_before, "the second pass must be served by the cache files");
        }
        // Forget the page cache, so the second pass reads the cache files that the first one filled.
        std::fs::write("/proc/sys/vm/drop_caches", "3").expect("drop_caches");
    }
    assert!(srv.opens.iter().all(|(_, _, accepted)| *accepted), "{:?}", srv.opens);
    srv.serve_while("umount", spawn_umount(&mnt), WAIT).expect("umount");
}

// ---- the daemon with the cachefiles frontend -------------------------------------------------------------

/// Host side: the corpus's python v1 converted by `wisp convert` into a registry storage directory
/// (through a registry on 127.0.0.1:5101, stopped afterwards).
struct PythonFixture {
    dir: PathBuf,
}

impl PythonFixture {
    /// `port`: the host registry used while building (one per test: tests run in parallel);
    /// `oracle`: also `wisp pull --eager` v1 into `oracle-v1`.
    fn build(port: &str, oracle: bool) -> PythonFixture {
        let dir = PathBuf::from(format!("/var/tmp/wisp-vm-cachefiles-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let root = common::repo_root();
        let registry =
            |args: &[&str]| common::run(Command::new(root.join("scripts/registry")).args(args).args(["--port", port]));
        let _ = Command::new(root.join("scripts/registry")).args(["stop", "--port", port]).status();
        registry(&["start", "--root", dir.join("registry").to_str().unwrap()]);
        let env = common::run(Command::new(root.join("scripts/corpus")).arg("env"));
        let oci = env.lines().find_map(|l| l.strip_prefix("WISP_CORPUS_OCI=")).expect("WISP_CORPUS_OCI").to_owned();
        common::run(Command::new(root.join("scripts/corpus")).args(["build", "python"]));
        let result = std::panic::catch_unwind(|| {
            common::run(Command::new(common::wisp_bin()).args([
                "convert",
                &format!("oci:{oci}/python:v1"),
                &format!("docker://127.0.0.1:{port}/wisp/python:v1"),
                "--plain-http",
            ]));
            if oracle {
                common::run(
                    Command::new(common::wisp_bin())
                        .args(["pull", "--eager", &format!("docker://127.0.0.1:{port}/wisp/python:v1")])
                        .arg(dir.join("oracle-v1"))
                        .arg("--plain-http"),
                );
            }
        });
        registry(&["stop"]);
        if let Err(e) = result {
            std::panic::resume_unwind(e);
        }
        PythonFixture { dir }
    }
}

impl Drop for PythonFixture {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Guest side: a `wisp daemon` (supervisor + worker) with its cache and state on /scratch.
struct GuestDaemon {
    child: std::process::Child,
    state: PathBuf,
}

impl GuestDaemon {
    fn start(args: &[&str], env: &[(&str, &str)]) -> GuestDaemon {
        let state = PathBuf::from("/scratch/state");
        let log = std::fs::File::create("/scratch/daemon.log").unwrap();
        let child = Command::new(common::wisp_bin())
            .args(["daemon", "--cache", "/scratch/cache", "--state", "/scratch/state"])
            .args(args)
            .env("WISP_LOG", "info")
            .envs(env.iter().copied())
            .stderr(log)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let sock = state.join("control.sock");
        let t = Instant::now();
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            assert!(t.elapsed() < WAIT, "the daemon did not start: {}", daemon_log());
            std::thread::sleep(Duration::from_millis(100));
        }
        GuestDaemon { child, state }
    }

    fn wisp(&self, args: &[&str]) -> String {
        common::run(Command::new(common::wisp_bin()).args(args).arg("--state").arg(&self.state))
    }

    fn call(&self, req: &wisp::daemon::protocol::Request) -> serde_json::Value {
        wisp::daemon::protocol::call(&self.state.join("control.sock"), req, Some(WAIT)).unwrap()
    }

    /// `wisp mount IMAGE DIR/mnt --upper DIR/upper --work DIR/work`; returns the mount point.
    fn mount(&self, image: &str, dir: &Path) -> PathBuf {
        for d in ["mnt", "upper", "work"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        let (mnt, upper, work) = (dir.join("mnt"), dir.join("upper"), dir.join("work"));
        let args = [image, mnt.to_str().unwrap(), "--upper", upper.to_str().unwrap(), "--work", work.to_str().unwrap()];
        let out = self.wisp(&[&["mount"][..], &args, &["--plain-http"]].concat());
        println!("{}", out.trim());
        mnt
    }
}

impl Drop for GuestDaemon {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap()),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
        if std::thread::panicking() {
            println!("--- daemon log ---\n{}", daemon_log());
            // The console is quiet (loglevel 1): kernel messages (a process's segfault, an oops) are
            // only in the ring buffer.
            let dmesg = Command::new("dmesg").output().map(|o| o.stdout).unwrap_or_default();
            let dmesg = String::from_utf8_lossy(&dmesg);
            let lines: Vec<&str> = dmesg.lines().collect();
            println!("--- dmesg (last 60 lines) ---\n{}", lines[lines.len().saturating_sub(60)..].join("\n"));
        }
    }
}

fn daemon_log() -> String {
    std::fs::read_to_string("/scratch/daemon.log").unwrap_or_default()
}

/// The guest's registry (docker-registry on 127.0.0.1:5000, storage copied to /scratch).
fn guest_registry(fixture: &Path) -> PathBuf {
    let root = common::repo_root();
    common::run(Command::new("cp").arg("-a").arg(fixture.join("registry")).arg("/scratch/registry"));
    common::run(Command::new(root.join("scripts/registry")).args(["start", "--root", "/scratch/registry"]));
    PathBuf::from("/tmp/wisp-registry/5000/registry.log")
}

/// Blob GETs the registry served since byte `offset` of its access log: (digest, bytes).
fn blobs_served(log: &Path, offset: u64) -> Vec<(String, u64)> {
    let bytes = std::fs::read(log).unwrap();
    let text = String::from_utf8_lossy(&bytes[usize::try_from(offset).unwrap()..]).into_owned();
    text.lines()
        .filter(|l| l.contains("\"GET /v2/") && l.contains("/blobs/sha256:"))
        .filter_map(|l| {
            let digest = l.split("/blobs/").nth(1)?.split(' ').next()?.to_owned();
            let after = l.split("HTTP/1.1\" ").nth(1)?;
            let mut it = after.split(' ');
            (it.next()? == "200").then_some(())?;
            Some((digest, it.next()?.parse().ok()?))
        })
        .collect()
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

fn chroot(dir: &Path, cmd: &str) -> String {
    common::run(Command::new("chroot").arg(dir).args(["sh", "-c", cmd]))
}

/// `wisp daemon` with `--frontend auto` on the 6.1 kernel (no fanotify pre-content events) serves
/// cachefiles: the python app image, converted and served by a registry inside the VM, starts from a
/// lazy mount fetching at most 25% of its stored bytes (counted from the registry's access log);
/// writes land in the upper dir while the lower (EROFS over the cache) keeps the original bytes.
#[test]
fn daemon_cachefiles_python_lazy_start() {
    let fixture = vm_tests_enabled().then(|| PythonFixture::build("5101", true));
    let env = fixture_env(fixture.as_ref());
    if !in_vm_env(test_name!(), &env) {
        return;
    }
    let fx = guest_fixture();
    let log = guest_registry(&fx);
    let d = GuestDaemon::start(&["--frontend", "auto"], &[]);
    let status = d.call(&wisp::daemon::protocol::Request::Status);
    assert_eq!(status["frontend"], "cachefiles", "auto must pick cachefiles on 6.1: {status}");
    let v1 = "docker://127.0.0.1:5000/wisp/python:v1";

    // Cold start.
    let off = file_len(&log);
    let t = Instant::now();
    let mnt = d.mount(v1, Path::new("/scratch/c1"));
    let out = chroot(&mnt, "python3 -c 'import json, email; print(1)'");
    let startup = t.elapsed();
    assert_eq!(out, "1\n");
    let served = blobs_served(&log, off);
    let wire: u64 = served.iter().map(|(_, n)| n).sum();
    let stats: serde_json::Value = serde_json::from_str(&d.wisp(&["stats", "--json"])).unwrap();
    let img = &stats["images"][0];
    let stored = img["stored_bytes"].as_u64().unwrap();
    let content = img["content_bytes"].as_u64().unwrap();
    println!(
        "cold start (TCG): {:.1}s; registry served {} blobs, {:.2} MB (index + objects) = {:.1}% of the image's {:.1} MB of stored objects ({:.1} MB content); daemon: {} objects, {:.2} MB",
        startup.as_secs_f64(),
        served.len(),
        wire as f64 / 1e6,
        100.0 * wire as f64 / stored as f64,
        stored as f64 / 1e6,
        content as f64 / 1e6,
        img["objects_fetched"],
        img["bytes_fetched"].as_f64().unwrap_or(0.0) / 1e6
    );
    assert!(wire * 4 <= stored, "startup fetched {wire} bytes, more than 25% of {stored}");
    assert!(img["objects_fetched"].as_u64().unwrap() > 0, "{stats}");

    // The full tree, byte for byte and in metadata, against the eager pull (host side, same registry):
    // the lower EROFS mount, since python has just written .pyc files into the overlay's upper dir.
    let status = d.call(&wisp::daemon::protocol::Request::Status);
    let lower = PathBuf::from(status["mounts"][0]["lower"].as_str().unwrap());
    let t = Instant::now();
    let diffs = common::compare_trees(&fx.join("oracle-v1"), &lower, &common::CompareOptions::default());
    assert!(diffs.is_empty(), "{} differences, first: {:#?}", diffs.len(), &diffs[..diffs.len().min(10)]);
    let stats: serde_json::Value = serde_json::from_str(&d.wisp(&["stats", "--json"])).unwrap();
    println!(
        "full walk (TCG): {:.1}s, the tree equals the eager pull; READ handling {}",
        t.elapsed().as_secs_f64(),
        stats["frontend"]["read"]
    );
    let orig = std::fs::read(mnt.join("app/main.py")).unwrap();

    // Writes land in the upper dir; the lower (EROFS over the cachefiles cache) keeps the original.
    chroot(&mnt, "echo written > /root/wisp-write && echo more >> /app/main.py");
    let upper = Path::new("/scratch/c1/upper");
    assert_eq!(std::fs::read_to_string(upper.join("root/wisp-write")).unwrap(), "written\n");
    assert!(std::fs::read_to_string(upper.join("app/main.py")).unwrap().ends_with("more\n"));
    let rec = &status["mounts"][0];
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    assert_eq!(std::fs::read(lower.join("app/main.py")).unwrap(), orig, "the write reached the lower layer");
    assert!(rec["fsid"].is_string(), "a cachefiles mount records its fsid: {rec}");

    d.wisp(&["umount", mnt.to_str().unwrap()]);
    drop(fixture);
}

/// kill -9 of the worker (the process that reads requests and fills data) while a cold walk has READs
/// in flight: the supervisor still holds /dev/cachefiles, the new worker sends `restore`, and the walk
/// completes with every byte equal to the eager pull; no read fails. Each fetch is delayed 300 ms
/// (WISP_TEST_FETCH_DELAY_MS) so the kill lands while the walk is still fetching.
#[test]
fn daemon_cachefiles_worker_kill9_restore() {
    let fixture = vm_tests_enabled().then(|| PythonFixture::build("5102", true));
    let env = fixture_env(fixture.as_ref());
    if !in_vm_env(test_name!(), &env) {
        return;
    }
    let fx = guest_fixture();
    guest_registry(&fx);
    let d = GuestDaemon::start(&["--frontend", "cachefiles"], &[("WISP_TEST_FETCH_DELAY_MS", "300")]);
    let mnt = d.mount("docker://127.0.0.1:5000/wisp/python:v1", Path::new("/scratch/c1"));
    let sub = "usr/lib/python3.11/email";
    let (want, got) = (fx.join("oracle-v1").join(sub), mnt.join(sub));
    let walk = std::thread::spawn(move || common::compare_trees(&want, &got, &common::CompareOptions::default()));
    std::thread::sleep(Duration::from_secs(2));
    assert!(!walk.is_finished(), "the walk finished before the kill; the test would prove nothing");
    let old: i32 = std::fs::read_to_string("/scratch/state/worker.pid").unwrap().trim().parse().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(old), nix::sys::signal::Signal::SIGKILL).unwrap();
    println!("killed worker {old} during the walk");
    let diffs = walk.join().unwrap();
    assert!(diffs.is_empty(), "{} differences, first: {:#?}", diffs.len(), &diffs[..diffs.len().min(10)]);
    let status = d.call(&wisp::daemon::protocol::Request::Status);
    assert_ne!(status["worker_pid"].as_i64(), Some(i64::from(old)), "a new worker answers: {status}");
    assert!(daemon_log().contains("worker died"), "{}", daemon_log());
    // Once filled, the cache files serve the tree without the daemon's help.
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    let diffs =
        common::compare_trees(&fx.join("oracle-v1").join(sub), &mnt.join(sub), &common::CompareOptions::default());
    assert!(diffs.is_empty(), "after drop_caches: {diffs:#?}");
    d.wisp(&["umount", mnt.to_str().unwrap()]);
    drop(fixture);
}

// ---- containerd with the cachefiles frontend --------------------------------------------------------------

/// A guest process (containerd, `wisp snapshotter`) with its output in a log file; SIGTERM (then
/// SIGKILL after 30 s) on drop, and its log printed when the test fails.
struct GuestProc {
    child: std::process::Child,
    log: PathBuf,
}

impl GuestProc {
    fn spawn(cmd: &mut Command, log: &Path) -> GuestProc {
        let f = std::fs::File::create(log).unwrap();
        let child = cmd
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .stdin(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
        GuestProc { child, log: log.to_owned() }
    }

    /// Waits (up to `WAIT`) until `ready` holds; panics with the log if the process exits or it times out.
    fn wait_ready(&mut self, what: &str, mut ready: impl FnMut() -> bool) {
        let t = Instant::now();
        while !ready() {
            let log = || std::fs::read_to_string(&self.log).unwrap_or_default();
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{what} exited ({status}) before it was ready:\n{}", log());
            }
            assert!(t.elapsed() < WAIT, "{what} was not ready within {WAIT:?}:\n{}", log());
            std::thread::sleep(Duration::from_millis(200));
        }
        println!("{what} ready after {:.1}s", t.elapsed().as_secs_f64());
    }
}

impl Drop for GuestProc {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let t = Instant::now();
        while !matches!(self.child.try_wait(), Ok(Some(_))) {
            if t.elapsed() > Duration::from_secs(30) {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            println!("--- {} ---\n{log}", self.log.display());
        }
    }
}

/// `ctr --address SOCK ARGS...`; panics with its output when it fails, returns stdout.
fn ctr(sock: &Path, args: &[&str]) -> String {
    common::run(Command::new("ctr").arg("--address").arg(sock).args(args))
}

/// Regular files under `dir` (recursively) and their allocated bytes.
fn files_allocated(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let (mut n, mut bytes) = (0, 0);
    let Ok(rd) = std::fs::read_dir(dir) else { return (0, 0) };
    for e in rd {
        let e = e.unwrap();
        let meta = std::fs::symlink_metadata(e.path()).unwrap();
        if meta.is_dir() {
            let (a, b) = files_allocated(&e.path());
            n += a;
            bytes += b;
        } else if meta.is_file() {
            n += 1;
            bytes += meta.blocks() * 512;
        }
    }
    (n, bytes)
}

/// Issue 8 in the VM: Debian's containerd 1.6 and runc (the host's binaries over the 9p root) with
/// `wisp snapshotter` and `wisp daemon`, whose `--frontend auto` picks cachefiles on 6.1. containerd
/// pulls the converted python app image from the guest registry (only its config and index layer) and
/// `ctr run --rm --net-host` (no CNI: the kernel has no netfilter) runs python in it; the registry's
/// access log shows the pull and the run together fetched at most 25% of the image's stored objects,
/// and the data arrived through the kernel's cachefiles cache (the daemon's own object directory stays
/// empty with this frontend). `ctr image rm --sync` then releases the lazy mount.
#[test]
fn containerd_cachefiles_ctr_run() {
    let fixture = vm_tests_enabled().then(|| PythonFixture::build("5160", false));
    let env = fixture_env(fixture.as_ref());
    if !in_vm_env(test_name!(), &env) {
        return;
    }
    let started = Instant::now();
    let fx = guest_fixture();
    let log = guest_registry(&fx);
    println!("guest registry up at {:.1}s", started.elapsed().as_secs_f64());
    let d = GuestDaemon::start(&["--frontend", "auto"], &[]);
    println!("wisp daemon up at {:.1}s", started.elapsed().as_secs_f64());
    let status = d.call(&wisp::daemon::protocol::Request::Status);
    assert_eq!(status["frontend"], "cachefiles", "auto must pick cachefiles on 6.1: {status}");

    // containerd's root (content store, its own snapshotters) on the ext4 scratch disk, its state, the
    // runc/shim state and the sockets on /run (tmpfs); the host root is read-only.
    let cdir = Path::new("/scratch/containerd");
    let run = Path::new("/run/wisp-ctr");
    std::fs::create_dir_all(cdir).unwrap();
    std::fs::create_dir_all(run).unwrap();
    let (sock, snap_sock, snap_root) =
        (run.join("containerd.sock"), run.join("snapshotter.sock"), PathBuf::from("/scratch/snapshotter"));

    let t = Instant::now();
    let mut snapshotter = GuestProc::spawn(
        Command::new(common::wisp_bin())
            .args(["snapshotter", "--root"])
            .arg(&snap_root)
            .arg("--address")
            .arg(&snap_sock)
            .args(["--daemon-state", "/scratch/state", "--containerd"])
            .arg(&sock)
            .arg("--plain-http")
            .env("WISP_LOG", "info"),
        Path::new("/scratch/snapshotter.log"),
    );
    snapshotter.wait_ready("wisp snapshotter", || std::os::unix::net::UnixStream::connect(&snap_sock).is_ok());

    let config = format!(
        "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
         disabled_plugins = [\"io.containerd.grpc.v1.cri\", \"io.containerd.snapshotter.v1.aufs\", \
         \"io.containerd.snapshotter.v1.btrfs\", \"io.containerd.snapshotter.v1.zfs\", \
         \"io.containerd.snapshotter.v1.devmapper\"]\n\
         [grpc]\n  address = \"{sock}\"\n\
         [plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{opt}\"\n\
         [proxy_plugins]\n  [proxy_plugins.wisp]\n    type = \"snapshot\"\n    address = \"{snap}\"\n",
        root = cdir.join("root").display(),
        state = run.join("state").display(),
        sock = sock.display(),
        opt = cdir.join("opt").display(),
        snap = snap_sock.display(),
    );
    std::fs::write(cdir.join("config.toml"), config).unwrap();
    let t_ctd = Instant::now();
    let mut containerd = GuestProc::spawn(
        Command::new("containerd").arg("--config").arg(cdir.join("config.toml")),
        &cdir.join("containerd.log"),
    );
    containerd.wait_ready("containerd", || {
        Command::new("ctr").arg("--address").arg(&sock).arg("version").output().is_ok_and(|o| o.status.success())
    });
    let ctd_start = t_ctd.elapsed();
    let setup = t.elapsed();

    let image = "127.0.0.1:5000/wisp/python:v1";
    let off = file_len(&log);
    let t = Instant::now();
    ctr(&sock, &["images", "pull", "--plain-http", "--snapshotter", "wisp", image]);
    let pull = t.elapsed();
    let pulled = blobs_served(&log, off);
    let pulled_bytes: u64 = pulled.iter().map(|(_, n)| n).sum();
    assert!(pulled.len() <= 2, "the pull fetched more than the config and the index layer: {pulled:?}");

    // The image's objects, from the index layer containerd unpacked into the snapshotter.
    let maps: Vec<Vec<wisp::object::ObjectEntry>> = std::fs::read_dir(snap_root.join("snapshots"))
        .unwrap()
        .filter_map(|e| std::fs::read(e.unwrap().path().join("fs/wisp/objects.map")).ok())
        .map(|b| wisp::index::objmap::decode(&b).unwrap())
        .collect();
    assert_eq!(maps.len(), 1, "one unpacked wisp index layer");
    let stored: u64 = maps[0].iter().map(|e| e.stored_size).sum();

    // The run. While it runs, the daemon's mount record is sampled (printed, not asserted: with --rm
    // the mount may be gone before a sample lands; the cache files below are the evidence).
    let off = file_len(&log);
    let t = Instant::now();
    let child = Command::new("ctr")
        .arg("--address")
        .arg(&sock)
        .args(["run", "--snapshotter", "wisp", "--rm", "--net-host", image, "c1"])
        .args(["python3", "-c", "import json, email; print(1)"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let sampler = {
        let sock = d.state.join("control.sock");
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let h = std::thread::spawn(move || {
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                let req = wisp::daemon::protocol::Request::Status;
                if let Ok(s) = wisp::daemon::protocol::call(&sock, &req, Some(WAIT)) {
                    if let Some(m) = s["mounts"].as_array().and_then(|m| m.first()) {
                        return Some(m.clone());
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            None
        });
        (stop, h)
    };
    let out = child.wait_with_output().unwrap();
    let ctr_run = t.elapsed();
    sampler.0.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = sampler.1.join().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "ctr run: {}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout, "1\n");
    println!("the daemon's mount during the run: {seen:?}");
    if let Some(m) = &seen {
        assert_eq!(m["lower_only"], true, "{m}");
        assert!(m["fsid"].is_string(), "a cachefiles mount records its fsid: {m}");
    }
    let served = blobs_served(&log, off);
    let wire: u64 = served.iter().map(|(_, n)| n).sum();

    // The daemon's own object directory (the fanotify frontend's node cache) got no data: with
    // cachefiles the kernel's cache files hold it (as O_TMPFILEs while their cookies live).
    let (obj_files, obj_bytes) = files_allocated(Path::new("/scratch/cache/objects"));
    println!(
        "containerd up in {:.1}s (snapshotter + containerd {:.1}s); pull {:.1}s: {} blobs, {:.2} MB; ctr run {:.1}s: {} blobs, {:.2} MB; \
         pull + run {:.2} MB = {:.1}% of the image's {:.1} MB of stored objects ({} objects); objects dir: {obj_files} files, {obj_bytes} bytes",
        ctd_start.as_secs_f64(),
        setup.as_secs_f64(),
        pull.as_secs_f64(),
        pulled.len(),
        pulled_bytes as f64 / 1e6,
        ctr_run.as_secs_f64(),
        served.len(),
        wire as f64 / 1e6,
        (pulled_bytes + wire) as f64 / 1e6,
        100.0 * (pulled_bytes + wire) as f64 / stored as f64,
        stored as f64 / 1e6,
        maps[0].len(),
    );
    assert!(!served.is_empty(), "the run fetched no object: the image was not served lazily by wisp");
    assert!(
        (pulled_bytes + wire) * 4 <= stored,
        "pull + run fetched {} bytes, more than 25% of {stored}",
        pulled_bytes + wire
    );
    assert_eq!(obj_bytes, 0, "object data in the daemon's objects dir: not the cachefiles frontend");

    // --rm deleted the container; containerd's garbage collection then removes its snapshot, the last
    // user of the lazy mount, which the daemon unmounts.
    let t = Instant::now();
    loop {
        let status = d.call(&wisp::daemon::protocol::Request::Status);
        if status["mounts"].as_array().is_some_and(Vec::is_empty) {
            break;
        }
        assert!(t.elapsed() < WAIT, "the lazy mount outlived the container: {status}");
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("lazy mount released {:.1}s after ctr run returned", t.elapsed().as_secs_f64());

    // A view on the image's index layer (created after that collection, which would remove it: it has
    // no lease): the snapshotter has the daemon mount the index again, and the kernel shows EROFS over
    // fscache (fsid=, the daemon's fscache domain) at the layer's lower dir.
    let snaps = ctr(&sock, &["snapshots", "--snapshotter", "wisp", "ls"]);
    let parent = snaps
        .lines()
        .find(|l| l.trim_end().ends_with(" Committed"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no committed snapshot:\n{snaps}"))
        .to_owned();
    ctr(&sock, &["snapshots", "--snapshotter", "wisp", "view", "wisp-check", &parent]);
    let status = d.call(&wisp::daemon::protocol::Request::Status);
    let rec = &status["mounts"][0];
    assert!(rec["fsid"].is_string() && rec["lower_only"] == true, "{status}");
    let lower = rec["lower"].as_str().unwrap().to_owned();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = mounts
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(lower.as_str()))
        .unwrap_or_else(|| panic!("{lower} is not mounted:\n{mounts}"));
    println!("the index layer's lower: {line}");
    let fields = line.split(" - ").nth(1).unwrap_or_default();
    assert!(
        fields.starts_with("erofs ") && fields.contains(&format!("fsid={}", rec["fsid"].as_str().unwrap())),
        "{line}"
    );
    assert!(fields.contains("domain_id=wisp"), "{line}");

    // Removing the view and the image (their garbage collection removes the backend snapshots)
    // releases the lazy mount.
    ctr(&sock, &["snapshots", "--snapshotter", "wisp", "rm", "wisp-check"]);
    let t = Instant::now();
    ctr(&sock, &["images", "rm", "--sync", image]);
    println!("ctr images rm --sync: {:.1}s", t.elapsed().as_secs_f64());
    let status = d.call(&wisp::daemon::protocol::Request::Status);
    assert_eq!(status["mounts"].as_array().map(Vec::len), Some(0), "{status}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.lines().any(|l| l.contains(" erofs ")), "an EROFS mount is left:\n{mounts}");
    println!("containerd_cachefiles_ctr_run in the guest: {:.1}s", started.elapsed().as_secs_f64());
    drop(containerd);
    drop(snapshotter);
    drop(fixture);
}

// ---- fault scenarios and concurrent mounts (issue 6) -------------------------------------------------------

/// Host side: [`PythonFixture`] with the sibling python:v2 converted into the same registry storage
/// (objects v1 already has are not uploaded again).
fn python_fixture_with_sibling(port: &str) -> PythonFixture {
    let fx = PythonFixture::build(port, false);
    let root = common::repo_root();
    let registry =
        |args: &[&str]| common::run(Command::new(root.join("scripts/registry")).args(args).args(["--port", port]));
    registry(&["start", "--root", fx.dir.join("registry").to_str().unwrap()]);
    let env = common::run(Command::new(root.join("scripts/corpus")).arg("env"));
    let oci = env.lines().find_map(|l| l.strip_prefix("WISP_CORPUS_OCI=")).expect("WISP_CORPUS_OCI").to_owned();
    let result = std::panic::catch_unwind(|| {
        common::run(Command::new(common::wisp_bin()).args([
            "convert",
            &format!("oci:{oci}/python:v2"),
            &format!("docker://127.0.0.1:{port}/wisp/python:v2"),
            "--plain-http",
        ]));
    });
    registry(&["stop"]);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
    fx
}

/// The guest's environment naming the host-side fixture (none when the VM tests do not run).
fn fixture_env(fixture: Option<&PythonFixture>) -> Vec<(&'static str, String)> {
    fixture.iter().map(|f| ("WISP_VM_FIXTURE", f.dir.display().to_string())).collect()
}

/// The guest's fixture directory (`WISP_VM_FIXTURE`, set by the host side).
fn guest_fixture() -> PathBuf {
    PathBuf::from(std::env::var("WISP_VM_FIXTURE").expect("WISP_VM_FIXTURE from the host side"))
}

/// The object map of a pulled image (`STATE/images/<id>/objects.map`), by content digest.
fn image_objects(d: &GuestDaemon, id: &str) -> HashMap<Digest, wisp::object::ObjectEntry> {
    let bytes = std::fs::read(d.state.join("images").join(id).join("objects.map")).unwrap();
    wisp::index::objmap::decode(&bytes).unwrap().into_iter().map(|e| (e.digest, e)).collect()
}

/// Every regular file of a pulled image whose data is an external object: (path relative to the root,
/// content digest, size), in path order.
fn image_files(d: &GuestDaemon, id: &str) -> Vec<(String, Digest, u64)> {
    let bytes = std::fs::read(d.state.join("images").join(id).join("index.erofs")).unwrap();
    let tree = erofs::reader::Image::open(&bytes[..]).unwrap().read_tree().unwrap();
    let mut files: Vec<(String, Digest, u64)> = wisp::index::regular_files(&tree)
        .into_iter()
        .filter_map(|(p, data)| match data {
            FileData::External { size, digest } => {
                Some((String::from_utf8_lossy(&p).trim_start_matches('/').to_owned(), *digest, *size))
            }
            _ => None,
        })
        .collect();
    files.sort();
    files
}

/// The daemon's record of the mount at `dir` (from its status: id, image, fsid, lower, ...).
fn mounted_image(d: &GuestDaemon, dir: &Path) -> serde_json::Value {
    let status = d.call(&wisp::daemon::protocol::Request::Status);
    status["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["dir"].as_str() == dir.to_str())
        .unwrap_or_else(|| panic!("no mount at {} in {status}", dir.display()))
        .clone()
}

/// The stats entry of the mount whose mount id (`status` mounts' `id`) is `id`.
fn mount_stats(d: &GuestDaemon, id: &str) -> serde_json::Value {
    let stats: serde_json::Value = serde_json::from_str(&d.wisp(&["stats", "--json"])).unwrap();
    stats["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["image"].as_str() == Some(id))
        .unwrap_or_else(|| panic!("no stats for mount {id}: {stats}"))
        .clone()
}

/// Reads `path` on a thread; panics if the read has not returned within `limit` (a hang), else
/// returns its result and how long it took.
fn read_within(path: &Path, limit: Duration) -> (io::Result<Vec<u8>>, Duration) {
    let p = path.to_owned();
    let t = Instant::now();
    let h = std::thread::spawn(move || std::fs::read(p));
    while !h.is_finished() {
        assert!(t.elapsed() < limit, "reading {} did not return within {limit:?}: hung", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
    (h.join().unwrap(), t.elapsed())
}

/// The cachefiles cache file of the object `hex` (`D` + the cookie key, the sha256 hex). The kernel
/// creates a new cache file as an unlinked tmpfile and links it into the cache directory only when the
/// object is withdrawn (the last umount using it), so look after an umount.
fn cache_file_of(hex: &str) -> PathBuf {
    fn walk(dir: &Path, hex: &str, seen: &mut Vec<PathBuf>) -> Option<PathBuf> {
        for e in std::fs::read_dir(dir).ok()?.flatten() {
            let p = e.path();
            if e.file_type().ok()?.is_dir() {
                if let Some(f) = walk(&p, hex, seen) {
                    return Some(f);
                }
            } else if e.file_name().to_string_lossy().ends_with(hex) {
                return Some(p);
            } else if seen.len() < 10 {
                seen.push(p);
            }
        }
        None
    }
    // The withdrawal is asynchronous (fscache's work queue): wait for the link.
    let t = Instant::now();
    loop {
        let mut seen = Vec::new();
        match walk(Path::new("/scratch/cache/cachefiles"), hex, &mut seen) {
            Some(f) => return f,
            None if t.elapsed() < Duration::from_secs(60) => std::thread::sleep(Duration::from_millis(500)),
            None => panic!("no cache file for object {hex} under /scratch/cache/cachefiles; some files: {seen:#?}"),
        }
    }
}

/// Whether the cache file holds any data (SEEK_DATA from 0 finds some).
fn cache_file_has_data(path: &Path) -> bool {
    let f = std::fs::File::open(path).unwrap();
    match nix::unistd::lseek(std::os::fd::AsRawFd::as_raw_fd(&f), 0, nix::unistd::Whence::SeekData) {
        Ok(_) => true,
        Err(nix::errno::Errno::ENXIO) => false,
        Err(e) => panic!("SEEK_DATA on {}: {e}", path.display()),
    }
}

fn drop_caches() {
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
}

/// The registry storage path of blob `hex` (docker-registry's filesystem driver).
fn registry_blob(hex: &str) -> PathBuf {
    PathBuf::from(format!("/scratch/registry/docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2]))
}

/// A tampered object in the registry (bytes changed, same length, name kept), once stored zstd-compressed
/// and once stored raw (blob digest = content digest): reading its file through `wisp mount` fails with
/// EIO, never with wrong bytes, also after drop_caches; the kernel's cache file gets no data, the stats
/// count a failure and no fetch, the daemon log names the object; once the blob is restored the same read
/// returns the right bytes (sha256 = the object's digest) and the cache file holds them.
#[test]
fn daemon_cachefiles_tampered_object_eio() {
    let fixture = vm_tests_enabled().then(|| PythonFixture::build("5150", false));
    let env = fixture_env(fixture.as_ref());
    if !in_vm_env(test_name!(), &env) {
        return;
    }
    let t0 = Instant::now();
    guest_registry(&guest_fixture());
    let d = GuestDaemon::start(&["--frontend", "cachefiles"], &[]);
    let dir = Path::new("/scratch/c1");
    let mnt = d.mount("docker://127.0.0.1:5000/wisp/python:v1", dir);
    let rec = mounted_image(&d, &mnt);
    let (image, key) = (rec["image"].as_str().unwrap().to_owned(), rec["id"].as_str().unwrap().to_owned());
    let objects = image_objects(&d, &image);
    let files = image_files(&d, &image);
    use wisp::object::Compression;
    let pick = |want: Compression| {
        files
            .iter()
            .find(|(p, digest, size)| {
                let e = &objects[digest];
                e.compression == want && p.starts_with("usr/") && *size >= 64 && *size <= 256 << 10
            })
            .cloned()
            .unwrap_or_else(|| panic!("no {want:?} object of 64 B..256 KiB under /usr"))
    };
    let targets = [pick(Compression::Zstd), pick(Compression::None)];
    let before = mount_stats(&d, &key);

    // Tamper: flip bytes in the middle of each blob, same length, same name.
    let mut originals = Vec::new();
    for (path, digest, size) in &targets {
        let e = &objects[digest];
        let blob = registry_blob(&hex::encode(e.blob));
        let good = std::fs::read(&blob).unwrap();
        assert_eq!(u64::try_from(good.len()).unwrap(), e.stored_size);
        let mut bad = good.clone();
        let mid = bad.len() / 2;
        for b in &mut bad[mid..(mid + 8).min(good.len())] {
            *b ^= 0x5a;
        }
        std::fs::write(&blob, &bad).unwrap();
        assert_eq!(std::fs::metadata(&blob).unwrap().len(), e.stored_size);
        println!(
            "tampered {path}: object {} ({size} B, {:?}, blob {} of {} B)",
            hex::encode(digest),
            e.compression,
            hex::encode(e.blob),
            e.stored_size
        );
        originals.push((blob, good));
    }

    for pass in ["cold", "after drop_caches"] {
        for (path, digest, _) in &targets {
            let (r, took) = read_within(&mnt.join(path), WAIT);
            match r {
                Err(e) => {
                    println!("{pass}: {path}: {e} after {:.2}s", took.as_secs_f64());
                    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{path}: {e}");
                }
                Ok(b) => panic!(
                    "{pass}: {path} read {} bytes from a tampered object ({})",
                    b.len(),
                    if sha256(&b) == *digest { "right bytes?!" } else { "WRONG bytes" }
                ),
            }
        }
        drop_caches();
    }
    let log = daemon_log();
    for (path, digest, _) in &targets {
        let hex = hex::encode(digest);
        let lines: Vec<&str> = log.lines().filter(|l| l.contains(&hex)).collect();
        assert!(!lines.is_empty(), "the daemon log does not name {hex} ({path}):\n{log}");
        println!("daemon log on {hex}:\n  {}", lines.join("\n  "));
    }
    let after = mount_stats(&d, &key);
    println!("stats before: {before}\nstats after the failed reads: {after}");
    assert_eq!(after["objects_fetched"], before["objects_fetched"], "a tampered object was counted as fetched");
    // Each of the 4 reads reached the daemon (the one after drop_caches too: no cached data answered it).
    assert!(after["failures"].as_u64().unwrap() >= before["failures"].as_u64().unwrap() + 4, "{after}");

    // Nothing entered the cache: umount (the kernel links its new cache files into the cache directory
    // when the objects are withdrawn) and look at the tampered objects' files.
    d.wisp(&["umount", mnt.to_str().unwrap()]);
    for (path, digest, _) in &targets {
        let f = cache_file_of(&hex::encode(digest));
        println!("{path}: cache file {} ({} B), no data", f.display(), file_len(&f));
        assert!(!cache_file_has_data(&f), "{path}: the cache file {} holds data of a tampered object", f.display());
    }
    let mnt = d.mount("docker://127.0.0.1:5000/wisp/python:v1", dir);
    let before = mount_stats(&d, &key);
    for (path, _, _) in &targets {
        let (r, _) = read_within(&mnt.join(path), WAIT);
        assert_eq!(r.map(|b| b.len()).map_err(|e| e.raw_os_error()), Err(Some(libc::EIO)), "{path} after the remount");
    }

    // The store fixed: the same reads return the right bytes, and the cache now holds them.
    for (blob, good) in &originals {
        std::fs::write(blob, good).unwrap();
    }
    // Past the fetcher's hold of a failure, as a reader retrying later would be.
    std::thread::sleep(wisp::daemon::fetcher::FAILURE_HOLD + Duration::from_secs(1));
    for pass in ["restored", "restored, after drop_caches"] {
        for (path, digest, size) in &targets {
            let (r, took) = read_within(&mnt.join(path), WAIT);
            let b = r.unwrap_or_else(|e| panic!("{pass}: {path}: {e}"));
            assert_eq!(u64::try_from(b.len()).unwrap(), *size, "{pass}: {path}");
            assert!(sha256(&b) == *digest, "{pass}: {path}: wrong bytes");
            println!("{pass}: {path}: {} B, right bytes, {:.2}s", b.len(), took.as_secs_f64());
        }
        drop_caches();
    }
    let fixed = mount_stats(&d, &key);
    assert_eq!(
        fixed["objects_fetched"].as_u64().unwrap(),
        before["objects_fetched"].as_u64().unwrap() + 2,
        "after the fix each object is fetched once: {fixed}"
    );
    d.wisp(&["umount", mnt.to_str().unwrap()]);
    for (path, digest, _) in &targets {
        assert!(cache_file_has_data(&cache_file_of(&hex::encode(digest))), "{path}: the cache file got no data");
    }
    println!("guest time: {:.1}s", t0.elapsed().as_secs_f64());
    drop(fixture);
}

/// The registry stopped mid-start (after the mount and a first file): reads of files not fetched yet fail
/// with EIO instead of hanging, with the registry gone (connection refused) and with the registry hung
/// (SIGSTOP: connections accepted, never answered, so only the daemon's `--fetch-deadline 5` ends them);
/// the daemon survives (the same worker answers Status; fetched files still read from the cache); once
/// the registry is back the same paths read equal to the eager pull.
#[test]
fn daemon_cachefiles_registry_stopped_eio() {
    let fixture = vm_tests_enabled().then(|| PythonFixture::build("5151", true));
    let env = fixture_env(fixture.as_ref());
    if !in_vm_env(test_name!(), &env) {
        return;
    }
    let t0 = Instant::now();
    let fx = guest_fixture();
    let oracle = fx.join("oracle-v1");
    guest_registry(&fx);
    let deadline = Duration::from_secs(5);
    let d = GuestDaemon::start(&["--frontend", "cachefiles", "--fetch-deadline", "5"], &[]);
    let mnt = d.mount("docker://127.0.0.1:5000/wisp/python:v1", Path::new("/scratch/c1"));
    let worker = d.call(&wisp::daemon::protocol::Request::Status)["worker_pid"].clone();
    let registry = |args: &[&str]| common::run(Command::new(common::repo_root().join("scripts/registry")).args(args));

    // The start is under way: one file fetched.
    let first = "usr/lib/python3.11/json/__init__.py";
    let (r, _) = read_within(&mnt.join(first), WAIT);
    assert!(r.unwrap() == std::fs::read(oracle.join(first)).unwrap(), "{first}");

    registry(&["stop"]);
    let gone = ["usr/lib/python3.11/json/decoder.py", "usr/lib/python3.11/email/parser.py"];
    let hung = ["usr/lib/python3.11/json/encoder.py", "usr/lib/python3.11/email/utils.py"];
    let expect_eio = |what: &str, paths: &[&str]| {
        for p in paths {
            let (r, took) = read_within(&mnt.join(p), 3 * deadline);
            match r {
                Err(e) => {
                    println!("{what}: {p}: {e} after {:.2}s (deadline {deadline:?})", took.as_secs_f64());
                    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{what}: {p}: {e}");
                }
                Ok(b) => panic!("{what}: {p} read {} bytes with no registry", b.len()),
            }
        }
    };
    expect_eio("registry stopped", &gone);
    let status = d.call(&wisp::daemon::protocol::Request::Status);
    assert_eq!(status["worker_pid"], worker, "the worker must survive: {status}");
    drop_caches();
    let (r, _) = read_within(&mnt.join(first), WAIT);
    assert!(r.unwrap() == std::fs::read(oracle.join(first)).unwrap(), "{first} from the cache, no registry");

    // A hung registry: only the fetch deadline ends the reads.
    registry(&["start", "--root", "/scratch/registry"]);
    let pid: i32 = std::fs::read_to_string("/tmp/wisp-registry/5000/registry.pid").unwrap().trim().parse().unwrap();
    let pid = nix::unistd::Pid::from_raw(pid);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    expect_eio("registry hung (SIGSTOP)", &hung);
    let status = d.call(&wisp::daemon::protocol::Request::Status);
    assert_eq!(status["worker_pid"], worker, "the worker must survive: {status}");
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    // Past the fetcher's hold of a failure (the kernel's immediate second READ gets the same EIO).
    std::thread::sleep(wisp::daemon::fetcher::FAILURE_HOLD + Duration::from_secs(1));

    // The registry back: the same paths read correctly.
    for p in gone.iter().chain(&hung) {
        let (r, took) = read_within(&mnt.join(p), WAIT);
        let b = r.unwrap_or_else(|e| panic!("registry back: {p}: {e}"));
        assert!(b == std::fs::read(oracle.join(p)).unwrap(), "registry back: {p}: differs from the eager pull");
        println!("registry back: {p}: {} B equal to the eager pull, {:.2}s", b.len(), took.as_secs_f64());
    }
    drop_caches();
    for p in gone.iter().chain(&hung).chain([&first]) {
        assert!(std::fs::read(mnt.join(p)).unwrap() == std::fs::read(oracle.join(p)).unwrap(), "{p} after drop_caches");
    }
    let stats: serde_json::Value = serde_json::from_str(&d.wisp(&["stats", "--json"])).unwrap();
    println!("stats: {}", stats["images"][0]);
    d.wisp(&["umount", mnt.to_str().unwrap()]);
    println!("guest time: {:.1}s", t0.elapsed().as_secs_f64());
    drop(fixture);
}

/// Two containers of python:v1 (the second mount of an image gets the fsid `<id>.1`) and one of its
/// sibling python:v2, all mounted at once in the one fscache domain: `python3 -c 'import json, email'`
/// runs in the three concurrently and prints 1 in each; a write in each container lands in its own upper
/// dir only; the registry's log shows no object blob fetched twice, and v2 is charged only for objects
/// v1 lacks; reads of the same files in the three lowers give the bytes of the index; all three unmount
/// cleanly.
#[test]
fn daemon_cachefiles_two_containers_and_sibling() {
    let fixture = vm_tests_enabled().then(|| python_fixture_with_sibling("5152"));
    let env = fixture_env(fixture.as_ref());
    if !in_vm_env(test_name!(), &env) {
        return;
    }
    let t0 = Instant::now();
    let log = guest_registry(&guest_fixture());
    let d = GuestDaemon::start(&["--frontend", "cachefiles"], &[]);
    let off = file_len(&log);
    let (v1, v2) = ("docker://127.0.0.1:5000/wisp/python:v1", "docker://127.0.0.1:5000/wisp/python:v2");
    let containers = [("a", v1), ("b", v1), ("c", v2)];
    let mut mnts = Vec::new();
    for (name, image) in containers {
        let t = Instant::now();
        mnts.push(d.mount(image, &Path::new("/scratch").join(name)));
        println!("mounted {image} as {name} in {:.1}s", t.elapsed().as_secs_f64());
    }
    let recs: Vec<serde_json::Value> = mnts.iter().map(|m| mounted_image(&d, m)).collect();
    let field = |i: usize, k: &str| recs[i][k].as_str().unwrap().to_owned();
    let (v1_id, v2_id) = (field(0, "image"), field(2, "image"));
    assert_eq!(field(1, "image"), v1_id);
    assert_ne!(v1_id, v2_id);
    assert_eq!(field(0, "fsid"), v1_id, "{recs:?}");
    assert_eq!(field(1, "fsid"), format!("{v1_id}.1"), "the second mount of an image: {recs:?}");
    assert_eq!(field(2, "fsid"), v2_id, "{recs:?}");
    let (o1, o2) = (image_objects(&d, &v1_id), image_objects(&d, &v2_id));
    let v2_only: BTreeSet<String> = o2
        .values()
        .filter(|e| !o1.contains_key(&e.digest))
        .map(|e| format!("sha256:{}", hex::encode(e.blob)))
        .collect();
    let object_blobs: BTreeSet<String> =
        o1.values().chain(o2.values()).map(|e| format!("sha256:{}", hex::encode(e.blob))).collect();
    println!("v1: {} objects; v2: {} objects, {} of them not in v1", o1.len(), o2.len(), v2_only.len());

    // The three start at once.
    let t = Instant::now();
    let runs: Vec<_> = mnts
        .iter()
        .map(|m| {
            let m = m.clone();
            std::thread::spawn(move || chroot(&m, "python3 -c 'import json, email; print(1)'"))
        })
        .collect();
    for (run, (name, _)) in runs.into_iter().zip(containers) {
        assert_eq!(run.join().unwrap(), "1\n", "container {name}");
    }
    println!("three concurrent starts: {:.1}s", t.elapsed().as_secs_f64());

    // Writes stay in their own container.
    for (m, (name, _)) in mnts.iter().zip(containers) {
        chroot(m, &format!("echo {name} > /root/wisp-{name} && echo '# {name}' >> /app/main.py"));
    }
    for (i, (m, (name, _))) in mnts.iter().zip(containers).enumerate() {
        let upper = Path::new("/scratch").join(name).join("upper");
        assert_eq!(std::fs::read_to_string(upper.join(format!("root/wisp-{name}"))).unwrap(), format!("{name}\n"));
        let main = std::fs::read_to_string(m.join("app/main.py")).unwrap();
        assert!(main.ends_with(&format!("# {name}\n")), "{name}: {main}");
        for (other, _) in containers.iter().enumerate().filter(|&(j, _)| j != i).map(|(_, c)| c) {
            assert!(!m.join(format!("root/wisp-{other}")).exists(), "{other}'s write is visible in {name}");
            assert!(!upper.join(format!("root/wisp-{other}")).exists(), "{other}'s write is in {name}'s upper");
            assert!(!main.contains(&format!("# {other}\n")), "{other}'s append is in {name}'s main.py");
        }
    }

    // The same files in the three containers: the index's bytes, fetched once on the node.
    let files1 = image_files(&d, &v1_id);
    let files2 = image_files(&d, &v2_id);
    let json: Vec<&(String, Digest, u64)> =
        files1.iter().filter(|(p, _, _)| p.starts_with("usr/lib/python3.11/json/")).collect();
    let yaml: Vec<&(String, Digest, u64)> =
        files2.iter().filter(|(p, _, _)| p.starts_with("usr/lib/python3/dist-packages/yaml/")).collect();
    assert!(!json.is_empty() && !yaml.is_empty(), "json {} files, yaml {} files", json.len(), yaml.len());
    let before_yaml = file_len(&log);
    // Through each mount's EROFS lower: python may have rewritten a .pyc into the container's upper dir.
    let lowers: Vec<PathBuf> = recs.iter().map(|r| PathBuf::from(r["lower"].as_str().unwrap())).collect();
    for (m, files) in [(&lowers[0], &json), (&lowers[1], &json), (&lowers[2], &json), (&lowers[2], &yaml)] {
        for (p, digest, _) in files.iter() {
            let b = std::fs::read(m.join(p)).unwrap_or_else(|e| panic!("{}: {e}", m.join(p).display()));
            assert!(sha256(&b) == *digest, "{}: wrong bytes", m.join(p).display());
        }
    }
    let served_walk = blobs_served(&log, before_yaml);
    let yaml_blobs: BTreeSet<String> =
        yaml.iter().map(|(_, dg, _)| format!("sha256:{}", hex::encode(o2[dg].blob))).collect();
    for (b, _) in &served_walk {
        assert!(object_blobs.contains(b), "a non-object blob was fetched during the walk: {b}");
    }
    let yaml_fetched = served_walk.iter().filter(|(b, _)| yaml_blobs.contains(b)).count();
    assert!(yaml_fetched > 0, "the v2-only yaml package was never fetched?");
    assert!(yaml_blobs.iter().all(|b| v2_only.contains(b)), "yaml objects are all new in v2");

    // The registry's view: no object blob twice; v2 charged only for objects v1 lacks.
    let served = blobs_served(&log, off);
    let mut count: HashMap<&str, usize> = HashMap::new();
    for (b, _) in served.iter().filter(|(b, _)| object_blobs.contains(b)) {
        *count.entry(b.as_str()).or_default() += 1;
    }
    let twice: Vec<_> = count.iter().filter(|(_, &n)| n > 1).collect();
    let index_blobs: Vec<&String> = served.iter().map(|(b, _)| b).filter(|b| !object_blobs.contains(*b)).collect();
    let fetched_new = count.keys().filter(|b| v2_only.contains(**b)).count();
    let wire: u64 = served.iter().map(|(_, n)| n).sum();
    println!(
        "registry served {} object blobs ({} new in v2) and {} other blobs (index layers, configs), {:.2} MB in all",
        count.len(),
        fetched_new,
        index_blobs.len(),
        wire as f64 / 1e6
    );
    assert!(twice.is_empty(), "object blobs fetched more than once: {twice:?}");
    let (sa, sb, sc) =
        (mount_stats(&d, &field(0, "id")), mount_stats(&d, &field(1, "id")), mount_stats(&d, &field(2, "id")));
    println!("stats a: {sa}\nstats b: {sb}\nstats c: {sc}");
    let fetched = |s: &serde_json::Value| s["objects_fetched"].as_u64().unwrap();
    assert_eq!(fetched(&sb), 0, "the second v1 container fetched objects the first has: {sb}");
    assert_eq!(
        fetched(&sc),
        u64::try_from(fetched_new).unwrap(),
        "v2 must fetch exactly the objects v1 lacks that it read: {sc}"
    );
    assert_eq!(
        fetched(&sa) + fetched(&sb) + fetched(&sc),
        u64::try_from(count.len()).unwrap(),
        "every object blob served was fetched by the daemon once"
    );

    for m in &mnts {
        d.wisp(&["umount", m.to_str().unwrap()]);
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    for (m, rec) in mnts.iter().zip(&recs) {
        for p in [m.to_str().unwrap(), rec["lower"].as_str().unwrap()] {
            assert!(!mountinfo.contains(&format!(" {p} ")), "{p} is still mounted:\n{mountinfo}");
        }
    }
    let status = d.call(&wisp::daemon::protocol::Request::Status);
    assert_eq!(status["mounts"].as_array().map(Vec::len), Some(0), "{status}");
    println!("guest time: {:.1}s", t0.elapsed().as_secs_f64());
    drop(fixture);
}
