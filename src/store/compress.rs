//! Turning a staged raw object into its stored form: one zstd frame when that saves enough
//! (see docs/convert.md for the measurement behind the defaults), else the raw bytes.

use std::fs::{self, File};
use std::io::{self, BufReader, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use erofs::tree::Digest;
use sha2::{Digest as _, Sha256};

use crate::object::{Compression, ObjectEntry};

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

/// A large object's bytes compressed as they arrive, before its digest is known, into a staging
/// file: the raw bytes are never written (and read back) just to be compressed. The compressed
/// bytes are hashed and counted on their way to the file.
pub struct ZstdSpill {
    path: PathBuf,
    enc: zstd::stream::write::Encoder<'static, HashWriter<io::BufWriter<File>>>,
}

impl std::fmt::Debug for ZstdSpill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ZstdSpill({})", self.path.display())
    }
}

impl ZstdSpill {
    /// Starts a frame for `size` bytes of content in a new file at `path`.
    pub fn create(path: &Path, size: u64, opts: &CompressOptions) -> Result<Self> {
        let out = File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let hw = HashWriter { inner: io::BufWriter::with_capacity(256 << 10, out), hasher: Sha256::new(), count: 0 };
        let mut enc = zstd::stream::write::Encoder::new(hw, opts.level)?;
        enc.include_checksum(false)?;
        enc.set_pledged_src_size(Some(size))?;
        Ok(ZstdSpill { path: path.to_path_buf(), enc })
    }

    pub fn write_all(&mut self, buf: &[u8]) -> Result<()> {
        self.enc.write_all(buf).with_context(|| format!("writing {}", self.path.display()))
    }

    /// Ends the frame and decides which form to keep, as [`finish_object`] does: the frame renamed
    /// to `raw.zst`, or (when it does not pay) the content decompressed into `raw`. `digest` and
    /// `size` are the content's, already checked by the caller.
    pub fn finish(
        self,
        digest: &Digest,
        size: u64,
        raw: &Path,
        opts: &CompressOptions,
    ) -> Result<(ObjectEntry, PathBuf)> {
        let path = self.path;
        let mut hw = self.enc.finish().with_context(|| format!("compressing object {}", hex::encode(digest)))?;
        hw.flush().with_context(|| format!("writing {}", path.display()))?;
        let (stored_size, blob): (u64, Digest) = (hw.count, hw.hasher.finalize().into());
        if (stored_size as f64) <= (size as f64) * opts.max_ratio {
            let zst = raw.with_extension("zst");
            fs::rename(&path, &zst).with_context(|| format!("renaming {}", path.display()))?;
            let entry = ObjectEntry { digest: *digest, blob, size, stored_size, compression: Compression::Zstd };
            return Ok((entry, zst));
        }
        // Rare: a large content zstd cannot shrink (already compressed). Keep it raw.
        let result = (|| -> Result<()> {
            let mut out = io::BufWriter::with_capacity(256 << 10, File::create(raw)?);
            zstd::stream::copy_decode(BufReader::with_capacity(256 << 10, File::open(&path)?), &mut out)?;
            out.flush()?;
            Ok(())
        })()
        .with_context(|| format!("staging object {} uncompressed", hex::encode(digest)));
        let _ = fs::remove_file(&path);
        if let Err(e) = result {
            let _ = fs::remove_file(raw);
            return Err(e);
        }
        let entry =
            ObjectEntry { digest: *digest, blob: *digest, size, stored_size: size, compression: Compression::None };
        Ok((entry, raw.to_path_buf()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spill(data: &[u8], dir: &Path) -> (ObjectEntry, PathBuf) {
        let opts = CompressOptions::default();
        let digest: Digest = Sha256::digest(data).into();
        let spill_path = dir.join("spill");
        let mut z = ZstdSpill::create(&spill_path, data.len() as u64, &opts).unwrap();
        for chunk in data.chunks(256 << 10) {
            z.write_all(chunk).unwrap();
        }
        let out = z.finish(&digest, data.len() as u64, &dir.join(hex::encode(digest)), &opts).unwrap();
        assert!(!spill_path.exists(), "the spill file is renamed or removed");
        assert_eq!(out.0.digest, digest);
        let stored = fs::read(&out.1).unwrap();
        assert_eq!(out.0.stored_size, stored.len() as u64);
        assert_eq!(out.0.blob, <[u8; 32]>::from(Sha256::digest(&stored)), "blob digest is the stored bytes'");
        out
    }

    #[test]
    fn spill_keeps_zstd_when_it_pays() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..6_000_000u32).flat_map(|i| format!("line {}\n", i % 5000).into_bytes()).collect();
        let (entry, path) = spill(&data, dir.path());
        assert_eq!(entry.compression, Compression::Zstd);
        assert!(path.to_string_lossy().ends_with(".zst"));
        assert_eq!(zstd::stream::decode_all(File::open(&path).unwrap()).unwrap(), data);
    }

    #[test]
    fn spill_keeps_raw_bytes_zstd_cannot_shrink() {
        let dir = tempfile::tempdir().unwrap();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let data: Vec<u8> = (0..5_000_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()[0]
            })
            .collect();
        let (entry, path) = spill(&data, dir.path());
        assert_eq!(entry.compression, Compression::None);
        assert_eq!(entry.blob, entry.digest);
        assert_eq!(fs::read(&path).unwrap(), data);
        assert!(!path.with_extension("zst").exists());
    }
}
