//! Object stores: where converted file contents go, each object named by the sha256 of its
//! uncompressed content and kept zstd-compressed where that pays (docs/architecture.md, decision 8).
//!
//! - [`dir::DirStore`] (`dir:PATH`): files under a documented layout (docs/convert.md);
//! - [`RepoStore`]: blobs in an image repository (a registry repository or an OCI layout), named by
//!   the digest of the stored bytes; the index image's object map and keep-alive manifests say which.

pub mod compress;
pub mod dir;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use erofs::tree::Digest;

use crate::object::ObjectEntry;
use crate::oci::{ImageRef, Repo};

/// Where objects are kept.
pub trait ObjectStore: Send + Sync {
    fn describe(&self) -> String;
    /// The stored form of the object with this content digest and size, when the store can tell by
    /// name alone (directory stores; repositories only for uncompressed objects).
    fn lookup(&self, digest: &Digest, size: u64) -> Result<Option<ObjectEntry>>;
    /// Stores `staged` (holding exactly the stored bytes of `obj`) unless already present; atomic.
    /// Returns whether anything was written.
    fn put(&self, obj: &ObjectEntry, staged: &Path) -> Result<bool>;
    /// The stored bytes of `obj`, verified against its blob digest and stored size as they are read.
    fn open(&self, obj: &ObjectEntry) -> Result<Box<dyn Read + Send>>;
    /// [`ObjectStore::open`] with a deadline: a download that has not ended by then is cancelled and
    /// the reader fails ([`Repo::open_blob_by`]). Local stores ignore it.
    fn open_by(&self, obj: &ObjectEntry, deadline: Instant) -> Result<Box<dyn Read + Send>> {
        let _ = deadline;
        self.open(obj)
    }
    /// A directory on the same file system as the store for staging files (so `put` can rename), or
    /// `None` for any local directory.
    fn staging_parent(&self) -> Option<PathBuf>;
}

/// A `--store` argument: `dir:PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreSpec {
    Dir(PathBuf),
}

impl std::str::FromStr for StoreSpec {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.strip_prefix("dir:") {
            Some(p) if !p.is_empty() => Ok(StoreSpec::Dir(p.into())),
            _ => {
                bail!("{s}: unknown store (use dir:PATH; without --store, objects go to the destination's repository)")
            }
        }
    }
}

/// Opens the store a `--store` names, or the repository of `image` when none is given.
pub fn open(
    spec: Option<&StoreSpec>,
    image: &ImageRef,
    repo: Arc<dyn Repo>,
    create: bool,
) -> Result<Arc<dyn ObjectStore>> {
    match spec {
        Some(StoreSpec::Dir(p)) => Ok(Arc::new(dir::DirStore::open(p, create)?)),
        None => match image {
            ImageRef::DockerArchive { .. } => bail!("docker-archive: cannot hold objects; pass --store dir:PATH"),
            _ => Ok(Arc::new(RepoStore {
                repo,
                staging: match image {
                    ImageRef::Oci { dir, .. } => Some(dir.clone()),
                    _ => None,
                },
            })),
        },
    }
}

/// Objects as blobs of an image repository.
pub struct RepoStore {
    pub repo: Arc<dyn Repo>,
    staging: Option<PathBuf>,
}

impl std::fmt::Debug for RepoStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RepoStore({})", self.repo.describe())
    }
}

impl RepoStore {
    pub fn new(repo: Arc<dyn Repo>) -> Self {
        RepoStore { repo, staging: None }
    }
}

impl ObjectStore for RepoStore {
    fn describe(&self) -> String {
        self.repo.describe()
    }

    fn lookup(&self, _digest: &Digest, _size: u64) -> Result<Option<ObjectEntry>> {
        // A repository names objects by the digest of their stored (usually compressed) bytes, which
        // is only known after compressing; `put` checks for the blob before uploading it.
        Ok(None)
    }

    fn put(&self, obj: &ObjectEntry, staged: &Path) -> Result<bool> {
        let d = obj.blob_digest();
        self.repo.put_blob_file(&d, obj.stored_size, staged)
    }

    fn open(&self, obj: &ObjectEntry) -> Result<Box<dyn Read + Send>> {
        self.repo
            .open_blob(&obj.blob_digest(), Some(obj.stored_size))
            .with_context(|| format!("object {}", hex::encode(obj.digest)))
    }

    fn open_by(&self, obj: &ObjectEntry, deadline: Instant) -> Result<Box<dyn Read + Send>> {
        self.repo
            .open_blob_by(&obj.blob_digest(), Some(obj.stored_size), deadline)
            .with_context(|| format!("object {}", hex::encode(obj.digest)))
    }

    fn staging_parent(&self) -> Option<PathBuf> {
        self.staging.clone()
    }
}

/// Reads object `obj` from `store` completely, checking the blob digest of the stored bytes and the
/// content digest and size after decompression; writes the content to `out`.
pub fn fetch_verified(store: &dyn ObjectStore, obj: &ObjectEntry, out: &mut dyn std::io::Write) -> Result<()> {
    fetch_verified_by(store, obj, out, None)
}

/// [`fetch_verified`], with the download cancelled at `deadline` ([`ObjectStore::open_by`]).
pub fn fetch_verified_by(
    store: &dyn ObjectStore,
    obj: &ObjectEntry,
    out: &mut dyn std::io::Write,
    deadline: Option<Instant>,
) -> Result<()> {
    let what = || format!("object {} from {}", hex::encode(obj.digest), store.describe());
    let stored = match deadline {
        Some(d) => store.open_by(obj, d),
        None => store.open(obj),
    }
    .with_context(what)?;
    crate::object::verify::copy_content(obj, stored, out).with_context(what)?;
    Ok(())
}
