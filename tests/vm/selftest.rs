//! The self-tests: the VM itself, and the cachefiles session of the `fscache` crate against EROFS
//! images written by the `erofs` crate, with a minimal in-test daemon.

use std::collections::{BTreeSet, HashMap};
use std::ffi::CString;
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use erofs::tree::{FileData, Inode, Kind, Metadata, Tree, ROOT};
use erofs::writer::{write_image, MemorySource, WriteOptions};
use fscache::cachefiles::{AlignedBuf, Device, ObjectFd, OpenRequest, Request, BLOCK};
use nix::poll::{PollFd, PollFlags, PollTimeout};
use rustix::mount::{mount, unmount, MountFlags, UnmountFlags};

use crate::harness::{in_vm, sha256, WAIT};

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
