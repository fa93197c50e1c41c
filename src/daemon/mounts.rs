//! Mounting images lazily: the EROFS index file-backed with one `device=` per object file of the node
//! cache (new mount API, [`crate::mount::mount_erofs_file`]), overlayfs on top with an upper and a work
//! directory. Each mount is recorded in `STATE/mounts/<id>/record.json` (with `lower/`, and `upper/`
//! and `work/` when the client gave none), so a restarted worker finds the mounts the kernel still has
//! and watches their objects again.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use fscache::fanotify::Frontend;
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use super::core::Core;
use super::images::{self, Image, ImageSpec};
use super::protocol::{FrontendKind, MountRequest};

/// What is mounted where.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountRecord {
    pub id: String,
    pub image: String,
    pub reference: String,
    pub dir: PathBuf,
    pub lower: PathBuf,
    pub upper: PathBuf,
    pub work: PathBuf,
    /// upper/work were made by the daemon (and are removed at umount).
    pub own_upper: bool,
    /// Only the EROFS index is mounted, at `dir` (= `lower`); no overlayfs.
    #[serde(default)]
    pub lower_only: bool,
    /// cachefiles: the fsid of the mount's primary blob (absent for fanotify mounts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fsid: Option<String>,
}

/// The worker's mounts.
pub struct Mounts {
    state: PathBuf,
    core: Arc<Core>,
    /// The fanotify frontend; None when the daemon serves cachefiles (super::cachefiles).
    frontend: Option<Arc<Frontend<Core>>>,
    live: Mutex<HashMap<String, (MountRecord, Arc<Image>)>>,
    /// Held while objects are registered and marked, or released and unmarked: the first image to
    /// need an object marks it before any other image's mount can read it, and the last to let it go
    /// cannot unmark it under a new registrant (concurrent mounts of images sharing objects).
    attaching: Mutex<()>,
    /// Mounts under way (their ids), reserved together with the check of `live` (lock `live` first).
    pending: Mutex<std::collections::HashSet<String>>,
    /// Mount records a restarted worker could not take back (see [`Mounts::restore`]).
    unrestored: Mutex<Vec<serde_json::Value>>,
    prefetch: super::prefetch::Prefetches,
}

impl std::fmt::Debug for Mounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mounts").field("state", &self.state).finish_non_exhaustive()
    }
}

fn mount_id(dir: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    hex::encode(&sha2::Sha256::digest(dir.as_os_str().as_bytes())[..8])
}

/// Mount points currently in this mount namespace.
fn mounted() -> Result<Vec<PathBuf>> {
    let info = fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    Ok(info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| {
            PathBuf::from(p.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\"))
        })
        .collect())
}

impl Mounts {
    pub fn new(state: &Path, core: Arc<Core>, frontend: Option<Arc<Frontend<Core>>>) -> Self {
        Mounts {
            state: state.to_owned(),
            core,
            frontend,
            live: Mutex::new(HashMap::new()),
            attaching: Mutex::new(()),
            pending: Mutex::default(),
            unrestored: Mutex::default(),
            prefetch: Default::default(),
        }
    }

    pub fn core(&self) -> &Core {
        &self.core
    }

    /// The kernel interface this daemon serves.
    pub fn kind(&self) -> FrontendKind {
        if self.frontend.is_some() {
            FrontendKind::Fanotify
        } else {
            FrontendKind::Cachefiles
        }
    }

    fn mounts_dir(&self) -> PathBuf {
        self.state.join("mounts")
    }

    /// Watches the objects of `img` for the mount `key`: creates the sparse object files and marks the
    /// ones that are not complete (once per object, however many images share it).
    /// Registers the image's objects with the core (and marks the incomplete ones for the fanotify
    /// frontend).
    fn attach(&self, key: &str, img: &Image) -> Result<()> {
        let _one = self.attaching.lock().unwrap_or_else(|p| p.into_inner());
        self.core.add_image(
            key,
            &img.spec.reference,
            img.devices.len() as u64,
            img.content_bytes(),
            img.stored_bytes(),
        );
        let mut hits = 0;
        for (i, e) in img.devices.iter().enumerate() {
            let r =
                self.core.register(key, e, &img.store).inspect_err(|_| self.detach_locked(key, &img.devices[..i]))?;
            hits += u64::from(r.complete);
            let Some(frontend) = &self.frontend else { continue };
            if !r.first {
                continue;
            }
            let path = self.core.cache().path(&e.digest);
            if r.complete {
                // A mark a killed worker left on an object it had completed: drop it (no-op otherwise).
                let _ = frontend.group().unmark(&path);
            } else if let Err(err) = frontend.add(&path, &hex::encode(e.digest)) {
                self.detach_locked(key, &img.devices[..=i]);
                return Err(err).context("marking an object file for pre-content events");
            }
        }
        self.core.count_cache_hits(key, hits);
        Ok(())
    }

