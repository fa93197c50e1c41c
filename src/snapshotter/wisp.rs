//! wisp layers: a committed snapshot that is the one layer of a wisp index image (its `fs` holds
//! `wisp/index.erofs` and `wisp/objects.map`, unpacked by containerd like any layer) is served lazily.
//! The first active or view snapshot above it asks the wisp daemon to mount that index at
//! `ROOT/wisp/<id>/lower` (EROFS only, objects filled on first read); every snapshot above it then uses
//! that mount as its overlay lower. The daemon takes the index from the unpacked layer, so it is never
//! downloaded twice. When the last snapshot above it goes, the daemon unmounts it; the objects stay in
//! the daemon's node cache.
//!
//! Which layers are wisp layers ([`Wisp::classify`]): the files are only a hint. A snapshot is one when
//! it is the only layer of the chain a container stands on, `fs/wisp` is a directory and
//! `fs/wisp/index.erofs` and `fs/wisp/objects.map` are regular files (none of them a symbolic link),
//! containerd's content store has a wisp index image manifest (its `org.wisp.format.version`
//! annotation, one layer) whose layer unpacks to this snapshot ([`super::containerd`]), and the files,
//! read without following links, rebuild that layer's diff id exactly. Every other layer is an
//! ordinary one, whatever files it holds. The decision and where the objects are (the repository the
//! index image came from) are kept in `ROOT/wisp/<id>/source.json`.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::containerd::ContainerdClient;
use crate::daemon::images::read_local_index;
use crate::daemon::protocol::{self, FrontendKind, MountRequest, Request};
use crate::index;
use crate::object::atomic::write_atomic;
use crate::oci::types::sha256_digest;

/// How to reach the daemon and the objects.
#[derive(Debug)]
pub struct Wisp {
    root: PathBuf,
    daemon_socket: PathBuf,
    plain_http: bool,
    containerd: Option<ContainerdClient>,
    /// Layers that hold the files of a wisp index but are not one (decided once per run).
    ordinary: Mutex<HashSet<u64>>,
}

/// A wisp layer: where its objects are, and the index it was checked to hold.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Source {
    /// docker://HOST/REPO (the objects are blobs of this repository).
    reference: String,
    plain_http: bool,
    /// Hex sha256 of the layer's `index.erofs` as checked against its diff id: the daemon's image id
    /// for it. Records written before this check have none and are checked again.
    #[serde(default)]
    index_sha256: Option<String>,
}

