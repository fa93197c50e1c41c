//! Hostile layers cost bounded memory: `wisp convert` runs as a subprocess under `/usr/bin/time`
//! (peak RSS of the child) on layers written here as streams (never held, or stored, at their
//! expanded size): a 10 MB gzip that expands to 10 GiB of zeros, and a layer of 10^6 empty files.
//! Each is rejected with an error naming the layer, the entry and the flag, or converted, within
//! 512 MiB. Limits are raised and lowered through their flags.

mod common;

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{have, require, wisp_bin};
use sha2::{Digest as _, Sha256};

const RSS_LIMIT_KIB: u64 = 512 << 10;

/// Writes a blob into `dir/blobs/sha256/` while hashing it; `finish` names it by its digest.
struct BlobWriter {
    tmp: PathBuf,
    out: BufWriter<File>,
    hash: Sha256,
    size: u64,
}

impl BlobWriter {
    fn new(layout: &Path) -> Self {
        let blobs = layout.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).unwrap();
        let tmp = blobs.join("incoming");
        BlobWriter { out: BufWriter::new(File::create(&tmp).unwrap()), tmp, hash: Sha256::new(), size: 0 }
    }

    /// The blob's digest and size.
    fn finish(mut self) -> (String, u64) {
        self.out.flush().unwrap();
        let digest = format!("sha256:{}", hex::encode(self.hash.finalize()));
        std::fs::rename(&self.tmp, self.tmp.with_file_name(&digest[7..])).unwrap();
        (digest, self.size)
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.out.write(buf)?;
        self.hash.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

fn put(layout: &Path, bytes: &[u8]) -> (String, u64) {
    let mut w = BlobWriter::new(layout);
    w.write_all(bytes).unwrap();
    w.finish()
}

/// Completes an OCI layout (tag `t`) around gzip layers already written with [`BlobWriter`].
fn finish_layout(layout: &Path, layers: &[(String, u64)]) {
    std::fs::write(layout.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let diff_ids: Vec<&str> = layers.iter().map(|(d, _)| d.as_str()).collect();
    let config = serde_json::to_vec(&serde_json::json!({"architecture": "amd64", "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids}}))
    .unwrap();
    let (cd, cs) = put(layout, &config);
    let layers: Vec<_> = layers
        .iter()
        .map(|(d, s)| serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": s}))
        .collect();
    let manifest = serde_json::to_vec(&serde_json::json!({"schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
        "layers": layers}))
    .unwrap();
    let (md, ms) = put(layout, &manifest);
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": md, "size": ms, "annotations": {"org.opencontainers.image.ref.name": "t"}}]});
    std::fs::write(layout.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
}

fn header(path: &str, kind: tar::EntryType, size: u64) -> [u8; 512] {
    let mut h = tar::Header::new_ustar();
    h.set_path(path).unwrap();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(if kind == tar::EntryType::Directory { 0o755 } else { 0o644 });
    h.set_mtime(1_700_000_000);
    h.set_uid(0);
    h.set_gid(0);
    h.set_cksum();
    *h.as_bytes()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// A gzip layer of one regular file `bomb` of 10 GiB of zeros, about 10 MB: gzip members
/// back to back (a valid gzip stream), the zeros one 64 MiB member written 160 times.
fn bomb_layout(layout: &Path) -> String {
    const SIZE: u64 = 10 << 30;
    const PIECE: usize = 64 << 20;
    let mut w = BlobWriter::new(layout);
    w.write_all(&gzip(&header("bomb", tar::EntryType::Regular, SIZE))).unwrap();
    let zeros = gzip(&vec![0u8; PIECE]);
    for _ in 0..SIZE / PIECE as u64 {
        w.write_all(&zeros).unwrap();
    }
    w.write_all(&gzip(&[0u8; 1024])).unwrap(); // end of archive
    let (digest, size) = w.finish();
    assert!(size < 11_000_000, "the bomb layer is {size} bytes");
    finish_layout(layout, &[(digest.clone(), size)]);
    digest
}

/// A gzip layer of `dirs` directories of `per_dir` empty files each, streamed.
fn empty_files_layout(layout: &Path, dirs: u32, per_dir: u32) -> String {
    let mut gz = flate2::write::GzEncoder::new(BlobWriter::new(layout), flate2::Compression::fast());
    for d in 0..dirs {
        gz.write_all(&header(&format!("d{d:04}/"), tar::EntryType::Directory, 0)).unwrap();
        for f in 0..per_dir {
            gz.write_all(&header(&format!("d{d:04}/empty-file-{f:06}"), tar::EntryType::Regular, 0)).unwrap();
        }
    }
    gz.write_all(&[0u8; 1024]).unwrap();
    let (digest, size) = gz.finish().unwrap().finish();
    finish_layout(layout, &[(digest.clone(), size)]);
    digest
}

/// Runs `wisp convert` on `src` under `/usr/bin/time`; returns (success, stderr, peak RSS in KiB).
fn convert(src: &Path, work: &Path, extra: &[&str]) -> (bool, String, u64) {
    let rss_file = work.join("rss");
    let out = work.join("out");
    let store = work.join("store");
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_dir_all(&store);
    let o = Command::new("/usr/bin/time")
        .args(["-f", "%M", "-o"])
        .arg(&rss_file)
        .arg(wisp_bin())
        .arg("convert")
        .arg(format!("oci:{}:t", src.display()))
        .arg(format!("oci:{}:t", out.display()))
        .arg("--store")
        .arg(format!("dir:{}", store.display()))
        .args(extra)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    let rss_text = std::fs::read_to_string(&rss_file).unwrap();
    // On failure time(1) writes "Command exited with non-zero status N" before the number.
    let rss: u64 = rss_text.lines().last().and_then(|l| l.trim().parse().ok()).expect("time -f %M output");
    (o.status.success(), stderr, rss)
}

fn ready() -> bool {
    require(have("/usr/bin/time"), "needs /usr/bin/time (package time)")
}

#[test]
fn gzip_bomb_is_rejected_in_bounded_memory() {
    if !ready() {
        return;
    }
    let t = tempfile::tempdir_in("/var/tmp").unwrap();
    let src = t.path().join("src");
    let digest = bomb_layout(&src);

    let (ok, err, rss) = convert(&src, t.path(), &[]);
    eprintln!("default limits: peak RSS {rss} KiB: {}", err.trim());
    assert!(!ok, "the bomb converted:\n{err}");
    for want in [digest.as_str(), "layer 1", "entry bomb", "expands", "max-decompression-ratio"] {
        assert!(err.contains(want), "error does not mention {want:?}:\n{err}");
    }
    assert!(rss < RSS_LIMIT_KIB, "peak RSS {rss} KiB");

    // With the ratio raised, the size limit stops it before its content is read.
    let (ok, err, rss) = convert(&src, t.path(), &["--max-decompression-ratio", "100000", "--max-file-size", "1G"]);
    eprintln!("ratio raised, 1 GiB files: peak RSS {rss} KiB: {}", err.trim());
    assert!(!ok, "the bomb converted:\n{err}");
    for want in [digest.as_str(), "entry bomb", "10737418240", "max-file-size"] {
        assert!(err.contains(want), "error does not mention {want:?}:\n{err}");
    }
    assert!(rss < RSS_LIMIT_KIB, "peak RSS {rss} KiB");

    // ... and so does the total.
    let (ok, err, _) = convert(&src, t.path(), &["--max-decompression-ratio", "100000", "--max-total-size", "100M"]);
    assert!(!ok, "the bomb converted:\n{err}");
    for want in [digest.as_str(), "entry bomb", "max-total-size"] {
        assert!(err.contains(want), "error does not mention {want:?}:\n{err}");
    }
}

#[test]
fn a_million_empty_files_convert_in_bounded_memory() {
    if !ready() {
        return;
    }
    let t = tempfile::tempdir_in("/var/tmp").unwrap();
    let src = t.path().join("src");
    let digest = empty_files_layout(&src, 1000, 1000);

    let (ok, err, rss) = convert(&src, t.path(), &[]);
    eprintln!("10^6 empty files: peak RSS {rss} KiB: {}", err.trim());
    assert!(ok, "conversion failed:\n{err}");
    assert!(rss < RSS_LIMIT_KIB, "peak RSS {rss} KiB");

    // The entry limit, lowered: a clear error naming the layer and the entry where it was hit.
    let (ok, err, _) = convert(&src, t.path(), &["--max-entries", "500000"]);
    assert!(!ok, "conversion succeeded:\n{err}");
    for want in [digest.as_str(), "entry d0499/empty-file-000500", "500001 entries", "max-entries"] {
        assert!(err.contains(want), "error does not mention {want:?}:\n{err}");
    }
}
