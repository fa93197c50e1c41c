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

use std::fs::{File, OpenOptions};
use std::io;
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

/// The journal file of the current worker.
#[derive(Debug)]
pub struct Journal {
    file: File,
    high_water: AtomicI32,
}

impl Journal {
    /// Opens (creating) the journal at `path`, returns what earlier workers left in it, and clears it.
    pub fn open(path: &Path) -> io::Result<(Journal, Leftovers)> {
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        let left = read_leftovers(&file)?;
        file.set_len(0)?;
        let j = Journal { file, high_water: AtomicI32::new(-1) };
        if left.high_water >= 0 {
            j.raise_high_water(left.high_water)?;
        }
        Ok((j, left))
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
        drop(j2);
        // the second worker recorded nothing: the high-water mark is kept, the orphans are not
        let (_j3, left) = Journal::open(&p).unwrap();
        assert_eq!(left, Leftovers { orphans: vec![], high_water: 9 });
    }
}
