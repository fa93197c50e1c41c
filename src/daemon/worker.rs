//! The worker: receives the fanotify group and the control listener from the supervisor (on its
//! stdin, a unix socket), watches the objects of the images still mounted, answers what a killed
//! predecessor left unanswered, then serves events (main thread) and control requests (one thread per
//! connection).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use fscache::fanotify::journal::{self, Journal};
use fscache::fanotify::{Frontend, Group};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};

use super::core::Core;
use super::fetcher::Fetcher;
use super::mounts::Mounts;
use super::protocol::{Request, Response, MAX_REQUEST, REQUEST_TIMEOUT};
use super::{cache::NodeCache, Config};

/// Label of the fd message the supervisor sends (fanotify group + control listener).
pub const FDS_LABEL: &str = "wisp-daemon";
/// The same with the /dev/cachefiles session instead of a fanotify group.
pub const FDS_LABEL_CACHEFILES: &str = "wisp-daemon cachefiles";

/// The kernel interface a worker serves, for the control requests.
#[derive(Clone)]
enum Active {
    Fanotify(Arc<Frontend<Core>>, fscache::fanotify::Recovery),
    Cachefiles(Arc<fscache::ring::timing::Timings>),
}

pub fn run(cfg: &Config) -> Result<()> {
    // The supervisor blocks signals for its signalfd; the mask is inherited across exec.
    nix::sys::signal::SigSet::all().thread_unblock().context("unblocking signals")?;
    let sock = UnixStream::from(std::io::stdin().as_fd().try_clone_to_owned().context("dup of stdin")?);
    let (label, fds) = fscache::fdpass::recv_fds(&sock).context("receiving the daemon fds from the supervisor")?;
    drop(sock);
    let [group, listener]: [std::os::fd::OwnedFd; 2] =
        fds.try_into().map_err(|v: Vec<_>| anyhow::anyhow!("expected 2 fds from the supervisor, got {}", v.len()))?;
    match label.as_str() {
        FDS_LABEL => {}
        FDS_LABEL_CACHEFILES => {
            let dev = fscache::cachefiles::Device::from_owned_fd(group);
            return run_cachefiles(cfg, dev, UnixListener::from(listener));
        }
        _ => bail!("unexpected fd message {label:?} from the supervisor"),
    }

    // Before anything else is opened: no fd of this process may take the number of an event a dead
    // worker read and nobody has answered yet (the kernel matches responses by fd number). Move the
    // fds held so far above the highest such number and hold every number below it (journal docs).
    let (mut journal, left) = Journal::open(&cfg.state.join("inflight")).context("opening the in-flight journal")?;
    let (group, listener, _reserved) = match left.ceiling() {
        None => (group, listener, None),
        Some(top) => {
            let group = journal::lift(group, top).context("moving the fanotify group fd")?;
            let listener = journal::lift(listener, top).context("moving the control socket fd")?;
            journal.lift(top).context("moving the journal fd")?;
            let r = journal::Reservation::claim(Some(top)).context("holding the fd numbers of pending events")?;
            if !r.strays().is_empty() {
                tracing::error!(fds = ?r.strays(), "fds open at start-up below a pending event's number");
            }
            (group, listener, Some(r))
        }
    };
    let group = Group::from_owned_fd(group);
    let listener = UnixListener::from(listener);

    let cache = NodeCache::open(&cfg.cache)?;
    let fetcher = Fetcher::new(cfg.fetch_options(&cache));
    let core = Arc::new(Core::new(cache, fetcher));
    let frontend = Arc::new(Frontend::new(group, Arc::clone(&core), "wisp", cfg.fill_workers)?);
    frontend.set_journal(journal);
    let mounts = Arc::new(Mounts::new(&cfg.state, Arc::clone(&core), Some(Arc::clone(&frontend))));
    let restored = mounts.restore().context("restoring mounts")?;
    let rec = frontend.recover(&left);
    tracing::info!(restored, ?rec, pid = std::process::id(), "worker ready");
    std::fs::write(cfg.state.join("worker.pid"), format!("{}\n", std::process::id()))?;

    control_thread(listener, mounts, Active::Fanotify(Arc::clone(&frontend), rec))?;
    frontend.run().context("serving fanotify events")?;
    Ok(())
}

/// The cachefiles worker: registers the objects of the images still mounted, then `restore` and the
/// io_uring loop on this thread (super::cachefiles).
fn run_cachefiles(cfg: &Config, dev: fscache::cachefiles::Device, listener: UnixListener) -> Result<()> {
    let nofile = super::frontend::cachefiles::raise_nofile_limit()?;
    let cache = NodeCache::open(&cfg.cache)?;
    let fetcher = Fetcher::new(cfg.fetch_options(&cache));
    let core = Arc::new(Core::for_cachefiles(cache, fetcher));
    let mounts = Arc::new(Mounts::new(&cfg.state, Arc::clone(&core), None));
    let restored = mounts.restore().context("restoring mounts")?;
    tracing::info!(restored, nofile, pid = std::process::id(), frontend = "cachefiles", "worker ready");
    std::fs::write(cfg.state.join("worker.pid"), format!("{}\n", std::process::id()))?;
    let mut server = super::frontend::cachefiles::start(dev, core, cfg.fill_workers)?;
    control_thread(listener, mounts, Active::Cachefiles(server.timings()))?;
    tracing::debug!("serving /dev/cachefiles");
    server.run().context("serving /dev/cachefiles")?;
    Ok(())
}

