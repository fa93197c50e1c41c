//! `dir:PATH` stores: objects as files named by content digest (docs/convert.md):
//!
//! ```text
//! PATH/wisp-store.json                 {"layout":"wisp-objects","version":1}
//! PATH/objects/<hex[0..2]>/<hex>       stored uncompressed
//! PATH/objects/<hex[0..2]>/<hex>.zst   stored as one zstd frame
//! ```
//! Files appear by rename only, so a reader never sees a partial object. The blob digest (sha256 of
//! the stored bytes) is not part of the name; when an object already exists it is hashed once to fill
//! the object map.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use erofs::tree::Digest;

use super::ObjectStore;
use crate::object::atomic::{self, Place};
use crate::object::verify::VerifyingReader;
use crate::object::{Compression, ObjectEntry};

const MARKER: &str = "wisp-store.json";
const MARKER_BODY: &[u8] = br#"{"layout":"wisp-objects","version":1}"#;

#[derive(Debug, Clone)]
pub struct DirStore {
    root: PathBuf,
}

impl DirStore {
    pub fn open(root: &Path, create: bool) -> Result<Self> {
        let marker = root.join(MARKER);
        if !marker.exists() {
            if !create {
                bail!("{}: not a wisp object store (no {MARKER})", root.display());
            }
            fs::create_dir_all(root.join("objects")).with_context(|| format!("creating {}", root.display()))?;
            atomic::write_atomic(&marker, MARKER_BODY)?;
        }
        Ok(DirStore { root: root.to_path_buf() })
    }

    pub fn path(&self, digest: &Digest, compression: Compression) -> PathBuf {
        let raw = crate::object::path_in(&self.root.join("objects"), digest);
        match compression {
            Compression::None => raw,
            Compression::Zstd => raw.with_extension("zst"),
        }
    }
}

fn hash_file(path: &Path) -> io::Result<(Digest, u64)> {
    crate::object::verify::hash_reader(io::BufReader::with_capacity(1 << 20, File::open(path)?))
}

impl ObjectStore for DirStore {
    fn describe(&self) -> String {
        format!("dir:{}", self.root.display())
    }

    fn lookup(&self, digest: &Digest, size: u64) -> Result<Option<ObjectEntry>> {
        let zst = self.path(digest, Compression::Zstd);
        if zst.is_file() {
            let (blob, stored_size) = hash_file(&zst).with_context(|| format!("reading {}", zst.display()))?;
            return Ok(Some(ObjectEntry { digest: *digest, blob, size, stored_size, compression: Compression::Zstd }));
        }
        let raw = self.path(digest, Compression::None);
        match fs::metadata(&raw) {
            Ok(m) if m.is_file() && m.len() == size => Ok(Some(ObjectEntry {
                digest: *digest,
                blob: *digest,
                size,
                stored_size: size,
                compression: Compression::None,
            })),
            _ => Ok(None),
        }
    }

    fn put(&self, obj: &ObjectEntry, staged: &Path) -> Result<bool> {
        let dest = self.path(&obj.digest, obj.compression);
        if dest.is_file() {
            return Ok(false);
        }
        let dir = dest.parent().expect("object path has a parent");
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        // Staging lives on this file system (staging_parent), so a rename is atomic.
        if fs::rename(staged, &dest).is_err() {
            atomic::create(&dest, Place::Replace, |tmp| Ok(fs::copy(staged, tmp).map(drop)?))
                .with_context(|| format!("storing object {} in {}", hex::encode(obj.digest), self.describe()))?;
        }
        Ok(true)
    }

    fn open(&self, obj: &ObjectEntry) -> Result<Box<dyn Read + Send>> {
        let path = self.path(&obj.digest, obj.compression);
        let f = File::open(&path).with_context(|| {
            format!("object {} is missing from {} ({})", hex::encode(obj.digest), self.describe(), path.display())
        })?;
        Ok(Box::new(VerifyingReader::new(
            io::BufReader::with_capacity(1 << 20, f),
            &obj.blob_digest(),
            Some(obj.stored_size),
        )))
    }

    fn staging_parent(&self) -> Option<PathBuf> {
        Some(self.root.clone())
    }
}
