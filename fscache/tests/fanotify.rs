//! The fanotify pre-content frontend against the host kernel (6.14+, root, ext4 under /var/tmp).
//! A test that cannot run prints why and passes, unless WISP_REQUIRE_ALL=1, where it fails.
#![allow(clippy::cast_possible_truncation)]

use std::collections::HashMap;
use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fscache::backend::{Backend, Errno, FillSink, ObjectKey, Opened};
use fscache::fanotify::journal::{self, Journal, Reservation};
use fscache::fanotify::{Frontend, Group};

/// The tests of this file take fd numbers on purpose: run them one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

struct Objects {
    data: HashMap<String, Vec<u8>>,
    fills: AtomicU64,
}

impl Backend for Objects {
    type Object = String;

    fn open(&self, key: &ObjectKey<'_>) -> Result<Opened<String>, Errno> {
        assert_eq!(key.domain, "test");
        if key.name == "failing" {
            return Ok(Opened { object: key.name.into(), size: 10_000 });
        }
        let data = self.data.get(key.name).ok_or(Errno::ENOENT)?;
        Ok(Opened { object: key.name.into(), size: data.len() as u64 })
    }

    fn fill(&self, object: &String, range: Range<u64>, sink: &mut dyn FillSink) -> Result<(), Errno> {
        self.fills.fetch_add(1, Ordering::SeqCst);
        if object == "failing" {
            return Err(Errno::EIO);
        }
        std::thread::sleep(Duration::from_millis(50)); // let concurrent readers pile up
        let data = &self.data[object];
        // in 1 MiB pieces, last piece first
        let pieces: Vec<_> = (range.start..range.end).step_by(1 << 20).collect();
        for &start in pieces.iter().rev() {
            let end = (start + (1 << 20)).min(range.end);
            sink.write_at(start, &data[start as usize..end as usize])?;
        }
        Ok(())
    }
}

/// Ok(()) if the kernel and privileges allow the test, else the reason.
fn can_run(dir: &Path) -> Result<Group, String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("needs root (CAP_SYS_ADMIN) for fanotify pre-content".into());
    }
    let group = Group::new().map_err(|e| e.to_string())?;
    group.probe(dir).map_err(|e| e.to_string())?;
    Ok(group)
}

fn skip_or_fail(why: &str) {
    if std::env::var("WISP_REQUIRE_ALL").as_deref() == Ok("1") {
        panic!("cannot run (WISP_REQUIRE_ALL=1): {why}");
    }
    eprintln!("SKIPPED: {why}");
}

fn sparse(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(size).unwrap();
    p
}

fn read_all(p: &Path) -> std::io::Result<Vec<u8>> {
    let mut v = Vec::new();
    std::fs::File::open(p)?.read_to_end(&mut v)?;
    Ok(v)
}

#[test]
fn fanotify_lazy_fill_end_to_end() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    std::fs::create_dir_all("/var/tmp").unwrap();
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let group = match can_run(dir.path()) {
        Ok(g) => g,
        Err(why) => return skip_or_fail(&why),
    };

    let big: Vec<u8> = (0..(3u64 << 20) + 123).map(|i| (i * 7 % 253) as u8).collect();
    let small = b"hello, lazy world\n".repeat(100);
    let data = HashMap::from([("big".to_owned(), big.clone()), ("small".to_owned(), small.clone())]);
    let backend = Arc::new(Objects { data, fills: AtomicU64::new(0) });
    let frontend = Arc::new(Frontend::new(group, backend.clone(), "test", 4).unwrap());

    let big_path = sparse(dir.path(), "big", big.len() as u64);
    let small_path = sparse(dir.path(), "small", small.len() as u64);
    let failing_path = sparse(dir.path(), "failing", 10_000);
    frontend.add(&big_path, "big").unwrap();
    frontend.add(&small_path, "small").unwrap();
    frontend.add(&failing_path, "failing").unwrap();

    let stopper = frontend.stopper();
    let runner = {
        let f = Arc::clone(&frontend);
        std::thread::spawn(move || f.run())
    };

    // Three concurrent readers of the big object: one fill, every reader sees the exact bytes.
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let p = big_path.clone();
            std::thread::spawn(move || read_all(&p))
        })
        .collect();
    for r in readers {
        assert!(r.join().unwrap().unwrap() == big, "reader saw wrong bytes");
    }
    assert_eq!(read_all(&small_path).unwrap(), small);
    assert_eq!(backend.fills.load(Ordering::SeqCst), 2, "one fill per object");

    // A failing backend: the reader gets an error, not zeros; and a retry asks the backend again.
    let err = read_all(&failing_path).expect_err("read of a failed object must fail");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(read_all(&failing_path).is_err());
    assert_eq!(backend.fills.load(Ordering::SeqCst), 4);

    // After fill + unmark, reads raise no event.
    let before = frontend.stats();
    assert_eq!(read_all(&big_path).unwrap(), big);
    assert_eq!(read_all(&small_path).unwrap(), small);
    assert_eq!(frontend.stats().events, before.events, "a filled object still raised events");
    assert!(before.events >= 4, "expected pre-content events, got {before:?}");
    assert_eq!(before.fills, 2);
    assert_eq!(before.failures, 2);

    stopper.stop();
    runner.join().unwrap().unwrap();
}

