//! Arbitrary bytes as an EROFS image: open, check, rebuild the tree and read some file bytes. Every
//! input must end in `Ok` or an error, never a panic, a hang or an unbounded allocation.
#![no_main]

use erofs::{FileData, Image, Kind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(image) = Image::open(data) else { return };
    let _ = image.check();
    let Ok(tree) = image.read_tree() else { return };
    let mut buf = vec![0u8; 8192];
    for inode in &tree.inodes {
        if let Kind::Regular(FileData::Inline { source, size, .. }) = &inode.kind {
            for off in [0, size.saturating_sub(100), size / 2] {
                let _ = image.read_file_at(*source, off, &mut buf);
            }
        }
    }
});
