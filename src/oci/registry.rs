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
//! Where the registry is reached comes from the node's host configuration in containerd's format
//! ([`hosts`]): mirrors first, in order, for what each may do (`pull`, `resolve`), then the upstream,
//! which alone takes uploads. Every blob and manifest is checked against its digest whatever host
//! served it. Private CAs come from the same configuration (`ca.crt`, `ca = ...`).
//!
//! Credentials come from containers' `auth.json` (`$REGISTRY_AUTH_FILE`,
//! `$XDG_RUNTIME_DIR/containers/auth.json`) or the docker config (`$DOCKER_CONFIG/config.json` or
//! `~/.docker/config.json`): `credHelpers`/`credsStore` helpers, then `auths`. oci-client answers the
//! registry's challenge with them (bearer token or basic). They are looked up per host and never sent
//! to a plain-HTTP host. Registry redirects (blob GETs answered with a redirect to object storage) are
//! followed by the HTTP client.

use std::future::Future;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures_util::StreamExt;
use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};

use super::hosts::{self, Host};
use super::types::{sha256_digest, ACCEPTED_MANIFESTS};
use super::{RawManifest, Repo, TransportOptions};
use crate::object::verify::VerifyingReader;

pub struct Registry {
    rt: tokio::runtime::Runtime,
    /// Where content comes from: the mirrors of the node's host configuration in order, then the
    /// upstream (always last).
    endpoints: Vec<Endpoint>,
    reference: Reference,
    /// How long a request may go without progress ([`TransportOptions::timeout`]).
    timeout: Duration,
}

/// One host of a registry (a mirror or the upstream), with its clients and credentials.
struct Endpoint {
    host: Host,
    client: Client,
    /// A client with no stored credentials, for blob reads from a registry that needs none. oci-client
    /// probes `GET /v2/` before every request of a registry whose stored credentials gave it no token,
    /// which is what an open registry does: one extra round trip per object fetched.
    open_client: Client,
    /// Whether the registry answered the auth probe without asking for credentials (set once known).
    open: OnceLock<bool>,
    /// The image's reference, pointed at this host.
    reference: Reference,
    auth: RegistryAuth,
    /// Where the credentials came from, for errors.
    auth_source: Option<String>,
}

impl Endpoint {
    /// `reference` (the image's registry and repository) pointed at this host.
    fn point(&self, mut r: Reference) -> Reference {
        if self.host.host != r.registry() {
            r.set_mirror_registry(self.host.host.clone());
        }
        r
    }

    fn name(&self) -> String {
        let scheme = if self.host.http { "http" } else { "https" };
        let role = if self.host.mirror { "mirror" } else { "registry" };
        format!("{role} {scheme}://{}", self.host.host)
    }
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
    /// The registry of `reference`, reached through the hosts the node's host configuration
    /// ([`hosts`]) gives for it.
    pub fn open(reference: &str, opts: &TransportOptions) -> Result<Self> {
        let reference: Reference = reference.parse().with_context(|| format!("parsing reference {reference:?}"))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("wisp-registry")
            .enable_all()
            .build()
            .context("starting the registry runtime")?;
        let hosts = hosts::resolve(&hosts::config_dir(), reference.registry(), opts.plain_http)?;
        let mut endpoints = Vec::new();
        for host in hosts {
            let mut roots = Vec::new();
            for p in &host.ca {
                let data = std::fs::read(p).with_context(|| format!("reading CA certificate {}", p.display()))?;
                roots.push(Certificate { encoding: CertificateEncoding::Pem, data });
            }
            let config = || ClientConfig {
                protocol: if host.http { ClientProtocol::Http } else { ClientProtocol::Https },
                use_monolithic_push: true,
                connect_timeout: Some(opts.timeout),
                extra_root_certificates: roots.clone(),
                accept_invalid_certificates: host.skip_verify,
                ..Default::default()
            };
            let (client, open_client) = (Client::new(config()), Client::new(config()));
            let key = if host.mirror { host.host.clone() } else { reference.registry().to_owned() };
            let (auth, auth_source) = match docker_auth(&key)? {
                Some((_, source)) if host.http => {
                    tracing::warn!(host = %host.host, %source, "not sending credentials to a plain-HTTP registry");
                    (RegistryAuth::Anonymous, None)
                }
                Some((auth, source)) => (auth, Some(source)),
                None => (RegistryAuth::Anonymous, None),
            };
            let mut e = Endpoint {
                host,
                client,
                open_client,
                open: OnceLock::new(),
                reference: reference.clone(),
                auth,
                auth_source,
            };
            e.reference = e.point(reference.clone());
            endpoints.push(e);
        }
        Ok(Registry { rt, endpoints, reference, timeout: opts.timeout })
    }

