//! Building an index image, pushing it to an OCI layout and reading it back. Each document is checked
//! by reading the layout's files with serde_json, sha2, zstd and tar directly and decoding the object
//! map by hand, not through this module's readers; then [`super::read`] must return the same.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Read;
use std::path::Path;

use erofs::tree::{Digest, Extent, FileData, Inode, Kind, Metadata, Tree};
use erofs::writer::MemorySource;
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

use super::*;
use crate::object::{Compression, ObjectEntry};
use crate::oci::layout::Layout;
use crate::oci::types::{ImageManifest, MT_OCI_MANIFEST};
use crate::oci::{Repo, SourceImage};

const SOURCE: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

fn meta(perm: u16) -> Metadata {
    Metadata { perm, uid: 0, gid: 0, mtime: 1_700_000_000, mtime_nsec: 5 }
}

fn dir_add(tree: &mut Tree, parent: usize, name: &str, inode: Inode) -> usize {
    let id = tree.push(inode);
    tree.entries_mut(parent).unwrap().insert(name.as_bytes().to_vec(), id);
    id
}

/// `/etc/hostname` inline, `/usr/bin/tool` (zstd object) and `/big` with a hard link `/big-link`
/// (uncompressed object).
fn sample() -> (Tree, MemorySource, HashMap<Digest, ObjectEntry>, SourceImage) {
    let mut tree = Tree::new(meta(0o755));
    let etc = dir_add(&mut tree, 0, "etc", Inode::new(Kind::Directory(BTreeMap::new()), meta(0o755)));
    let host = FileData::Inline { size: 5, extents: vec![Extent { offset: 0, len: 5 }], source: 0 };
    dir_add(&mut tree, etc, "hostname", Inode::new(Kind::Regular(host), meta(0o644)));
    let usr = dir_add(&mut tree, 0, "usr", Inode::new(Kind::Directory(BTreeMap::new()), meta(0o755)));
    let bin = dir_add(&mut tree, usr, "bin", Inode::new(Kind::Directory(BTreeMap::new()), meta(0o755)));
    let tool = FileData::External { size: 10_000, digest: [0x11; 32] };
    dir_add(&mut tree, bin, "tool", Inode::new(Kind::Regular(tool), meta(0o755)));
    let big = FileData::External { size: 5_000, digest: [0x05; 32] };
    let big = dir_add(&mut tree, 0, "big", Inode::new(Kind::Regular(big), meta(0o600)));
    tree.entries_mut(0).unwrap().insert(b"big-link".to_vec(), big);
    let mut inline = MemorySource::new();
    inline.insert(0, b"wisp\n".to_vec());
    let objects = HashMap::from([
        (
            [0x11; 32],
            ObjectEntry {
                digest: [0x11; 32],
                blob: [0xb1; 32],
                size: 10_000,
                stored_size: 300,
                compression: Compression::Zstd,
            },
        ),
        (
            [0x05; 32],
            ObjectEntry {
                digest: [0x05; 32],
                blob: [0x05; 32],
                size: 5_000,
                stored_size: 5_000,
                compression: Compression::None,
            },
        ),
    ]);
    let config = json!({
        "architecture": "arm64", "os": "linux", "config": {"Env": ["A=1"]}, "unknown": 7,
        "rootfs": {"type": "layers", "diff_ids": ["sha256:1", "sha256:2"]},
        "history": [{"created_by": "ENV A=1", "empty_layer": true}, {"created_by": "ADD x"}],
    });
    let source = SourceImage { manifest_digest: SOURCE.into(), manifest: ImageManifest::default(), config };
    (tree, inline, objects, source)
}

