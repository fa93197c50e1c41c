//! The fetcher: an object's verified content from its store, with one flight per object, a bound on
//! concurrent downloads, retries with backoff, and a deadline per request.
//!
//! Each download attempt runs on its own thread, which holds a slot of the concurrency bound until the
//! download has really ended. The deadline is handed to the store ([`ObjectStore::open_by`]): a
//! registry download still running then is cancelled (its connection closed), so its thread ends and
//! its slot frees at the deadline. A store that cannot be cancelled (a hung local disk) keeps its
//! slot until it returns, so stuck downloads never pile up past the bound: later requests wait for a
//! slot and fail at their own deadline.
//!
//! Content is verified completely (blob digest of the stored bytes, sha256 and size of the content:
//! [`crate::store::fetch_verified`]) before the caller sees any of it; small objects are held in
//! memory, large ones spooled to an unlinked file in the cache's tmp directory.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Seek, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use erofs::tree::Digest;
use nix::errno::Errno;

use crate::object::ObjectEntry;
use crate::store::{fetch_verified_by, ObjectStore};

/// Objects above this size are spooled to a file instead of memory.
const SPOOL_ABOVE: u64 = 64 << 20;

/// How long a failed flight's outcome answers new requests for the same object. When a read fails, the
/// kernel asks again for the same read(2) (cachefiles: the readahead READ fails, then the page's own
/// read sends a second one), so without this a reader waited for the whole retry sequence, or the whole
/// `--fetch-deadline`, twice before getting EIO (seen in the VM: 10 s for a 5 s deadline). The second
/// request came up to 2.6 s after the first failed in the TCG guest at host load 14, hence 3 s; a
/// reader retrying after that (the store fixed, the registry back) gets a fresh fetch.
pub const FAILURE_HOLD: Duration = Duration::from_secs(3);

/// How long an object downloaded ahead of its first read ([`Fetcher::warm`]) waits for that read.
pub const WARM_HOLD: Duration = Duration::from_secs(120);

/// At most this many bytes of content downloaded ahead wait in memory (or spool files) at once; a warm
/// download beyond it is dropped after its waiters got it (the fill will download it again).
pub const WARM_LIMIT: u64 = 256 << 20;

/// How long the content of a finished download keeps answering requests for the same object. Two
/// readers of one object (two containers of an image, or a readahead and the page's own read) each
/// send a READ, and the kernel's cache file holds the content only once the first READ's answer is
/// written: a READ that comes after the flight ended but before that write would download the object
/// again (seen in the VM: one object served twice to three containers starting at once).
pub const RECENT_HOLD: Duration = Duration::from_secs(10);

/// At most this many bytes of recently downloaded content are held for [`RECENT_HOLD`].
pub const RECENT_LIMIT: u64 = 128 << 20;

/// Fetcher settings.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Downloads running at once.
    pub concurrency: usize,
    /// Attempts per request (1 = no retry).
    pub attempts: u32,
    /// First backoff; doubles per retry.
    pub backoff: Duration,
    /// Time from the request to giving up (the reader then gets EIO), plus the object's stored size
    /// at `min_rate` (so a 500 MiB object on a slow link is not cut off at the base deadline).
    pub deadline: Duration,
    /// Bytes per second a download is allowed to be as slow as, for the size part of the deadline.
    pub min_rate: f64,
    /// Where large objects are spooled.
    pub spool_dir: PathBuf,
    /// Test hook: sleep this long before every download (WISP_TEST_FETCH_DELAY_MS).
    pub delay: Duration,
}

impl FetchOptions {
    /// The deadline of one object's download: the base deadline plus its stored size at `min_rate`.
    pub fn deadline_for(&self, stored_size: u64) -> Duration {
        let extra = if self.min_rate > 0.0 { stored_size as f64 / self.min_rate } else { 0.0 };
        self.deadline + Duration::try_from_secs_f64(extra).unwrap_or(Duration::MAX / 4)
    }
}

/// Verified content of one object.
#[derive(Debug)]
pub enum Content {
    Memory(Vec<u8>),
    Spooled { file: File, len: u64 },
}

/// A consumer of content pieces: (offset, bytes).
pub type PieceFn<'a> = dyn FnMut(u64, &[u8]) -> Result<(), Errno> + 'a;

