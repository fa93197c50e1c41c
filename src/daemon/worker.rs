//! The worker: receives the kernel session (fanotify group or /dev/cachefiles) and the control
//! listener from the supervisor (on its stdin, a unix socket) and runs the frontend they name
//! (super::frontend): it restores the mounts still in the kernel, takes over what a killed predecessor
//! left unanswered, then serves the kernel (main thread) and control requests (one thread per
//! connection, here).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};

use super::core::Core;
use super::fetcher::Fetcher;
use super::mounts::Mounts;
use super::protocol::{Request, Response, MAX_REQUEST, REQUEST_TIMEOUT};
use super::{cache::NodeCache, Config};

pub fn run(cfg: &Config) -> Result<()> {
    // The supervisor blocks signals for its signalfd; the mask is inherited across exec.
    nix::sys::signal::SigSet::all().thread_unblock().context("unblocking signals")?;
    let sock = UnixStream::from(std::io::stdin().as_fd().try_clone_to_owned().context("dup of stdin")?);
    let (label, fds) = fscache::fdpass::recv_fds(&sock).context("receiving the daemon fds from the supervisor")?;
    drop(sock);
    let [session, listener]: [std::os::fd::OwnedFd; 2] =
        fds.try_into().map_err(|v: Vec<_>| anyhow::anyhow!("expected 2 fds from the supervisor, got {}", v.len()))?;
    super::frontend::run_worker(cfg, &label, session, listener)
}

/// The core of a worker: the node cache and the fetcher.
pub fn open_core(cfg: &Config) -> Result<Arc<Core>> {
    let cache = NodeCache::open(&cfg.cache)?;
    let fetcher = Fetcher::new(cfg.fetch_options(&cache));
    Ok(Arc::new(Core::new(cache, fetcher)))
}

/// Writes `STATE/worker.pid` (once the worker is ready).
pub fn write_pid(cfg: &Config) -> Result<()> {
    std::fs::write(cfg.state.join("worker.pid"), format!("{}\n", std::process::id()))?;
    Ok(())
}

/// Serves the control socket: one thread per connection.
pub fn control_thread(listener: UnixListener, mounts: Arc<Mounts>) -> Result<()> {
    std::thread::Builder::new().name("wisp-control".into()).spawn(move || {
        for conn in listener.incoming() {
            match conn {
                Ok(c) => {
                    let m = Arc::clone(&mounts);
                    let _ = std::thread::Builder::new().name("wisp-request".into()).spawn(move || serve(c, &m));
                }
                Err(e) => tracing::error!(error = %e, "accepting a control connection"),
            }
        }
    })?;
    Ok(())
}

fn serve(conn: UnixStream, mounts: &Mounts) {
    let resp = match read_request(&conn) {
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "control request refused");
            Response::err(&e)
        }
        Ok(req) => {
            let r = handle(&req, mounts);
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

fn handle(req: &Request, mounts: &Mounts) -> Result<serde_json::Value> {
    Ok(match req {
        Request::Mount(m) => mounts.mount(m)?,
        Request::Umount { dir } => mounts.umount(dir)?,
        Request::Stats => serde_json::json!({"images": mounts_stats(mounts), "frontend": mounts.frontend().stats()}),
        Request::Accessed { dir } => {
            serde_json::json!({ "list": String::from_utf8_lossy(&mounts.accessed(dir)?) })
        }
        Request::Status => {
            let mut status = serde_json::json!({
                "worker_pid": std::process::id(),
                "frontend": mounts.kind().name(),
                "mounts": mounts.list(),
                "unrestored": mounts.unrestored(),
            });
            if let Some(m) = status.as_object_mut() {
                m.extend(mounts.frontend().status());
            }
            status
        }
        Request::Shutdown => serde_json::json!({ "busy": mounts.shutdown() }),
    })
}

fn mounts_stats(mounts: &Mounts) -> serde_json::Value {
    serde_json::to_value(mounts.core().report()).unwrap_or_default()
}
