//! Extended attributes of an inode: the inline body and the shared entries it references
//! (fs/erofs/xattr.c). The entry sizes must add up exactly to the body size.

use zerocopy::FromBytes;

use super::{corrupt, Image, InodeInfo, ReadAt, ReadError};
use crate::format::{join_xattr_name, xattr_entry_size, XattrEntry, XattrIbodyHeader, BLOCK_SIZE};

/// A decoded xattr: full name and value.
pub type Xattr = (Vec<u8>, Vec<u8>);

impl<R: ReadAt> Image<R> {
    /// The xattrs of an inode, inline entries first, then shared ones, in on-disk order.
    pub fn xattrs(&self, ino: &InodeInfo) -> Result<Vec<Xattr>, ReadError> {
        let mut out = Vec::new();
        self.walk_xattrs(ino, &mut |_| true, &mut |x| out.push(x))?;
        Ok(out)
    }

    /// Validates an inode's xattr body; shared entries are read only when `first_use` says so (`check`
    /// validates each shared entry once, however many inodes name it).
    pub(crate) fn validate_xattrs(
        &self,
        ino: &InodeInfo,
        first_use: &mut dyn FnMut(u32) -> bool,
    ) -> Result<(), ReadError> {
        self.walk_xattrs(ino, first_use, &mut |_| {})
    }

    fn walk_xattrs(
        &self,
        ino: &InodeInfo,
        read_shared: &mut dyn FnMut(u32) -> bool,
        out: &mut dyn FnMut(Xattr),
    ) -> Result<(), ReadError> {
        let nid = ino.nid;
        let size = ino.xattr_isize();
        if size == 0 {
            return Ok(());
        }
        let start = ino.offset + ino.inode_isize();
        if size == 12 {
            return Err(ReadError::Unsupported { nid, what: "xattr_isize 12 (i_xattr_icount 1)".into() });
        }
        // at most 12 + 4 * 65534 bytes
        let mut body = vec![0u8; usize::try_from(size).map_err(|_| corrupt(nid, start, "xattr body size"))?];
        self.read_meta(nid, &mut body, start)?;
        let (h, rest) =
            XattrIbodyHeader::read_from_prefix(&body).map_err(|_| corrupt(nid, start, "short xattr header"))?;
        let shared = usize::from(h.h_shared_count);
        if shared * 4 > rest.len() {
            return Err(corrupt(nid, start, format!("{shared} shared xattr ids do not fit the xattr body")));
        }
        let mut off = 12 + shared * 4;
        while off < body.len() {
            let at = start + off as u64;
            let (e, tail) = XattrEntry::read_from_prefix(&body[off..])
                .map_err(|_| corrupt(nid, at, "xattr entry header does not fit the xattr body"))?;
            let (nl, vl) = (usize::from(e.e_name_len), usize::from(e.e_value_size.get()));
            let esize = xattr_entry_size(nl, vl);
            if esize > body.len() - off {
                return Err(corrupt(nid, at, "xattr entry sizes do not add up to the xattr body size"));
            }
            let name = join_xattr_name(e.e_name_index, &tail[..nl])
                .ok_or_else(|| corrupt(nid, at, format!("xattr name index {} unknown to 6.1", e.e_name_index)))?;
            out((name, tail[nl..nl + vl].to_vec()));
            off += esize;
        }
        for i in 0..shared {
            let raw = &body[12 + 4 * i..16 + 4 * i];
            let id = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
            if read_shared(id) {
                out(self.shared_xattr(nid, id)?);
            }
        }
        Ok(())
    }

    /// Reads shared xattr `id`.
    pub fn shared_xattr(&self, nid: u64, id: u32) -> Result<Xattr, ReadError> {
        let at = u64::from(self.sb.xattr_blkaddr.get()) * BLOCK_SIZE + 4 * u64::from(id);
        let mut h = [0u8; 4];
        self.read_meta(nid, &mut h, at)
            .map_err(|_| corrupt(nid, at, format!("shared xattr id {id} outside the image")))?;
        let e = XattrEntry::read_from_bytes(&h).map_err(|_| corrupt(nid, at, "short xattr entry"))?;
        let (nl, vl) = (usize::from(e.e_name_len), usize::from(e.e_value_size.get()));
        let mut nv = vec![0u8; nl + vl];
        self.read_meta(nid, &mut nv, at + 4)?;
        let name = join_xattr_name(e.e_name_index, &nv[..nl])
            .ok_or_else(|| corrupt(nid, at, format!("shared xattr name index {} unknown to 6.1", e.e_name_index)))?;
        Ok((name, nv.split_off(nl)))
    }
}
