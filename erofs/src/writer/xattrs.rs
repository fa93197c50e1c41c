//! Extended attributes: which (name, value) pairs go to the shared area (those used by two or more
//! inodes), and the inline xattr body of each inode (docs/kernel.md C.6).

use std::collections::HashMap;

use zerocopy::IntoBytes;

use super::collect::Collected;
use super::{path_of, WriteError};
use crate::format::{split_xattr_name, xattr_entry_size, XattrEntry, XattrIbodyHeader};
use crate::tree::{Inode, InodeId, Tree};

/// At most this many shared ids per inode (`h_shared_count` is a u8).
const MAX_SHARED_PER_INODE: usize = 255;

type Pair<'t> = (&'t [u8], &'t [u8]);

/// The shared xattr area: entries in a canonical (sorted) order and their byte offsets in the area.
#[derive(Debug, Default)]
pub(crate) struct SharedXattrs<'t> {
    offset_of: HashMap<Pair<'t>, u64>,
    pub entries: Vec<Pair<'t>>,
    pub area_len: u64,
}

/// One inode's xattr body: shared entries by area offset, then inline (index, suffix, value).
#[derive(Debug, Default)]
pub(crate) struct InodeXattrs<'t> {
    pub shared: Vec<u64>,
    pub inline: Vec<(u8, &'t [u8], &'t [u8])>,
    /// Bytes of the body (`xattr_isize`), 0 without xattrs.
    pub ibody: u32,
    pub icount: u16,
}

impl<'t> SharedXattrs<'t> {
    pub fn build(tree: &'t Tree, c: &Collected) -> Result<Self, WriteError> {
        let mut count: HashMap<Pair<'t>, u32> = HashMap::new();
        for &id in &c.ids {
            for (n, v) in &tree.inodes[id].xattrs {
                *count.entry((n.as_slice(), v.as_slice())).or_default() += 1;
            }
        }
        let mut entries: Vec<Pair<'t>> = count.into_iter().filter(|&(_, n)| n >= 2).map(|(p, _)| p).collect();
        entries.sort_unstable();
        let mut offset_of = HashMap::with_capacity(entries.len());
        let mut area_len = 0u64;
        for &(n, v) in &entries {
            offset_of.insert((n, v), area_len);
            let suffix = split_xattr_name(n).map_or(n.len(), |(_, s)| s.len());
            area_len += xattr_entry_size(suffix, v.len()) as u64;
        }
        Ok(SharedXattrs { offset_of, entries, area_len })
    }

    /// Splits an inode's xattrs into shared references and inline entries.
    pub fn split(&self, tree: &Tree, id: InodeId, inode: &'t Inode) -> Result<InodeXattrs<'t>, WriteError> {
        let mut x = InodeXattrs::default();
        if inode.xattrs.is_empty() {
            return Ok(x);
        }
        let mut inline_bytes = 0u64;
        for (n, v) in &inode.xattrs {
            let (index, suffix) = split_xattr_name(n).ok_or_else(|| WriteError::UnknownXattrPrefix {
                path: path_of(tree, id),
                name: String::from_utf8_lossy(n).into_owned(),
            })?;
            match self.offset_of.get(&(n.as_slice(), v.as_slice())) {
                Some(&off) if x.shared.len() < MAX_SHARED_PER_INODE => x.shared.push(off),
                _ => {
                    inline_bytes += xattr_entry_size(suffix.len(), v.len()) as u64;
                    x.inline.push((index, suffix, v.as_slice()));
                }
            }
        }
        let body = 12 + 4 * x.shared.len() as u64 + inline_bytes;
        let icount = (body - 12) / 4 + 1;
        x.icount =
            u16::try_from(icount).map_err(|_| WriteError::XattrsTooLarge { path: path_of(tree, id), bytes: body })?;
        x.ibody =
            u32::try_from(body).map_err(|_| WriteError::XattrsTooLarge { path: path_of(tree, id), bytes: body })?;
        Ok(x)
    }
}

/// Appends one xattr entry (header, suffix, value, padding to 4).
pub(crate) fn encode_entry(out: &mut Vec<u8>, index: u8, suffix: &[u8], value: &[u8]) -> Result<(), WriteError> {
    let e = XattrEntry {
        e_name_len: super::fit(suffix.len(), "xattr name length")?,
        e_name_index: index,
        e_value_size: super::fit::<usize, u16>(value.len(), "xattr value size")?.into(),
    };
    let start = out.len();
    out.extend_from_slice(e.as_bytes());
    out.extend_from_slice(suffix);
    out.extend_from_slice(value);
    out.resize(start + xattr_entry_size(suffix.len(), value.len()), 0);
    Ok(())
}

/// Appends the inline xattr body of an inode; `shared_base_id` is the id of area offset 0.
pub(crate) fn encode_body(out: &mut Vec<u8>, x: &InodeXattrs<'_>, shared_base_id: u64) -> Result<(), WriteError> {
    if x.ibody == 0 {
        return Ok(());
    }
    let start = out.len();
    let h =
        XattrIbodyHeader { h_shared_count: super::fit(x.shared.len(), "shared xattr count")?, ..Default::default() };
    out.extend_from_slice(h.as_bytes());
    for &off in &x.shared {
        let id: u32 = super::fit(shared_base_id + off / 4, "shared xattr id")?;
        out.extend_from_slice(&id.to_le_bytes());
    }
    for &(index, suffix, value) in &x.inline {
        encode_entry(out, index, suffix, value)?;
    }
    let written = (out.len() - start) as u64;
    if written != u64::from(x.ibody) {
        return Err(WriteError::LayoutDrift { what: "xattr body", planned: u64::from(x.ibody), actual: written });
    }
    Ok(())
}
