//! The Snapshots API over directories, as containerd's overlayfs snapshotter lays them out: each
//! snapshot owns `ROOT/snapshots/<id>/fs` (its changes, the overlay upper dir once it has a parent)
//! and `work`; a snapshot's mounts stack its parents' `fs` dirs as overlay lower dirs. A committed
//! snapshot that is the layer of a wisp index image ([`super::wisp::Wisp::classify`]) is replaced
//! below every snapshot made on it by its lazy EROFS mount ([`super::wisp`]).
//!
//! `ROOT`, `ROOT/snapshots` and `ROOT/wisp` are mode 0700, as containerd makes its own snapshotters'
//! roots: the layers' files (setuid programs, device nodes) are reachable by root only.
//!
//! Every operation runs under one lock: metadata changes are saved ([`super::meta`]) before the call
//! returns, directories are made before and removed after the metadata change, and Cleanup removes
//! what a crash left between the two.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

use containerd_snapshots::api::types::Mount;

use super::filter::{self, Subject};
use super::meta::{Db, Kind, Record};
use super::wisp::Wisp;
use super::Error as Status;

/// The whole snapshotter state.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    db: Mutex<Db>,
    wisp: Wisp,
}

fn internal(e: anyhow::Error) -> Status {
    Status::internal(format!("{e:#}"))
}

fn not_found(key: &str) -> Status {
    Status::not_found(format!("snapshot {key:?} does not exist"))
}

/// A snapshot as the API returns it.
#[derive(Debug, Clone)]
pub struct InfoOut {
    pub name: String,
    pub record: Record,
}

impl Store {
    pub fn open(root: &Path, wisp: Wisp) -> anyhow::Result<Store> {
        for d in [root, &root.join("snapshots"), wisp.dir()] {
            private_dir(d)?;
        }
        let db = Db::load(root)?;
        Ok(Store { root: root.to_owned(), db: Mutex::new(db), wisp })
    }

    fn db(&self) -> MutexGuard<'_, Db> {
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn dir(&self, id: u64) -> PathBuf {
        self.root.join("snapshots").join(id.to_string())
    }

    fn save(&self, db: &Db) -> Result<(), Status> {
        db.save(&self.root).map_err(internal)
    }

    pub fn stat(&self, key: &str) -> Result<InfoOut, Status> {
        let db = self.db();
        let r = db.snapshots.get(key).ok_or_else(|| not_found(key))?;
        Ok(InfoOut { name: key.to_owned(), record: r.clone() })
    }

    /// Prepare (kind Active) and View (kind View).
    pub fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>, Status> {
        tracing::info!(?kind, key, parent, ?labels, "create");
        let mut db = self.db();
        if db.snapshots.contains_key(key) {
            return Err(Status::already_exists(format!("snapshot {key:?} already exists")));
        }
        if !parent.is_empty() {
            match db.snapshots.get(parent) {
                None => return Err(Status::not_found(format!("parent snapshot {parent:?} does not exist"))),
                Some(p) if p.kind != Kind::Committed => {
                    return Err(Status::failed_precondition(format!("parent {parent:?} is not a committed snapshot")))
                }
                Some(_) => {}
            }
        }
        let id = db.next_id.max(1);
        db.next_id = id + 1;
        let dir = self.dir(id);
        let _ = fs::remove_dir_all(&dir);
        for d in [dir.join("fs"), dir.join("work")] {
            fs::create_dir_all(&d).map_err(|e| Status::internal(format!("creating {}: {e}", d.display())))?;
        }
        let now = SystemTime::now();
        let rec = Record { id, kind, parent: parent.to_owned(), labels, created: now, updated: now, usage: None };
        db.snapshots.insert(key.to_owned(), rec);
        let result = self.mounts_locked(&db, key).and_then(|m| self.save(&db).map(|()| m));
        if result.is_err() {
            db.snapshots.remove(key);
            let _ = fs::remove_dir_all(&dir);
        }
        result
    }

    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>, Status> {
        let db = self.db();
        self.mounts_locked(&db, key)
    }

