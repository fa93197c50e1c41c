//! `wisp snapshotter`: a containerd proxy snapshotter (the Snapshots gRPC API on a unix socket, served
//! through the containerd-snapshots crate). Ordinary images get overlayfs snapshots laid out as
//! containerd's own overlayfs snapshotter lays them ([`store`]); wisp index images are mounted lazily
//! by the wisp daemon ([`wisp`]). Metadata is durable ([`meta`]); see docs/containerd.md.

pub mod containerd;
pub mod filter;
pub mod meta;
pub mod store;
pub mod wisp;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use containerd_snapshots::api::types::Mount;
use containerd_snapshots::{tonic, Info, Snapshotter, Usage};
use futures_util::StreamExt;
use tonic::Status;

use meta::Kind;
use store::{InfoOut, Store};

/// An API error: a gRPC code (containerd maps NotFound, AlreadyExists, FailedPrecondition to its own
/// errors) and a message.
#[derive(Debug)]
pub struct Error {
    code: tonic::Code,
    message: String,
}

impl Error {
    fn new(code: tonic::Code, message: impl Into<String>) -> Self {
        Error { code, message: message.into() }
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        Error::new(tonic::Code::NotFound, m)
    }
    pub fn already_exists(m: impl Into<String>) -> Self {
        Error::new(tonic::Code::AlreadyExists, m)
    }
    pub fn failed_precondition(m: impl Into<String>) -> Self {
        Error::new(tonic::Code::FailedPrecondition, m)
    }
    pub fn invalid_argument(m: impl Into<String>) -> Self {
        Error::new(tonic::Code::InvalidArgument, m)
    }
    pub fn internal(m: impl Into<String>) -> Self {
        Error::new(tonic::Code::Internal, m)
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        Status::new(e.code, e.message)
    }
}

/// `wisp snapshotter` settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub root: PathBuf,
    pub address: PathBuf,
    /// The wisp daemon's state directory (its control socket).
    pub daemon_state: PathBuf,
    /// containerd's socket, to look up where a wisp layer came from.
    pub containerd: Option<PathBuf>,
    /// Fetch objects over plain HTTP (a local registry).
    pub plain_http: bool,
}

/// The gRPC face of [`Store`]: each call runs on a blocking thread (file system work, daemon calls).
#[derive(Debug, Clone)]
struct Service(Arc<Store>);

fn to_info(i: InfoOut) -> Info {
    Info {
        kind: match i.record.kind {
            Kind::View => containerd_snapshots::Kind::View,
            Kind::Active => containerd_snapshots::Kind::Active,
            Kind::Committed => containerd_snapshots::Kind::Committed,
        },
        name: i.name,
        parent: i.record.parent,
        labels: i.record.labels.into_iter().collect(),
        created_at: i.record.created,
        updated_at: i.record.updated,
    }
}

fn sorted(labels: HashMap<String, String>) -> BTreeMap<String, String> {
    labels.into_iter().collect()
}

impl Service {
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let store = Arc::clone(&self.0);
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| Error::internal(format!("snapshotter task failed: {e}")))?
    }
}

type InfoStream = futures_util::stream::Iter<std::vec::IntoIter<Result<Info, Error>>>;

#[tonic::async_trait]
impl Snapshotter for Service {
    type Error = Error;

    async fn stat(&self, key: String) -> Result<Info, Error> {
        self.blocking(move |s| s.stat(&key)).await.map(to_info)
    }

    async fn update(&self, info: Info, fieldpaths: Option<Vec<String>>) -> Result<Info, Error> {
        let paths = fieldpaths.unwrap_or_default();
        self.blocking(move |s| s.update(&info.name, sorted(info.labels), &paths)).await.map(to_info)
    }

    async fn usage(&self, key: String) -> Result<Usage, Error> {
        let (size, inodes) = self.blocking(move |s| s.usage(&key)).await?;
        Ok(Usage { inodes, size })
    }

    async fn mounts(&self, key: String) -> Result<Vec<Mount>, Error> {
        self.blocking(move |s| s.mounts(&key)).await
    }

