//! A reader that checks what it yields against a descriptor: never more than the declared size, and
//! at the end exactly that size with the declared sha256. A mismatch is an `InvalidData` error naming
//! the blob, so nothing built from a corrupt blob survives.

use std::io::{self, Read};

use sha2::{Digest as _, Sha256};

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