    /// The mounts of an active or view snapshot; mounts the wisp lower its chain needs, if any.
    fn mounts_locked(&self, db: &Db, key: &str) -> Result<Vec<Mount>, Status> {
        let rec = db.snapshots.get(key).ok_or_else(|| not_found(key))?;
        if rec.kind == Kind::Committed {
            return Err(Status::failed_precondition(format!("snapshot {key:?} is committed, not active")));
        }
        let chain = db.chain(&rec.parent).map_err(internal)?;
        let mut lowers: Vec<PathBuf> = chain.iter().map(|(_, p)| self.dir(p.id).join("fs")).collect();
        // A wisp index image has exactly one layer: only a snapshot on a lone layer can stand on one.
        if let [(name, p)] = chain.as_slice() {
            let fs_dir = self.dir(p.id).join("fs");
            if self.wisp.classify(p.id, &fs_dir, name, &p.labels).map_err(internal)? {
                lowers = vec![self.wisp.ensure_mounted(p.id, &fs_dir).map_err(internal)?];
            }
        }
        let dir = self.dir(rec.id);
        let ro = rec.kind == Kind::View;
        let bind = |src: &Path| Mount {
            r#type: "bind".into(),
            source: src.display().to_string(),
            target: String::new(),
            options: vec![if ro { "ro" } else { "rw" }.into(), "rbind".into()],
        };
        let lowerdir = lowers.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(":");
        Ok(vec![match (lowers.len(), ro) {
            (0, _) => bind(&dir.join("fs")),
            (1, true) => bind(&lowers[0]),
            (_, true) => Mount {
                r#type: "overlay".into(),
                source: "overlay".into(),
                target: String::new(),
                options: vec!["ro".into(), format!("lowerdir={lowerdir}")],
            },
            (_, false) => Mount {
                r#type: "overlay".into(),
                source: "overlay".into(),
                target: String::new(),
                options: vec![
                    "index=off".into(),
                    format!("workdir={}", dir.join("work").display()),
                    format!("upperdir={}", dir.join("fs").display()),
                    format!("lowerdir={lowerdir}"),
                ],
            },
        }])
    }

    pub fn commit(&self, name: &str, key: &str, labels: BTreeMap<String, String>) -> Result<(), Status> {
        tracing::info!(name, key, ?labels, "commit");
        let mut db = self.db();
        let rec = db.snapshots.get(key).ok_or_else(|| not_found(key))?.clone();
        if rec.kind != Kind::Active {
            return Err(Status::failed_precondition(format!("snapshot {key:?} is not active")));
        }
        if db.snapshots.contains_key(name) {
            return Err(Status::already_exists(format!("snapshot {name:?} already exists")));
        }
        let wisp_layer = self.wisp_layer(&db, &rec.parent);
        let usage = disk_usage(&self.dir(rec.id).join("fs")).map_err(internal)?;
        let now = SystemTime::now();
        let committed = Record { kind: Kind::Committed, labels, created: now, updated: now, usage: Some(usage), ..rec };
        db.snapshots.remove(key);
        db.snapshots.insert(name.to_owned(), committed);
        self.save(&db)?;
        if let Some(id) = wisp_layer {
            self.release_if_unused(&db, id);
        }
        Ok(())
    }

    /// The directory id of the wisp layer `name` stands for, if it is one.
    fn wisp_layer(&self, db: &Db, name: &str) -> Option<u64> {
        let chain = db.chain(name).ok()?;
        chain.last().map(|(_, r)| r.id).filter(|id| self.wisp.is_layer(*id))
    }

    /// Unmounts the lazy EROFS of wisp layer `id` when no active or view snapshot stands on it.
    fn release_if_unused(&self, db: &Db, id: u64) {
        let used = db.snapshots.values().any(|r| r.kind != Kind::Committed && self.chain_ids(db, r).contains(&id));
        if !used {
            if let Err(e) = self.wisp.release(id) {
                tracing::warn!(layer = id, error = %format!("{e:#}"), "releasing a wisp lower mount (Cleanup retries)");
            }
        }
    }

    fn chain_ids(&self, db: &Db, r: &Record) -> HashSet<u64> {
        db.chain(&r.parent).map(|c| c.into_iter().map(|(_, p)| p.id).collect()).unwrap_or_default()
    }

