//! The in-flight journal: which permission events a worker has read but not yet answered.
//!
//! Why: the kernel matches a response to its pending event by the **fd number** the event was read
//! with (`process_access_response` in fs/notify/fanotify/fanotify_user.c compares the number, not the
//! file), and pending events stay queued for as long as the group lives, even when the process that
//! read them has died. A worker killed with events in flight therefore leaves readers blocked forever
//! unless someone answers those numbers. The supervisor keeps the group alive (see [`crate::fdpass`]),
//! and each worker writes here, before it acts on an event, the event's fd number and the object
//! (device, inode) it is for, and clears the slot after answering. A restarted worker reads the
//! journal and answers every number it finds: after filling the object (the readers then see correct
//! bytes), or with an error (never `FAN_ALLOW` for bytes it has not written and verified).
//!
//! Layout: one file, slot `n` (16 bytes: device, inode; native endian; inode 0 = empty) at offset
//! `16 * (n + 1)`; slot -1 (offset 0) holds the highest fd number ever recorded, so a restarted worker
//! can also deny numbers that were read but died before being recorded (a window of a few
//! instructions between `read(2)` and the journal write). Only process death must be survived, not a
//! machine crash (a reboot has no pending events), so the journal is written without fsync.
//!
//! A dead worker's events stay recorded until a successor answers them, so a worker killed while it
//! still waits to answer its predecessor's events hands them on to the next one.
//!
//! **Fd numbers.** While a dead worker's event is pending, no other event may be read into its number:
//! a response to the new event would be applied to the old one (the first match on the group's access
//! list), letting the old reader in before its range is filled. A restarted worker therefore, before it
//! opens anything else: opens the journal, moves the fds it already holds above the highest recorded
//! number ([`lift`], [`Journal::lift`]) and fills every number up to it with `/dev/null`
//! ([`Reservation::claim`]), holding them for its lifetime. Only 0, 1 and 2 stay as they are, and
//! every worker has those open, so no event was ever read into them.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};

/// fd numbers at or above this are not journaled (they are answered normally; a worker never has
/// that many events open).
pub const MAX_FD: i32 = 1 << 16;
const SLOT: u64 = 16;

/// A pending event of a dead worker, as recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Orphan {
    /// The fd number the event was read with (what the response must name).
    pub fd: i32,
    /// Device of the object file.
    pub dev: u64,
    /// Inode of the object file.
    pub ino: u64,
}

/// What a previous worker left behind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Leftovers {
    /// Recorded, unanswered events.
    pub orphans: Vec<Orphan>,
    /// The highest fd number the previous workers ever recorded (-1: none).
    pub high_water: i32,
}

impl Leftovers {
    /// The highest fd number of a recorded event: the numbers a new worker must hold (None: none).
    pub fn ceiling(&self) -> Option<i32> {
        self.orphans.iter().map(|o| o.fd).max()
    }
}

/// Moves `fd` to the lowest free number above `ceiling` (close-on-exec), closing its old number.
pub fn lift(fd: OwnedFd, ceiling: i32) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() > ceiling {
        return Ok(fd);
    }
    crate::sys::dup_at_least(fd.as_fd(), ceiling.saturating_add(1))
}

/// Every fd number from 3 up to a ceiling, held open (on `/dev/null`) so that no file or event of
/// this process gets one of them. Keep it for the process's lifetime.
#[derive(Debug)]
pub struct Reservation {
    held: Vec<File>,
    strays: Vec<i32>,
}

impl Reservation {
    /// Fills every free number up to `ceiling` (nothing for None). Numbers in 3..=ceiling that were
    /// already open are reported by [`Reservation::strays`]: the caller should have lifted them.
    pub fn claim(ceiling: Option<i32>) -> io::Result<Reservation> {
        let mut r = Reservation { held: Vec::new(), strays: Vec::new() };
        let Some(ceiling) = ceiling else { return Ok(r) };
        r.fill(ceiling)?;
        // Every number up to the ceiling is taken now, so this listing's own fd is above it.
        let listed: Vec<i32> =
            std::fs::read_dir("/proc/self/fd")?.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect();
        let held: std::collections::HashSet<i32> = r.held.iter().map(AsRawFd::as_raw_fd).collect();
        r.strays = listed.into_iter().filter(|n| (3..=ceiling).contains(n) && !held.contains(n)).collect();
        // A number closed between the fill and the listing (another thread's) is free again: take it.
        r.fill(ceiling)?;
        let held: std::collections::HashSet<i32> = r.held.iter().map(AsRawFd::as_raw_fd).collect();
        r.strays.retain(|n| !held.contains(n));
        r.strays.sort_unstable();
        Ok(r)
    }

    /// Holds every free number up to `ceiling`.
    fn fill(&mut self, ceiling: i32) -> io::Result<()> {
        loop {
            let f = File::open("/dev/null")?;
            if f.as_raw_fd() > ceiling {
                return Ok(());
            }
            self.held.push(f);
        }
    }

    /// Numbers in the range that were open before the claim (and may be closed, then reused, later).
    pub fn strays(&self) -> &[i32] {
        &self.strays
    }