    fn detach(&self, key: &str, devices: &[crate::object::ObjectEntry]) {
        let _one = self.attaching.lock().unwrap_or_else(|p| p.into_inner());
        self.detach_locked(key, devices);
    }

    fn detach_locked(&self, key: &str, devices: &[crate::object::ObjectEntry]) {
        for e in devices {
            if self.core.release(key, &e.digest) {
                let Some(frontend) = &self.frontend else { continue };
                let path = self.core.cache().path(&e.digest);
                if let Err(err) = frontend.remove(&path) {
                    tracing::warn!(error = %err, path = %path.display(), "unwatching an object file");
                }
            }
        }
        self.core.forget_image(key);
    }

    /// `wisp mount`.
    pub fn mount(&self, req: &MountRequest) -> Result<serde_json::Value> {
        if req.frontend != FrontendKind::Auto && req.frontend != self.kind() {
            bail!(
                "this daemon serves the {} frontend (chosen when it started; see `wisp daemon --frontend`), not {}",
                self.kind().name(),
                req.frontend.name()
            );
        }
        if !req.dir.is_absolute() {
            bail!("{}: the mount point must be an absolute path", req.dir.display());
        }
        for p in [Some(&req.dir), req.upper.as_ref(), req.work.as_ref()].into_iter().flatten() {
            check_overlay_path(p)?;
        }
        let id = mount_id(&req.dir);
        // Held until the mount is in `live` or has failed: a second mount of the same directory
        // meanwhile is refused, not raced.
        let _reserved = self.reserve(&id, &req.dir)?;
        let spec = ImageSpec { reference: req.reference.clone(), plain_http: req.plain_http, store: req.store.clone() };
        let img = Arc::new(match &req.index {
            Some(dir) => images::from_local(&self.state, dir, &spec)?,
            None => images::pull(&self.state, &spec)?,
        });
        self.prefetch.warm(&id, &self.core, &img);
        // A mount that fails from here on stops those downloads.
        let mut warming = StopOnDrop(Some((&self.prefetch, &id)));
        let mdir = self.mounts_dir().join(&id);
        let (upper, work, own) = match (&req.upper, &req.work, req.lower_only) {
            (None, None, true) => (PathBuf::new(), PathBuf::new(), false),
            (_, _, true) => bail!("a lower-only mount has no upper and work directories"),
            (Some(u), Some(w), false) => (u.clone(), w.clone(), false),
            (None, None, false) => (mdir.join("upper"), mdir.join("work"), true),
            _ => bail!("give both --upper and --work, or neither"),
        };
        let rec = MountRecord {
            id: id.clone(),
            image: img.id.clone(),
            reference: req.reference.clone(),
            dir: req.dir.clone(),
            lower: if req.lower_only { req.dir.clone() } else { mdir.join("lower") },
            upper,
            work,
            own_upper: own,
            lower_only: req.lower_only,
            fsid: None,
        };
        fs::create_dir_all(&mdir).with_context(|| format!("creating {}", mdir.display()))?;
        for d in [&rec.lower, &rec.upper, &rec.work, &rec.dir].into_iter().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        let mut rec = rec;
        self.attach(&id, &img)?;
        if self.frontend.is_none() {
            match self.core.claim_primary(&img.id, &img.erofs_path(), &id) {
                Ok(fsid) => rec.fsid = Some(fsid),
                Err(e) => {
                    self.detach(&id, &img.devices);
                    return Err(e);
                }
            }
        }
        if let Err(e) = self.kernel_mount(&rec, &img) {
            self.detach(&id, &img.devices);
            if let Some(f) = &rec.fsid {
                self.core.remove_primary(f);
            }
            return Err(e);
        }
        crate::object::atomic::write_atomic(&mdir.join("record.json"), &serde_json::to_vec_pretty(&rec)?)?;
        let out = serde_json::json!({
            "id": id, "image": img.id, "dir": rec.dir, "upper": rec.upper, "objects": img.devices.len(),
            "content_bytes": img.content_bytes(), "stored_bytes": img.stored_bytes(), "frontend": self.kind().name(), "fsid": rec.fsid,
        });
        warming.0 = None;
        drop(warming);
        self.prefetch.start(&id, &rec.lower, &img, &self.core);
        self.live.lock().unwrap_or_else(|p| p.into_inner()).insert(id, (rec, img));
        Ok(out)
    }

