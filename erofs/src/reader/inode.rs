//! Inodes and the mapping from a file position to where its bytes live (fs/erofs/inode.c, data.c).

use zerocopy::FromBytes;

use super::{corrupt, Image, ReadAt, ReadError};
use crate::format::{
    chunk_format_of, file_type_of_mode, split_i_format, time_from_disk, xattr_ibody_size, ChunkIndex, InodeCompact,
    InodeExtended, BLOCK_BITS, BLOCK_SIZE, CHUNK_FORMAT_ALL_6_1, CHUNK_FORMAT_BLKBITS_MASK, CHUNK_FORMAT_INDEXES,
    ISLOT_SIZE, I_ALL_6_1, LAYOUT_CHUNK_BASED, LAYOUT_FLAT_INLINE, LAYOUT_FLAT_PLAIN, NULL_ADDR,
};

/// A parsed on-disk inode (compact or extended, fields widened).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InodeInfo {
    pub nid: u64,
    /// Byte offset of the inode in the image.
    pub offset: u64,
    pub extended: bool,
    pub layout: u16,
    pub mode: u16,
    pub nlink: u32,
    pub size: u64,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub mtime_nsec: u32,
    /// raw_blkaddr, rdev or chunk_info, by type and layout.
    pub i_u: u32,
    pub xattr_icount: u16,
}

impl InodeInfo {
    pub fn inode_isize(&self) -> u64 {
        if self.extended {
            64
        } else {
            32
        }
    }

    pub fn xattr_isize(&self) -> u64 {
        u64::from(xattr_ibody_size(self.xattr_icount))
    }

    /// Byte offset right after the inode and its xattr body.
    pub fn body_end(&self) -> u64 {
        // offset <= 2^64 - 2^37 is ensured by `Image::inode`, so this cannot overflow
        self.offset + self.inode_isize() + self.xattr_isize()
    }

    /// `S_IFMT` bits.
    pub fn file_type(&self) -> u16 {
        self.mode & crate::format::S_IFMT
    }

    pub fn chunk_bits(&self) -> u8 {
        BLOCK_BITS + u8::try_from(chunk_format_of(self.i_u) & CHUNK_FORMAT_BLKBITS_MASK).unwrap_or(0)
    }
}

/// Where one logical range of a file lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// Reads as zeros.
    Hole,
    /// Byte offset in the image (device 0).
    Image(u64),
    /// Byte offset in extra device `device` (1-based).
    Device { device: u16, offset: u64 },
}

/// A logical range `[start, start + len)` of a file and where it lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub len: u64,
    pub target: Target,
}

impl<R: ReadAt> Image<R> {
    /// Parses the inode at `nid`.
    pub fn inode(&self, nid: u64) -> Result<InodeInfo, ReadError> {
        let offset = nid
            .checked_mul(ISLOT_SIZE)
            .and_then(|o| o.checked_add(u64::from(self.sb.meta_blkaddr.get()) * BLOCK_SIZE))
            .filter(|&o| o < self.limit)
            .ok_or_else(|| corrupt(nid, 0, "nid outside the image"))?;
        let mut raw = [0u8; 64];
        let len = if self.limit - offset >= 64 { 64 } else { 32 };
        self.read_meta(nid, &mut raw[..len], offset)?;
        let compact = InodeCompact::read_from_bytes(&raw[..32]).map_err(|_| corrupt(nid, offset, "short inode"))?;
        let i_format = compact.i_format.get();
        if i_format & !I_ALL_6_1 != 0 {
            return Err(ReadError::Unsupported { nid, what: format!("i_format {i_format:#x}") });
        }
        let (extended, layout) = split_i_format(i_format);
        let info = if extended {
            if len < 64 {
                return Err(corrupt(nid, offset, "extended inode past the image end"));
            }
            let e = InodeExtended::read_from_bytes(&raw).map_err(|_| corrupt(nid, offset, "short inode"))?;
            InodeInfo {
                nid,
                offset,
                extended,
                layout,
                mode: e.i_mode.get(),
                nlink: e.i_nlink.get(),
                size: e.i_size.get(),
                uid: e.i_uid.get(),
                gid: e.i_gid.get(),
                mtime: time_from_disk(e.i_mtime.get()),
                mtime_nsec: e.i_mtime_nsec.get(),
                i_u: e.i_u.get(),
                xattr_icount: e.i_xattr_icount.get(),
            }
        } else {
            let (mtime, mtime_nsec) = self.build_time();
            InodeInfo {
                nid,
                offset,
                extended,
                layout,
                mode: compact.i_mode.get(),
                nlink: u32::from(compact.i_nlink.get()),
                size: u64::from(compact.i_size.get()),
                uid: u32::from(compact.i_uid.get()),
                gid: u32::from(compact.i_gid.get()),
                mtime,
                mtime_nsec,
                i_u: compact.i_u.get(),
                xattr_icount: compact.i_xattr_icount.get(),
            }
        };
        if file_type_of_mode(info.mode).is_none() {
            return Err(corrupt(nid, offset, format!("bogus i_mode {:#o}", info.mode)));
        }
        if i64::try_from(info.size).is_err() {
            return Err(corrupt(nid, offset, "i_size above 2^63-1"));
        }
        match layout {
            LAYOUT_FLAT_PLAIN | LAYOUT_FLAT_INLINE => {}
            LAYOUT_CHUNK_BASED => {
                let fmt = chunk_format_of(info.i_u);
                if fmt & !CHUNK_FORMAT_ALL_6_1 != 0 {
                    return Err(ReadError::Unsupported { nid, what: format!("chunk format {fmt:#x}") });
                }
            }
            l => return Err(ReadError::Unsupported { nid, what: format!("data layout {l} (compressed or unknown)") }),
        }
        Ok(info)
    }

