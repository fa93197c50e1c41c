//! Building the index image from a merged tree, its inline contents and its objects, and pushing
//! it (tag last).

use std::collections::{BTreeMap, HashMap};
use std::io::Write;

use anyhow::{bail, Context, Result};
use erofs::tree::{Digest, Tree};
use erofs::writer::MemorySource;

use super::*;
use crate::object::{Compression, ObjectEntry};
use crate::oci::types::*;
use crate::oci::{Repo, SourceImage};

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
