//! The lazy path end to end on the host kernel (fanotify pre-content, 6.14+): the corpus's python
//! images are pushed to a private registry on 127.0.0.1, converted by `wisp convert`, and mounted by
//! `wisp daemon` + `wisp mount`. Bytes fetched are counted from the registry's own access log, outside
//! wisp. The oracle is `wisp pull --eager`.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::collections::HashSet;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::daemon::{require_fanotify, Daemon};
use common::registry::{self, blobs_served, log_len};
use common::{chroot, compare_trees, require, run, wisp_bin, CompareOptions};

const PORT: u16 = 5093;

/// Serializes the tests of this binary (they share the registry and are heavy).
static SERIAL: Mutex<()> = Mutex::new(());
static FIXTURE: OnceLock<Option<Fixture>> = OnceLock::new();
/// Tests of this binary that use the fixture; the last to finish stops the registry.
const TESTS: usize = 3;
static FINISHED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Counts a finished test; the last one stops the registry and removes the scratch directory (kept
/// when a test failed, for its logs).
struct Finish;

impl Drop for Finish {
    fn drop(&mut self) {
        static FAILED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if std::thread::panicking() {
            FAILED.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        if FINISHED.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == TESTS {
            if let Some(Some(fx)) = FIXTURE.get() {
                registry::stop(PORT);
                if !FAILED.load(std::sync::atomic::Ordering::SeqCst) {
                    let _ = fs::remove_dir_all(&fx.tmp);
                }
            }
        }
    }
}

struct Fixture {
    tmp: PathBuf,
    registry: String,
    log: PathBuf,
    v1: String,
    v2: String,
    oracle_v1: PathBuf,
}

fn can_run() -> bool {
    if !require(common::is_root(), "needs root (fanotify pre-content, mounts)") {
        return false;
    }
    require_fanotify()
        && require(Path::new("/usr/bin/docker-registry").exists(), "docker-registry is not installed (scripts/setup)")
}

fn fixture() -> Option<&'static Fixture> {
    FIXTURE
        .get_or_init(|| {
            if !can_run() {
                return None;
            }
            let tmp = PathBuf::from(format!("/var/tmp/wisp-lazy-test-{}", std::process::id()));
            let _ = fs::remove_dir_all(&tmp);
            fs::create_dir_all(&tmp).unwrap();
            let root = common::repo_root();
            registry::start(PORT, &tmp.join("registry"));
            let registry = format!("127.0.0.1:{PORT}");
            run(Command::new(root.join("scripts/corpus")).args(["push", "--registry", &registry, "python"]));
            let log = registry::log(PORT);
            for tag in ["v1", "v2"] {
                run(Command::new(wisp_bin()).args([
                    "convert",
                    &format!("docker://{registry}/python:{tag}"),
                    &format!("docker://{registry}/wisp/python:{tag}"),
                    "--plain-http",
                    "--json",
                ]));
            }
            let v1 = format!("docker://{registry}/wisp/python:v1");
            let v2 = format!("docker://{registry}/wisp/python:v2");
            let oracle_v1 = tmp.join("oracle-v1");
            run(Command::new(wisp_bin())
                .args(["pull", "--eager", &v1])
                .arg(&oracle_v1)
                .args(["--plain-http", "--json"]));
            Some(Fixture { tmp, registry, log, v1, v2, oracle_v1 })
        })
        .as_ref()
}

/// `GET /v2/` auth probes the registry answered since byte `offset` of its log.
fn auth_probes(log: &Path, offset: u64) -> usize {
    let bytes = fs::read(log).unwrap();
    String::from_utf8_lossy(&bytes[offset as usize..]).lines().filter(|l| l.contains("\"GET /v2/ HTTP/")).count()
}

/// The object map of an image the daemon pulled: content digest -> blob digest (as served).
fn object_blobs(state: &Path, image_id: &str) -> Vec<(String, String)> {
    let map = wisp::index::objmap::decode(&fs::read(state.join("images").join(image_id).join("objects.map")).unwrap())
        .unwrap();
    map.iter().map(|e| (hex::encode(e.digest), e.blob_digest())).collect()
}

/// Every regular file below `root`, relative.
fn files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in fs::read_dir(root.join(&rel)).unwrap() {
            let e = e.unwrap();
            let ft = e.file_type().unwrap();
            let p = rel.join(e.file_name());
            if ft.is_dir() {
                stack.push(p);
            } else if ft.is_file() {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn read_all(p: &Path) -> std::io::Result<Vec<u8>> {
    let mut v = Vec::new();
    fs::File::open(p)?.read_to_end(&mut v)?;
    Ok(v)
}

#[test]
fn lazy_python_start_sibling_and_full_tree() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let _finish = Finish;
    let Some(fx) = fixture() else { return };
    let dir = fx.tmp.join("t-lazy");
    let _ = fs::remove_dir_all(&dir);
    let mut d = Daemon::start(&dir, &[]);
    let (mnt, upper, work) = (dir.join("mnt"), dir.join("upper"), dir.join("work"));

    // Cold start: mount, run the startup workload, count what the registry served.
    let off = log_len(&fx.log);
    let t = Instant::now();
    d.mount_overlay(&fx.v1, &mnt, &upper, &work, &["--plain-http"]);
    let out = chroot(&mnt, "python3 -c 'import json, email; print(1)'");
    let startup = t.elapsed();
    assert_eq!(out, "1\n");
    let served = blobs_served(&fx.log, off);
    let wire: u64 = served.iter().map(|(_, n)| n).sum();
    let st = d.status();
    let image_id = st["mounts"][0]["image"].as_str().unwrap().to_owned();
    let v1_objects = object_blobs(&d.state, &image_id);
    let stats = d.stats();
    let img = &stats["images"][0];
    let stored = img["stored_bytes"].as_u64().unwrap();
    let content = img["content_bytes"].as_u64().unwrap();
    eprintln!(
        "cold start: {:.2}s, registry served {} blobs, {:.2} MB (index + objects) = {:.1}% of the image's {:.1} MB of stored objects ({:.1} MB content); daemon counted {} objects, {:.2} MB",
        startup.as_secs_f64(),
        served.len(),
        wire as f64 / 1e6,
        100.0 * wire as f64 / stored as f64,
        stored as f64 / 1e6,
        content as f64 / 1e6,
        img["objects_fetched"],
        img["bytes_fetched"].as_f64().unwrap() / 1e6
    );
    assert!(wire * 4 <= stored, "startup fetched {wire} bytes, more than 25% of {stored}");
    assert!(img["objects_fetched"].as_u64().unwrap() > 0);
    // One round trip per object: the open registry is probed for auth a few times in all (index pull,
    // first object), not before every object.
    let probes = auth_probes(&fx.log, off);
    assert!(served.len() > 20 && probes <= 5, "{probes} auth probes for {} blobs", served.len());

    // The app's own files are right.
    assert_eq!(
        chroot(&mnt, "cat /app/VERSION").trim(),
        fs::read_to_string(fx.oracle_v1.join("app/VERSION")).unwrap().trim()
    );

    // Full tree, byte for byte, against the eager pull.
    let diffs = compare_trees(&fx.oracle_v1, &mnt, &CompareOptions::default());
    assert!(diffs.is_empty(), "{} differences, first: {:#?}", diffs.len(), &diffs[..diffs.len().min(10)]);

    // Writes go to the upper dir, never to the cache.
    chroot(&mnt, "echo written > /root/wisp-write && echo more >> /app/main.py");
    assert_eq!(fs::read_to_string(upper.join("root/wisp-write")).unwrap(), "written\n");
    assert!(fs::read_to_string(upper.join("app/main.py")).unwrap().ends_with("more\n"));
    let orig = fs::read(fx.oracle_v1.join("app/main.py")).unwrap();
    let obj = v1_objects.iter().map(|(c, _)| d.cache.join("objects").join(&c[..2]).join(c));
    for p in obj {
        let m = fs::metadata(&p).unwrap();
        assert_eq!(m.len() % 4096, 0, "{} is not padded", p.display());
    }
    assert!(!fs::read(fx.oracle_v1.join("app/main.py")).unwrap().ends_with(b"more\n"));
    assert_eq!(orig, fs::read(fx.oracle_v1.join("app/main.py")).unwrap());

    // The sibling image fetches only objects v1 does not have.
    let (mnt2, upper2, work2) = (dir.join("mnt2"), dir.join("upper2"), dir.join("work2"));
    let off = log_len(&fx.log);
    d.mount_overlay(&fx.v2, &mnt2, &upper2, &work2, &["--plain-http"]);
    let mut bad = Vec::new();
    for f in files(&mnt2) {
        if let Err(e) = read_all(&mnt2.join(&f)) {
            bad.push(format!("{}: {e}", f.display()));
        }
    }
    assert!(bad.is_empty(), "{bad:?}");
    let st = d.status();
    let v2_id = st["mounts"].as_array().unwrap().iter().find(|m| m["reference"] == fx.v2.as_str()).unwrap()["image"]
        .as_str()
        .unwrap()
        .to_owned();
    let v2_objects = object_blobs(&d.state, &v2_id);
    let v1_set: HashSet<&str> = v1_objects.iter().map(|(c, _)| c.as_str()).collect();
    let new_blobs: HashSet<&str> =
        v2_objects.iter().filter(|(c, _)| !v1_set.contains(c.as_str())).map(|(_, b)| b.as_str()).collect();
    let old_blobs: HashSet<&str> =
        v2_objects.iter().filter(|(c, _)| v1_set.contains(c.as_str())).map(|(_, b)| b.as_str()).collect();
    let served = blobs_served(&fx.log, off);
    let fetched: HashSet<&str> =
        served.iter().map(|(b, _)| b.as_str()).filter(|b| new_blobs.contains(b) || old_blobs.contains(b)).collect();
    let refetched: Vec<&&str> = fetched.iter().filter(|b| old_blobs.contains(**b)).collect();
    eprintln!(
        "sibling: {} objects in v2, {} new; full walk fetched {} object blobs ({:.2} MB served in all)",
        v2_objects.len(),
        new_blobs.len(),
        fetched.len(),
        served.iter().map(|(_, n)| n).sum::<u64>() as f64 / 1e6
    );
    assert!(refetched.is_empty(), "v2 fetched objects v1 already had: {refetched:?}");
    assert_eq!(fetched.len(), new_blobs.len(), "a full walk of v2 should fetch exactly its new objects");
    d.umount(&mnt2);
    d.umount(&mnt);

    // Warm start: the node holds v1's index and objects, so a new mount fetches no blob at all (only
    // the manifest, to learn the index's digest).
    let (mnt3, upper3, work3) = (dir.join("mnt3"), dir.join("upper3"), dir.join("work3"));
    let off = log_len(&fx.log);
    d.mount_overlay(&fx.v1, &mnt3, &upper3, &work3, &["--plain-http"]);
    assert_eq!(chroot(&mnt3, "python3 -c 'import json, email; print(1)'"), "1\n");
    let served = blobs_served(&fx.log, off);
    assert!(served.is_empty(), "a warm start fetched blobs: {served:?}");
    d.umount(&mnt3);
    let _ = &fx.registry;
}

#[test]
fn tampered_object_reads_eio_never_wrong_bytes() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let _finish = Finish;
    let Some(fx) = fixture() else { return };
    let dir = fx.tmp.join("t-tamper");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    // Objects in a dir: store, where they can be tampered with; the index in an OCI layout.
    let store = dir.join("store");
    let index = format!("oci:{}:v1", dir.join("index").display());
    let oci = common::corpus_oci(&["edge"]).display().to_string();
    run(Command::new(wisp_bin())
        .args(["convert", &format!("oci:{oci}/edge:1"), &index, "--json"])
        .arg("--store")
        .arg(format!("dir:{}", store.display())));
    // Flip one byte in the middle of every stored object.
    let mut tampered = 0;
    for f in files(&store.join("objects")) {
        let p = store.join("objects").join(f);
        let mut b = fs::read(&p).unwrap();
        let i = b.len() / 2;
        b[i] ^= 0x55;
        fs::write(&p, b).unwrap();
        tampered += 1;
    }
    assert!(tampered >= 3, "{tampered} objects");
    let mut d = Daemon::start(&dir, &[]);
    let (mnt, upper, work) = (dir.join("mnt"), dir.join("upper"), dir.join("work"));
    for p in [&mnt, &upper, &work] {
        fs::create_dir_all(p).unwrap();
    }
    run(Command::new(wisp_bin())
        .args(["mount", &index])
        .arg(&mnt)
        .arg("--upper")
        .arg(&upper)
        .arg("--work")
        .arg(&work)
        .arg("--store")
        .arg(format!("dir:{}", store.display()))
        .arg("--state")
        .arg(&d.state));
    d.mounts.push(mnt.clone());
    let target = mnt.join("sizes/1MiB");
    let t = Instant::now();
    let err = read_all(&target).expect_err("a tampered object must not be readable");
    eprintln!("tampered object: {err} after {:.2}s", t.elapsed().as_secs_f64());
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    // Again (the failed object is retried, and fails again), and a small read too.
    let mut f = fs::File::open(&target).unwrap();
    let mut b = [0u8; 16];
    assert_eq!(f.read(&mut b).unwrap_err().raw_os_error(), Some(libc::EIO));
    drop(f);
    let stats = d.stats();
    assert!(stats["images"][0]["failures"].as_u64().unwrap() >= 2, "{stats}");
    d.umount(&mnt);
}

#[test]
fn worker_kill9_during_cold_walk_never_reads_zeros() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let _finish = Finish;
    let Some(fx) = fixture() else { return };
    let dir = fx.tmp.join("t-kill");
    let _ = fs::remove_dir_all(&dir);
    // Slow every download down so that many events are in flight when the worker dies.
    let mut d = Daemon::start(&dir, &[("WISP_TEST_FETCH_DELAY_MS", "40")]);
    let (mnt, upper, work) = (dir.join("mnt"), dir.join("upper"), dir.join("work"));
    d.mount_overlay(&fx.v1, &mnt, &upper, &work, &["--plain-http"]);
    let old_pid = d.status()["worker_pid"].as_i64().unwrap();

    // Four readers walk disjoint quarters of the tree, comparing every file with the oracle.
    let all = files(&fx.oracle_v1);
    let results: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let killed_at = std::thread::scope(|s| {
        for k in 0..4 {
            let (all, results, mnt) = (&all, &results, &mnt);
            s.spawn(move || {
                for f in all.iter().skip(k).step_by(4) {
                    let want = fs::read(fx.oracle_v1.join(f)).unwrap();
                    match read_all(&mnt.join(f)) {
                        Ok(got) if got == want => {}
                        Ok(got) => results.lock().unwrap().push(format!(
                            "{}: WRONG BYTES ({} zero bytes of {})",
                            f.display(),
                            got.iter().filter(|b| **b == 0).count(),
                            got.len()
                        )),
                        Err(e) => results.lock().unwrap().push(format!("{}: error {e}", f.display())),
                    }
                }
            });
        }
        std::thread::sleep(Duration::from_secs(3));
        let events_before = d.stats()["frontend"]["events"].as_u64().unwrap();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(old_pid as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
        events_before
    });
    let results = results.into_inner().unwrap();
    let st = d.status();
    let new_pid = st["worker_pid"].as_i64().unwrap();
    assert_ne!(new_pid, old_pid, "the supervisor did not start a new worker");
    eprintln!(
        "kill -9 of worker {old_pid} after {killed_at} events: new worker {new_pid} recovered {}; walk finished with {} errors: {:?}",
        st["recovered"],
        results.len(),
        &results[..results.len().min(5)]
    );
    let wrong: Vec<&String> = results.iter().filter(|r| r.contains("WRONG BYTES")).collect();
    assert!(wrong.is_empty(), "reads returned wrong bytes: {wrong:?}");
    assert!(results.iter().all(|r| r.contains("os error 5")), "only EIO is acceptable: {results:?}");
    assert!(
        st["recovered"]["resumed"].as_u64().unwrap() + st["recovered"]["allowed"].as_u64().unwrap() > 0,
        "no event was in flight at the kill: {st}"
    );
    // After the restart, everything reads back right.
    let diffs = compare_trees(&fx.oracle_v1, &mnt, &CompareOptions::default());
    assert!(diffs.is_empty(), "{} differences, first: {:#?}", diffs.len(), &diffs[..diffs.len().min(10)]);
    d.umount(&mnt);
}