impl Content {
    /// Bytes of content.
    fn len(&self) -> u64 {
        match self {
            Content::Memory(v) => v.len() as u64,
            Content::Spooled { len, .. } => *len,
        }
    }

    /// Calls `f` with consecutive pieces (offset, bytes) of at most 1 MiB.
    pub fn for_each_piece(&self, f: &mut PieceFn<'_>) -> Result<(), Errno> {
        const PIECE: usize = 1 << 20;
        match self {
            Content::Memory(v) => {
                for (i, c) in v.chunks(PIECE).enumerate() {
                    f((i * PIECE) as u64, c)?;
                }
                Ok(())
            }
            Content::Spooled { file, len } => {
                let mut buf = vec![0u8; PIECE];
                let mut off = 0u64;
                while off < *len {
                    let n = usize::try_from((*len - off).min(PIECE as u64)).map_err(|_| Errno::EIO)?;
                    file.read_exact_at(&mut buf[..n], off).map_err(|_| Errno::EIO)?;
                    f(off, &buf[..n])?;
                    off += n as u64;
                }
                Ok(())
            }
        }
    }
}

/// Result of a flight, shared by everyone waiting for it.
type Outcome = Result<Arc<Content>, Errno>;

struct Flight {
    done: Mutex<Option<Outcome>>,
    cv: Condvar,
    /// Started by [`Fetcher::warm`].
    warm: bool,
    /// A `get` joined this warm flight and counts as its fetch.
    claimed: AtomicBool,
}

/// Single-flight, bounded, retrying object downloads.
pub struct Fetcher {
    opts: FetchOptions,
    flights: Mutex<HashMap<Digest, Arc<Flight>>>,
    /// Objects whose last flight failed: when it ended, and its error ([`FAILURE_HOLD`]).
    failed: Mutex<HashMap<Digest, (Instant, Errno)>>,
    /// Verified content downloaded ahead of its first read, taken by the first [`Fetcher::get`].
    ready: Mutex<Ready>,
    /// Content of downloads that just ended, for late joiners ([`RECENT_HOLD`]).
    recent: Mutex<Ready>,
    /// Downloads running (the concurrency bound); shared with their threads, which free their slot.
    slots: Arc<Slots>,
}

#[derive(Default)]
struct Slots {
    used: Mutex<usize>,
    cv: Condvar,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher").field("opts", &self.opts).finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Ready {
    held: HashMap<Digest, (Instant, Arc<Content>)>,
    bytes: u64,
}

impl Ready {
    fn take(&mut self, digest: &Digest) -> Option<Arc<Content>> {
        let (_, c) = self.held.remove(digest)?;
        self.bytes -= c.len();
        Some(c)
    }

    fn expire(&mut self, hold: Duration) {
        let before = self.held.len();
        self.held.retain(|_, (at, _)| at.elapsed() < hold);
        if self.held.len() != before {
            self.bytes = self.held.values().map(|(_, c)| c.len()).sum();
        }
    }
}

/// How a `get` went, for statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Joined {
    /// This call downloaded the object.
    Fetched,
    /// This call waited for another caller's download.
    Shared,
}

impl Fetcher {
    pub fn new(opts: FetchOptions) -> Self {
        Fetcher {
            opts,
            flights: Mutex::new(HashMap::new()),
            failed: Mutex::new(HashMap::new()),
            ready: Mutex::new(Ready::default()),
            recent: Mutex::new(Ready::default()),
            slots: Arc::default(),
        }
    }

    /// The verified content of `entry`, from the first of `stores` that has it.
    pub fn get(&self, entry: &ObjectEntry, stores: &[Arc<dyn ObjectStore>]) -> (Outcome, Joined) {
        self.flight(entry, stores, false).unwrap_or((Err(Errno::EIO), Joined::Shared))
    }

    /// Downloads `entry` ahead of its first read (the startup prefetch list, while the mount is still
    /// being set up) and holds the verified content for the first [`Fetcher::get`] of it, for up to
    /// [`WARM_HOLD`]. A `get` that comes while the download runs joins it, and counts as its fetch.
    /// Returns whether this call downloaded it (false when it is held or in flight already, when
    /// [`WARM_LIMIT`] bytes are held, or when the download failed).
    pub fn warm(&self, entry: &ObjectEntry, stores: &[Arc<dyn ObjectStore>]) -> bool {
        matches!(self.flight(entry, stores, true), Some((Ok(_), Joined::Fetched)))
    }

