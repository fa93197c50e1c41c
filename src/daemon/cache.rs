//! The node object cache of the fanotify frontend (super::frontend::fanotify): one sparse file per
//! object, `CACHE/objects/<2 hex>/<64 hex>`, named by the sha256 of its content and shared by every
//! image on the node. (Under cachefiles the kernel's own cache files, `CACHE/cachefiles`, hold the
//! objects; of this directory only `tmp/` is used, to spool large downloads.)
//!
//! A file is created with its final size padded to 4 KiB (the kernel reads EROFS devices in whole
//! blocks, docs/kernel.md G.9) when an image that needs it is mounted, and filled on first access. The
//! completeness record is an xattr, `user.wisp.complete` = the content digest in hex, set only after
//! the whole verified content has been written and fsynced. A file without it (never filled, or
//! partially filled when a daemon died) is treated as empty: marked again and refilled whole. The
//! kernel never reads a byte of an incomplete file without the daemon's permission (the pre-content
//! mark), so partial files are harmless.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use anyhow::{Context, Result};
use erofs::tree::Digest;

use crate::object::atomic::{self, Place};
use crate::object::padded_len;

/// The xattr that marks a complete, verified object file.
pub const COMPLETE_XATTR: &str = "user.wisp.complete";

/// The cache directory.
#[derive(Debug, Clone)]
pub struct NodeCache {
    root: PathBuf,
    records: Arc<Records>,
}

/// Objects written and verified whose completeness record is not durable yet.
#[derive(Default)]
struct Records {
    state: Mutex<Pending>,
    /// Signals new work to the recording thread, and a finished batch to [`NodeCache::flush`].
    cv: Condvar,
}

#[derive(Default)]
struct Pending {
    /// Complete in memory, not yet recorded (queued or in the batch being recorded).
    objects: HashSet<Digest>,
    queue: Vec<Digest>,
    thread: bool,
}

impl std::fmt::Debug for Records {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Records").finish_non_exhaustive()
    }
}

