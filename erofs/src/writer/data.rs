//! Regular-file data stored in the image: extent validation, the choice between a flat layout and a
//! sparse chunk-based one, and streaming a file's bytes from its [`ContentSource`] in bounded pieces.

use super::{ContentSource, WriteError};
use crate::format::{BLOCK_BITS, BLOCK_SIZE};
use crate::tree::Extent;

/// Largest chunk: `chunk_info.format` holds `chunkbits - blkbits` in 5 bits.
pub(crate) const MAX_CHUNK_BITS: u8 = BLOCK_BITS + 31;

/// Size of the buffer file bytes are streamed through.
const COPY_BUF: usize = 128 * 1024;

/// Extents must be in order, not overlap, and lie within the file. Empty extents are ignored.
pub(crate) fn check_extents(size: u64, extents: &[Extent]) -> Result<(), &'static str> {
    let mut prev_end = 0u64;
    for e in extents {
        let end = e.offset.checked_add(e.len).ok_or("extent end overflows")?;
        if e.len == 0 {
            continue;
        }
        if e.offset < prev_end {
            return Err("extents overlap or are not sorted");
        }
        if end > size {
            return Err("extent beyond the file size");
        }
        prev_end = end;
    }
    Ok(())
}

/// Whether the extents cover every byte of the file (no hole).
pub(crate) fn is_dense(size: u64, extents: &[Extent]) -> bool {
    let mut covered = 0u64;
    for e in extents.iter().filter(|e| e.len > 0) {
        if e.offset != covered {
            return false;
        }
        covered = e.offset + e.len;
    }
    covered == size
}

/// `ceil(log2(x))` for x >= 1.
pub(crate) fn ceil_log2(x: u64) -> u32 {
    if x <= 1 {
        0
    } else {
        64 - (x - 1).leading_zeros()
    }
}

/// Number of chunks of `1 << bits` bytes covering `size` bytes.
pub(crate) fn chunk_count(size: u64, bits: u8) -> u64 {
    size.div_ceil(1u64 << bits)
}

/// Bytes chunk `c` occupies when stored: a whole chunk, except the last one, which ends at the file's
/// last block (the kernel reads `min(chunk, round_up(size - start, 4096))`).
fn stored_chunk_bytes(size: u64, bits: u8, c: u64) -> u64 {
    let start = c << bits;
    (1u64 << bits).min((size - start).div_ceil(BLOCK_SIZE) * BLOCK_SIZE)
}

/// The chunks of a sparse file that hold data, ascending and without repeats.
pub(crate) fn data_chunks(extents: &[Extent], bits: u8) -> impl Iterator<Item = u64> + '_ {
    let mut next_free = 0u64;
    extents.iter().filter(|e| e.len > 0).flat_map(move |e| {
        let first = (e.offset >> bits).max(next_free);
        let end = ((e.offset + e.len - 1) >> bits) + 1;
        next_free = next_free.max(end);
        first..end
    })
}

/// Stored bytes of a sparse file at chunk size `1 << bits` (without walking every chunk).
fn stored_bytes(size: u64, extents: &[Extent], bits: u8) -> u128 {
    let last_chunk = chunk_count(size, bits).saturating_sub(1);
    let mut total: u128 = 0;
    let mut next_free = 0u64; // first chunk not yet counted
    for e in extents.iter().filter(|e| e.len > 0) {
        let first = (e.offset >> bits).max(next_free);
        let end = (e.offset + e.len - 1) >> bits;
        if end < first {
            continue;
        }
        let n = u128::from(end - first + 1);
        total += n << bits;
        if end == last_chunk {
            total -= u128::from((1u64 << bits) - stored_chunk_bytes(size, bits, last_chunk));
        }
        next_free = end + 1;
    }
    total
}

/// Chunk size for a sparse file stored in the image: the one that minimizes index bytes plus stored
/// bytes. Chunks no larger than the alignment of the hole boundaries keep every hole a hole; a larger
/// chunk is only chosen when the index it saves outweighs the zeros it stores.
pub(crate) fn choose_sparse_chunkbits(size: u64, extents: &[Extent]) -> u8 {
    let max_bits = u8::try_from(ceil_log2(size)).unwrap_or(MAX_CHUNK_BITS).clamp(BLOCK_BITS, MAX_CHUNK_BITS);
    let mut best = (u128::MAX, BLOCK_BITS);
    for bits in BLOCK_BITS..=max_bits {
        let cost = u128::from(chunk_count(size, bits)) * 8 + stored_bytes(size, extents, bits);
        if cost < best.0 {
            best = (cost, bits);
        }
    }
    best.1
}

