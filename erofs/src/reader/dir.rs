//! Directory blocks (fs/erofs/dir.c): an array of dirents then names per block; the last name of a
//! block runs to the first NUL or the end of the block's valid bytes. Entries must be sorted.

use zerocopy::FromBytes;

use super::{corrupt, Image, InodeInfo, ReadAt, ReadError};
use crate::format::{Dirent, BLOCK_SIZE, NAME_LEN, S_IFDIR};

/// One directory entry as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawDirent {
    pub name: Vec<u8>,
    pub nid: u64,
    pub file_type: u8,
    /// Byte offset of the dirent within the directory's data (block * 4096 + offset in block).
    pub pos: u64,
}

impl<R: ReadAt> Image<R> {
    /// All entries of a directory (including `.` and `..`), in on-disk order.
    pub fn read_dir(&self, ino: &InodeInfo) -> Result<Vec<RawDirent>, ReadError> {
        let mut out = Vec::new();
        self.for_each_dir_block(ino, |block_start, block| {
            parse_block(ino, block_start, block, &mut out)?;
            Ok(())
        })?;
        Ok(out)
    }

    fn for_each_dir_block(
        &self,
        ino: &InodeInfo,
        mut f: impl FnMut(u64, &[u8]) -> Result<(), ReadError>,
    ) -> Result<(), ReadError> {
        if ino.file_type() != S_IFDIR {
            return Err(ReadError::WrongType { nid: ino.nid, expected: "directory" });
        }
        let mut block = vec![0u8; crate::format::BLOCK_BYTES];
        let mut start = 0u64;
        while start < ino.size {
            let len = usize::try_from((ino.size - start).min(BLOCK_SIZE)).unwrap_or(0);
            let got = self.read_data(ino, start, &mut block[..len])?;
            if got != len {
                return Err(corrupt(ino.nid, ino.offset, "short directory block"));
            }
            f(start, &block[..len])?;
            start += BLOCK_SIZE;
        }
        Ok(())
    }
}

fn parse_block(ino: &InodeInfo, block_start: u64, block: &[u8], out: &mut Vec<RawDirent>) -> Result<(), ReadError> {
    let nid = ino.nid;
    let bad = |off: usize, reason: String| corrupt(nid, block_start + off as u64, format!("directory data: {reason}"));
    let (first, _) = Dirent::read_from_prefix(block).map_err(|_| bad(0, "block shorter than one dirent".into()))?;
    let nameoff0 = usize::from(first.nameoff.get());
    if nameoff0 == 0 || nameoff0 % 12 != 0 || nameoff0 >= crate::format::BLOCK_BYTES || nameoff0 > block.len() {
        return Err(bad(0, format!("invalid de[0].nameoff {nameoff0}")));
    }
    let count = nameoff0 / 12;
    for i in 0..count {
        let d = Dirent::read_from_bytes(&block[i * 12..i * 12 + 12]).map_err(|_| bad(i * 12, "short dirent".into()))?;
        let nameoff = usize::from(d.nameoff.get());
        let end = if i + 1 < count {
            let next = Dirent::read_from_bytes(&block[(i + 1) * 12..(i + 2) * 12])
                .map_err(|_| bad(i * 12, "short dirent".into()))?;
            usize::from(next.nameoff.get())
        } else {
            if nameoff >= block.len() {
                return Err(bad(i * 12, format!("last nameoff {nameoff} beyond the block's {} bytes", block.len())));
            }
            nameoff + block[nameoff..].iter().position(|&b| b == 0).unwrap_or(block.len() - nameoff)
        };
        if nameoff < nameoff0 || end < nameoff || end > block.len() {
            return Err(bad(i * 12, format!("name range {nameoff}..{end} invalid")));
        }
        let len = end - nameoff;
        if len == 0 || len > NAME_LEN {
            return Err(bad(i * 12, format!("name length {len} not in 1..=255")));
        }
        // Names must ascend strictly across the whole directory (the kernel's lookup depends on it).
        // Checking while parsing also stops images whose blocks repeat (e.g. many chunks naming the same
        // block) from growing the entry list without bound.
        if out.last().is_some_and(|prev: &RawDirent| prev.name.as_slice() >= &block[nameoff..end]) {
            return Err(bad(i * 12, "directory entries not strictly sorted by bytes".into()));
        }
        out.push(RawDirent {
            name: block[nameoff..end].to_vec(),
            nid: d.nid.get(),
            file_type: d.file_type,
            pos: block_start + (i * 12) as u64,
        });
    }
    Ok(())
}
