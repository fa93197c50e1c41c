//! A directory of uncompressed object files as the kernel reads them (`wisp mkfs --external`):
//! `DIR/<first two hex digits>/<sha256 hex>` ([`super::path_in`]), each padded with a sparse zero
//! tail to a multiple of 4 KiB ([`super::padded_len`]). Writes go to a temporary name in the same
//! directory and are renamed into place, so a reader never sees a partial object.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::atomic::{Place, TempFile};
use super::padded_len;
use super::verify::copy_hashing;

/// [`super::BLOCK`] as a slice length.
const BLOCK_BYTES: usize = 4096;

/// A directory of uncompressed object files, as the kernel reads them.
#[derive(Debug, Clone)]
pub struct ObjectDir {
    root: PathBuf,
}

impl ObjectDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        ObjectDir { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the object with this digest lives.
    pub fn path(&self, digest: &[u8; 32]) -> PathBuf {
        super::path_in(&self.root, digest)
    }

    /// Whether a complete object with this digest and content size is present.
    pub fn contains(&self, digest: &[u8; 32], size: u64) -> bool {
        fs::metadata(self.path(digest)).map(|m| m.is_file() && m.len() == padded_len(size)).unwrap_or(false)
    }

    /// Copies `src` into the store under the sha256 of its content, hashing while copying (one read of
    /// the source). Returns the digest, the content size and whether a new object was written; when the
    /// object was already present the copy is discarded.
    pub fn ingest_file(&self, src: &Path) -> Result<([u8; 32], u64, bool)> {
        fs::create_dir_all(&self.root).with_context(|| format!("creating {}", self.root.display()))?;
        // The name is known once the content is hashed: stage in the root, on the same file system.
        let tmp = TempFile::in_dir(&self.root, "ingest")?;
        let input = File::open(src).with_context(|| format!("opening {}", src.display()))?;
        let out = File::create(tmp.path()).with_context(|| format!("creating {}", tmp.path().display()))?;
        let mut sparse = SparseWriter { file: &out, pos: 0 };
        let (digest, size) = copy_hashing(input, &mut sparse).with_context(|| format!("copying {}", src.display()))?;
        if self.contains(&digest, size) {
            return Ok((digest, size, false));
        }
        out.set_len(padded_len(size)).with_context(|| format!("padding {}", tmp.path().display()))?;
        let dest = self.path(&digest);
        let dir = dest.parent().expect("object path has a parent");
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let from = tmp.path().to_path_buf();
        tmp.place(&dest, Place::Replace)
            .with_context(|| format!("renaming {} to {}", from.display(), dest.display()))?;
        Ok((digest, size, true))
    }
}

/// Writes sequentially into a file but skips whole zero blocks, leaving holes (the caller sets the
/// final length), so sparse sources stay sparse in the store.
struct SparseWriter<'a> {
    file: &'a File,
    pos: u64,
}

impl Write for SparseWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        for block in buf.chunks(BLOCK_BYTES) {
            if block.iter().any(|&b| b != 0) {
                self.file.write_all_at(block, self.pos)?;
            }
            self.pos += block.len() as u64;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
