//! Index images on the node: pulled whole (the EROFS index is metadata the kernel reads without
//! pre-content events, docs/kernel.md G.5), verified by digest, and kept under `STATE/images/<hex digest>/`:
//!
//! ```text
//! index.erofs    the EROFS index, mounted file-backed (fanotify) or served as the mount's primary
//!                blob (cachefiles)
//! objects.map    the object map (src/index/objmap.rs format)
//! image.json     how to reach the image's objects again after a daemon restart
//! prefetch.list  the startup prefetch list, when the index image has one
//! ```

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use erofs::tree::Digest;
use serde::{Deserialize, Serialize};

use crate::index;
use crate::index::objmap;
use crate::object::atomic::write_atomic;
use crate::object::ObjectEntry;
use crate::oci::{self, ImageRef, TransportOptions};
use crate::store::{self, ObjectStore, StoreSpec};

/// Where an image and its objects come from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageSpec {
    pub reference: String,
    pub plain_http: bool,
    pub store: Option<String>,
}

/// An index image ready to mount.
pub struct Image {
    /// Hex of the index image manifest digest.
    pub id: String,
    pub dir: PathBuf,
    pub spec: ImageSpec,
    /// The image's objects in device-table order (device id = index + 1).
    pub devices: Vec<ObjectEntry>,
    pub store: Arc<dyn ObjectStore>,
    /// The startup prefetch list (absolute paths in the image), empty when the image has none.
    pub prefetch: Vec<Vec<u8>>,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image").field("id", &self.id).field("devices", &self.devices.len()).finish_non_exhaustive()
    }
}

impl Image {
    pub fn erofs_path(&self) -> PathBuf {
        self.dir.join("index.erofs")
    }

    pub fn content_bytes(&self) -> u64 {
        self.devices.iter().map(|e| e.size).sum()
    }

    pub fn stored_bytes(&self) -> u64 {
        self.devices.iter().map(|e| e.stored_size).sum()
    }
}

fn images_dir(state: &Path) -> PathBuf {
    state.join("images")
}

/// An image's reference, its repository, and the store its objects come from.
type Opened = (ImageRef, Arc<dyn oci::Repo>, Arc<dyn ObjectStore>);

fn open_store(spec: &ImageSpec) -> Result<Opened> {
    let r: ImageRef = spec.reference.parse()?;
    let topts = TransportOptions { plain_http: spec.plain_http, ..Default::default() };
    let repo: Arc<dyn oci::Repo> = Arc::from(oci::open(&r, &topts, false).with_context(|| format!("opening {r}"))?);
    let store_spec: Option<StoreSpec> = spec.store.as_deref().map(str::parse).transpose()?;
    let store = store::open(store_spec.as_ref(), &r, Arc::clone(&repo), false)?;
    Ok((r, repo, store))
}

/// Pulls the index image `spec` names into the state directory. An index already there under the same
/// manifest digest (a warm start, a second mount) is reused: only the manifest is fetched again. The
/// files were written after the layer's digest was verified, and a manifest digest pins its layer.
pub fn pull(state: &Path, spec: &ImageSpec) -> Result<Image> {
    let (r, repo, store) = open_store(spec)?;
    let (digest, manifest) = index::resolve(&*repo).with_context(|| format!("reading the index image {r}"))?;
    let id = digest.trim_start_matches("sha256:").to_owned();
    let dir = images_dir(state).join(&id);
    // One pull per index at a time: the pods of one image started together download its index once;
    // the others wait and find it on the node.
    let gate = pull_gate(&id);
    let _one = gate.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(img) = cached(&dir, &id, spec, &store)? {
        tracing::debug!(image = %r, id, "index already on the node");
        return Ok(img);
    }
    let pulled =
        index::read_layer(&*repo, digest, &manifest).with_context(|| format!("reading the index image {r}"))?;
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    write_atomic(&dir.join("objects.map"), &objmap::encode(&pulled.objects))?;
    if let Some(list) = &pulled.prefetch {
        write_atomic(&dir.join("prefetch.list"), list)?;
    }
    write_atomic(&dir.join("index.erofs"), &pulled.erofs)?;
    write_atomic(&dir.join("image.json"), &serde_json::to_vec_pretty(spec)?)?;
    let devices = device_order(&pulled.erofs, &pulled.objects)?;
    let prefetch = prefetch_of(pulled.prefetch.as_deref());
    Ok(Image { id, dir, spec: spec.clone(), devices, store, prefetch })
}

