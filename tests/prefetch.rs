//! The startup prefetch list end to end on the host kernel (fanotify pre-content, 6.14+): a first
//! mount of python:v1 records which files its import read (`wisp stats --accessed`), `wisp convert
//! --prefetch` ships that list in the index image, and a cold mount of the new image fetches those
//! objects before anything reads them. What was fetched is counted from the registry's own log.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{require, run, wisp_bin};

const PORT: u16 = 5140;
const WORKLOAD: &str = "python3 -c 'import json, email; print(1)'";

fn can_run() -> bool {
    if !require(common::is_root(), "needs root (fanotify pre-content, mounts)") {
        return false;
    }
    let ok = fscache::fanotify::Group::new().and_then(|g| {
        fs::create_dir_all("/var/tmp").ok();
        g.probe(Path::new("/var/tmp"))
    });
    require(ok.is_ok(), &format!("fanotify pre-content marks unavailable: {:?}", ok.err()))
        && require(Path::new("/usr/bin/docker-registry").exists(), "docker-registry is not installed (scripts/setup)")
}

/// The registry and scratch directory; the registry is stopped on drop, the directory removed unless
/// the test failed.
struct Scratch {
    tmp: PathBuf,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = Command::new(common::repo_root().join("scripts/registry"))
            .args(["stop", "--port", &PORT.to_string()])
            .status();
        if !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.tmp);
        }
    }
}

/// A running `wisp daemon`; stopped (after unmounting what is left) on drop.
struct Daemon {
    child: Child,
    state: PathBuf,
    mounts: Vec<PathBuf>,
}

impl Daemon {
    fn start(dir: &Path, env: &[(&str, &str)]) -> Daemon {
        let state = dir.join("state");
        let mut cmd = Command::new(wisp_bin());
        cmd.args(["daemon", "--cache"]).arg(dir.join("cache")).arg("--state").arg(&state).env("WISP_LOG", "info");
        cmd.envs(env.iter().copied());
        fs::create_dir_all(dir).unwrap();
        cmd.stderr(fs::File::create(dir.join("daemon.log")).unwrap()).stdout(Stdio::null());
        let d = Daemon { child: cmd.spawn().unwrap(), state, mounts: Vec::new() };
        let t = Instant::now();
        while std::os::unix::net::UnixStream::connect(d.state.join("control.sock")).is_err() {
            assert!(t.elapsed() < Duration::from_secs(30), "daemon did not start; see {}", dir.display());
            std::thread::sleep(Duration::from_millis(50));
        }
        d
    }

    fn wisp(&self, args: &[&str]) -> String {
        run(Command::new(wisp_bin()).args(args).arg("--state").arg(&self.state))
    }

    fn mount(&mut self, image: &str, dir: &Path) {
        fs::create_dir_all(dir).unwrap();
        run(Command::new(wisp_bin())
            .args(["mount", image])
            .arg(dir)
            .args(["--plain-http", "--state"])
            .arg(&self.state));
        self.mounts.push(dir.to_owned());
    }

    fn umount(&mut self, dir: &Path) {
        run(Command::new(wisp_bin()).arg("umount").arg(dir).arg("--state").arg(&self.state));
        self.mounts.retain(|m| m != dir);
    }

    fn image(&self) -> serde_json::Value {
        let v: serde_json::Value = serde_json::from_str(&self.wisp(&["stats", "--json"])).unwrap();
        v["images"][0].clone()
    }