    /// Checks that nothing is mounted or being mounted at `dir` and reserves its id, in one step.
    fn reserve(&self, id: &str, dir: &Path) -> Result<Reservation<'_>> {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if live.contains_key(id) {
            bail!("{}: an image is already mounted there", dir.display());
        }
        if !pending.insert(id.to_owned()) {
            bail!("{}: an image is already mounted there (its mount is still in progress)", dir.display());
        }
        Ok(Reservation { mounts: self, id: id.to_owned() })
    }

    fn kernel_mount(&self, rec: &MountRecord, img: &Image) -> Result<()> {
        if let Some(fsid) = &rec.fsid {
            crate::mount::mount_erofs_fscache(fsid, super::cachefiles::DOMAIN, &rec.lower)?;
        } else {
            let devices: Vec<PathBuf> = img.devices.iter().map(|e| self.core.cache().path(&e.digest)).collect();
            // Always direct I/O, even when every object is already complete (no marks): measured with
            // scripts/bench-warm, a buffered mount of complete objects read cold at 0.70x plain+overlay
            // against 0.77x for direct I/O in the same run (each object is its own file, so buffered
            // readahead cannot run past it, and pages are cached twice).
            crate::mount::mount_erofs_file(&img.erofs_path(), &rec.lower, &devices, true)?;
        }
        if rec.lower_only {
            return Ok(());
        }
        let data = overlay_options(rec)?;
        let cdata = std::ffi::CString::new(data.clone()).context("a NUL in an overlay path")?;
        if let Err(e) =
            rustix::mount::mount("overlay", &rec.dir, "overlay", rustix::mount::MountFlags::empty(), cdata.as_c_str())
        {
            let _ = crate::mount::umount(&rec.lower);
            return Err(e).with_context(|| format!("mounting overlayfs on {} ({data})", rec.dir.display()));
        }
        Ok(())
    }

    /// `wisp umount`.
    pub fn umount(&self, dir: &Path) -> Result<serde_json::Value> {
        let id = mount_id(dir);
        let (rec, img) = self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
            .with_context(|| format!("{}: no wisp image is mounted there", dir.display()))?;
        self.prefetch.stop(&id);
        if !rec.lower_only {
            crate::mount::umount(&rec.dir)?;
        }
        crate::mount::umount(&rec.lower)?;
        self.detach(&id, &img.devices);
        if let Some(f) = &rec.fsid {
            self.core.remove_primary(f);
        }
        self.live.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        let mdir = self.mounts_dir().join(&id);
        if rec.own_upper {
            fs::remove_dir_all(&mdir).with_context(|| format!("removing {}", mdir.display()))?;
        } else {
            let _ = fs::remove_file(mdir.join("record.json"));
            if !rec.lower_only {
                let _ = fs::remove_dir(&rec.lower);
            }
            let _ = fs::remove_dir(&mdir);
        }
        Ok(serde_json::json!({"id": id, "dir": rec.dir}))
    }

    /// After a worker restart: watch the objects of every image that is still mounted again. Records
    /// of mounts the kernel no longer has are dropped. A record that cannot be taken back (it does not
    /// parse, its image is missing or broken, its objects cannot be watched) is logged, kept on disk
    /// and listed by `status` as `unrestored`; the other mounts are restored all the same.
    pub fn restore(&self) -> Result<usize> {
        let Ok(rd) = fs::read_dir(self.mounts_dir()) else { return Ok(0) };
        let now = mounted()?;
        let mut n = 0;
        for ent in rd {
            let mdir = match ent {
                Ok(e) => e.path(),
                Err(e) => {
                    tracing::error!(dir = %self.mounts_dir().display(), error = %e, "listing mount records");
                    continue;
                }
            };
            let path = mdir.join("record.json");
            match self.restore_one(&path, &now) {
                Ok(true) => n += 1,
                Ok(false) => {}
                Err(e) => {
                    let error = format!("{e:#}");
                    tracing::error!(record = %path.display(), %error,
                        "cannot restore this mount; skipping it (its unfilled objects are not served)");
                    self.unrestored
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(serde_json::json!({"record": path, "error": error}));
                }
            }
        }
        Ok(n)
    }

    /// Restores the mount of one record: Ok(false) when there is none (no record, or not mounted).
    fn restore_one(&self, path: &Path, now: &[PathBuf]) -> Result<bool> {
        let bytes = match fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let rec: MountRecord =
            serde_json::from_slice(&bytes).with_context(|| format!("parsing the mount record {}", path.display()))?;
        if !now.contains(&rec.lower) {
            tracing::warn!(dir = %rec.dir.display(), "recorded mount is gone; forgetting it");
            let _ = fs::remove_file(path);
            return Ok(false);
        }
        let img = Arc::new(
            images::load(&self.state, &rec.image)
                .with_context(|| format!("loading image {} of the mount at {}", rec.image, rec.dir.display()))?,
        );
        self.attach(&rec.id, &img).with_context(|| format!("watching the objects of {}", rec.dir.display()))?;
        if let Some(f) = &rec.fsid {
            if let Err(e) = self.core.add_primary(f, &img.erofs_path(), &rec.id) {
                self.detach(&rec.id, &img.devices);
                return Err(e).with_context(|| format!("registering the index of {}", rec.dir.display()));
            }
        }
        self.live.lock().unwrap_or_else(|p| p.into_inner()).insert(rec.id.clone(), (rec, img));
        Ok(true)
    }

    /// The mount records the last restore skipped, with why.
    pub fn unrestored(&self) -> Vec<serde_json::Value> {
        self.unrestored.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Unmounts everything it can; returns the mount points that stay (busy).
    pub fn shutdown(&self) -> Vec<PathBuf> {
        let dirs: Vec<PathBuf> =
            self.live.lock().unwrap_or_else(|p| p.into_inner()).values().map(|(r, _)| r.dir.clone()).collect();
        let mut left = Vec::new();
        for d in dirs {
            if let Err(e) = self.umount(&d) {
                tracing::error!(dir = %d.display(), error = %format!("{e:#}"), "cannot unmount at shutdown");
                left.push(d);
            }
        }
        self.core.cache().flush();
        left
    }

    /// `wisp stats --accessed DIR`: the files the mount at `dir` had filled, in order.
    pub fn accessed(&self, dir: &Path) -> Result<Vec<u8>> {
        let id = mount_id(dir);
        let img = self.live.lock().unwrap_or_else(|p| p.into_inner()).get(&id).map(|(_, i)| Arc::clone(i));
        let img = img.with_context(|| format!("{}: no wisp image is mounted there", dir.display()))?;
        super::prefetch::accessed(&self.core, &id, &img)
    }

    /// The mounts, for `status`.
    pub fn list(&self) -> Vec<MountRecord> {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).values().map(|(r, _)| r.clone()).collect()
    }
}

