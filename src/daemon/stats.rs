//! Per-image statistics: bytes and objects fetched, cache hits, fill latency percentiles.

use serde::{Deserialize, Serialize};

/// Latencies kept per image (the oldest are dropped beyond this).
const MAX_SAMPLES: usize = 100_000;

/// Running counters of one mounted image.
#[derive(Debug, Clone, Default)]
pub struct ImageStats {
    pub reference: String,
    /// Objects the image references, their content bytes and stored (wire) bytes.
    pub objects: u64,
    pub content_bytes: u64,
    pub stored_bytes: u64,
    /// Objects downloaded for this image and their stored (wire) and content bytes.
    pub objects_fetched: u64,
    pub bytes_fetched: u64,
    pub content_fetched: u64,
    /// Objects already complete in the node cache when the image was mounted.
    pub cache_hits: u64,
    /// Fills served by a download another request had started.
    pub shared: u64,
    /// Fills that failed (the reader got an error).
    pub failures: u64,
    /// Fill request latencies, milliseconds.
    pub latency_ms: Vec<f64>,
    /// Objects filled, in order (for `wisp stats --accessed`; capped like the latencies).
    pub order: Vec<erofs::tree::Digest>,
    /// Prefetch: listed objects not yet complete at mount, those the prefetch completed, finished.
    pub prefetch_listed: u64,
    pub prefetched: u64,
    pub prefetch_done: bool,
}

/// What `wisp stats` shows for one image.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatsReport {
    pub image: String,
    pub reference: String,
    pub objects: u64,
    pub content_bytes: u64,
    pub stored_bytes: u64,
    pub objects_fetched: u64,
    pub bytes_fetched: u64,
    pub content_fetched: u64,
    pub cache_hits: u64,
    pub shared: u64,
    pub failures: u64,
    pub requests: u64,
    pub latency_ms_p50: f64,
    pub latency_ms_p90: f64,
    pub latency_ms_p99: f64,
    pub latency_ms_max: f64,
    #[serde(default)]
    pub prefetch_listed: u64,
    #[serde(default)]
    pub prefetched: u64,
    #[serde(default)]
    pub prefetch_done: bool,
}

impl ImageStats {
    pub fn new(reference: &str) -> Self {
        ImageStats { reference: reference.to_owned(), ..Default::default() }
    }

    pub fn push_latency(&mut self, ms: f64) {
        if self.latency_ms.len() >= MAX_SAMPLES {
            self.latency_ms.remove(0);
        }
        self.latency_ms.push(ms);
    }

    pub fn push_filled(&mut self, d: erofs::tree::Digest) {
        if self.order.len() < MAX_SAMPLES {
            self.order.push(d);
        }
    }

    pub fn report(&self, image: &str) -> StatsReport {
        let mut l = self.latency_ms.clone();
        l.sort_by(f64::total_cmp);
        StatsReport {
            image: image.to_owned(),
            reference: self.reference.clone(),
            objects: self.objects,
            content_bytes: self.content_bytes,
            stored_bytes: self.stored_bytes,
            objects_fetched: self.objects_fetched,
            bytes_fetched: self.bytes_fetched,
            content_fetched: self.content_fetched,
            cache_hits: self.cache_hits,
            shared: self.shared,
            failures: self.failures,
            requests: l.len() as u64,
            latency_ms_p50: percentile(&l, 0.50),
            latency_ms_p90: percentile(&l, 0.90),
            latency_ms_p99: percentile(&l, 0.99),
            latency_ms_max: l.last().copied().unwrap_or(0.0),
            prefetch_listed: self.prefetch_listed,
            prefetched: self.prefetched,
            prefetch_done: self.prefetch_done,
        }
    }
}

/// Nearest-rank percentile of sorted samples (0 when empty).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    // A rank in 1..=len: the float-to-int cast saturates, and min() bounds it.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let rank = (p * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
        assert_eq!(percentile(&[3.0], 0.9), 3.0);
    }
}
