//! containerd end to end on the host kernel (fanotify pre-content, 6.14+): Debian's containerd 1.6 and
//! runc, unpatched, with `wisp snapshotter` as a proxy snapshotter and `wisp daemon` behind it. The
//! corpus's python images are pushed to a private registry on 127.0.0.1 and converted; containerd
//! pulls and runs them with `--snapshotter wisp`. Bytes fetched are counted from the registry's own
//! access log, outside wisp. Everything (containerd root, state, config and socket; the snapshotter's
//! root; the daemon's cache and state) lives under one scratch directory.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::daemon::require_fanotify;
use common::registry::{self, blobs_served, blobs_served_between, log_len};
use common::{require, run, wisp_bin};

/// The registry ports of the two tests (they run at the same time).
const PORT: u16 = 5110;
const GUARD_PORT: u16 = 5111;

fn can_run() -> bool {
    if !require(common::is_root(), "needs root (containerd, mounts)") {
        return false;
    }
    if !require_fanotify() {
        return false;
    }
    ["containerd", "ctr", "runc", "docker-registry", "setpriv"]
        .iter()
        .all(|c| require(common::have(c), &format!("{c} is not installed (scripts/setup)")))
}

/// A child process stopped (SIGTERM, then SIGKILL) on drop.
struct Proc {
    child: Child,
}

impl Proc {
    fn spawn(cmd: &mut Command, log: &Path) -> Proc {
        let f = fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        let child = cmd.stdout(f.try_clone().unwrap()).stderr(f).stdin(Stdio::null()).spawn().unwrap();
        Proc { child }
    }

    fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.id() as i32)
    }

    fn stop(&mut self) {
        let _ = nix::sys::signal::kill(self.pid(), nix::sys::signal::Signal::SIGTERM);
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

fn wait_for(what: &str, log: &Path, mut ok: impl FnMut() -> bool) {
    let t = Instant::now();
    while !ok() {
        assert!(t.elapsed() < Duration::from_secs(60), "{what} did not come up; see {}", log.display());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The whole node: registry, wisp daemon, wisp snapshotter, containerd.
struct Node {
    dir: PathBuf,
    port: u16,
    registry: String,
    containerd: Option<Proc>,
    snapshotter: Option<Proc>,
    daemon: Option<Proc>,
    /// The node's registry configuration for the daemon (WISP_HOSTS_DIR, DOCKER_CONFIG).
    env: Vec<(&'static str, PathBuf)>,
    /// The registry speaks plain HTTP (the snapshotter's --plain-http).
    plain_http: bool,
}

impl Node {
    /// A scratch directory, a registry on `port` with the corpus's python images, and wisp index
    /// images of the python `tags` (as wisp/python:TAG); returns the node and the registry's log.
    fn setup(name: &str, port: u16, tags: &[&str]) -> (Node, PathBuf) {
        let dir = PathBuf::from(format!("/var/tmp/wisp-containerd-test-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let root = common::repo_root();
        registry::start(port, &dir.join("registry"));
        let registry = format!("127.0.0.1:{port}");
        let log = registry::log(port);
        let node = Node {
            dir,
            port,
            registry,
            containerd: None,
            snapshotter: None,
            daemon: None,
            env: Vec::new(),
            plain_http: true,
        };
        run(Command::new(root.join("scripts/corpus")).args(["push", "--registry", &node.registry, "python"]));
        for tag in tags {
            run(Command::new(wisp_bin()).args([
                "convert",
                &format!("docker://{}/python:{tag}", node.registry),
                &format!("docker://{}/wisp/python:{tag}", node.registry),
                "--plain-http",
            ]));
        }
        (node, log)
    }

    fn sock(&self) -> PathBuf {
        self.dir.join("containerd/containerd.sock")
    }

    fn snap_root(&self) -> PathBuf {
        self.dir.join("snapshotter")
    }

    fn start_daemon(&mut self) {
        let state = self.dir.join("daemon/state");
        let mut cmd = Command::new(wisp_bin());
        cmd.args(["daemon", "--cache"]).arg(self.dir.join("daemon/cache")).arg("--state").arg(&state);
        cmd.env("WISP_LOG", "info");
        cmd.envs(self.env.iter().map(|(k, v)| (*k, v)));
        fs::create_dir_all(self.dir.join("daemon")).unwrap();
        let log = self.dir.join("daemon/log");
        self.daemon = Some(Proc::spawn(&mut cmd, &log));
        wait_for("wisp daemon", &log, || std::os::unix::net::UnixStream::connect(state.join("control.sock")).is_ok());
    }

    fn start_snapshotter(&mut self) {
        let sock = self.dir.join("snapshotter.sock");
        let _ = fs::remove_file(&sock);
        let mut cmd = Command::new(wisp_bin());
        cmd.args(["snapshotter", "--root"])
            .arg(self.snap_root())
            .arg("--address")
            .arg(&sock)
            .arg("--daemon-state")
            .arg(self.dir.join("daemon/state"))
            .arg("--containerd")
            .arg(self.sock())
            .args(self.plain_http.then_some("--plain-http"))
            .env("WISP_LOG", "info");
        let log = self.dir.join("snapshotter.log");
        self.snapshotter = Some(Proc::spawn(&mut cmd, &log));
        wait_for("wisp snapshotter", &log, || std::os::unix::net::UnixStream::connect(&sock).is_ok());
    }

    fn start_containerd(&mut self) {
        let d = self.dir.join("containerd");
        fs::create_dir_all(&d).unwrap();
        let config = format!(
            "version = 2\nroot = \"{0}/root\"\nstate = \"{0}/state\"\n[grpc]\n  address = \"{0}/containerd.sock\"\n\
             [plugins.\"io.containerd.grpc.v1.cri\"]\n  disable = true\n\
             [proxy_plugins]\n  [proxy_plugins.wisp]\n    type = \"snapshot\"\n    address = \"{1}\"\n",
            d.display(),
            self.dir.join("snapshotter.sock").display()
        );
        fs::write(d.join("config.toml"), config).unwrap();
        let log = d.join("log");
        self.containerd =
            Some(Proc::spawn(Command::new("containerd").arg("--config").arg(d.join("config.toml")), &log));
        wait_for("containerd", &log, || self.ctr_out(&["version"]).status.success());
    }

    /// ctr in this test's own namespace (so runc's state under /run/containerd/runc/NAMESPACE cannot
    /// collide with another containerd's containers of the same name).
    fn ctr_out(&self, args: &[&str]) -> Output {
        let ns = format!("wisp-test-{}", std::process::id());
        Command::new("ctr").arg("--address").arg(self.sock()).args(["--namespace", &ns]).args(args).output().unwrap()
    }

    /// Runs ctr, panicking with its output when it fails; returns stdout.
    fn ctr(&self, args: &[&str]) -> String {
        let out = self.ctr_out(args);
        assert!(
            out.status.success(),
            "ctr {args:?}: {}\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn snapshots(&self) -> Vec<String> {
        let mut v: Vec<String> =
            self.ctr(&["snapshots", "--snapshotter", "wisp", "ls"]).lines().skip(1).map(str::to_owned).collect();
        v.sort();
        v
    }

    fn daemon_status(&self) -> serde_json::Value {
        let sock = self.dir.join("daemon/state/control.sock");
        wisp::daemon::protocol::call(&sock, &wisp::daemon::protocol::Request::Status, Some(Duration::from_secs(30)))
            .unwrap()
    }

    /// Kills and deletes every container (and so its snapshot).
    fn remove_containers(&self) {
        for id in self.ctr(&["containers", "ls", "-q"]).lines() {
            let _ = self.ctr_out(&["tasks", "kill", "-s", "SIGKILL", id]);
            // The task can be deleted once it has stopped.
            wait_for(&format!("the end of task {id}"), &self.dir.join("containerd/log"), || {
                self.ctr_out(&["tasks", "delete", id]).status.success()
                    || !self.ctr(&["tasks", "ls", "-q"]).lines().any(|l| l == id)
            });
            self.ctr(&["containers", "delete", id]);
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.containerd.is_some() {
            for line in String::from_utf8_lossy(&self.ctr_out(&["containers", "ls", "-q"]).stdout).lines() {
                let _ = self.ctr_out(&["tasks", "kill", "-s", "SIGKILL", line]);
                std::thread::sleep(Duration::from_millis(300));
                let _ = self.ctr_out(&["tasks", "delete", "-f", line]);
                let _ = self.ctr_out(&["containers", "delete", line]);
            }
        }
        self.containerd.take();
        self.snapshotter.take();
        // Any overlay containerd left on a wisp lower would keep the daemon from unmounting it.
        if let Ok(info) = fs::read_to_string("/proc/self/mountinfo") {
            let mut mine: Vec<&str> = info
                .lines()
                .filter_map(|l| l.split(' ').nth(4))
                .filter(|p| p.starts_with(self.dir.to_str().unwrap()))
                .collect();
            mine.reverse();
            for p in mine {
                let _ = Command::new("umount").arg("-l").arg(p).status();
            }
        }
        // The supervisor keeps running while it cannot unmount (after the lazy unmounts above it cannot
        // find them) and is then killed by Proc::stop: end its worker too, not to leave it behind.
        let worker = self.daemon.as_ref().and_then(|_| {
            let sock = self.dir.join("daemon/state/control.sock");
            let req = wisp::daemon::protocol::Request::Status;
            wisp::daemon::protocol::call(&sock, &req, Some(Duration::from_secs(10))).ok()?["worker_pid"].as_i64()
        });
        self.daemon.take();
        let ours = |pid: i64| {
            fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(self.dir.to_str().unwrap()))
        };
        if let Some(pid) = worker.filter(|p| ours(*p)) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
        }
        registry::stop(self.port);
        if !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// The object map of a wisp layer as containerd unpacked it into the snapshotter: (content hex, blob
/// digest, stored size).
fn unpacked_objects(snap_root: &Path) -> Vec<Vec<(String, String, u64)>> {
    let mut out = Vec::new();
    for e in fs::read_dir(snap_root.join("snapshots")).unwrap() {
        let map = e.unwrap().path().join("fs/wisp/objects.map");
        if let Ok(bytes) = fs::read(&map) {
            let m = wisp::index::objmap::decode(&bytes).unwrap();
            out.push(m.iter().map(|e| (hex::encode(e.digest), e.blob_digest(), e.stored_size)).collect());
        }
    }
    out
}

/// The upper and lower dirs of a container's snapshot, from the mounts the snapshotter gives.
fn overlay_dirs(node: &Node, key: &str) -> (PathBuf, Vec<PathBuf>) {
    let out = node.ctr(&["snapshots", "--snapshotter", "wisp", "mounts", "/mnt", key]);
    let opt = |name: &str| {
        out.split([',', ' '])
            .find_map(|o| o.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("no {name} in {out}"))
            .trim()
            .to_owned()
    };
    (PathBuf::from(opt("upperdir")), opt("lowerdir").split(':').map(PathBuf::from).collect())
}

fn wisp_lowers_mounted(node: &Node) -> Vec<String> {
    let prefix = node.snap_root().join("wisp");
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| p.starts_with(prefix.to_str().unwrap()))
        .map(str::to_owned)
        .collect()
}

const STARTUP: &str = "import json, email; print(1)";

#[test]
fn containerd_runs_wisp_images_lazily() {
    if !can_run() {
        return;
    }
    let started = Instant::now();
    let (mut node, log) = Node::setup("lazy", PORT, &["v1", "v2"]);
    let dir = node.dir.clone();
    node.start_daemon();
    node.start_snapshotter();
    node.start_containerd();
    let v1 = format!("{}/wisp/python:v1", node.registry);
    let v2 = format!("{}/wisp/python:v2", node.registry);

    // Pull: containerd downloads the one small index layer, no data layer.
    let base = log_len(&log);
    let off = base;
    node.ctr(&["images", "pull", "--plain-http", "--snapshotter", "wisp", &v1]);
    let served = blobs_served(&log, off);
    let pulled: u64 = served.iter().map(|(_, n)| n).sum();
    eprintln!("pull: {} blobs, {:.2} MB", served.len(), pulled as f64 / 1e6);
    assert!(served.len() <= 2, "the pull fetched more than the config and the index layer: {served:?}");
    let maps = unpacked_objects(&node.snap_root());
    assert_eq!(maps.len(), 1, "one unpacked wisp layer");
    let v1_objects = maps[0].clone();
    let stored: u64 = v1_objects.iter().map(|o| o.2).sum();

    // Cold start through containerd: right output, at most 25% of the image's objects fetched.
    let off = log_len(&log);
    let t = Instant::now();
    let out = node.ctr(&["run", "--snapshotter", "wisp", "--rm", &v1, "c-cold", "python3", "-c", STARTUP]);
    let cold = t.elapsed();
    assert_eq!(out.trim(), "1");
    let served = blobs_served(&log, off);
    let wire: u64 = served.iter().map(|(_, n)| n).sum();
    eprintln!(
        "ctr run (cold): {:.2}s, registry served {} blobs, {:.2} MB = {:.1}% of the {:.1} MB of stored objects",
        cold.as_secs_f64(),
        served.len(),
        wire as f64 / 1e6,
        100.0 * wire as f64 / stored as f64,
        stored as f64 / 1e6
    );
    assert!(!served.is_empty(), "the cold start fetched nothing: not lazy through wisp?");
    // Only objects: the daemon took the index from the layer containerd had unpacked.
    let object_blobs: HashSet<&str> = v1_objects.iter().map(|o| o.1.as_str()).collect();
    let other: Vec<&(String, u64)> = served.iter().filter(|b| !object_blobs.contains(b.0.as_str())).collect();
    assert!(other.is_empty(), "the cold start fetched blobs that are not objects: {other:?}");
    assert!(wire * 4 <= stored, "startup fetched {wire} bytes, more than 25% of {stored}");
    // Two containers of v1 and one of v2 at once; writes land in the snapshot's upper dir only.
    node.ctr(&[
        "run",
        "-d",
        "--snapshotter",
        "wisp",
        &v1,
        "c-a",
        "sh",
        "-c",
        "echo hello > /tmp/wisp-written; sleep 1000",
    ]);
    node.ctr(&["run", "-d", "--snapshotter", "wisp", &v1, "c-b", "sleep", "1000"]);
    let (upper, lowers) = overlay_dirs(&node, "c-a");
    wait_for("the write in c-a", &dir.join("snapshotter.log"), || upper.join("tmp/wisp-written").exists());
    assert_eq!(fs::read_to_string(upper.join("tmp/wisp-written")).unwrap(), "hello\n");
    assert_eq!(lowers.len(), 1, "{lowers:?}");
    assert!(lowers[0].starts_with(node.snap_root().join("wisp")), "lower is not the wisp mount: {lowers:?}");
    assert!(!lowers[0].join("tmp/wisp-written").exists(), "the write reached the lower");
    let (upper_b, lowers_b) = overlay_dirs(&node, "c-b");
    assert!(!upper_b.join("tmp/wisp-written").exists(), "the write reached another container");
    assert_eq!(lowers_b, lowers, "two containers of one image share one lazy mount");
    assert_eq!(node.ctr(&["tasks", "exec", "--exec-id", "e1", "c-b", "python3", "-c", STARTUP]).trim(), "1");

    node.ctr(&["images", "pull", "--plain-http", "--snapshotter", "wisp", &v2]);
    let v2_objects: Vec<(String, String, u64)> =
        unpacked_objects(&node.snap_root()).into_iter().find(|m| *m != v1_objects).expect("v2's unpacked layer");
    let off = log_len(&log);
    let had: HashSet<String> = blobs_served_between(&log, base, off).into_iter().map(|b| b.0).collect();
    node.ctr(&["run", "-d", "--snapshotter", "wisp", &v2, "c-v2", "sleep", "1000"]);
    let walk = "import os\nn=0\nfor r,ds,fs in os.walk(os.path.dirname(os.__file__)):\n  for f in fs:\n    p=os.path.join(r,f)\n    if os.path.isfile(p) and not os.path.islink(p):\n      open(p,'rb').read(); n+=1\nprint(n)";
    let out = node.ctr(&["tasks", "exec", "--exec-id", "e2", "c-v2", "python3", "-c", walk]);
    assert!(out.trim().parse::<u64>().unwrap() > 100, "walk read {out}");
    // What the node had before v2 (every object blob the registry served so far) is never fetched again;
    // what v2 reads that the node lacked is.
    let v2_blobs: HashSet<&str> = v2_objects.iter().map(|o| o.1.as_str()).collect();
    let v1_blobs: HashSet<&str> = v1_objects.iter().map(|o| o.1.as_str()).collect();
    let served = blobs_served(&log, off);
    let refetched: Vec<&str> = served.iter().map(|s| s.0.as_str()).filter(|b| had.contains(*b)).collect();
    let fetched: HashSet<&str> = served.iter().map(|s| s.0.as_str()).filter(|b| v2_blobs.contains(b)).collect();
    let shared = fetched.iter().filter(|b| v1_blobs.contains(**b)).count();
    eprintln!(
        "v2 beside v1: {} objects, {} not in v1; the v2 walk fetched {} object blobs ({} also in v1 but not fetched yet), refetched {}",
        v2_objects.len(),
        v2_blobs.difference(&v1_blobs).count(),
        fetched.len(),
        shared,
        refetched.len()
    );
    assert!(
        refetched.is_empty(),
        "v2 fetched {} objects the node had: {:?}",
        refetched.len(),
        &refetched[..refetched.len().min(5)]
    );
    assert!(!fetched.is_empty(), "the walk of v2 fetched nothing");
    assert_eq!(wisp_lowers_mounted(&node).len(), 2, "one lazy mount per image");

    // Restarting containerd leaves the running containers and the snapshots alone.
    let before = node.snapshots();
    assert_eq!(before.len(), 5, "2 image layers + 3 containers: {before:?}");
    node.containerd.take();
    node.start_containerd();
    assert_eq!(node.snapshots(), before);
    assert_eq!(node.ctr(&["tasks", "exec", "--exec-id", "e3", "c-a", "cat", "/tmp/wisp-written"]), "hello\n");
    assert_eq!(node.ctr(&["tasks", "exec", "--exec-id", "e4", "c-v2", "python3", "-c", STARTUP]).trim(), "1");

    // kill -9 of the snapshotter, then a new one: same snapshots, containers unharmed, new ones start.
    node.snapshotter.as_mut().unwrap().kill9();
    assert_eq!(node.ctr(&["tasks", "exec", "--exec-id", "e5", "c-b", "python3", "-c", STARTUP]).trim(), "1");
    node.start_snapshotter();
    // containerd's proxy connection comes back on its own (grpc reconnect backoff).
    let t = Instant::now();
    wait_for("containerd's reconnection to the snapshotter", &dir.join("containerd/log"), || {
        node.ctr_out(&["snapshots", "--snapshotter", "wisp", "ls"]).status.success()
    });
    eprintln!("containerd reconnected to the new snapshotter after {:.1}s", t.elapsed().as_secs_f64());
    assert_eq!(node.snapshots(), before);
    assert_eq!(node.ctr(&["tasks", "exec", "--exec-id", "e6", "c-a", "cat", "/tmp/wisp-written"]), "hello\n");
    let out = node.ctr(&["run", "--snapshotter", "wisp", "--rm", &v1, "c-after", "python3", "-c", STARTUP]);
    assert_eq!(out.trim(), "1");
    assert_eq!(node.snapshots(), before);

    // The unconverted image: the snapshotter acts as overlayfs; same result as containerd's own.
    let plain = format!("{}/python:v1", node.registry);
    let probe = "import sys, json, email, hashlib; print(sys.version); print(hashlib.sha256(open('/usr/bin/python3','rb').read()).hexdigest())";
    node.ctr(&["images", "pull", "--plain-http", "--snapshotter", "wisp", &plain]);
    let via_wisp = node.ctr(&["run", "--snapshotter", "wisp", "--rm", &plain, "c-plain", "python3", "-c", probe]);
    node.ctr(&["images", "pull", "--plain-http", "--snapshotter", "overlayfs", &plain]);
    let via_overlay = node.ctr(&["run", "--snapshotter", "overlayfs", "--rm", &plain, "c-ovl", "python3", "-c", probe]);
    assert_eq!(via_wisp, via_overlay);
    assert_eq!(via_wisp.lines().count(), 2);

    // Removing the containers and images releases the lazy mounts; the objects stay in the cache.
    // (containerd removes backend snapshots in its garbage collection, which `images rm --sync` runs.)
    node.remove_containers();
    for img in [&v1, &v2, &plain] {
        node.ctr(&["images", "rm", "--sync", img]);
    }
    assert_eq!(node.snapshots(), Vec::<String>::new());
    assert!(wisp_lowers_mounted(&node).is_empty(), "{:?}", wisp_lowers_mounted(&node));
    assert_eq!(node.daemon_status()["mounts"].as_array().map(Vec::len), Some(0));
    let left: Vec<_> = fs::read_dir(node.snap_root().join("snapshots")).unwrap().collect();
    assert!(left.is_empty(), "snapshot directories left: {left:?}");
    let cache = dir.join("daemon/cache/objects");
    let kept = v1_objects.iter().filter(|o| cache.join(&o.0[..2]).join(&o.0).exists()).count();
    assert_eq!(kept, v1_objects.len(), "object files left the node cache");
    eprintln!("containerd test: {:.1}s", started.elapsed().as_secs_f64());
}

/// Runs `cmd args` as the unprivileged user nobody (uid and gid 65534, no supplementary groups).
fn as_nobody(cmd: &str, args: &[&OsStr]) -> Output {
    common::as_nobody().args(["--", cmd]).args(args).output().unwrap()
}

/// An uncompressed layer holding `entries` (path, symlink target or file bytes); returns (tar, digest).
fn layer_of(entries: &[(&str, Result<&str, &[u8]>)]) -> (Vec<u8>, String) {
    let mut b = tar::Builder::new(Vec::new());
    for (path, what) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_mtime(0);
        match what {
            Ok(target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                b.append_link(&mut h, path, target).unwrap();
            }
            Err(bytes) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(bytes.len() as u64);
                b.append_data(&mut h, path, *bytes).unwrap();
            }
        }
    }
    let tar = b.into_inner().unwrap();
    let digest = wisp::oci::types::sha256_digest(&tar);
    (tar, digest)
}

/// Pushes `docker://REGISTRY/REPO:TAG`: the layers of `base` (a python image in the same repository)
/// plus `top`, its manifest annotated as a wisp index image (anyone can write an annotation). Returns
/// the chain id of its top layer's snapshot.
fn push_crafted(registry: &str, repo: &str, tag: &str, base: Option<&str>, top: (Vec<u8>, String)) -> String {
    use wisp::oci::types::*;
    let topts = wisp::oci::TransportOptions { plain_http: true, ..Default::default() };
    let open = |r: String| wisp::oci::open(&r.parse().unwrap(), &topts, false).unwrap();
    let dst = open(format!("docker://{registry}/{repo}:{tag}"));
    let src = wisp::oci::resolve_source(&*open(format!("docker://{registry}/python:v1"))).unwrap();
    let mut config = src.config.clone();
    let mut layers = Vec::new();
    let mut diff_ids: Vec<String> = Vec::new();
    if let Some(b) = base {
        let base = wisp::oci::resolve_source(&*open(format!("docker://{registry}/{b}"))).unwrap();
        layers = base.manifest.layers.clone();
        diff_ids = serde_json::from_value(base.config["rootfs"]["diff_ids"].clone()).unwrap();
        assert_eq!(layers.len(), diff_ids.len());
    }
    let (tar, digest) = top;
    dst.put_blob(&digest, &tar).unwrap();
    layers.push(Descriptor {
        media_type: "application/vnd.oci.image.layer.v1.tar".into(),
        digest: digest.clone(),
        size: tar.len() as u64,
        ..Default::default()
    });
    diff_ids.push(digest);
    config["rootfs"] = serde_json::json!({"type": "layers", "diff_ids": diff_ids});
    config.as_object_mut().unwrap().remove("history");
    let config = serde_json::to_vec(&config).unwrap();
    let config_digest = sha256_digest(&config);
    dst.put_blob(&config_digest, &config).unwrap();
    let manifest = ImageManifest {
        schema_version: 2,
        media_type: Some(MT_OCI_MANIFEST.into()),
        artifact_type: None,
        config: Descriptor {
            media_type: MT_OCI_CONFIG.into(),
            digest: config_digest,
            size: config.len() as u64,
            ..Default::default()
        },
        layers,
        annotations: [("org.wisp.format.version".to_string(), "1".to_string())].into(),
    };
    dst.put_manifest(&serde_json::to_vec(&manifest).unwrap(), MT_OCI_MANIFEST, Some(tag)).unwrap();
    // The chain id of the top layer (image-spec config.md: sha256 of "PARENT DIFF_ID").
    diff_ids.iter().skip(1).fold(diff_ids[0].clone(), |chain, d| sha256_digest(format!("{chain} {d}").as_bytes()))
}

/// The defects of issue 16 in the snapshotter: a layer whose `wisp` is a symbolic link to another
/// snapshot's index (or that holds index files, or whose manifest claims to be a wisp index) runs as
/// the ordinary layer it is and mounts nothing through the daemon; a wisp image still runs lazily;
/// and an unprivileged user can neither talk to the snapshotter's socket (even one made
/// world-writable: its peer is checked) nor reach the files under its root, such as a layer's setuid
/// programs.
#[test]
fn containerd_snapshotter_takes_only_wisp_layers_and_only_root() {
    if !can_run() {
        return;
    }
    let started = Instant::now();
    let (mut node, log) = Node::setup("guard", GUARD_PORT, &["v1"]);
    node.start_daemon();
    node.start_snapshotter();
    node.start_containerd();
    let reg = node.registry.clone();
    let v1 = format!("{reg}/wisp/python:v1");
    node.ctr(&["images", "pull", "--plain-http", "--snapshotter", "wisp", &v1]);
    // The index another tenant's image would point at: the wisp image's unpacked layer.
    let index_dir = fs::read_dir(node.snap_root().join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().path().join("fs/wisp"))
        .find(|p| p.join("index.erofs").is_file())
        .expect("the unpacked wisp layer");
    let victim = index_dir.to_str().unwrap().to_owned();
    let erofs = fs::read(index_dir.join("index.erofs")).unwrap();
    let map = fs::read(index_dir.join("objects.map")).unwrap();

    // Crafted images, each manifest annotated as a wisp index image.
    let link = layer_of(&[("wisp", Ok(victim.as_str()))]);
    push_crafted(&reg, "python", "evil-link", Some("python:v1"), link.clone());
    let files = layer_of(&[("wisp/index.erofs", Err(erofs.as_slice())), ("wisp/objects.map", Err(map.as_slice()))]);
    push_crafted(&reg, "python", "evil-files", Some("python:v1"), files);
    let lone_chain = push_crafted(&reg, "evil/lone", "v1", None, link);
    let off = log_len(&log);
    let mounts_before = node.daemon_status()["mounts"].as_array().unwrap().len();
    assert_eq!(mounts_before, 0);

    // A symbolic link to another snapshot's index: an ordinary layer (the link is just a link).
    let img = format!("{reg}/python:evil-link");
    node.ctr(&["images", "pull", "--plain-http", "--snapshotter", "wisp", &img]);
    let out = node.ctr(&[
        "run",
        "--snapshotter",
        "wisp",
        "--rm",
        &img,
        "c-link",
        "python3",
        "-c",
        "import os; print(os.readlink('/wisp')); print(os.path.exists('/usr/bin/python3'))",
    ]);
    assert_eq!(out, format!("{victim}\nTrue\n"));
    // Real index files in an ordinary image's layer: ordinary files.
    let img = format!("{reg}/python:evil-files");
    node.ctr(&["images", "pull", "--plain-http", "--snapshotter", "wisp", &img]);
    let out = node.ctr(&[
        "run",
        "--snapshotter",
        "wisp",
        "--rm",
        &img,
        "c-files",
        "python3",
        "-c",
        "import hashlib; print(hashlib.sha256(open('/wisp/index.erofs','rb').read()).hexdigest())",
    ]);
    assert_eq!(out.trim(), hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&erofs)));
    // A one-layer image (the shape of a wisp index image) whose `wisp` links to the other index: a
    // snapshot on it gets that layer's own directory, not a lazy mount of the other image.
    let img = format!("{reg}/evil/lone:v1");
    node.ctr(&["images", "pull", "--plain-http", "--snapshotter", "wisp", &img]);
    node.ctr(&["snapshots", "--snapshotter", "wisp", "prepare", "k-lone", &lone_chain]);
    let (_, lowers) = overlay_dirs(&node, "k-lone");
    assert_eq!(lowers.len(), 1, "{lowers:?}");
    assert!(lowers[0].starts_with(node.snap_root().join("snapshots")), "not the layer's own directory: {lowers:?}");
    assert!(fs::symlink_metadata(lowers[0].join("wisp")).unwrap().file_type().is_symlink());
    node.ctr(&["snapshots", "--snapshotter", "wisp", "rm", "k-lone"]);
    assert!(wisp_lowers_mounted(&node).is_empty(), "{:?}", wisp_lowers_mounted(&node));
    assert_eq!(node.daemon_status()["mounts"].as_array().unwrap().len(), 0, "the daemon mounted an index");
    let v1_blobs: HashSet<String> = unpacked_objects(&node.snap_root()).into_iter().flatten().map(|o| o.1).collect();
    let fetched: Vec<_> = blobs_served(&log, off).into_iter().filter(|(d, _)| v1_blobs.contains(d)).collect();
    assert!(fetched.is_empty(), "the crafted images fetched wisp objects: {fetched:?}");

    // The wisp image itself still runs lazily on its checked index.
    let off = log_len(&log);
    node.ctr(&["run", "-d", "--snapshotter", "wisp", &v1, "c-wisp", "sleep", "1000"]);
    let (_, lowers) = overlay_dirs(&node, "c-wisp");
    assert!(lowers.len() == 1 && lowers[0].starts_with(node.snap_root().join("wisp")), "{lowers:?}");
    assert_eq!(node.ctr(&["tasks", "exec", "--exec-id", "e1", "c-wisp", "python3", "-c", STARTUP]).trim(), "1");
    let served = blobs_served(&log, off);
    assert!(!served.is_empty() && served.iter().all(|(d, _)| v1_blobs.contains(d)), "not lazy: {served:?}");
    assert_eq!(node.daemon_status()["mounts"].as_array().unwrap().len(), 1);

    // The socket: root gets answers (the same client, so the refusals below are the snapshotter's).
    let snap_sock = node.dir.join("snapshotter.sock");
    let ls = |who_nobody: bool| {
        let args: Vec<&OsStr> = vec![
            "--address".as_ref(),
            snap_sock.as_os_str(),
            "--connect-timeout".as_ref(),
            "3s".as_ref(),
            "--timeout".as_ref(),
            "10s".as_ref(),
            "snapshots".as_ref(),
            "ls".as_ref(),
        ];
        if who_nobody {
            as_nobody("ctr", &args)
        } else {
            Command::new("ctr").args(&args).output().unwrap()
        }
    };
    let root_ls = ls(false);
    assert!(root_ls.status.success(), "root: {}", String::from_utf8_lossy(&root_ls.stderr));
    assert!(String::from_utf8_lossy(&root_ls.stdout).contains("Committed"));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(fs::metadata(&snap_sock).unwrap().permissions().mode() & 0o777, 0o600);
    let out = ls(true);
    assert!(!out.status.success(), "nobody listed snapshots: {}", String::from_utf8_lossy(&out.stdout));
    // Even through a socket anyone may open, the snapshotter answers root only (SO_PEERCRED).
    fs::set_permissions(&snap_sock, fs::Permissions::from_mode(0o666)).unwrap();
    let out = ls(true);
    assert!(
        !out.status.success(),
        "nobody listed snapshots through a 0666 socket: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    eprintln!("nobody, 0666 socket: {}", String::from_utf8_lossy(&out.stderr).trim());

    // The root and its directories are 0700; nobody reaches nothing under them, not even a setuid
    // program of a layer.
    let root = node.snap_root();
    for d in [root.clone(), root.join("snapshots"), root.join("wisp")] {
        assert_eq!(fs::metadata(&d).unwrap().permissions().mode() & 0o7777, 0o700, "{}", d.display());
    }
    let setuid = Command::new("find")
        .arg(root.join("snapshots"))
        .args(["-xdev", "-type", "f", "-perm", "-4000", "-print", "-quit"])
        .output()
        .unwrap();
    let setuid = String::from_utf8(setuid.stdout).unwrap().trim().to_owned();
    assert!(!setuid.is_empty(), "no setuid program in python:v1's layers");
    let metadata = root.join("metadata.json");
    for p in [setuid.as_str(), metadata.to_str().unwrap(), victim.as_str()] {
        let out = as_nobody("stat", &[p.as_ref()]);
        assert!(!out.status.success(), "nobody reached {p}: {}", String::from_utf8_lossy(&out.stdout));
    }
    let out = as_nobody("ls", &[root.as_os_str()]);
    assert!(!out.status.success(), "nobody listed {}", root.display());
    node.remove_containers();
    for img in ["wisp/python:v1", "python:evil-link", "python:evil-files", "evil/lone:v1"] {
        node.ctr(&["images", "rm", "--sync", &format!("{reg}/{img}")]);
    }
    assert!(wisp_lowers_mounted(&node).is_empty(), "{:?}", wisp_lowers_mounted(&node));
    eprintln!("containerd guard test: {:.1}s", started.elapsed().as_secs_f64());
}

/// A wisp image in a registry with TLS from a private CA and htpasswd auth (issue 21), run through
/// containerd: ctr pulls the index image with the node's hosts directory and credentials, and the
/// daemon fetches the objects with the same configuration (`WISP_HOSTS_DIR`, `DOCKER_CONFIG`). The
/// registry's own access log shows the objects came from it.
#[test]
fn containerd_runs_a_wisp_image_from_a_private_tls_registry() {
    if !can_run() || !require(common::have("htpasswd") && common::have("openssl"), "htpasswd, openssl (scripts/setup)")
    {
        return;
    }
    const TLS_PORT: u16 = 5112;
    let (user, password) = ("carol", "tls-pw-1");
    let dir = PathBuf::from(format!("/var/tmp/wisp-containerd-test-{}-tls", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let pki = common::tls::Pki::new(&dir.join("pki"), user, password);
    let reg = common::tls::Registry::start(&dir.join("registry"), TLS_PORT, &pki.tls_config(), &pki.auth_config(), &[]);
    let host = format!("127.0.0.1:{TLS_PORT}");
    let hosts = dir.join("certs.d");
    fs::create_dir_all(hosts.join(&host)).unwrap();
    fs::copy(pki.dir.join("ca.crt"), hosts.join(&host).join("ca.crt")).unwrap();
    // One file for containerd and wisp (containerd takes a loopback host for plain HTTP without it, and
    // containerd 1.6 wants a `host` table).
    fs::write(
        hosts.join(&host).join("hosts.toml"),
        format!("server = \"https://{host}\"\n\n[host.\"https://{host}\"]\n  ca = \"ca.crt\"\n"),
    )
    .unwrap();
    let docker = dir.join("docker");
    fs::create_dir_all(&docker).unwrap();
    let auth = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    };
    fs::write(
        docker.join("config.json"),
        serde_json::json!({ "auths": { host.as_str(): { "auth": auth } } }).to_string(),
    )
    .unwrap();
    let image = format!("{host}/wisp/python:v1");
    let oci = common::corpus_oci(&["python"]);
    run(Command::new(wisp_bin())
        .args(["convert", &format!("oci:{}/python:v1", oci.display()), &format!("docker://{image}")])
        .env("WISP_HOSTS_DIR", &hosts)
        .env("DOCKER_CONFIG", &docker));

    let mut node = Node {
        dir: dir.clone(),
        port: TLS_PORT,
        registry: host.clone(),
        containerd: None,
        snapshotter: None,
        daemon: None,
        env: vec![("WISP_HOSTS_DIR", hosts.clone()), ("DOCKER_CONFIG", docker.clone())],
        plain_http: false,
    };
    node.start_daemon();
    node.start_snapshotter();
    node.start_containerd();
    let creds = format!("{user}:{password}");
    let hosts_arg = hosts.to_str().unwrap();
    node.ctr(&["images", "pull", "--hosts-dir", hosts_arg, "--user", &creds, "--snapshotter", "wisp", &image]);
    let off = reg.log_len();
    let out = node.ctr(&["run", "--snapshotter", "wisp", "--rm", &image, "c-tls", "python3", "-c", STARTUP]);
    assert_eq!(out.trim(), "1");
    let maps = unpacked_objects(&node.snap_root());
    assert_eq!(maps.len(), 1, "one unpacked wisp layer");
    let objects: HashSet<&str> = maps[0].iter().map(|o| o.1.as_str()).collect();
    let served = reg.blobs_served(off);
    assert!(!served.is_empty(), "the start fetched nothing from the TLS registry: not lazy through wisp?");
    assert!(served.iter().all(|b| objects.contains(b.as_str())), "non-object blobs fetched: {served:?}");
    eprintln!("ctr run from the TLS registry with auth: {} objects fetched", served.len());
    drop(node);
    drop(reg);
}
