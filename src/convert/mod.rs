//! `wisp convert`: source image -> merged tree -> objects in a store + an index image.
//!
//! Order of effects, so that a failure leaves nothing partial behind: every layer is read and
//! verified, and every object staged (in a private staging directory) before anything is stored;
//! then the objects that a surviving path references are stored (each atomically, existing ones
//! skipped); then the index image's blobs and manifests; its tag last.

pub mod layers;
pub mod workers;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result};
use erofs::tree::{Digest, FileData, Kind};
use serde::Serialize;

use crate::changeset::merge::{reachable, Merger};
use crate::index;
use crate::object::ObjectEntry;
use crate::oci::Repo;
use crate::store::compress::CompressOptions;
use crate::store::ObjectStore;

/// Files up to this size stay inside the index (docs/convert.md has the measurement).
pub const DEFAULT_INLINE_MAX: u64 = 2048;

#[derive(Debug, Clone)]
pub struct ConvertOptions {
    pub inline_max: u64,
    pub compress: CompressOptions,
    pub workers: usize,
    pub index_compression: index::LayerCompression,
    /// Parallel object uploads.
    pub upload_jobs: usize,
    pub progress: bool,
    /// A startup prefetch list (its name for errors, its text) to ship as `wisp/prefetch.list`.
    pub prefetch: Option<(String, Vec<u8>)>,
    /// What the source's layers may cost (entries, sizes, expansion, metadata, memory).
    pub limits: crate::changeset::limits::Limits,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            inline_max: DEFAULT_INLINE_MAX,
            compress: CompressOptions::default(),
            workers: 2,
            index_compression: index::LayerCompression::Zstd(index::INDEX_ZSTD_LEVEL),
            upload_jobs: 8,
            progress: false,
            prefetch: None,
            limits: crate::changeset::limits::Limits::default(),
        }
    }
}

/// What a conversion did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ConvertSummary {
    pub source: String,
    pub source_digest: String,
    pub destination: String,
    pub index_digest: String,
    pub store: String,
    pub layers: usize,
    pub layer_bytes_compressed: u64,
    pub tar_entries: u64,
    pub tar_file_bytes: u64,
    /// Regular files in the merged tree (hard links once).
    pub files: u64,
    pub file_bytes: u64,
    pub inline_files: u64,
    pub inline_bytes: u64,
    pub distinct_objects: u64,
    pub distinct_bytes: u64,
    /// Bytes of external file content not stored again thanks to identical content.
    pub bytes_deduplicated: u64,
    pub objects_compressed: u64,
    pub objects_stored_bytes: u64,
    pub objects_written: u64,
    pub objects_written_bytes: u64,
    pub index_erofs_bytes: u64,
    pub index_map_bytes: u64,
    pub index_layer_bytes: u64,
    pub object_lists: usize,
    pub merge_seconds: f64,
    pub store_seconds: f64,
    /// Building the EROFS index and the object map and compressing the index layer; this runs
    /// while the objects are stored (part of `store_seconds` when storing takes longer).
    pub index_build_seconds: f64,
    /// After the objects are stored: waiting for the index build to end, then writing the index
    /// image.
    pub index_seconds: f64,
    pub total_seconds: f64,
}

/// A private staging directory, removed with everything in it when dropped.
struct Staging(PathBuf);

