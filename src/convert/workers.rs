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

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use sha2::Digest as _;

    use super::*;
    use crate::object::Compression;
    use crate::store::dir::DirStore;

    fn sha(b: &[u8]) -> Digest {
        Sha256::digest(b).into()
    }

    /// Bytes zstd cannot shrink.
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()[0]
            })
            .collect()
    }

    /// Bytes zstd shrinks well.
    fn text(len: usize) -> Vec<u8> {
        (0u32..).flat_map(|i| format!("line {}\n", i % 977).into_bytes()).take(len).collect()
    }

    fn pool(dir: &Path, workers: usize) -> Pool {
        let store = DirStore::open(&dir.join("store"), true).unwrap();
        std::fs::create_dir_all(dir.join("staging")).unwrap();
        Pool::new(workers, &dir.join("staging"), Arc::new(store), CompressOptions::default())
    }

    /// Sends one file the way the layer pass does: whole when it fits in memory, else streamed.
    fn send(pool: &mut Pool, content: &[u8]) -> usize {
        if content.len() <= SPILL {
            pool.submit_bytes(content.len() as u64, "test".into(), content.to_vec())
        } else {
            let (id, tx) = pool.submit(content.len() as u64, "test".into());
            stream_to(&mut Cursor::new(content), content.len() as u64, tx).unwrap();
            id
        }
    }

    #[test]
    fn every_file_gets_its_sha256_and_each_distinct_content_one_stored_form() {
        let dir = tempfile::tempdir().unwrap();
        let mut pool = pool(dir.path(), 2);
        let small_text = text(100_000);
        let small_noise = noise(64 << 10, 1);
        let big_text = text(SPILL + 3 * CHUNK + 17);
        let big_noise = noise(SPILL + CHUNK, 2);
        let files = [&small_text, &small_noise, &small_text, &big_text, &big_noise, &big_text];
        let ids: Vec<usize> = files.iter().map(|f| send(&mut pool, f)).collect();
        let (results, staged) = pool.finish();

        let digests: HashMap<usize, Digest> = results.into_iter().map(|r| (r.id, r.result.unwrap())).collect();
        assert_eq!(digests.len(), files.len(), "one result per file");
        for (id, f) in ids.iter().zip(files) {
            assert_eq!(digests[id], sha(f), "file {id}: its sha256");
        }

        assert_eq!(staged.len(), 4, "identical contents are staged once");
        for (content, compressed) in
            [(&small_text, true), (&small_noise, false), (&big_text, true), (&big_noise, false)]
        {
            let s = &staged[&sha(content)];
            let path = s.path.as_ref().expect("a new object is staged");
            let stored = std::fs::read(path).unwrap();
            assert_eq!(s.entry.digest, sha(content));
            assert_eq!(s.entry.size, content.len() as u64);
            assert_eq!(s.entry.stored_size, stored.len() as u64);
            assert_eq!(s.entry.blob, sha(&stored), "the blob digest names the stored bytes");
            if compressed {
                assert_eq!(s.entry.compression, Compression::Zstd);
                assert!(stored.len() < content.len() / 2);
                assert_eq!(&zstd::stream::decode_all(stored.as_slice()).unwrap(), content);
            } else {
                assert_eq!(s.entry.compression, Compression::None);
                assert_eq!(&stored, content);
            }
        }
    }

    #[test]
    fn an_object_the_store_holds_is_not_staged_and_a_short_file_fails() {
        let dir = tempfile::tempdir().unwrap();
        let mut pool = pool(dir.path(), 1);
        // Put an uncompressed object into the store by hand, where docs/convert.md says it lives.
        let held = text(50_000);
        let hex = hex::encode(sha(&held));
        let obj_dir = dir.path().join("store/objects").join(&hex[..2]);
        std::fs::create_dir_all(&obj_dir).unwrap();
        std::fs::write(obj_dir.join(&hex), &held).unwrap();

        let held_id = send(&mut pool, &held);
        let (short_id, tx) = pool.submit(SPILL as u64 * 2, "entry short".into());
        tx.send(vec![7u8; CHUNK]).unwrap();
        drop(tx);
        let (results, staged) = pool.finish();

        let mut by_id: HashMap<usize, Result<Digest>> = results.into_iter().map(|r| (r.id, r.result)).collect();
        assert_eq!(by_id.remove(&held_id).unwrap().unwrap(), sha(&held));
        let err = format!("{:#}", by_id.remove(&short_id).unwrap().unwrap_err());
        assert!(err.contains("entry short: content ended after 262144 of 8388608 bytes"), "{err}");
        let s = &staged[&sha(&held)];
        assert!(s.path.is_none(), "nothing staged for an object the store holds");
        assert_eq!(s.entry.compression, Compression::None);
        assert_eq!(s.entry.size, held.len() as u64);
        assert_eq!(staged.len(), 1, "a failed file leaves no object");
        let left: Vec<_> = walk(&dir.path().join("staging"));
        assert!(left.is_empty(), "no spill file is left behind: {left:?}");
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
        out
    }

    #[test]
    fn stream_to_a_failed_worker_still_consumes_the_file() {
        let (tx, rx) = mpsc::sync_channel(4);
        drop(rx);
        let mut data = vec![1u8; 3 * CHUNK + 5];
        data.extend_from_slice(b"NEXT");
        let mut r = Cursor::new(data);
        stream_to(&mut r, 3 * CHUNK as u64 + 5, tx).unwrap();
        assert_eq!(r.position(), 3 * CHUNK as u64 + 5, "the tar stream stays at the next member");
    }
}
