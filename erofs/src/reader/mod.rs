//! The image reader: parses untrusted bytes with checked arithmetic into the [`crate::tree`] model.
//! Damaged images produce [`ReadError`]s that name the nid and byte offset; no input makes it panic,
//! allocate without bound, or loop forever (every read is bounded by the superblock's block count and
//! by the bytes the source really has, and the directory walk refuses to visit a directory twice).
//!
//! Format reference: docs/kernel.md C (Linux 6.1 `fs/erofs`).

mod check;
mod dir;
mod inode;
mod tree;
mod xattr;

use std::io;

use zerocopy::FromBytes;

pub use check::CheckReport;
pub use dir::RawDirent;
pub use inode::{InodeInfo, Mapping, Target};

use crate::format::{
    time_from_disk, DeviceSlot, SuperBlock, BLOCK_BITS, BLOCK_SIZE, DEVT_SLOT_SIZE, FEATURE_INCOMPAT_DEVICE_TABLE,
    FEATURE_INCOMPAT_SUPPORTED, MAGIC, SUPER_OFFSET,
};
use crate::tree::Digest;

/// Positional reads from an image. Implemented for byte slices and vectors; the binary implements it
/// for files.
pub trait ReadAt {
    /// Fills `buf` from `offset`, or fails (`UnexpectedEof` past the end).
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl ReadAt for [u8] {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        let src = start
            .checked_add(buf.len())
            .and_then(|end| self.get(start..end))
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

impl ReadAt for Vec<u8> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.as_slice().read_exact_at(buf, offset)
    }
}

impl<T: ReadAt + ?Sized> ReadAt for &T {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_exact_at(buf, offset)
    }
}

/// Why an image could not be read, or what `check` found wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("reading {len} bytes at byte offset {offset}")]
    Io {
        offset: u64,
        len: usize,
        #[source]
        error: io::Error,
    },
    #[error("superblock: {reason}")]
    Superblock { reason: String },
    #[error("nid {nid}: corrupt at byte offset {offset}: {reason}")]
    Corrupt { nid: u64, offset: u64, reason: String },
    #[error("nid {nid}: unsupported: {what}")]
    Unsupported { nid: u64, what: String },
    #[error("nid {nid}: data at byte offset {offset} lives on device {device}, not in the image")]
    ExternalData { nid: u64, offset: u64, device: u16 },
    #[error("nid {nid}: not a {expected}")]
    WrongType { nid: u64, expected: &'static str },
}

pub(crate) fn corrupt(nid: u64, offset: u64, reason: impl Into<String>) -> ReadError {
    ReadError::Corrupt { nid, offset, reason: reason.into() }
}

/// One extra device of the image (device id = position in [`Image::devices`] + 1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The raw 64-byte tag.
    pub tag: [u8; 64],
    /// The tag decoded as a sha256 in lowercase hex, when it is one.
    pub digest: Option<Digest>,
    pub blocks: u32,
}

/// An opened image: a validated superblock and the device table.
#[derive(Debug)]
pub struct Image<R> {
    r: R,
    sb: SuperBlock,
    devices: Vec<DeviceInfo>,
    /// `blocks * BLOCK_SIZE`: reads of the primary device must stay below this.
    limit: u64,
    device_id_mask: u16,
}