/// Objects whose fill of "slow" waits until the test opens the gate.
struct Gated {
    data: HashMap<String, Vec<u8>>,
    open: std::sync::Mutex<bool>,
    cv: std::sync::Condvar,
}

impl Backend for Gated {
    type Object = String;

    fn open(&self, key: &ObjectKey<'_>) -> Result<Opened<String>, Errno> {
        let data = self.data.get(key.name).ok_or(Errno::ENOENT)?;
        Ok(Opened { object: key.name.into(), size: data.len() as u64 })
    }

    fn fill(&self, object: &String, range: Range<u64>, sink: &mut dyn FillSink) -> Result<(), Errno> {
        if object == "slow" {
            let mut open = self.open.lock().unwrap();
            while !*open {
                open = self.cv.wait(open).unwrap();
            }
        }
        sink.write_at(range.start, &self.data[object][range.start as usize..range.end as usize])
    }
}

/// Waits (up to 10 s) for one pre-content event on `group` and returns its fd.
fn next_event(group: &Group) -> std::os::fd::OwnedFd {
    for _ in 0..1000 {
        if let Some(e) = group.read_events().unwrap().into_iter().next() {
            return e.fd.expect("event with an fd");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("no fanotify event within 10 s");
}

/// Regression test for the recovery race: a dead worker's pending event whose fd number is taken, at
/// recovery, by one of the new worker's own fds. Without the lift + reservation, that fd is closed
/// later, a new event is read into the freed number, and its answer (FAN_ALLOW after its own fill)
/// is applied to the old event: the old reader is let in before its object is filled and reads zeros.
#[test]
fn recovery_holds_a_pending_event_number_taken_by_an_own_fd() {
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::os::unix::fs::MetadataExt;
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    std::fs::create_dir_all("/var/tmp").unwrap();
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let group = match can_run(dir.path()) {
        Ok(g) => g,
        Err(why) => return skip_or_fail(&why),
    };
    let slow: Vec<u8> = (0..200_000u32).map(|i| (i % 251 + 1) as u8).collect(); // no zero byte
    let quick = b"quick object\n".repeat(1000);
    let slow_path = sparse(dir.path(), "slow", 200_704);
    let quick_path = sparse(dir.path(), "quick", 16_384);
    let journal_path = dir.path().join("inflight");

    // The dead worker: reads the event of a reader of "slow", records it, dies without answering.
    let (j1, _) = Journal::open(&journal_path).unwrap();
    group.mark(&slow_path).unwrap();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let old_reader = {
        let p = slow_path.clone();
        std::thread::spawn(move || {
            let r = read_all(&p);
            done_tx.send(()).unwrap();
            r
        })
    };
    let ev = next_event(&group);
    let orphan = ev.as_raw_fd();
    let meta = std::fs::metadata(&slow_path).unwrap();
    j1.begin(orphan, meta.dev(), meta.ino()).unwrap();
    drop(j1);
    drop(ev); // the event stays pending on the group, under number `orphan`

    // The new worker's own fd lands on that number (the collision).
    let mut fillers = Vec::new(); // lower free numbers first
    let own = loop {
        let f = OwnedFd::from(std::fs::File::open("/dev/zero").unwrap());
        if f.as_raw_fd() >= orphan {
            break f;
        }
        fillers.push(f);
    };
    drop(fillers);
    assert_eq!(own.as_raw_fd(), orphan, "could not force the collision");

    // Its start-up, as in the daemon's worker: open the journal, lift, reserve, then recover.
    let (mut j2, left) = Journal::open(&journal_path).unwrap();
    let top = left.ceiling().expect("the orphan is recorded");
    assert_eq!(top, orphan);
    let own = journal::lift(own, top).unwrap();
    assert!(own.as_raw_fd() > top);
    let group = Group::from_owned_fd(journal::lift(group.into_owned_fd(), top).unwrap());
    j2.lift(top).unwrap();
    let reserved = Reservation::claim(Some(top)).unwrap();
    // (the old reader's own fd is a stray here: in the daemon it lives in another process)
    assert!(!reserved.strays().contains(&orphan));
    let held = std::fs::read_link(format!("/proc/self/fd/{orphan}")).unwrap();
    assert_eq!(held, Path::new("/dev/null"), "the pending event's number is not held");

    let data = HashMap::from([("slow".to_owned(), slow.clone()), ("quick".to_owned(), quick.clone())]);
    let backend = Arc::new(Gated { data, open: std::sync::Mutex::new(false), cv: std::sync::Condvar::new() });
    let frontend = Arc::new(Frontend::new(group, backend.clone(), "test", 2).unwrap());
    frontend.set_journal(j2);
    frontend.add(&slow_path, "slow").unwrap();
    frontend.add(&quick_path, "quick").unwrap();
    let rec = frontend.recover(&left);
    assert_eq!(rec.resumed, 1, "{rec:?}");
    let stopper = frontend.stopper();
    let runner = {
        let f = Arc::clone(&frontend);
        std::thread::spawn(move || f.run())
    };

    // The own fd is closed while the old event still waits for "slow" (gated); a new event follows.
    // (Broken, that new event is read into the old number: its answer lets the old reader in, and
    // its own reader waits until the old event's answer, after the gate, lands on it.)
    // The new reader opens its file first: in the daemon, readers are other processes, whose opens
    // take no number here.
    let (quick_tx, quick_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let new_reader = {
        let mut f = std::fs::File::open(&quick_path).unwrap();
        std::thread::spawn(move || {
            go_rx.recv().unwrap();
            let mut v = Vec::new();
            quick_tx.send(f.read_to_end(&mut v).map(|_| v)).unwrap();
        })
    };
    // Wait until the recovery read of "slow" has opened its file and its event is being filled, so
    // that nothing but the new event can take the number freed below.
    for _ in 0..1000 {
        if frontend.stats().events >= 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(frontend.stats().events, 1);
    drop(own);
    go_tx.send(()).unwrap();
    let quick_got = quick_rx.recv_timeout(Duration::from_secs(10));
    let old_done_early = done_rx.try_recv().is_ok();
    *backend.open.lock().unwrap() = true;
    backend.cv.notify_all();
    let got = old_reader.join().unwrap().expect("old reader");
    assert!(got[..slow.len()] == slow[..], "the old reader saw wrong bytes (zeros)");
    assert!(!old_done_early, "the old reader was let in before its object was filled");
    let quick_got = quick_got.expect("the new reader was not answered").unwrap();
    assert!(quick_got[..quick.len()] == quick[..], "the new reader saw wrong bytes");
    new_reader.join().unwrap();
    // answered and cleared: a later worker finds nothing left
    drop(reserved);
    stopper.stop();
    runner.join().unwrap().unwrap();
    drop(frontend);
    let (_j3, left) = Journal::open(&journal_path).unwrap();
    assert_eq!(left.orphans, vec![], "answered events are still recorded");
}