/// Whether `path` is a mount point in this mount namespace.
pub fn is_mounted(path: &Path) -> Result<bool> {
    let info = fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    let want = path.to_string_lossy();
    Ok(info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|p| p.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\") == want))
}

/// Whether `fs_dir` has the files of a wisp index layer, none of them through a symbolic link (the hint
/// that makes [`Wisp::classify`] ask containerd).
fn has_index_files(fs_dir: &Path) -> bool {
    let is = |p: &Path, dir: bool| {
        fs::symlink_metadata(p).is_ok_and(|m| if dir { m.file_type().is_dir() } else { m.file_type().is_file() })
    };
    let w = fs_dir.join("wisp");
    is(&w, true) && is(&w.join("index.erofs"), false) && is(&w.join("objects.map"), false)
}

impl Wisp {
    pub fn new(root: &Path, daemon_state: &Path, plain_http: bool, containerd: Option<ContainerdClient>) -> Self {
        Wisp {
            root: root.join("wisp"),
            daemon_socket: protocol::socket_path(daemon_state),
            plain_http,
            containerd,
            ordinary: Mutex::new(HashSet::new()),
        }
    }

    /// The directory of wisp layers' lower mounts and records (`ROOT/wisp`).
    pub fn dir(&self) -> &Path {
        &self.root
    }

    fn layer_dir(&self, id: u64) -> PathBuf {
        self.root.join(id.to_string())
    }

    fn recorded(&self, id: u64) -> Result<Option<Source>> {
        let path = self.layer_dir(id).join("source.json");
        match fs::read(&path) {
            Ok(bytes) => {
                let src: Source =
                    serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))?;
                Ok(src.index_sha256.is_some().then_some(src))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Whether snapshot directory `id` was found to be a wisp layer (it has a record or a mount).
    pub fn is_layer(&self, id: u64) -> bool {
        self.layer_dir(id).exists()
    }

    /// Whether the committed snapshot `name` (directory `id`, `fs_dir`, labels `labels`), the only layer
    /// below a new snapshot, is the layer of a wisp index image (see the module docs). A positive answer
    /// is recorded; a layer that merely holds such files is ordinary.
    pub fn classify(&self, id: u64, fs_dir: &Path, name: &str, labels: &BTreeMap<String, String>) -> Result<bool> {
        if self.recorded(id)?.is_some() {
            return Ok(true);
        }
        if !has_index_files(fs_dir) || self.ordinary.lock().unwrap_or_else(|p| p.into_inner()).contains(&id) {
            return Ok(false);
        }
        let Some(ctd) = &self.containerd else {
            tracing::warn!(snapshot = name, "a layer holds wisp index files, but without --containerd it cannot be checked: served as an ordinary layer");
            return Ok(false);
        };
        let found = ctd
            .wisp_source(name, labels)
            .with_context(|| format!("asking containerd whether snapshot {name:?} is a wisp index layer"))?;
        let Some(reference) = found else {
            tracing::info!(
                snapshot = name,
                "a layer holds wisp/index.erofs but is not the layer of a wisp index image: an ordinary layer"
            );
            self.ordinary.lock().unwrap_or_else(|p| p.into_inner()).insert(id);
            return Ok(false);
        };
        // The files must be exactly the layer containerd verified: rebuild its tar and compare digests.
        let diff_id = name.splitn(3, '/').nth(2).unwrap_or_default();
        let index_dir = fs_dir.join("wisp");
        let local = read_local_index(&index_dir)?;
        let tar = index::layer_tar(&local.erofs, &local.map, local.prefetch.as_deref())?;
        let rebuilt = sha256_digest(&tar);
        if rebuilt != diff_id {
            bail!(
                "snapshot {name:?} is the layer of the wisp index image {reference}, but its files in {} rebuild a layer with diff id {rebuilt}, not {diff_id}",
                index_dir.display()
            );
        }
        let src = Source {
            reference,
            plain_http: self.plain_http,
            index_sha256: Some(hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&local.erofs))),
        };
        let dir = self.layer_dir(id);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        write_atomic(&dir.join("source.json"), &serde_json::to_vec(&src)?)?;
        tracing::info!(snapshot = name, source = %src.reference, "a wisp index layer");
        Ok(true)
    }

    /// The wisp layers that have a directory (mounted or not).
    pub fn layers(&self) -> Vec<u64> {
        let Ok(rd) = fs::read_dir(&self.root) else { return Vec::new() };
        rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect()
    }

    /// Mounts the index of wisp layer `id` (its snapshot dir `fs_dir`, classified by
    /// [`Wisp::classify`]) unless it is mounted already; returns the mount point.
    pub fn ensure_mounted(&self, id: u64, fs_dir: &Path) -> Result<PathBuf> {
        let dir = self.layer_dir(id);
        let lower = dir.join("lower");
        if is_mounted(&lower)? {
            return Ok(lower);
        }
        let src = self.recorded(id)?.with_context(|| format!("snapshot directory {id} is not a checked wisp layer"))?;
        fs::create_dir_all(&lower).with_context(|| format!("creating {}", lower.display()))?;
        let req = MountRequest {
            reference: src.reference.clone(),
            dir: lower.clone(),
            upper: None,
            work: None,
            plain_http: src.plain_http,
            store: None,
            frontend: FrontendKind::Auto,
            index: Some(fs_dir.join("wisp")),
            lower_only: true,
        };
        let v = protocol::call(&self.daemon_socket, &Request::Mount(req), Some(Duration::from_secs(600)))
            .with_context(|| format!("asking the wisp daemon to mount the index of layer {id} ({})", src.reference))?;
        // The daemon's image id is the sha256 of the index it read: the one checked against the layer.
        if v["image"].as_str() != src.index_sha256.as_deref() {
            let _ = self.release(id);
            bail!(
                "the wisp daemon mounted index {} for layer {id}, not the checked {}",
                v["image"],
                src.index_sha256.as_deref().unwrap_or_default()
            );
        }
        tracing::info!(layer = id, source = %src.reference, objects = %v["objects"], "wisp lower mounted");
        Ok(lower)
    }
    /// Unmounts wisp layer `id` (through the daemon) if it is mounted.
    pub fn release(&self, id: u64) -> Result<()> {
        let lower = self.layer_dir(id).join("lower");
        if !is_mounted(&lower)? {
            return Ok(());
        }
        protocol::call(&self.daemon_socket, &Request::Umount { dir: lower.clone() }, Some(Duration::from_secs(120)))
            .with_context(|| format!("asking the wisp daemon to unmount {}", lower.display()))?;
        tracing::info!(layer = id, "wisp lower unmounted");
        Ok(())
    }

    /// Forgets a removed wisp layer (after [`Wisp::release`]).
    pub fn forget(&self, id: u64) {
        let _ = fs::remove_dir_all(self.layer_dir(id));
    }
}
