//! A zero-initialised, page-aligned byte buffer, for writes that the kernel turns into direct I/O (the
//! cachefiles anonymous fd: docs/kernel.md A.4 requires a page-aligned source, 4 KiB-aligned offsets and
//! 4 KiB-multiple lengths).

use std::alloc::{self, Layout};
use std::ptr::NonNull;

/// Page size and direct-I/O alignment assumed throughout (x86-64 and the EROFS block size).
pub const BLOCK: usize = 4096;

/// An owned buffer whose start is aligned to [`BLOCK`] and whose capacity is a multiple of it.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively (like Vec<u8>), so moving it to another thread or
// sharing `&AlignedBuf` (read-only byte access) is as safe as for Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: see Send; `&AlignedBuf` only allows reading the bytes.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes (capacity rounded up to a whole number of blocks, at least one).
    ///
    /// Panics only if the allocator fails, like `Vec`.
    pub fn zeroed(len: usize) -> Self {
        let cap = len.div_ceil(BLOCK).max(1).saturating_mul(BLOCK);
        let layout =
            Layout::from_size_align(cap, BLOCK).unwrap_or_else(|_| alloc::handle_alloc_error(Layout::new::<u8>()));
        // SAFETY: `layout` has a non-zero size (cap >= BLOCK) and a valid power-of-two alignment.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else { alloc::handle_alloc_error(layout) };
        AlignedBuf { ptr, len, cap }
    }

    /// Bytes in use.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no bytes are in use.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Grows the used length to the next block multiple; the added bytes are zero (padding for direct I/O).
    pub fn pad_to_block(&mut self) {
        self.len = self.len.div_ceil(BLOCK) * BLOCK;
        debug_assert!(self.len <= self.cap);
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` points to `cap >= len` initialised (zeroed at allocation) bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in Deref, and `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with exactly this size and alignment.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), Layout::from_size_align_unchecked(self.cap, BLOCK)) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf").field("len", &self.len).field("cap", &self.cap).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_zeroed_and_padded() {
        for len in [0, 1, 4095, 4096, 4097, 1 << 20] {
            let mut b = AlignedBuf::zeroed(len);
            assert_eq!(b[..].as_ptr() as usize % BLOCK, 0);
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&x| x == 0));
            if len > 0 {
                b[len - 1] = 7;
            }
            b.pad_to_block();
            assert_eq!(b.len() % BLOCK, 0);
            assert!(b.len() >= len);
        }
    }
}
