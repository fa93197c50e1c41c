//! EROFS on-disk format (Linux `fs/erofs/erofs_fs.h`, 6.1-compatible subset), a writer that turns an
//! in-memory tree into an image, and a reader that parses an image back into the same tree.
//!
//! This crate performs no syscalls: callers hand it byte sources and sinks.
#![forbid(unsafe_code)]

pub mod format;
pub mod reader;
pub mod tree;
pub mod writer;

pub use reader::{CheckReport, DeviceInfo, Image, ReadAt, ReadError};
pub use tree::{Digest, Extent, FileData, Inode, InodeId, Kind, Metadata, Tree, ROOT};
pub use writer::{write_image, ContentSource, MemorySource, WriteError, WriteOptions, WriteStats};
