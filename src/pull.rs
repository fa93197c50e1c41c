//! `wisp pull --eager`, the inverse of `wisp convert`: fetch an index image and every object it
//! references, verify each object (blob digest of the stored bytes, sha256 of the content), and
//! materialize the tree with real ownership, modes, nanosecond mtimes, xattrs, device numbers and
//! hard links. Runs as root.
//!
//! Objects are fetched in parallel into a staging directory beside DIR (never inside it); metadata
//! is applied in the order that keeps it: owner, then mode (chown clears setuid bits), then xattrs
//! (chown clears security.capability), then times; directories last, deepest first.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use erofs::tree::{Digest, FileData, Inode, InodeId, Kind, Tree, ROOT};
use rustix::fs::{AtFlags, FileType, Mode, Timespec, Timestamps, CWD};
use serde::Serialize;

use crate::index;
use crate::object::ObjectEntry;
use crate::oci::Repo;
use crate::store::{fetch_verified, ObjectStore};

#[derive(Debug, Clone, Default, Serialize)]
pub struct PullSummary {
    pub image: String,
    pub manifest_digest: String,
    pub source_digest: Option<String>,
    pub store: String,
    pub inodes: u64,
    pub files: u64,
    pub objects: u64,
    pub object_bytes: u64,
    pub stored_bytes: u64,
    pub index_bytes: u64,
    pub seconds: f64,
}

/// Pulls the index image from `repo` and materializes it at `dest` (which must not exist or be
/// empty).
pub fn pull_eager(
    repo: &dyn Repo,
    store: &dyn ObjectStore,
    dest: &Path,
    jobs: usize,
    progress: bool,
) -> Result<PullSummary> {
    let start = Instant::now();
    let pulled = index::read(repo).with_context(|| format!("reading the index image {}", repo.describe()))?;
    let image = erofs::reader::Image::open(pulled.erofs.as_slice()).context("opening the EROFS index")?;
    let tree = image.read_tree().context("reading the EROFS index")?;
    let map: HashMap<Digest, ObjectEntry> = pulled.objects.iter().map(|e| (e.digest, *e)).collect();

    let mut needed: Vec<ObjectEntry> = Vec::new();
    let mut uses: HashMap<Digest, usize> = HashMap::new();
    let mut files = 0;
    let reach = crate::changeset::merge::reachable(&tree);
    for &id in &reach {
        if let Kind::Regular(data) = &tree.inodes[id].kind {
            files += 1;
            if let FileData::External { digest, size } = data {
                let e = map
                    .get(digest)
                    .with_context(|| format!("object {} is missing from the object map", hex::encode(digest)))?;
                if e.size != *size {
                    bail!("object {}: the index says {size} bytes, the object map {}", hex::encode(digest), e.size);
                }
                if *uses.entry(*digest).or_default() == 0 {
                    needed.push(*e);
                }
                *uses.get_mut(digest).expect("inserted") += 1;
            }
        }
    }

    if dest.exists() && fs::read_dir(dest)?.next().is_some() {
        bail!("{}: exists and is not empty", dest.display());
    }
    let parent = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(parent)?;
    let staging = tempfile::Builder::new().prefix(".wisp-pull-").tempdir_in(parent)?;
    fetch_all(store, &needed, staging.path(), jobs, progress)?;

    fs::create_dir_all(dest).with_context(|| format!("creating {}", dest.display()))?;
    let mut m = Materializer {
        tree: &tree,
        image: &image,
        staging: staging.path(),
        uses,
        first_path: HashMap::new(),
        dirs: Vec::new(),
    };
    m.dir(ROOT, dest)?;
    let dirs = std::mem::take(&mut m.dirs);
    for (id, path) in dirs.iter().rev() {
        set_meta(&tree.inodes[*id], path).with_context(|| format!("{}", path.display()))?;
    }
    Ok(PullSummary {
        image: repo.describe(),
        manifest_digest: pulled.manifest_digest,
        source_digest: pulled.source_digest,
        store: store.describe(),
        inodes: reach.len() as u64,
        files,
        objects: needed.len() as u64,
        object_bytes: needed.iter().map(|e| e.size).sum(),
        stored_bytes: needed.iter().map(|e| e.stored_size).sum(),
        index_bytes: pulled.erofs.len() as u64,
        seconds: start.elapsed().as_secs_f64(),
    })
}

fn fetch_all(
    store: &dyn ObjectStore,
    needed: &[ObjectEntry],
    staging: &Path,
    jobs: usize,
    progress: bool,
) -> Result<()> {
    let pb = progress.then(|| crate::progress::bytes(needed.iter().map(|e| e.stored_size).sum(), "objects"));
    let next = Mutex::new(0usize);
    let failed: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..jobs.max(1) {
            s.spawn(|| loop {
                if failed.lock().expect("lock").is_some() {
                    return;
                }
                let i = {
                    let mut n = next.lock().expect("lock");
                    *n += 1;
                    *n - 1
                };
                let Some(e) = needed.get(i) else { return };
                let path = staging.join(hex::encode(e.digest));
                let r = (|| -> Result<()> {
                    let mut f = std::io::BufWriter::with_capacity(1 << 20, File::create(&path)?);
                    fetch_verified(store, e, &mut f)?;
                    f.flush()?;
                    Ok(())
                })();
                if let Err(err) = r {
                    let _ = fs::remove_file(&path);
                    failed.lock().expect("lock").get_or_insert(err);
                    return;
                }
                if let Some(pb) = &pb {
                    pb.inc(e.stored_size);
                }
            });
        }
    });
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    match failed.into_inner().expect("lock") {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

struct Materializer<'a> {
    tree: &'a Tree,
    image: &'a erofs::reader::Image<&'a [u8]>,
    staging: &'a Path,
    uses: HashMap<Digest, usize>,
    first_path: HashMap<InodeId, PathBuf>,
    dirs: Vec<(InodeId, PathBuf)>,
}

