//! The daemon's process tree and control socket under abuse (host kernel, fanotify pre-content):
//! who may talk to the control socket and how much it reads, a worker respawned after its binary was
//! replaced on disk, a restore that meets a broken mount record, concurrent mounts of one directory.
//!
//! The image is made here: one gzip layer (GNU tar) of files with known pseudo-random bytes, converted
//! by `wisp convert` into an OCI layout (the index) and a `dir:` store (the objects), so no registry is
//! needed. Reads through the lazy mount are compared with the bytes the test generated.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::daemon::{require_fanotify, Daemon};
use common::{oci_digest, require, run, wisp_bin};

/// Files of the test image: (name, size); each is big enough to be an object of its own.
const FILES: usize = 48;

fn file_size(i: usize) -> usize {
    20_000 + i * 3_001
}

/// Deterministic bytes of file `i` (xorshift).
fn content(i: usize) -> Vec<u8> {
    let mut x = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..file_size(i))
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24).to_le_bytes()[0]
        })
        .collect()
}

fn name(i: usize) -> String {
    format!("data/f{i:03}")
}

struct Image {
    tmp: PathBuf,
    /// oci:DIR:t of the index image.
    index: String,
    /// dir:STORE of the objects.
    store: String,
}

static IMAGE: OnceLock<Option<Image>> = OnceLock::new();
/// Tests of this binary; the last to finish removes the image (kept when a test failed).
const TESTS: usize = 4;
static FINISHED: AtomicUsize = AtomicUsize::new(0);
static FAILED: AtomicBool = AtomicBool::new(false);

struct Finish;

impl Drop for Finish {
    fn drop(&mut self) {
        if std::thread::panicking() {
            FAILED.store(true, Ordering::SeqCst);
        }
        if FINISHED.fetch_add(1, Ordering::SeqCst) + 1 == TESTS && !FAILED.load(Ordering::SeqCst) {
            if let Some(Some(img)) = IMAGE.get() {
                let _ = fs::remove_dir_all(&img.tmp);
            }
        }
    }
}

fn can_run() -> bool {
    if !require(common::is_root(), "needs root (fanotify pre-content, mounts)") {
        return false;
    }
    require_fanotify()
        && require(common::have("setpriv") && common::have("choom"), "setpriv and choom (util-linux) are needed")
        && require(Path::new("/usr/bin/python3").exists() && common::have("tar"), "/usr/bin/python3 and tar are needed")
}

/// Writes an OCI layout at `dir` whose image `t` has the gzip layer of the tar `tar`.
fn oci_layout(dir: &Path, tar: &[u8]) {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(tar).unwrap();
    let layer = gz.finish().unwrap();
    fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let put = |b: &[u8]| {
        let d = oci_digest(b);
        fs::write(dir.join("blobs/sha256").join(&d[7..]), b).unwrap();
        d
    };
    let ld = put(&layer);
    let config = serde_json::to_vec(&serde_json::json!({"architecture": "amd64", "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": [oci_digest(tar)]}}))
    .unwrap();
    let cd = put(&config);
    let manifest = serde_json::to_vec(&serde_json::json!({"schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": ld, "size": layer.len()}]}))
    .unwrap();
    let md = put(&manifest);
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": md, "size": manifest.len(), "annotations": {"org.opencontainers.image.ref.name": "t"}}]});
    fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
}

fn image() -> Option<&'static Image> {
    IMAGE
        .get_or_init(|| {
            if !can_run() {
                return None;
            }
            let tmp = PathBuf::from(format!("/var/tmp/wisp-hardening-test-{}", std::process::id()));
            let _ = fs::remove_dir_all(&tmp);
            let tree = tmp.join("tree");
            fs::create_dir_all(tree.join("data")).unwrap();
            for i in 0..FILES {
                fs::write(tree.join(name(i)), content(i)).unwrap();
            }
            let tar = Command::new("tar").arg("-C").arg(&tree).args(["-cf", "-", "data"]).output().unwrap();
            assert!(tar.status.success(), "tar: {}", String::from_utf8_lossy(&tar.stderr));
            oci_layout(&tmp.join("src"), &tar.stdout);
            let index = format!("oci:{}:t", tmp.join("index").display());
            let store = format!("dir:{}", tmp.join("store").display());
            run(Command::new(wisp_bin())
                .arg("convert")
                .arg(format!("oci:{}:t", tmp.join("src").display()))
                .arg(&index)
                .args(["--store", &store, "--json"]));
            Some(Image { tmp, index, store })
        })
        .as_ref()
}