/// The overlayfs mount data of `rec`. The kernel splits it at `,` (and `lowerdir` at `:`) unless a
/// backslash escapes them (fs/overlayfs/params.c); instead of escaping, paths carrying any of the
/// three are refused, so a client cannot smuggle options such as `lowerdir=/elsewhere` into the data.
fn overlay_options(rec: &MountRecord) -> Result<String> {
    check_overlay_path(&rec.lower)?;
    check_overlay_path(&rec.upper)?;
    check_overlay_path(&rec.work)?;
    Ok(format!("lowerdir={},upperdir={},workdir={}", rec.lower.display(), rec.upper.display(), rec.work.display()))
}

/// Refuses a path overlayfs mount options cannot carry as it is (see [`overlay_options`]), or one that
/// is not valid UTF-8 (it would not survive `display()`).
pub fn check_overlay_path(p: &Path) -> Result<()> {
    let Some(s) = p.to_str() else {
        bail!("{}: not valid UTF-8; overlayfs options cannot name it", p.display());
    };
    if let Some(c) = s.chars().find(|c| matches!(c, ',' | ':' | '\\' | '\n')) {
        bail!("{s}: overlayfs mount options cannot carry {c:?} in a path; choose a directory without it");
    }
    Ok(())
}

/// A mount under way (see [`Mounts::reserve`]); dropping it frees the id.
struct Reservation<'a> {
    mounts: &'a Mounts,
    id: String,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.mounts.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.id);
    }
}

/// Stops the prefetch of a mount that failed half-way (see [`Mounts::mount`]).
struct StopOnDrop<'a>(Option<(&'a super::prefetch::Prefetches, &'a str)>);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        if let Some((p, key)) = self.0.take() {
            p.stop(key);
        }
    }
}
