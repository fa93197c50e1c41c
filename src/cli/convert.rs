//! `wisp convert SRC DST [--store STORE]`: an OCI image into an index image plus objects.

use std::sync::Arc;

use anyhow::{Context, Result};

use crate::changeset::limits::{parse_size, Limits};
use crate::convert::{convert, ConvertOptions, ConvertSummary};
use crate::oci::{self, ImageRef, TransportOptions};
use crate::store::{self, StoreSpec};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Source image: oci:DIR[:TAG], docker-archive:FILE or docker://HOST/REPO:TAG.
    src: ImageRef,
    /// Destination of the index image: oci:DIR[:TAG] or docker://HOST/REPO:TAG.
    dst: ImageRef,
    /// Where objects go: dir:PATH. Default: the destination's repository (registry blobs, or the
    /// OCI layout's blobs), kept alive by object-list manifests.
    #[arg(long, value_name = "STORE")]
    store: Option<StoreSpec>,
    /// Talk plain HTTP to registries (a local registry).
    #[arg(long)]
    plain_http: bool,
    /// Seconds a registry may take to accept a connection or to send the next bytes of an answer
    /// before the request fails (a stalled registry is reported, not waited for). Default: 30, or
    /// $WISP_REGISTRY_TIMEOUT.
    #[arg(long, value_name = "SECS")]
    registry_timeout: Option<f64>,
    /// Keep files of at most this many bytes inside the index instead of as objects.
    #[arg(long, value_name = "BYTES", default_value_t = crate::convert::DEFAULT_INLINE_MAX)]
    inline_max: u64,
    /// zstd level for objects (docs/convert.md: 2 costs 3.6 % more bytes than 3 for a quarter less CPU).
    #[arg(long, default_value_t = 2)]
    zstd_level: i32,
    /// Store an object compressed only when that makes it at most this fraction of its size.
    #[arg(long, default_value_t = 0.95)]
    max_ratio: f64,
    /// Compression of the index layer: zstd (level 9), zstd:LEVEL or gzip. Default: zstd:19 when
    /// the objects upload to a registry (the index is built while they upload), else zstd:9
    /// (docs/convert.md).
    #[arg(long)]
    index_compression: Option<crate::index::LayerCompression>,
    /// Fingerprinting threads (besides the one reading layers).
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Parallel object uploads.
    #[arg(long, default_value_t = 8)]
    upload_jobs: usize,
    /// A startup prefetch list to ship with the index (`wisp/prefetch.list`): one path of a regular
    /// file of the image per line, in first-read order, e.g. from `wisp stats --accessed DIR`.
    #[arg(long, value_name = "FILE")]
    prefetch: Option<std::path::PathBuf>,
    /// Limits on what the source's layers may cost (docs/convert.md, "Limits"); a layer that
    /// exceeds one fails the conversion with an error naming the layer, the entry and the flag.
    #[command(flatten)]
    limits: LimitArgs,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Measurement baseline: only decompress the layers and sha256 every file, on one core; write
    /// nothing (DST and --store are ignored). Prints tar bytes, file bytes and seconds.
    #[arg(long, hide = true)]
    hash_only: bool,
}

/// `wisp convert`'s limits on untrusted layers; the defaults are [`Limits::default`].
#[derive(Debug, clap::Args)]
struct LimitArgs {
    /// Most tar members plus the parent directories they create implicitly, over all layers.
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_entries)]
    max_entries: u64,
    /// Largest regular file (apparent size; K, M, G, T suffixes are binary).
    #[arg(long, value_name = "BYTES", value_parser = parse_size, default_value = "64G")]
    max_file_size: u64,
    /// Most decompressed tar bytes, over all layers.
    #[arg(long, value_name = "BYTES", value_parser = parse_size, default_value = "256G")]
    max_total_size: u64,
    /// Most decompressed bytes per compressed byte of a layer, once it has expanded to 64 MiB.
    #[arg(long, value_name = "RATIO", default_value_t = Limits::default().max_ratio)]
    max_decompression_ratio: u64,
    /// Most bytes of PAX extended headers and GNU long names/link targets, over all layers.
    #[arg(long, value_name = "BYTES", value_parser = parse_size, default_value = "256M")]
    max_pax_bytes: u64,
    /// Most bytes of small files (up to --inline-max) held in memory until the index is written.
    #[arg(long, value_name = "BYTES", value_parser = parse_size, default_value = "256M")]
    max_inline_total: u64,
    /// Most missing parent directories one entry's path may create.
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_implicit_parents)]
    max_implicit_parents: u64,
}