    /// Object blob digests of the one mounted image (from the object map the daemon pulled).
    fn object_blobs(&self) -> HashSet<String> {
        let sock = self.state.join("control.sock");
        let st = wisp::daemon::protocol::call(&sock, &wisp::daemon::protocol::Request::Status, None).unwrap();
        let id = st["mounts"][0]["image"].as_str().unwrap().to_owned();
        let map = fs::read(self.state.join("images").join(id).join("objects.map")).unwrap();
        wisp::index::objmap::decode(&map).unwrap().iter().map(|e| e.blob_digest()).collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        for m in self.mounts.clone() {
            let _ = Command::new(wisp_bin()).arg("umount").arg(&m).arg("--state").arg(&self.state).status();
        }
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Blob GETs the registry served since byte `offset` of its log: (digest, bytes).
fn blobs_served(log: &Path, offset: u64) -> Vec<(String, u64)> {
    let bytes = fs::read(log).unwrap();
    String::from_utf8_lossy(&bytes[offset as usize..])
        .lines()
        .filter(|l| l.contains("\"GET /v2/") && l.contains("/blobs/sha256:"))
        .filter_map(|l| {
            let digest = l.split("/blobs/").nth(1)?.split(' ').next()?.to_owned();
            let mut it = l.split("HTTP/1.1\" ").nth(1)?.split(' ');
            (it.next()? == "200").then_some(())?;
            Some((digest, it.next()?.parse().ok()?))
        })
        .collect()
}

fn log_len(log: &Path) -> u64 {
    fs::metadata(log).unwrap().len()
}

fn chroot(dir: &Path, cmd: &str) -> String {
    run(Command::new("chroot").arg(dir).args(["sh", "-c", cmd]))
}

/// Polls the one mounted image's stats until its prefetch has finished (no reader runs meanwhile).
fn wait_prefetch(d: &Daemon) -> serde_json::Value {
    let t = Instant::now();
    loop {
        let img = d.image();
        if img["prefetch_done"].as_bool() == Some(true) {
            return img;
        }
        assert!(t.elapsed() < Duration::from_secs(300), "prefetch did not finish: {img}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn recorded_list_is_shipped_and_prefetched_before_any_read() {
    if !can_run() {
        return;
    }
    let tmp = PathBuf::from(format!("/var/tmp/wisp-prefetch-test-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).unwrap();
    let scratch = Scratch { tmp: tmp.clone() };
    let root = common::repo_root();
    let _ = Command::new(root.join("scripts/registry")).args(["stop", "--port", &PORT.to_string()]).status();
    run(Command::new(root.join("scripts/registry"))
        .args(["start", "--port", &PORT.to_string(), "--root"])
        .arg(tmp.join("registry")));
    let registry = format!("127.0.0.1:{PORT}");
    let state_base = std::env::var("WISP_REGISTRY_STATE").unwrap_or_else(|_| "/tmp/wisp-registry".into());
    let log = PathBuf::from(state_base).join(PORT.to_string()).join("registry.log");
    run(Command::new(root.join("scripts/corpus")).args(["push", "--registry", &registry, "python"]));
    let src = format!("docker://{registry}/python:v1");
    let plain = format!("docker://{registry}/wisp/python:v1");
    let with_list = format!("docker://{registry}/wisp/python:v1-prefetch");
    run(Command::new(wisp_bin()).args(["convert", &src, &plain, "--plain-http", "--json"]));

    // 1. Profiling run: the import on a cold mount of the image without a list; record what it read.
    let off = log_len(&log);
    let list = {
        let mut d = Daemon::start(&tmp.join("profile"), &[]);
        let mnt = tmp.join("profile/mnt");
        d.mount(&plain, &mnt);
        let objects = d.object_blobs();
        assert_eq!(chroot(&mnt, WORKLOAD), "1\n");
        let img = d.image();
        assert_eq!(img["prefetch_listed"], 0, "an image without a list prefetches nothing: {img}");
        let list = d.wisp(&["stats", "--accessed", mnt.to_str().unwrap()]);
        d.umount(&mnt);
        let read: HashSet<String> =
            blobs_served(&log, off).into_iter().map(|(b, _)| b).filter(|b| objects.contains(b)).collect();
        assert_eq!(list.lines().count(), read.len(), "one listed path per object the import fetched:\n{list}");
        assert!(list.lines().all(|l| l.starts_with('/')), "{list}");
        assert!(list.lines().any(|l| l.contains("/json/")), "the import reads the json package:\n{list}");
        list
    };
    let list_file = tmp.join("prefetch.list");
    fs::write(&list_file, &list).unwrap();

    // 2. A path the image does not have: an error naming it and its line; nothing is tagged.
    let bad = tmp.join("bad.list");
    fs::write(&bad, format!("{list}/usr/lib/no-such-file\n")).unwrap();
    let out = Command::new(wisp_bin())
        .args(["convert", &src, &format!("docker://{registry}/wisp/python:bad"), "--plain-http", "--prefetch"])
        .arg(&bad)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let want = format!("{}:{}: /usr/lib/no-such-file", bad.display(), list.lines().count() + 1);
    assert!(err.contains(&want), "expected {want:?} in: {err}");

    // 3. Reconverting with the list uploads no object again, only the index image.
    let sum: serde_json::Value = serde_json::from_str(&run(Command::new(wisp_bin())
        .args(["convert", &src, &with_list, "--plain-http", "--json", "--prefetch"])
        .arg(&list_file)))
    .unwrap();
    assert_eq!(sum["objects_written"], 0, "{sum}");

    // 4. Cold mount of the image with the list: with no reader at all, the registry serves exactly the
    // objects the import read; then the import fetches nothing more.
    let mut d = Daemon::start(&tmp.join("cold"), &[]);
    let mnt = tmp.join("cold/mnt");
    let off = log_len(&log);
    d.mount(&with_list, &mnt);
    let objects = d.object_blobs();
    let img = wait_prefetch(&d);
    let prefetched: HashSet<String> =
        blobs_served(&log, off).into_iter().map(|(b, _)| b).filter(|b| objects.contains(b)).collect();
    eprintln!("prefetch without a reader: {img}");
    assert_eq!(img["prefetch_listed"].as_u64().unwrap(), list.lines().count() as u64, "{img}");
    assert_eq!(img["prefetched"], img["prefetch_listed"], "{img}");
    assert_eq!(prefetched.len(), list.lines().count(), "the registry served every listed object");
    let off2 = log_len(&log);
    assert_eq!(chroot(&mnt, WORKLOAD), "1\n");
    let later: Vec<String> =
        blobs_served(&log, off2).into_iter().map(|(b, _)| b).filter(|b| objects.contains(b)).collect();
    assert!(later.is_empty(), "the import still fetched {} objects after the prefetch: {later:?}", later.len());
    let wire: u64 = blobs_served(&log, off).iter().map(|(_, n)| n).sum();
    let img = d.image();
    let stored = img["stored_bytes"].as_u64().unwrap();
    eprintln!(
        "cold start with prefetch: {:.2} MB over the wire of {:.2} MB stored",
        wire as f64 / 1e6,
        stored as f64 / 1e6
    );
    assert!(wire * 4 <= stored, "startup fetched {wire} bytes, more than 25% of {stored}");
    d.umount(&mnt);
    drop(d);

    // 5. umount stops a prefetch in progress (each fetch held 1 s): it returns, and far fewer objects
    // than listed were fetched.
    let mut d = Daemon::start(&tmp.join("cancel"), &[("WISP_TEST_FETCH_DELAY_MS", "1000")]);
    let mnt = tmp.join("cancel/mnt");
    let off = log_len(&log);
    d.mount(&with_list, &mnt);
    let objects = d.object_blobs();
    d.umount(&mnt);
    let n = blobs_served(&log, off).into_iter().filter(|(b, _)| objects.contains(b)).count();
    assert!(n < list.lines().count() / 2, "umount let the prefetch go on: {n} objects fetched");
    drop(d);
    drop(scratch);
}
