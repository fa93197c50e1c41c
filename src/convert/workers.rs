//! Fingerprinting workers: the layer-reading thread streams each file's bytes, in bounded chunks, to
//! whichever worker is free; the worker hashes them (sha256), keeps small files in memory and
//! compresses larger ones as they arrive into a staging file, and once the digest is known turns
//! each distinct new object into its stored form (zstd where it pays). Every byte of content is read
//! from the layer exactly once, and a large file's raw bytes are never written to disk.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use anyhow::{bail, Context, Result};
use erofs::tree::Digest;
use sha2::{Digest as _, Sha256};

use crate::object::ObjectEntry;
use crate::store::compress::{finish_object, CompressOptions, ZstdSpill};
use crate::store::ObjectStore;

/// Files the reader may queue ahead of the workers (each holds at most SPILL bytes, or a few
/// chunks, in memory), so that it rarely waits for a worker to pick one up.
const JOB_QUEUE: usize = 8;
/// Size of the chunks the reader sends.
pub const CHUNK: usize = 256 << 10;
/// Files up to this size are fingerprinted in memory; larger ones spill to a staging file.
pub const SPILL: usize = 4 << 20;

/// What became of one distinct object.
#[derive(Debug, Clone)]
pub struct Staged {
    pub entry: ObjectEntry,
    /// The stored form waiting in the staging directory, or `None` when the store already had it.
    pub path: Option<PathBuf>,
}

struct Shared {
    staging: PathBuf,
    store: Arc<dyn ObjectStore>,
    opts: CompressOptions,
    objects: Mutex<HashMap<Digest, Option<Staged>>>,
}

struct FileJob {
    id: usize,
    size: u64,
    what: String,
    chunks: Receiver<Vec<u8>>,
}

/// A finished file: its content digest, or why it failed.
#[derive(Debug)]
pub struct JobResult {
    pub id: usize,
    pub result: Result<Digest>,
}

pub struct Pool {
    jobs: Option<SyncSender<FileJob>>,
    results: Receiver<JobResult>,
    /// For files the reading thread fingerprints itself ([`Pool::submit_bytes`]).
    res_tx: mpsc::Sender<JobResult>,
    own_zctx: Option<zstd::bulk::Compressor<'static>>,
    own_dir: io::Result<PathBuf>,
    threads: Vec<JoinHandle<()>>,
    shared: Arc<Shared>,
    next: usize,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pool({} threads)", self.threads.len())
    }
}

