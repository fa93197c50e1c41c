//! Bounds on what untrusted layers may cost the converter. Every layer blob is hostile until merged:
//! a few megabytes of gzip can expand to terabytes, a tar of empty members can describe millions of
//! inodes, extension headers can pile up metadata, a deep path can create thousands of directories.
//! Each limit is checked while the layer streams, before the memory or the work it bounds is spent,
//! and a hit is a [`LimitError`] naming the limit, the value and the `wisp convert` flag that raises
//! it (the caller adds the layer and the entry).
//!
//! The defaults are far above every image of the test corpus (docs/corpus.md: at most 4,520 files,
//! 122 MB of tar, 3 layers, a gzip ratio under 3) and above the large images seen in practice, while
//! keeping the hostile cases in bounded memory (docs/convert.md, "Limits").

use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// What a conversion may cost. [`Limits::default`] is what `wisp convert` uses without flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Tar members plus the directories they create implicitly, over all layers (each is at least
    /// one inode or one directory entry held in memory until the index is written).
    pub max_entries: u64,
    /// Size of one regular file (its logical size; a sparse file counts at its apparent size).
    pub max_file_size: u64,
    /// Decompressed tar bytes, over all layers.
    pub max_total_size: u64,
    /// Decompressed bytes per compressed byte of one layer, checked once the layer has expanded to
    /// [`RATIO_GRACE`] bytes.
    pub max_ratio: u64,
    /// PAX extended headers (`x`, `g`) and GNU long names and link targets (`L`, `K`), in bytes,
    /// over all layers: the metadata a member can carry beyond its fixed header.
    pub max_pax_bytes: u64,
    /// Contents of small files (kept inside the index), held in memory until the index is written.
    pub max_inline_bytes: u64,
    /// Missing parent directories that one member's path may create.
    pub max_implicit_parents: u64,
}

/// A layer may expand this much before its ratio is checked (small layers of tar headers compress
/// very well and are harmless).
pub const RATIO_GRACE: u64 = 64 << 20;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_entries: 2_000_000,
            max_file_size: 64 << 30,
            max_total_size: 256 << 30,
            max_ratio: 100,
            max_pax_bytes: 256 << 20,
            max_inline_bytes: 256 << 20,
            max_implicit_parents: 1024,
        }
    }
}

impl Limits {
    /// No limits (only the format's own bounds): for callers that read trusted input.
    pub fn unlimited() -> Self {
        Limits {
            max_entries: u64::MAX,
            max_file_size: u64::MAX,
            max_total_size: u64::MAX,
            max_ratio: u64::MAX,
            max_pax_bytes: u64::MAX,
            max_inline_bytes: u64::MAX,
            max_implicit_parents: u64::MAX,
        }
    }
}

/// A limit that untrusted input hit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}: more than {limit} (the limit; raise it with wisp convert --{flag})")]
pub struct LimitError {
    /// What was counted, with the count reached (`"1000001 entries (tar members and implicit
    /// directories)"`).
    pub what: String,
    pub limit: u64,
    /// The `wisp convert` flag that sets this limit, without the dashes.
    pub flag: &'static str,
}

impl LimitError {
    pub fn new(what: impl Into<String>, limit: u64, flag: &'static str) -> Self {
        LimitError { what: what.into(), limit, flag }
    }

    /// As an I/O error (for limits checked inside a reader), with this error as its source.
    pub fn into_io(self) -> io::Error {
        io::Error::other(self)
    }
}

/// Bytes counted by a [`CountingReader`], shared with whoever checks them.
#[derive(Debug, Clone, Default)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
}

/// Counts the bytes read through it into a [`Counter`].
#[derive(Debug)]
pub struct CountingReader<R> {
    pub inner: R,
    pub counter: Counter,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.counter.add(n as u64);
        Ok(n)
    }
}

/// The decompressed side of a layer: fails once the layer expands more than `max_ratio` times the
/// compressed bytes read so far (past [`RATIO_GRACE`]), or once all layers together exceed
/// `max_total_size`.
#[derive(Debug)]
pub struct Bounded<R> {
    inner: R,
    /// Compressed bytes of this layer read so far.
    compressed: Counter,
    /// Decompressed bytes of this layer.
    out: u64,
    /// Decompressed bytes of the layers before this one.
    before: u64,
    limits: Limits,
}

impl<R: Read> Bounded<R> {
    /// `before`: decompressed bytes of the earlier layers.
    pub fn new(inner: R, compressed: Counter, before: u64, limits: Limits) -> Self {
        Bounded { inner, compressed, out: 0, before, limits }
    }

    /// Decompressed bytes of this layer so far.
    pub fn expanded(&self) -> u64 {
        self.out
    }

    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.out += n as u64;
        let total = self.before.saturating_add(self.out);
        if total > self.limits.max_total_size {
            return Err(LimitError::new(
                format!("the layers expand to {total} bytes of tar"),
                self.limits.max_total_size,
                "max-total-size",
            )
            .into_io());
        }
        let compressed = self.compressed.get().max(1);
        if self.out > RATIO_GRACE && self.out > compressed.saturating_mul(self.limits.max_ratio) {
            return Err(LimitError::new(
                format!(
                    "the layer expands {}-fold ({} bytes of tar from {compressed} compressed bytes so far)",
                    self.out / compressed,
                    self.out
                ),
                self.limits.max_ratio,
                "max-decompression-ratio",
            )
            .into_io());
        }
        Ok(n)
    }
}

/// Size arguments: a number of bytes, or with a binary suffix K, M, G or T (`64G` = 64 GiB).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last() {
        Some((i, 'k' | 'K')) => (&s[..i], 10),
        Some((i, 'm' | 'M')) => (&s[..i], 20),
        Some((i, 'g' | 'G')) => (&s[..i], 30),
        Some((i, 't' | 'T')) => (&s[..i], 40),
        _ => (s, 0),
    };
    let n: u64 = digits.parse().map_err(|_| format!("{s:?} is not a size (a number, optionally with K, M, G or T)"))?;
    n.checked_mul(1u64 << shift).ok_or_else(|| format!("{s} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("123"), Ok(123));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("64G"), Ok(64 << 30));
        assert_eq!(parse_size("2t"), Ok(2 << 40));
        assert!(parse_size("x").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn a_bomb_is_stopped_at_the_ratio() {
        let compressed = Counter::default();
        compressed.add(1 << 20);
        let limits = Limits { max_ratio: 100, ..Limits::default() };
        let mut r = Bounded::new(io::repeat(0).take(1 << 30), compressed, 0, limits);
        let err = io::copy(&mut r, &mut io::sink()).unwrap_err();
        let limit = err.get_ref().and_then(|e| e.downcast_ref::<LimitError>()).expect("a LimitError");
        assert_eq!(limit.flag, "max-decompression-ratio");
        assert!(r.expanded() <= 101 << 20, "{}", r.expanded());
    }
}
