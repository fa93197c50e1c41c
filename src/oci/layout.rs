//! OCI image layout directories (image-spec `image-layout.md`): `oci-layout`, `index.json`,
//! `blobs/sha256/<hex>`. Blobs are written to a temporary name and renamed; `index.json` is replaced
//! atomically, last, so a failed write leaves no tag pointing at a partial image.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::types::{digest_hex, sha256_digest, Descriptor, ImageIndex, MT_OCI_INDEX};
use super::{RawManifest, Repo};
use crate::object::atomic::{self, write_atomic, Place};
use crate::object::verify::VerifyingReader;

const REF_NAME: &str = "org.opencontainers.image.ref.name";

#[derive(Debug)]
pub struct Layout {
    dir: PathBuf,
    tag: Option<String>,
}

impl Layout {
    /// Opens `dir`; with `create`, makes it a layout if it is not one yet.
    pub fn open(dir: &Path, tag: Option<String>, create: bool) -> Result<Self> {
        let marker = dir.join("oci-layout");
        if !marker.exists() {
            if !create {
                bail!("{}: not an OCI image layout (no oci-layout file)", dir.display());
            }
            fs::create_dir_all(dir.join("blobs/sha256")).with_context(|| format!("creating {}", dir.display()))?;
            write_atomic(&marker, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
            write_atomic(
                &dir.join("index.json"),
                br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#,
            )?;
        }
        Ok(Layout { dir: dir.to_path_buf(), tag })
    }

    fn blob_path(&self, digest: &str) -> Result<PathBuf> {
        let hex = digest_hex(digest).with_context(|| format!("unsupported digest {digest:?}"))?;
        Ok(self.dir.join("blobs/sha256").join(hex))
    }

    fn index(&self) -> Result<ImageIndex> {
        let p = self.dir.join("index.json");
        let bytes = fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
        serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", p.display()))
    }
}

impl Repo for Layout {
    fn describe(&self) -> String {
        match &self.tag {
            Some(t) => format!("oci:{}:{t}", self.dir.display()),
            None => format!("oci:{}", self.dir.display()),
        }
    }

    fn get_manifest(&self, reference: Option<&str>) -> Result<RawManifest> {
        let digest = match reference {
            Some(d) => d.to_string(),
            None => {
                let index = self.index()?;
                let found: Vec<&Descriptor> = match &self.tag {
                    Some(t) => index.manifests.iter().filter(|d| d.annotations.get(REF_NAME) == Some(t)).collect(),
                    None => index.manifests.iter().collect(),
                };
                match found.as_slice() {
                    [one] => one.digest.clone(),
                    [] => bail!("{}: no such image in index.json", self.describe()),
                    _ => bail!("{}: index.json lists several images; name one with :TAG", self.describe()),
                }
            }
        };
        let path = self.blob_path(&digest)?;
        let mut bytes = Vec::new();
        VerifyingReader::new(
            File::open(&path).with_context(|| format!("manifest {digest}: opening {}", path.display()))?,
            &digest,
            None,
        )
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading manifest {digest}"))?;
        Ok(RawManifest { bytes, digest })
    }

    fn open_blob(&self, digest: &str, size: Option<u64>) -> Result<Box<dyn Read + Send>> {
        let path = self.blob_path(digest)?;
        let f = File::open(&path).with_context(|| format!("blob {digest} is missing from {}", self.describe()))?;
        Ok(Box::new(VerifyingReader::new(io::BufReader::with_capacity(1 << 20, f), digest, size)))
    }

    fn has_blob(&self, digest: &str) -> Result<bool> {
        Ok(self.blob_path(digest)?.is_file())
    }

    fn put_blob_file(&self, digest: &str, size: u64, path: &Path) -> Result<bool> {
        let dest = self.blob_path(digest)?;
        if dest.is_file() {
            return Ok(false);
        }
        atomic::create(&dest, Place::Replace, |tmp| {
            // Same file system: a hard link keeps the staged file for the caller; else copy.
            if fs::hard_link(path, tmp).is_err() {
                let mut out = File::create(tmp)?;
                let mut src = VerifyingReader::new(File::open(path)?, digest, Some(size));
                io::copy(&mut src, &mut out)?;
                out.sync_all()?;
            }
            Ok(())
        })
        .with_context(|| format!("storing blob {digest} in {}", self.describe()))?;
        Ok(true)
    }

    fn put_blob(&self, digest: &str, bytes: &[u8]) -> Result<()> {
        let dest = self.blob_path(digest)?;
        if dest.is_file() {
            return Ok(());
        }
        debug_assert_eq!(sha256_digest(bytes), digest);
        write_atomic(&dest, bytes)
    }

    fn tag(&self) -> String {
        self.tag.clone().unwrap_or_else(|| "latest".into())
    }

    fn put_manifest(&self, bytes: &[u8], media_type: &str, tag: Option<&str>) -> Result<String> {
        let digest = sha256_digest(bytes);
        self.put_blob(&digest, bytes)?;
        if let Some(name) = tag {
            let name = name.to_string();
            let mut index = self.index()?;
            index.manifests.retain(|d| d.annotations.get(REF_NAME) != Some(&name));
            let mut d = Descriptor {
                media_type: media_type.into(),
                digest: digest.clone(),
                size: bytes.len() as u64,
                ..Default::default()
            };
            d.annotations.insert(REF_NAME.into(), name);
            index.manifests.push(d);
            index.media_type = Some(MT_OCI_INDEX.into());
            write_atomic(&self.dir.join("index.json"), &serde_json::to_vec_pretty(&index)?)?;
        }
        Ok(digest)
    }
}
