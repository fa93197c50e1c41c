//! The index image, wisp's one OCI image per converted image: building it from a merged tree and its
//! objects, pushing it, resolving and reading it back, keeping its children alive, and its startup
//! prefetch list. [`objmap`] is the format of its object map. docs/convert.md has the full
//! description:
//!
//! ```text
//! tag ──► image index (application/vnd.oci.image.index.v1+json)
//!           ├─ index image manifest  platform = the source's (os/architecture)
//!           │    config  = the source config, rootfs.diff_ids and history rewritten for one layer
//!           │    layer   = tar+zstd (or tar+gzip) holding wisp/index.erofs and wisp/objects.map
//!           │    annotations org.wisp.format.version, org.wisp.source.digest
//!           └─ object lists (0..n)   platform = unknown/unknown, org.wisp.reference.type = objects
//!                config  = {"wisp":"objects","version":1}
//!                layers  = the object blobs (application/vnd.wisp.object.v1[+zstd])
//! ```
//! Object lists exist only when the objects live in the same repository; they are what keeps those
//! blobs alive through registry garbage collection and what `skopeo copy --all` carries along.
//! Platform matchers (containerd, docker, skopeo without --all) skip `unknown/unknown` entries.

mod build;
pub mod objmap;
mod prefetch;
mod read;
#[cfg(test)]
mod tests;

use anyhow::Result;

use crate::oci::types::sha256_digest;

pub use build::{build, compress_layer, push, Built, LayerCompression, INDEX_ZSTD_LEVEL, INDEX_ZSTD_LEVEL_UPLOAD};
pub use prefetch::{check_prefetch, regular_files};
pub use read::{read, read_layer, resolve, retag, Pulled};

pub const FORMAT_VERSION: &str = "1";
pub const INDEX_PATH: &str = "wisp/index.erofs";
pub const MAP_PATH: &str = "wisp/objects.map";
/// Optional: the startup prefetch list, one absolute path of a regular file per line, in the order a
/// container first read them (docs/convert.md). Readers that do not know it ignore it.
pub const PREFETCH_PATH: &str = "wisp/prefetch.list";
pub const ANN_FORMAT: &str = "org.wisp.format.version";
pub const ANN_SOURCE: &str = "org.wisp.source.digest";
pub const ANN_REFTYPE: &str = "org.wisp.reference.type";
pub const MT_OBJECTS_CONFIG: &str = "application/vnd.wisp.objects.config.v1+json";
pub const MT_OBJECT: &str = "application/vnd.wisp.object.v1";
pub const MT_OBJECT_ZSTD: &str = "application/vnd.wisp.object.v1+zstd";
pub(crate) const OBJECTS_CONFIG: &[u8] = br#"{"wisp":"objects","version":1}"#;
/// Objects per list manifest: about 160 bytes of JSON each, so a list stays near 1.6 MB, well under
/// the 4 MiB manifest limit of common registries.
pub const OBJECTS_PER_LIST: usize = 10_000;

fn tar_of(files: &[(&str, &[u8])]) -> Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, bytes) in files {
        let mut h = tar::Header::new_ustar();
        h.set_path(name)?;
        h.set_size(bytes.len() as u64);
        h.set_mode(0o444);
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        b.append(&h, *bytes)?;
    }
    Ok(b.into_inner()?)
}

/// The uncompressed index layer (its sha256 is the layer's diff id): `wisp/index.erofs`,
/// `wisp/objects.map` and the optional `wisp/prefetch.list`, in that order, with fixed headers (mode
/// 0444, uid and gid 0, mtime 0). Deterministic, so the files a runtime unpacked from an index layer
/// rebuild the same bytes: the containerd snapshotter checks an unpacked layer against its diff id so.
pub fn layer_tar(erofs: &[u8], map: &[u8], prefetch: Option<&[u8]>) -> Result<Vec<u8>> {
    let mut members: Vec<(&str, &[u8])> = vec![(INDEX_PATH, erofs), (MAP_PATH, map)];
    if let Some(list) = prefetch {
        members.push((PREFETCH_PATH, list));
    }
    tar_of(&members)
}

/// The tag that pins a child of the image index tagged `tag`: registries whose garbage collector
/// deletes untagged manifests (distribution 2.8 `garbage-collect --delete-untagged`) delete an
/// index's untagged children too, so each child carries a tag of its own: `TAG-wisp-index`,
/// `TAG-wisp-objects0`, ... (a long TAG is shortened to a hash).
pub fn keepalive_tag(tag: &str, kind: &str) -> String {
    let base = if tag.len() <= 100 { tag.to_string() } else { sha256_digest(tag.as_bytes())[7..39].to_string() };
    format!("{base}-wisp-{kind}")
}