impl Records {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl NodeCache {
    /// Opens (creating) the cache at `root`.
    pub fn open(root: &Path) -> Result<Self> {
        crate::private_dir::ensure(root)?;
        for d in ["objects", "tmp"] {
            fs::create_dir_all(root.join(d)).with_context(|| format!("creating {}", root.join(d).display()))?;
        }
        Ok(NodeCache { root: root.to_owned(), records: Arc::default() })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where spooled downloads of large objects go.
    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// The object file of `digest`.
    pub fn path(&self, digest: &Digest) -> PathBuf {
        crate::object::path_in(&self.root.join("objects"), digest)
    }

    /// Makes sure the object file exists with the padded size of `size` content bytes. Returns whether
    /// it is complete. An existing file of the wrong size is not trusted: it is recreated empty.
    pub fn prepare(&self, digest: &Digest, size: u64) -> Result<bool> {
        let path = self.path(digest);
        let want = padded_len(size);
        match fs::metadata(&path) {
            Ok(m) if m.len() == want => return Ok(self.is_complete(digest)),
            Ok(_) => {
                tracing::warn!(path = %path.display(), "object file of the wrong size; recreating it");
                match fs::remove_file(&path) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => {
                        return Err(e).with_context(|| format!("removing {}", path.display()))
                    }
                    _ => {}
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("stat {}", path.display())),
        }
        let dir = path.parent().expect("object path has a parent");
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        // Create under a unique temporary name (mode 0600) and link it into place without replacing
        // anything, so a file at the final name always has its size, and an object file another
        // request placed meanwhile (and the frontend may have marked already) is never swapped for a
        // new inode. Two requests of one process used to share one temporary name and break each
        // other's rename (issue 20: 30 of 32 concurrent mounts failed).
        let ((), placed) = atomic::create(&path, Place::NoClobber, |tmp| {
            let f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(tmp)
                .with_context(|| format!("creating a temporary object file in {}", dir.display()))?;
            f.set_len(want).with_context(|| format!("sizing {}", tmp.display()))
        })
        .with_context(|| format!("placing {}", path.display()))?;
        if placed {
            Ok(false)
        } else {
            // Placed by a concurrent request: it was sized before it got its name.
            Ok(self.is_complete(digest))
        }
    }

    /// Whether the object is complete: its file carries the completeness record for its digest, or it
    /// was filled and its record is being written ([`NodeCache::complete_later`]).
    pub fn is_complete(&self, digest: &Digest) -> bool {
        if self.records.lock().objects.contains(digest) {
            return true;
        }
        let Ok(f) = File::open(self.path(digest)) else { return false };
        let mut buf = [0u8; 64];
        match rustix::fs::fgetxattr(&f, COMPLETE_XATTR, &mut buf) {
            Ok(64) => buf == hex::encode(digest).as_bytes(),
            _ => false,
        }
    }

    /// Records, in the background, that the object file holds its whole verified content (written,
    /// not necessarily on disk yet). It counts as complete from now on; the record itself is made
    /// durable by the recording thread: fsync of the file, then the xattr, then a sync of the file
    /// system once per batch. So a record never reaches the disk before the data it vouches for.
    pub fn complete_later(&self, digest: &Digest) {
        let mut p = self.records.lock();
        if !p.objects.insert(*digest) {
            return;
        }
        p.queue.push(*digest);
        if !p.thread {
            let me = self.clone();
            match std::thread::Builder::new().name("wisp-records".into()).spawn(move || me.record_loop()) {
                Ok(_) => p.thread = true,
                Err(e) => tracing::error!(error = %e, "cannot start the thread that records complete objects"),
            }
        }
        self.records.cv.notify_all();
    }

    /// Waits until every object passed to [`NodeCache::complete_later`] is recorded durably (or its
    /// recording failed, which the log says).
    pub fn flush(&self) {
        let mut p = self.records.lock();
        while p.thread && !p.objects.is_empty() {
            p = self.records.cv.wait(p).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn record_loop(&self) {
        loop {
            let batch = {
                let mut p = self.records.lock();
                while p.queue.is_empty() {
                    p = self.records.cv.wait(p).unwrap_or_else(|e| e.into_inner());
                }
                std::mem::take(&mut p.queue)
            };
            for d in &batch {
                if let Err(e) = self.record(d) {
                    tracing::error!(object = %hex::encode(d), error = %e, "recording a complete object (it will be fetched again)");
                }
            }
            match File::open(&self.root) {
                Ok(dir) => {
                    if let Err(e) = rustix::fs::syncfs(&dir) {
                        tracing::error!(error = %e, "syncing the node cache's file system");
                    }
                }
                Err(e) => tracing::error!(error = %e, "opening the node cache"),
            }
            let mut p = self.records.lock();
            for d in &batch {
                p.objects.remove(d);
            }
            self.records.cv.notify_all();
        }
    }

    /// Writes the completeness record of one object: fsync of its data, then the xattr. Opening
    /// read-only and fsync raise no pre-content events.
    fn record(&self, digest: &Digest) -> io::Result<()> {
        let f = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOATIME)
            .open(self.path(digest))
            .or_else(|_| File::open(self.path(digest)))?;
        f.sync_all()?;
        rustix::fs::fsetxattr(&f, COMPLETE_XATTR, hex::encode(digest).as_bytes(), rustix::fs::XattrFlags::empty())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepare_then_complete() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let c = NodeCache::open(dir.path()).unwrap();
        let d = [7u8; 32];
        assert!(!c.prepare(&d, 5000).unwrap());
        assert_eq!(fs::metadata(c.path(&d)).unwrap().len(), 8192);
        assert!(!c.is_complete(&d));
        c.complete_later(&d);
        assert!(c.is_complete(&d), "complete in memory at once");
        c.flush();
        assert!(c.records.lock().objects.is_empty());
        // recorded on the file: a fresh view of the same directory (a restarted worker) sees it
        let again = NodeCache::open(dir.path()).unwrap();
        assert!(again.is_complete(&d));
        assert!(c.prepare(&d, 5000).unwrap());
        // a wrong size is not trusted
        assert!(!c.prepare(&d, 9000).unwrap());
        assert!(!c.is_complete(&d));
    }
}