fn control_thread(listener: UnixListener, mounts: Arc<Mounts>, active: Active) -> Result<()> {
    std::thread::Builder::new().name("wisp-control".into()).spawn(move || {
        for conn in listener.incoming() {
            match conn {
                Ok(c) => {
                    let (m, a) = (Arc::clone(&mounts), active.clone());
                    let _ = std::thread::Builder::new().name("wisp-request".into()).spawn(move || serve(c, &m, &a));
                }
                Err(e) => tracing::error!(error = %e, "accepting a control connection"),
            }
        }
    })?;
    Ok(())
}

fn serve(conn: UnixStream, mounts: &Mounts, active: &Active) {
    let resp = match read_request(&conn) {
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "control request refused");
            Response::err(&e)
        }
        Ok(req) => {
            let r = handle(&req, mounts, active);
            if let Err(e) = &r {
                tracing::warn!(request = ?req, error = %format!("{e:#}"), "request failed");
            }
            match r {
                Ok(v) => Response::ok(v),
                Err(e) => Response::err(&e),
            }
        }
    };
    let mut out = serde_json::to_vec(&resp).unwrap_or_default();
    out.push(b'\n');
    let _ = (&conn).write_all(&out);
}

/// The request of a connection: from root only (SO_PEERCRED, checked before anything is read), one
/// line of at most [`MAX_REQUEST`] bytes, sent within [`REQUEST_TIMEOUT`].
fn read_request(conn: &UnixStream) -> Result<Request> {
    let cred = getsockopt(conn, PeerCredentials).context("reading the peer's credentials (SO_PEERCRED)")?;
    if cred.uid() != 0 {
        bail!("permission denied: the wisp daemon serves root only (peer pid {} uid {})", cred.pid(), cred.uid());
    }
    conn.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    conn.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    let mut line = Vec::new();
    BufReader::new(conn.take(MAX_REQUEST as u64 + 1)).read_until(b'\n', &mut line).map_err(|e| {
        if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) {
            anyhow::anyhow!("no request line within {} s", REQUEST_TIMEOUT.as_secs())
        } else {
            anyhow::Error::new(e).context("reading the request")
        }
    })?;
    if line.len() > MAX_REQUEST {
        bail!("request line longer than {MAX_REQUEST} bytes; closing the connection");
    }
    serde_json::from_slice(&line).map_err(|e| anyhow::anyhow!("bad request: {e}"))
}

fn handle(req: &Request, mounts: &Mounts, active: &Active) -> Result<serde_json::Value> {
    Ok(match (req, active) {
        (Request::Mount(m), _) => mounts.mount(m)?,
        (Request::Umount { dir }, _) => mounts.umount(dir)?,
        (Request::Stats, Active::Cachefiles(t)) => {
            let mut frontend = super::frontend::cachefiles::timings_json(t);
            frontend["kind"] = "cachefiles".into();
            serde_json::json!({"images": mounts_stats(mounts), "frontend": frontend})
        }
        (Request::Stats, Active::Fanotify(frontend, _)) => {
            let s = frontend.stats();
            serde_json::json!({
                "images": mounts_stats(mounts),
                "frontend": {"kind": "fanotify", "events": s.events, "fills": s.fills, "failures": s.failures},
            })
        }
        (Request::Accessed { dir }, _) => {
            serde_json::json!({ "list": String::from_utf8_lossy(&mounts.accessed(dir)?) })
        }
        (Request::Status, Active::Cachefiles(_)) => serde_json::json!({
            "worker_pid": std::process::id(),
            "frontend": "cachefiles",
            "mounts": mounts.list(),
            "unrestored": mounts.unrestored(),
        }),
        (Request::Status, Active::Fanotify(_, rec)) => serde_json::json!({
            "worker_pid": std::process::id(),
            "frontend": "fanotify",
            "mounts": mounts.list(),
            "unrestored": mounts.unrestored(),
            "recovered": {"resumed": rec.resumed, "allowed": rec.allowed, "denied_unrecorded": rec.denied_unrecorded},
        }),
        (Request::Shutdown, _) => serde_json::json!({ "busy": mounts.shutdown() }),
    })
}

fn mounts_stats(mounts: &Mounts) -> serde_json::Value {
    serde_json::to_value(mounts.core().report()).unwrap_or_default()
}
