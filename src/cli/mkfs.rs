//! `wisp mkfs [--external OBJECTS_DIR] SRC_DIR OUT.erofs`

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};

use crate::fswalk::{self, DirContent};
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
    let stats = write_atomically(&args.out, |out| {
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

/// Writes `path` through a temporary file in the same directory and renames it into place, so a failed
/// run leaves no partial image behind.
pub(crate) fn write_atomically<T>(path: &Path, f: impl FnOnce(&mut dyn Write) -> Result<T>) -> Result<T> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().context("output path has no file name")?;
    let tmp = dir.join(format!(".{}.tmp.{}", name.to_string_lossy(), std::process::id()));
    let result = (|| {
        let file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        let value = f(&mut out)?;
        let file =
            out.into_inner().map_err(|e| e.into_error()).with_context(|| format!("writing {}", tmp.display()))?;
        file.sync_all().with_context(|| format!("syncing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
        Ok(value)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
