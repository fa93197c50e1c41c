//! Registry repositories through the `oci-client` crate (OCI distribution spec), driven from
//! synchronous code by a small tokio runtime owned by the [`Registry`]. Blob downloads stream through
//! a bounded channel into a verifying reader; uploads stream from files (monolithic `PUT`, size known).
//!
//! A stalled registry (a stopped process, a dead link) fails requests instead of hanging them. Every
//! request runs under a watchdog ([`TransportOptions::timeout`]): connecting, each answer, and each
//! chunk of a blob download must come within the timeout, and an upload must keep sending (a large
//! blob on a slow link is never cut off while it moves). [`Repo::open_blob_by`] adds a deadline past
//! which the download is dropped, its connection closed, and its reader fails. reqwest's own read
//! timeout is not used: it runs from the start of a request to its answer, so it would cut off an
//! upload that takes longer than the timeout.
//!
//! Credentials come from the docker config (`$DOCKER_CONFIG/config.json` or `~/.docker/config.json`)
//! or containers' `auth.json` (`$REGISTRY_AUTH_FILE`, `$XDG_RUNTIME_DIR/containers/auth.json`).

use std::future::Future;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};

use super::types::{sha256_digest, ACCEPTED_MANIFESTS};
use super::{RawManifest, Repo, TransportOptions};
use crate::object::verify::VerifyingReader;

pub struct Registry {
    rt: tokio::runtime::Runtime,
    client: Client,
    /// A client with no stored credentials, for blob reads from a registry that needs none. oci-client
    /// probes `GET /v2/` before every request of a registry whose stored credentials gave it no token,
    /// which is what an open registry does: one extra round trip per object fetched.
    open_client: Client,
    /// Whether the registry answered the auth probe without asking for credentials (set once known).
    open: OnceLock<bool>,
    reference: Reference,
    auth: RegistryAuth,
    /// How long a request may go without progress ([`TransportOptions::timeout`]).
    timeout: Duration,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Registry({})", self.reference)
    }
}

/// Why [`Registry::run`] gave up on a request.
#[derive(Debug, Clone, Copy)]
enum Stall {
    /// The caller's deadline passed.
    Deadline,
    /// No progress for the registry timeout.
    Idle,
}

impl Registry {
    pub fn open(reference: &str, opts: &TransportOptions) -> Result<Self> {
        let reference: Reference = reference.parse().with_context(|| format!("parsing reference {reference:?}"))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("wisp-registry")
            .enable_all()
            .build()
            .context("starting the registry runtime")?;
        let config = || ClientConfig {
            protocol: if opts.plain_http { ClientProtocol::Http } else { ClientProtocol::Https },
            use_monolithic_push: true,
            connect_timeout: Some(opts.timeout),
            ..Default::default()
        };
        let client = Client::new(config());
        let open_client = Client::new(config());
        let auth = docker_auth(reference.resolve_registry()).unwrap_or(RegistryAuth::Anonymous);
        Ok(Registry { rt, client, open_client, open: OnceLock::new(), reference, auth, timeout: opts.timeout })
    }

    fn by_digest(&self, digest: &str) -> Reference {
        Reference::with_digest(
            self.reference.registry().to_string(),
            self.reference.repository().to_string(),
            digest.to_string(),
        )
    }

    fn ensure_auth(&self) {
        self.rt.block_on(self.client.store_auth_if_needed(self.reference.resolve_registry(), &self.auth));
    }

    /// The client for blob reads: `open_client` once the registry is known to need no credentials
    /// (one auth probe per `Registry`), otherwise the authenticated client, whose tokens are cached.
    fn reader(&self, deadline: Option<Instant>) -> &Client {
        let open = match self.open.get() {
            Some(&open) => open,
            None => {
                self.ensure_auth();
                let probe = self.client.auth(&self.reference, &self.auth, RegistryOperation::Pull);
                match self.run(deadline, None, probe) {
                    // No token and no credentials: the registry let us in as we are.
                    Ok(Ok(token)) => *self.open.get_or_init(|| token.is_none() && self.auth == RegistryAuth::Anonymous),
                    // Not known yet (registry down?): the request itself reports the error.
                    _ => false,
                }
            }
        };
        if open {
            &self.open_client
        } else {
            &self.client
        }
    }

