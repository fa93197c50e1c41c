//! Turns a directory on a local file system into an [`erofs::tree::Tree`]: every file type, ownership,
//! permissions, nanosecond mtimes, xattrs, hard links (by device and inode number) and the holes of
//! sparse files (SEEK_DATA/SEEK_HOLE). Regular file bytes are not read here: inline images read them
//! later through [`DirContent`]; external images have them copied into an [`ObjectDir`] by
//! [`store_external`].

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use anyhow::{anyhow, Context, Result};
use erofs::tree::{Extent, FileData, Inode, InodeId, Kind, Metadata, Tree};

use crate::object::dir::ObjectDir;

/// A walked directory: the tree, and for each regular file's `source` handle the path it came from.
#[derive(Debug)]
pub struct Walked {
    pub tree: Tree,
    /// `sources[h]` is the file behind `FileData::Inline { source: h, .. }`.
    pub sources: Vec<PathBuf>,
}

/// Walks `root` (not following symlinks, staying on whatever file systems it spans).
pub fn walk(root: &Path) -> Result<Walked> {
    let meta = fs::symlink_metadata(root).with_context(|| format!("reading {}", root.display()))?;
    if !meta.is_dir() {
        return Err(anyhow!("{} is not a directory", root.display()));
    }
    let mut tree = Tree::new(metadata_of(&meta));
    tree.inodes[erofs::tree::ROOT].xattrs = read_xattrs(root)?;
    let mut w = Walker { tree, sources: Vec::new(), links: HashMap::new() };
    let mut stack = vec![(root.to_path_buf(), erofs::tree::ROOT)];
    while let Some((dir, id)) = stack.pop() {
        let rd = fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?;
        for entry in rd {
            let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
            let path = entry.path();
            let child = w.add(&path)?;
            if w.tree.entries(child).is_some() {
                stack.push((path, child));
            }
            let name = entry.file_name().as_bytes().to_vec();
            w.tree.entries_mut(id).expect("a directory").insert(name, child);
        }
    }
    Ok(Walked { tree: w.tree, sources: w.sources })
}

struct Walker {
    tree: Tree,
    sources: Vec<PathBuf>,
    /// (st_dev, st_ino) of multiply-linked non-directories already added.
    links: HashMap<(u64, u64), InodeId>,
}

impl Walker {
    fn add(&mut self, path: &Path) -> Result<InodeId> {
        let meta = fs::symlink_metadata(path).with_context(|| format!("reading {}", path.display()))?;
        let ft = meta.file_type();
        if !ft.is_dir() && meta.nlink() > 1 {
            if let Some(&id) = self.links.get(&(meta.dev(), meta.ino())) {
                return Ok(id);
            }
        }
        let kind = if ft.is_dir() {
            Kind::Directory(BTreeMap::new())
        } else if ft.is_file() {
            let extents = data_extents(path, &meta)?;
            self.sources.push(path.to_path_buf());
            Kind::Regular(FileData::Inline { size: meta.len(), extents, source: (self.sources.len() - 1) as u64 })
        } else if ft.is_symlink() {
            let target = fs::read_link(path).with_context(|| format!("reading link {}", path.display()))?;
            Kind::Symlink(target.as_os_str().as_bytes().to_vec())
        } else if ft.is_char_device() {
            let (major, minor) = dev_numbers(meta.rdev());
            Kind::CharDevice { major, minor }
        } else if ft.is_block_device() {
            let (major, minor) = dev_numbers(meta.rdev());
            Kind::BlockDevice { major, minor }
        } else if ft.is_fifo() {
            Kind::Fifo
        } else if ft.is_socket() {
            Kind::Socket
        } else {
            return Err(anyhow!("{}: unknown file type", path.display()));
        };
        let mut inode = Inode::new(kind, metadata_of(&meta));
        inode.xattrs = read_xattrs(path)?;
        let id = self.tree.push(inode);
        if !ft.is_dir() && meta.nlink() > 1 {
            self.links.insert((meta.dev(), meta.ino()), id);
        }
        Ok(id)
    }
}

fn metadata_of(meta: &fs::Metadata) -> Metadata {
    Metadata {
        perm: (meta.mode() & 0o7777) as u16,
        uid: meta.uid(),
        gid: meta.gid(),
        mtime: meta.mtime(),
        // st_mtime_nsec is always in 0..1e9.
        mtime_nsec: u32::try_from(meta.mtime_nsec()).unwrap_or(0),
    }
}

fn dev_numbers(rdev: u64) -> (u32, u32) {
    (rustix::fs::major(rdev), rustix::fs::minor(rdev))
}

/// The data ranges of a regular file: the whole file unless it occupies fewer blocks than its size
/// needs, in which case SEEK_DATA/SEEK_HOLE tell where the data is.
fn data_extents(path: &Path, meta: &fs::Metadata) -> Result<Vec<Extent>> {
    let size = meta.len();
    if size == 0 {
        return Ok(Vec::new());
    }
    if meta.blocks() * 512 >= size {
        return Ok(vec![Extent { offset: 0, len: size }]);
    }
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut extents = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let start = match rustix::fs::seek(&file, rustix::fs::SeekFrom::Data(pos)) {
            Ok(s) => s,
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(io::Error::from(e)).with_context(|| format!("SEEK_DATA in {}", path.display())),
        };
        let end = rustix::fs::seek(&file, rustix::fs::SeekFrom::Hole(start))
            .map_err(io::Error::from)
            .with_context(|| format!("SEEK_HOLE in {}", path.display()))?
            .min(size);
        if end > start {
            extents.push(Extent { offset: start, len: end - start });
        }
        pos = end;
    }
    Ok(extents)
}