    /// The upstream (uploads, and what the image names).
    fn upstream(&self) -> &Endpoint {
        self.endpoints.last().expect("the upstream is always there")
    }

    fn by_digest(&self, e: &Endpoint, digest: &str) -> Reference {
        e.point(Reference::with_digest(
            self.reference.registry().to_string(),
            self.reference.repository().to_string(),
            digest.to_string(),
        ))
    }

    fn ensure_auth(&self, e: &Endpoint) {
        self.rt.block_on(e.client.store_auth_if_needed(e.reference.resolve_registry(), &e.auth));
    }

    /// The client for blob reads from `e`: its `open_client` once the host is known to need no
    /// credentials (one auth probe per host), otherwise the authenticated client, whose tokens are cached.
    fn reader<'a>(&self, e: &'a Endpoint, deadline: Option<Instant>) -> &'a Client {
        let open = match e.open.get() {
            Some(&open) => open,
            None => {
                self.ensure_auth(e);
                let probe = e.client.auth(&e.reference, &e.auth, RegistryOperation::Pull);
                match self.run(e, deadline, None, probe) {
                    // No token and no credentials: the registry let us in as we are.
                    Ok(Ok(token)) => *e.open.get_or_init(|| token.is_none() && e.auth == RegistryAuth::Anonymous),
                    // Not known yet (registry down?): the request itself reports the error.
                    _ => false,
                }
            }
        };
        if open {
            &e.open_client
        } else {
            &e.client
        }
    }

    /// Runs request `fut` on the runtime until it ends. It is dropped, which closes the connection of
    /// a request in flight, and this fails, when `deadline` passes or when it makes no progress for
    /// the registry timeout: progress is `sent` growing (the bytes of an upload); without `sent` the
    /// request must end within the timeout.
    fn run<F: Future>(
        &self,
        e: &Endpoint,
        deadline: Option<Instant>,
        sent: Option<&AtomicU64>,
        fut: F,
    ) -> Result<F::Output> {
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
        out.map_err(|stall| anyhow!("{}", self.stalled(e, stall)))
    }

    /// The message for a request given up on.
    fn stalled(&self, e: &Endpoint, stall: Stall) -> String {
        let registry = e.name();
        match stall {
            Stall::Deadline => format!("{registry} did not answer by the deadline"),
            Stall::Idle => format!(
                "{registry} timed out: no answer within {:?} (stalled or unreachable; see --registry-timeout)",
                self.timeout
            ),
        }
    }

    /// A verifying reader of blob `digest`, from the first host that serves it (mirrors in order, then
    /// the upstream). Whatever host serves it, its bytes are checked against `digest`.
    fn blob(&self, digest: &str, size: Option<u64>, deadline: Option<Instant>) -> Result<Box<dyn Read + Send>> {
        let mut errors = Vec::new();
        for e in self.endpoints.iter().filter(|e| e.host.pull) {
            match self.blob_from(e, digest, size, deadline) {
                Ok(r) => return Ok(r),
                Err(err) if e.host.mirror => {
                    tracing::debug!(mirror = %e.host.host, digest, error = %format!("{err:#}"), "mirror does not serve blob; next");
                    errors.push(format!("{err:#}"));
                }
                Err(err) if errors.is_empty() => return Err(err),
                Err(err) => return Err(err.context(format!("mirrors before it failed too: {}", errors.join("; ")))),
            }
        }
        bail!("blob {digest}: no host of {} serves blobs (capabilities)", self.describe())
    }

    fn blob_from(
        &self,
        e: &Endpoint,
        digest: &str,
        size: Option<u64>,
        deadline: Option<Instant>,
    ) -> Result<Box<dyn Read + Send>> {
        let r = self.by_digest(e, digest);
        let what = || format!("blob {digest} from {} ({})", self.describe(), e.name());
        let client = self.reader(e, deadline);
        let mut stream = self
            .run(e, deadline, None, client.pull_blob_stream(&r, digest))
            .with_context(what)?
            .map_err(|err| self.oci_error(e, &err))
            .with_context(what)?;
        let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<bytes::Bytes>>(16);
        let timeout = self.timeout;
        let (deadline_msg, idle_msg) = (self.stalled(e, Stall::Deadline), self.stalled(e, Stall::Idle));
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
        let reader =
            ChannelReader { rx, cur: bytes::Bytes::new(), deadline, stalled: self.stalled(e, Stall::Deadline) };
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
        let e = self.upstream();
        self.run(e, None, Some(&sent), e.client.push_blob_stream(&e.reference, stream, digest, Some(size)))?
            .map_err(|err| self.oci_error(e, &err))?;
        Ok(())
    }

    /// An oci-client error from host `e`, with its causes, and what to do when it is about trust or
    /// credentials.
    fn oci_error(&self, e: &Endpoint, err: &OciDistributionError) -> anyhow::Error {
        let chain = error_chain(err);
        let lower = chain.to_lowercase();
        let hint = if lower.contains("certificate") {
            format!(
                " ({} presents a certificate this node does not trust: put its CA in {}/{}/ca.crt, or a `ca` in that directory's hosts.toml)",
                e.name(),
                hosts::config_dir().display(),
                if e.host.mirror { &e.host.host } else { self.reference.registry() }
            )
        } else if matches!(
            err,
            OciDistributionError::UnauthorizedError { .. } | OciDistributionError::AuthenticationFailure(_)
        ) || lower.contains("unauthorized")
        {
            match &e.auth_source {
                Some(src) => format!(" ({} refused the credentials from {src})", e.name()),
                None if e.host.http => format!(" ({} wants credentials; they are never sent over plain HTTP)", e.name()),
                None => format!(
                    " ({} wants credentials and none are configured for it: docker login, or $DOCKER_CONFIG/config.json)",
                    e.name()
                ),
            }
        } else {
            String::new()
        };
        anyhow!("{chain}{hint}")
    }
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

    /// A manifest by tag (hosts that `resolve`) or digest (hosts that `pull`), from the first host that
    /// answers; its bytes are checked against the digest asked for or the one the host gave.
    fn get_manifest(&self, reference: Option<&str>) -> Result<RawManifest> {
        let by_digest = reference.is_some() || self.reference.digest().is_some();
        let mut errors = Vec::new();
        for e in self.endpoints.iter().filter(|e| if by_digest { e.host.pull } else { e.host.resolve }) {
            let r = match reference {
                Some(d) => self.by_digest(e, d),
                None => e.reference.clone(),
            };
            let what = || format!("fetching manifest docker://{} from {}", self.reference, e.name());
            let got = self
                .run(e, None, None, e.client.pull_manifest_raw(&r, &e.auth, ACCEPTED_MANIFESTS))
                .with_context(what)
                .and_then(|x| x.map_err(|err| self.oci_error(e, &err)).with_context(what));
            let (bytes, digest) = match got {
                Ok(x) => x,
                Err(err) if e.host.mirror => {
                    tracing::debug!(mirror = %e.host.host, error = %format!("{err:#}"), "mirror does not serve the manifest; next");
                    errors.push(format!("{err:#}"));
                    continue;
                }
                Err(err) if errors.is_empty() => return Err(err),
                Err(err) => return Err(err.context(format!("mirrors before it failed too: {}", errors.join("; ")))),
            };
            let actual = sha256_digest(&bytes);
            let expected = reference.map(str::to_string).unwrap_or(digest);
            if actual != expected {
                bail!("manifest docker://{r} from {}: its bytes hash to {actual}, not {expected}", e.name());
            }
            return Ok(RawManifest { bytes: bytes.to_vec(), digest: actual });
        }
        bail!("manifest docker://{}: no host resolves it (capabilities)", self.reference)
    }

    fn open_blob(&self, digest: &str, size: Option<u64>) -> Result<Box<dyn Read + Send>> {
        self.blob(digest, size, None)
    }

    fn open_blob_by(&self, digest: &str, size: Option<u64>, deadline: Instant) -> Result<Box<dyn Read + Send>> {
        self.blob(digest, size, Some(deadline))
    }

    fn has_blob(&self, digest: &str) -> Result<bool> {
        let what = || format!("checking blob {digest} in {}", self.describe());
        let e = self.upstream();
        self.run(e, None, None, self.reader(e, None).blob_exists(&self.by_digest(e, digest), digest))
            .with_context(what)?
            .map_err(|err| self.oci_error(e, &err))
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
        let e = self.upstream();
        self.ensure_auth(e);
        let digest = sha256_digest(bytes);
        let target = match tag {
            Some(t) => Reference::with_tag(
                self.reference.registry().to_string(),
                self.reference.repository().to_string(),
                t.to_string(),
            ),
            None => self.by_digest(e, &digest),
        };
        let target = e.point(target);
        let what = || format!("pushing manifest {digest} to docker://{target}");
        self.run(e, None, None, e.client.push_manifest_raw(&target, bytes.to_vec(), media_type.parse()?))
            .with_context(what)?
            .map_err(|err| self.oci_error(e, &err))
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

/// Credentials for `registry` (as named in references, with its port) and where they came from, from
/// the first auth file that has any for it: `$REGISTRY_AUTH_FILE`, `$XDG_RUNTIME_DIR/containers/auth.json`,
/// then the docker config (`$DOCKER_CONFIG/config.json` or `~/.docker/config.json`). In a file,
/// `credHelpers.REGISTRY`, else `credsStore`, names a `docker-credential-NAME` helper asked first (as
/// docker does); then `auths.REGISTRY.auth` (base64 `user:password`). A file that cannot be parsed, or
/// a helper that fails for another reason than having no credentials, is an error naming it.
fn docker_auth(registry: &str) -> Result<Option<(RegistryAuth, String)>> {
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
    let mut keys = vec![registry.to_string(), format!("https://{registry}"), format!("http://{registry}")];
    if registry == "docker.io" {
        keys.push("https://index.docker.io/v1/".into());
    }
    for f in files {
        let bytes = match std::fs::read(&f) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading credentials file {}", f.display())),
        };
        let v: serde_json::Value =
            serde_json::from_slice(&bytes).with_context(|| format!("parsing credentials file {}", f.display()))?;
        let helper = keys.iter().find_map(|k| v["credHelpers"][k.as_str()].as_str()).or(v["credsStore"].as_str());
        if let Some(helper) = helper.filter(|h| !h.is_empty()) {
            if let Some(auth) = credential_helper(helper, registry)? {
                return Ok(Some((auth, format!("docker-credential-{helper} (named in {})", f.display()))));
            }
        }
        for k in &keys {
            let Some(auth) = v["auths"][k.as_str()]["auth"].as_str() else { continue };
            let bad = || format!("credentials file {}: auths.{k}.auth is not base64 of user:password", f.display());
            let decoded = base64::engine::general_purpose::STANDARD.decode(auth).with_context(bad)?;
            let text = String::from_utf8(decoded).ok().with_context(bad)?;
            let (user, pass) = text.split_once(':').with_context(bad)?;
            return Ok(Some((
                RegistryAuth::Basic(user.to_string(), pass.to_string()),
                format!("{} (auths.{k}, user {user})", f.display()),
            )));
        }
    }
    Ok(None)
}

/// Asks `docker-credential-HELPER get` for `registry`'s credentials (the docker credential helper
/// protocol: the server on stdin, `{"Username", "Secret"}` on stdout). None when it has none.
fn credential_helper(helper: &str, registry: &str) -> Result<Option<RegistryAuth>> {
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    let prog = format!("docker-credential-{helper}");
    let mut child = Command::new(&prog)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running credential helper {prog}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(registry.as_bytes());
    }
    let out = child.wait_with_output().with_context(|| format!("running credential helper {prog}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        if stdout.contains("credentials not found") {
            return Ok(None);
        }
        bail!(
            "credential helper {prog} failed for {registry} ({}): {}{}",
            out.status,
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let v: serde_json::Value = serde_json::from_str(&stdout)
        .with_context(|| format!("credential helper {prog}: its answer for {registry} is not JSON"))?;
    let (Some(user), Some(secret)) = (v["Username"].as_str(), v["Secret"].as_str()) else {
        bail!("credential helper {prog}: its answer for {registry} has no Username/Secret");
    };
    if user == "<token>" {
        bail!("credential helper {prog}: identity tokens (Username <token>) are not supported for {registry}");
    }
    Ok(Some(RegistryAuth::Basic(user.to_owned(), secret.to_owned())))
}
