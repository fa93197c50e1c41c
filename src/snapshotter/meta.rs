//! The snapshotter's durable metadata: every snapshot's kind, parent, labels and directory id, in one
//! JSON document (`ROOT/metadata.json`) rewritten whole on each change through a temporary file, fsync
//! and rename (then an fsync of ROOT), so a crash leaves either the old or the new document, never a
//! torn one. Snapshots number in the tens or hundreds on a node; the whole document stays small.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// The kinds of the Snapshots API.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    View,
    Active,
    Committed,
}

/// One snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    /// Its directory: `ROOT/snapshots/<id>/{fs,work}`. Kept by Commit (the committed snapshot owns the
    /// active one's directory).
    pub id: u64,
    pub kind: Kind,
    /// Name of the parent ("" for none).
    pub parent: String,
    pub labels: BTreeMap<String, String>,
    pub created: SystemTime,
    pub updated: SystemTime,
    /// (bytes, inodes) of its own directory, measured at commit.
    #[serde(default)]
    pub usage: Option<(i64, i64)>,
}

/// All snapshots by name (key for active and view snapshots).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Db {
    pub next_id: u64,
    pub snapshots: BTreeMap<String, Record>,
}

impl Db {
    pub fn path(root: &Path) -> PathBuf {
        root.join("metadata.json")
    }

    /// Reads the document, or an empty one when there is none yet.
    pub fn load(root: &Path) -> Result<Db> {
        let p = Db::path(root);
        match fs::read(&p) {
            Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", p.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Db { next_id: 1, ..Db::default() }),
            Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
        }
    }

    /// Writes the document atomically and durably.
    pub fn save(&self, root: &Path) -> Result<()> {
        let p = Db::path(root);
        crate::object::atomic::write_atomic(&p, &serde_json::to_vec_pretty(self)?)?;
        fs::File::open(root).and_then(|d| d.sync_all()).with_context(|| format!("fsync {}", root.display()))
    }

    /// The chain of `name` and its ancestors, nearest first (`name` itself included).
    pub fn chain(&self, name: &str) -> Result<Vec<(String, Record)>> {
        let mut out = Vec::new();
        let mut cur = name.to_owned();
        while !cur.is_empty() {
            let r = self.snapshots.get(&cur).with_context(|| format!("snapshot {cur:?} does not exist"))?;
            out.push((cur.clone(), r.clone()));
            if out.len() > 4096 {
                anyhow::bail!("snapshot {name:?}: parent chain loops");
            }
            cur = r.parent.clone();
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_round_trip_and_chain() {
        let t = tempfile::tempdir().unwrap();
        let mut db = Db::load(t.path()).unwrap();
        assert_eq!(db.next_id, 1);
        let now = SystemTime::now();
        let rec = |id, kind, parent: &str| Record {
            id,
            kind,
            parent: parent.into(),
            labels: BTreeMap::new(),
            created: now,
            updated: now,
            usage: None,
        };
        db.snapshots.insert("a".into(), rec(1, Kind::Committed, ""));
        db.snapshots.insert("b".into(), rec(2, Kind::Committed, "a"));
        db.snapshots.insert("c".into(), rec(3, Kind::Active, "b"));
        db.next_id = 4;
        db.save(t.path()).unwrap();
        let back = Db::load(t.path()).unwrap();
        assert_eq!(back.next_id, 4);
        let names: Vec<String> = back.chain("c").unwrap().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["c", "b", "a"]);
        assert!(back.chain("nope").is_err());
        // No temporary file is left beside the document.
        let left: Vec<_> = fs::read_dir(t.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, [std::ffi::OsString::from("metadata.json")]);
    }
}
