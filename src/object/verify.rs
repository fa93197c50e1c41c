//! Checking bytes against their names: hashing ([`hash_reader`], [`copy_hashing`]), a reader that checks
//! what it yields against a digest and size ([`VerifyingReader`]: never more than the declared size,
//! and at the end exactly that size with the declared sha256; a mismatch is an `InvalidData` error
//! naming the blob, so nothing built from a corrupt blob survives), and an object's content read from
//! its stored bytes and checked twice ([`copy_content`]).

use std::io::{self, Read, Write};

use sha2::{Digest as _, Sha256};

use super::{Compression, ObjectEntry};

#[derive(Debug)]
pub struct VerifyingReader<R> {
    inner: R,
    hasher: Sha256,
    digest: String,
    size: Option<u64>,
    count: u64,
    done: bool,
}

impl<R: Read> VerifyingReader<R> {
    /// Checks `inner` against `digest` (`sha256:<hex>`) and, when known, `size`.
    pub fn new(inner: R, digest: &str, size: Option<u64>) -> Self {
        VerifyingReader { inner, hasher: Sha256::new(), digest: digest.to_string(), size, count: 0, done: false }
    }

    fn fail(&self, what: String) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("blob {} does not match its descriptor: {what}", self.digest),
        )
    }
}

impl<R: Read> Read for VerifyingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        if let Some(size) = self.size {
            if self.count > size {
                return Err(self.fail(format!("more than the declared {size} bytes")));
            }
        }
        if n == 0 {
            self.done = true;
            if let Some(size) = self.size {
                if self.count != size {
                    return Err(self.fail(format!("{} bytes, declared {size}", self.count)));
                }
            }
            let got = format!("sha256:{}", hex::encode(std::mem::take(&mut self.hasher).finalize()));
            if got != self.digest {
                return Err(self.fail(format!("its bytes hash to {got}")));
            }
            return Ok(0);
        }
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Reads `r` to its end (so a verifying reader checks its digest) and discards the rest.
pub fn drain(r: &mut impl Read) -> io::Result<u64> {
    io::copy(r, &mut io::sink())
}

/// sha256 and length of everything `input` yields.
pub fn hash_reader(mut input: impl Read) -> io::Result<([u8; 32], u64)> {
    copy_hashing(&mut input, &mut io::sink())
}

/// Copies `input` to `out`, returning the sha256 and the byte count of what was copied.
pub fn copy_hashing(mut input: impl Read, out: &mut impl Write) -> io::Result<([u8; 32], u64)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])?;
        total += n as u64;
    }
    Ok((hasher.finalize().into(), total))
}

/// Writes the content of `obj` to `out`, read from its stored bytes `stored` (decompressed as its
/// entry says), checking the content's sha256 and size, and reading `stored` to its end so that a
/// reader that checks the blob digest (a store's, [`VerifyingReader`]) checks all of it.
pub fn copy_content(obj: &ObjectEntry, stored: impl Read, out: &mut dyn Write) -> io::Result<()> {
    let hex_digest = format!("sha256:{}", hex::encode(obj.digest));
    match obj.compression {
        Compression::None => {
            let mut content = VerifyingReader::new(stored, &hex_digest, Some(obj.size));
            io::copy(&mut content, out)?;
        }
        Compression::Zstd => {
            let mut dec = zstd::stream::read::Decoder::new(stored)?;
            let mut content = VerifyingReader::new(&mut dec, &hex_digest, Some(obj.size));
            io::copy(&mut content, out)?;
            // Read the stored bytes to their end so their blob digest is checked too.
            drain(&mut dec.finish())?;
        }
    }
    Ok(())
}
