//! The supervisor: the long-lived process of `wisp daemon`. It owns what must outlive a worker — the
//! fanotify group (if it closed with events pending, the kernel would allow them and unfilled holes
//! would read as zeros, KERNEL.md G.4) and the control socket (clients queue in its backlog while a
//! worker restarts) — and runs one worker at a time (`wisp daemon --worker`), handing both fds over
//! (SCM_RIGHTS on the worker's stdin). A worker that dies is replaced; the new one answers the
//! events its predecessor had read (see `fscache::fanotify::journal`).
//!
//! With the cachefiles frontend it holds the bound `/dev/cachefiles` session instead of the group
//! (closing it would fail every outstanding request and leave the mounts broken, KERNEL.md A.6); a
//! new worker sends `restore` (super::cachefiles).
//!
//! SIGTERM/SIGINT: the worker is asked to unmount every image; the supervisor exits only when none is
//! left mounted (a mounted image without its group would read zeros), or on a second signal.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use fscache::fanotify::Group;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use super::protocol::FrontendKind;
use super::protocol::{self, Request};
use super::worker::{FDS_LABEL, FDS_LABEL_CACHEFILES};
use super::Config;

pub fn run(cfg: &Config) -> Result<()> {
    for d in [&cfg.state, &cfg.cache] {
        // Root only: index images, object files and the lower mounts (with an image's setuid-root
        // programs) live below these.
        crate::private_dir::ensure(d)?;
    }
    let cache = super::cache::NodeCache::open(&cfg.cache)?;
    let kernel = Kernel::open(cfg.frontend, &cache)?;
    let sock_path = protocol::socket_path(&cfg.state);
    if UnixStream::connect(&sock_path).is_ok() {
        anyhow::bail!("another wisp daemon answers on {}", sock_path.display());
    }
    let _ = std::fs::remove_file(&sock_path);
    let listener = UnixListener::bind(&sock_path).with_context(|| format!("binding {}", sock_path.display()))?;
    std::fs::write(cfg.state.join("supervisor.pid"), format!("{}\n", std::process::id()))?;

    let mut mask = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGCHLD] {
        mask.add(s);
    }
    mask.thread_block().context("blocking signals")?;
    let sfd = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC).context("signalfd")?;

    let mut stopping = 0u32;
    let mut crashes: Vec<Instant> = Vec::new();
    let mut child = spawn_worker(cfg, &kernel, &listener)?;
    tracing::info!(pid = child.id(), socket = %sock_path.display(), frontend = kernel.name(), "wisp daemon started");
    loop {
        let Some(sig) = sfd.read_signal().context("reading signals")? else { continue };
        match Signal::try_from(sig.ssi_signo as i32) {
            Ok(Signal::SIGCHLD) => {
                let Some(status) = child.try_wait()? else { continue };
                if stopping > 0 {
                    return Ok(());
                }
                tracing::error!(%status, frontend = kernel.name(), "worker died; starting a new one with the same kernel session");
                crashes.retain(|t| t.elapsed() < Duration::from_secs(10));
                crashes.push(Instant::now());
                if crashes.len() > 5 {
                    std::thread::sleep(Duration::from_secs(1)); // a crash loop: do not spin
                }
                child = spawn_worker(cfg, &kernel, &listener)?;
            }
            Ok(Signal::SIGTERM | Signal::SIGINT) => {
                stopping += 1;
                let busy = if stopping == 1 { shutdown_worker(&sock_path) } else { Vec::new() };
                if busy.is_empty() {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), Signal::SIGTERM);
                    let _ = child.wait();
                    let _ = std::fs::remove_file(&sock_path);
                    return Ok(());
                }
                tracing::error!(?busy, "images still mounted and in use; not exiting (signal again to force)");
            }
            _ => {}
        }
    }
}

/// Asks the worker to unmount everything; returns the mount points still busy.
fn shutdown_worker(sock: &std::path::Path) -> Vec<std::path::PathBuf> {
    match protocol::call(sock, &Request::Shutdown, Some(Duration::from_secs(30))) {
        Ok(v) => serde_json::from_value(v["busy"].clone()).unwrap_or_default(),
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "asking the worker to unmount");
            Vec::new()
        }
    }
}

/// The kernel session the supervisor holds for its workers.
enum Kernel {
    Fanotify(Group),
    Cachefiles(fscache::cachefiles::Device),
}

impl Kernel {
    /// `--frontend auto`: fanotify when the kernel has pre-content events (6.14+), else cachefiles.
    fn open(kind: FrontendKind, cache: &super::cache::NodeCache) -> Result<Kernel> {
        let fanotify = || -> Result<Kernel> {
            let group =
                Group::new().context("the fanotify frontend needs fanotify pre-content events (Linux 6.14+)")?;
            group
                .probe(&cache.root().join("objects"))
                .context("the fanotify frontend needs pre-content marks on the cache directory")?;
            Ok(Kernel::Fanotify(group))
        };
        let cachefiles = || -> Result<Kernel> {
            super::cachefiles::check_erofs_ondemand()?;
            Ok(Kernel::Cachefiles(super::cachefiles::open_bound(cache.root())?))
        };
        match kind {
            FrontendKind::Fanotify => fanotify(),
            FrontendKind::Cachefiles => cachefiles(),
            FrontendKind::Auto => fanotify().or_else(|fe| {
                tracing::info!(reason = %format!("{fe:#}"), "fanotify frontend unavailable; trying cachefiles");
                cachefiles()
                    .map_err(|ce| anyhow::anyhow!("no usable kernel interface: fanotify: {fe:#}; cachefiles: {ce:#}"))
            }),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Kernel::Fanotify(_) => "fanotify",
            Kernel::Cachefiles(_) => "cachefiles",
        }
    }
}

/// glibc malloc settings of the worker (unless GLIBC_TUNABLES is set already). Whole objects pass
/// through its memory (fetched, verified, written out), from 16+ threads. By default glibc raises its
/// mmap threshold to the largest block freed so far (up to 32 MiB), so later object buffers come from
/// per-thread arenas that keep the freed memory: a cold walk of python:v1 left the worker at 78 MiB
/// RSS and ten mounted images at 99 MiB. A fixed 128 KiB threshold (object buffers are mapped and
/// unmapped) and two arenas: 13 MiB and 21 MiB (docs/daemon.md).
const WORKER_MALLOC: &str = "glibc.malloc.mmap_threshold=131072:glibc.malloc.arena_max=2";

fn spawn_worker(cfg: &Config, kernel: &Kernel, listener: &UnixListener) -> Result<Child> {
    let (ours, theirs) = UnixStream::pair().context("socketpair")?;
    let exe = std::env::current_exe().context("locating the wisp binary")?;
    let mut cmd = Command::new(exe);
    cmd.arg("daemon").arg("--worker").args(cfg.to_args()).stdin(Stdio::from(OwnedFd::from(theirs)));
    if std::env::var_os("GLIBC_TUNABLES").is_none() {
        cmd.env("GLIBC_TUNABLES", WORKER_MALLOC);
    }
    let child = cmd.spawn().context("starting the worker")?;
    let (label, fd) = match kernel {
        Kernel::Fanotify(g) => (FDS_LABEL, g.as_fd()),
        Kernel::Cachefiles(d) => (FDS_LABEL_CACHEFILES, d.as_fd()),
    };
    fscache::fdpass::send_fds(&ours, label, &[fd, listener.as_fd()]).context("handing the fds to the worker")?;
    Ok(child)
}
