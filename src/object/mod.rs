//! The content object: a file's bytes, named by the sha256 of its uncompressed content. This module
//! holds what every part of wisp agrees on about one: its entry ([`ObjectEntry`]: content digest,
//! blob digest, sizes, [`Compression`]), its file name under a directory (`<2 hex>/<64 hex>`,
//! [`path_in`]), its padded length as the kernel reads it ([`padded_len`]), and checking its bytes
//! ([`verify`]).
//!
//! - [`atomic`]: files that appear whole or not at all (temporary name, then rename), for objects
//!   and for every other file wisp writes into a store, cache or state directory;
//! - [`dir::ObjectDir`]: a directory of uncompressed, padded object files (`wisp mkfs --external`);
//! - [`verify`]: hashing, and readers that check bytes against a digest and size.
//!
//! Where objects are kept between conversion and use is [`crate::store`]; how an index image lists
//! them is [`crate::index::objmap`].

pub mod atomic;
pub mod dir;
pub mod verify;

use std::path::{Path, PathBuf};

use erofs::tree::Digest;

/// How an object's bytes are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Compression {
    None,
    Zstd,
}

/// One stored object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ObjectEntry {
    /// sha256 of the uncompressed bytes (the EROFS device tag, the name in a cache or directory).
    pub digest: Digest,
    /// sha256 of the stored bytes (the registry blob's name); `digest` when uncompressed.
    pub blob: Digest,
    /// Content size.
    pub size: u64,
    /// Size of the stored bytes.
    pub stored_size: u64,
    pub compression: Compression,
}

impl ObjectEntry {
    /// The blob digest as an OCI digest string, `sha256:<hex>`.
    pub fn blob_digest(&self) -> String {
        format!("sha256:{}", hex::encode(self.blob))
    }
}

/// Block size that every object file the kernel reads is padded to (the kernel reads EROFS devices in
/// whole blocks, docs/kernel.md G.9).
pub const BLOCK: u64 = 4096;

/// `size` rounded up to a whole number of blocks.
pub fn padded_len(size: u64) -> u64 {
    size.div_ceil(BLOCK) * BLOCK
}

/// Where the object with this content digest lives under `dir`: `dir/<first two hex digits>/<64 hex
/// digits>`, so no directory holds more than 1/256 of the objects.
pub fn path_in(dir: &Path, digest: &Digest) -> PathBuf {
    let hex = hex::encode(digest);
    dir.join(&hex[..2]).join(hex)
}