    /// How many numbers are held.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// True if nothing is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

/// The journal file of the current worker.
#[derive(Debug)]
pub struct Journal {
    file: File,
    high_water: AtomicI32,
}

impl Journal {
    /// Opens (creating) the journal at `path` and returns what earlier workers left in it. Their
    /// events stay recorded until [`Journal::end`] clears them.
    pub fn open(path: &Path) -> io::Result<(Journal, Leftovers)> {
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        let left = read_leftovers(&file)?;
        let j = Journal { file, high_water: AtomicI32::new(left.high_water) };
        Ok((j, left))
    }

    /// Moves the journal's own fd above `ceiling` (see [`lift`]).
    pub fn lift(&mut self, ceiling: i32) -> io::Result<()> {
        if self.file.as_raw_fd() <= ceiling {
            // The assignment closes the old number.
            self.file = File::from(crate::sys::dup_at_least(self.file.as_fd(), ceiling.saturating_add(1))?);
        }
        Ok(())
    }

    /// Records that the event read as fd `fd` is for object (`dev`, `ino`).
    pub fn begin(&self, fd: i32, dev: u64, ino: u64) -> io::Result<()> {
        let Some(off) = offset(fd) else { return Ok(()) };
        self.raise_high_water(fd)?;
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&dev.to_ne_bytes());
        b[8..].copy_from_slice(&ino.max(1).to_ne_bytes());
        self.file.write_all_at(&b, off)
    }

    /// Records that the event read as fd `fd` has been answered.
    pub fn end(&self, fd: i32) -> io::Result<()> {
        let Some(off) = offset(fd) else { return Ok(()) };
        if fd > self.high_water.load(Ordering::SeqCst) {
            return Ok(()); // never recorded
        }
        self.file.write_all_at(&[0u8; 16], off)
    }

    fn raise_high_water(&self, fd: i32) -> io::Result<()> {
        if self.high_water.fetch_max(fd, Ordering::SeqCst) < fd {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&fd.to_ne_bytes());
            self.file.write_all_at(&b, 0)?;
        }
        Ok(())
    }
}

fn offset(fd: i32) -> Option<u64> {
    (0..MAX_FD).contains(&fd).then(|| (u64::try_from(fd).unwrap_or(0) + 1) * SLOT)
}

fn read_leftovers(file: &File) -> io::Result<Leftovers> {
    let len = file.metadata()?.len().min((u64::try_from(MAX_FD).unwrap_or(0) + 1) * SLOT);
    let mut buf = vec![0u8; usize::try_from(len).map_err(|_| io::ErrorKind::InvalidData)?];
    file.read_exact_at(&mut buf, 0)?;
    let mut left = Leftovers { orphans: Vec::new(), high_water: -1 };
    let mut slots = buf.chunks_exact(16);
    if let Some(head) = slots.next() {
        let hw = i32::from_ne_bytes(head[..4].try_into().expect("4 bytes"));
        left.high_water = hw.clamp(-1, MAX_FD - 1);
    }
    for (n, s) in slots.enumerate() {
        let dev = u64::from_ne_bytes(s[..8].try_into().expect("8 bytes"));
        let ino = u64::from_ne_bytes(s[8..].try_into().expect("8 bytes"));
        if ino != 0 {
            let fd = i32::try_from(n).map_err(|_| io::ErrorKind::InvalidData)?;
            left.orphans.push(Orphan { fd, dev, ino });
        }
    }
    Ok(left)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftovers_survive_reopen_and_are_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("inflight");
        let (j, left) = Journal::open(&p).unwrap();
        assert_eq!(left, Leftovers { orphans: vec![], high_water: -1 });
        j.begin(5, 1, 100).unwrap();
        j.begin(9, 1, 200).unwrap();
        j.begin(7, 2, 300).unwrap();
        j.end(9).unwrap();
        j.end(40).unwrap(); // never recorded: no effect
        drop(j);
        let (j2, left) = Journal::open(&p).unwrap();
        assert_eq!(left.high_water, 9);
        assert_eq!(left.orphans, vec![Orphan { fd: 5, dev: 1, ino: 100 }, Orphan { fd: 7, dev: 2, ino: 300 }]);
        assert_eq!(left.ceiling(), Some(7));
        drop(j2);
        // the second worker answered nothing: the orphans are handed on
        let (j3, left) = Journal::open(&p).unwrap();
        assert_eq!(left.orphans.len(), 2);
        j3.end(5).unwrap();
        j3.end(7).unwrap();
        drop(j3);
        // answered: gone; the high-water mark is kept
        let (_j4, left) = Journal::open(&p).unwrap();
        assert_eq!(left, Leftovers { orphans: vec![], high_water: 9 });
        assert_eq!(left.ceiling(), None);
    }

    #[test]
    fn lifted_fds_and_reservation_cover_the_range() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(&dir.path().join("inflight")).unwrap();
        let own = OwnedFd::from(File::open("/dev/zero").unwrap());
        let ceiling = own.as_raw_fd().max(j.file.as_raw_fd()) + 3;
        let own = lift(own, ceiling).unwrap();
        j.lift(ceiling).unwrap();
        assert!(own.as_raw_fd() > ceiling && j.file.as_raw_fd() > ceiling);
        j.begin(1, 2, 3).unwrap(); // the journal still works after the move
        let r = Reservation::claim(Some(ceiling)).unwrap();
        // other tests of this binary run in parallel and may hold numbers in the range
        for n in 3..=ceiling {
            let held = r.held.iter().any(|f| f.as_raw_fd() == n);
            assert!(held || r.strays().contains(&n), "{n} neither held nor reported");
        }
    }
}
