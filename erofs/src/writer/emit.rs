//! The write pass: emits the image strictly in offset order, following the [`Plan`]. Every region
//! starts with a check that the output position equals the planned offset, so a disagreement between
//! the passes is an error ([`WriteError::LayoutDrift`]) instead of a corrupt image.

use std::io::{self, Write};

use zerocopy::IntoBytes;

use super::collect::Collected;
use super::plan::{Data, InodePlan, Plan};
use super::xattrs::{encode_body, encode_entry, SharedXattrs};
use super::{data, dirs, fit, ContentSource, DeviceRef, WriteError, WriteOptions, WriteStats};
use crate::format::{
    encode_rdev, make_i_format, split_xattr_name, time_to_disk, ChunkIndex, DeviceSlot, InodeCompact, InodeExtended,
    SuperBlock, BLOCK_BITS, BLOCK_SIZE, CHUNK_FORMAT_INDEXES, DEVT_SLOT_SIZE, FEATURE_INCOMPAT_CHUNKED_FILE,
    FEATURE_INCOMPAT_DEVICE_TABLE, LAYOUT_FLAT_INLINE, MAGIC, NULL_ADDR, SUPER_OFFSET, S_IFBLK, S_IFCHR, S_IFDIR,
    S_IFIFO, S_IFLNK, S_IFREG, S_IFSOCK,
};
use crate::tree::{FileData, Inode, Kind, Tree};

/// A sequential sink that knows its position.
struct Sink<'a> {
    out: io::BufWriter<&'a mut dyn Write>,
    pos: u64,
}

impl Sink<'_> {
    fn write(&mut self, b: &[u8]) -> Result<(), WriteError> {
        self.out.write_all(b).map_err(WriteError::Io)?;
        self.pos += b.len() as u64;
        Ok(())
    }

    /// Writes zeros up to `target`; fails if the output is already past it.
    fn pad_to(&mut self, target: u64, what: &'static str) -> Result<(), WriteError> {
        if self.pos > target {
            return Err(WriteError::LayoutDrift { what, planned: target, actual: self.pos });
        }
        const ZEROS: [u8; 4096] = [0; 4096];
        while self.pos < target {
            let n = usize::try_from((target - self.pos).min(4096)).unwrap_or(4096);
            self.write(&ZEROS[..n])?;
        }
        Ok(())
    }

    fn expect(&self, planned: u64, what: &'static str) -> Result<(), WriteError> {
        if self.pos != planned {
            return Err(WriteError::LayoutDrift { what, planned, actual: self.pos });
        }
        Ok(())
    }
}

