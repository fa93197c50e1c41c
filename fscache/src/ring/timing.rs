//! How long the loop takes to answer requests: from the moment a message is read off the device to its
//! answer (the `copen` write for an OPEN, the READ_COMPLETE ioctl for a READ). This is the daemon's whole
//! handling time, queueing on the worker pool and the backend's fetch included.

use std::sync::Mutex;
use std::time::Duration;

/// Samples kept per kind (the most recent ones; older ones are overwritten).
const KEEP: usize = 1 << 16;

/// Handling-time samples of one request kind.
#[derive(Debug, Default)]
struct Samples {
    count: u64,
    /// Microseconds; a ring of at most KEEP entries.
    micros: Vec<u32>,
    next: usize,
}

impl Samples {
    fn push(&mut self, d: Duration) {
        let us = u32::try_from(d.as_micros()).unwrap_or(u32::MAX);
        self.count += 1;
        if self.micros.len() < KEEP {
            self.micros.push(us);
        } else {
            self.micros[self.next] = us;
            self.next = (self.next + 1) % KEEP;
        }
    }

    fn summary(&self) -> Summary {
        let mut v = self.micros.clone();
        v.sort_unstable();
        // Nearest rank; q in per mille.
        let pick = |q: usize| -> f64 {
            if v.is_empty() {
                return 0.0;
            }
            let rank = (q * v.len()).div_ceil(1000).clamp(1, v.len());
            f64::from(v[rank - 1]) / 1e3
        };
        Summary {
            count: self.count,
            sampled: v.len() as u64,
            p50_ms: pick(500),
            p90_ms: pick(900),
            p99_ms: pick(990),
            max_ms: v.last().map_or(0.0, |&m| f64::from(m) / 1e3),
        }
    }
}

/// Percentiles of one request kind's handling time.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Summary {
    /// Requests answered.
    pub count: u64,
    /// Samples the percentiles are computed over (the most recent ones).
    pub sampled: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// The kinds of request the loop times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Open,
    Read,
}

/// Handling times of a [`super::Server`], shared with whoever reports them.
#[derive(Debug, Default)]
pub struct Timings {
    open: Mutex<Samples>,
    read: Mutex<Samples>,
}

impl Timings {
    pub(crate) fn record(&self, kind: Kind, d: Duration) {
        let m = match kind {
            Kind::Open => &self.open,
            Kind::Read => &self.read,
        };
        if let Ok(mut s) = m.lock() {
            s.push(d);
        }
    }

    /// Percentiles of OPEN handling (message read to `copen` written).
    pub fn open(&self) -> Summary {
        self.open.lock().map(|s| s.summary()).unwrap_or_default()
    }

    /// Percentiles of READ handling (message read to READ_COMPLETE).
    pub fn read(&self) -> Summary {
        self.read.lock().map(|s| s.summary()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let t = Timings::default();
        for ms in 1..=100u64 {
            t.record(Kind::Read, Duration::from_millis(ms));
        }
        let s = t.read();
        assert_eq!((s.count, s.sampled), (100, 100));
        assert_eq!((s.p50_ms, s.p90_ms, s.p99_ms, s.max_ms), (50.0, 90.0, 99.0, 100.0));
        assert_eq!(t.open(), Summary::default());
    }

    #[test]
    fn keeps_the_most_recent_samples() {
        let mut s = Samples::default();
        for _ in 0..KEEP {
            s.push(Duration::from_millis(1));
        }
        for _ in 0..KEEP {
            s.push(Duration::from_millis(7));
        }
        let sum = s.summary();
        assert_eq!((sum.count, sum.sampled), (2 * KEEP as u64, KEEP as u64));
        assert_eq!((sum.p50_ms, sum.max_ms), (7.0, 7.0));
    }
}
