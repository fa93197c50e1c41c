//! `wisp daemon [--cache DIR] [--state DIR]`: the node daemon (supervisor; `--worker` is internal).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;

use crate::daemon::protocol::FrontendKind;
use crate::daemon::{self, Config};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The node object cache (ext4/xfs/btrfs: pre-content marks do not work on tmpfs).
    #[arg(long, default_value = "/var/cache/wisp")]
    cache: PathBuf,
    /// Index images, mount records and the control socket (STATE/control.sock).
    #[arg(long, default_value = "/var/lib/wisp")]
    state: PathBuf,
    /// Threads filling objects.
    #[arg(long, default_value_t = 16)]
    fill_workers: usize,
    /// Object downloads at once.
    #[arg(long, default_value_t = 16)]
    fetch_concurrency: usize,
    /// Attempts per object download.
    #[arg(long, default_value_t = 4)]
    fetch_attempts: u32,
    /// Seconds from a read to giving up on its object (the reader then gets EIO).
    #[arg(long, default_value_t = 30.0)]
    fetch_deadline: f64,
    /// Megabits per second: each object's deadline grows by its stored size at this rate, so large
    /// objects on slow links get time to arrive (0: the same deadline for every size).
    #[arg(long, default_value_t = 2.0)]
    fetch_min_rate: f64,
    /// Kernel interface: auto picks fanotify pre-content events (6.14+) if the kernel has them, else
    /// cachefiles on-demand (EROFS over fscache).
    #[arg(long, value_enum, default_value_t = FrontendKind::Auto)]
    frontend: FrontendKind,
    /// Run as the worker of a supervisor (internal).
    #[arg(long, hide = true)]
    worker: bool,
}

pub fn run(a: Args) -> Result<()> {
    // Before anything is created: without CAP_SYS_ADMIN the first mount or fanotify_init would fail
    // with a bare EPERM, after the state and cache directories were made.
    super::caps::require("wisp daemon", super::caps::DAEMON)?;
    let abs = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
    let cfg = Config {
        cache: abs(a.cache),
        state: abs(a.state),
        fill_workers: a.fill_workers.max(1),
        fetch_concurrency: a.fetch_concurrency.max(1),
        fetch_attempts: a.fetch_attempts.max(1),
        fetch_deadline: Duration::from_secs_f64(a.fetch_deadline.max(0.1)),
        fetch_min_rate_mbit: a.fetch_min_rate.max(0.0),
        frontend: a.frontend,
    };
    if a.worker {
        daemon::worker::run(&cfg)
    } else {
        daemon::supervisor::run(&cfg)
    }
}