/// The lock of index image `id` while it is pulled (entries live as long as the worker: one per
/// distinct index image, a few bytes each).
fn pull_gate(id: &str) -> Arc<std::sync::Mutex<()>> {
    static GATES: std::sync::OnceLock<std::sync::Mutex<HashMap<String, Arc<std::sync::Mutex<()>>>>> =
        std::sync::OnceLock::new();
    let mut g = GATES.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    Arc::clone(g.entry(id.to_owned()).or_default())
}

/// The index pulled earlier into `dir`, if it is complete (image.json is written last); its image.json
/// then takes `spec` (the same index may be reached through another reference or store).
fn cached(dir: &Path, id: &str, spec: &ImageSpec, store: &Arc<dyn ObjectStore>) -> Result<Option<Image>> {
    if !dir.join("image.json").is_file() {
        return Ok(None);
    }
    let Some(img) = read_pulled(dir, id, spec.clone(), Arc::clone(store))? else { return Ok(None) };
    write_atomic(&dir.join("image.json"), &serde_json::to_vec_pretty(spec)?)?;
    Ok(Some(img))
}

/// An index pulled earlier into `dir` (index.erofs, objects.map, prefetch.list), or None when its
/// index or object map is missing.
fn read_pulled(dir: &Path, id: &str, spec: ImageSpec, store: Arc<dyn ObjectStore>) -> Result<Option<Image>> {
    let (erofs_path, map_path) = (dir.join("index.erofs"), dir.join("objects.map"));
    let (Some(erofs_bytes), Some(map)) = (read_optional(&erofs_path)?, read_optional(&map_path)?) else {
        return Ok(None);
    };
    let map = objmap::decode(&map).with_context(|| format!("{}", map_path.display()))?;
    let devices = device_order(&erofs_bytes, &map).with_context(|| format!("{}", erofs_path.display()))?;
    let prefetch = prefetch_of(read_optional(&dir.join("prefetch.list"))?.as_deref());
    Ok(Some(Image { id: id.to_owned(), dir: dir.to_path_buf(), spec, devices, store, prefetch }))
}

/// The files of an index layer a container runtime unpacked: `index.erofs`, `objects.map` and the
/// optional `prefetch.list`.
#[derive(Debug, Clone)]
pub struct LocalIndex {
    pub erofs: Vec<u8>,
    pub map: Vec<u8>,
    pub prefetch: Option<Vec<u8>>,
}

/// The largest index file read from a local directory (the same bound as an index layer's members).
const MAX_LOCAL_FILE: u64 = 1 << 30;

/// Reads the index files in `index_dir` without following any symbolic link: `index_dir` is resolved
/// with `RESOLVE_NO_SYMLINKS` (no component of it may be a link, so a layer's `wisp -> elsewhere`
/// cannot point the read at another snapshot), each file is opened beneath it the same way and must
/// be a regular file.
pub fn read_local_index(index_dir: &Path) -> Result<LocalIndex> {
    use rustix::fs::{Mode, OFlags, ResolveFlags, CWD};
    let no_links = ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    if !index_dir.is_absolute() {
        anyhow::bail!("{}: the index directory must be an absolute path", index_dir.display());
    }
    let dir = rustix::fs::openat2(
        CWD,
        index_dir,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
        no_links,
    )
    .with_context(|| format!("opening {} (without following symbolic links)", index_dir.display()))?;
    let read = |name: &str| -> Result<Option<Vec<u8>>> {
        let path = index_dir.join(name);
        // O_NONBLOCK: a FIFO in the layer cannot hold the open; anything not regular is refused below.
        let flags = OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK;
        let fd = match rustix::fs::openat2(&dir, name, flags, Mode::empty(), no_links | ResolveFlags::BENEATH) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) => return Ok(None),
            Err(e) => {
                return Err(e).with_context(|| format!("opening {} (without following symbolic links)", path.display()))
            }
        };
        let st = rustix::fs::fstat(&fd).with_context(|| format!("stat {}", path.display()))?;
        if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
            anyhow::bail!("{}: not a regular file", path.display());
        }
        if st.st_size as u64 > MAX_LOCAL_FILE {
            anyhow::bail!("{}: {} bytes, more than an index file may have", path.display(), st.st_size);
        }
        let mut bytes = Vec::new();
        fs::File::from(fd)
            .take(MAX_LOCAL_FILE)
            .read_to_end(&mut bytes)
            .with_context(|| format!("reading {}", path.display()))?;
        Ok(Some(bytes))
    };
    let erofs = read("index.erofs")?.with_context(|| format!("{} has no index.erofs", index_dir.display()))?;
    let map = read("objects.map")?.with_context(|| format!("{} has no objects.map", index_dir.display()))?;
    Ok(LocalIndex { erofs, map, prefetch: read("prefetch.list")? })
}