fn sha_hex(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

fn blob(layout: &Path, digest: &str) -> Vec<u8> {
    let bytes = fs::read(layout.join("blobs/sha256").join(digest.strip_prefix("sha256:").unwrap())).unwrap();
    assert_eq!(sha_hex(&bytes), digest, "a layout blob is named by its sha256");
    bytes
}

fn json_blob(layout: &Path, digest: &str) -> Value {
    serde_json::from_slice(&blob(layout, digest)).unwrap()
}

/// The object map, decoded from the format in `objmap.rs`'s documentation.
fn decode_map(b: &[u8]) -> Vec<(Digest, Digest, u64, u64, u8)> {
    assert_eq!(&b[..8], b"WISPMAP1");
    let n = u32::from_le_bytes(b[8..12].try_into().unwrap()) as usize;
    assert_eq!(b.len(), 16 + 88 * n);
    b[16..]
        .chunks(88)
        .map(|c| {
            let u = |o: usize| u64::from_le_bytes(c[o..o + 8].try_into().unwrap());
            assert_eq!(&c[81..], &[0; 7]);
            (c[..32].try_into().unwrap(), c[32..64].try_into().unwrap(), u(64), u(72), c[80])
        })
        .collect()
}

#[test]
fn an_index_image_is_built_pushed_and_read_back() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (tree, inline, objects, source) = sample();
    let built =
        build(&tree, &inline, &objects, &source, true, LayerCompression::Zstd(3), Some(b"/etc/hostname\n")).unwrap();
    let layout = Layout::open(dir, Some("v1".into()), true).unwrap();
    let top_digest = push(&layout, &built).unwrap();

    // index.json: the tag and the keep-alive tags of both children.
    let index_json: Value = serde_json::from_slice(&fs::read(dir.join("index.json")).unwrap()).unwrap();
    let tagged: HashMap<String, String> = index_json["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["annotations"]["org.opencontainers.image.ref.name"].as_str().unwrap().into(),
                d["digest"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(tagged["v1"], top_digest);

    let top = json_blob(dir, &top_digest);
    assert_eq!(top["mediaType"], "application/vnd.oci.image.index.v1+json");
    assert_eq!(top["annotations"]["org.wisp.format.version"], "1");
    let children = top["manifests"].as_array().unwrap();
    assert_eq!(children.len(), 2);
    assert_eq!(children[0]["platform"], json!({"architecture": "arm64", "os": "linux"}));
    assert_eq!(children[1]["platform"], json!({"architecture": "unknown", "os": "unknown"}));
    assert_eq!(children[1]["annotations"]["org.wisp.reference.type"], "objects");
    let manifest_digest = children[0]["digest"].as_str().unwrap();
    assert_eq!(tagged["v1-wisp-index"], manifest_digest);
    assert_eq!(tagged["v1-wisp-objects0"], children[1]["digest"].as_str().unwrap());

    // The index image manifest, its config and its one layer.
    let manifest = json_blob(dir, manifest_digest);
    assert_eq!(manifest["annotations"], json!({"org.wisp.format.version": "1", "org.wisp.source.digest": SOURCE}));
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1);
    assert_eq!(layers[0]["mediaType"], "application/vnd.oci.image.layer.v1.tar+zstd");
    let layer = blob(dir, layers[0]["digest"].as_str().unwrap());
    let tar_bytes = zstd::stream::decode_all(layer.as_slice()).unwrap();
    let config = json_blob(dir, manifest["config"]["digest"].as_str().unwrap());
    assert_eq!(config["rootfs"], json!({"type": "layers", "diff_ids": [sha_hex(&tar_bytes)]}));
    assert_eq!(config["unknown"], 7, "the source config is kept");
    assert_eq!(config["config"], json!({"Env": ["A=1"]}));
    let history = config["history"].as_array().unwrap();
    assert_eq!(history.len(), 2, "empty-layer entries and one for the index layer: {history:?}");
    assert_eq!(history[0]["created_by"], "ENV A=1");

    let mut members = Vec::new();
    let mut ar = tar::Archive::new(tar_bytes.as_slice());
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let h = e.header().clone();
        assert_eq!((h.mode().unwrap(), h.mtime().unwrap(), h.uid().unwrap(), h.gid().unwrap()), (0o444, 0, 0, 0));
        let mut b = Vec::new();
        e.read_to_end(&mut b).unwrap();
        members.push((String::from_utf8(e.path_bytes().into_owned()).unwrap(), b));
    }
    let names: Vec<&str> = members.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["wisp/index.erofs", "wisp/objects.map", "wisp/prefetch.list"]);
    assert_eq!(members[2].1, b"/etc/hostname\n");

    // The EROFS index names each object once (a hard link is one file), and the map lists exactly those.
    let image = erofs::reader::Image::open(members[0].1.as_slice()).unwrap();
    let back = image.read_tree().unwrap();
    let mut external: Vec<(Digest, u64)> = back
        .inodes
        .iter()
        .filter_map(|i| match &i.kind {
            Kind::Regular(FileData::External { size, digest }) => Some((*digest, *size)),
            _ => None,
        })
        .collect();
    external.sort();
    assert_eq!(external, [([0x05; 32], 5_000), ([0x11; 32], 10_000)]);
    let map = decode_map(&members[1].1);
    assert_eq!(map, [([0x05; 32], [0x05; 32], 5_000, 5_000, 0), ([0x11; 32], [0xb1; 32], 10_000, 300, 1)]);

    // The object list: every object's blob, by blob digest.
    let list = json_blob(dir, children[1]["digest"].as_str().unwrap());
    assert_eq!(list["config"]["mediaType"], "application/vnd.wisp.objects.config.v1+json");
    let blobs: Vec<(String, String, u64)> = list["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (l["mediaType"].as_str().unwrap().into(), l["digest"].as_str().unwrap().into(), l["size"].as_u64().unwrap())
        })
        .collect();
    assert_eq!(
        blobs,
        [
            ("application/vnd.wisp.object.v1".into(), format!("sha256:{}", "05".repeat(32)), 5_000),
            ("application/vnd.wisp.object.v1+zstd".into(), format!("sha256:{}", "b1".repeat(32)), 300),
        ]
    );

    // And the module's own reader returns the same.
    let pulled = read(&layout).unwrap();
    assert_eq!(pulled.manifest_digest, manifest_digest);
    assert_eq!(pulled.source_digest.as_deref(), Some(SOURCE));
    assert_eq!(pulled.erofs, members[0].1);
    assert_eq!(pulled.prefetch.as_deref(), Some(&b"/etc/hostname\n"[..]));
    let mut want: Vec<ObjectEntry> = objects.values().copied().collect();
    want.sort_by_key(|e| e.digest);
    assert_eq!(pulled.objects, want);
    assert_eq!(built.erofs_bytes, members[0].1.len() as u64);
    assert_eq!(built.map_bytes, members[1].1.len() as u64);
}