    /// Runs request `fut` on the runtime until it ends. It is dropped, which closes the connection of
    /// a request in flight, and this fails, when `deadline` passes or when it makes no progress for
    /// the registry timeout: progress is `sent` growing (the bytes of an upload); without `sent` the
    /// request must end within the timeout.
    fn run<F: Future>(&self, deadline: Option<Instant>, sent: Option<&AtomicU64>, fut: F) -> Result<F::Output> {
        let timeout = self.timeout;
        let out = self.rt.block_on(async move {
            tokio::pin!(fut);
            let mut seen = sent.map(|s| s.load(Ordering::Relaxed));
            let mut idle_from = tokio::time::Instant::now();
            loop {
                let mut until = idle_from + timeout;
                if let Some(d) = deadline {
                    until = until.min(d.into());
                }
                tokio::select! {
                    out = &mut fut => return Ok(out),
                    _ = tokio::time::sleep_until(until) => {}
                }
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Err(Stall::Deadline);
                }
                let now = sent.map(|s| s.load(Ordering::Relaxed));
                if now == seen {
                    return Err(Stall::Idle);
                }
                (seen, idle_from) = (now, tokio::time::Instant::now());
            }
        });
        out.map_err(|stall| anyhow!("{}", self.stalled(stall)))
    }

    /// The message for a request given up on.
    fn stalled(&self, stall: Stall) -> String {
        let registry = self.reference.resolve_registry();
        match stall {
            Stall::Deadline => format!("registry {registry} did not answer by the deadline"),
            Stall::Idle => format!(
                "registry {registry} timed out: no answer within {:?} (stalled or unreachable; see --registry-timeout)",
                self.timeout
            ),
        }
    }

    fn blob(&self, digest: &str, size: Option<u64>, deadline: Option<Instant>) -> Result<Box<dyn Read + Send>> {
        let r = self.by_digest(digest);
        let what = || format!("blob {digest} from {}", self.describe());
        let client = self.reader(deadline);
        let mut stream = self
            .run(deadline, None, client.pull_blob_stream(&r, digest))
            .with_context(what)?
            .map_err(|e| oci_error(&e))
            .with_context(what)?;
        let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<bytes::Bytes>>(16);
        let timeout = self.timeout;
        let (deadline_msg, idle_msg) = (self.stalled(Stall::Deadline), self.stalled(Stall::Idle));
        self.rt.spawn(async move {
            let pump = async {
                loop {
                    // Each chunk must come within the timeout. A reader that went away (its download
                    // cancelled) ends this task; dropping the stream closes the connection.
                    let chunk = tokio::select! {
                        _ = tx.closed() => return None,
                        c = tokio::time::timeout(timeout, stream.next()) => c,
                    };
                    let chunk = match chunk {
                        Err(_) => return Some(idle_msg),
                        Ok(None) => return None,
                        Ok(Some(c)) => c.map_err(|e| io::Error::other(error_chain(&e))),
                    };
                    let stop = chunk.is_err();
                    if tx.send(chunk).await.is_err() || stop {
                        return None;
                    }
                }
            };
            let stalled = match deadline {
                None => pump.await,
                Some(d) => tokio::time::timeout_at(d.into(), pump).await.unwrap_or(Some(deadline_msg)),
            };
            if let Some(msg) = stalled {
                // With the channel full, the reader finds the stream cut short instead (ChannelReader).
                let _ = tx.try_send(Err(io::Error::new(io::ErrorKind::TimedOut, msg)));
            }
        });
        let reader = ChannelReader { rx, cur: bytes::Bytes::new(), deadline, stalled: self.stalled(Stall::Deadline) };
        Ok(Box::new(VerifyingReader::new(reader, digest, size)))
    }

    /// Uploads a blob from a stream of chunks, as long as the chunks keep going out.
    fn push<S>(&self, digest: &str, size: u64, stream: S) -> Result<()>
    where
        S: futures_util::Stream<Item = oci_client::errors::Result<bytes::Bytes>> + Send + 'static,
    {
        let sent = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&sent);
        let stream = stream.inspect(move |c| {
            if let Ok(b) = c {
                counter.fetch_add(b.len() as u64, Ordering::Relaxed);
            }
        });
        self.run(None, Some(&sent), self.client.push_blob_stream(&self.reference, stream, digest, Some(size)))?
            .map_err(|e| oci_error(&e))?;
        Ok(())
    }
}

/// An oci-client error with its causes (a failed connect says why only in its sources), for messages.
fn oci_error(e: &OciDistributionError) -> anyhow::Error {
    anyhow!("{}", error_chain(e))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let t = c.to_string();
        if !s.contains(&t) {
            s = format!("{s}: {t}");
        }
        src = c.source();
    }
    s
}

impl Repo for Registry {
    fn describe(&self) -> String {
        format!("docker://{}", self.reference)
    }

    fn get_manifest(&self, reference: Option<&str>) -> Result<RawManifest> {
        let r = match reference {
            Some(d) => self.by_digest(d),
            None => self.reference.clone(),
        };
        let what = || format!("fetching manifest docker://{r}");
        let (bytes, digest) = self
            .run(None, None, self.client.pull_manifest_raw(&r, &self.auth, ACCEPTED_MANIFESTS))
            .with_context(what)?
            .map_err(|e| oci_error(&e))
            .with_context(what)?;
        let actual = sha256_digest(&bytes);
        let expected = reference.map(str::to_string).unwrap_or(digest);
        if actual != expected {
            bail!("manifest docker://{r}: its bytes hash to {actual}, not {expected}");
        }
        Ok(RawManifest { bytes: bytes.to_vec(), digest: actual })
    }

    fn open_blob(&self, digest: &str, size: Option<u64>) -> Result<Box<dyn Read + Send>> {
        self.blob(digest, size, None)
    }

