//! Turning a staged raw object into its stored form: one zstd frame when that saves enough
//! (see docs/convert.md for the measurement behind the defaults), else the raw bytes.

use std::fs::{self, File};
use std::io::{self, BufReader, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use erofs::tree::Digest;
use sha2::{Digest as _, Sha256};

use crate::oci::objmap::{Compression, ObjectEntry};

/// How objects are compressed.
#[derive(Debug, Clone, Copy)]
pub struct CompressOptions {
    /// zstd level.
    pub level: i32,
    /// Keep the compressed form only when it is at most this fraction of the raw size.
    pub max_ratio: f64,
}

impl Default for CompressOptions {
    fn default() -> Self {
        CompressOptions { level: 2, max_ratio: 0.95 }
    }
}

/// A writer that hashes and counts what passes through.
struct HashWriter<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Compresses the raw staged file `raw` (content `digest`, `size` bytes) and decides which form to
/// keep. Returns the entry and the path of the stored form (`raw` itself, or a `.zst` beside it; the
/// other file is removed).
pub fn finish_object(raw: &Path, digest: &Digest, size: u64, opts: &CompressOptions) -> Result<(ObjectEntry, PathBuf)> {
    let zst = raw.with_extension("zst");
    let raw_entry =
        ObjectEntry { digest: *digest, blob: *digest, size, stored_size: size, compression: Compression::None };
    if size == 0 || opts.max_ratio <= 0.0 {
        return Ok((raw_entry, raw.to_path_buf()));
    }
    let result = (|| -> Result<ObjectEntry> {
        let out = File::create(&zst)?;
        let mut hw =
            HashWriter { inner: io::BufWriter::with_capacity(256 << 10, out), hasher: Sha256::new(), count: 0 };
        {
            let mut enc = zstd::stream::write::Encoder::new(&mut hw, opts.level)?;
            enc.include_checksum(false)?;
            enc.set_pledged_src_size(Some(size))?;
            io::copy(&mut BufReader::with_capacity(256 << 10, File::open(raw)?), &mut enc)?;
            enc.finish()?;
        }
        hw.flush()?;
        Ok(ObjectEntry {
            digest: *digest,
            blob: hw.hasher.finalize().into(),
            size,
            stored_size: hw.count,
            compression: Compression::Zstd,
        })
    })()
    .with_context(|| format!("compressing object {}", hex::encode(digest)));
    let entry = match result {
        Ok(e) => e,
        Err(e) => {
            let _ = fs::remove_file(&zst);
            return Err(e);
        }
    };
    if (entry.stored_size as f64) <= (size as f64) * opts.max_ratio {
        fs::remove_file(raw).with_context(|| format!("removing {}", raw.display()))?;
        Ok((entry, zst))
    } else {
        fs::remove_file(&zst).with_context(|| format!("removing {}", zst.display()))?;
        Ok((raw_entry, raw.to_path_buf()))
    }
}

/// Like [`finish_object`] for content held in memory (`buf`), compressed with a reused context:
/// writes only the stored form, to `raw` or `raw.zst`.
pub fn stage_bytes(
    buf: &[u8],
    digest: &Digest,
    raw: &Path,
    opts: &CompressOptions,
    z: &mut zstd::bulk::Compressor<'static>,
) -> Result<(ObjectEntry, PathBuf)> {
    let size = buf.len() as u64;
    let compressed = if size == 0 || opts.max_ratio <= 0.0 {
        None
    } else {
        let c = z.compress(buf).with_context(|| format!("compressing object {}", hex::encode(digest)))?;
        ((c.len() as f64) <= (size as f64) * opts.max_ratio).then_some(c)
    };
    let (entry, path, bytes) = match compressed {
        Some(c) => {
            let entry = ObjectEntry {
                digest: *digest,
                blob: Sha256::digest(&c).into(),
                size,
                stored_size: c.len() as u64,
                compression: Compression::Zstd,
            };
            (entry, raw.with_extension("zst"), std::borrow::Cow::Owned(c))
        }
        None => (
            ObjectEntry { digest: *digest, blob: *digest, size, stored_size: size, compression: Compression::None },
            raw.to_path_buf(),
            std::borrow::Cow::Borrowed(buf),
        ),
    };
    fs::write(&path, &bytes).with_context(|| format!("writing {}", path.display()))?;
    Ok((entry, path))
}