pub(crate) fn emit(
    tree: &Tree,
    c: &Collected,
    shared: &SharedXattrs<'_>,
    plan: &Plan,
    content: &mut dyn ContentSource,
    out: &mut dyn Write,
    opts: &WriteOptions,
) -> Result<WriteStats, WriteError> {
    let mut sink = Sink { out: io::BufWriter::with_capacity(256 * 1024, out), pos: 0 };
    let mut stats = WriteStats {
        devices: c.devices.iter().map(|&(digest, size)| DeviceRef { digest, size }).collect(),
        inodes: c.ids.len() as u64,
        blocks: u64::from(plan.total_blocks),
        meta_bytes: plan.meta_end - plan.inodes.first().map_or(plan.meta_end, |p| p.pos),
        shared_xattrs: shared.entries.len() as u64,
        build_time: c.build_time,
        root_nid: plan.nid(0),
        ..Default::default()
    };

    // Superblock and device table.
    sink.pad_to(SUPER_OFFSET, "superblock")?;
    sink.write(superblock(c, plan, opts)?.as_bytes())?;
    sink.expect(plan.devt_off, "device table")?;
    for &(digest, size) in &c.devices {
        let mut slot = DeviceSlot::default();
        slot.tag.copy_from_slice(hex::encode(digest).as_bytes());
        slot.blocks = fit::<u64, u32>(size.div_ceil(BLOCK_SIZE), "device blocks")?.into();
        sink.write(slot.as_bytes())?;
    }

    // Shared xattrs.
    sink.expect(plan.xattr_start, "shared xattrs")?;
    let mut buf = Vec::new();
    for &(name, value) in &shared.entries {
        let (index, suffix) = split_xattr_name(name).ok_or(WriteError::Overflow { what: "xattr name" })?;
        buf.clear();
        encode_entry(&mut buf, index, suffix, value)?;
        sink.write(&buf)?;
    }

    // Inodes with their xattr bodies, inline tails and chunk indexes.
    let nid_of = |i: u32| plan.nid(i);
    let mut copy = Vec::new();
    for (index, p) in plan.inodes.iter().enumerate() {
        let id = c.ids[index];
        let inode = &tree.inodes[id];
        sink.pad_to(p.pos, "inode")?;
        if p.extended {
            stats.extended_inodes += 1;
        } else {
            stats.compact_inodes += 1;
        }
        buf.clear();
        encode_inode(&mut buf, inode, p, c.nlink[index], index)?;
        let x = shared.split(tree, id, inode)?;
        encode_body(&mut buf, &x, plan.shared_base_id)?;
        sink.write(&buf)?;
        match (&inode.kind, p.data) {
            (_, Data::Sparse { bits } | Data::External { bits, .. }) => {
                sink.pad_to(p.pos + (buf.len() as u64).next_multiple_of(8), "chunk indexes")?;
                write_chunk_indexes(&mut sink, inode, p, bits)?;
            }
            (Kind::Directory(_), _) if p.layout == LAYOUT_FLAT_INLINE => {
                let packed = dirs::pack(tree, c, fit(index, "inode index")?);
                let last = packed.blocks.last().cloned().unwrap_or(0..0);
                buf.clear();
                dirs::encode_block(tree, c, &packed.entries[last], &nid_of, &mut buf);
                if buf.len() as u64 != u64::from(p.tail) {
                    return Err(WriteError::LayoutDrift {
                        what: "directory tail",
                        planned: p.tail.into(),
                        actual: buf.len() as u64,
                    });
                }
                sink.write(&buf)?;
            }
            (Kind::Symlink(target), _) if p.layout == LAYOUT_FLAT_INLINE => sink.write(target)?,
            (Kind::Regular(FileData::Inline { extents, source, .. }), _) if p.layout == LAYOUT_FLAT_INLINE => {
                let start = p.size - u64::from(p.tail);
                data::stream_range(&mut |b| sink.write(b), content, *source, extents, start, p.size, &mut copy)?;
                stats.inline_data_bytes += u64::from(p.tail);
            }
            _ => {}
        }
        sink.expect(p.pos + p.meta_len, "end of inode metadata")?;
    }

    // Data blocks, in inode order.
    sink.pad_to(plan.data_start * BLOCK_SIZE, "data area")?;
    for (index, p) in plan.inodes.iter().enumerate() {
        if p.data_blocks == 0 {
            continue;
        }
        let start = u64::from(p.blkaddr) * BLOCK_SIZE;
        sink.expect(start, "data blocks")?;
        let inode = &tree.inodes[c.ids[index]];
        let end = start + p.data_blocks * BLOCK_SIZE;
        match (&inode.kind, p.data) {
            (Kind::Directory(_), _) => {
                let packed = dirs::pack(tree, c, fit(index, "inode index")?);
                let flat_blocks = fit::<u64, usize>(p.data_blocks, "directory blocks")?;
                for range in packed.blocks.iter().take(flat_blocks) {
                    buf.clear();
                    dirs::encode_block(tree, c, &packed.entries[range.clone()], &nid_of, &mut buf);
                    buf.resize(crate::format::BLOCK_BYTES, 0);
                    sink.write(&buf)?;
                }
            }
            (Kind::Symlink(target), _) => sink.write(target)?,
            (Kind::Regular(FileData::Inline { extents, source, .. }), Data::Flat) => {
                let flat_end = (p.size - u64::from(p.tail)).min(p.data_blocks * BLOCK_SIZE);
                data::stream_range(&mut |b| sink.write(b), content, *source, extents, 0, flat_end, &mut copy)?;
                stats.inline_data_bytes += flat_end;
            }
            (Kind::Regular(FileData::Inline { extents, source, size }), Data::Sparse { bits }) => {
                for chunk in data::data_chunks(extents, bits) {
                    let cs = chunk << bits;
                    let ce = (cs + (1u64 << bits)).min(size.next_multiple_of(BLOCK_SIZE));
                    data::stream_range(&mut |b| sink.write(b), content, *source, extents, cs, ce, &mut copy)?;
                }
                stats.inline_data_bytes += extents.iter().map(|e| e.len).sum::<u64>();
            }
            _ => {
                return Err(WriteError::LayoutDrift {
                    what: "data of an inode without data",
                    planned: 0,
                    actual: start,
                })
            }
        }
        sink.pad_to(end, "end of data blocks")?;
    }
    sink.pad_to(u64::from(plan.total_blocks) * BLOCK_SIZE, "end of image")?;
    sink.out.flush().map_err(WriteError::Io)?;
    Ok(stats)
}

fn superblock(c: &Collected, plan: &Plan, opts: &WriteOptions) -> Result<SuperBlock, WriteError> {
    let mut incompat = 0;
    if plan.inodes.iter().any(|p| matches!(p.data, Data::Sparse { .. } | Data::External { .. })) {
        incompat |= FEATURE_INCOMPAT_CHUNKED_FILE;
    }
    if !c.devices.is_empty() {
        incompat |= FEATURE_INCOMPAT_DEVICE_TABLE;
    }
    let mut volume_name = [0u8; 16];
    volume_name[..opts.volume_name.len()].copy_from_slice(&opts.volume_name);
    Ok(SuperBlock {
        magic: MAGIC.into(),
        blkszbits: BLOCK_BITS,
        root_nid: fit::<u64, u16>(plan.nid(0), "root nid")?.into(),
        inos: (c.ids.len() as u64).into(),
        build_time: time_to_disk(c.build_time.0).into(),
        build_time_nsec: c.build_time.1.into(),
        blocks: plan.total_blocks.into(),
        meta_blkaddr: plan.meta_blkaddr.into(),
        xattr_blkaddr: plan.xattr_blkaddr.into(),
        uuid: opts.uuid,
        volume_name,
        feature_incompat: incompat.into(),
        extra_devices: fit::<usize, u16>(c.devices.len(), "extra devices")?.into(),
        devt_slotoff: if c.devices.is_empty() {
            0
        } else {
            fit::<u64, u16>(plan.devt_off / DEVT_SLOT_SIZE, "devt_slotoff")?
        }
        .into(),
        ..Default::default()
    })
}