#[test]
fn a_gzip_index_without_object_lists_reads_back_and_other_images_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (tree, inline, objects, source) = sample();
    let built = build(&tree, &inline, &objects, &source, false, LayerCompression::Gzip, None).unwrap();
    assert!(built.object_lists.is_empty());
    let layout = Layout::open(dir, Some("g".into()), true).unwrap();
    let top = json_blob(dir, &push(&layout, &built).unwrap());
    assert_eq!(top["manifests"].as_array().unwrap().len(), 1);
    let manifest = json_blob(dir, top["manifests"][0]["digest"].as_str().unwrap());
    assert_eq!(manifest["layers"][0]["mediaType"], "application/vnd.oci.image.layer.v1.tar+gzip");
    let layer = blob(dir, manifest["layers"][0]["digest"].as_str().unwrap());
    assert_eq!(&layer[..2], &[0x1f, 0x8b], "a gzip stream");
    let pulled = read(&layout).unwrap();
    assert_eq!(pulled.objects.len(), 2);
    assert!(pulled.prefetch.is_none());

    // The manifest alone, tagged (as `skopeo copy` without --all leaves it), reads too.
    let solo = Layout::open(dir, Some("solo".into()), true).unwrap();
    solo.put_manifest(&built.manifest, MT_OCI_MANIFEST, Some("solo")).unwrap();
    assert_eq!(read(&solo).unwrap().erofs, pulled.erofs);

    // A manifest without the format annotation, or with another format version, is refused by name.
    let mut m: Value = serde_json::from_slice(&built.manifest).unwrap();
    m["annotations"] = json!({});
    let plain = Layout::open(dir, Some("plain".into()), true).unwrap();
    plain.put_manifest(&serde_json::to_vec(&m).unwrap(), MT_OCI_MANIFEST, Some("plain")).unwrap();
    let err = format!("{:#}", read(&plain).unwrap_err());
    assert!(err.contains("not a wisp index image (no org.wisp.format.version annotation)"), "{err}");
    m["annotations"] = json!({"org.wisp.format.version": "2"});
    let future = Layout::open(dir, Some("future".into()), true).unwrap();
    future.put_manifest(&serde_json::to_vec(&m).unwrap(), MT_OCI_MANIFEST, Some("future")).unwrap();
    let err = format!("{:#}", read(&future).unwrap_err());
    assert!(err.contains("wisp index format 2 is not supported"), "{err}");
}

#[test]
fn prefetch_lists_name_regular_files_of_the_image() {
    let (tree, ..) = sample();
    let files: Vec<String> = regular_files(&tree).into_iter().map(|(p, _)| String::from_utf8(p).unwrap()).collect();
    assert_eq!(files, ["/big", "/big-link", "/etc/hostname", "/usr/bin/tool"]);
    let ok = check_prefetch(&tree, b"# startup\nusr/bin/tool\r\n\n/big-link\n", "list").unwrap();
    assert_eq!(ok, b"/usr/bin/tool\n/big-link\n");
    let err = check_prefetch(&tree, b"/big\n/etc\n", "list").unwrap_err().to_string();
    assert_eq!(err, "list:2: /etc: not a regular file of the image");
}
