//! The startup prefetch list (docs/daemon.md, "Prefetch"): recording which files a mount read first,
//! and fetching the files an image lists as soon as it is mounted.
//!
//! * Recording: the core keeps, per mount, the order in which objects were filled. [`accessed`] maps
//!   those digests to paths of the image (the first path naming each object, from the EROFS index) at
//!   request time, off the fill path.
//! * Ahead of the mount (fanotify): [`Prefetches::warm`] downloads the listed objects while the mount
//!   is set up, and the fetcher holds them for their first fill.
//! * Prefetch: [`Prefetches::start`] runs a few threads that each read one byte of the next listed
//!   file through the mounted EROFS lower. That raises the frontend's ordinary request (a pre-content
//!   event, or a cachefiles READ), so the ordinary verified fill does the work, whatever the
//!   frontend. They use at most [`PARALLEL`] of the fill workers, so on-demand reads always find free
//!   ones; umount stops them ([`Prefetches::stop`]).

use std::collections::HashMap;
use std::io::Read as _;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;

use anyhow::{Context, Result};
use erofs::tree::{Digest, FileData};

use super::core::Core;
use super::images::Image;
use crate::index;

/// Listed files read at once (each may wait on one download).
pub const PARALLEL: usize = 6;

/// Path -> object of every external regular file of an image, and object -> its first path.
type ObjectPaths = (HashMap<Vec<u8>, Digest>, HashMap<Digest, Vec<u8>>);

fn objects_of(img: &Image) -> Result<ObjectPaths> {
    let bytes = std::fs::read(img.erofs_path()).with_context(|| format!("reading {}", img.erofs_path().display()))?;
    let reader = erofs::reader::Image::open(&bytes[..]).context("opening the EROFS index")?;
    let tree = reader.read_tree().context("reading the EROFS index")?;
    let (mut by_path, mut by_digest) = (HashMap::new(), HashMap::new());
    for (path, data) in index::regular_files(&tree) {
        if let FileData::External { digest, .. } = data {
            by_digest.entry(*digest).or_insert_with(|| path.clone());
            by_path.insert(path, *digest);
        }
    }
    Ok((by_path, by_digest))
}

/// The files whose objects mount `key` (image `img`) had filled, in first-fill order, one absolute
/// path per line: the format of `wisp convert --prefetch`.
pub fn accessed(core: &Core, key: &str, img: &Image) -> Result<Vec<u8>> {
    let (_, by_digest) = objects_of(img)?;
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for d in core.fill_order(key) {
        if !seen.insert(d) {
            continue;
        }
        if let Some(p) = by_digest.get(&d) {
            out.extend_from_slice(p);
            out.push(b'\n');
        }
    }
    Ok(out)
}

/// The listed files of a mount whose object was not complete (first listing of each object), as (path in
/// the image, object). Resolving them reads the whole EROFS index, so it is done once per mount and
/// shared by the downloads ahead of the mount and the reads after it, whichever asks first.
type Listed = Arc<OnceLock<Result<Vec<(Vec<u8>, Digest)>, String>>>;

fn resolve<'a>(list: &'a Listed, core: &Core, img: &Image) -> Result<&'a [(Vec<u8>, Digest)]> {
    list.get_or_init(|| listed(core, img).map_err(|e| format!("{e:#}"))).as_deref().map_err(|e| anyhow::anyhow!("{e}"))
}

fn listed(core: &Core, img: &Image) -> Result<Vec<(Vec<u8>, Digest)>> {
    let (by_path, _) = objects_of(img)?;
    let mut seen = std::collections::HashSet::new();
    Ok(img
        .prefetch
        .iter()
        .filter_map(|p| by_path.get(p.as_slice()).map(|d| (p.clone(), *d)))
        .filter(|(_, d)| seen.insert(*d) && !core.cache().is_complete(d))
        .collect())
}

struct Running {
    cancel: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

/// The prefetches of the live mounts.
#[derive(Default)]
pub struct Prefetches {
    running: Mutex<HashMap<String, Running>>,
    /// Cancel flags of the downloads ahead of the mount ([`Prefetches::warm`]).
    warming: Mutex<HashMap<String, Arc<AtomicBool>>>,
    /// The resolved list of each mount.
    lists: Mutex<HashMap<String, Listed>>,
}

impl std::fmt::Debug for Prefetches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prefetches").finish_non_exhaustive()
    }
}

impl Prefetches {
    fn list(&self, key: &str) -> Listed {
        Arc::clone(self.lists.lock().unwrap_or_else(|p| p.into_inner()).entry(key.to_owned()).or_default())
    }