impl LimitArgs {
    fn limits(&self) -> Limits {
        Limits {
            max_entries: self.max_entries,
            max_file_size: self.max_file_size,
            max_total_size: self.max_total_size,
            max_ratio: self.max_decompression_ratio,
            max_pax_bytes: self.max_pax_bytes,
            max_inline_bytes: self.max_inline_total,
            max_implicit_parents: self.max_implicit_parents,
        }
    }
}

pub fn run(a: Args) -> Result<()> {
    let topts = TransportOptions { plain_http: a.plain_http, timeout: oci::registry_timeout(a.registry_timeout) };
    let src = oci::open(&a.src, &topts, false).with_context(|| format!("opening {}", a.src))?;
    if a.hash_only {
        let start = std::time::Instant::now();
        let image = oci::resolve_source(&*src)?;
        let (tar_bytes, file_bytes) = crate::convert::layers::hash_only(&*src, &image.manifest.layers)?;
        let seconds = start.elapsed().as_secs_f64();
        println!("{}", serde_json::json!({"tar_bytes": tar_bytes, "file_bytes": file_bytes, "seconds": seconds}));
        return Ok(());
    }
    let prefetch = match &a.prefetch {
        Some(p) => {
            Some((p.display().to_string(), std::fs::read(p).with_context(|| format!("reading {}", p.display()))?))
        }
        None => None,
    };
    let dst: Arc<dyn oci::Repo> =
        Arc::from(oci::open(&a.dst, &topts, true).with_context(|| format!("opening {}", a.dst))?);
    let store = store::open(a.store.as_ref(), &a.dst, Arc::clone(&dst), true)?;
    let uploads = a.store.is_none() && matches!(a.dst, ImageRef::Docker { .. });
    let index_compression = a.index_compression.unwrap_or(crate::index::LayerCompression::Zstd(if uploads {
        crate::index::INDEX_ZSTD_LEVEL_UPLOAD
    } else {
        crate::index::INDEX_ZSTD_LEVEL
    }));
    let opts = ConvertOptions {
        inline_max: a.inline_max,
        compress: crate::store::compress::CompressOptions { level: a.zstd_level, max_ratio: a.max_ratio },
        workers: a.workers,
        index_compression,
        upload_jobs: a.upload_jobs,
        progress: !a.json,
        prefetch,
        limits: a.limits.limits(),
    };
    let sum = convert(&*src, &*dst, store, a.store.is_none(), &opts)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&sum)?);
    } else {
        print_summary(&sum);
    }
    Ok(())
}

fn mb(b: u64) -> String {
    format!("{:.1} MB", b as f64 / 1e6)
}

fn print_summary(s: &ConvertSummary) {
    eprintln!("wisp convert: {} -> {} (objects in {})", s.source, s.destination, s.store);
    eprintln!(
        "  {} files ({}), {} inline ({}), {} distinct objects ({}), {} deduplicated",
        s.files,
        mb(s.file_bytes),
        s.inline_files,
        mb(s.inline_bytes),
        s.distinct_objects,
        mb(s.distinct_bytes),
        mb(s.bytes_deduplicated)
    );
    eprintln!(
        "  objects stored: {} ({} compressed), {} new ({})",
        mb(s.objects_stored_bytes),
        s.objects_compressed,
        s.objects_written,
        mb(s.objects_written_bytes)
    );
    eprintln!(
        "  index: EROFS {}, map {}, layer {} compressed; {} object list(s); {}",
        mb(s.index_erofs_bytes),
        mb(s.index_map_bytes),
        mb(s.index_layer_bytes),
        s.object_lists,
        s.index_digest
    );
    eprintln!(
        "  time: {:.2}s (layers {:.2}s, storing objects {:.2}s)",
        s.total_seconds, s.merge_seconds, s.store_seconds
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        limits: LimitArgs,
    }

    #[test]
    fn flag_defaults_are_the_library_defaults() {
        let cli = Cli::try_parse_from(["wisp"]).unwrap();
        assert_eq!(cli.limits.limits(), Limits::default());
        let cli = Cli::try_parse_from(["wisp", "--max-file-size", "1K", "--max-entries", "7"]).unwrap();
        assert_eq!(cli.limits.limits().max_file_size, 1024);
        assert_eq!(cli.limits.limits().max_entries, 7);
    }
}
