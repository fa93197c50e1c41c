//! A streaming tar reader (POSIX.1-2001 pax, ustar, GNU): headers are parsed with the `tar` crate's
//! [`tar::Header`], everything between them here, with bounds:
//!
//! - PAX extended headers (`x`) are parsed by their record lengths, so binary values (xattrs with
//!   newlines) survive; global headers (`g`) are skipped;
//! - GNU long names and link targets (`L`, `K`) are bounded by PATH_MAX;
//! - old GNU sparse members (`S`, with extension blocks) are turned into a [`SparseMap`].
//!
//! Nothing is ever read into memory beyond those bounded extension blocks; member data is a `Read`.

use std::io::{self, Read};

use super::limits::LimitError;
use super::sparse::SparseMap;

const BLOCK: u64 = 512;
/// Largest PAX extended header data accepted for one member (all its `x` headers together).
pub const MAX_PAX: u64 = 1 << 20;
/// Largest GNU long name / link target block accepted.
pub const MAX_LONGNAME: u64 = 4096;
/// Most old-GNU sparse chunks accepted.
const MAX_GNU_SPARSE: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum TarError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("header at byte {offset}: checksum mismatch (not a tar stream, or corrupt)")]
    Checksum { offset: u64 },
    #[error("header at byte {offset}: {what}")]
    Header { offset: u64, what: String },
    #[error("archive ends inside a member (truncated)")]
    Truncated,
    #[error("header at byte {offset}: {limit}")]
    Limit { offset: u64, limit: LimitError },
}

/// PAX records as (key, value) pairs, in order.
pub type PaxRecords = Vec<(Vec<u8>, Vec<u8>)>;

/// One member with its extension headers folded in.
#[derive(Debug, Clone)]
pub struct Member {
    pub header: tar::Header,
    pub name: Vec<u8>,
    pub link: Option<Vec<u8>>,
    /// PAX records that apply to this member, in order.
    pub pax: Vec<(Vec<u8>, Vec<u8>)>,
    /// Bytes of data stored in the archive for this member.
    pub stored_size: u64,
    /// The member's logical size (PAX `size`, or the GNU sparse real size).
    pub size: u64,
    pub gnu_sparse: Option<SparseMap>,
}

#[derive(Debug)]
pub struct TarReader<R> {
    inner: R,
    offset: u64,
    /// Data bytes of the current member not yet consumed, and the padding after them.
    remaining: u64,
    pad: u64,
    done: bool,
    /// Extension data (PAX headers, GNU long names) read so far, and how much may be read in all.
    ext_bytes: u64,
    max_ext_bytes: u64,
}

impl<R: Read> TarReader<R> {
    pub fn new(inner: R) -> Self {
        TarReader { inner, offset: 0, remaining: 0, pad: 0, done: false, ext_bytes: 0, max_ext_bytes: u64::MAX }
    }

    /// A reader that fails once the extension data it reads (PAX `x` and `g` headers, GNU `L` and
    /// `K` blocks) would exceed `max` bytes, of which `used` were already read elsewhere (earlier
    /// layers of the same image).
    pub fn with_ext_budget(inner: R, used: u64, max: u64) -> Self {
        TarReader { ext_bytes: used, max_ext_bytes: max, ..Self::new(inner) }
    }

    /// Extension data read so far (plus the `used` given to [`TarReader::with_ext_budget`]).
    pub fn ext_bytes(&self) -> u64 {
        self.ext_bytes
    }

    pub fn into_inner(self) -> R {
        self.inner
    }

