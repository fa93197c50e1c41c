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
use fscache::fanotify::{Frontend, Group};

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
