//! The control socket protocol: a unix stream socket (`STATE/control.sock`), one JSON request per
//! connection on one line, one JSON response line back.
//!
//! ```text
//! {"op":"mount","reference":"docker://127.0.0.1:5000/wisp/python:v1","dir":"/mnt/a",
//!  "upper":null,"work":null,"plain_http":true,"store":null,"frontend":"auto"}
//! {"op":"mount","reference":"docker://127.0.0.1:5000/wisp/python:v1","dir":"/x/lower","upper":null,
//!  "work":null,"plain_http":true,"store":null,"index":"/unpacked/wisp","lower_only":true}
//! {"op":"umount","dir":"/mnt/a"}
//! {"op":"stats"}
//! {"op":"accessed","dir":"/mnt/a"}    -> {"list":"/usr/bin/python3.11\n..."} (first-fill order)
//! {"op":"status"}                      -> worker pid, frontend, mounts
//! {"op":"shutdown"}                    -> unmount everything (sent by the supervisor)
//! response: {"ok":true,"result":{...}} | {"ok":false,"error":"..."}
//! ```
//!
//! Only root may talk to the daemon: the socket is mode 0600 and the worker checks each peer's uid
//! (SO_PEERCRED) before it reads. A request line is at most [`MAX_REQUEST`] bytes and must arrive
//! within [`REQUEST_TIMEOUT`]; otherwise the answer is an error and the connection is closed.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// The longest request line the daemon reads (a mount request with long paths is a few KiB).
pub const MAX_REQUEST: usize = 64 * 1024;

/// How long the daemon waits for a connection's request line (and for its answer to be taken).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A client request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    Mount(MountRequest),
    Umount {
        dir: PathBuf,
    },
    Stats,
    /// The files a mount had filled, in first-fill order (a prefetch list).
    Accessed {
        dir: PathBuf,
    },
    Status,
    Shutdown,
}

/// Which kernel interface serves an image.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FrontendKind {
    /// The one the kernel supports (fanotify pre-content first).
    #[default]
    Auto,
    /// fanotify pre-content events (Linux 6.14+).
    Fanotify,
    /// cachefiles on-demand (CONFIG_CACHEFILES_ONDEMAND).
    Cachefiles,
}

impl FrontendKind {
    pub fn name(self) -> &'static str {
        match self {
            FrontendKind::Auto => "auto",
            FrontendKind::Fanotify => "fanotify",
            FrontendKind::Cachefiles => "cachefiles",
        }
    }
}

/// `wisp mount`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MountRequest {
    /// The index image (oci:DIR[:TAG] or docker://HOST/REPO:TAG).
    pub reference: String,
    /// Absolute mount point of the container root (overlayfs).
    pub dir: PathBuf,
    /// Absolute upper and work dirs; the daemon makes its own under STATE when absent.
    pub upper: Option<PathBuf>,
    pub work: Option<PathBuf>,
    pub plain_http: bool,
    /// A `--store` (dir:PATH) when the objects are not in the image's repository.
    pub store: Option<String>,
    #[serde(default)]
    pub frontend: FrontendKind,
    /// A local directory holding the image's `index.erofs` and `objects.map` (an index layer a container
    /// runtime has already unpacked): the daemon copies them instead of pulling the index image, and
    /// `reference` then only names the repository that holds the objects. An absolute path with no
    /// symbolic link in it: the daemon resolves it and the files in it with `RESOLVE_NO_SYMLINKS`, and
    /// each must be a regular file (`images::read_local_index`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<PathBuf>,
    /// Mount only the EROFS index at `dir`, without overlayfs (the caller, e.g. the containerd
    /// snapshotter, puts its own overlay on top); `upper`/`work` must be absent.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub lower_only: bool,
}

/// The daemon's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
}

impl Response {
    pub fn ok(result: serde_json::Value) -> Self {
        Response { ok: true, error: None, result: Some(result) }
    }
    pub fn err(e: &anyhow::Error) -> Self {
        Response { ok: false, error: Some(format!("{e:#}")), result: None }
    }
}

/// The control socket in a state directory.
pub fn socket_path(state: &Path) -> PathBuf {
    state.join("control.sock")
}

/// Sends one request and returns the result (an error response becomes an error).
pub fn call(socket: &Path, req: &Request, timeout: Option<Duration>) -> Result<serde_json::Value> {
    let s = UnixStream::connect(socket).map_err(|e| {
        let hint = match e.kind() {
            std::io::ErrorKind::PermissionDenied => "it serves root only",
            _ => "is `wisp daemon` running?",
        };
        anyhow::Error::new(e).context(format!("connecting to the wisp daemon at {} ({hint})", socket.display()))
    })?;
    s.set_read_timeout(timeout)?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    (&s).write_all(&line).context("sending the request")?;
    let mut answer = String::new();
    BufReader::new(&s).read_line(&mut answer).context("reading the daemon's answer")?;
    if answer.is_empty() {
        bail!("the daemon closed the connection without answering (see its log)");
    }
    let r: Response = serde_json::from_str(&answer).context("parsing the daemon's answer")?;
    match (r.ok, r.error) {
        (true, _) => Ok(r.result.unwrap_or(serde_json::Value::Null)),
        (false, Some(e)) => bail!("{e}"),
        (false, None) => bail!("the daemon reported an unspecified error"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format() {
        let r = Request::Umount { dir: "/mnt/a".into() };
        assert_eq!(serde_json::to_string(&r).unwrap(), r#"{"op":"umount","dir":"/mnt/a"}"#);
        let m: Request = serde_json::from_str(
            r#"{"op":"mount","reference":"oci:/x","dir":"/m","upper":null,"work":null,"plain_http":false,"store":null}"#,
        )
        .unwrap();
        assert!(matches!(m, Request::Mount(MountRequest { frontend: FrontendKind::Auto, .. })));
        assert_eq!(serde_json::to_string(&Request::Stats).unwrap(), r#"{"op":"stats"}"#);
    }
}
