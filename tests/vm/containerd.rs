//! containerd with the cachefiles frontend.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common;
use crate::guest::*;
use crate::harness::{in_vm_env, vm_tests_enabled, WAIT};

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
