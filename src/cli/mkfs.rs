//! `wisp mkfs [--external OBJECTS_DIR] SRC_DIR OUT.erofs`

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;

use crate::fswalk::{self, DirContent};
use crate::object::atomic::write_atomic_with;
use crate::object::dir::ObjectDir;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Store file data as objects OBJECTS_DIR/<2 hex>/<sha256>, referenced by device-table tags,
    /// instead of inside the image.
    #[arg(long, value_name = "OBJECTS_DIR")]
    external: Option<PathBuf>,
    /// Source directory.
    src: PathBuf,
    /// Output image (written to a temporary name, then renamed).
    out: PathBuf,
}

struct Content<'a>(DirContent<'a>);

impl erofs::writer::ContentSource for Content<'_> {
    fn read_at(&mut self, source: u64, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.0.read_at(source, offset, buf)
    }
}

pub fn run(args: Args) -> Result<()> {
    let start = Instant::now();
    let mut walked = fswalk::walk(&args.src)?;
    let mut external = None;
    if let Some(dir) = &args.external {
        let objects = ObjectDir::new(dir);
        let pb = super::progress_bar(0, "objects");
        let stats = fswalk::store_external(&mut walked, &objects, &pb)?;
        pb.finish_and_clear();
        external = Some(stats);
    }
    let stats = write_atomic_with(&args.out, |out| {
        let mut content = Content(DirContent::new(&walked.sources));
        erofs::writer::write_image(&walked.tree, &mut content, out, &erofs::writer::WriteOptions::default())
            .map_err(anyhow::Error::from)
    })?;
    let size = std::fs::metadata(&args.out)?.len();
    let mut line =
        format!("wisp mkfs: {} inodes, image {} bytes ({} blocks)", walked.tree.inodes.len(), size, size / 4096);
    if let Some(s) = external {
        line += &format!(
            ", {} files -> {} devices, {} new objects ({} bytes)",
            s.files,
            stats.devices.len(),
            s.new_objects,
            s.new_bytes
        );
    }
    eprintln!("{line} in {:.2}s", start.elapsed().as_secs_f64());
    Ok(())
}