/// `bin daemon` in a fresh `dir` (removed on drop unless the test failed), started through `sh -c
/// PRELUDE; exec ...` (e.g. a umask, or choom); returns once a worker answers `status`.
fn start_daemon(dir: &Path, bin: &Path, prelude: &str) -> Daemon {
    let _ = fs::remove_dir_all(dir);
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(format!("{prelude}\nexec \"$@\"")).arg("sh").arg(bin);
    let mut d = Daemon::launch(dir, cmd);
    d.remove_dir = true;
    d.wait_worker(None);
    d
}

impl Daemon {
    /// Waits until a worker other than `old` answers `status`; returns the status.
    fn wait_worker(&self, old: Option<i64>) -> serde_json::Value {
        let t = Instant::now();
        loop {
            if let Ok(st) = self.try_status(Duration::from_secs(5)) {
                if st["worker_pid"].as_i64() != old {
                    return st;
                }
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "no new worker answers within 30 s (old {old:?}); daemon log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn mount_cmd(&self, img: &Image, dir: &Path) -> Command {
        let mut c = Command::new(wisp_bin());
        c.args(["mount", &img.index]).arg(dir).args(["--store", &img.store]).arg("--state").arg(&self.state);
        c
    }

    fn kill9_worker(&self) -> i64 {
        let pid = self.status()["worker_pid"].as_i64().unwrap();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
        pid
    }
}

/// Reads files `range` of the image through `mnt` (the kernel) and compares them with the generated
/// bytes; returns one line per mismatch.
fn check_files(mnt: &Path, range: std::ops::Range<usize>) -> Vec<String> {
    let mut bad = Vec::new();
    for i in range {
        let p = mnt.join(name(i));
        match fs::read(&p) {
            Ok(got) if got == content(i) => {}
            Ok(got) => bad.push(format!(
                "{}: WRONG BYTES ({} of {} bytes, {} zero)",
                p.display(),
                got.len(),
                file_size(i),
                got.iter().filter(|b| **b == 0).count()
            )),
            Err(e) => bad.push(format!("{}: {e}", p.display())),
        }
    }
    bad
}

/// Overlay mounts at `dir` in this mount namespace, from the kernel's mountinfo.
fn overlays_at(dir: &Path) -> usize {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let dir = dir.to_str().unwrap();
    info.lines()
        .filter(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-").unwrap();
            f[4] == dir && f[sep + 1] == "overlay"
        })
        .count()
}

fn has_cap_sys_resource() -> bool {
    let s = fs::read_to_string("/proc/self/status").unwrap();
    let eff = s.lines().find_map(|l| l.strip_prefix("CapEff:")).unwrap().trim();
    u64::from_str_radix(eff, 16).unwrap() & (1 << 24) != 0 // CAP_SYS_RESOURCE
}

fn proc_status_kib(pid: i64, key: &str) -> u64 {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = s.lines().find(|l| l.starts_with(key)).unwrap_or_else(|| panic!("{key} in /proc/{pid}/status"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A control client in python, run as another user: prints `connect-error ERRNO` or `answer LINE`.
const PY_CLIENT: &str = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("connect-error", e.errno); sys.exit(0)
try:
    s.sendall(b'{"op":"status"}\n')
except OSError as e:
    pass  # refused before the request was read: the answer is waiting
print("answer", s.makefile().readline().strip())
"#;

fn as_nobody(extra: &[&str], sock: &Path) -> String {
    let out = common::as_nobody().args(extra).args(["/usr/bin/python3", "-c", PY_CLIENT]).arg(sock).output().unwrap();
    assert!(out.status.success(), "client as nobody failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Sends raw bytes on a fresh connection (as root), then reads the answer line.
fn raw_request(sock: &Path, bytes: &[u8]) -> (std::io::Result<()>, String) {
    let s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
    let sent = (&s).write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut answer = String::new();
    let _ = BufReader::new(&s).read_line(&mut answer);
    (sent, answer)
}

#[test]
fn control_socket_is_root_only_bounded_and_timed() {
    let _finish = Finish;
    let Some(img) = image() else { return };
    // umask 0: the socket's mode must not depend on the umask the daemon inherits.
    let d = start_daemon(&img.tmp.join("t-socket"), &wisp_bin(), "umask 000");
    let sock = d.sock();
    let mode = fs::metadata(&sock).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o600, "control socket mode {mode:o}");

    // Another user cannot connect at all (the mode)...
    let out = as_nobody(&[], &sock);
    assert_eq!(out, format!("connect-error {}", libc::EACCES), "unprivileged client: {out}");
    // ... and one that gets past the mode (CAP_DAC_OVERRIDE) is refused by its uid (SO_PEERCRED).
    let out = as_nobody(&["--inh-caps=+dac_override", "--ambient-caps=+dac_override"], &sock);
    assert!(out.starts_with("answer "), "{out}");
    assert!(out.contains(r#""ok":false"#) && out.contains("root only"), "uid 65534 was served: {out}");
    assert!(!out.contains("worker_pid"), "{out}");

    // A 1 MiB request line: a clear error, and the daemon stops reading (the rest of the line is
    // never taken, so the write fails or the answer comes first).
    let worker = d.status()["worker_pid"].as_i64().unwrap();
    let mut line = vec![b'x'; 1 << 20];
    line.push(b'\n');
    let (_, answer) = raw_request(&sock, &line);
    assert!(answer.contains("longer than 65536 bytes"), "answer to a 1 MiB line: {answer:?}");
    // The worker's memory does not grow with the line: 64 MiB without a newline.
    let hwm = proc_status_kib(worker, "VmHWM:");
    let (_, answer) = raw_request(&sock, &vec![b'x'; 64 << 20]);
    assert!(answer.contains("longer than 65536 bytes"), "answer to a 64 MiB line: {answer:?}");
    let grown = proc_status_kib(worker, "VmHWM:").saturating_sub(hwm);
    assert!(grown < 8 << 10, "the worker's peak RSS grew by {grown} KiB reading a 64 MiB line");

    // A silent client does not hold its thread: the daemon gives up after its timeout (10 s).
    let s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(40))).unwrap();
    let t = Instant::now();
    let mut answer = String::new();
    let _ = BufReader::new(&s).read_line(&mut answer);
    assert!(answer.contains("no request line within"), "silent client after {:?}: {answer:?}", t.elapsed());
    let mut rest = Vec::new();
    assert_eq!((&s).read_to_end(&mut rest).unwrap_or(0), 0, "connection not closed");

    // Still serving root.
    assert_eq!(d.status()["worker_pid"].as_i64(), Some(worker));
}

#[test]
fn worker_respawns_from_its_own_binary_after_an_upgrade_in_place() {
    let _finish = Finish;
    let Some(img) = image() else { return };
    let dir = img.tmp.join("t-upgrade");
    let bin_dir = img.tmp.join("t-upgrade-bin");
    fs::create_dir_all(&bin_dir).unwrap();
    let bin = bin_dir.join("wisp");
    fs::copy(wisp_bin(), &bin).unwrap();
    // As under the systemd unit, the supervisor at -999, if this process may lower a score
    // (CAP_SYS_RESOURCE); else at 300, which its workers must keep (never below the supervisor).
    let (sup_adj, worker_adj) = if has_cap_sys_resource() { ("-999", "-500") } else { ("300", "300") };
    let mut d = start_daemon(&dir, &bin, &format!("choom -n {sup_adj} -p $$ >/dev/null"));
    let mnt = dir.join("mnt");
    d.mount(&img.index, &mnt, &["--store", &img.store]);
    let sup = d.child.id();
    let old = d.status()["worker_pid"].as_i64().unwrap();
    let adj = |pid: i64| fs::read_to_string(format!("/proc/{pid}/oom_score_adj")).unwrap().trim().to_owned();
    assert_eq!(adj(i64::from(sup)), sup_adj);
    assert_eq!(adj(old), worker_adj, "worker's oom_score_adj");
    let bad = check_files(&mnt, 0..4);
    assert!(bad.is_empty(), "{bad:?}");

    // Upgrade in place: another program is renamed over the binary (the old file is deleted).
    let new = bin_dir.join("wisp.new");
    fs::write(&new, "#!/bin/sh\necho 'not the wisp the daemon runs' >&2\nexit 1\n").unwrap();
    fs::set_permissions(&new, fs::Permissions::from_mode(0o755)).unwrap();
    fs::rename(&new, &bin).unwrap();
    d.kill9_worker();
    let st = d.wait_worker(Some(old));
    let worker = st["worker_pid"].as_i64().unwrap();
    // The new worker runs the very file the supervisor runs (same inode, per the kernel).
    let exe = |pid: i64| fs::metadata(format!("/proc/{pid}/exe")).unwrap();
    let (a, b) = (exe(i64::from(sup)), exe(worker));
    assert_eq!((a.dev(), a.ino()), (b.dev(), b.ino()), "the new worker runs another binary than the supervisor");
    assert_eq!(adj(worker), worker_adj);
    // Objects not filled before the kill are filled by the new worker, with the right bytes.
    let bad = check_files(&mnt, 4..FILES);
    assert!(bad.is_empty(), "{bad:?}");
    // The daemon as a whole can still be stopped (the drop unmounts and sends SIGTERM).
    drop(d);
    let _ = fs::remove_dir_all(&bin_dir);
}

#[test]
fn a_broken_mount_record_is_skipped_and_the_others_restored() {
    let _finish = Finish;
    let Some(img) = image() else { return };
    let mut d = start_daemon(&img.tmp.join("t-restore"), &wisp_bin(), "");
    let mnt = d.dir.join("mnt");
    d.mount(&img.index, &mnt, &["--store", &img.store]);
    let bad_dir = d.state.join("mounts").join("00badbadbadbad00");
    fs::create_dir_all(&bad_dir).unwrap();
    fs::write(bad_dir.join("record.json"), b"{\"id\": \"00badbadbadbad00\", garbage").unwrap();
    let old = d.kill9_worker();
    let st = d.wait_worker(Some(old));
    let mounts = st["mounts"].as_array().unwrap();
    assert_eq!(mounts.len(), 1, "{st}");
    assert_eq!(mounts[0]["dir"].as_str(), mnt.to_str());
    let skipped = st["unrestored"].as_array().unwrap();
    assert_eq!(skipped.len(), 1, "{st}");
    assert!(skipped[0]["record"].as_str().unwrap().contains("00badbadbadbad00"), "{st}");
    let log = d.log();
    assert!(
        log.lines().any(|l| l.contains("cannot restore this mount") && l.contains("00badbadbadbad00")),
        "the skipped record is not logged:\n{log}"
    );
    // No object was read before the kill: every read goes through the new worker.
    let bad = check_files(&mnt, 0..FILES);
    assert!(bad.is_empty(), "{bad:?}");
    assert!(bad_dir.join("record.json").exists(), "the broken record was removed");
}

#[test]
fn concurrent_mounts_of_one_directory_exactly_one_wins() {
    let _finish = Finish;
    let Some(img) = image() else { return };
    let mut d = start_daemon(&img.tmp.join("t-race"), &wisp_bin(), "");
    let mnt = d.dir.join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    const N: usize = 6;
    let children: Vec<Child> =
        (0..N).map(|_| d.mount_cmd(img, &mnt).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap()).collect();
    let outs: Vec<_> = children.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
    let ok = outs.iter().filter(|o| o.status.success()).count();
    if ok > 0 {
        d.mounts.push(mnt.clone());
    }
    let errors: Vec<String> =
        outs.iter().filter(|o| !o.status.success()).map(|o| String::from_utf8_lossy(&o.stderr).into_owned()).collect();
    assert_eq!(ok, 1, "{ok} of {N} concurrent mounts succeeded; errors: {errors:?}");
    assert!(errors.iter().all(|e| e.contains("already mounted")), "{errors:?}");
    assert_eq!(overlays_at(&mnt), 1, "overlay mounts at {}", mnt.display());
    let st = d.status();
    assert_eq!(st["mounts"].as_array().unwrap().len(), 1, "{st}");
    let bad = check_files(&mnt, 0..FILES);
    assert!(bad.is_empty(), "{bad:?}");
}
