//! The object map (`wisp/objects.map` in the index layer): for every object the EROFS index
//! references, how it is stored. All integers little-endian:
//!
//! ```text
//! header  8 bytes  magic "WISPMAP1"
//!         4 bytes  entry count
//!         4 bytes  reserved, 0
//! entry  88 bytes  (sorted by content digest, no duplicates)
//!        32  content digest: sha256 of the uncompressed bytes (the EROFS device tag)
//!        32  blob digest: sha256 of the stored bytes (the registry blob's name)
//!         8  content size
//!         8  stored size
//!         1  compression: 0 = none (blob digest == content digest), 1 = zstd (one frame)
//!         7  reserved, 0
//! ```
//! A reader fetches the blob, checks its size and blob digest, decompresses, and checks the content
//! digest and size.

use crate::object::{Compression, ObjectEntry};

pub const MAGIC: &[u8; 8] = b"WISPMAP1";
const ENTRY: usize = 88;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MapError {
    #[error("object map: bad magic")]
    Magic,
    #[error("object map: {len} bytes do not hold {count} entries")]
    Length { len: usize, count: u64 },
    #[error("object map: entry {index}: {why}")]
    Entry { index: usize, why: &'static str },
}

/// Encodes entries (sorted here).
pub fn encode(entries: &[ObjectEntry]) -> Vec<u8> {
    let mut sorted = entries.to_vec();
    sorted.sort_by_key(|e| e.digest);
    sorted.dedup_by(|a, b| a.digest == b.digest);
    let mut out = Vec::with_capacity(16 + sorted.len() * ENTRY);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&u32::try_from(sorted.len()).expect("fewer than 2^32 objects").to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    for e in &sorted {
        out.extend_from_slice(&e.digest);
        out.extend_from_slice(&e.blob);
        out.extend_from_slice(&e.size.to_le_bytes());
        out.extend_from_slice(&e.stored_size.to_le_bytes());
        out.push(match e.compression {
            Compression::None => 0,
            Compression::Zstd => 1,
        });
        out.extend_from_slice(&[0; 7]);
    }
    out
}

/// Decodes and checks a map.
pub fn decode(bytes: &[u8]) -> Result<Vec<ObjectEntry>, MapError> {
    if bytes.len() < 16 || &bytes[..8] != MAGIC {
        return Err(MapError::Magic);
    }
    let count = u64::from(u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")));
    let body = &bytes[16..];
    if body.len() as u64 != count * ENTRY as u64 {
        return Err(MapError::Length { len: bytes.len(), count });
    }
    let mut out: Vec<ObjectEntry> = Vec::with_capacity(body.len() / ENTRY);
    for (index, c) in body.chunks_exact(ENTRY).enumerate() {
        let u64_at = |o: usize| u64::from_le_bytes(c[o..o + 8].try_into().expect("8 bytes"));
        let compression = match c[80] {
            0 => Compression::None,
            1 => Compression::Zstd,
            _ => return Err(MapError::Entry { index, why: "unknown compression" }),
        };
        let e = ObjectEntry {
            digest: c[..32].try_into().expect("32 bytes"),
            blob: c[32..64].try_into().expect("32 bytes"),
            size: u64_at(64),
            stored_size: u64_at(72),
            compression,
        };
        if compression == Compression::None && (e.blob != e.digest || e.size != e.stored_size) {
            return Err(MapError::Entry { index, why: "uncompressed object whose blob differs from its content" });
        }
        if out.last().is_some_and(|p| p.digest >= e.digest) {
            return Err(MapError::Entry { index, why: "not sorted by content digest" });
        }
        out.push(e);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let a =
            ObjectEntry { digest: [2; 32], blob: [3; 32], size: 10, stored_size: 7, compression: Compression::Zstd };
        let b = ObjectEntry { digest: [1; 32], blob: [1; 32], size: 5, stored_size: 5, compression: Compression::None };
        let bytes = encode(&[a, b]);
        assert_eq!(bytes.len(), 16 + 2 * 88);
        assert_eq!(decode(&bytes).unwrap(), vec![b, a]);
        assert_eq!(decode(&bytes[..100]), Err(MapError::Length { len: 100, count: 2 }));
    }
}
