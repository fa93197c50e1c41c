//! Mounting images lazily: the EROFS index as the frontend mounts it (super::frontend: file-backed
//! with one `device=` per object file for fanotify, over fscache for cachefiles), overlayfs on top with
//! an upper and a work directory (or the lower alone, `lower_only`). The objects each mount needs are
//! registered with the [`Core`] and watched by the frontend, once per object however many images share
//! it. Each mount is recorded in `STATE/mounts/<id>/record.json` (with `lower/`, and `upper/` and
//! `work/` when the client gave none), so a restarted worker finds the mounts the kernel still has and
//! watches their objects again.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use super::core::Core;
use super::frontend::Frontend;
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
    /// cachefiles: the fsid of the mount's primary blob (absent for fanotify mounts; see
    /// [`Frontend::claim`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fsid: Option<String>,
}

/// The worker's mounts.
pub struct Mounts {
    state: PathBuf,
    core: Arc<Core>,
    /// The kernel interface the worker serves.
    frontend: Arc<dyn Frontend>,
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
    pub fn new(state: &Path, core: Arc<Core>, frontend: Arc<dyn Frontend>) -> Self {
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
    pub fn frontend(&self) -> &dyn Frontend {
        &*self.frontend
    }

    /// The kind of [`Mounts::frontend`].
    pub fn kind(&self) -> FrontendKind {
        self.frontend.kind()
    }

    fn mounts_dir(&self) -> PathBuf {
        self.state.join("mounts")
    }

    /// Registers the objects of `img` for the mount `key` with the core, and has the frontend prepare
    /// each and watch the ones no other mounted image needed before (fanotify: creates the sparse
    /// object files and marks the ones that are not complete, once per object however many images
    /// share it).
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
            let complete = self.frontend.prepare(e).inspect_err(|_| self.detach_locked(key, &img.devices[..i]))?;
            let first = self.core.register(key, e, &img.store);
            hits += u64::from(complete);
            if !first {
                continue;
            }
            if let Err(err) = self.frontend.watch(e, complete) {
                self.detach_locked(key, &img.devices[..=i]);
                return Err(err);
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
                self.frontend.unwatch(e);
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
        self.prefetch.warm(&id, &self.core, &img, self.frontend.object_files());
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
        if let Err(e) = self.frontend.claim(&mut rec, &img) {
            self.detach(&id, &img.devices);
            return Err(e);
        }
        if let Err(e) = self.kernel_mount(&rec, &img) {
            self.detach(&id, &img.devices);
            self.frontend.release(&rec);
            return Err(e);
        }
        crate::object::atomic::write_atomic(&mdir.join("record.json"), &serde_json::to_vec_pretty(&rec)?)?;
        let out = serde_json::json!({
            "id": id, "image": img.id, "dir": rec.dir, "upper": rec.upper, "objects": img.devices.len(),
            "content_bytes": img.content_bytes(), "stored_bytes": img.stored_bytes(), "frontend": self.kind().name(), "fsid": rec.fsid,
        });
        warming.0 = None;
        drop(warming);
        self.prefetch.start(&id, &rec.lower, &img, &self.core, self.frontend.object_files());
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
        self.frontend.mount_lower(rec, img)?;
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
        self.frontend.release(&rec);
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
        if let Err(e) = self.frontend.reclaim(&rec, &img) {
            self.detach(&rec.id, &img.devices);
            return Err(e).with_context(|| format!("registering the index of {}", rec.dir.display()));
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::daemon::cache::NodeCache;
    use crate::daemon::fetcher::{FetchOptions, Fetcher};
    use crate::daemon::frontend::cachefiles::Cachefiles;

    /// Mounts of a cachefiles worker: its frontend needs no kernel session until it serves, and none of
    /// these tests reaches the kernel through it.
    fn mounts(dir: &Path) -> Mounts {
        let cache = NodeCache::open(&dir.join("cache")).unwrap();
        let fetcher = Fetcher::new(FetchOptions {
            concurrency: 1,
            attempts: 1,
            backoff: Duration::from_millis(10),
            deadline: Duration::from_secs(10),
            min_rate: 0.0,
            spool_dir: cache.tmp_dir(),
            delay: Duration::ZERO,
        });
        let core = Arc::new(Core::new(cache, fetcher));
        let frontend = Arc::new(Cachefiles::new(Arc::clone(&core)));
        Mounts::new(&dir.join("state"), core, frontend)
    }

    fn request(dir: &str) -> MountRequest {
        MountRequest {
            reference: "docker://127.0.0.1:5000/wisp/none:v1".into(),
            dir: dir.into(),
            upper: None,
            work: None,
            plain_http: true,
            store: None,
            frontend: FrontendKind::Auto,
            index: None,
            lower_only: false,
        }
    }

    fn record(id: &str, dir: &Path, lower: &Path) -> MountRecord {
        MountRecord {
            id: id.into(),
            image: "ab".repeat(32),
            reference: "docker://127.0.0.1:5000/wisp/none:v1".into(),
            dir: dir.into(),
            lower: lower.into(),
            upper: dir.join("upper"),
            work: dir.join("work"),
            own_upper: true,
            lower_only: false,
            fsid: None,
        }
    }

    /// A tmpfs mounted for the test, unmounted when dropped.
    struct Tmpfs(PathBuf);

    impl Tmpfs {
        fn at(path: &Path) -> Tmpfs {
            fs::create_dir_all(path).unwrap();
            rustix::mount::mount("tmpfs", path, "tmpfs", rustix::mount::MountFlags::empty(), c"")
                .unwrap_or_else(|e| panic!("mounting a tmpfs on {} (tests run as root): {e}", path.display()));
            Tmpfs(path.to_owned())
        }
    }

    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let _ = crate::mount::umount(&self.0);
        }
    }

    #[test]
    fn mount_id_names_the_directory() {
        // The first 8 bytes of sha256 of the path, in hex (`printf %s /mnt/a | sha256sum`): the name of
        // the record directory under STATE/mounts, which a restarted worker must find again.
        assert_eq!(mount_id(Path::new("/mnt/a")), "f72353b3dcd8f57a");
        assert_eq!(mount_id(Path::new("/mnt/a b")), "2713cd21872bcfea");
    }

    #[test]
    fn overlay_options_refuse_what_the_kernel_would_split() {
        let rec = record("x", Path::new("/mnt/c"), Path::new("/s/mounts/x/lower"));
        assert_eq!(
            overlay_options(&rec).unwrap(),
            "lowerdir=/s/mounts/x/lower,upperdir=/mnt/c/upper,workdir=/mnt/c/work"
        );
        for bad in ["/a,lowerdir=/etc", "/a:/etc", "/a\\,b", "/a\nb"] {
            let e = check_overlay_path(Path::new(bad)).unwrap_err().to_string();
            assert!(e.contains("overlayfs mount options cannot carry"), "{bad:?}: {e}");
            let mut r = rec.clone();
            r.upper = bad.into();
            assert!(overlay_options(&r).is_err(), "{bad:?} as upper");
        }
        use std::os::unix::ffi::OsStrExt;
        let e = check_overlay_path(Path::new(std::ffi::OsStr::from_bytes(b"/a\xff"))).unwrap_err().to_string();
        assert!(e.contains("not valid UTF-8"), "{e}");
        assert!(check_overlay_path(Path::new("/var/lib/wisp/mnt/a b")).is_ok(), "a space is fine");
    }

    #[test]
    fn record_format() {
        let rec = record("x", Path::new("/mnt/c"), Path::new("/s/lower"));
        let v = serde_json::to_value(&rec).unwrap();
        assert!(v.get("fsid").is_none(), "a fanotify record has no fsid: {v}");
        assert_eq!(v["lower_only"], false);
        let back: MountRecord = serde_json::from_value(v).unwrap();
        assert_eq!((back.id, back.fsid), ("x".to_owned(), None));
        // A record written before `lower_only` and `fsid` existed.
        let old = r#"{"id":"x","image":"i","reference":"r","dir":"/d","lower":"/l","upper":"/u","work":"/w","own_upper":false}"#;
        let r: MountRecord = serde_json::from_str(old).unwrap();
        assert!(!r.lower_only && r.fsid.is_none());
        let cf = MountRecord { fsid: Some("i.1".into()), ..r };
        let back: MountRecord = serde_json::from_str(&serde_json::to_string(&cf).unwrap()).unwrap();
        assert_eq!(back.fsid.as_deref(), Some("i.1"));
    }

    #[test]
    fn mount_requests_refused_before_anything_is_made() {
        let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
        let m = mounts(tmp.path());
        assert_eq!(m.kind(), FrontendKind::Cachefiles);
        let dir = tmp.path().join("mnt");
        let cases = [
            (
                MountRequest { frontend: FrontendKind::Fanotify, ..request(dir.to_str().unwrap()) },
                "serves the cachefiles",
            ),
            (request("relative/mnt"), "must be an absolute path"),
            (request(&format!("{},x", dir.display())), "cannot carry ','"),
            (MountRequest { upper: Some("/u:/etc".into()), ..request(dir.to_str().unwrap()) }, "cannot carry ':'"),
            (MountRequest { work: Some("/w\\x".into()), ..request(dir.to_str().unwrap()) }, "cannot carry '\\\\'"),
        ];
        for (req, want) in cases {
            let e = format!("{:#}", m.mount(&req).unwrap_err());
            assert!(e.contains(want), "{req:?}: {e}");
        }
        assert!(!tmp.path().join("state/mounts").exists(), "no mount directory made");
        assert!(!dir.exists(), "no mount point made");
        assert!(m.list().is_empty());
    }

    #[test]
    fn a_directory_is_reserved_once() {
        let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
        let m = mounts(tmp.path());
        let dir = Path::new("/mnt/a");
        let r = m.reserve(&mount_id(dir), dir).unwrap();
        let e = m.reserve(&mount_id(dir), dir).err().unwrap().to_string();
        assert!(e.contains("still in progress"), "{e}");
        assert!(m.reserve(&mount_id(Path::new("/mnt/b")), Path::new("/mnt/b")).is_ok(), "another directory");
        drop(r);
        assert!(m.reserve(&mount_id(dir), dir).is_ok(), "free again once the mount is over");
        let e = m.umount(dir).unwrap_err().to_string();
        assert!(e.contains("no wisp image is mounted there"), "{e}");
    }

    #[test]
    fn mountinfo_names_are_unescaped() {
        let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
        // The kernel escapes space, tab, newline and backslash in /proc/self/mountinfo as octal.
        let odd = tmp.path().join("a b\tc\nd\\e");
        let _t = Tmpfs::at(&odd);
        assert!(mounted().unwrap().contains(&odd), "{} not among the mount points", odd.display());
    }

    #[test]
    fn restore_forgets_gone_mounts_and_keeps_broken_records() {
        let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
        let m = mounts(tmp.path());
        let records = tmp.path().join("state/mounts");
        let write = |id: &str, bytes: &[u8]| {
            fs::create_dir_all(records.join(id)).unwrap();
            fs::write(records.join(id).join("record.json"), bytes).unwrap();
        };
        // Not mounted anymore: forgotten.
        let gone = record("gone", &tmp.path().join("mnt-gone"), &tmp.path().join("lower-gone"));
        write("gone", &serde_json::to_vec(&gone).unwrap());
        // Does not parse: kept, and listed.
        write("garbled", b"{\"id\": ");
        // Still mounted, but its image is not in the state directory: kept, and listed.
        let lower = tmp.path().join("lower-kept");
        let _t = Tmpfs::at(&lower);
        let kept = record("kept", &tmp.path().join("mnt-kept"), &lower);
        write("kept", &serde_json::to_vec(&kept).unwrap());
        // A directory without a record: nothing to restore.
        fs::create_dir_all(records.join("empty")).unwrap();

        assert_eq!(m.restore().unwrap(), 0);
        assert!(!records.join("gone/record.json").exists(), "the record of a gone mount is dropped");
        assert!(records.join("garbled/record.json").exists());
        assert!(records.join("kept/record.json").exists());
        let un = m.unrestored();
        assert_eq!(un.len(), 2, "{un:?}");
        let error_of = |id: &str| {
            let path = records.join(id).join("record.json");
            let u =
                un.iter().find(|u| u["record"] == serde_json::json!(path)).unwrap_or_else(|| panic!("{id}: {un:?}"));
            u["error"].as_str().unwrap().to_owned()
        };
        assert!(error_of("garbled").contains("parsing the mount record"));
        let e = error_of("kept");
        assert!(e.contains(&format!("loading image {}", kept.image)) && e.contains("mnt-kept"), "{e}");
        assert!(m.list().is_empty());
        assert!(m.core().report().is_empty(), "no image left registered");
    }
}
