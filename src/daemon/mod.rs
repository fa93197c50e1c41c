//! `wisp daemon`: one process tree per node that mounts index images and fills their objects on
//! demand (docs/daemon.md).
//!
//! * [`supervisor`]: holds the kernel session (fanotify group or /dev/cachefiles) and the control
//!   socket across worker restarts.
//! * [`frontend`]: the kernel interfaces, one module each behind one trait: [`frontend::fanotify`]
//!   (pre-content events on object files) and [`frontend::cachefiles`] (EROFS over fscache, one shared
//!   domain).
//! * [`worker`]: runs the frontend the supervisor chose and serves control requests.
//! * The core, which does not depend on the kernel interface: [`core`] (the objects the mounted
//!   images need, filled for either frontend), [`fetcher`] (single flight, bounded concurrency,
//!   retries, deadline), [`cache`] (sparse object files named by sha256, completeness record),
//!   [`images`] (index images under the state directory), [`stats`].
//! * [`prefetch`]: the startup prefetch list (recording first reads, prefetching at mount).
//! * [`mounts`]: the EROFS lower (through the frontend) + overlayfs mounts and their records;
//!   [`protocol`]: the control socket.

pub mod cache;
pub mod core;
pub mod fetcher;
pub mod frontend;
pub mod images;
pub mod mounts;
pub mod prefetch;
pub mod protocol;
pub mod stats;
pub mod supervisor;
pub mod worker;

use std::path::PathBuf;
use std::time::Duration;

use fetcher::FetchOptions;

/// Daemon settings (the `wisp daemon` flags).
#[derive(Debug, Clone)]
pub struct Config {
    pub cache: PathBuf,
    pub state: PathBuf,
    /// Threads filling objects (each may wait on a download).
    pub fill_workers: usize,
    /// Downloads at once.
    pub fetch_concurrency: usize,
    pub fetch_attempts: u32,
    pub fetch_deadline: Duration,
    /// Megabits per second: the deadline grows by an object's size at this rate.
    pub fetch_min_rate_mbit: f64,
    /// The kernel interface (auto: fanotify if the kernel has pre-content events, else cachefiles).
    pub frontend: protocol::FrontendKind,
}

impl Config {
    /// The flags that reproduce this config (for the worker's command line).
    pub fn to_args(&self) -> Vec<String> {
        vec![
            "--cache".into(),
            self.cache.display().to_string(),
            "--state".into(),
            self.state.display().to_string(),
            "--fill-workers".into(),
            self.fill_workers.to_string(),
            "--fetch-concurrency".into(),
            self.fetch_concurrency.to_string(),
            "--fetch-attempts".into(),
            self.fetch_attempts.to_string(),
            "--fetch-deadline".into(),
            self.fetch_deadline.as_secs_f64().to_string(),
            "--fetch-min-rate".into(),
            self.fetch_min_rate_mbit.to_string(),
            "--frontend".into(),
            self.frontend.name().into(),
        ]
    }

    pub fn fetch_options(&self, cache: &cache::NodeCache) -> FetchOptions {
        let delay = std::env::var("WISP_TEST_FETCH_DELAY_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
        FetchOptions {
            concurrency: self.fetch_concurrency,
            attempts: self.fetch_attempts.max(1),
            backoff: Duration::from_millis(200),
            deadline: self.fetch_deadline,
            min_rate: self.fetch_min_rate_mbit * 1e6 / 8.0,
            spool_dir: cache.tmp_dir(),
            delay: Duration::from_millis(delay),
        }
    }
}