impl Pool {
    pub fn new(workers: usize, staging: &Path, store: Arc<dyn ObjectStore>, opts: CompressOptions) -> Self {
        let (jobs_tx, jobs_rx) = mpsc::sync_channel::<FileJob>(JOB_QUEUE);
        let jobs_rx = Arc::new(Mutex::new(jobs_rx));
        let (res_tx, results) = mpsc::channel();
        let shared =
            Arc::new(Shared { staging: staging.to_path_buf(), store, opts, objects: Mutex::new(HashMap::new()) });
        let threads = (0..workers.max(1))
            .map(|i| {
                let jobs_rx = Arc::clone(&jobs_rx);
                let res_tx = res_tx.clone();
                let shared = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("wisp-hash-{i}"))
                    .spawn(move || {
                        // One compression context per worker, reused for every in-memory object
                        // (setting up a context costs more than compressing a small file).
                        let mut zctx = zstd::bulk::Compressor::new(shared.opts.level).ok();
                        // A staging directory per worker: file creation in one directory serializes
                        // on its lock.
                        let dir = shared.staging.join(format!("w{i}"));
                        let dir_ok = std::fs::create_dir_all(&dir);
                        loop {
                            let job = match jobs_rx.lock().expect("job queue lock").recv() {
                                Ok(j) => j,
                                Err(_) => return,
                            };
                            let id = job.id;
                            let result = match &dir_ok {
                                Ok(()) => run_job(&shared, &dir, job, zctx.as_mut()),
                                Err(e) => Err(anyhow::anyhow!("creating {}: {e}", dir.display())),
                            };
                            if res_tx.send(JobResult { id, result }).is_err() {
                                return;
                            }
                        }
                    })
                    .expect("spawning a worker thread")
            })
            .collect();
        let own_dir = staging.join("reader");
        let own_dir = std::fs::create_dir_all(&own_dir).map(|()| own_dir);
        let own_zctx = zstd::bulk::Compressor::new(shared.opts.level).ok();
        Pool { jobs: Some(jobs_tx), results, res_tx, own_zctx, own_dir, threads, shared, next: 0 }
    }

    /// Starts a file of `size` bytes; send its bytes through the returned sender, then drop it.
    pub fn submit(&mut self, size: u64, what: String) -> (usize, SyncSender<Vec<u8>>) {
        let id = self.next;
        self.next += 1;
        let (tx, rx) = mpsc::sync_channel(4);
        let job = FileJob { id, size, what, chunks: rx };
        // Workers only exit when the queue closes, so this send succeeds.
        self.jobs.as_ref().expect("pool is open").send(job).expect("workers are running");
        (id, tx)
    }

    /// Starts a file whose `size` bytes (at most [`SPILL`]) are already read into `buf`. When every
    /// worker is busy and the queue is full, the calling (reading) thread fingerprints and stages it
    /// itself instead of waiting: on two cores, a reader that blocks leaves a core to two workers
    /// while the reader, the conversion's critical path, sits idle.
    pub fn submit_bytes(&mut self, size: u64, what: String, buf: Vec<u8>) -> usize {
        debug_assert!(buf.len() as u64 == size && buf.len() <= SPILL);
        let id = self.next;
        self.next += 1;
        let (tx, rx) = mpsc::sync_channel(1);
        tx.send(buf).expect("the receiver is alive");
        drop(tx);
        let job = FileJob { id, size, what, chunks: rx };
        let job = match self.jobs.as_ref().expect("pool is open").try_send(job) {
            Ok(()) => return id,
            Err(mpsc::TrySendError::Full(j) | mpsc::TrySendError::Disconnected(j)) => j,
        };
        let result = match &self.own_dir {
            Ok(dir) => run_job(&self.shared, dir, job, self.own_zctx.as_mut()),
            Err(e) => Err(anyhow::anyhow!("creating a staging directory: {e}")),
        };
        let _ = self.res_tx.send(JobResult { id, result });
        id
    }

    /// Results that are ready now.
    pub fn try_results(&self) -> Vec<JobResult> {
        self.results.try_iter().collect()
    }

    /// Closes the queue, waits for every worker and returns the remaining results and the objects.
    pub fn finish(mut self) -> (Vec<JobResult>, HashMap<Digest, Staged>) {
        drop(self.jobs.take());
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let results = self.results.try_iter().collect();
        let objects = std::mem::take(&mut *self.shared.objects.lock().expect("objects lock"));
        (results, objects.into_iter().filter_map(|(d, s)| s.map(|s| (d, s))).collect())
    }
}

enum Body {
    Memory(Vec<u8>),
    /// Raw bytes in a staging file (objects are not compressed).
    File(PathBuf, File),
    /// Compressed as they arrive (see [`ZstdSpill`]).
    Zstd(Box<ZstdSpill>),
}

