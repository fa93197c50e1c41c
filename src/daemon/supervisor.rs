//! The supervisor: the long-lived process of `wisp daemon`. It owns what must outlive a worker — the
//! fanotify group (if it closed with events pending, the kernel would allow them and unfilled holes
//! would read as zeros, docs/kernel.md G.4) and the control socket (clients queue in its backlog while a
//! worker restarts) — and runs one worker at a time (`wisp daemon --worker`), handing both fds over
//! (SCM_RIGHTS on the worker's stdin). A worker that dies is replaced; the new one answers the
//! events its predecessor had read (see `fscache::fanotify::journal`). Workers are started from the
//! binary the supervisor itself runs, held open by fd ([`Exe`]); a start that fails is retried with
//! backoff, never given up: the supervisor only exits on a signal.
//!
//! With the cachefiles frontend it holds the bound `/dev/cachefiles` session instead of the group
//! (closing it would fail every outstanding request and leave the mounts broken, docs/kernel.md A.6); a
//! new worker sends `restore` (super::frontend::cachefiles). Which session it holds is chosen once, at
//! start ([`Session::open`]).
//!
//! SIGTERM/SIGINT: the worker is asked to unmount every image; the supervisor exits only when none is
//! left mounted (a mounted image without its group would read zeros), or on a second signal.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use rustix::fs::{Mode, OFlags};

use super::frontend::Session;
use super::protocol::{self, Request};
use super::Config;

pub fn run(cfg: &Config) -> Result<()> {
    for d in [&cfg.state, &cfg.cache] {
        // Root only: index images, object files and the lower mounts (with an image's setuid-root
        // programs) live below these.
        crate::private_dir::ensure(d)?;
    }
    let exe = Exe::open()?;
    let cache = super::cache::NodeCache::open(&cfg.cache)?;
    let session = Session::open(cfg.frontend, &cache)?;
    let sock_path = protocol::socket_path(&cfg.state);
    if UnixStream::connect(&sock_path).is_ok() {
        anyhow::bail!("another wisp daemon answers on {}", sock_path.display());
    }
    let _ = std::fs::remove_file(&sock_path);
    let listener = bind_control(&sock_path)?;
    std::fs::write(cfg.state.join("supervisor.pid"), format!("{}\n", std::process::id()))?;

    let mut mask = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGCHLD] {
        mask.add(s);
    }
    mask.thread_block().context("blocking signals")?;
    let sfd = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC).context("signalfd")?;

    let mut stopping = 0u32;
    let mut child: Option<Child> = None;
    let mut restart = Restart::default();
    tracing::info!(socket = %sock_path.display(), frontend = session.name(), exe = %exe.path.display(), "wisp daemon started");
    loop {
        if child.is_none() && restart.due() {
            match spawn_worker(cfg, &exe, &session, &listener) {
                Ok(c) => {
                    tracing::info!(pid = c.id(), "worker started");
                    restart.started();
                    child = Some(c);
                }
                Err(e) => {
                    let wait = restart.failed();
                    tracing::error!(error = %format!("{e:#}"), retry_in = ?wait,
                        "starting a worker failed; the kernel session stays open and readers wait");
                }
            }
        }
        // Without a worker, wake up for the next attempt; with one, only for signals.
        let timeout = match &child {
            Some(_) => PollTimeout::NONE,
            None => PollTimeout::try_from(restart.until_due()).unwrap_or(PollTimeout::MAX),
        };
        let mut fds = [PollFd::new(sfd.as_fd(), PollFlags::POLLIN)];
        match nix::poll::poll(&mut fds, timeout) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => {}
            Err(e) => return Err(e).context("waiting for signals"),
        }
        let Some(sig) = sfd.read_signal().context("reading signals")? else { continue };
        match Signal::try_from(sig.ssi_signo as i32) {
            Ok(Signal::SIGCHLD) => {
                let Some(c) = child.as_mut() else { continue };
                let Some(status) = c.try_wait()? else { continue };
                child = None;
                let wait = restart.died();
                tracing::error!(%status, frontend = session.name(), restart_in = ?wait,
                    "worker died; starting a new one with the same kernel session");
            }
            Ok(Signal::SIGTERM | Signal::SIGINT) => {
                stopping += 1;
                let busy = match (&child, stopping) {
                    (_, 2..) => Vec::new(),
                    (Some(_), _) => shutdown_worker(&sock_path, &cfg.state),
                    (None, _) => recorded_mounts(&cfg.state),
                };
                if busy.is_empty() {
                    if let Some(mut c) = child.take() {
                        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), Signal::SIGTERM);
                        let _ = c.wait();
                    }
                    let _ = std::fs::remove_file(&sock_path);
                    return Ok(());
                }
                tracing::error!(?busy, "images still mounted; not exiting (signal again to force)");
            }
            _ => {}
        }
    }
}

/// When to start the next worker: at once the first time; after a death or a failed start, with a
/// delay that doubles from 100 ms to 10 s while workers keep dying young (under 10 s), and goes back
/// to 100 ms once one has lived longer.
struct Restart {
    next: Instant,
    delay: Duration,
    started: Option<Instant>,
}

impl Default for Restart {
    fn default() -> Self {
        Restart { next: Instant::now(), delay: Restart::MIN, started: None }
    }
}

impl Restart {
    const MIN: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(10);
    const HEALTHY: Duration = Duration::from_secs(10);

    fn due(&self) -> bool {
        Instant::now() >= self.next
    }

    fn until_due(&self) -> Duration {
        self.next.saturating_duration_since(Instant::now())
    }

    fn started(&mut self) {
        self.started = Some(Instant::now());
    }

