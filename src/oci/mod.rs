//! Image transports and documents: references like skopeo's (`oci:DIR[:TAG]`,
//! `docker-archive:FILE`, `docker://HOST/REPO:TAG`), one [`Repo`] interface over all of them
//! ([`layout`], [`registry`], [`archive`]), and the OCI manifest, index and config documents
//! ([`types`]). What wisp stores in them, its index image, is [`crate::index`].

pub mod archive;
pub mod hosts;
pub mod layout;
pub mod registry;
pub mod types;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use types::{parse_manifest, Descriptor, Fetched, ImageManifest, Platform};

/// Where an image lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRef {
    /// An OCI image layout directory and an optional tag (`org.opencontainers.image.ref.name`).
    Oci { dir: PathBuf, tag: Option<String> },
    /// A `docker save` tarball.
    DockerArchive { file: PathBuf },
    /// A registry reference `HOST/REPO[:TAG|@DIGEST]`.
    Docker { reference: String },
}

impl std::str::FromStr for ImageRef {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        if let Some(rest) = s.strip_prefix("oci:") {
            // A tag is what follows the last ':' when it contains no '/'.
            let (dir, tag) = match rest.rsplit_once(':') {
                Some((d, t)) if !t.contains('/') && !d.is_empty() => (d, Some(t.to_string())),
                _ => (rest, None),
            };
            if dir.is_empty() {
                bail!("{s}: oci: needs a directory");
            }
            return Ok(ImageRef::Oci { dir: dir.into(), tag: tag.filter(|t| !t.is_empty()) });
        }
        if let Some(rest) = s.strip_prefix("docker-archive:") {
            if rest.is_empty() {
                bail!("{s}: docker-archive: needs a file");
            }
            return Ok(ImageRef::DockerArchive { file: rest.into() });
        }
        if let Some(rest) = s.strip_prefix("docker://") {
            if rest.is_empty() {
                bail!("{s}: docker:// needs HOST/REPO:TAG");
            }
            return Ok(ImageRef::Docker { reference: rest.to_string() });
        }
        bail!("{s}: unknown transport (use oci:DIR[:TAG], docker-archive:FILE or docker://HOST/REPO:TAG)")
    }
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ImageRef::Oci { dir, tag: Some(t) } => write!(f, "oci:{}:{t}", dir.display()),
            ImageRef::Oci { dir, tag: None } => write!(f, "oci:{}", dir.display()),
            ImageRef::DockerArchive { file } => write!(f, "docker-archive:{}", file.display()),
            ImageRef::Docker { reference } => write!(f, "docker://{reference}"),
        }
    }
}

/// Options every transport takes.
#[derive(Debug, Clone)]
pub struct TransportOptions {
    /// Talk HTTP instead of HTTPS to registries (a local test registry).
    pub plain_http: bool,
    /// How long a registry may take to accept a connection, and to send the next bytes of an answer
    /// (its headers, then each read of its body). A registry that stalls longer fails the request
    /// with an error naming it, instead of hanging the caller.
    pub timeout: Duration,
}

/// The default of [`TransportOptions::timeout`] (`--registry-timeout`) when `$WISP_REGISTRY_TIMEOUT`
/// does not set one.
pub const DEFAULT_REGISTRY_TIMEOUT: Duration = Duration::from_secs(30);

/// The registry timeout a `--registry-timeout SECS` flag gives (at least 0.1 s); without one,
/// `$WISP_REGISTRY_TIMEOUT` (seconds), else [`DEFAULT_REGISTRY_TIMEOUT`]. The daemon, which has no
/// such flag, takes the variable too.
pub fn registry_timeout(flag: Option<f64>) -> Duration {
    let secs = flag.or_else(|| std::env::var("WISP_REGISTRY_TIMEOUT").ok()?.trim().parse().ok());
    secs.filter(|s| s.is_finite())
        .and_then(|s| Duration::try_from_secs_f64(s.max(0.1)).ok())
        .unwrap_or(DEFAULT_REGISTRY_TIMEOUT)
}

impl Default for TransportOptions {
    /// HTTPS, and the timeout of [`registry_timeout`]`(None)`.
    fn default() -> Self {
        TransportOptions { plain_http: false, timeout: registry_timeout(None) }
    }
}

/// A manifest (or index) as stored.
#[derive(Debug, Clone)]
pub struct RawManifest {
    pub bytes: Vec<u8>,
    pub digest: String,
}