    /// Starts prefetching the list of `img`, mounted as `key` with its EROFS lower at `lower`. Returns
    /// at once; does nothing when the image has no list. `object_files`: the frontend's object files
    /// are the node cache (their completeness records say what a read filled).
    pub fn start(&self, key: &str, lower: &Path, img: &Arc<Image>, core: &Arc<Core>, object_files: bool) {
        if img.prefetch.is_empty() {
            return;
        }
        let cancel = Arc::new(AtomicBool::new(false));
        let (c, k, l, i, core, list) =
            (Arc::clone(&cancel), key.to_owned(), lower.to_owned(), Arc::clone(img), Arc::clone(core), self.list(key));
        let spawned = std::thread::Builder::new().name("wisp-prefetch".into()).spawn(move || {
            if let Err(e) = run(&core, &k, &l, &i, &list, &c, object_files) {
                tracing::warn!(mount = %k, error = %format!("{e:#}"), "prefetch failed");
            }
            core.prefetch_done(&k);
        });
        match spawned {
            Ok(thread) => {
                self.running
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key.to_owned(), Running { cancel, thread });
            }
            Err(e) => tracing::warn!(error = %e, "cannot start the prefetch thread"),
        }
    }

    /// Starts downloading the listed objects of `img` that the node cache lacks, [`PARALLEL`] at a time,
    /// before the image is mounted: the fetcher holds each verified object for its first fill
    /// ([`super::fetcher::Fetcher::warm`]), so the downloads overlap the mount's local set-up (object
    /// files, marks, the EROFS mount with one device per object). Only when the frontend's object files
    /// are the node cache (`object_files`, fanotify), which then says which objects are complete;
    /// returns at once. [`Prefetches::stop`] ends it.
    pub fn warm(&self, key: &str, core: &Arc<Core>, img: &Arc<Image>, object_files: bool) {
        if img.prefetch.is_empty() || !object_files {
            return;
        }
        let cancel = Arc::new(AtomicBool::new(false));
        self.warming.lock().unwrap_or_else(|p| p.into_inner()).insert(key.to_owned(), Arc::clone(&cancel));
        let (core, img, list) = (Arc::clone(core), Arc::clone(img), self.list(key));
        let spawned = std::thread::Builder::new().name("wisp-warm".into()).spawn(move || {
            let todo = match resolve(&list, &core, &img) {
                Ok(t) => t,
                Err(e) => return tracing::warn!(error = %format!("{e:#}"), "reading the prefetch list"),
            };
            let entries: HashMap<Digest, crate::object::ObjectEntry> =
                img.devices.iter().map(|e| (e.digest, *e)).collect();
            let todo: Vec<_> = todo.iter().filter_map(|(_, d)| entries.get(d).copied()).collect();
            let (next, done) = (AtomicUsize::new(0), AtomicUsize::new(0));
            let stores = [Arc::clone(&img.store)];
            let start = std::time::Instant::now();
            std::thread::scope(|s| {
                for _ in 0..PARALLEL.min(todo.len()) {
                    s.spawn(|| {
                        while let Some(e) = todo.get(next.fetch_add(1, Ordering::Relaxed)) {
                            if cancel.load(Ordering::Relaxed) {
                                break;
                            }
                            if core.warm(e, &stores) {
                                done.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    });
                }
            });
            tracing::info!(
                image = %img.spec.reference,
                listed = todo.len(),
                downloaded = done.load(Ordering::Relaxed),
                secs = start.elapsed().as_secs_f64(),
                "prefetch list downloaded ahead of the fills"
            );
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the prefetch downloads");
        }
    }

    /// Stops the prefetch of `key`: no further file is started, and the reads in flight (at most
    /// [`PARALLEL`], one object each) are waited for, so that the lower can be unmounted. The downloads
    /// ahead of the mount start no further object either (those in flight end on their own).
    pub fn stop(&self, key: &str) {
        if let Some(c) = self.warming.lock().unwrap_or_else(|p| p.into_inner()).remove(key) {
            c.store(true, Ordering::Relaxed);
        }
        self.lists.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
        let r = self.running.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
        if let Some(r) = r {
            r.cancel.store(true, Ordering::Relaxed);
            let _ = r.thread.join();
        }
    }
}

fn run(
    core: &Core,
    key: &str,
    lower: &Path,
    img: &Image,
    list: &Listed,
    cancel: &AtomicBool,
    object_files: bool,
) -> Result<()> {
    let todo: Vec<(PathBuf, Digest)> = resolve(list, core, img)?
        .iter()
        .map(|(p, d)| (lower.join(std::ffi::OsStr::from_bytes(p.strip_prefix(b"/").unwrap_or(p))), *d))
        .collect();
    core.prefetch_listed(key, todo.len() as u64);
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..PARALLEL.min(todo.len()) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((path, digest)) = todo.get(i) else { break };
                if cancel.load(Ordering::Relaxed) {
                    break;
                }
                // One byte raises the pre-content event; the fill writes the whole object.
                let r = std::fs::File::open(path).and_then(|mut f| f.read(&mut [0u8; 1]));
                match r {
                    // cachefiles keeps no completeness record of ours: a read that succeeded was filled.
                    Ok(_) if !object_files || core.cache().is_complete(digest) => core.count_prefetched(key),
                    Ok(_) => {}
                    Err(e) => tracing::debug!(path = %path.display(), error = %e, "prefetch read"),
                }
            });
        }
    });
    Ok(())
}
