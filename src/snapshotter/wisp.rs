//! wisp layers: a committed snapshot whose `fs` holds `wisp/index.erofs` and `wisp/objects.map` (the
//! one layer of a wisp index image, unpacked by containerd like any layer) is served lazily. The first
//! active or view snapshot above it asks the wisp daemon to mount that index at
//! `ROOT/wisp/<id>/lower` (EROFS only, objects filled on first read); every snapshot above it then uses
//! that mount as its lowest overlay layer. The daemon takes the index from the unpacked layer, so it
//! is never downloaded twice. When the last snapshot above it goes, the daemon unmounts it; the
//! objects stay in the daemon's node cache.
//!
//! Where the objects are (the repository the index image came from) is found by [`Wisp::source`]
//! and kept in `ROOT/wisp/<id>/source.json`.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::containerd::ContainerdClient;
use super::meta::Record;
use crate::daemon::protocol::{self, FrontendKind, MountRequest, Request};

/// How to reach the daemon and the objects.
#[derive(Debug)]
pub struct Wisp {
    root: PathBuf,
    daemon_socket: PathBuf,
    plain_http: bool,
    containerd: Option<ContainerdClient>,
}

/// Where a wisp layer's objects are.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Source {
    /// docker://HOST/REPO (the objects are blobs of this repository).
    reference: String,
    plain_http: bool,
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

impl Wisp {
    pub fn new(root: &Path, daemon_state: &Path, plain_http: bool, containerd: Option<ContainerdClient>) -> Self {
        Wisp { root: root.join("wisp"), daemon_socket: protocol::socket_path(daemon_state), plain_http, containerd }
    }

    /// Whether a snapshot directory holds a wisp index layer.
    pub fn is_index(&self, fs_dir: &Path) -> bool {
        fs_dir.join("wisp/index.erofs").is_file() && fs_dir.join("wisp/objects.map").is_file()
    }

    fn layer_dir(&self, id: u64) -> PathBuf {
        self.root.join(id.to_string())
    }

    /// The wisp layers that have a directory (mounted or not).
    pub fn layers(&self) -> Vec<u64> {
        let Ok(rd) = fs::read_dir(&self.root) else { return Vec::new() };
        rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect()
    }

    /// Mounts the index of wisp layer `id` (its snapshot dir `fs_dir`, its chain `chain` from the layer
    /// down) unless it is mounted already; returns the mount point.
    pub fn ensure_mounted(
        &self,
        id: u64,
        fs_dir: &Path,
        chain: &[(String, Record)],
        labels: &BTreeMap<String, String>,
    ) -> Result<PathBuf> {
        let dir = self.layer_dir(id);
        let lower = dir.join("lower");
        if is_mounted(&lower)? {
            return Ok(lower);
        }
        let src = self.source(id, chain, labels)?;
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

    /// Where the objects of wisp layer `id` are: recorded earlier, else asked of containerd.
    fn source(&self, id: u64, chain: &[(String, Record)], labels: &BTreeMap<String, String>) -> Result<Source> {
        let path = self.layer_dir(id).join("source.json");
        if let Ok(bytes) = fs::read(&path) {
            return serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()));
        }
        let found = self.find_source(chain, labels)?;
        let src = Source { reference: found, plain_http: self.plain_http };
        fs::create_dir_all(self.layer_dir(id))?;
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, serde_json::to_vec(&src)?).with_context(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, &path).with_context(|| format!("renaming {}", tmp.display()))?;
        Ok(src)
    }

    fn find_source(&self, chain: &[(String, Record)], labels: &BTreeMap<String, String>) -> Result<String> {
        // CRI puts the image reference on the snapshots it unpacks.
        const CRI_REF: &str = "containerd.io/snapshot/cri.image-ref";
        if let Some(r) = labels.get(CRI_REF).or_else(|| chain.iter().find_map(|(_, r)| r.labels.get(CRI_REF))) {
            return Ok(format!("docker://{r}"));
        }
        let Some((name, _)) = chain.first() else { bail!("a wisp layer without a snapshot") };
        let Some(ctd) = &self.containerd else {
            bail!("snapshot {name:?} is a wisp layer, but its image reference is not among its labels and no --containerd address was given to look it up")
        };
        ctd.layer_source(name)
            .with_context(|| format!("looking up the repository of wisp layer {name:?} in containerd"))
    }
}