    /// Bytes of the archive consumed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    fn skip(&mut self, n: u64) -> Result<(), TarError> {
        let got = io::copy(&mut (&mut self.inner).take(n), &mut io::sink())?;
        self.offset += got;
        if got != n {
            return Err(TarError::Truncated);
        }
        Ok(())
    }

    /// Reads a whole block; `Ok(false)` at a clean end of stream.
    fn block(&mut self, buf: &mut [u8; 512]) -> Result<bool, TarError> {
        let mut n = 0;
        while n < buf.len() {
            match self.inner.read(&mut buf[n..]) {
                Ok(0) if n == 0 => return Ok(false),
                Ok(0) => return Err(TarError::Truncated),
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.offset += BLOCK;
        Ok(true)
    }

    fn read_ext(&mut self, size: u64, max: u64, what: &str, offset: u64) -> Result<Vec<u8>, TarError> {
        if size > max {
            return Err(TarError::Header { offset, what: format!("{what} of {size} bytes (at most {max})") });
        }
        let total = self.ext_bytes.saturating_add(size);
        if total > self.max_ext_bytes {
            let limit = LimitError::new(
                format!("{total} bytes of PAX headers and GNU long names, with this {what}"),
                self.max_ext_bytes,
                "max-pax-bytes",
            );
            return Err(TarError::Limit { offset, limit });
        }
        self.ext_bytes = total;
        let mut buf = vec![0u8; usize::try_from(size).expect("bounded")];
        self.inner.read_exact(&mut buf).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => TarError::Truncated,
            _ => e.into(),
        })?;
        self.offset += size;
        self.skip(size.next_multiple_of(BLOCK) - size)?;
        Ok(buf)
    }

    /// The next member, or `None` at the end of the archive.
    pub fn next_member(&mut self) -> Result<Option<Member>, TarError> {
        if self.done {
            return Ok(None);
        }
        let (rem, pad) = (self.remaining, self.pad);
        self.remaining = 0;
        self.pad = 0;
        self.skip(rem + pad)?;
        let mut pax: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut long_name = None;
        let mut long_link = None;
        let mut pax_bytes = 0u64;
        loop {
            let offset = self.offset;
            let mut buf = [0u8; 512];
            if !self.block(&mut buf)? {
                if !pax.is_empty() || long_name.is_some() || long_link.is_some() {
                    return Err(TarError::Truncated);
                }
                self.done = true;
                return Ok(None);
            }
            if buf.iter().all(|&b| b == 0) {
                self.done = true;
                return Ok(None);
            }
            let header = tar::Header::from_byte_slice(&buf).clone();
            check_sum(&buf).map_err(|()| TarError::Checksum { offset })?;
            let hdr_err = |what: String| TarError::Header { offset, what };
            let stored = header.entry_size().map_err(|e| hdr_err(format!("size: {e}")))?;
            match buf[156] {
                b'x' => {
                    pax_bytes = pax_bytes.saturating_add(stored);
                    if pax_bytes > MAX_PAX {
                        return Err(hdr_err(format!(
                            "PAX headers of {pax_bytes} bytes for one member (at most {MAX_PAX})"
                        )));
                    }
                    let data = self.read_ext(stored, MAX_PAX, "PAX header", offset)?;
                    for (k, v) in parse_pax(&data).map_err(hdr_err)? {
                        // An empty value unsets the keyword (POSIX pax).
                        pax.retain(|(key, _)| *key != k);
                        if !v.is_empty() {
                            pax.push((k, v));
                        }
                    }
                    continue;
                }
                b'g' => {
                    self.read_ext(stored, MAX_PAX, "PAX global header", offset)?;
                    continue;
                }
                b'L' => {
                    long_name = Some(trim_nul(self.read_ext(stored, MAX_LONGNAME, "GNU long name", offset)?));
                    continue;
                }
                b'K' => {
                    long_link = Some(trim_nul(self.read_ext(stored, MAX_LONGNAME, "GNU long link", offset)?));
                    continue;
                }
                _ => {}
            }
            let pax_get = |k: &[u8]| pax.iter().rev().find(|(key, _)| key == k).map(|(_, v)| v.clone());
            let name = pax_get(b"path").or(long_name).unwrap_or_else(|| header.path_bytes().into_owned());
            let link = pax_get(b"linkpath").or(long_link).or_else(|| header.link_name_bytes().map(|l| l.into_owned()));
            let mut size = stored;
            if let Some(v) = pax_get(b"size") {
                size = std::str::from_utf8(&v)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| hdr_err("PAX size is not a number".into()))?;
            }
            let mut stored_size = size;
            let mut gnu_sparse = None;
            if buf[156] == b'S' {
                let (map, real) = self.gnu_sparse(&buf, offset)?;
                stored_size = stored;
                size = real;
                gnu_sparse = Some(SparseMap { chunks: map, real_size: real });
            }
            let is_data = matches!(buf[156], b'0' | 0 | b'7' | b'S');
            if !is_data {
                stored_size = if buf[156] == b'1' || buf[156] == b'2' { 0 } else { stored_size };
            }
            self.remaining = stored_size;
            self.pad = stored_size.next_multiple_of(BLOCK) - stored_size;
            return Ok(Some(Member { header, name, link, pax, stored_size, size, gnu_sparse }));
        }
    }

    /// Parses an old GNU sparse header and its extension blocks.
    fn gnu_sparse(&mut self, buf: &[u8; 512], offset: u64) -> Result<(Vec<(u64, u64)>, u64), TarError> {
        let err = |what: &str| TarError::Header { offset, what: format!("GNU sparse header: {what}") };
        let mut chunks = Vec::new();
        let mut add = |e: &[u8]| -> Result<bool, TarError> {
            if e.iter().all(|&b| b == 0) {
                return Ok(false);
            }
            let off = num(&e[..12]).ok_or_else(|| err("bad offset"))?;
            let len = num(&e[12..24]).ok_or_else(|| err("bad length"))?;
            if chunks.len() >= MAX_GNU_SPARSE {
                return Err(err("too many chunks"));
            }
            chunks.push((off, len));
            Ok(true)
        };
        for i in 0..4 {
            add(&buf[386 + 24 * i..410 + 24 * i])?;
        }
        let real = num(&buf[483..495]).ok_or_else(|| err("bad real size"))?;
        let mut extended = buf[482] != 0;
        while extended {
            let mut ext = [0u8; 512];
            if !self.block(&mut ext)? {
                return Err(TarError::Truncated);
            }
            for i in 0..21 {
                add(&ext[24 * i..24 * (i + 1)])?;
            }
            extended = ext[504] != 0;
        }
        let mut end = 0;
        let mut data = Vec::new();
        for (off, len) in chunks {
            let e = off.checked_add(len).ok_or_else(|| err("chunk overflows"))?;
            if off < end || e > real {
                return Err(err("chunks overlap or exceed the real size"));
            }
            end = e;
            if len > 0 {
                data.push((off, len));
            }
        }
        Ok((data, real))
    }

    /// The current member's stored data.
    pub fn data(&mut self) -> Data<'_, R> {
        Data { r: self }
    }
}

