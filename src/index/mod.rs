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

use std::collections::{BTreeMap, HashMap};
use std::io::{BufReader, Read, Write};

use anyhow::{bail, ensure, Context, Result};
use erofs::tree::{Digest, FileData, Kind, Tree};
use erofs::writer::MemorySource;

use crate::object::{Compression, ObjectEntry};
use crate::oci::types::*;
use crate::oci::{Repo, SourceImage};

pub mod objmap;

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
const OBJECTS_CONFIG: &[u8] = br#"{"wisp":"objects","version":1}"#;
/// Objects per list manifest: about 160 bytes of JSON each, so a list stays near 1.6 MB, well under
/// the 4 MiB manifest limit of common registries.
pub const OBJECTS_PER_LIST: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerCompression {
    Gzip,
    /// zstd at this level.
    Zstd(i32),
}

impl std::str::FromStr for LayerCompression {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "gzip" => Ok(LayerCompression::Gzip),
            "zstd" => Ok(LayerCompression::Zstd(INDEX_ZSTD_LEVEL)),
            _ => match s.strip_prefix("zstd:").map(str::parse::<i32>) {
                Some(Ok(level)) if (1..=22).contains(&level) => Ok(LayerCompression::Zstd(level)),
                _ => bail!("{s}: use gzip, zstd or zstd:LEVEL (1-22)"),
            },
        }
    }
}

/// Everything the index image consists of, ready to push.
#[derive(Debug, Clone)]
pub struct Built {
    pub erofs_bytes: u64,
    pub map_bytes: u64,
    pub layer: Vec<u8>,
    pub layer_desc: Descriptor,
    pub config: Vec<u8>,
    pub manifest: Vec<u8>,
    pub object_lists: Vec<Vec<u8>>,
    pub index: Vec<u8>,
}

/// zstd level of the index layer (docs/convert.md: 9 is within 0.5 % of 12-15's size at a
/// sixth of level 16's time; 16 saves another 5 %, `--index-compression zstd:16`).
pub const INDEX_ZSTD_LEVEL: i32 = 9;
/// zstd level of the index layer when the objects upload to a registry: the index is built while
/// they upload (seconds), so the smallest index costs no wall time there (docs/convert.md).
pub const INDEX_ZSTD_LEVEL_UPLOAD: i32 = 19;

/// Compresses a tar as one layer blob.
pub fn compress_layer(tar: &[u8], c: LayerCompression) -> Result<(Vec<u8>, &'static str)> {
    Ok(match c {
        LayerCompression::Zstd(level) => (zstd::bulk::compress(tar, level)?, MT_OCI_LAYER_ZSTD),
        LayerCompression::Gzip => {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
            enc.write_all(tar)?;
            (enc.finish()?, MT_OCI_LAYER_GZIP)
        }
    })
}

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

fn desc(media_type: &str, bytes: &[u8]) -> Descriptor {
    Descriptor {
        media_type: media_type.into(),
        digest: sha256_digest(bytes),
        size: bytes.len() as u64,
        ..Default::default()
    }
}

/// Builds the index image for `tree`, whose external files are the `objects`.
pub fn build(
    tree: &Tree,
    inline: &MemorySource,
    objects: &HashMap<Digest, ObjectEntry>,
    source: &SourceImage,
    with_object_lists: bool,
    compression: LayerCompression,
    prefetch: Option<&[u8]>,
) -> Result<Built> {
    let mut erofs_image = Vec::new();
    let stats = erofs::writer::write_image(
        tree,
        &mut inline.clone(),
        &mut erofs_image,
        &erofs::writer::WriteOptions::default(),
    )
    .context("writing the EROFS index")?;
    let mut map = Vec::with_capacity(stats.devices.len());
    for d in &stats.devices {
        let e = objects
            .get(&d.digest)
            .with_context(|| format!("internal error: no object entry for {}", hex::encode(d.digest)))?;
        map.push(*e);
    }
    let map_bytes = objmap::encode(&map);
    let tar = layer_tar(&erofs_image, &map_bytes, prefetch)?;
    let diff_id = sha256_digest(&tar);
    let (layer, layer_mt) = compress_layer(&tar, compression)?;
    let layer_desc = desc(layer_mt, &layer);

    let mut config = source.config.clone();
    let obj = config.as_object_mut().context("the source config is not a JSON object")?;
    obj.insert("rootfs".into(), serde_json::json!({"type": "layers", "diff_ids": [diff_id]}));
    let mut history: Vec<serde_json::Value> = obj
        .get("history")
        .and_then(|h| h.as_array())
        .map(|h| h.iter().filter(|e| e["empty_layer"].as_bool() == Some(true)).cloned().collect())
        .unwrap_or_default();
    history.push(serde_json::json!({
        "created_by": format!("wisp convert (index of {})", source.manifest_digest),
        "comment": "wisp index: EROFS metadata; file contents are objects named by sha256",
    }));
    obj.insert("history".into(), serde_json::Value::Array(history));
    let config_bytes = serde_json::to_vec(&config)?;

    let mut annotations = BTreeMap::new();
    annotations.insert(ANN_FORMAT.to_string(), FORMAT_VERSION.to_string());
    annotations.insert(ANN_SOURCE.to_string(), source.manifest_digest.clone());
    let manifest = ImageManifest {
        schema_version: 2,
        media_type: Some(MT_OCI_MANIFEST.into()),
        artifact_type: None,
        config: desc(MT_OCI_CONFIG, &config_bytes),
        layers: vec![layer_desc.clone()],
        annotations: annotations.clone(),
    };
    let manifest_bytes = serde_json::to_vec(&manifest)?;

    let mut object_lists = Vec::new();
    if with_object_lists {
        let mut blobs: Vec<&ObjectEntry> = objects.values().collect();
        blobs.sort_by_key(|e| e.blob);
        blobs.dedup_by_key(|e| e.blob);
        for chunk in blobs.chunks(OBJECTS_PER_LIST) {
            let list = ImageManifest {
                schema_version: 2,
                media_type: Some(MT_OCI_MANIFEST.into()),
                artifact_type: None,
                config: desc(MT_OBJECTS_CONFIG, OBJECTS_CONFIG),
                layers: chunk
                    .iter()
                    .map(|e| Descriptor {
                        media_type: match e.compression {
                            Compression::None => MT_OBJECT.into(),
                            Compression::Zstd => MT_OBJECT_ZSTD.into(),
                        },
                        digest: e.blob_digest(),
                        size: e.stored_size,
                        ..Default::default()
                    })
                    .collect(),
                annotations: BTreeMap::from([(ANN_REFTYPE.to_string(), "objects".to_string())]),
            };
            object_lists.push(serde_json::to_vec(&list)?);
        }
    }

    let platform = Platform {
        architecture: source.config["architecture"].as_str().unwrap_or("amd64").to_string(),
        os: source.config["os"].as_str().unwrap_or("linux").to_string(),
        variant: source.config["variant"].as_str().map(str::to_string),
    };
    let mut manifests = vec![Descriptor { platform: Some(platform), ..desc(MT_OCI_MANIFEST, &manifest_bytes) }];
    for l in &object_lists {
        manifests.push(Descriptor {
            platform: Some(Platform { architecture: "unknown".into(), os: "unknown".into(), variant: None }),
            annotations: BTreeMap::from([(ANN_REFTYPE.to_string(), "objects".to_string())]),
            ..desc(MT_OCI_MANIFEST, l)
        });
    }
    let index = ImageIndex { schema_version: 2, media_type: Some(MT_OCI_INDEX.into()), manifests, annotations };
    Ok(Built {
        erofs_bytes: erofs_image.len() as u64,
        map_bytes: map_bytes.len() as u64,
        layer,
        layer_desc,
        config: config_bytes,
        manifest: manifest_bytes,
        object_lists,
        index: serde_json::to_vec(&index)?,
    })
}