/// All extended attributes of `path` (not following symlinks), by full name.
///
/// The sizes come from `llistxattr_query`/`lgetxattr_query` (a NULL buffer of length 0, the
/// syscalls' size query): rustix's `llistxattr`/`lgetxattr` given an empty buffer return 0, not the
/// size. A list or value that grows between the query and the read (ERANGE) is asked again.
pub fn read_xattrs(path: &Path) -> Result<BTreeMap<Vec<u8>, Vec<u8>>> {
    let mut out = BTreeMap::new();
    let list_err =
        |e: rustix::io::Errno| Err(io::Error::from(e)).with_context(|| format!("listing xattrs of {}", path.display()));
    let names = loop {
        let len = match rustix::fs::llistxattr_query(path) {
            Ok(0) => return Ok(out),
            Ok(n) => n,
            Err(rustix::io::Errno::NOTSUP) => return Ok(out),
            Err(e) => return list_err(e),
        };
        let mut buf = vec![0u8; len];
        match rustix::fs::llistxattr(path, &mut buf[..]) {
            Ok(n) => {
                buf.truncate(n);
                break buf;
            }
            Err(rustix::io::Errno::RANGE) => continue,
            Err(e) => return list_err(e),
        }
    };
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let cname = std::ffi::CString::new(name).expect("split at NUL");
        let value_err = |e: rustix::io::Errno| {
            Err(io::Error::from(e)).with_context(|| {
                format!("reading xattr {} of {}", OsStr::from_bytes(name).to_string_lossy(), path.display())
            })
        };
        let value = loop {
            let len = match rustix::fs::lgetxattr_query(path, cname.as_c_str()) {
                Ok(n) => n,
                Err(rustix::io::Errno::NODATA) => break None,
                Err(e) => return value_err(e),
            };
            if len == 0 {
                break Some(Vec::new());
            }
            let mut buf = vec![0u8; len];
            match rustix::fs::lgetxattr(path, cname.as_c_str(), &mut buf[..]) {
                Ok(n) => {
                    buf.truncate(n);
                    break Some(buf);
                }
                Err(rustix::io::Errno::RANGE) => continue,
                Err(rustix::io::Errno::NODATA) => break None,
                Err(e) => return value_err(e),
            }
        };
        if let Some(v) = value {
            out.insert(name.to_vec(), v);
        }
    }
    Ok(out)
}

/// Summary of [`store_external`].
#[derive(Debug, Default, Clone, Copy)]
pub struct StoreStats {
    pub files: usize,
    pub bytes: u64,
    pub new_objects: usize,
    pub new_bytes: u64,
}

/// One stored file: its inode, content sha256, content size, and whether the store was missing it.
type Ingested = (InodeId, [u8; 32], u64, bool);

/// Copies every non-empty regular file of `walked` into `objects` (hashing as it copies, on all cores)
/// and turns its data into `FileData::External`. Empty files stay inline: they need no object.
pub fn store_external(
    walked: &mut Walked,
    objects: &ObjectDir,
    progress: &indicatif::ProgressBar,
) -> Result<StoreStats> {
    let jobs: Vec<(InodeId, u64)> = walked
        .tree
        .inodes
        .iter()
        .enumerate()
        .filter_map(|(id, ino)| match &ino.kind {
            Kind::Regular(FileData::Inline { size, source, .. }) if *size > 0 => Some((id, *source)),
            _ => None,
        })
        .collect();
    progress.set_length(jobs.len() as u64);
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Ingested>> = Mutex::new(Vec::with_capacity(jobs.len()));
    let workers = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(8);
    let sources = &walked.sources;
    std::thread::scope(|s| -> Result<()> {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&(id, source)) = jobs.get(i) else { return Ok(()) };
                        let path = &sources[usize::try_from(source).expect("source index fits usize")];
                        let (digest, size, new) = objects.ingest_file(path)?;
                        results.lock().expect("poisoned").push((id, digest, size, new));
                        progress.inc(1);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| anyhow!("hashing thread panicked"))??;
        }
        Ok(())
    })?;
    let mut stats = StoreStats::default();
    for (id, digest, size, new) in results.into_inner().expect("poisoned") {
        stats.files += 1;
        stats.bytes += size;
        if new {
            stats.new_objects += 1;
            stats.new_bytes += size;
        }
        walked.tree.inodes[id].kind = Kind::Regular(FileData::External { size, digest });
    }
    Ok(stats)
}

/// Reads inline file bytes for the EROFS writer from the walked files, keeping the last file open.
#[derive(Debug)]
pub struct DirContent<'a> {
    sources: &'a [PathBuf],
    open: Option<(u64, File)>,
}

impl<'a> DirContent<'a> {
    pub fn new(sources: &'a [PathBuf]) -> Self {
        DirContent { sources, open: None }
    }

    /// Reads `buf.len()` bytes at `offset` of the file behind `source`.
    pub fn read_at(&mut self, source: u64, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if self.open.as_ref().map(|(s, _)| *s) != Some(source) {
            let path = usize::try_from(source)
                .ok()
                .and_then(|i| self.sources.get(i))
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no source #{source}")))?;
            let f = File::open(path).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
            self.open = Some((source, f));
        }
        let (_, f) = self.open.as_ref().expect("just opened");
        f.read_exact_at(buf, offset).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "{} at offset {offset}: {e}",
                    self.sources[usize::try_from(source).expect("source index fits usize")].display()
                ),
            )
        })
    }
}