    /// Maps file position `pos` (< size) of an inode with data (regular, directory, symlink).
    pub fn map(&self, ino: &InodeInfo, pos: u64) -> Result<Mapping, ReadError> {
        let nid = ino.nid;
        if pos >= ino.size {
            return Err(corrupt(nid, ino.offset, format!("position {pos} beyond i_size {}", ino.size)));
        }
        let nblocks = ino.size.div_ceil(BLOCK_SIZE);
        match ino.layout {
            LAYOUT_FLAT_PLAIN | LAYOUT_FLAT_INLINE => {
                let inline = ino.layout == LAYOUT_FLAT_INLINE;
                let lastblk = nblocks - u64::from(inline);
                if pos < lastblk * BLOCK_SIZE {
                    let phys = u64::from(ino.i_u)
                        .checked_mul(BLOCK_SIZE)
                        .and_then(|b| b.checked_add(pos))
                        .ok_or_else(|| corrupt(nid, ino.offset, "data address overflows"))?;
                    Ok(Mapping { start: pos, len: lastblk * BLOCK_SIZE - pos, target: Target::Image(phys) })
                } else {
                    let tail_start = ino.body_end();
                    let tail_len = ino.size - lastblk * BLOCK_SIZE;
                    if tail_start % BLOCK_SIZE + tail_len > BLOCK_SIZE {
                        return Err(corrupt(nid, tail_start, "inline data crosses a block boundary"));
                    }
                    let phys = tail_start + (pos - lastblk * BLOCK_SIZE);
                    Ok(Mapping { start: pos, len: ino.size - pos, target: Target::Image(phys) })
                }
            }
            LAYOUT_CHUNK_BASED => {
                let bits = ino.chunk_bits();
                let indexes = chunk_format_of(ino.i_u) & CHUNK_FORMAT_INDEXES != 0;
                let unit: u64 = if indexes { 8 } else { 4 };
                let chunk = pos >> bits;
                let ipos = ino
                    .body_end()
                    .next_multiple_of(unit)
                    .checked_add(chunk * unit)
                    .ok_or_else(|| corrupt(nid, ino.offset, "chunk index offset overflows"))?;
                let start = chunk << bits;
                let len = (1u64 << bits).min((ino.size - start).next_multiple_of(BLOCK_SIZE));
                let (device, blkaddr) = if indexes {
                    let mut raw = [0u8; 8];
                    self.read_meta(nid, &mut raw, ipos)?;
                    let ci = ChunkIndex::read_from_bytes(&raw).map_err(|_| corrupt(nid, ipos, "short chunk index"))?;
                    (ci.device_id.get() & self.device_id_mask, ci.blkaddr.get())
                } else {
                    let mut raw = [0u8; 4];
                    self.read_meta(nid, &mut raw, ipos)?;
                    (0, u32::from_le_bytes(raw))
                };
                let target = if blkaddr == NULL_ADDR {
                    Target::Hole
                } else {
                    let offset = u64::from(blkaddr) * BLOCK_SIZE + (pos - start);
                    if device == 0 {
                        Target::Image(offset)
                    } else if usize::from(device) > self.devices.len() {
                        return Err(corrupt(
                            nid,
                            ipos,
                            format!("device id {device} beyond {} devices", self.devices.len()),
                        ));
                    } else {
                        Target::Device { device, offset }
                    }
                };
                let (start, len) = match target {
                    Target::Hole => (start, len),
                    _ => (pos, len - (pos - start)),
                };
                Ok(Mapping { start, len, target })
            }
            l => Err(ReadError::Unsupported { nid, what: format!("data layout {l}") }),
        }
    }

    /// Reads file bytes at `offset` into `buf`; returns how many (fewer only at the end of the file).
    /// Holes read as zeros; data on an extra device is an error ([`ReadError::ExternalData`]).
    pub fn read_file_at(&self, nid: u64, offset: u64, buf: &mut [u8]) -> Result<usize, ReadError> {
        let ino = self.inode(nid)?;
        self.read_data(&ino, offset, buf)
    }

    pub(crate) fn read_data(&self, ino: &InodeInfo, offset: u64, buf: &mut [u8]) -> Result<usize, ReadError> {
        let want = (buf.len() as u64).min(ino.size.saturating_sub(offset));
        let want = usize::try_from(want).unwrap_or(buf.len());
        let mut done = 0usize;
        while done < want {
            let pos = offset + done as u64;
            let m = self.map(ino, pos)?;
            let in_map = m.start + m.len - pos;
            let n = usize::try_from(in_map.min((want - done) as u64)).unwrap_or(want - done);
            if n == 0 {
                return Err(corrupt(ino.nid, ino.offset, "empty mapping"));
            }
            let dst = &mut buf[done..done + n];
            match m.target {
                Target::Hole => dst.fill(0),
                Target::Image(phys) => self.read_meta(ino.nid, dst, phys)?,
                Target::Device { device, offset } => {
                    return Err(ReadError::ExternalData { nid: ino.nid, offset, device });
                }
            }
            done += n;
        }
        Ok(done)
    }
}