    pub fn remove(&self, key: &str) -> Result<(), Status> {
        tracing::info!(key, "remove");
        let mut db = self.db();
        let rec = db.snapshots.get(key).ok_or_else(|| not_found(key))?.clone();
        if let Some((child, _)) = db.snapshots.iter().find(|(_, r)| r.parent == key) {
            return Err(Status::failed_precondition(format!("snapshot {key:?} has a child, {child:?}")));
        }
        let wisp_layer = self.wisp_layer(&db, &rec.parent);
        let is_index = self.wisp.is_layer(rec.id);
        db.snapshots.remove(key);
        self.save(&db)?;
        if is_index {
            match self.wisp.release(rec.id) {
                Ok(()) => self.wisp.forget(rec.id),
                Err(e) => tracing::warn!(layer = rec.id, error = %format!("{e:#}"), "releasing a removed wisp layer"),
            }
        }
        self.remove_dir(rec.id);
        if let Some(id) = wisp_layer {
            self.release_if_unused(&db, id);
        }
        Ok(())
    }

    /// Removes a snapshot directory: renamed aside first, so a crash half way leaves a name Cleanup knows.
    fn remove_dir(&self, id: u64) {
        let dir = self.dir(id);
        let aside = self.root.join("snapshots").join(format!("rm-{id}"));
        let target = if fs::rename(&dir, &aside).is_ok() { aside } else { dir };
        if let Err(e) = fs::remove_dir_all(&target) {
            tracing::warn!(dir = %target.display(), error = %e, "removing a snapshot directory (Cleanup retries)");
        }
    }

    pub fn update(&self, name: &str, labels: BTreeMap<String, String>, paths: &[String]) -> Result<InfoOut, Status> {
        let mut db = self.db();
        let rec = db.snapshots.get_mut(name).ok_or_else(|| not_found(name))?;
        if paths.is_empty() {
            rec.labels = labels;
        } else {
            for p in paths {
                if p == "labels" {
                    rec.labels = labels.clone();
                } else if let Some(k) = p.strip_prefix("labels.") {
                    match labels.get(k) {
                        Some(v) => rec.labels.insert(k.to_owned(), v.clone()),
                        None => rec.labels.remove(k),
                    };
                } else {
                    return Err(Status::invalid_argument(format!("cannot update field {p:?} of a snapshot")));
                }
            }
        }
        rec.updated = SystemTime::now();
        let out = InfoOut { name: name.to_owned(), record: rec.clone() };
        self.save(&db)?;
        Ok(out)
    }

    /// (bytes, inodes) a snapshot uses itself, without its parents.
    pub fn usage(&self, key: &str) -> Result<(i64, i64), Status> {
        let (id, stored) = {
            let db = self.db();
            let r = db.snapshots.get(key).ok_or_else(|| not_found(key))?;
            (r.id, r.usage.filter(|_| r.kind == Kind::Committed))
        };
        match stored {
            Some(u) => Ok(u),
            None => disk_usage(&self.dir(id).join("fs")).map_err(internal),
        }
    }

    pub fn walk(&self, filters: &[String]) -> Result<Vec<InfoOut>, Status> {
        let db = self.db();
        let mut out = Vec::new();
        for (name, r) in &db.snapshots {
            let kind = match r.kind {
                Kind::View => "view",
                Kind::Active => "active",
                Kind::Committed => "committed",
            };
            let s = Subject { name, parent: &r.parent, kind, labels: &r.labels };
            if filter::matches(filters, &s).map_err(Status::invalid_argument)? {
                out.push(InfoOut { name: name.clone(), record: r.clone() });
            }
        }
        Ok(out)
    }

    /// Removes directories no snapshot owns and wisp lower mounts nothing stands on.
    pub fn cleanup(&self) -> Result<(), Status> {
        let db = self.db();
        let owned: HashSet<String> = db.snapshots.values().map(|r| r.id.to_string()).collect();
        let snaps = self.root.join("snapshots");
        for e in fs::read_dir(&snaps).map_err(|e| Status::internal(format!("{}: {e}", snaps.display())))? {
            let e = e.map_err(|e| Status::internal(e.to_string()))?;
            let n = e.file_name().to_string_lossy().into_owned();
            if !owned.contains(&n) {
                tracing::info!(dir = %e.path().display(), "cleanup: removing an unowned snapshot directory");
                let _ = fs::remove_dir_all(e.path());
            }
        }
        let wisp_ids: Vec<u64> = db
            .snapshots
            .values()
            .filter(|r| r.kind == Kind::Committed && self.wisp.is_layer(r.id))
            .map(|r| r.id)
            .collect();
        for id in self.wisp.layers() {
            if wisp_ids.contains(&id) {
                self.release_if_unused(&db, id);
            } else {
                match self.wisp.release(id) {
                    Ok(()) => self.wisp.forget(id),
                    Err(e) => tracing::warn!(layer = id, error = %format!("{e:#}"), "cleanup: releasing a wisp lower"),
                }
            }
        }
        Ok(())
    }
}