    fn ready(&self) -> MutexGuard<'_, Ready> {
        self.ready.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn recent(&self) -> MutexGuard<'_, Ready> {
        self.recent.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Holds `content` for late requests of the same object, within [`RECENT_LIMIT`].
    fn hold_recent(&self, digest: &Digest, content: &Arc<Content>) {
        let mut recent = self.recent();
        recent.expire(RECENT_HOLD);
        if recent.held.contains_key(digest) || recent.bytes + content.len() > RECENT_LIMIT {
            return;
        }
        recent.bytes += content.len();
        recent.held.insert(*digest, (Instant::now(), Arc::clone(content)));
    }

    /// Joins the flight of `entry` or leads a new one; `None` when a warm call finds nothing to do.
    ///
    /// Content downloaded ahead waits in `ready`. A warm leader puts it there before it ends its
    /// flight, and a `get` looks there only under the flights lock when it finds no flight, so a `get`
    /// either joins the flight or finds the content: it never downloads an object held or in flight.
    fn flight(&self, entry: &ObjectEntry, stores: &[Arc<dyn ObjectStore>], warm: bool) -> Option<(Outcome, Joined)> {
        {
            let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
            match failed.get(&entry.digest) {
                Some(_) if warm => return None,
                Some(&(at, errno)) if at.elapsed() < FAILURE_HOLD => return Some((Err(errno), Joined::Shared)),
                Some(_) => {
                    failed.remove(&entry.digest);
                }
                None => {}
            }
        }
        let (flight, claimed) = {
            let mut map = self.flights.lock().unwrap_or_else(|p| p.into_inner());
            match map.get(&entry.digest) {
                Some(_) if warm => return None,
                // The first `get` joining a download started ahead is the one that uses it.
                Some(f) => (Arc::clone(f), Some(f.warm && !f.claimed.swap(true, Ordering::SeqCst))),
                None => {
                    if !warm {
                        let mut recent = self.recent();
                        recent.expire(RECENT_HOLD);
                        if let Some((_, c)) = recent.held.get(&entry.digest) {
                            return Some((Ok(Arc::clone(c)), Joined::Shared));
                        }
                    }
                    let mut ready = self.ready();
                    ready.expire(WARM_HOLD);
                    if warm && (ready.held.contains_key(&entry.digest) || ready.bytes >= WARM_LIMIT) {
                        return None;
                    }
                    if let Some(c) = ready.take(&entry.digest) {
                        // Downloaded ahead; this is its first use, so it counts as this call's fetch.
                        drop(ready);
                        self.hold_recent(&entry.digest, &c);
                        return Some((Ok(c), Joined::Fetched));
                    }
                    drop(ready);
                    let f = Arc::new(Flight {
                        done: Mutex::new(None),
                        cv: Condvar::new(),
                        warm,
                        claimed: AtomicBool::new(false),
                    });
                    map.insert(entry.digest, Arc::clone(&f));
                    (f, None)
                }
            }
        };
        if let Some(claimed) = claimed {
            let mut done = flight.done.lock().unwrap_or_else(|p| p.into_inner());
            while done.is_none() {
                done = flight.cv.wait(done).unwrap_or_else(|p| p.into_inner());
            }
            let outcome = done.clone().expect("set");
            drop(done);
            if claimed {
                // The leader may have put it in `ready` before this call claimed it.
                self.ready().take(&entry.digest);
                if let Ok(c) = &outcome {
                    self.hold_recent(&entry.digest, c);
                }
                return Some((outcome, Joined::Fetched));
            }
            return Some((outcome, Joined::Shared));
        }
        let outcome = self.download(entry, stores);
        match &outcome {
            Err(errno) => {
                self.failed.lock().unwrap_or_else(|p| p.into_inner()).insert(entry.digest, (Instant::now(), *errno));
            }
            Ok(c) if warm && !flight.claimed.load(Ordering::SeqCst) => {
                let mut ready = self.ready();
                ready.bytes += c.len();
                ready.held.insert(entry.digest, (Instant::now(), Arc::clone(c)));
            }
            Ok(c) => self.hold_recent(&entry.digest, c),
        }
        *flight.done.lock().unwrap_or_else(|p| p.into_inner()) = Some(outcome.clone());
        flight.cv.notify_all();
        self.flights.lock().unwrap_or_else(|p| p.into_inner()).remove(&entry.digest);
        Some((outcome, Joined::Fetched))
    }