impl Materializer<'_> {
    fn dir(&mut self, id: InodeId, path: &Path) -> Result<()> {
        self.dirs.push((id, path.to_path_buf()));
        let Kind::Directory(entries) = &self.tree.inodes[id].kind else { unreachable!("called on directories") };
        let mut visited = HashSet::new();
        for (name, &child) in entries {
            // The index is input too: a name must stay inside its directory.
            if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0) {
                bail!("{}: invalid entry name {:?} in the index", path.display(), name.escape_ascii().to_string());
            }
            let p = path.join(OsStr::from_bytes(name));
            if !visited.insert(child) && matches!(self.tree.inodes[child].kind, Kind::Directory(_)) {
                bail!("{}: directory linked twice", p.display());
            }
            self.node(child, &p).with_context(|| format!("materializing {}", p.display()))?;
        }
        Ok(())
    }

    fn node(&mut self, id: InodeId, path: &Path) -> Result<()> {
        let inode = &self.tree.inodes[id];
        if let Some(first) = self.first_path.get(&id) {
            rustix::fs::linkat(CWD, first.as_path(), CWD, path, AtFlags::empty())?;
            return Ok(());
        }
        match &inode.kind {
            Kind::Directory(_) => {
                fs::create_dir(path)?;
                return self.dir(id, path);
            }
            Kind::Regular(FileData::External { digest, size }) => {
                let src = self.staging.join(hex::encode(digest));
                let left = self.uses.get_mut(digest).expect("counted");
                *left -= 1;
                if *left == 0 {
                    fs::rename(&src, path)?;
                } else {
                    fs::copy(&src, path)?;
                }
                let len = fs::symlink_metadata(path)?.len();
                if len != *size {
                    bail!("object {} has {len} bytes, expected {size}", hex::encode(digest));
                }
            }
            Kind::Regular(FileData::Inline { size, extents, source }) => {
                let f = File::create(path)?;
                let mut buf = vec![0u8; 1 << 20];
                for ext in extents {
                    let mut off = ext.offset;
                    while off < ext.offset + ext.len {
                        let n = usize::try_from((ext.offset + ext.len - off).min(buf.len() as u64)).expect("bounded");
                        let got = self.image.read_file_at(*source, off, &mut buf[..n])?;
                        if got == 0 {
                            bail!("inline data ends at {off}");
                        }
                        f.write_all_at(&buf[..got], off)?;
                        off += got as u64;
                    }
                }
                f.set_len(*size)?;
            }
            Kind::Symlink(target) => rustix::fs::symlinkat(target.as_slice(), CWD, path)?,
            Kind::CharDevice { major, minor } => rustix::fs::mknodat(
                CWD,
                path,
                FileType::CharacterDevice,
                Mode::empty(),
                rustix::fs::makedev(*major, *minor),
            )?,
            Kind::BlockDevice { major, minor } => rustix::fs::mknodat(
                CWD,
                path,
                FileType::BlockDevice,
                Mode::empty(),
                rustix::fs::makedev(*major, *minor),
            )?,
            Kind::Fifo => rustix::fs::mknodat(CWD, path, FileType::Fifo, Mode::empty(), 0)?,
            Kind::Socket => rustix::fs::mknodat(CWD, path, FileType::Socket, Mode::empty(), 0)?,
        }
        set_meta(inode, path)?;
        self.first_path.insert(id, path.to_path_buf());
        Ok(())
    }
}

/// Owner, mode, xattrs, mtime — in the order that keeps each.
fn set_meta(inode: &Inode, path: &Path) -> Result<()> {
    let is_link = matches!(inode.kind, Kind::Symlink(_));
    let m = &inode.meta;
    rustix::fs::chownat(
        CWD,
        path,
        Some(rustix::fs::Uid::from_raw(m.uid)),
        Some(rustix::fs::Gid::from_raw(m.gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .context("chown")?;
    if !is_link {
        rustix::fs::chmodat(CWD, path, Mode::from_bits_truncate(u32::from(m.perm)), AtFlags::empty())
            .context("chmod")?;
    }
    for (name, value) in &inode.xattrs {
        rustix::fs::lsetxattr(path, name.as_slice(), value, rustix::fs::XattrFlags::empty())
            .with_context(|| format!("setting xattr {}", String::from_utf8_lossy(name)))?;
    }
    let t = Timespec { tv_sec: m.mtime, tv_nsec: m.mtime_nsec.into() };
    rustix::fs::utimensat(CWD, path, &Timestamps { last_access: t, last_modification: t }, AtFlags::SYMLINK_NOFOLLOW)
        .context("setting times")?;
    Ok(())
}