fn run_job(
    shared: &Shared,
    dir: &Path,
    job: FileJob,
    zctx: Option<&mut zstd::bulk::Compressor<'static>>,
) -> Result<Digest> {
    let mut hasher = Sha256::new();
    let mut body = Body::Memory(Vec::new());
    let mut count = 0u64;
    let spill_path = dir.join(format!("spill-{}", job.id));
    let result = (|| -> Result<Digest> {
        for chunk in job.chunks.iter() {
            hasher.update(&chunk);
            count += chunk.len() as u64;
            match &mut body {
                Body::Memory(buf) if buf.is_empty() && chunk.len() <= SPILL => *buf = chunk,
                Body::Memory(buf) if buf.len() + chunk.len() <= SPILL => buf.extend_from_slice(&chunk),
                Body::Memory(buf) if shared.opts.max_ratio > 0.0 => {
                    let mut z = ZstdSpill::create(&spill_path, job.size, &shared.opts)?;
                    z.write_all(buf)?;
                    z.write_all(&chunk)?;
                    body = Body::Zstd(Box::new(z));
                }
                Body::Memory(buf) => {
                    let mut f =
                        File::create(&spill_path).with_context(|| format!("creating {}", spill_path.display()))?;
                    f.write_all(buf)?;
                    f.write_all(&chunk)?;
                    body = Body::File(spill_path.clone(), f);
                }
                Body::File(_, f) => f.write_all(&chunk).context("writing a staging file")?,
                Body::Zstd(z) => z.write_all(&chunk)?,
            }
        }
        if count != job.size {
            bail!("{}: content ended after {count} of {} bytes", job.what, job.size);
        }
        let digest: Digest = hasher.finalize().into();
        {
            let mut objects = shared.objects.lock().expect("objects lock");
            if objects.contains_key(&digest) {
                return Ok(digest); // another file has (or is producing) this object
            }
            objects.insert(digest, None);
        }
        let staged =
            stage(shared, dir, &digest, count, body, zctx).with_context(|| format!("{}: storing its object", job.what));
        let mut objects = shared.objects.lock().expect("objects lock");
        match staged {
            Ok(s) => {
                objects.insert(digest, Some(s));
                Ok(digest)
            }
            Err(e) => {
                objects.remove(&digest);
                Err(e)
            }
        }
    })();
    let _ = fs::remove_file(&spill_path);
    result
}

/// Produces the stored form of a new object, unless the store already has it.
fn stage(
    shared: &Shared,
    dir: &Path,
    digest: &Digest,
    size: u64,
    body: Body,
    zctx: Option<&mut zstd::bulk::Compressor<'static>>,
) -> Result<Staged> {
    if let Some(entry) = shared.store.lookup(digest, size)? {
        return Ok(Staged { entry, path: None });
    }
    let raw = dir.join(hex::encode(digest));
    if let (Body::Memory(buf), Some(z)) = (&body, zctx) {
        let (entry, path) = crate::store::compress::stage_bytes(buf, digest, &raw, &shared.opts, z)?;
        return Ok(Staged { entry, path: Some(path) });
    }
    match body {
        Body::Zstd(z) => {
            let (entry, path) = z.finish(digest, size, &raw, &shared.opts)?;
            return Ok(Staged { entry, path: Some(path) });
        }
        Body::Memory(buf) => {
            let mut f = File::create(&raw).with_context(|| format!("creating {}", raw.display()))?;
            f.write_all(&buf)?;
        }
        Body::File(path, f) => {
            drop(f);
            fs::rename(&path, &raw).with_context(|| format!("renaming {}", path.display()))?;
        }
    }
    let (entry, path) = finish_object(&raw, digest, size, &shared.opts)?;
    Ok(Staged { entry, path: Some(path) })
}

/// Sends `size` bytes of `r` in chunks; a closed channel (the worker failed) stops early without error
/// (the worker reports why). For files above [`SPILL`]; smaller ones go whole ([`Pool::submit_bytes`]).
pub fn stream_to(r: &mut impl io::Read, size: u64, tx: SyncSender<Vec<u8>>) -> io::Result<()> {
    let mut left = size;
    while left > 0 {
        let n = usize::try_from(left.min(CHUNK as u64)).expect("at most CHUNK");
        let mut buf = vec![0u8; n];
        r.read_exact(&mut buf)?;
        left -= n as u64;
        if tx.send(buf).is_err() {
            // drain what is left so the tar stream stays in step
            io::copy(&mut Read::take(&mut *r, left), &mut io::sink())?;
            return Ok(());
        }
    }
    Ok(())
}
