//! A registry that stops answering (a real docker-registry on 127.0.0.1 stopped with SIGSTOP: its
//! kernel still accepts connections, nothing answers them) must not hang wisp:
//!
//! * `wisp convert` from it fails within a bounded time with an error naming the registry;
//! * the daemon's fetcher over it (the real [`Fetcher`] over a [`RepoStore`] of the registry, as the
//!   worker builds it) fails 100 object fetches at their deadline while the process's thread and fd
//!   counts (read from /proc) stay within a small bound: a download past its deadline is cancelled
//!   and its connection closed, not left running on an abandoned thread;
//! * a blob download cut at its deadline fails with an error naming the blob and the registry.
//!
//! The registry is resumed (SIGCONT) and stopped on drop, whatever happens.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{registry, repo_root, require, run, wisp_bin};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use sha2::{Digest as _, Sha256};
use wisp::daemon::fetcher::{FetchOptions, Fetcher};
use wisp::object::{Compression, ObjectEntry};
use wisp::oci::registry::Registry;
use wisp::oci::{Repo, TransportOptions};
use wisp::store::{ObjectStore, RepoStore};

/// The tests count this process's threads and fds; one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn can_run() -> bool {
    require(common::is_root(), "needs root (scripts/registry state under /tmp)")
        && require(Path::new("/usr/bin/docker-registry").exists(), "docker-registry is not installed (scripts/setup)")
        && require(common::have("curl"), "curl is not installed (scripts/setup)")
}

/// A registry of our own on `port`; resumed and stopped on drop.
struct Stalled {
    port: u16,
    pid: Pid,
    tmp: PathBuf,
}

