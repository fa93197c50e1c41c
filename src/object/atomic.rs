//! Files that appear whole or not at all: each is made under a hidden temporary name in its
//! destination's directory (so on the same file system), then renamed into place; whatever fails
//! before that removes the temporary file. A reader never sees a partial file under the final name.
//!
//! Used for object files (directory stores, `wisp mkfs --external`, the node cache), OCI layout blobs
//! and `index.json`, images written by `wisp mkfs`, and the daemon's and snapshotter's records. What
//! differs between them is the caller's: how the file is filled, whether it is fsynced, and whether an
//! existing file of that name is replaced ([`Place::Replace`]) or kept ([`Place::NoClobber`], the node
//! cache, where the kernel may already have marked the file another request placed).

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};
use tempfile::TempPath;

static SEQ: AtomicU64 = AtomicU64::new(0);

/// What happens when the final name exists by the time a file is placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// Replace it (rename(2)).
    Replace,
    /// Keep it and drop the new file (renameat2 `RENAME_NOREPLACE`, or link(2) where the file system
    /// lacks it).
    NoClobber,
}

/// A file under a temporary name, removed when dropped unless placed.
#[derive(Debug)]
pub struct TempFile {
    path: TempPath,
}

impl TempFile {
    /// A temporary name in `dir`, `.NAME.tmp.PID.SEQ`: unique among this process's temporary files and
    /// those of every other live process. Nothing is created. (Fails only when `dir` is relative and
    /// the current directory is gone.)
    pub fn in_dir(dir: &Path, name: &str) -> io::Result<Self> {
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let path = TempPath::try_from_path(dir.join(format!(".{name}.tmp.{}.{seq}", std::process::id())))?;
        Ok(TempFile { path })
    }

    /// A temporary name beside `dest`, in its directory.
    pub fn beside(dest: &Path) -> io::Result<Self> {
        let dir = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        TempFile::in_dir(dir, &name)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Gives the file its final name `dest` (on the same file system). Returns whether it was placed:
    /// `false` only with [`Place::NoClobber`] when `dest` existed, and then the temporary file is gone.
    pub fn place(self, dest: &Path, how: Place) -> io::Result<bool> {
        let r = match how {
            Place::Replace => self.path.persist(dest),
            Place::NoClobber => self.path.persist_noclobber(dest),
        };
        match r {
            Ok(()) => Ok(true),
            Err(e) if how == Place::NoClobber && e.error.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e.error),
        }
    }
}

/// Makes `dest` appear whole: `fill` creates the file at the temporary path it is given (beside
/// `dest`), then it takes the name `dest` as `how` says. Returns what `fill` returned and whether the
/// file was placed ([`TempFile::place`]). On any error the temporary file is removed and `dest` is
/// untouched.
pub fn create<T>(dest: &Path, how: Place, fill: impl FnOnce(&Path) -> Result<T>) -> Result<(T, bool)> {
    let tmp = TempFile::beside(dest).with_context(|| format!("a temporary name beside {}", dest.display()))?;
    let value = fill(tmp.path())?;
    let placed = tmp.place(dest, how).with_context(|| format!("renaming to {}", dest.display()))?;
    Ok((value, placed))
}

/// Writes `bytes` to `path` through a temporary file (fsynced) and a rename, replacing any file
/// there.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    create(path, Place::Replace, |tmp| {
        let mut f = File::create(tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        Ok(())
    })
    .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Writes `path` with `write` through a buffered temporary file (fsynced) and a rename, replacing any
/// file there; a failed `write` leaves nothing behind.
pub fn write_atomic_with<T>(path: &Path, write: impl FnOnce(&mut dyn Write) -> Result<T>) -> Result<T> {
    path.file_name().with_context(|| format!("{}: the path has no file name", path.display()))?;
    let (value, _) = create(path, Place::Replace, |tmp| {
        let file = File::create(tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        let value = write(&mut out)?;
        let file =
            out.into_inner().map_err(|e| e.into_error()).with_context(|| format!("writing {}", tmp.display()))?;
        file.sync_all().with_context(|| format!("syncing {}", tmp.display()))?;
        Ok(value)
    })?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    #[test]
    fn replace_no_clobber_and_failure() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("f");
        write_atomic(&dest, b"one").unwrap();
        write_atomic(&dest, b"two").unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"two");

        let (_, placed) = create(&dest, Place::NoClobber, |t| Ok(std::fs::write(t, b"three")?)).unwrap();
        assert!(!placed, "an existing file is kept");
        assert_eq!(std::fs::read(&dest).unwrap(), b"two");

        let other = dir.path().join("g");
        let (_, placed) = create(&other, Place::NoClobber, |t| Ok(std::fs::write(t, b"four")?)).unwrap();
        assert!(placed);
        assert_eq!(std::fs::read(&other).unwrap(), b"four");

        let err = write_atomic_with::<()>(&dest, |w| {
            w.write_all(b"partial")?;
            anyhow::bail!("stop")
        });
        assert!(err.is_err());
        assert_eq!(std::fs::read(&dest).unwrap(), b"two", "a failed write leaves the old file");
        assert_eq!(names(dir.path()), ["f", "g"], "no temporary file is left behind");
    }
}
