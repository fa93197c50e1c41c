//! Where cachefiles keeps an object on disk, for culling (docs/kernel.md A.8, A.9).
//!
//! Follows the 6.1 code: `fscache_hash()` in `fs/fscache/main.c`, the volume key framing in
//! `fscache_alloc_volume()` (`fs/fscache/volume.c`), the cookie key padding in `fscache_set_key()`
//! (`fs/fscache/cookie.c`), the fanout directory `@%02x` of `(u8)cookie->key_hash`
//! (`fs/cachefiles/volume.c`, `namei.c`), and the file name encoding of `cachefiles_cook_key()`
//! (`fs/cachefiles/key.c`). The hash is arch-independent by design (it can appear on disk).

use std::path::PathBuf;

/// Why a path could not be computed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CookieError {
    /// The volume key is empty or longer than the 255 bytes its length byte can hold.
    #[error("volume key of {0} bytes (must be 1..=255)")]
    VolumeKeyLen(usize),
    /// The cookie key is empty or would trip the kernel's `BUG_ON(keylen > NAME_MAX - 3)`.
    #[error("cookie key of {0} bytes (must be 1..=252)")]
    CookieKeyLen(usize),
    /// The volume key contains `/` or NUL and cannot be a directory name.
    #[error("volume key {0:?} cannot be a directory name")]
    VolumeKeyName(String),
}

const GOLDEN_RATIO_32: u32 = 0x61C8_8647;

fn hash_32(x: u32) -> u32 {
    x.wrapping_mul(GOLDEN_RATIO_32)
}

/// `fscache_hash(salt, data, len)`; `data.len()` must be a multiple of 4 (callers pad).
fn fscache_hash(salt: u32, data: &[u8]) -> u32 {
    debug_assert_eq!(data.len() % 4, 0);
    let (mut x, mut y) = (0u32, salt);
    for word in data.chunks_exact(4) {
        let a = u32::from_le_bytes([word[0], word[1], word[2], word[3]]);
        x ^= a;
        y ^= x;
        x = x.rotate_left(7);
        x = x.wrapping_add(y);
        y = y.rotate_left(20);
        y = y.wrapping_mul(9);
    }
    hash_32(y ^ hash_32(x))
}

fn padded(bytes: &[u8], prefix_len_byte: bool) -> Vec<u8> {
    let mut v = Vec::with_capacity(bytes.len() + 5);
    if prefix_len_byte {
        // the caller checked len <= 255
        v.push(u8::try_from(bytes.len()).unwrap_or(u8::MAX));
    }
    v.extend_from_slice(bytes);
    if prefix_len_byte {
        v.push(0); // the key is NUL-terminated before padding
    }
    v.resize(v.len().div_ceil(4) * 4, 0);
    v
}

/// The hash fscache gives a volume key (without trailing NUL), e.g. `erofs,mydomain`.
pub fn volume_key_hash(volume_key: &[u8]) -> Result<u32, CookieError> {
    if volume_key.is_empty() || volume_key.len() > 255 {
        return Err(CookieError::VolumeKeyLen(volume_key.len()));
    }
    Ok(fscache_hash(0, &padded(volume_key, true)))
}

/// The hash fscache gives a cookie key within a volume.
pub fn cookie_key_hash(volume_hash: u32, cookie_key: &[u8]) -> u32 {
    fscache_hash(volume_hash, &padded(cookie_key, false))
}

fn printable(b: u8) -> bool {
    matches!(b, b'!'..=b'.' | b'0'..=127)
}

fn hex_digits(x: u32) -> usize {
    if x == 0 {
        0
    } else {
        (32 - x.leading_zeros() as usize).div_ceil(4)
    }
}