impl Stalled {
    fn start(port: u16) -> Stalled {
        let tmp = PathBuf::from(format!("/var/tmp/wisp-registry-timeouts-{port}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp).unwrap();
        registry::start(port, &tmp.join("storage"));
        let env = run(Command::new(repo_root().join("scripts/registry")).args(["env", "--port", &port.to_string()]));
        let pid = env.lines().find_map(|l| l.strip_prefix("REGISTRY_PID=")).expect("REGISTRY_PID");
        Stalled { port, pid: Pid::from_raw(pid.trim().parse().expect("a pid")), tmp }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn stop(&self) {
        kill(self.pid, Signal::SIGSTOP).unwrap();
        // Stopped means stopped: /proc says T before anything is asked of it.
        let stat = format!("/proc/{}/stat", self.pid);
        let t = Instant::now();
        while !fs::read_to_string(&stat).unwrap().split(") ").nth(1).is_some_and(|s| s.starts_with('T')) {
            assert!(t.elapsed() < Duration::from_secs(5), "registry pid {} did not stop", self.pid);
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn resume(&self) {
        let _ = kill(self.pid, Signal::SIGCONT);
    }
}

impl Drop for Stalled {
    fn drop(&mut self) {
        self.resume();
        registry::stop(self.port);
        if !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Entries of /proc/self/{task,fd}.
fn counts() -> (usize, usize) {
    let n = |d: &str| fs::read_dir(d).unwrap().count();
    (n("/proc/self/task"), n("/proc/self/fd"))
}

/// `wisp convert` from a stopped registry fails within a bounded time (the registry timeout, 1 s
/// here, from `$WISP_REGISTRY_TIMEOUT`) with an error naming the registry and the image; on a
/// wisp without timeouts it hangs until the test kills it.
#[test]
fn convert_from_stopped_registry_fails_with_clear_error() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    if !can_run() {
        return;
    }
    let reg = Stalled::start(5161);
    reg.stop();
    let out_dir = reg.tmp.join("out");
    let src = format!("docker://{}/stalled/image:v1", reg.addr());
    let started = Instant::now();
    let mut child = Command::new(wisp_bin())
        .args(["convert", &src])
        .arg(format!("oci:{}", out_dir.display()))
        .args(["--plain-http", "--store"])
        .arg(format!("dir:{}", reg.tmp.join("objects").display()))
        .env("WISP_REGISTRY_TIMEOUT", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("wisp convert from a stopped registry still runs after 30 s (registry timeout 1 s)");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(!status.success(), "convert from a stopped registry succeeded?\n{err}");
    assert!(
        err.contains(&reg.addr()) && err.contains("stalled/image"),
        "the error names the registry and image:\n{err}"
    );
    assert!(err.contains("timed out"), "the error says the registry did not answer in time:\n{err}");
    eprintln!("convert failed after {:?}:\n{err}", started.elapsed());
}

/// The bytes of fetched content.
fn bytes_of(c: &wisp::daemon::fetcher::Content) -> Vec<u8> {
    let mut v = Vec::new();
    c.for_each_piece(&mut |_, b| {
        v.extend_from_slice(b);
        Ok(())
    })
    .unwrap();
    v
}

/// Blobs of random bytes pushed to the registry, as uncompressed objects.
fn push_objects(repo: &Registry, n: usize) -> Vec<(ObjectEntry, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let data =
                format!("object {i} of the stalled-registry test {}\n", std::process::id()).repeat(50).into_bytes();
            let digest: [u8; 32] = Sha256::digest(&data).into();
            repo.put_blob(&format!("sha256:{}", hex::encode(digest)), &data).unwrap();
            let entry = ObjectEntry {
                digest,
                blob: digest,
                size: data.len() as u64,
                stored_size: data.len() as u64,
                compression: Compression::None,
            };
            (entry, data)
        })
        .collect()
}

/// 100 object fetches from a stopped registry through the daemon's fetcher each fail at their 0.5 s
/// deadline, and the thread and fd counts of this process never grow past a small bound (the callers,
/// the concurrency bound and slack); after the last failure they are back near where they started, so
/// no download was left behind. Once the registry resumes, fetches work again.
#[test]
fn fetcher_over_stopped_registry_fails_without_leaking_threads_or_fds() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    if !can_run() {
        return;
    }
    const OBJECTS: usize = 100;
    const CALLERS: usize = 10;
    const CONCURRENCY: usize = 4;
    let reg = Stalled::start(5162);
    let reference = format!("{}/stalled/objects:v1", reg.addr());
    let repo =
        Arc::new(Registry::open(&reference, &TransportOptions { plain_http: true, ..Default::default() }).unwrap());
    let objects = push_objects(&repo, OBJECTS + 1);
    let store: Arc<dyn ObjectStore> = Arc::new(RepoStore::new(Arc::clone(&repo) as Arc<dyn Repo>));
    let spool = reg.tmp.join("spool");
    fs::create_dir_all(&spool).unwrap();
    let fetcher = Arc::new(Fetcher::new(FetchOptions {
        concurrency: CONCURRENCY,
        attempts: 1,
        backoff: Duration::from_millis(50),
        deadline: Duration::from_millis(500),
        min_rate: 0.0,
        spool_dir: spool,
        delay: Duration::ZERO,
    }));
    // The registry works: the last object arrives, verified (and the client's pool, runtime and
    // auth probe are set up before counting).
    let (last, last_data) = &objects[OBJECTS];
    let (got, _) = fetcher.get(last, std::slice::from_ref(&store));
    let bytes = bytes_of(&got.expect("a fetch from the running registry"));
    assert_eq!(&bytes, last_data);

    reg.stop();
    let (threads0, fds0) = counts();
    let peak = Arc::new((AtomicUsize::new(threads0), AtomicUsize::new(fds0)));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (Arc::clone(&peak), Arc::clone(&done));
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                let (t, f) = counts();
                peak.0.fetch_max(t, Ordering::SeqCst);
                peak.1.fetch_max(f, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let started = Instant::now();
    let objects = Arc::new(objects);
    let callers: Vec<_> = (0..CALLERS)
        .map(|c| {
            let (fetcher, store, objects) = (Arc::clone(&fetcher), Arc::clone(&store), Arc::clone(&objects));
            std::thread::spawn(move || {
                let mut slowest = Duration::ZERO;
                for i in (c..OBJECTS).step_by(CALLERS) {
                    let t = Instant::now();
                    let (r, _) = fetcher.get(&objects[i].0, std::slice::from_ref(&store));
                    assert!(r.is_err(), "object {i} fetched from a stopped registry?");
                    slowest = slowest.max(t.elapsed());
                }
                slowest
            })
        })
        .collect();
    let slowest = callers.into_iter().map(|h| h.join().unwrap()).max().unwrap();
    // Downloads cancelled at their deadline end right after it: give them a moment.
    std::thread::sleep(Duration::from_millis(500));
    done.store(true, Ordering::SeqCst);
    sampler.join().unwrap();
    let (threads1, fds1) = counts();
    let (peak_threads, peak_fds) = (peak.0.load(Ordering::SeqCst), peak.1.load(Ordering::SeqCst));
    eprintln!(
        "{OBJECTS} failed fetches in {:?} (slowest {slowest:?}); threads {threads0} -> peak {peak_threads} -> \
         {threads1}; fds {fds0} -> peak {peak_fds} -> {fds1}",
        started.elapsed()
    );
    // Each failure comes at the deadline (a caller may wait for a slot, within that deadline).
    assert!(slowest < Duration::from_secs(3), "a fetch took {slowest:?} for a 0.5 s deadline");
    // While they run: the callers, one thread per download in flight (at most the bound), the sampler.
    let bound = CALLERS + CONCURRENCY + 8;
    assert!(peak_threads <= threads0 + bound, "threads grew from {threads0} to {peak_threads} (bound +{bound})");
    assert!(peak_fds <= fds0 + bound, "fds grew from {fds0} to {peak_fds} (bound +{bound})");
    // After: nothing left behind (the callers and sampler are gone; slack for the runtime's pool).
    assert!(threads1 <= threads0 + 4, "threads left behind: {threads0} before, {threads1} after");
    assert!(fds1 <= fds0 + 4, "fds left behind: {fds0} before, {fds1} after");

    // The registry resumes: the fetcher has every slot back and fetches again.
    reg.resume();
    let (first, first_data) = &objects[0];
    std::thread::sleep(wisp::daemon::fetcher::FAILURE_HOLD);
    let (got, _) = fetcher.get(first, std::slice::from_ref(&store));
    let bytes = bytes_of(&got.expect("a fetch after the registry resumed"));
    assert_eq!(&bytes, first_data);
}

/// A blob download from a stopped registry, cut at its deadline, fails at the deadline with an
/// error naming the blob and the registry.
#[test]
fn blob_from_stopped_registry_names_blob_and_registry() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    if !can_run() {
        return;
    }
    let reg = Stalled::start(5163);
    let reference = format!("{}/stalled/blob:v1", reg.addr());
    let repo = Registry::open(&reference, &TransportOptions { plain_http: true, ..Default::default() }).unwrap();
    let objects = push_objects(&repo, 1);
    let digest = format!("sha256:{}", hex::encode(objects[0].0.digest));
    reg.stop();
    let t = Instant::now();
    let r =
        repo.open_blob_by(&digest, Some(objects[0].0.stored_size), t + Duration::from_millis(500)).and_then(|mut b| {
            let mut v = Vec::new();
            b.read_to_end(&mut v)?;
            Ok(v)
        });
    let elapsed = t.elapsed();
    let err = format!("{:#}", r.expect_err("a blob from a stopped registry"));
    assert!(elapsed < Duration::from_secs(3), "the deadline was 0.5 s; it took {elapsed:?}: {err}");
    assert!(err.contains(&digest) && err.contains(&reg.addr()), "the error names the blob and registry: {err}");
    assert!(err.contains("deadline"), "the error says the deadline passed: {err}");
}
