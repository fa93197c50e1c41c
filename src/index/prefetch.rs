//! The startup prefetch list an index image may carry (`wisp/prefetch.list`): the regular files of
//! an image by path, and checking a list against them.

use anyhow::{bail, Result};
use erofs::tree::{FileData, Kind, Tree};

/// Every regular file reachable in `tree` with its absolute path (`/usr/bin/python3`), depth-first in
/// name order; a hard-linked file appears under each of its names.
pub fn regular_files(tree: &Tree) -> Vec<(Vec<u8>, &FileData)> {
    let mut out = Vec::new();
    let mut stack: Vec<(Vec<u8>, usize)> = vec![(Vec::new(), 0)];
    while let Some((path, id)) = stack.pop() {
        match &tree.inodes[id].kind {
            Kind::Directory(entries) => {
                for (name, &child) in entries.iter().rev() {
                    let mut p = path.clone();
                    p.push(b'/');
                    p.extend_from_slice(name);
                    stack.push((p, child));
                }
            }
            Kind::Regular(data) => out.push((path, data)),
            _ => {}
        }
    }
    out
}

/// Checks a prefetch list against the image `tree` and returns it normalized (one absolute path per
/// line; blank lines and `#` comments dropped). A path that is not a regular file of the image is an
/// error naming `name`, the line and the path.
pub fn check_prefetch(tree: &Tree, text: &[u8], name: &str) -> Result<Vec<u8>> {
    let files: std::collections::HashSet<Vec<u8>> = regular_files(tree).into_iter().map(|(p, _)| p).collect();
    let mut out = Vec::new();
    for (i, line) in text.split(|&b| b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() || line.starts_with(b"#") {
            continue;
        }
        let mut path = Vec::with_capacity(line.len() + 1);
        if !line.starts_with(b"/") {
            path.push(b'/');
        }
        path.extend_from_slice(line);
        if !files.contains(&path) {
            bail!("{name}:{}: {}: not a regular file of the image", i + 1, String::from_utf8_lossy(line));
        }
        out.extend_from_slice(&path);
        out.push(b'\n');
    }
    Ok(out)
}
