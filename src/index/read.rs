//! Reading an index image back: resolving a reference to the index image manifest, fetching and
//! unpacking its one layer, and tagging the children of a copied image to keep them alive.

use std::io::{BufReader, Read};

use anyhow::{bail, ensure, Context, Result};

use super::*;
use crate::object::ObjectEntry;
use crate::oci::types::*;
use crate::oci::Repo;

/// An index image as read back.
#[derive(Debug, Clone)]
pub struct Pulled {
    pub manifest_digest: String,
    pub source_digest: Option<String>,
    pub erofs: Vec<u8>,
    pub objects: Vec<ObjectEntry>,
    /// The startup prefetch list ([`PREFETCH_PATH`]), when the image has one.
    pub prefetch: Option<Vec<u8>>,
}

/// Reads the index image a repository reference names (its image index, or the index image manifest
/// itself when copied without the object lists).
pub fn read(repo: &dyn Repo) -> Result<Pulled> {
    let (digest, manifest) = resolve(repo)?;
    read_layer(repo, digest, &manifest)
}

/// The index image manifest a reference names (through its image index, if any), and its digest:
/// a few small requests, so a node that already holds this index need not fetch its layer again.
pub fn resolve(repo: &dyn Repo) -> Result<(String, ImageManifest)> {
    let top = repo.get_manifest(None)?;
    let (digest, manifest) = match parse_manifest(&top.bytes).context("parsing the manifest")? {
        Fetched::Manifest(m) => (top.digest, m),
        Fetched::Index(ix) => {
            let d = ix
                .manifests
                .iter()
                .find(|d| {
                    !d.annotations.contains_key(ANN_REFTYPE) && d.platform.as_ref().map_or(true, |p| p.os != "unknown")
                })
                .with_context(|| format!("{}: the image index lists no index image", repo.describe()))?;
            let child = repo.get_manifest(Some(&d.digest))?;
            match parse_manifest(&child.bytes)? {
                Fetched::Manifest(m) => (child.digest, m),
                Fetched::Index(_) => bail!("{}: nested image index", repo.describe()),
            }
        }
    };
    match manifest.annotations.get(ANN_FORMAT) {
        Some(v) if v == FORMAT_VERSION => {}
        Some(v) => {
            bail!("{}: wisp index format {v} is not supported (this wisp reads {FORMAT_VERSION})", repo.describe())
        }
        None => bail!("{}: not a wisp index image (no {ANN_FORMAT} annotation)", repo.describe()),
    }
    Ok((digest, manifest))
}

/// Fetches and unpacks the one layer of the index image manifest `resolve` returned.
pub fn read_layer(repo: &dyn Repo, digest: String, manifest: &ImageManifest) -> Result<Pulled> {
    let [layer] = manifest.layers.as_slice() else {
        bail!("{}: an index image has exactly one layer, this one {}", repo.describe(), manifest.layers.len());
    };
    let blob = repo.open_blob(&layer.digest, Some(layer.size))?;
    let mut r = BufReader::new(blob);
    let head = std::io::BufRead::fill_buf(&mut r)?;
    let tar_stream: Box<dyn Read> = if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(zstd::stream::read::Decoder::with_buffer(r)?)
    } else if head.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::bufread::MultiGzDecoder::new(r))
    } else {
        Box::new(r)
    };
    let mut ar = tar::Archive::new(tar_stream);
    let (mut erofs_image, mut map, mut prefetch) = (None, None, None);
    const MAX: u64 = 1 << 30;
    for e in ar.entries().with_context(|| format!("reading index layer {}", layer.digest))? {
        let mut e = e.with_context(|| format!("reading index layer {}", layer.digest))?;
        let name = e.path_bytes().into_owned();
        ensure!(e.size() <= MAX, "index layer {}: member of {} bytes", layer.digest, e.size());
        let mut buf = Vec::new();
        e.read_to_end(&mut buf)?;
        match name.as_slice() {
            n if n == INDEX_PATH.as_bytes() => erofs_image = Some(buf),
            n if n == MAP_PATH.as_bytes() => map = Some(buf),
            n if n == PREFETCH_PATH.as_bytes() => prefetch = Some(buf),
            _ => {}
        }
    }
    // Read to the end so the layer digest is verified.
    std::io::copy(&mut ar.into_inner(), &mut std::io::sink())?;
    let erofs = erofs_image.with_context(|| format!("index layer {} has no {INDEX_PATH}", layer.digest))?;
    let map = map.with_context(|| format!("index layer {} has no {MAP_PATH}", layer.digest))?;
    let objects = objmap::decode(&map).with_context(|| format!("index layer {}", layer.digest))?;
    Ok(Pulled {
        manifest_digest: digest,
        source_digest: manifest.annotations.get(ANN_SOURCE).cloned(),
        erofs,
        objects,
        prefetch,
    })
}

/// Gives the children of the index image that `repo`'s reference names their keep-alive tags (after a
/// `skopeo copy --all`, which copies them untagged). Returns the tags written.
pub fn retag(repo: &dyn Repo) -> Result<Vec<String>> {
    let top = repo.get_manifest(None)?;
    let Fetched::Index(index) = parse_manifest(&top.bytes).context("parsing the manifest")? else {
        bail!("{}: not an image index; nothing to keep alive", repo.describe());
    };
    if !index.annotations.contains_key(ANN_FORMAT) {
        bail!("{}: not a wisp index image (no {ANN_FORMAT} annotation)", repo.describe());
    }
    let tag = repo.tag();
    let mut lists = 0;
    let mut written = Vec::new();
    for d in &index.manifests {
        let kind = if d.annotations.get(ANN_REFTYPE).map(String::as_str) == Some("objects") {
            lists += 1;
            format!("objects{}", lists - 1)
        } else {
            "index".to_string()
        };
        let child = repo.get_manifest(Some(&d.digest))?;
        let t = keepalive_tag(&tag, &kind);
        repo.put_manifest(&child.bytes, &d.media_type, Some(&t))?;
        written.push(t);
    }
    Ok(written)
}
