//! Reading a source image's layers in order: each blob is streamed (verified against its digest),
//! decompressed by sniffing its magic (gzip, zstd, or a plain tar), parsed member by member and
//! applied to the tree; regular-file bytes go to the fingerprinting workers.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read};

use anyhow::{Context, Result};
use erofs::tree::{Extent, FileData, InodeId};
use erofs::writer::MemorySource;

use super::workers::{self, stream_to, Pool};
use crate::oci::types::Descriptor;
use crate::oci::Repo;
use crate::tree::entry::{self, EntryKind};
use crate::tree::merge::Merger;
use crate::tree::sparse::Expand;
use crate::tree::tarstream::TarReader;

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
    /// Files waiting for their digest: job id -> inode.
    pub pending: HashMap<usize, InodeId>,
    /// Contents of files kept inside the index.
    pub inline: MemorySource,
    pub entries: u64,
    pub uncompressed_bytes: u64,
}

/// Counts bytes read (for progress).
struct Counting<R> {
    inner: R,
    pb: Option<indicatif::ProgressBar>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(pb) = &self.pb {
            pb.inc(n as u64);
        }
        Ok(n)
    }
}

/// Applies the layers of `layers` from `repo` to `merger`, in order.
pub fn apply_layers(
    repo: &dyn Repo,
    layers: &[Descriptor],
    merger: &mut Merger,
    pool: &mut Pool,
    inline_max: u64,
    pass: &mut LayerPass,
    pb: Option<&indicatif::ProgressBar>,
) -> Result<()> {
    for (i, desc) in layers.iter().enumerate() {
        let what = format!("layer {} ({})", i + 1, desc.digest);
        apply_layer(repo, desc, merger, pool, inline_max, pass, pb).with_context(|| what.clone())?;
        // Fail fast: a worker error names the layer and the entry itself.
        for r in pool.try_results() {
            match r.result {
                Ok(d) => pending_done(merger, pass, r.id, d),
                Err(e) => return Err(e.context(what)),
            }
        }
    }
    Ok(())
}

/// Records a file's digest in its inode.
pub fn pending_done(merger: &mut Merger, pass: &mut LayerPass, id: usize, digest: erofs::tree::Digest) {
    if let Some(inode) = pass.pending.remove(&id) {
        if let erofs::tree::Kind::Regular(FileData::External { digest: d, .. }) =
            &mut merger.tree_mut().inodes[inode].kind
        {
            *d = digest;
        }
    }
}

fn apply_layer(
    repo: &dyn Repo,
    desc: &Descriptor,
    merger: &mut Merger,
    pool: &mut Pool,
    inline_max: u64,
    pass: &mut LayerPass,
    pb: Option<&indicatif::ProgressBar>,
) -> Result<()> {
    let blob = repo.open_blob(&desc.digest, Some(desc.size))?;
    let counted = Counting { inner: blob, pb: pb.cloned() };
    let stream = Decompressed::sniff(BufReader::with_capacity(1 << 20, counted)).context("reading the blob")?;
    let kind = stream.kind();
    let mut ar = TarReader::new(stream);
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
        let name = crate::tree::show_bytes(&parsed.name);
        last.clone_from(&name);
        let file = match &parsed.kind {
            EntryKind::Regular { size, sparse } => {
                let size = *size;
                pass.uncompressed_bytes += size;
                let mut content: Box<dyn Read + '_> = match sparse {
                    Some(map) => Box::new(Expand::new(&mut data, map.clone())),
                    None => Box::new(&mut data),
                };
                if size <= inline_max {
                    let mut buf = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
                    (&mut content)
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
                    }
                    Some((FileData::Inline { size, extents, source }, None))
                } else {
                    let id = if size <= workers::SPILL as u64 {
                        let mut buf = vec![0u8; usize::try_from(size).expect("at most SPILL")];
                        content
                            .read_exact(&mut buf)
                            .with_context(|| format!("entry {name}: reading its content from the {kind} stream"))?;
                        pool.submit_bytes(size, format!("entry {name}"), buf)
                    } else {
                        let (id, tx) = pool.submit(size, format!("entry {name}"));
                        stream_to(&mut content, size, tx)
                            .with_context(|| format!("entry {name}: reading its content from the {kind} stream"))?;
                        id
                    };
                    Some((FileData::External { size, digest: [0; 32] }, Some(id)))
                }
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
    ar.into_inner().finish().with_context(|| format!("reading the end of the {kind} stream after entry {last}"))?;
    Ok(())
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