fn encode_inode(out: &mut Vec<u8>, inode: &Inode, p: &InodePlan, nlink: u32, index: usize) -> Result<(), WriteError> {
    let (ty, i_u) = match (&inode.kind, p.data) {
        (Kind::CharDevice { major, minor }, _) => (S_IFCHR, encode_rdev(*major, *minor).unwrap_or(0)),
        (Kind::BlockDevice { major, minor }, _) => (S_IFBLK, encode_rdev(*major, *minor).unwrap_or(0)),
        (Kind::Fifo, _) => (S_IFIFO, 0),
        (Kind::Socket, _) => (S_IFSOCK, 0),
        (kind, Data::Sparse { bits } | Data::External { bits, .. }) => {
            let ty = if matches!(kind, Kind::Regular(_)) { S_IFREG } else { S_IFDIR };
            (ty, u32::from(CHUNK_FORMAT_INDEXES | u16::from(bits - BLOCK_BITS)))
        }
        (Kind::Directory(_), _) => (S_IFDIR, p.blkaddr),
        (Kind::Symlink(_), _) => (S_IFLNK, p.blkaddr),
        (Kind::Regular(_), _) => (S_IFREG, p.blkaddr),
    };
    let mode = ty | inode.meta.perm;
    let format = make_i_format(p.extended, p.layout);
    let ino: u32 = fit(index + 1, "inode number")?;
    let m = &inode.meta;
    if p.extended {
        let i = InodeExtended {
            i_format: format.into(),
            i_xattr_icount: p.xattr_icount.into(),
            i_mode: mode.into(),
            i_size: p.size.into(),
            i_u: i_u.into(),
            i_ino: ino.into(),
            i_uid: m.uid.into(),
            i_gid: m.gid.into(),
            i_mtime: time_to_disk(m.mtime).into(),
            i_mtime_nsec: m.mtime_nsec.into(),
            i_nlink: nlink.into(),
            ..Default::default()
        };
        out.extend_from_slice(i.as_bytes());
    } else {
        let i = InodeCompact {
            i_format: format.into(),
            i_xattr_icount: p.xattr_icount.into(),
            i_mode: mode.into(),
            i_nlink: fit::<u32, u16>(nlink, "compact nlink")?.into(),
            i_size: fit::<u64, u32>(p.size, "compact size")?.into(),
            i_u: i_u.into(),
            i_ino: ino.into(),
            i_uid: fit::<u32, u16>(m.uid, "compact uid")?.into(),
            i_gid: fit::<u32, u16>(m.gid, "compact gid")?.into(),
            ..Default::default()
        };
        out.extend_from_slice(i.as_bytes());
    }
    Ok(())
}

fn write_chunk_indexes(sink: &mut Sink<'_>, inode: &Inode, p: &InodePlan, bits: u8) -> Result<(), WriteError> {
    let count = data::chunk_count(p.size, bits);
    let per_chunk = 1u64 << (bits - BLOCK_BITS);
    match (&inode.kind, p.data) {
        (_, Data::External { device, .. }) => {
            for i in 0..count {
                let blkaddr: u32 = fit(i * per_chunk, "chunk block address")?;
                let ci = ChunkIndex { advise: 0.into(), device_id: device.into(), blkaddr: blkaddr.into() };
                sink.write(ci.as_bytes())?;
            }
        }
        (Kind::Regular(FileData::Inline { extents, .. }), Data::Sparse { .. }) => {
            let mut stored = data::data_chunks(extents, bits).peekable();
            let mut next_blk = u64::from(p.blkaddr);
            for i in 0..count {
                let blkaddr = if stored.peek() == Some(&i) {
                    stored.next();
                    let b: u32 = fit(next_blk, "chunk block address")?;
                    let chunk_bytes = (1u64 << bits).min((p.size - (i << bits)).next_multiple_of(BLOCK_SIZE));
                    next_blk += chunk_bytes / BLOCK_SIZE;
                    b
                } else {
                    NULL_ADDR
                };
                let ci = ChunkIndex { advise: 0.into(), device_id: 0.into(), blkaddr: blkaddr.into() };
                sink.write(ci.as_bytes())?;
            }
            if next_blk != u64::from(p.blkaddr) + p.data_blocks {
                return Err(WriteError::LayoutDrift {
                    what: "sparse chunk blocks",
                    planned: u64::from(p.blkaddr) + p.data_blocks,
                    actual: next_blk,
                });
            }
        }
        _ => {
            return Err(WriteError::LayoutDrift { what: "chunk indexes of a non-chunked inode", planned: 0, actual: 0 })
        }
    }
    Ok(())
}