    /// A start failed: the delay until the next attempt.
    fn failed(&mut self) -> Duration {
        let wait = self.delay;
        self.delay = (self.delay * 2).min(Restart::MAX);
        self.next = Instant::now() + wait;
        wait
    }

    /// The worker died: the delay until its successor (none after a long life: a crash, not a loop).
    fn died(&mut self) -> Duration {
        if self.started.take().is_some_and(|t| t.elapsed() >= Restart::HEALTHY) {
            self.delay = Restart::MIN;
            self.next = Instant::now();
            return Duration::ZERO;
        }
        self.failed()
    }
}

/// The binary the supervisor was started from, held open (`O_PATH`) for its lifetime. Workers are
/// started from it through `/proc/self/fd/N`, so a worker that replaces a dead one is always the same
/// program as the supervisor, even after the file was replaced or deleted on disk (an upgrade in
/// place): the fd passing between the two, and the state they share, stay of one version. A restart of
/// the whole daemon (systemd) picks up the new binary.
struct Exe {
    fd: OwnedFd,
    /// Where it was, for argv[0] and the logs.
    path: PathBuf,
}

impl Exe {
    fn open() -> Result<Exe> {
        // /proc/self/exe names the file this process runs, whatever has happened to its path since.
        let fd = rustix::fs::open("/proc/self/exe", OFlags::PATH | OFlags::CLOEXEC, Mode::empty())
            .context("opening /proc/self/exe (the wisp binary, to start workers from)")?;
        let path = std::fs::read_link("/proc/self/exe").unwrap_or_else(|_| PathBuf::from("wisp"));
        Ok(Exe { fd, path })
    }
}

/// Binds the control socket, root only: its mode is set to 0600 after bind(2) and before listen(2),
/// so there is no moment at which another user can connect (a bound socket that is not listening
/// refuses every connection). This does not depend on the umask, and unlike a umask change it does
/// not touch the rest of the process. The worker checks each peer's uid too (SO_PEERCRED).
fn bind_control(path: &Path) -> Result<UnixListener> {
    use nix::sys::socket::{bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
    let what = || format!("binding the control socket {}", path.display());
    let fd = socket(AddressFamily::Unix, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).with_context(what)?;
    let addr = UnixAddr::new(path).with_context(what)?;
    bind(fd.as_raw_fd(), &addr).with_context(what)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {}", path.display()))?;
    listen(&fd, Backlog::MAXCONN).with_context(what)?;
    Ok(UnixListener::from(fd))
}

/// The mount points of the mount records in the state directory (records that do not parse count,
/// named by their directory): what may still be mounted when no worker can say.
fn recorded_mounts(state: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(state.join("mounts")) else { return Vec::new() };
    rd.filter_map(|e| e.ok())
        .filter_map(|e| {
            let bytes = std::fs::read(e.path().join("record.json")).ok()?;
            let dir = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v["dir"].as_str().map(PathBuf::from));
            Some(dir.unwrap_or_else(|| e.path()))
        })
        .collect()
}

/// Asks the worker to unmount everything; returns the mount points still busy. If the worker does not
/// answer, every recorded mount counts as busy.
fn shutdown_worker(sock: &Path, state: &Path) -> Vec<PathBuf> {
    match protocol::call(sock, &Request::Shutdown, Some(Duration::from_secs(30))) {
        Ok(v) => serde_json::from_value(v["busy"].clone()).unwrap_or_default(),
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "asking the worker to unmount");
            recorded_mounts(state)
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

/// How much the OOM killer should spare a worker: less than the supervisor (whose death makes unfilled
/// holes read as zeros; the systemd unit gives it -999), since a worker that dies is replaced and
/// loses no data, but more than the containers, since until its successor is up every first read on
/// the node waits. The worker never gets a lower score than the supervisor's own.
const WORKER_OOM_SCORE_ADJ: i32 = -500;

fn spawn_worker(cfg: &Config, exe: &Exe, session: &Session, listener: &UnixListener) -> Result<Child> {
    let (ours, theirs) = UnixStream::pair().context("socketpair")?;
    let mut cmd = Command::new(format!("/proc/self/fd/{}", exe.fd.as_raw_fd()));
    cmd.arg0(&exe.path).arg("daemon").arg("--worker").args(cfg.to_args()).stdin(Stdio::from(OwnedFd::from(theirs)));
    if std::env::var_os("GLIBC_TUNABLES").is_none() {
        cmd.env("GLIBC_TUNABLES", WORKER_MALLOC);
    }
    let mut child = cmd.spawn().with_context(|| format!("starting a worker from {}", exe.path.display()))?;
    set_oom_score_adj(child.id());
    let (label, fd) = session.handover();
    if let Err(e) = fscache::fdpass::send_fds(&ours, label, &[fd, listener.as_fd()]) {
        let _ = child.kill();
        let _ = child.wait();
        return Err(e).context("handing the fds to the worker");
    }
    Ok(child)
}

/// Sets the worker's OOM score adjustment ([`WORKER_OOM_SCORE_ADJ`], or the supervisor's own if that
/// is higher); a failure is only logged.
fn set_oom_score_adj(pid: u32) {
    let own = std::fs::read_to_string("/proc/self/oom_score_adj")
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .unwrap_or(0);
    let adj = WORKER_OOM_SCORE_ADJ.max(own);
    if adj == own {
        return; // inherited
    }
    if let Err(e) = std::fs::write(format!("/proc/{pid}/oom_score_adj"), adj.to_string()) {
        tracing::warn!(pid, adj, error = %e, "setting the worker's oom_score_adj");
    }
}
