//! EROFS on-disk format (Linux `fs/erofs/erofs_fs.h`, 6.1-compatible subset), a writer that turns an
//! in-memory tree into an image, and a reader that parses an image back into the same tree.
//!
//! This crate performs no syscalls: callers hand it byte sources and sinks.
//!
//! * [`format`]: the on-disk structs and constants, shared by writer and reader.
//! * [`writer`]: [`write_image`] — layout pass, then a sequential write pass (no `Seek`).
//! * [`reader`]: [`Image`] — `open`, `read_tree`, `read_file_at`, `devices`, `check` (fsck).
//!
//! Decisions worth knowing (docs/kernel.md C, checked against the 6.1 sources):
//! * Only 6.1 features: 4 KiB blocks, no compression, no superblock checksum, `dirblkbits` 0, no long
//!   xattr prefixes, 32-bit block addresses. Incompat bits used: `CHUNKED_FILE`, `DEVICE_TABLE`.
//! * Times: the extended inode's `i_mtime` and the superblock's `build_time` are u64 on disk; 6.1 copies
//!   them into `time64_t` (s64) (`fs/erofs/inode.c`: `inode->i_ctime.tv_sec = le64_to_cpu(die->i_mtime)`),
//!   so a negative `i64` stored as its two's complement reads back as the same negative time. Compact
//!   inodes carry no time: they get the superblock build time, which the writer sets to the most common
//!   mtime of the tree so that most inodes can be compact.
//! * External files (data in a blob named by its sha256) are chunk-based with one chunk index per
//!   `2^chunkbits` bytes pointing at device `slot + 1`, block 0 onwards; one device-table slot per distinct
//!   digest, in order of first appearance. Empty files need no device and read back as an empty
//!   `Inline` file.
//! * Sparse in-image files are chunk-based on device 0 with `NULL_ADDR` holes; the chunk size is the one
//!   minimizing index bytes plus stored bytes, so every hole at least one chunk wide stays a hole and
//!   smaller or unaligned holes are stored as zeros. (erofs-utils 1.5's `fsck.erofs --extract` mis-reads
//!   hole chunks; the kernel reads them correctly.)
//! * The root is the first inode and never nid 0 (`st_ino` 0 confuses userspace); the device table
//!   starts right after the superblock, so `root_nid` and `devt_slotoff` (16-bit) always fit.
#![forbid(unsafe_code)]

pub mod format;
pub mod reader;
pub mod tree;
pub mod writer;

pub use reader::{CheckReport, DeviceInfo, Image, ReadAt, ReadError};
pub use tree::{Digest, Extent, FileData, Inode, InodeId, Kind, Metadata, Tree, ROOT};
pub use writer::{write_image, ContentSource, DeviceRef, MemorySource, WriteError, WriteOptions, WriteStats};
