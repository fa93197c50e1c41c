//! Reading a source image's layers in order: each blob is streamed (verified against its digest),
//! decompressed by sniffing its magic (gzip, zstd, or a plain tar), parsed member by member and
//! applied to the tree; regular-file bytes go to the fingerprinting workers.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read};

use anyhow::{Context, Result};
use erofs::tree::{Digest, Extent, FileData, InodeId, Kind};
use erofs::writer::MemorySource;

use super::workers::{self, stream_to, Pool};
use crate::changeset::entry::{self, EntryKind};
use crate::changeset::limits::{Bounded, Counter, CountingReader, LimitError, Limits};
use crate::changeset::merge::Merger;
use crate::changeset::sparse::Expand;
use crate::changeset::tarstream::TarReader;
use crate::oci::types::Descriptor;
use crate::oci::Repo;

/// A decompressing reader chosen by the stream's first bytes.
enum Decompressed<R: BufRead> {
    Plain(R),
    Gzip(flate2::bufread::MultiGzDecoder<R>),
    Zstd(zstd::stream::read::Decoder<'static, R>),
}

impl<R: BufRead> Decompressed<R> {
    fn sniff(mut r: R) -> io::Result<Self> {
        let head = r.fill_buf()?;
        Ok(if head.starts_with(&[0x1f, 0x8b]) {
            Decompressed::Gzip(flate2::bufread::MultiGzDecoder::new(r))
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Decompressed::Zstd(zstd::stream::read::Decoder::with_buffer(r)?)
        } else {
            Decompressed::Plain(r)
        })
    }

    fn kind(&self) -> &'static str {
        match self {
            Decompressed::Plain(_) => "tar",
            Decompressed::Gzip(_) => "gzip",
            Decompressed::Zstd(_) => "zstd",
        }
    }

    /// Reads whatever follows the tar's end, decompressed and compressed, so the blob's digest is
    /// checked over all of its bytes.
    fn finish(mut self) -> io::Result<()> {
        io::copy(&mut self, &mut io::sink())?;
        let mut inner = match self {
            Decompressed::Plain(r) => r,
            Decompressed::Gzip(d) => d.into_inner(),
            Decompressed::Zstd(d) => d.finish(),
        };
        io::copy(&mut inner, &mut io::sink())?;
        Ok(())
    }
}

impl<R: BufRead> Read for Decompressed<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Decompressed::Plain(r) => r.read(buf),
            Decompressed::Gzip(d) => d.read(buf),
            Decompressed::Zstd(d) => d.read(buf),
        }
    }
}

/// What the layer pass produced.
#[derive(Debug, Default)]
pub struct LayerPass {
    /// Files whose content went to the fingerprinting workers: job id -> inode. The merge applies
    /// entries in tar order while the workers hash, so such an inode is created with a zero digest;
    /// [`resolve_digests`] gives each its own once every job has ended, and nothing else writes it.
    pub pending: HashMap<usize, InodeId>,
    /// Digests of the jobs that have ended so far: job id -> content digest.
    pub digests: HashMap<usize, Digest>,
    /// Contents of files kept inside the index.
    pub inline: MemorySource,
    pub entries: u64,
    pub uncompressed_bytes: u64,
    /// Decompressed tar bytes of the layers read so far.
    pub tar_bytes: u64,
    /// PAX and GNU long-name data of the layers read so far.
    pub ext_bytes: u64,
    /// Bytes held in `inline`.
    pub inline_bytes: u64,
}

/// Counts bytes read (for progress, and for the decompression ratio).
struct Counting<R> {
    inner: R,
    pb: Option<indicatif::ProgressBar>,
    counter: Counter,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(pb) = &self.pb {
            pb.inc(n as u64);
        }
        self.counter.add(n as u64);
        Ok(n)
    }
}