/// A place holding blobs and manifests: a layout directory, a registry repository, an archive.
pub trait Repo: Send + Sync {
    /// For messages.
    fn describe(&self) -> String;
    /// The manifest (or index) the reference names when `reference` is `None`, else the one with
    /// that digest.
    fn get_manifest(&self, reference: Option<&str>) -> Result<RawManifest>;
    /// The blob's bytes, verified against `digest` (and `size`, when given) as they are read.
    fn open_blob(&self, digest: &str, size: Option<u64>) -> Result<Box<dyn Read + Send>>;
    /// [`Repo::open_blob`] with a deadline: a download that has not ended by then is cancelled (a
    /// registry's connection is closed) and the reader fails. Local repositories ignore it.
    fn open_blob_by(&self, digest: &str, size: Option<u64>, deadline: Instant) -> Result<Box<dyn Read + Send>> {
        let _ = deadline;
        self.open_blob(digest, size)
    }
    /// Whether the blob is present.
    fn has_blob(&self, digest: &str) -> Result<bool>;
    /// Stores a blob from a file whose bytes have the given digest and size, unless the blob is
    /// already there. Returns whether it was written.
    fn put_blob_file(&self, digest: &str, size: u64, path: &Path) -> Result<bool>;
    /// Stores a blob from memory.
    fn put_blob(&self, digest: &str, bytes: &[u8]) -> Result<()>;
    /// Stores a manifest or index (by digest), and points tag `tag` at it when given.
    fn put_manifest(&self, bytes: &[u8], media_type: &str, tag: Option<&str>) -> Result<String>;
    /// The tag the reference names (`latest` when it names none).
    fn tag(&self) -> String;
}

/// Opens the repository a reference names. `create` makes a missing OCI layout directory.
pub fn open(r: &ImageRef, opts: &TransportOptions, create: bool) -> Result<Box<dyn Repo>> {
    Ok(match r {
        ImageRef::Oci { dir, tag } => Box::new(layout::Layout::open(dir, tag.clone(), create)?),
        ImageRef::DockerArchive { file } => {
            if create {
                bail!("docker-archive: is supported as a source only");
            }
            Box::new(archive::DockerArchive::open(file)?)
        }
        ImageRef::Docker { reference } => Box::new(registry::Registry::open(reference, opts)?),
    })
}

/// A source image resolved to one platform's manifest.
#[derive(Debug, Clone)]
pub struct SourceImage {
    pub manifest_digest: String,
    pub manifest: ImageManifest,
    /// The config blob as stored (copied into the index image, unknown fields and all).
    pub config: serde_json::Value,
}

/// The platform wisp converts for: linux on the machine's architecture.
pub fn host_platform() -> Platform {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        other => other,
    };
    Platform { architecture: arch.into(), os: "linux".into(), variant: None }
}

/// Reads the image a reference names, choosing the host platform's manifest from an index, and its
/// config.
pub fn resolve_source(repo: &dyn Repo) -> Result<SourceImage> {
    let raw = repo.get_manifest(None)?;
    let (manifest_digest, manifest) = match parse_manifest(&raw.bytes).context("parsing the manifest")? {
        Fetched::Manifest(m) => (raw.digest, m),
        Fetched::Index(index) => {
            let want = host_platform();
            let pick = index
                .manifests
                .iter()
                .find(|d| d.platform.as_ref().is_some_and(|p| p.os == want.os && p.architecture == want.architecture))
                .or_else(|| index.manifests.iter().find(|d| d.platform.is_none()))
                .with_context(|| format!("{}: no manifest for {}/{}", repo.describe(), want.os, want.architecture))?;
            let child = repo.get_manifest(Some(&pick.digest))?;
            match parse_manifest(&child.bytes).context("parsing the manifest")? {
                Fetched::Manifest(m) => (child.digest, m),
                Fetched::Index(_) => bail!("{}: nested index {} is not supported", repo.describe(), pick.digest),
            }
        }
    };
    let config = read_blob(repo, &manifest.config).context("reading the image config")?;
    let config = serde_json::from_slice(&config).context("parsing the image config")?;
    Ok(SourceImage { manifest_digest, manifest, config })
}

/// A whole (small) blob, verified.
pub fn read_blob(repo: &dyn Repo, d: &Descriptor) -> Result<Vec<u8>> {
    const MAX: u64 = 64 << 20;
    if d.size > MAX {
        bail!("blob {} of {} bytes is too large to read into memory", d.digest, d.size);
    }
    let mut out = Vec::new();
    repo.open_blob(&d.digest, Some(d.size))?
        .read_to_end(&mut out)
        .with_context(|| format!("reading blob {} from {}", d.digest, repo.describe()))?;
    Ok(out)
}