/// The file name cachefiles gives a data object with this cookie key (`cachefiles_cook_key()`).
pub fn object_file_name(cookie_key: &[u8]) -> Result<String, CookieError> {
    let n = cookie_key.len();
    if n == 0 || n > 252 {
        return Err(CookieError::CookieKeyLen(n));
    }
    if cookie_key.iter().all(|&b| printable(b)) {
        let mut name = String::with_capacity(n + 1);
        name.push('D');
        name.extend(cookie_key.iter().map(|&b| char::from(b)));
        return Ok(name);
    }
    let words = padded(cookie_key, false);
    let be: Vec<u32> = words.chunks_exact(4).map(|w| u32::from_be_bytes([w[0], w[1], w[2], w[3]])).collect();
    let le: Vec<u32> = words.chunks_exact(4).map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]])).collect();
    let nbe: usize = be.iter().map(|&x| 1 + hex_digits(x)).sum();
    let nle: usize = le.iter().map(|&x| 1 + hex_digits(x)).sum();
    let b64_groups = n.div_ceil(3);
    let pad = b64_groups * 3 - n;
    let b64len = 2 + b64_groups * 4;
    if nbe < b64len || nle < b64len {
        let (mut sep, values) = if nbe <= nle { ('S', &be) } else { ('T', &le) };
        let mut name = String::new();
        for &x in values {
            name.push(sep);
            if x != 0 {
                name.push_str(&format!("{x:x}"));
            }
            sep = ',';
        }
        return Ok(name);
    }
    const MAP: &[u8; 64] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_-";
    let mut name = String::with_capacity(b64len);
    name.push('E');
    name.push(char::from(b'0' + u8::try_from(pad).unwrap_or(0)));
    for group in cookie_key.chunks(3) {
        let mut acc = 0u32;
        for (i, &b) in group.iter().enumerate() {
            acc |= u32::from(b) << (8 * i);
        }
        for _ in 0..4 {
            name.push(char::from(MAP[(acc & 63) as usize]));
            acc >>= 6;
        }
    }
    Ok(name)
}

/// The path of an object relative to the cache directory given to `dir`:
/// `cache/I<volume key>/@<xx>/<encoded cookie key>`.
pub fn object_path(volume_key: &[u8], cookie_key: &[u8]) -> Result<PathBuf, CookieError> {
    let vhash = volume_key_hash(volume_key)?;
    let volume = std::str::from_utf8(volume_key)
        .ok()
        .filter(|v| !v.contains('/') && !v.contains('\0'))
        .ok_or_else(|| CookieError::VolumeKeyName(String::from_utf8_lossy(volume_key).into_owned()))?;
    let fanout = cookie_key_hash(vhash, cookie_key) & 0xff;
    let file = object_file_name(cookie_key)?;
    Ok(["cache", &format!("I{volume}"), &format!("@{fanout:02x}"), &file].iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected values computed by compiling the 6.1 kernel's fscache_hash(), fold_hash()/__hash_32(),
    // the volume key framing of fscache_alloc_volume() and the padding of fscache_set_key() into a small
    // C program (kernel code verbatim, userspace shims for rol32/le32_to_cpu).
    #[test]
    fn hashes_match_the_kernel() {
        let v = volume_key_hash(b"erofs,d1").unwrap();
        assert_eq!(v, 0x2e7e_d010);
        assert_eq!(cookie_key_hash(v, b"img"), 0x982a_ce64);
        let tag = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        assert_eq!(cookie_key_hash(v, tag.as_bytes()), 0x25f8_4288);
        let w = volume_key_hash(b"erofs,wisp").unwrap();
        assert_eq!(w, 0x6a7c_85a1);
        assert_eq!(cookie_key_hash(w, tag.as_bytes()), 0xa68e_a9e7);
    }

    #[test]
    fn object_paths() {
        let tag = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        let p = object_path(b"erofs,d1", tag.as_bytes()).unwrap();
        assert_eq!(p, PathBuf::from(format!("cache/Ierofs,d1/@88/D{tag}")));
        assert_eq!(object_path(b"erofs,d1", b"img").unwrap(), PathBuf::from("cache/Ierofs,d1/@64/Dimg"));
        assert!(object_path(b"erofs,a/b", b"img").is_err());
        assert!(object_path(b"", b"img").is_err());
    }

    #[test]
    fn cooks_unprintable_keys_like_the_kernel() {
        // Expected names from the kernel's cachefiles_cook_key() compiled in userspace.
        // A space makes the key unprintable; one word of hex (9 or 7 chars) loses to base64 (6).
        assert_eq!(object_file_name(b"a b").unwrap(), "E0x1yo");
        assert_eq!(object_file_name(&[0xff, 0xfe, 1, 2, 3]).unwrap(), "E1-Xv02c00");
        assert_eq!(object_file_name(&[0x10, 0x20, 0x30, 0, 0, 0, 0x7f]).unwrap(), "E2g02c0000-100");
        // Mostly zero words favour the hex forms: be word 0x00000001 → "S1", le → "T1000000".
        assert_eq!(object_file_name(&[0, 0, 0, 1, 0, 0, 0, 0]).unwrap(), "S1,");
        assert_eq!(object_file_name(&[1, 0, 0, 0, 0, 0, 0, 0]).unwrap(), "T1,");
        assert!(object_file_name(&[]).is_err());
        assert!(object_file_name(&[b'a'; 253]).is_err());
    }
}