/// Applies the layers of `layers` from `repo` to `merger`, in order.
#[allow(clippy::too_many_arguments)]
pub fn apply_layers(
    repo: &dyn Repo,
    layers: &[Descriptor],
    merger: &mut Merger,
    pool: &mut Pool,
    inline_max: u64,
    limits: &Limits,
    pass: &mut LayerPass,
    pb: Option<&indicatif::ProgressBar>,
) -> Result<()> {
    merger.set_max_implicit_parents(limits.max_implicit_parents);
    for (i, desc) in layers.iter().enumerate() {
        let what = format!("layer {} ({})", i + 1, desc.digest);
        apply_layer(repo, desc, merger, pool, inline_max, limits, pass, pb).with_context(|| what.clone())?;
        // Fail fast: a worker error names the layer and the entry itself.
        for r in pool.try_results() {
            match r.result {
                Ok(d) => {
                    pass.digests.insert(r.id, d);
                }
                Err(e) => return Err(e.context(what)),
            }
        }
    }
    Ok(())
}

/// Gives every file whose content the workers fingerprinted its digest, once all jobs have ended and
/// their digests are in `pass.digests`: the one place a pending inode's zero digest is replaced.
pub fn resolve_digests(merger: &mut Merger, pass: &mut LayerPass) -> Result<()> {
    let tree = merger.tree_mut();
    for (id, inode) in pass.pending.drain() {
        let digest =
            pass.digests.get(&id).with_context(|| format!("internal error: file job {id} ended without a digest"))?;
        if let Kind::Regular(FileData::External { digest: d, .. }) = &mut tree.inodes[inode].kind {
            *d = *digest;
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn apply_layer(
    repo: &dyn Repo,
    desc: &Descriptor,
    merger: &mut Merger,
    pool: &mut Pool,
    inline_max: u64,
    limits: &Limits,
    pass: &mut LayerPass,
    pb: Option<&indicatif::ProgressBar>,
) -> Result<()> {
    let blob = repo.open_blob(&desc.digest, Some(desc.size))?;
    let compressed = Counter::default();
    let counted = Counting { inner: blob, pb: pb.cloned(), counter: compressed.clone() };
    let stream = Decompressed::sniff(BufReader::with_capacity(1 << 20, counted)).context("reading the blob")?;
    let kind = stream.kind();
    let bounded = Bounded::new(stream, compressed, pass.tar_bytes, *limits);
    let mut ar = TarReader::with_ext_budget(bounded, pass.ext_bytes, limits.max_pax_bytes);
    let last = ingest_tar(&mut ar, kind, merger, limits, pass, |name, size, content, pass| {
        if size <= inline_max {
            if pass.inline_bytes + size > limits.max_inline_bytes {
                return Err(LimitError::new(
                    format!(
                        "entry {name}: small files (up to --inline-max {inline_max} bytes) held in memory reach {} bytes",
                        pass.inline_bytes + size
                    ),
                    limits.max_inline_bytes,
                    "max-inline-total",
                )
                .into());
            }
            let mut buf = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
            content
                .take(size)
                .read_to_end(&mut buf)
                .with_context(|| format!("entry {name}: reading its content from the {kind} stream"))?;
            if buf.len() as u64 != size {
                anyhow::bail!("entry {name}: content ended after {} of {size} bytes", buf.len());
            }
            let source = pass.inline.files.len() as u64;
            let extents = if size > 0 { vec![Extent { offset: 0, len: size }] } else { Vec::new() };
            if size > 0 {
                pass.inline.insert(source, buf);
                pass.inline_bytes += size;
            }
            Ok((FileData::Inline { size, extents, source }, None))
        } else {
            let id = if size <= workers::SPILL as u64 {
                let mut buf = vec![0u8; usize::try_from(size).expect("at most SPILL")];
                content
                    .read_exact(&mut buf)
                    .with_context(|| format!("entry {name}: reading its content from the {kind} stream"))?;
                pool.submit_bytes(size, format!("entry {name}"), buf)
            } else {
                let (id, tx) = pool.submit(size, format!("entry {name}"));
                stream_to(&mut &mut *content, size, tx)
                    .with_context(|| format!("entry {name}: reading its content from the {kind} stream"))?;
                id
            };
            Ok((FileData::External { size, digest: [0; 32] }, Some(id)))
        }
    })?;
    pass.ext_bytes = ar.ext_bytes();
    let mut bounded = ar.into_inner();
    let end = io::copy(&mut bounded, &mut io::sink()).and_then(|_| {
        let n = bounded.expanded();
        bounded.into_inner().finish().map(|()| n)
    });
    let n = end.with_context(|| format!("reading the end of the {kind} stream after entry {last}"))?;
    pass.tar_bytes += n;
    Ok(())
}

/// Reads every member of a layer's tar stream (`kind` names its compression for messages) and
/// applies it to `merger`, within `limits` (entries, file size, implicit parents; the stream itself
/// bounds bytes and extension data). A regular file's content is handed to `file` (entry name for
/// messages, size, the content as a reader of exactly `size` bytes, holes of sparse members
/// included), which returns the file's data for the tree and, for content still being
/// fingerprinted, its job id. Returns the last entry's name, for messages.
pub fn ingest_tar<R: Read>(
    ar: &mut TarReader<R>,
    kind: &str,
    merger: &mut Merger,
    limits: &Limits,
    pass: &mut LayerPass,
    mut file: impl FnMut(&str, u64, &mut dyn Read, &mut LayerPass) -> Result<(FileData, Option<usize>)>,
) -> Result<String> {
    merger.begin_layer();
    let mut last = String::from("(none yet)");
    loop {
        let member = ar
            .next_member()
            .with_context(|| format!("reading the {kind} stream after entry {last} (truncated or corrupt?)"))?;
        let Some(member) = member else { break };
        let mut data = ar.data();
        let Some(parsed) = entry::parse(&member, &mut data)? else { continue };
        pass.entries += 1;
        let name = crate::changeset::show_bytes(&parsed.name);
        last.clone_from(&name);
        let entries = pass.entries + merger.implicit_dirs();
        if entries > limits.max_entries {
            return Err(LimitError::new(
                format!("entry {name}: {entries} entries (tar members and the directories they imply)"),
                limits.max_entries,
                "max-entries",
            )
            .into());
        }
        let file = match &parsed.kind {
            EntryKind::Regular { size, sparse } => {
                let size = *size;
                if size > limits.max_file_size {
                    return Err(LimitError::new(
                        format!("entry {name}: a file of {size} bytes"),
                        limits.max_file_size,
                        "max-file-size",
                    )
                    .into());
                }
                pass.uncompressed_bytes += size;
                let mut content: Box<dyn Read + '_> = match sparse {
                    Some(map) => Box::new(Expand::new(&mut data, map.clone())),
                    None => Box::new(&mut data),
                };
                Some(file(&name, size, &mut content, pass)?)
            }
            _ => None,
        };
        let (file_data, job) = match file {
            Some((d, j)) => (Some(d), j),
            None => (None, None),
        };
        let created = merger.apply(parsed, file_data)?;
        if let (Some(job), Some(inode)) = (job, created) {
            pass.pending.insert(job, inode);
        }
    }
    Ok(last)
}

/// The work every converter must do, on one core: decompress each layer, walk its tar and sha256
/// every regular file's bytes. Returns (tar bytes, file bytes). The measurement's baseline.
pub fn hash_only(repo: &dyn Repo, layers: &[Descriptor]) -> Result<(u64, u64)> {
    use sha2::Digest as _;
    let (mut tar_bytes, mut file_bytes) = (0u64, 0u64);
    let mut buf = vec![0u8; 256 << 10];
    for desc in layers {
        let blob = repo.open_blob(&desc.digest, Some(desc.size))?;
        let stream = Decompressed::sniff(BufReader::with_capacity(1 << 20, blob))?;
        let mut ar = TarReader::new(stream);
        while let Some(m) = ar.next_member().with_context(|| format!("layer {}", desc.digest))? {
            if !matches!(m.header.entry_type(), tar::EntryType::Regular | tar::EntryType::Continuous) {
                continue;
            }
            let mut h = sha2::Sha256::new();
            let mut data = ar.data();
            loop {
                let n = data.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
                file_bytes += n as u64;
            }
            std::hint::black_box(h.finalize());
        }
        tar_bytes += ar.offset();
        ar.into_inner().finish()?;
    }
    Ok((tar_bytes, file_bytes))
}

/// Merges plain tar layers (bytes) the way [`apply_layers`] does, with the contents kept in memory:
/// files up to `inline_max` inline, larger ones external with their sha256. Then writes the EROFS
/// index of the merged tree into memory and returns its size. The fuzz target (`fuzz/`) and its
/// smoke test run hostile tars through this; every input must end in `Ok` or an error.
pub fn merge_tars_for_fuzzing(layers: &[&[u8]], inline_max: u64, limits: &Limits) -> Result<u64> {
    use sha2::Digest as _;
    let mut merger = Merger::new();
    merger.set_max_implicit_parents(limits.max_implicit_parents);
    let mut pass = LayerPass::default();
    for (i, layer) in layers.iter().enumerate() {
        let compressed = Counter::default();
        let counted = CountingReader { inner: *layer, counter: compressed.clone() };
        let bounded = Bounded::new(counted, compressed, pass.tar_bytes, *limits);
        let mut ar = TarReader::with_ext_budget(bounded, pass.ext_bytes, limits.max_pax_bytes);
        ingest_tar(&mut ar, "tar", &mut merger, limits, &mut pass, |name, size, content, pass| {
            let mut buf = Vec::new();
            content.take(size).read_to_end(&mut buf).with_context(|| format!("entry {name}: reading its content"))?;
            anyhow::ensure!(
                buf.len() as u64 == size,
                "entry {name}: content ended after {} of {size} bytes",
                buf.len()
            );
            if size <= inline_max {
                let source = pass.inline.files.len() as u64;
                let extents = if size > 0 { vec![Extent { offset: 0, len: size }] } else { Vec::new() };
                pass.inline.insert(source, buf);
                Ok((FileData::Inline { size, extents, source }, None))
            } else {
                Ok((FileData::External { size, digest: sha2::Sha256::digest(&buf).into() }, None))
            }
        })
        .with_context(|| format!("layer {}", i + 1))?;
        pass.ext_bytes = ar.ext_bytes();
        pass.tar_bytes += ar.into_inner().expanded();
    }
    let tree = merger.into_tree();
    let mut out = Vec::new();
    erofs::writer::write_image(&tree, &mut pass.inline, &mut out, &erofs::writer::WriteOptions::default())?;
    Ok(out.len() as u64)
}

/// Separates layers in a fuzz input.
pub const FUZZ_LAYER_MARK: &[u8] = b"WISPLAYR";

/// Limits for fuzzing: small enough that no input runs long (a sparse member's holes are read as
/// zeros), large enough for every seed.
pub const FUZZ_LIMITS: Limits = Limits {
    max_entries: 100_000,
    max_file_size: 1 << 20,
    max_total_size: 64 << 20,
    max_ratio: 100,
    max_pax_bytes: 1 << 20,
    max_inline_bytes: 16 << 20,
    max_implicit_parents: 1024,
};

/// A fuzz input's layers: the bytes between [`FUZZ_LAYER_MARK`]s, at most four.
pub fn split_fuzz_input(data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    while out.len() < 3 {
        match rest.windows(FUZZ_LAYER_MARK.len()).position(|w| w == FUZZ_LAYER_MARK) {
            Some(i) => {
                out.push(&rest[..i]);
                rest = &rest[i + FUZZ_LAYER_MARK.len()..];
            }
            None => break,
        }
    }
    out.push(rest);
    out
}
