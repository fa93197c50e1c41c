//! The startup prefetch list end to end on the host kernel (fanotify pre-content, 6.14+): a first
//! mount of python:v1 records which files its import read (`wisp stats --accessed`), `wisp convert
//! --prefetch` ships that list in the index image, and a cold mount of the new image fetches those
//! objects before anything reads them. What was fetched is counted from the registry's own log.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::daemon::{require_fanotify, Daemon};
use common::registry::{self, blobs_served, log_len};
use common::{chroot, require, run, wisp_bin};

const PORT: u16 = 5140;
const WORKLOAD: &str = "python3 -c 'import json, email; print(1)'";

fn can_run() -> bool {
    if !require(common::is_root(), "needs root (fanotify pre-content, mounts)") {
        return false;
    }
    require_fanotify()
        && require(Path::new("/usr/bin/docker-registry").exists(), "docker-registry is not installed (scripts/setup)")
}

/// The registry and scratch directory; the registry is stopped on drop, the directory removed unless
/// the test failed.
struct Scratch {
    tmp: PathBuf,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        registry::stop(PORT);
        if !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.tmp);
        }
    }
}

impl Daemon {
    fn image(&self) -> serde_json::Value {
        self.stats()["images"][0].clone()
    }

    /// Object blob digests of the one mounted image (from the object map the daemon pulled).
    fn object_blobs(&self) -> HashSet<String> {
        let st = wisp::daemon::protocol::call(&self.sock(), &wisp::daemon::protocol::Request::Status, None).unwrap();
        let id = st["mounts"][0]["image"].as_str().unwrap().to_owned();
        let map = fs::read(self.state.join("images").join(id).join("objects.map")).unwrap();
        wisp::index::objmap::decode(&map).unwrap().iter().map(|e| e.blob_digest()).collect()
    }
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
    registry::start(PORT, &tmp.join("registry"));
    let registry = format!("127.0.0.1:{PORT}");
    let log = registry::log(PORT);
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
        d.mount(&plain, &mnt, &["--plain-http"]);
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
    d.mount(&with_list, &mnt, &["--plain-http"]);
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
    d.mount(&with_list, &mnt, &["--plain-http"]);
    let objects = d.object_blobs();
    d.umount(&mnt);
    let n = blobs_served(&log, off).into_iter().filter(|(b, _)| objects.contains(b)).count();
    assert!(n < list.lines().count() / 2, "umount let the prefetch go on: {n} objects fetched");
    drop(d);
    drop(scratch);
}