    fn open_blob_by(&self, digest: &str, size: Option<u64>, deadline: Instant) -> Result<Box<dyn Read + Send>> {
        self.blob(digest, size, Some(deadline))
    }

    fn has_blob(&self, digest: &str) -> Result<bool> {
        let what = || format!("checking blob {digest} in {}", self.describe());
        self.run(None, None, self.reader(None).blob_exists(&self.by_digest(digest), digest))
            .with_context(what)?
            .map_err(|e| oci_error(&e))
            .with_context(what)
    }

    fn put_blob_file(&self, digest: &str, size: u64, path: &Path) -> Result<bool> {
        if self.has_blob(digest)? {
            return Ok(false);
        }
        self.push(digest, size, file_stream(path.to_path_buf()))
            .with_context(|| format!("uploading blob {digest} ({}) to {}", path.display(), self.describe()))?;
        Ok(true)
    }

    fn put_blob(&self, digest: &str, bytes: &[u8]) -> Result<()> {
        if self.has_blob(digest)? {
            return Ok(());
        }
        const CHUNK: usize = 1 << 20;
        let bytes = bytes::Bytes::copy_from_slice(bytes);
        let chunks: Vec<_> =
            (0..bytes.len()).step_by(CHUNK).map(|i| Ok(bytes.slice(i..bytes.len().min(i + CHUNK)))).collect();
        self.push(digest, bytes.len() as u64, futures_util::stream::iter(chunks))
            .with_context(|| format!("uploading blob {digest} to {}", self.describe()))
    }

    fn tag(&self) -> String {
        self.reference.tag().unwrap_or("latest").to_string()
    }

    fn put_manifest(&self, bytes: &[u8], media_type: &str, tag: Option<&str>) -> Result<String> {
        self.ensure_auth();
        let digest = sha256_digest(bytes);
        let target = match tag {
            Some(t) => Reference::with_tag(
                self.reference.registry().to_string(),
                self.reference.repository().to_string(),
                t.to_string(),
            ),
            None => self.by_digest(&digest),
        };
        let what = || format!("pushing manifest {digest} to docker://{target}");
        self.run(None, None, self.client.push_manifest_raw(&target, bytes.to_vec(), media_type.parse()?))
            .with_context(what)?
            .map_err(|e| oci_error(&e))
            .with_context(what)?;
        Ok(digest)
    }
}

/// A synchronous reader over the chunks a runtime task sends; dropping it cancels the task.
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<io::Result<bytes::Bytes>>,
    cur: bytes::Bytes,
    /// The download's deadline: a channel that ends after it was cut short, not at the blob's end.
    deadline: Option<Instant>,
    /// The message for that.
    stalled: String,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.cur = b,
                Some(Err(e)) => return Err(e),
                None if self.deadline.is_some_and(|d| Instant::now() >= d) => {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, self.stalled.clone()));
                }
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur.split_to(n));
        Ok(n)
    }
}

fn file_stream(
    path: PathBuf,
) -> impl futures_util::Stream<Item = oci_client::errors::Result<bytes::Bytes>> + Send + 'static {
    use tokio::io::AsyncReadExt;
    futures_util::stream::unfold(None::<tokio::fs::File>, move |f| {
        let path = path.clone();
        async move {
            let mut f = match f {
                Some(f) => f,
                None => match tokio::fs::File::open(&path).await {
                    Ok(f) => f,
                    Err(e) => return Some((Err(e.into()), None)),
                },
            };
            let mut buf = vec![0u8; 1 << 20];
            match f.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some((Ok(bytes::Bytes::from(buf)), Some(f)))
                }
                Err(e) => Some((Err(e.into()), None)),
            }
        }
    })
}

/// Basic credentials for `registry` from the docker or containers auth files, if any.
fn docker_auth(registry: &str) -> Option<RegistryAuth> {
    use base64::Engine as _;
    let mut files = Vec::new();
    if let Some(p) = std::env::var_os("REGISTRY_AUTH_FILE") {
        files.push(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("XDG_RUNTIME_DIR") {
        files.push(PathBuf::from(p).join("containers/auth.json"));
    }
    match std::env::var_os("DOCKER_CONFIG") {
        Some(d) => files.push(PathBuf::from(d).join("config.json")),
        None => {
            if let Some(h) = std::env::var_os("HOME") {
                files.push(PathBuf::from(h).join(".docker/config.json"));
            }
        }
    }
    let keys = [registry.to_string(), format!("https://{registry}"), format!("http://{registry}")];
    for f in files {
        let Ok(bytes) = std::fs::read(&f) else { continue };
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) else { continue };
        for k in &keys {
            let Some(auth) = v["auths"][k.as_str()]["auth"].as_str() else { continue };
            let decoded = base64::engine::general_purpose::STANDARD.decode(auth).ok()?;
            let text = String::from_utf8(decoded).ok()?;
            let (user, pass) = text.split_once(':')?;
            return Some(RegistryAuth::Basic(user.to_string(), pass.to_string()));
        }
    }
    None
}