impl<R: ReadAt> Image<R> {
    /// Reads and validates the superblock and device table.
    pub fn open(r: R) -> Result<Self, ReadError> {
        let mut buf = [0u8; 128];
        read(&r, &mut buf, SUPER_OFFSET)?;
        let sb = SuperBlock::read_from_bytes(&buf).map_err(|_| sb_err("short superblock"))?;
        if sb.magic.get() != MAGIC {
            return Err(sb_err("bad magic"));
        }
        if sb.blkszbits != BLOCK_BITS {
            return Err(sb_err(format!("block size 2^{} (only 4096 is supported)", sb.blkszbits)));
        }
        if sb.dirblkbits != 0 {
            return Err(sb_err("dirblkbits is not 0"));
        }
        let incompat = sb.feature_incompat.get();
        if incompat & !FEATURE_INCOMPAT_SUPPORTED != 0 {
            return Err(sb_err(format!("unsupported incompatible features {incompat:#x}")));
        }
        if 128 + 16 * u64::from(sb.sb_extslots) > BLOCK_SIZE - SUPER_OFFSET {
            return Err(sb_err("sb_extslots beyond the first block"));
        }
        if !sb.volume_name.contains(&0) {
            return Err(sb_err("volume name without NUL"));
        }
        let limit = u64::from(sb.blocks.get()) * BLOCK_SIZE;
        let mut img = Image { r, sb, devices: Vec::new(), limit, device_id_mask: 0 };
        if incompat & FEATURE_INCOMPAT_DEVICE_TABLE != 0 {
            let n = sb.extra_devices.get();
            img.device_id_mask = u16::try_from((u32::from(n) + 1).next_power_of_two() - 1).unwrap_or(u16::MAX);
            let start = u64::from(sb.devt_slotoff.get()) * DEVT_SLOT_SIZE;
            if start < SUPER_OFFSET + 128 && n > 0 {
                return Err(sb_err("device table overlaps the superblock"));
            }
            let mut slot = [0u8; 128];
            for i in 0..u64::from(n) {
                let off = start + i * DEVT_SLOT_SIZE;
                img.read_meta(u64::MAX, &mut slot, off)?;
                let s = DeviceSlot::read_from_bytes(&slot).map_err(|_| sb_err("short device slot"))?;
                let digest = parse_digest_tag(&s.tag);
                img.devices.push(DeviceInfo { tag: s.tag, digest, blocks: s.blocks.get() });
            }
        }
        Ok(img)
    }

    /// The parsed superblock.
    pub fn superblock(&self) -> &SuperBlock {
        &self.sb
    }

    /// Extra devices in device-id order.
    pub fn devices(&self) -> &[DeviceInfo] {
        &self.devices
    }

    pub fn root_nid(&self) -> u64 {
        u64::from(self.sb.root_nid.get())
    }

    /// Build time of compact inodes (seconds, nanoseconds).
    pub fn build_time(&self) -> (i64, u32) {
        (time_from_disk(self.sb.build_time.get()), self.sb.build_time_nsec.get())
    }

    /// The image's size according to its superblock.
    pub fn image_bytes(&self) -> u64 {
        self.limit
    }

    /// The underlying byte source.
    pub fn source(&self) -> &R {
        &self.r
    }

    /// Reads metadata or device-0 data, refusing anything past the superblock's block count. `nid` is
    /// only used in errors (`u64::MAX` for "no inode").
    pub(crate) fn read_meta(&self, nid: u64, buf: &mut [u8], offset: u64) -> Result<(), ReadError> {
        let end = offset.checked_add(buf.len() as u64);
        if end.exceeds(self.limit) {
            return Err(corrupt(
                nid,
                offset,
                format!("{} bytes beyond the image end ({} bytes)", buf.len(), self.limit),
            ));
        }
        read(&self.r, buf, offset)
    }
}

trait ExceedsLimit {
    fn exceeds(self, limit: u64) -> bool;
}

impl ExceedsLimit for Option<u64> {
    fn exceeds(self, limit: u64) -> bool {
        match self {
            None => true,
            Some(v) => v > limit,
        }
    }
}

fn sb_err(reason: impl Into<String>) -> ReadError {
    ReadError::Superblock { reason: reason.into() }
}

fn read<R: ReadAt + ?Sized>(r: &R, buf: &mut [u8], offset: u64) -> Result<(), ReadError> {
    r.read_exact_at(buf, offset).map_err(|error| ReadError::Io { offset, len: buf.len(), error })
}

/// A 64-character lowercase hex tag as a digest.
fn parse_digest_tag(tag: &[u8; 64]) -> Option<Digest> {
    if !tag.iter().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b)) {
        return None;
    }
    let mut d = [0u8; 32];
    hex::decode_to_slice(tag, &mut d).ok()?;
    Some(d)
}
