//! An EROFS image on disk as a byte source for [`erofs::reader`].

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::{Context, Result};

/// A file read with positional reads.
#[derive(Debug)]
pub struct ImageFile(File);

impl ImageFile {
    pub fn open(path: &Path) -> Result<Self> {
        Ok(ImageFile(File::open(path).with_context(|| format!("opening {}", path.display()))?))
    }
}

impl erofs::ReadAt for ImageFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_exact_at(buf, offset)
    }
}

/// Opens and validates the superblock of the image at `path`.
pub fn open_image(path: &Path) -> Result<erofs::Image<ImageFile>> {
    erofs::Image::open(ImageFile::open(path)?).with_context(|| format!("{}: not a valid EROFS image", path.display()))
}