    fn download(&self, entry: &ObjectEntry, stores: &[Arc<dyn ObjectStore>]) -> Outcome {
        let start = Instant::now();
        let deadline = start + self.opts.deadline_for(entry.stored_size);
        let hex = hex::encode(entry.digest);
        let mut backoff = self.opts.backoff;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let store = Arc::clone(&stores[(attempt as usize - 1) % stores.len().max(1)]);
            let slot = self.acquire(deadline).inspect_err(|_| {
                tracing::error!(object = %hex, attempt, "giving up on object: no download slot freed by the deadline");
            })?;
            match self.attempt(entry, store, deadline, slot) {
                Ok(c) => return Ok(Arc::new(c)),
                Err(e) => {
                    let timed_out = Instant::now() + backoff >= deadline;
                    if attempt >= self.opts.attempts || timed_out {
                        tracing::error!(object = %hex, attempt, error = %format!("{e:#}"), "giving up on object");
                        return Err(if timed_out { Errno::ETIMEDOUT } else { Errno::EIO });
                    }
                    tracing::warn!(object = %hex, attempt, error = %format!("{e:#}"), "object fetch failed; retrying");
                    std::thread::sleep(backoff);
                    backoff *= 2;
                }
            }
        }
    }

    /// One download on its own thread, which holds `slot` until the download ends, so that the
    /// deadline holds for the caller even when the store hangs, and the bound holds even then. The
    /// store cancels the download at `deadline` where it can.
    fn attempt(
        &self,
        entry: &ObjectEntry,
        store: Arc<dyn ObjectStore>,
        deadline: Instant,
        slot: SlotGuard,
    ) -> anyhow::Result<Content> {
        let (tx, rx) = mpsc::channel();
        let entry = *entry;
        let spool_dir = self.opts.spool_dir.clone();
        let delay = self.opts.delay;
        std::thread::Builder::new().name("wisp-fetch".into()).spawn(move || {
            let _slot = slot;
            if !delay.is_zero() {
                std::thread::sleep(delay);
            }
            let _ = tx.send(fetch_one(&*store, &entry, &spool_dir, deadline));
        })?;
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(r) => r,
            Err(_) => anyhow::bail!("no answer within the deadline"),
        }
    }

    fn acquire(&self, deadline: Instant) -> Result<SlotGuard, Errno> {
        let mut n = self.slots.used.lock().unwrap_or_else(|p| p.into_inner());
        while *n >= self.opts.concurrency.max(1) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Errno::ETIMEDOUT);
            }
            n = self.slots.cv.wait_timeout(n, left).unwrap_or_else(|p| p.into_inner()).0;
        }
        *n += 1;
        Ok(SlotGuard(Arc::clone(&self.slots)))
    }

    /// Downloads running now (slots of the concurrency bound in use).
    pub fn running(&self) -> usize {
        *self.slots.used.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One slot of the concurrency bound, freed on drop.
struct SlotGuard(Arc<Slots>);

impl Drop for SlotGuard {
    fn drop(&mut self) {
        *self.0.used.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
        self.0.cv.notify_one();
    }
}

fn fetch_one(
    store: &dyn ObjectStore,
    entry: &ObjectEntry,
    spool_dir: &std::path::Path,
    deadline: Instant,
) -> anyhow::Result<Content> {
    if entry.size <= SPOOL_ABOVE {
        let mut v = Vec::with_capacity(usize::try_from(entry.size)?);
        fetch_verified_by(store, entry, &mut v, Some(deadline))?;
        Ok(Content::Memory(v))
    } else {
        let mut file = tempfile::tempfile_in(spool_dir)?;
        fetch_verified_by(store, entry, &mut file, Some(deadline))?;
        file.flush()?;
        let len = file.stream_position()?;
        Ok(Content::Spooled { file, len })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A store that fails the first `fail` opens, counting opens.
    struct Flaky {
        data: Vec<u8>,
        fail: u32,
        opens: AtomicU32,
    }

    impl ObjectStore for Flaky {
        fn describe(&self) -> String {
            "flaky".into()
        }
        fn lookup(&self, _: &Digest, _: u64) -> anyhow::Result<Option<ObjectEntry>> {
            Ok(None)
        }
        fn put(&self, _: &ObjectEntry, _: &Path) -> anyhow::Result<bool> {
            Ok(false)
        }
        fn open(&self, _: &ObjectEntry) -> anyhow::Result<Box<dyn std::io::Read + Send>> {
            std::thread::sleep(Duration::from_millis(30));
            if self.opens.fetch_add(1, Ordering::SeqCst) < self.fail {
                anyhow::bail!("transient");
            }
            Ok(Box::new(std::io::Cursor::new(self.data.clone())))
        }
        fn staging_parent(&self) -> Option<PathBuf> {
            None
        }
    }

    /// A store whose open says it started, then waits for a go (one open only).
    struct Gated {
        data: Vec<u8>,
        started: Mutex<mpsc::Sender<()>>,
        go: Mutex<mpsc::Receiver<()>>,
    }

    impl ObjectStore for Gated {
        fn describe(&self) -> String {
            "gated".into()
        }
        fn lookup(&self, _: &Digest, _: u64) -> anyhow::Result<Option<ObjectEntry>> {
            Ok(None)
        }
        fn put(&self, _: &ObjectEntry, _: &Path) -> anyhow::Result<bool> {
            Ok(false)
        }
        fn open(&self, _: &ObjectEntry) -> anyhow::Result<Box<dyn std::io::Read + Send>> {
            self.started.lock().unwrap().send(())?;
            self.go.lock().unwrap().recv()?;
            Ok(Box::new(std::io::Cursor::new(self.data.clone())))
        }
        fn staging_parent(&self) -> Option<PathBuf> {
            None
        }
    }

    fn entry_of(data: &[u8]) -> ObjectEntry {
        use sha2::Digest as _;
        let d: Digest = sha2::Sha256::digest(data).into();
        ObjectEntry {
            digest: d,
            blob: d,
            size: data.len() as u64,
            stored_size: data.len() as u64,
            compression: crate::object::Compression::None,
        }
    }

    fn opts(attempts: u32) -> FetchOptions {
        FetchOptions {
            concurrency: 2,
            attempts,
            backoff: Duration::from_millis(10),
            deadline: Duration::from_secs(5),
            min_rate: 0.0,
            spool_dir: std::env::temp_dir(),
            delay: Duration::ZERO,
        }
    }

    #[test]
    fn deadline_grows_with_size() {
        let o = FetchOptions { min_rate: 250_000.0, ..opts(1) };
        assert_eq!(o.deadline_for(0), Duration::from_secs(5));
        assert_eq!(
            o.deadline_for(500 << 20),
            Duration::from_secs(5) + Duration::from_secs_f64((500 << 20) as f64 / 250e3)
        );
        assert_eq!(opts(1).deadline_for(u64::MAX), Duration::from_secs(5));
    }

    #[test]
    fn single_flight_and_retries() {
        let data = b"object bytes".repeat(100);
        let store: Arc<dyn ObjectStore> = Arc::new(Flaky { data: data.clone(), fail: 1, opens: AtomicU32::new(0) });
        let f = Arc::new(Fetcher::new(opts(3)));
        let e = entry_of(&data);
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let (f, s) = (Arc::clone(&f), Arc::clone(&store));
                std::thread::spawn(move || f.get(&e, &[s]))
            })
            .collect();
        let mut fetched = 0;
        for h in handles {
            let (r, j) = h.join().unwrap();
            match &*r.unwrap() {
                Content::Memory(v) => assert_eq!(v, &data),
                Content::Spooled { .. } => panic!("small object spooled"),
            }
            fetched += usize::from(j == Joined::Fetched);
        }
        assert!(fetched >= 1);
    }

    /// A request that comes just after a download ended (a second READ of the object, sent before the
    /// first READ's answer reached the kernel's cache file) shares its content; after the hold a new
    /// request downloads again.
    #[test]
    fn late_request_shares_a_finished_download() {
        let data = b"late bytes".repeat(30);
        let flaky = Arc::new(Flaky { data: data.clone(), fail: 0, opens: AtomicU32::new(0) });
        let store: Arc<dyn ObjectStore> = flaky.clone();
        let f = Fetcher::new(opts(1));
        let e = entry_of(&data);
        assert_eq!(f.get(&e, &[Arc::clone(&store)]).1, Joined::Fetched);
        let (r, j) = f.get(&e, &[Arc::clone(&store)]);
        assert!(matches!(&*r.unwrap(), Content::Memory(v) if *v == data));
        assert_eq!(j, Joined::Shared);
        assert_eq!(flaky.opens.load(Ordering::SeqCst), 1, "one download");
        // Expired: downloaded again.
        f.recent().held.values_mut().for_each(|(at, _)| *at -= RECENT_HOLD);
        assert_eq!(f.get(&e, &[Arc::clone(&store)]).1, Joined::Fetched);
        assert_eq!(flaky.opens.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn tampered_content_is_an_error() {
        let data = b"good".to_vec();
        let mut e = entry_of(&data);
        e.digest[0] ^= 1;
        e.blob = e.digest;
        let store: Arc<dyn ObjectStore> = Arc::new(Flaky { data, fail: 0, opens: AtomicU32::new(0) });
        let f = Fetcher::new(opts(2));
        assert_eq!(f.get(&e, &[store]).0.unwrap_err(), Errno::EIO);
    }

    /// Content downloaded ahead is handed to the first `get` (counted as its fetch) without a second
    /// download; a `get` joining a warm download in flight counts as the fetch too, and nothing is
    /// left held after it.
    #[test]
    fn warm_then_get() {
        let data = b"warm bytes".repeat(50);
        let flaky = Arc::new(Flaky { data: data.clone(), fail: 0, opens: AtomicU32::new(0) });
        let store: Arc<dyn ObjectStore> = flaky.clone();
        let f = Arc::new(Fetcher::new(opts(1)));
        let e = entry_of(&data);
        assert!(f.warm(&e, &[Arc::clone(&store)]));
        assert!(!f.warm(&e, &[Arc::clone(&store)]), "already held");
        let (r, j) = f.get(&e, &[Arc::clone(&store)]);
        assert!(matches!(&*r.unwrap(), Content::Memory(v) if *v == data));
        assert_eq!(j, Joined::Fetched);
        assert_eq!(flaky.opens.load(Ordering::SeqCst), 1);
        // Taken, and held a while for late readers: the next get shares it without a download.
        assert_eq!(f.get(&e, &[Arc::clone(&store)]).1, Joined::Shared);
        assert_eq!(flaky.opens.load(Ordering::SeqCst), 1);
        assert!(f.ready().held.is_empty(), "taken from the warm hold");

        // A get while the warm download runs joins it (or, if it comes after, takes the held content).
        let data2 = b"second object".repeat(10);
        let (started_tx, started_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel();
        let gated = Arc::new(Gated { data: data2.clone(), started: Mutex::new(started_tx), go: Mutex::new(go_rx) });
        let store2: Arc<dyn ObjectStore> = gated;
        let e2 = entry_of(&data2);
        let warm = {
            let (f, s) = (Arc::clone(&f), Arc::clone(&store2));
            std::thread::spawn(move || f.warm(&e2, &[s]))
        };
        started_rx.recv().unwrap();
        let get = {
            let (f, s) = (Arc::clone(&f), Arc::clone(&store2));
            std::thread::spawn(move || f.get(&e2, &[s]))
        };
        go_tx.send(()).unwrap();
        drop(go_tx); // a second download would fail instead of waiting
        assert!(warm.join().unwrap());
        let (r, j) = get.join().unwrap();
        assert!(matches!(&*r.unwrap(), Content::Memory(v) if *v == data2));
        assert_eq!(j, Joined::Fetched);
        assert!(started_rx.try_recv().is_err(), "one download only");
        assert!(f.ready().held.is_empty(), "a claimed warm download is not held");
    }

    /// A store whose opens block until released (a hung disk: nothing can cancel them), counting opens.
    struct Hung {
        data: Vec<u8>,
        opens: AtomicU32,
        release: Mutex<mpsc::Receiver<()>>,
    }

    impl ObjectStore for Hung {
        fn describe(&self) -> String {
            "hung".into()
        }
        fn lookup(&self, _: &Digest, _: u64) -> anyhow::Result<Option<ObjectEntry>> {
            Ok(None)
        }
        fn put(&self, _: &ObjectEntry, _: &Path) -> anyhow::Result<bool> {
            Ok(false)
        }
        fn open(&self, _: &ObjectEntry) -> anyhow::Result<Box<dyn std::io::Read + Send>> {
            if self.opens.fetch_add(1, Ordering::SeqCst) == 0 {
                self.release.lock().unwrap().recv()?;
            }
            Ok(Box::new(std::io::Cursor::new(self.data.clone())))
        }
        fn staging_parent(&self) -> Option<PathBuf> {
            None
        }
    }

    /// A download that misses its deadline and cannot be cancelled keeps its slot until it really
    /// ends: with a bound of one, the next request waits for the slot and fails at its own deadline
    /// without starting a second download; once the stuck one returns, downloads run again.
    #[test]
    fn stuck_download_keeps_its_slot_until_it_ends() {
        let data = b"hung bytes".repeat(10);
        let (release_tx, release_rx) = mpsc::channel();
        let hung = Arc::new(Hung { data: data.clone(), opens: AtomicU32::new(0), release: Mutex::new(release_rx) });
        let store: Arc<dyn ObjectStore> = hung.clone();
        let f = Fetcher::new(FetchOptions { concurrency: 1, deadline: Duration::from_millis(200), ..opts(1) });
        let (a, mut b) = (entry_of(&data), entry_of(&data));
        b.digest[0] ^= 1; // another object (never verified: it is never downloaded)
        let t = Instant::now();
        assert!(f.get(&a, &[Arc::clone(&store)]).0.is_err());
        assert_eq!(f.running(), 1, "the stuck download holds its slot");
        assert!(f.get(&b, &[Arc::clone(&store)]).0.is_err());
        assert!(t.elapsed() < Duration::from_secs(2), "each request fails at its deadline: {:?}", t.elapsed());
        assert_eq!(hung.opens.load(Ordering::SeqCst), 1, "no second download while the bound is used up");
        release_tx.send(()).unwrap();
        let t = Instant::now();
        while f.running() > 0 {
            assert!(t.elapsed() < Duration::from_secs(5), "the slot is freed once the download ends");
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(FAILURE_HOLD);
        let (r, _) = f.get(&a, &[store]);
        assert!(matches!(&*r.unwrap(), Content::Memory(v) if *v == data));
        assert_eq!(hung.opens.load(Ordering::SeqCst), 2);
    }

    /// A request right after a failed flight gets its error without a new download; after
    /// [`FAILURE_HOLD`] the object is fetched again (the store may have been fixed).
    #[test]
    fn failure_answers_immediate_retries_then_expires() {
        let data = b"object bytes".to_vec();
        let flaky = Arc::new(Flaky { data: data.clone(), fail: 2, opens: AtomicU32::new(0) });
        let store: Arc<dyn ObjectStore> = flaky.clone();
        let f = Fetcher::new(opts(2));
        let e = entry_of(&data);
        assert_eq!(f.get(&e, &[Arc::clone(&store)]).0.unwrap_err(), Errno::EIO);
        assert_eq!(flaky.opens.load(Ordering::SeqCst), 2);
        let (r, j) = f.get(&e, &[Arc::clone(&store)]);
        assert_eq!((r.unwrap_err(), j), (Errno::EIO, Joined::Shared));
        assert_eq!(flaky.opens.load(Ordering::SeqCst), 2, "the held failure must not download again");
        std::thread::sleep(FAILURE_HOLD + Duration::from_millis(50));
        let (r, j) = f.get(&e, &[store]);
        assert!(matches!(&*r.unwrap(), Content::Memory(v) if *v == data));
        assert_eq!(j, Joined::Fetched);
        assert_eq!(flaky.opens.load(Ordering::SeqCst), 3);
    }
}