/// Takes the index of `spec` from a local directory (`index.erofs` and `objects.map`, as unpacked from
/// the index image's layer by a container runtime, which verified the layer's digest), read without
/// following symbolic links ([`read_local_index`]). The image id is the sha256 of `index.erofs`;
/// `spec.reference` names the repository of the objects.
pub fn from_local(state: &Path, index_dir: &Path, spec: &ImageSpec) -> Result<Image> {
    let (_, _, store) = open_store(spec)?;
    let local = read_local_index(index_dir)?;
    let erofs_path = index_dir.join("index.erofs");
    let map_path = index_dir.join("objects.map");
    let objects = objmap::decode(&local.map).with_context(|| format!("decoding {}", map_path.display()))?;
    let devices = device_order(&local.erofs, &objects).with_context(|| format!("{}", erofs_path.display()))?;
    let id = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&local.erofs));
    let dir = images_dir(state).join(&id);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    write_atomic(&dir.join("objects.map"), &local.map)?;
    write_atomic(&dir.join("image.json"), &serde_json::to_vec_pretty(spec)?)?;
    write_atomic(&dir.join("index.erofs"), &local.erofs)?;
    if let Some(list) = &local.prefetch {
        write_atomic(&dir.join("prefetch.list"), list)?;
    }
    Ok(Image { id, dir, spec: spec.clone(), devices, store, prefetch: prefetch_of(local.prefetch.as_deref()) })
}

/// Loads an image pulled earlier (after a daemon restart).
pub fn load(state: &Path, id: &str) -> Result<Image> {
    let dir = images_dir(state).join(id);
    let spec: ImageSpec = serde_json::from_slice(&fs::read(dir.join("image.json"))?).context("image.json")?;
    let (_, _, store) = open_store(&spec)?;
    read_pulled(&dir, id, spec, store)?
        .with_context(|| format!("{}: index.erofs or objects.map is missing", dir.display()))
}

/// The object of every device-table slot, in slot order.
fn device_order(erofs_bytes: &[u8], objects: &[ObjectEntry]) -> Result<Vec<ObjectEntry>> {
    let img = erofs::reader::Image::open(erofs_bytes).context("opening the EROFS index")?;
    let map: HashMap<Digest, ObjectEntry> = objects.iter().map(|e| (e.digest, *e)).collect();
    img.devices()
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let digest = d.digest.with_context(|| format!("device {} has no sha256 tag", i + 1))?;
            map.get(&digest)
                .copied()
                .with_context(|| format!("device {}: object {} is not in the object map", i + 1, hex::encode(digest)))
        })
        .collect()
}

/// The paths of a prefetch list (`wisp/prefetch.list`: one absolute path per line).
fn prefetch_of(list: Option<&[u8]>) -> Vec<Vec<u8>> {
    list.unwrap_or_default().split(|&b| b == b'\n').filter(|l| l.starts_with(b"/")).map(<[u8]>::to_vec).collect()
}

/// A file's bytes, or None when it does not exist.
fn read_optional(path: &Path) -> Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_index_is_read_without_following_links() {
        let t = tempfile::tempdir().unwrap();
        let real = t.path().join("a/wisp");
        fs::create_dir_all(&real).unwrap();
        fs::write(real.join("index.erofs"), b"erofs").unwrap();
        fs::write(real.join("objects.map"), b"map").unwrap();
        let got = read_local_index(&real).unwrap();
        assert_eq!((got.erofs.as_slice(), got.map.as_slice(), got.prefetch), (&b"erofs"[..], &b"map"[..], None));
        // `wisp -> another layer's wisp`: refused, as is a link in a file's place or in the path.
        let b = t.path().join("b");
        fs::create_dir_all(&b).unwrap();
        std::os::unix::fs::symlink(&real, b.join("wisp")).unwrap();
        let e = read_local_index(&b.join("wisp")).unwrap_err();
        assert!(format!("{e:#}").contains("without following symbolic links"), "{e:#}");
        let c = t.path().join("c/wisp");
        fs::create_dir_all(&c).unwrap();
        std::os::unix::fs::symlink(real.join("index.erofs"), c.join("index.erofs")).unwrap();
        fs::write(c.join("objects.map"), b"map").unwrap();
        assert!(read_local_index(&c).is_err());
        // A FIFO where a file should be: refused, without blocking.
        let d = t.path().join("d/wisp");
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("index.erofs"), b"erofs").unwrap();
        nix::unistd::mkfifo(&d.join("objects.map"), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let e = read_local_index(&d).unwrap_err();
        assert!(format!("{e:#}").contains("not a regular file"), "{e:#}");
    }
}