impl Staging {
    fn new(parent: Option<PathBuf>) -> Result<Self> {
        let parent = parent.unwrap_or_else(std::env::temp_dir);
        std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
        let dir = tempfile::Builder::new().prefix(".wisp-staging-").tempdir_in(&parent)?;
        Ok(Staging(dir.keep()))
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Converts the image in `src` into objects in `store` and an index image in `dst`.
pub fn convert(
    src: &dyn Repo,
    dst: &dyn Repo,
    store: Arc<dyn ObjectStore>,
    store_is_dst: bool,
    opts: &ConvertOptions,
) -> Result<ConvertSummary> {
    let start = Instant::now();
    let source = crate::oci::resolve_source(src).with_context(|| format!("reading {}", src.describe()))?;
    let mut sum = ConvertSummary {
        source: src.describe(),
        source_digest: source.manifest_digest.clone(),
        destination: dst.describe(),
        store: store.describe(),
        layers: source.manifest.layers.len(),
        layer_bytes_compressed: source.manifest.layers.iter().map(|l| l.size).sum(),
        ..Default::default()
    };
    let staging = Staging::new(store.staging_parent())?;
    let mut pool = workers::Pool::new(opts.workers, &staging.0, Arc::clone(&store), opts.compress);
    let mut merger = Merger::new();
    let mut pass = layers::LayerPass::default();
    let pb = opts.progress.then(|| crate::progress::bytes(sum.layer_bytes_compressed, "layers"));
    let applied = layers::apply_layers(
        src,
        &source.manifest.layers,
        &mut merger,
        &mut pool,
        opts.inline_max,
        &opts.limits,
        &mut pass,
        pb.as_ref(),
    );
    let (results, staged) = pool.finish();
    if let Some(pb) = &pb {
        pb.finish_and_clear();
    }
    applied?;
    for r in results {
        pass.digests.insert(r.id, r.result?);
    }
    layers::resolve_digests(&mut merger, &mut pass)?;
    sum.tar_entries = pass.entries;
    sum.tar_file_bytes = pass.uncompressed_bytes;
    sum.merge_seconds = start.elapsed().as_secs_f64();
    let tree = merger.into_tree();
    let prefetch = match &opts.prefetch {
        Some((name, text)) => Some(index::check_prefetch(&tree, text, name)?),
        None => None,
    };

    // What survives: reachable files and the objects they name.
    let mut used: BTreeMap<Digest, u64> = BTreeMap::new();
    for id in reachable(&tree) {
        if let Kind::Regular(data) = &tree.inodes[id].kind {
            sum.files += 1;
            sum.file_bytes += data.size();
            match data {
                FileData::External { size, digest } => {
                    used.insert(*digest, *size);
                }
                FileData::Inline { size, .. } => {
                    sum.inline_files += 1;
                    sum.inline_bytes += size;
                }
            }
        }
    }
    sum.distinct_objects = used.len() as u64;
    sum.distinct_bytes = used.values().sum();
    sum.bytes_deduplicated = sum.file_bytes - sum.inline_bytes - sum.distinct_bytes;

    // Store the surviving objects.
    let store_start = Instant::now();
    let todo: Vec<(ObjectEntry, Option<PathBuf>)> = used
        .keys()
        .map(|d| {
            let s =
                staged.get(d).with_context(|| format!("internal error: object {} was not staged", hex::encode(d)))?;
            Ok((s.entry, s.path.clone()))
        })
        .collect::<Result<_>>()?;
    let entries: HashMap<Digest, ObjectEntry> = todo.iter().map(|(e, _)| (e.digest, *e)).collect();
    for e in entries.values() {
        sum.objects_stored_bytes += e.stored_size;
        if e.compression == crate::object::Compression::Zstd {
            sum.objects_compressed += 1;
        }
    }
    // The index image is built (EROFS, object map, compression) while the objects are stored: it
    // needs only their entries. It is pushed after them.
    let (stored, built, index_start) = std::thread::scope(|s| {
        let index = s.spawn(|| {
            let t = Instant::now();
            let built = index::build(
                &tree,
                &pass.inline,
                &entries,
                &source,
                store_is_dst,
                opts.index_compression,
                prefetch.as_deref(),
            );
            (built, t.elapsed().as_secs_f64())
        });
        let stored = store_objects(&*store, &todo, opts);
        sum.store_seconds = store_start.elapsed().as_secs_f64();
        let after_store = Instant::now();
        (stored, index.join(), after_store)
    });
    let (written, written_bytes) = stored?;
    sum.objects_written = written;
    sum.objects_written_bytes = written_bytes;
    let (built, build_seconds) = match built {
        Ok(b) => b,
        Err(panic) => std::panic::resume_unwind(panic),
    };
    let built = built?;
    sum.index_erofs_bytes = built.erofs_bytes;
    sum.index_map_bytes = built.map_bytes;
    sum.index_layer_bytes = built.layer.len() as u64;
    sum.object_lists = built.object_lists.len();
    sum.index_digest = index::push(dst, &built)?;
    sum.index_build_seconds = build_seconds;
    sum.index_seconds = index_start.elapsed().as_secs_f64();
    sum.total_seconds = start.elapsed().as_secs_f64();
    drop(staging);
    Ok(sum)
}

/// Puts staged objects into the store with up to `opts.upload_jobs` in parallel. Returns how many
/// were written and their stored bytes.
fn store_objects(
    store: &dyn ObjectStore,
    todo: &[(ObjectEntry, Option<PathBuf>)],
    opts: &ConvertOptions,
) -> Result<(u64, u64)> {
    let pending: Vec<&(ObjectEntry, Option<PathBuf>)> = todo.iter().filter(|(_, p)| p.is_some()).collect();
    let pb = opts.progress.then(|| crate::progress::count(pending.len() as u64, "objects"));
    let next = Mutex::new(0usize);
    let counts = Mutex::new((0u64, 0u64));
    let failed: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..opts.upload_jobs.max(1) {
            s.spawn(|| loop {
                if failed.lock().expect("lock").is_some() {
                    return;
                }
                let i = {
                    let mut n = next.lock().expect("lock");
                    let i = *n;
                    *n += 1;
                    i
                };
                let Some((entry, Some(path))) = pending.get(i).copied() else { return };
                match store.put(entry, path) {
                    Ok(w) => {
                        if w {
                            let mut c = counts.lock().expect("lock");
                            c.0 += 1;
                            c.1 += entry.stored_size;
                        }
                        if let Some(pb) = &pb {
                            pb.inc(1);
                        }
                    }
                    Err(e) => {
                        failed.lock().expect("lock").get_or_insert(e);
                        return;
                    }
                }
            });
        }
    });
    if let Some(pb) = &pb {
        pb.finish_and_clear();
    }
    if let Some(e) = failed.into_inner().expect("lock") {
        return Err(e);
    }
    Ok(counts.into_inner().expect("lock"))
}