/// Pushes a built index image; the tag is set last. Returns the digest of the tagged image index.
pub fn push(dst: &dyn Repo, b: &Built) -> Result<String> {
    let what = || format!("writing the index image to {}", dst.describe());
    dst.put_blob(&sha256_digest(&b.config), &b.config).with_context(what)?;
    dst.put_blob(&b.layer_desc.digest, &b.layer).with_context(what)?;
    if !b.object_lists.is_empty() {
        dst.put_blob(&sha256_digest(OBJECTS_CONFIG), OBJECTS_CONFIG).with_context(what)?;
    }
    let tag = dst.tag();
    let keep = |kind: &str| keepalive_tag(&tag, kind);
    for (i, l) in b.object_lists.iter().enumerate() {
        dst.put_manifest(l, MT_OCI_MANIFEST, Some(&keep(&format!("objects{i}")))).with_context(what)?;
    }
    dst.put_manifest(&b.manifest, MT_OCI_MANIFEST, Some(&keep("index"))).with_context(what)?;
    dst.put_manifest(&b.index, MT_OCI_INDEX, Some(&tag)).with_context(what)
}

/// The tag that pins a child of the image index tagged `tag`: registries whose garbage collector
/// deletes untagged manifests (distribution 2.8 `garbage-collect --delete-untagged`) delete an
/// index's untagged children too, so each child carries a tag of its own: `TAG-wisp-index`,
/// `TAG-wisp-objects0`, ... (a long TAG is shortened to a hash).
pub fn keepalive_tag(tag: &str, kind: &str) -> String {
    let base = if tag.len() <= 100 { tag.to_string() } else { sha256_digest(tag.as_bytes())[7..39].to_string() };
    format!("{base}-wisp-{kind}")
}

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

/// Every regular file reachable in `tree` with its absolute path (`/usr/bin/python3`), depth-first in
/// name order; a hard-linked file appears under each of its names.
pub fn regular_files(tree: &Tree) -> Vec<(Vec<u8>, &FileData)> {
    let mut out = Vec::new();
    let mut stack: Vec<(Vec<u8>, usize)> = vec![(Vec::new(), 0)];
    while let Some((path, id)) = stack.pop() {
        match &tree.inodes[id].kind {
            Kind::Directory(entries) => {
                for (name, &child) in entries.iter().rev() {
                    let mut p = path.clone();
                    p.push(b'/');
                    p.extend_from_slice(name);
                    stack.push((p, child));
                }
            }
            Kind::Regular(data) => out.push((path, data)),
            _ => {}
        }
    }
    out
}

/// Checks a prefetch list against the image `tree` and returns it normalized (one absolute path per
/// line; blank lines and `#` comments dropped). A path that is not a regular file of the image is an
/// error naming `name`, the line and the path.
pub fn check_prefetch(tree: &Tree, text: &[u8], name: &str) -> Result<Vec<u8>> {
    let files: std::collections::HashSet<Vec<u8>> = regular_files(tree).into_iter().map(|(p, _)| p).collect();
    let mut out = Vec::new();
    for (i, line) in text.split(|&b| b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() || line.starts_with(b"#") {
            continue;
        }
        let mut path = Vec::with_capacity(line.len() + 1);
        if !line.starts_with(b"/") {
            path.push(b'/');
        }
        path.extend_from_slice(line);
        if !files.contains(&path) {
            bail!("{name}:{}: {}: not a regular file of the image", i + 1, String::from_utf8_lossy(line));
        }
        out.extend_from_slice(&path);
        out.push(b'\n');
    }
    Ok(out)
}
