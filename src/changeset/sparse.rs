//! PAX sparse members, format 1.0 (GNU tar's `--sparse --format=posix`): the member's data starts
//! with a decimal map (`COUNT\n` then `OFFSET\nLENGTH\n` per chunk, NUL-padded to 512 bytes), followed
//! by the chunks' bytes back to back; everything else is a hole. Old GNU sparse members (typeflag `S`)
//! are expanded by the `tar` crate itself.

use std::io::{self, Read};

/// Most chunks accepted in one map (a bound on the map's memory).
pub const MAX_CHUNKS: u64 = 1 << 20;

/// Where a sparse file's data lies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SparseMap {
    /// (offset, length) of each data chunk, sorted and non-overlapping.
    pub chunks: Vec<(u64, u64)>,
    /// The file's size.
    pub real_size: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SparseError {
    #[error("malformed PAX 1.0 sparse map: {0}")]
    Map(&'static str),
    #[error("sparse map: {0}")]
    Inconsistent(String),
    #[error("reading the sparse map")]
    Io(#[from] io::Error),
}

/// Reads the map from the start of a member's data (`stored` bytes in all) and checks it against the
/// stored size and the real size. Afterwards `r` is positioned at the first chunk's bytes.
pub fn read_map(r: &mut impl Read, stored: u64, real_size: u64) -> Result<SparseMap, SparseError> {
    let mut consumed = 0u64;
    let next_number = |r: &mut dyn Read, consumed: &mut u64| -> Result<u64, SparseError> {
        let mut v: u64 = 0;
        let mut digits = 0;
        loop {
            let mut b = [0u8; 1];
            r.read_exact(&mut b)?;
            *consumed += 1;
            match b[0] {
                b'\n' if digits > 0 => return Ok(v),
                d @ b'0'..=b'9' if digits < 20 => {
                    v = v
                        .checked_mul(10)
                        .and_then(|v| v.checked_add(u64::from(d - b'0')))
                        .ok_or(SparseError::Map("number overflows"))?;
                    digits += 1;
                }
                _ => return Err(SparseError::Map("expected a decimal number and a newline")),
            }
        }
    };
    let count = next_number(r, &mut consumed)?;
    if count > MAX_CHUNKS {
        return Err(SparseError::Map("too many chunks"));
    }
    let mut chunks = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
    let mut end = 0u64;
    let mut data = 0u64;
    for _ in 0..count {
        let off = next_number(r, &mut consumed)?;
        let len = next_number(r, &mut consumed)?;
        let chunk_end = off.checked_add(len).ok_or(SparseError::Map("chunk end overflows"))?;
        if off < end || chunk_end > real_size {
            return Err(SparseError::Inconsistent(format!(
                "chunk {off}+{len} overlaps the previous one or lies beyond the file size {real_size}"
            )));
        }
        end = chunk_end;
        data += len;
        if len > 0 {
            chunks.push((off, len));
        }
    }
    let pad = consumed.next_multiple_of(512) - consumed;
    io::copy(&mut r.take(pad), &mut io::sink())?;
    consumed += pad;
    if consumed + data != stored {
        return Err(SparseError::Inconsistent(format!(
            "map ({consumed} bytes) and chunks ({data} bytes) do not add up to the member's {stored} bytes"
        )));
    }
    Ok(SparseMap { chunks, real_size })
}

/// Expands the chunk bytes read from `inner` into the whole file, holes as zeros.
#[derive(Debug)]
pub struct Expand<R> {
    inner: R,
    map: SparseMap,
    pos: u64,
    chunk: usize,
}

impl<R: Read> Expand<R> {
    pub fn new(inner: R, map: SparseMap) -> Self {
        Expand { inner, map, pos: 0, chunk: 0 }
    }
}

impl<R: Read> Read for Expand<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() || self.pos >= self.map.real_size {
            return Ok(0);
        }
        let (next_off, next_len) = self.map.chunks.get(self.chunk).copied().unwrap_or((self.map.real_size, 0));
        let room = buf.len() as u64;
        if self.pos < next_off {
            let n = usize::try_from((next_off - self.pos).min(room)).expect("bounded by buf.len()");
            buf[..n].fill(0);
            self.pos += n as u64;
            return Ok(n);
        }
        let left = next_off + next_len - self.pos;
        let want = usize::try_from(left.min(room)).expect("bounded by buf.len()");
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "sparse member data ends early"));
        }
        self.pos += n as u64;
        if self.pos == next_off + next_len {
            self.chunk += 1;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_and_expand() {
        let mut stored = b"2\n1\n3\n8\n2\n".to_vec();
        stored.resize(512, 0);
        stored.extend_from_slice(b"abcXY");
        let mut r = &stored[..];
        let map = read_map(&mut r, stored.len() as u64, 12).unwrap();
        assert_eq!(map.chunks, vec![(1, 3), (8, 2)]);
        let mut out = Vec::new();
        Expand::new(r, map).read_to_end(&mut out).unwrap();
        assert_eq!(out, b"\0abc\0\0\0\0XY\0\0");
    }

    #[test]
    fn rejects_overlap() {
        let mut stored = b"2\n0\n4\n2\n2\n".to_vec();
        stored.resize(512 + 6, 0);
        assert!(read_map(&mut &stored[..], stored.len() as u64, 10).is_err());
    }
}