/// Reader over the current member's data.
#[derive(Debug)]
pub struct Data<'a, R> {
    r: &'a mut TarReader<R>,
}

impl<R: Read> Read for Data<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.r.remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = usize::try_from(self.r.remaining.min(buf.len() as u64)).expect("bounded by buf");
        let n = self.r.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "archive ends inside a member (truncated)"));
        }
        self.r.remaining -= n as u64;
        self.r.offset += n as u64;
        Ok(n)
    }
}

fn trim_nul(mut v: Vec<u8>) -> Vec<u8> {
    while v.last() == Some(&0) {
        v.pop();
    }
    v
}

/// An octal (or GNU base-256) numeric field.
fn num(field: &[u8]) -> Option<u64> {
    if field[0] & 0x80 != 0 {
        if field[0] == 0xff {
            return None;
        }
        let mut v: u64 = u64::from(field[0] & 0x7f);
        for &b in &field[1..] {
            v = v.checked_mul(256)?.checked_add(u64::from(b))?;
        }
        return Some(v);
    }
    let s = std::str::from_utf8(field).ok()?;
    let s = s.trim_matches(|c: char| c == '\0' || c == ' ');
    if s.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(s, 8).ok()
}

fn check_sum(block: &[u8; 512]) -> Result<(), ()> {
    let stored = num(&block[148..156]).ok_or(())?;
    let unsigned: u64 =
        block.iter().enumerate().map(|(i, &b)| if (148..156).contains(&i) { 32 } else { u64::from(b) }).sum();
    let signed: i64 =
        block.iter().enumerate().map(|(i, &b)| if (148..156).contains(&i) { 32 } else { i64::from(b as i8) }).sum();
    if stored == unsigned || i64::try_from(stored).ok() == Some(signed) {
        Ok(())
    } else {
        Err(())
    }
}

/// Parses PAX records `LEN KEY=VALUE\n`, where LEN counts the whole record (values may be binary).
pub fn parse_pax(mut data: &[u8]) -> Result<PaxRecords, String> {
    let mut out = Vec::new();
    while !data.is_empty() {
        if data.iter().all(|&b| b == 0) {
            break;
        }
        let sp = data.iter().position(|&b| b == b' ').ok_or("PAX record without a length")?;
        let len: usize = std::str::from_utf8(&data[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or("PAX record length is not a number")?;
        if len <= sp + 1 || len > data.len() || data[len - 1] != b'\n' {
            return Err(format!("malformed PAX record (length {len})"));
        }
        let kv = &data[sp + 1..len - 1];
        let eq = kv.iter().position(|&b| b == b'=').ok_or("PAX record without '='")?;
        out.push((kv[..eq].to_vec(), kv[eq + 1..].to_vec()));
        data = &data[len..];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_binary_values() {
        let v = b"a\nb=c";
        let rec = |k: &[u8], v: &[u8]| {
            let body = [k, b"=", v, b"\n"].concat();
            let mut n = body.len() + 2;
            if (n + 1).to_string().len() + body.len() + 1 == n + 1 {
                n += 1;
            }
            let mut r = format!("{n} ").into_bytes();
            r.extend_from_slice(&body);
            assert_eq!(r.len(), n);
            r
        };
        let data = [rec(b"SCHILY.xattr.user.x", v), rec(b"path", b"p")].concat();
        let got = parse_pax(&data).unwrap();
        assert_eq!(got[0], (b"SCHILY.xattr.user.x".to_vec(), v.to_vec()));
        assert_eq!(got[1], (b"path".to_vec(), b"p".to_vec()));
        assert!(parse_pax(b"99 path=x\n").is_err());
    }
}
