//! The daemon with the cachefiles frontend: a lazy start of the python image and a worker kill -9.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common;
use crate::guest::*;
use crate::harness::{in_vm_env, vm_tests_enabled};

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
