//! The one trait both kernel frontends serve: "fill object X, range R, with verified bytes".
//!
//! The daemon core implements [`Backend`]; [`crate::ring`] (cachefiles on-demand) and
//! [`crate::fanotify`] (pre-content events) call it. The core never learns which kernel interface
//! asked: it sees an object key when the kernel first needs an object, fill requests for byte ranges,
//! and a close when the kernel lets the object go.
//!
//! Contract, in short:
//! * `open` returns the object's **content size**. It must be the same every time for the same key
//!   (cachefiles compares it with the size stored next to a persisted cache file and discards the
//!   file on mismatch).
//! * `fill` writes every byte of the requested range through the sink, **after** verifying them; the
//!   frontend checks that the whole range was written and turns a gap into an error for the reader.
//!   Bytes outside the range may be written (the frontend keeps or drops them, see the sink docs).
//! * Errors are errnos. The reader sees an error (EIO for cachefiles, which has no error channel; the
//!   errno or EIO for fanotify), never zeros.
//! * Calls come from worker threads, concurrently, possibly for the same object; `fill` may block (it
//!   is where fetching happens) without stalling other requests.

use std::ops::Range;

pub use nix::errno::Errno;

/// The kernel's name for an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ObjectKey<'a> {
    /// Namespace: the EROFS `domain_id` (or fsid) for cachefiles; the frontend's label for fanotify.
    pub domain: &'a str,
    /// Object name: the EROFS fsid or device tag (wisp: the content sha256 in hex).
    pub name: &'a str,
}

/// An object the backend agreed to serve.
#[derive(Debug)]
pub struct Opened<O> {
    /// The backend's handle, passed back to `fill` and `close`.
    pub object: O,
    /// Content size in bytes (stable for a key).
    pub size: u64,
}

/// Where fill bytes go. Implemented by the frontends.
pub trait FillSink {
    /// Stores `data` at byte `offset` of the object. Writes may come in any order and any sizes; they
    /// must not overlap with different contents.
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), Errno>;
}

/// The daemon side of lazy loading.
pub trait Backend: Send + Sync + 'static {
    /// The backend's per-object state.
    type Object: Send + Sync + 'static;

    /// The kernel needs the object named `key`; return its handle and size, or an errno (ENOENT for
    /// unknown objects).
    fn open(&self, key: &ObjectKey<'_>) -> Result<Opened<Self::Object>, Errno>;

    /// Write the verified bytes of `range` (already clipped to `0..size`) through `sink`.
    fn fill(&self, object: &Self::Object, range: Range<u64>, sink: &mut dyn FillSink) -> Result<(), Errno>;

    /// The kernel no longer uses the object. In-flight fills may still hold it; it is dropped after.
    fn close(&self, object: &Self::Object) {
        let _ = object;
    }
}

/// Which bytes of a wanted range have been written (coalesced, sorted, non-overlapping).
#[derive(Debug, Clone, Default)]
pub(crate) struct Coverage {
    have: Vec<Range<u64>>,
}

impl Coverage {
    /// Records `r` (empty ranges ignored).
    pub(crate) fn add(&mut self, r: Range<u64>) {
        if r.start >= r.end {
            return;
        }
        let mut merged = r;
        self.have.retain(|h| {
            if h.end < merged.start || h.start > merged.end {
                true
            } else {
                merged = merged.start.min(h.start)..merged.end.max(h.end);
                false
            }
        });
        let at = self.have.partition_point(|h| h.start < merged.start);
        self.have.insert(at, merged);
    }

    /// True when every byte of `want` was written.
    pub(crate) fn covers(&self, want: &Range<u64>) -> bool {
        want.start >= want.end || self.have.iter().any(|h| h.start <= want.start && h.end >= want.end)
    }
}

/// The intersection of two ranges (possibly empty).
pub(crate) fn clip(r: Range<u64>, to: &Range<u64>) -> Range<u64> {
    let start = r.start.max(to.start);
    let end = r.end.min(to.end).max(start);
    start..end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coverage_merges_out_of_order_writes() {
        let mut c = Coverage::default();
        c.add(8..12);
        c.add(0..4);
        assert!(!c.covers(&(0..12)));
        c.add(4..8);
        assert!(c.covers(&(0..12)));
        assert!(c.covers(&(2..10)));
        assert!(!c.covers(&(0..13)));
        assert!(c.covers(&(5..5)));
        c.add(20..30);
        c.add(11..21);
        assert!(c.covers(&(0..30)));
        assert_eq!(c.have.len(), 1);
    }

    #[test]
    fn clip_ranges() {
        assert_eq!(clip(0..10, &(5..20)), 5..10);
        assert!(clip(0..10, &(10..20)).is_empty());
        assert!(clip(30..40, &(10..20)).is_empty());
    }
}
