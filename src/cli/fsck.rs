//! `wisp fsck IMAGE`: structural check of an EROFS image.

use std::path::PathBuf;

use anyhow::{Context, Result};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The image to check.
    image: PathBuf,
}

pub fn run(args: Args) -> Result<()> {
    let image = crate::imagefile::open_image(&args.image)?;
    let report = image.check().with_context(|| format!("{}: damaged", args.image.display()))?;
    eprintln!(
        "wisp fsck: {}: clean: {} inodes ({} directories, {} regular files of which {} external), {} entries, {} devices",
        args.image.display(),
        report.inodes,
        report.directories,
        report.regular_files,
        report.external_files,
        report.dirents,
        report.devices
    );
    Ok(())
}
