//! Registry repositories through the `oci-client` crate (OCI distribution spec), driven from
//! synchronous code by a small tokio runtime owned by the [`Registry`]. Blob downloads stream through
//! a bounded channel into a verifying reader; uploads stream from files (monolithic `PUT`, size known).
//!
//! A stalled registry (a stopped process, a dead link) fails requests instead of hanging them: the
//! HTTP client has a connect timeout and a read timeout ([`TransportOptions::timeout`], which applies
//! to every read of an answer, headers or body), and [`Repo::open_blob_by`] takes a deadline past which
//! the download is dropped, its connection closed, and its reader fails.
//! Credentials come from the docker config (`$DOCKER_CONFIG/config.json` or `~/.docker/config.json`)
//! or containers' `auth.json` (`$REGISTRY_AUTH_FILE`, `$XDG_RUNTIME_DIR/containers/auth.json`).

use std::future::Future;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};

use super::types::{sha256_digest, ACCEPTED_MANIFESTS};
use super::verify::VerifyingReader;
use super::{RawManifest, Repo, TransportOptions};

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
    /// The client's connect and read timeout (for messages).
    timeout: Duration,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Registry({})", self.reference)
    }
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
            read_timeout: Some(opts.timeout),
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
                match self.run(deadline, probe) {
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

    /// Runs `fut` on the runtime until it ends or `deadline` passes; then it is dropped, which closes
    /// the connection of a request in flight.
    fn run<F: Future>(&self, deadline: Option<Instant>, fut: F) -> Result<F::Output> {
        match deadline {
            None => Ok(self.rt.block_on(fut)),
            Some(d) => self
                .rt
                // The timer is made inside the runtime (it needs its time driver).
                .block_on(async move { tokio::time::timeout_at(d.into(), fut).await })
                .map_err(|_| anyhow!("{} did not answer by the deadline", self.host())),
        }
    }

    /// The registry's host (and port), for messages.
    fn host(&self) -> String {
        format!("registry {}", self.reference.resolve_registry())
    }

    fn blob(&self, digest: &str, size: Option<u64>, deadline: Option<Instant>) -> Result<Box<dyn Read + Send>> {
        let r = self.by_digest(digest);
        let what = || format!("blob {digest} from {}", self.describe());
        let client = self.reader(deadline);
        let mut stream = self
            .run(deadline, client.pull_blob_stream(&r, digest))
            .with_context(what)?
            .map_err(|e| oci_error(&e, self.timeout))
            .with_context(what)?;
        let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<bytes::Bytes>>(16);
        let timeout = self.timeout;
        let host = self.host();
        self.rt.spawn(async move {
            let pump = async {
                loop {
                    // A reader that went away (its download cancelled) ends this task, and dropping the
                    // stream closes the connection.
                    let chunk = tokio::select! {
                        _ = tx.closed() => return,
                        c = stream.next() => c,
                    };
                    let Some(chunk) = chunk else { return };
                    let chunk = chunk.map_err(|e| io::Error::other(error_chain(&e, timeout)));
                    let stop = chunk.is_err();
                    if tx.send(chunk).await.is_err() || stop {
                        return;
                    }
                }
            };
            let ended = match deadline {
                None => {
                    pump.await;
                    true
                }
                Some(d) => tokio::time::timeout_at(d.into(), pump).await.is_ok(),
            };
            if !ended {
                let e = io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{host} did not send the whole blob by the deadline"),
                );
                let _ = tx.try_send(Err(e));
            }
        });
        let reader = ChannelReader { rx, cur: bytes::Bytes::new(), deadline, host: self.host() };
        Ok(Box::new(VerifyingReader::new(reader, digest, size)))
    }
}

/// An oci-client error with its causes (a timed out read says so only in its source), for messages.
fn oci_error(e: &oci_client::errors::OciDistributionError, timeout: Duration) -> anyhow::Error {
    anyhow!("{}", error_chain(e, timeout))
}

fn error_chain(e: &dyn std::error::Error, timeout: Duration) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    let mut timed_out = false;
    while let Some(c) = src {
        let t = c.to_string();
        timed_out |= c.downcast_ref::<io::Error>().is_some_and(|e| e.kind() == io::ErrorKind::TimedOut)
            || t.contains("timed out");
        if !s.contains(&t) {
            s = format!("{s}: {t}");
        }
        src = c.source();
    }
    if timed_out {
        s = format!("{s} (no answer within {timeout:?}: the registry is stalled or unreachable)");
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
        let (bytes, digest) = self
            .rt
            .block_on(self.client.pull_manifest_raw(&r, &self.auth, ACCEPTED_MANIFESTS))
            .map_err(|e| oci_error(&e, self.timeout))
            .with_context(|| format!("fetching manifest docker://{r}"))?;
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
        self.rt
            .block_on(self.reader(None).blob_exists(&self.by_digest(digest), digest))
            .map_err(|e| oci_error(&e, self.timeout))
            .with_context(|| format!("checking blob {digest} in {}", self.describe()))
    }

    fn put_blob_file(&self, digest: &str, size: u64, path: &Path) -> Result<bool> {
        if self.has_blob(digest)? {
            return Ok(false);
        }
        let path = path.to_path_buf();
        let stream = file_stream(path.clone());
        self.rt
            .block_on(self.client.push_blob_stream(&self.reference, stream, digest, Some(size)))
            .map_err(|e| oci_error(&e, self.timeout))
            .with_context(|| format!("uploading blob {digest} ({}) to {}", path.display(), self.describe()))?;
        Ok(true)
    }

    fn put_blob(&self, digest: &str, bytes: &[u8]) -> Result<()> {
        if self.has_blob(digest)? {
            return Ok(());
        }
        self.rt
            .block_on(self.client.push_blob(&self.reference, bytes.to_vec(), digest))
            .map_err(|e| oci_error(&e, self.timeout))
            .with_context(|| format!("uploading blob {digest} to {}", self.describe()))?;
        Ok(())
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
        self.rt
            .block_on(self.client.push_manifest_raw(&target, bytes.to_vec(), media_type.parse()?))
            .map_err(|e| oci_error(&e, self.timeout))
            .with_context(|| format!("pushing manifest {digest} to docker://{target}"))?;
        Ok(digest)
    }
}

/// A synchronous reader over the chunks a runtime task sends; dropping it cancels the task.
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<io::Result<bytes::Bytes>>,
    cur: bytes::Bytes,
    /// The download's deadline: a channel that ends after it was cut short, not at the blob's end.
    deadline: Option<Instant>,
    host: String,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.cur = b,
                Some(Err(e)) => return Err(e),
                None if self.deadline.is_some_and(|d| Instant::now() >= d) => {
                    let msg = format!("{} did not send the whole blob by the deadline", self.host);
                    return Err(io::Error::new(io::ErrorKind::TimedOut, msg));
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