    async fn prepare(&self, key: String, parent: String, labels: HashMap<String, String>) -> Result<Vec<Mount>, Error> {
        self.blocking(move |s| s.create(Kind::Active, &key, &parent, sorted(labels))).await
    }

    async fn view(&self, key: String, parent: String, labels: HashMap<String, String>) -> Result<Vec<Mount>, Error> {
        self.blocking(move |s| s.create(Kind::View, &key, &parent, sorted(labels))).await
    }

    async fn commit(&self, name: String, key: String, labels: HashMap<String, String>) -> Result<(), Error> {
        self.blocking(move |s| s.commit(&name, &key, sorted(labels))).await
    }

    async fn remove(&self, key: String) -> Result<(), Error> {
        self.blocking(move |s| s.remove(&key)).await
    }

    async fn clear(&self) -> Result<(), Error> {
        self.blocking(|s| s.cleanup()).await
    }

    type InfoStream = InfoStream;

    async fn list(&self, _snapshotter: String, filters: Vec<String>) -> Result<InfoStream, Error> {
        let all = self.blocking(move |s| s.walk(&filters)).await?;
        Ok(futures_util::stream::iter(all.into_iter().map(|i| Ok(to_info(i))).collect::<Vec<_>>()))
    }
}

/// The largest gRPC request accepted (the Snapshots API's requests are a key, a parent and labels;
/// containerd bounds each label to 4 KiB).
pub const MAX_REQUEST_BYTES: usize = 1 << 20;

/// Listens on `address` with mode 0600 from the start: the socket is bound in a fresh 0700 directory
/// beside it, set to 0600, and renamed into place, so no one but root can ever connect to it. A
/// missing parent directory is made 0700.
fn listen_private(address: &Path) -> Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let parent = address.parent().with_context(|| format!("{}: no parent directory", address.display()))?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(parent)
        .with_context(|| format!("creating {}", parent.display()))?;
    let tmp = parent.join(format!(".wisp-snapshotter-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::DirBuilder::new().mode(0o700).create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let result = (|| {
        let sock = tmp.join("s");
        let listener =
            tokio::net::UnixListener::bind(&sock).with_context(|| format!("listening on {}", sock.display()))?;
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("chmod 0600 {}", sock.display()))?;
        std::fs::rename(&sock, address)
            .with_context(|| format!("moving the socket {} to {}", sock.display(), address.display()))?;
        Ok(listener)
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

/// Whether the peer of a connection is root (`SO_PEERCRED`).
fn peer_is_root(s: &tokio::net::UnixStream) -> bool {
    match s.peer_cred() {
        Ok(c) if c.uid() == 0 => true,
        Ok(c) => {
            tracing::warn!(uid = c.uid(), pid = ?c.pid(), "refused a connection from a process that is not root");
            false
        }
        Err(e) => {
            tracing::warn!(error = %e, "refused a connection whose peer is unknown");
            false
        }
    }
}

/// Serves the Snapshots API on `cfg.address` until SIGTERM or SIGINT, to root only.
pub fn run(cfg: &Config) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    // The root without symbolic links: the daemon opens the index directories under it so.
    std::fs::create_dir_all(&cfg.root).with_context(|| format!("creating {}", cfg.root.display()))?;
    let root = std::fs::canonicalize(&cfg.root).with_context(|| format!("resolving {}", cfg.root.display()))?;
    let ctd = cfg.containerd.as_ref().map(|a| containerd::ContainerdClient::new(a, rt.handle().clone()));
    let w = wisp::Wisp::new(&root, &cfg.daemon_state, cfg.plain_http, ctd);
    let store = Arc::new(Store::open(&root, w).with_context(|| format!("opening {}", root.display()))?);
    rt.block_on(async {
        let listener = listen_private(&cfg.address)?;
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener)
            .filter(|c| std::future::ready(c.as_ref().map_or(true, peer_is_root)));
        tracing::info!(address = %cfg.address.display(), root = %root.display(), "wisp snapshotter serving");
        let shutdown = async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("installing a SIGTERM handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        let service =
            containerd_snapshots::server(Arc::new(Service(store))).max_decoding_message_size(MAX_REQUEST_BYTES);
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
            .context("serving the Snapshots API")
    })
}