/// Makes `dir` (and missing parents) mode 0700, or sets an existing one to 0700.
fn private_dir(dir: &Path) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).with_context(|| format!("chmod 0700 {}", dir.display()))
}

/// Bytes (allocated blocks) and inodes under `dir`, hard links counted once.
fn disk_usage(dir: &Path) -> anyhow::Result<(i64, i64)> {
    use anyhow::Context;
    let mut seen = HashSet::new();
    let (mut bytes, mut inodes) = (0i64, 0i64);
    let mut stack = vec![dir.to_owned()];
    while let Some(p) = stack.pop() {
        let m = fs::symlink_metadata(&p).with_context(|| format!("lstat {}", p.display()))?;
        if seen.insert((m.dev(), m.ino())) {
            inodes += 1;
            bytes = bytes.saturating_add(i64::try_from(m.blocks().saturating_mul(512)).unwrap_or(i64::MAX));
        }
        if m.is_dir() {
            for e in fs::read_dir(&p).with_context(|| format!("reading {}", p.display()))? {
                stack.push(e?.path());
            }
        }
    }
    Ok((bytes, inodes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_snapshots::tonic;

    fn names(s: &Store, f: &[&str]) -> Vec<String> {
        s.walk(&f.iter().map(|x| x.to_string()).collect::<Vec<_>>()).unwrap().into_iter().map(|i| i.name).collect()
    }

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn open(root: &Path) -> Store {
        Store::open(root, Wisp::new(root, &root.join("no-daemon"), false, None)).unwrap()
    }

    #[test]
    fn snapshots_api_semantics_and_metadata_survive_reopen() {
        let t = tempfile::tempdir().unwrap();
        let s = open(t.path());
        // No parent: a bind mount of the snapshot's own dir.
        let m = s.create(Kind::Active, "a-key", "", BTreeMap::new()).unwrap();
        assert_eq!(m[0].r#type, "bind");
        assert!(m[0].options.contains(&"rw".to_string()));
        assert_eq!(s.create(Kind::Active, "a-key", "", BTreeMap::new()).unwrap_err().code, tonic::Code::AlreadyExists);
        // A parent must exist and be committed.
        assert_eq!(s.create(Kind::Active, "x", "nope", BTreeMap::new()).unwrap_err().code, tonic::Code::NotFound);
        assert_eq!(
            s.create(Kind::Active, "x", "a-key", BTreeMap::new()).unwrap_err().code,
            tonic::Code::FailedPrecondition
        );
        fs::write(s.dir(1).join("fs/file"), b"layer a").unwrap();
        s.commit("a", "a-key", labels(&[("l", "1")])).unwrap();
        assert_eq!(s.stat("a-key").unwrap_err().code, tonic::Code::NotFound);
        assert_eq!(s.stat("a").unwrap().record.kind, Kind::Committed);
        assert!(s.usage("a").unwrap().0 > 0);
        assert_eq!(s.mounts("a").unwrap_err().code, tonic::Code::FailedPrecondition);
        s.create(Kind::Active, "b-key", "a", BTreeMap::new()).unwrap();
        s.commit("b", "b-key", BTreeMap::new()).unwrap();
        // Two parents: overlay, nearest lower first; a view has no upper.
        let m = s.create(Kind::Active, "c", "b", BTreeMap::new()).unwrap();
        assert_eq!(m[0].r#type, "overlay");
        let lower = m[0].options.iter().find_map(|o| o.strip_prefix("lowerdir=")).unwrap().to_owned();
        assert_eq!(lower, format!("{}:{}", s.dir(2).join("fs").display(), s.dir(1).join("fs").display()));
        assert!(m[0].options.iter().any(|o| o.starts_with("upperdir=")));
        let v = s.create(Kind::View, "v", "b", BTreeMap::new()).unwrap();
        assert!(v[0].options.iter().all(|o| !o.starts_with("upperdir=")));
        let v1 = s.create(Kind::View, "v1", "a", BTreeMap::new()).unwrap();
        assert_eq!((v1[0].r#type.as_str(), v1[0].source.clone()), ("bind", s.dir(1).join("fs").display().to_string()));
        assert!(v1[0].options.contains(&"ro".to_string()));
        assert_eq!(s.commit("z", "v", BTreeMap::new()).unwrap_err().code, tonic::Code::FailedPrecondition);
        // Update: one label, or all of them.
        s.update("a", labels(&[("m", "2")]), &["labels.m".into()]).unwrap();
        assert_eq!(s.stat("a").unwrap().record.labels, labels(&[("l", "1"), ("m", "2")]));
        s.update("a", labels(&[]), &["labels.l".into()]).unwrap();
        assert_eq!(s.stat("a").unwrap().record.labels, labels(&[("m", "2")]));
        assert_eq!(s.update("a", labels(&[]), &["parent".into()]).unwrap_err().code, tonic::Code::InvalidArgument);
        // Walk with filters.
        assert_eq!(names(&s, &[]), ["a", "b", "c", "v", "v1"]);
        assert_eq!(names(&s, &["kind==committed"]), ["a", "b"]);
        assert_eq!(names(&s, &["labels.m==2", "name==c"]), ["a", "c"]);
        // Remove: children first.
        assert_eq!(s.remove("b").unwrap_err().code, tonic::Code::FailedPrecondition);
        s.remove("c").unwrap();
        s.remove("v").unwrap();
        assert!(!s.dir(3).exists());
        // Everything survives a restart of the snapshotter.
        drop(s);
        let s = open(t.path());
        assert_eq!(names(&s, &[]), ["a", "b", "v1"]);
        assert_eq!(s.stat("a").unwrap().record.labels, labels(&[("m", "2")]));
        assert_eq!(fs::read(s.dir(1).join("fs/file")).unwrap(), b"layer a");
        // New ids never reuse an old directory.
        s.create(Kind::Active, "d", "b", BTreeMap::new()).unwrap();
        assert_eq!(s.stat("d").unwrap().record.id, 6);
        // Cleanup removes what no snapshot owns (a crash between mkdir and the metadata save).
        fs::create_dir_all(t.path().join("snapshots/99/fs")).unwrap();
        fs::create_dir_all(t.path().join("snapshots/rm-3")).unwrap();
        s.cleanup().unwrap();
        assert!(!t.path().join("snapshots/99").exists() && !t.path().join("snapshots/rm-3").exists());
        assert!(s.dir(6).exists() && s.dir(1).exists());
    }

    #[test]
    fn index_files_alone_make_no_wisp_layer_and_the_root_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        let s = open(&root);
        for d in [root.clone(), root.join("snapshots"), root.join("wisp")] {
            assert_eq!(fs::metadata(&d).unwrap().permissions().mode() & 0o7777, 0o700, "{}", d.display());
        }
        // A lone layer with real index files, and one whose `wisp` links to them: without containerd's
        // word that they are the layer of a wisp index image, both are ordinary layers.
        s.create(Kind::Active, "a-key", "", BTreeMap::new()).unwrap();
        fs::create_dir_all(s.dir(1).join("fs/wisp")).unwrap();
        fs::write(s.dir(1).join("fs/wisp/index.erofs"), b"x").unwrap();
        fs::write(s.dir(1).join("fs/wisp/objects.map"), b"x").unwrap();
        s.commit("ns/1/sha256:aa", "a-key", BTreeMap::new()).unwrap();
        s.create(Kind::Active, "b-key", "", BTreeMap::new()).unwrap();
        std::os::unix::fs::symlink(s.dir(1).join("fs/wisp"), s.dir(2).join("fs/wisp")).unwrap();
        s.commit("ns/2/sha256:bb", "b-key", BTreeMap::new()).unwrap();
        for (parent, id) in [("ns/1/sha256:aa", 1), ("ns/2/sha256:bb", 2)] {
            let m = s.create(Kind::Active, &format!("on-{id}"), parent, BTreeMap::new()).unwrap();
            let lower = m[0].options.iter().find_map(|o| o.strip_prefix("lowerdir=")).unwrap().to_owned();
            assert_eq!(lower, s.dir(id).join("fs").display().to_string());
        }
        assert!(s.wisp.layers().is_empty());
    }
}