/// Data blocks a sparse file occupies at chunk size `1 << bits`.
pub(crate) fn sparse_blocks(size: u64, extents: &[Extent], bits: u8) -> Result<u64, WriteError> {
    u64::try_from(stored_bytes(size, extents, bits) / u128::from(BLOCK_SIZE))
        .map_err(|_| WriteError::Overflow { what: "data blocks" })
}

/// Writes bytes `[start, end)` of a file to `out`: content inside extents, zeros elsewhere (holes and
/// the padding past the end of the file).
pub(crate) fn stream_range(
    out: &mut dyn FnMut(&[u8]) -> Result<(), WriteError>,
    content: &mut dyn ContentSource,
    source: u64,
    extents: &[Extent],
    start: u64,
    end: u64,
    buf: &mut Vec<u8>,
) -> Result<(), WriteError> {
    if buf.len() < COPY_BUF {
        buf.resize(COPY_BUF, 0);
    }
    let first = extents.partition_point(|e| e.offset + e.len <= start);
    let mut pos = start;
    for e in extents[first..].iter().filter(|e| e.len > 0) {
        if pos >= end {
            break;
        }
        let (es, ee) = (e.offset.max(pos), (e.offset + e.len).min(end));
        if es >= end {
            break;
        }
        write_zeros(out, es - pos, buf)?;
        let mut p = es;
        while p < ee {
            let n = usize::try_from((ee - p).min(COPY_BUF as u64)).unwrap_or(COPY_BUF);
            let piece = &mut buf[..n];
            content.read_at(source, p, piece).map_err(|error| WriteError::Content {
                source_id: source,
                offset: p,
                len: n,
                error,
            })?;
            out(piece)?;
            p += n as u64;
        }
        pos = ee;
    }
    if pos < end {
        write_zeros(out, end - pos, buf)?;
    }
    Ok(())
}

fn write_zeros(
    out: &mut dyn FnMut(&[u8]) -> Result<(), WriteError>,
    mut n: u64,
    buf: &mut [u8],
) -> Result<(), WriteError> {
    if n == 0 {
        return Ok(());
    }
    let len = buf.len();
    buf.fill(0);
    while n > 0 {
        let k = usize::try_from(n.min(len as u64)).unwrap_or(len);
        out(&buf[..k])?;
        n -= k as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(v: &[(u64, u64)]) -> Vec<Extent> {
        v.iter().map(|&(offset, len)| Extent { offset, len }).collect()
    }

    #[test]
    fn extents_validation() {
        assert!(check_extents(10, &ext(&[(0, 5), (5, 5)])).is_ok());
        assert!(check_extents(10, &ext(&[(0, 5), (4, 5)])).is_err());
        assert!(check_extents(10, &ext(&[(5, 6)])).is_err());
        assert!(check_extents(10, &ext(&[(u64::MAX, 2)])).is_err());
        assert!(is_dense(10, &ext(&[(0, 5), (5, 5)])));
        assert!(is_dense(0, &[]));
        assert!(!is_dense(10, &ext(&[(0, 5)])));
        assert!(!is_dense(10, &[]));
    }

    #[test]
    fn data_chunks_dedup() {
        let e = ext(&[(0, 10), (100, 10), (5000, 10), (9000, 8000)]);
        let got: Vec<u64> = data_chunks(&e, 12).collect();
        assert_eq!(got, vec![0, 1, 2, 3, 4]);
        let e = ext(&[(0, 1), (8192, 1)]);
        assert_eq!(data_chunks(&e, 12).collect::<Vec<_>>(), vec![0, 2]);
    }

    #[test]
    fn chunk_choice_keeps_aligned_holes() {
        // 1 MiB file, data in the first and last 64 KiB: 64 KiB chunks keep the hole.
        let e = ext(&[(0, 65536), ((1 << 20) - 65536, 65536)]);
        let bits = choose_sparse_chunkbits(1 << 20, &e);
        assert_eq!(bits, 16);
        assert_eq!(sparse_blocks(1 << 20, &e, bits).unwrap(), 32);
        // huge mostly-empty file: bigger chunks to keep the index small, data still small
        let e = ext(&[(0, 4096)]);
        let size = 1u64 << 40;
        let bits = choose_sparse_chunkbits(size, &e);
        let cost = chunk_count(size, bits) * 8 + sparse_blocks(size, &e, bits).unwrap() * 4096;
        assert!(cost < 16 << 20, "bits {bits} cost {cost}");
        // unaligned hole boundaries: the covering blocks are stored
        let e = ext(&[(10, 10), (9000, 10)]);
        assert_eq!(choose_sparse_chunkbits(20000, &e), 12);
        assert_eq!(sparse_blocks(20000, &e, 12).unwrap(), 2);
        // last chunk stored only up to the end of the file's last block
        let e = ext(&[(20000, 1)]);
        assert_eq!(sparse_blocks(20001, &e, 12).unwrap(), 1);
    }
}
