//! `docker save` archives (source only): a tar holding `manifest.json` (`[{Config, RepoTags, Layers}]`),
//! the config and one tar per layer (`<id>/layer.tar`, or `blobs/sha256/<hex>` in newer Dockers). The
//! archive is indexed once (member name -> offset, size); blobs are read in place.
//!
//! A legacy layer member is an uncompressed tar, so its digest is the config's `diff_id` for it; the
//! synthesized manifest uses that, and reading verifies it.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use super::types::{sha256_digest, Descriptor, ImageManifest, MT_DOCKER_MANIFEST, MT_OCI_CONFIG};
use super::{RawManifest, Repo};
use crate::object::verify::VerifyingReader;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Entry {
    config: String,
    layers: Vec<String>,
}

#[derive(Debug)]
pub struct DockerArchive {
    file: PathBuf,
    /// Member name -> (data offset, size).
    members: HashMap<String, (u64, u64)>,
    manifest: Vec<u8>,
    /// Blob digest -> member name.
    blobs: HashMap<String, String>,
}

fn norm(name: &str) -> String {
    name.trim_start_matches("./").to_string()
}

impl DockerArchive {
    pub fn open(file: &Path) -> Result<Self> {
        let f = File::open(file).with_context(|| format!("opening {}", file.display()))?;
        let mut ar = tar::Archive::new(io::BufReader::new(f));
        let mut members = HashMap::new();
        for e in ar.entries().with_context(|| format!("reading {}", file.display()))? {
            let e = e.with_context(|| format!("reading {}", file.display()))?;
            let name = norm(&String::from_utf8_lossy(&e.path_bytes()));
            members.insert(name, (e.raw_file_position(), e.size()));
        }
        let mut a = DockerArchive { file: file.to_path_buf(), members, manifest: Vec::new(), blobs: HashMap::new() };
        let mut listing = Vec::new();
        a.member("manifest.json")?.read_to_end(&mut listing)?;
        let entries: Vec<Entry> = serde_json::from_slice(&listing).context("parsing manifest.json")?;
        let [entry] = entries.as_slice() else {
            bail!("{}: manifest.json lists {} images; exactly one is supported", file.display(), entries.len());
        };
        let mut config = Vec::new();
        a.member(&entry.config)?.read_to_end(&mut config)?;
        let config_digest = sha256_digest(&config);
        let cfg: serde_json::Value = serde_json::from_slice(&config).context("parsing the image config")?;
        let diff_ids: Vec<String> = cfg["rootfs"]["diff_ids"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
            .unwrap_or_default();
        if diff_ids.len() != entry.layers.len() {
            bail!("{}: {} layers but {} diff_ids in the config", file.display(), entry.layers.len(), diff_ids.len());
        }
        a.blobs.insert(config_digest.clone(), norm(&entry.config));
        let mut layers = Vec::new();
        for (name, diff_id) in entry.layers.iter().zip(&diff_ids) {
            let name = norm(name);
            let &(_, size) =
                a.members.get(&name).with_context(|| format!("layer {name} is missing from the archive"))?;
            let digest = match name.strip_prefix("blobs/sha256/") {
                Some(hex) => format!("sha256:{hex}"),
                None => diff_id.clone(),
            };
            a.blobs.insert(digest.clone(), name);
            layers.push(Descriptor {
                media_type: "application/vnd.docker.image.rootfs.diff.tar".into(),
                digest,
                size,
                ..Default::default()
            });
        }
        let manifest = ImageManifest {
            schema_version: 2,
            media_type: Some(MT_DOCKER_MANIFEST.into()),
            config: Descriptor {
                media_type: MT_OCI_CONFIG.into(),
                digest: config_digest,
                size: config.len() as u64,
                ..Default::default()
            },
            layers,
            ..Default::default()
        };
        a.manifest = serde_json::to_vec(&manifest)?;
        Ok(a)
    }

    fn member(&self, name: &str) -> Result<io::Take<File>> {
        let &(off, size) =
            self.members.get(&norm(name)).with_context(|| format!("{}: no member {name}", self.file.display()))?;
        let mut f = File::open(&self.file)?;
        f.seek(SeekFrom::Start(off))?;
        Ok(f.take(size))
    }
}

impl Repo for DockerArchive {
    fn describe(&self) -> String {
        format!("docker-archive:{}", self.file.display())
    }

    fn get_manifest(&self, reference: Option<&str>) -> Result<RawManifest> {
        let digest = sha256_digest(&self.manifest);
        if reference.is_some_and(|r| r != digest) {
            bail!("{}: no manifest {}", self.describe(), reference.unwrap_or_default());
        }
        Ok(RawManifest { bytes: self.manifest.clone(), digest })
    }

    fn open_blob(&self, digest: &str, size: Option<u64>) -> Result<Box<dyn Read + Send>> {
        let name =
            self.blobs.get(digest).with_context(|| format!("blob {digest} is missing from {}", self.describe()))?;
        let r = io::BufReader::with_capacity(1 << 20, self.member(name)?);
        Ok(Box::new(VerifyingReader::new(r, digest, size)))
    }

    fn has_blob(&self, digest: &str) -> Result<bool> {
        Ok(self.blobs.contains_key(digest))
    }

    fn put_blob_file(&self, _: &str, _: u64, _: &Path) -> Result<bool> {
        bail!("docker-archive: is read-only")
    }

    fn put_blob(&self, _: &str, _: &[u8]) -> Result<()> {
        bail!("docker-archive: is read-only")
    }

    fn tag(&self) -> String {
        "latest".into()
    }

    fn put_manifest(&self, _: &[u8], _: &str, _: Option<&str>) -> Result<String> {
        bail!("docker-archive: is read-only")
    }
}
