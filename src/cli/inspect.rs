//! `wisp inspect IMAGE [--json]`: the tree, sizes and counts of an EROFS image.

use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use anyhow::{Context, Result};
use erofs::{FileData, Kind, Tree, ROOT};
use serde_json::json;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The image to inspect.
    image: PathBuf,
    /// Print one JSON document (summary, devices in device-table order, entries) instead of text.
    #[arg(long)]
    json: bool,
    /// Only the summary, not every path.
    #[arg(long)]
    summary: bool,
}

#[derive(Default)]
struct Counts {
    dirs: u64,
    files: u64,
    external_files: u64,
    symlinks: u64,
    devices: u64,
    fifos_sockets: u64,
    inline_bytes: u64,
    external_bytes: u64,
    hard_links: u64,
}

fn type_name(kind: &Kind) -> &'static str {
    match kind {
        Kind::Directory(_) => "dir",
        Kind::Regular(_) => "file",
        Kind::Symlink(_) => "symlink",
        Kind::CharDevice { .. } => "chr",
        Kind::BlockDevice { .. } => "blk",
        Kind::Fifo => "fifo",
        Kind::Socket => "sock",
    }
}

/// Every path of the tree (depth first, sorted), with its inode id; hard links appear once per path.
fn paths(tree: &Tree) -> Vec<(Vec<u8>, usize)> {
    let mut out = vec![(b"/".to_vec(), ROOT)];
    let mut stack = vec![(Vec::new(), ROOT)];
    while let Some((prefix, dir)) = stack.pop() {
        let Some(entries) = tree.entries(dir) else { continue };
        let mut subdirs = Vec::new();
        for (name, &id) in entries {
            let mut p = prefix.clone();
            p.push(b'/');
            p.extend_from_slice(name);
            if tree.entries(id).is_some() {
                subdirs.push((p.clone(), id));
            }
            out.push((p, id));
        }
        stack.extend(subdirs.into_iter().rev());
    }
    out.sort();
    out
}

pub fn run(args: Args) -> Result<()> {
    let image = crate::imagefile::open_image(&args.image)?;
    let tree = image.read_tree().with_context(|| format!("{}: reading the tree", args.image.display()))?;
    let paths = paths(&tree);
    let mut counts = Counts::default();
    let mut seen = vec![false; tree.inodes.len()];
    for (_, id) in &paths {
        if std::mem::replace(&mut seen[*id], true) {
            counts.hard_links += 1;
            continue;
        }
        match &tree.inodes[*id].kind {
            Kind::Directory(_) => counts.dirs += 1,
            Kind::Regular(FileData::Inline { size, .. }) => {
                counts.files += 1;
                counts.inline_bytes += size;
            }
            Kind::Regular(FileData::External { size, .. }) => {
                counts.files += 1;
                counts.external_files += 1;
                counts.external_bytes += size;
            }
            Kind::Symlink(_) => counts.symlinks += 1,
            Kind::CharDevice { .. } | Kind::BlockDevice { .. } => counts.devices += 1,
            Kind::Fifo | Kind::Socket => counts.fifos_sockets += 1,
        }
    }
    let devices: Vec<_> = image
        .devices()
        .iter()
        .map(|d| match d.digest {
            Some(digest) => json!({"digest": hex::encode(digest), "blocks": d.blocks}),
            None => json!({"tag": String::from_utf8_lossy(d.tag.split(|&b| b == 0).next().unwrap_or(&[])), "blocks": d.blocks}),
        })
        .collect();
    let summary = json!({
        "image": args.image.as_os_str().to_string_lossy(),
        "image_bytes": image.image_bytes(),
        "blocks": image.image_bytes() / 4096,
        "inodes": counts.dirs + counts.files + counts.symlinks + counts.devices + counts.fifos_sockets,
        "directories": counts.dirs,
        "regular_files": counts.files,
        "external_files": counts.external_files,
        "symlinks": counts.symlinks,
        "device_nodes": counts.devices,
        "fifos_and_sockets": counts.fifos_sockets,
        "hard_links": counts.hard_links,
        "inline_data_bytes": counts.inline_bytes,
        "external_data_bytes": counts.external_bytes,
        "devices": devices.len(),
    });
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if args.json {
        let mut doc = json!({ "summary": summary, "devices": devices });
        if !args.summary {
            let entries: Vec<_> = paths
                .iter()
                .map(|(p, id)| {
                    let ino = &tree.inodes[*id];
                    let mut e = json!({
                        "path": String::from_utf8_lossy(p),
                        "type": type_name(&ino.kind),
                        "mode": format!("{:04o}", ino.meta.perm),
                        "uid": ino.meta.uid,
                        "gid": ino.meta.gid,
                        "mtime": ino.meta.mtime,
                    });
                    match &ino.kind {
                        Kind::Regular(d) => {
                            e["size"] = json!(d.size());
                            if let FileData::External { digest, .. } = d {
                                e["digest"] = json!(hex::encode(digest));
                            }
                        }
                        Kind::Symlink(t) => e["target"] = json!(String::from_utf8_lossy(t)),
                        Kind::CharDevice { major, minor } | Kind::BlockDevice { major, minor } => {
                            e["rdev"] = json!(format!("{major}:{minor}"))
                        }
                        _ => {}
                    }
                    e
                })
                .collect();
            doc["entries"] = json!(entries);
        }
        serde_json::to_writer_pretty(&mut out, &doc)?;
        writeln!(out)?;
        return Ok(());
    }
    if !args.summary {
        for (p, id) in &paths {
            let ino = &tree.inodes[*id];
            let extra = match &ino.kind {
                Kind::Regular(FileData::External { size, digest }) => format!("{size} sha256:{}", hex::encode(digest)),
                Kind::Regular(d) => d.size().to_string(),
                Kind::Symlink(t) => format!("-> {}", String::from_utf8_lossy(t)),
                Kind::CharDevice { major, minor } | Kind::BlockDevice { major, minor } => format!("{major}:{minor}"),
                _ => String::new(),
            };
            out.write_all(
                format!("{:7} {:04o} {:>6}:{:<6} ", type_name(&ino.kind), ino.meta.perm, ino.meta.uid, ino.meta.gid)
                    .as_bytes(),
            )?;
            out.write_all(std::ffi::OsStr::from_bytes(p).as_bytes())?;
            writeln!(out, " {extra}")?;
        }
    }
    writeln!(
        out,
        "{}: {} bytes; {} dirs, {} files ({} external, {} bytes; {} inline bytes), {} symlinks, {} device nodes, {} fifos/sockets, {} hard links, {} devices",
        args.image.display(),
        image.image_bytes(),
        counts.dirs,
        counts.files,
        counts.external_files,
        counts.external_bytes,
        counts.inline_bytes,
        counts.symlinks,
        counts.devices,
        counts.fifos_sockets,
        counts.hard_links,
        devices.len()
    )?;
    Ok(())
}
