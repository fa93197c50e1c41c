//! Directories only root may enter: the daemon's state and cache roots and the snapshotter's root.
//!
//! What is under them (index images, object files, the lower EROFS mounts with an image's setuid-root
//! programs and device nodes, containers' upper directories) must not be reachable by other local
//! users; a 0700 root closes every path below it, the way containerd makes its snapshotters' roots
//! (`os.MkdirAll(root, 0700)` in containerd's overlay snapshotter).

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

use anyhow::{Context, Result};

/// Creates `dir` (and missing parents, 0700 as well) and sets `dir` itself to 0700 even when it
/// existed with a wider mode (a node upgraded from a release that created it with the umask).
pub fn ensure(dir: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let meta = fs::symlink_metadata(dir).with_context(|| format!("stat {}", dir.display()))?;
    if !meta.is_dir() {
        anyhow::bail!("{} is not a directory", dir.display());
    }
    if meta.permissions().mode() & 0o7777 != 0o700 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("making {} private (0700)", dir.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn narrows_an_existing_directory() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("a/b");
        fs::create_dir_all(&d).unwrap();
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).unwrap();
        ensure(&d).unwrap();
        assert_eq!(fs::metadata(&d).unwrap().permissions().mode() & 0o7777, 0o700);
        let e = t.path().join("c/d");
        ensure(&e).unwrap();
        assert_eq!(fs::metadata(&e).unwrap().permissions().mode() & 0o7777, 0o700);
        fs::write(t.path().join("f"), b"").unwrap();
        assert!(ensure(&t.path().join("f")).is_err());
    }
}
