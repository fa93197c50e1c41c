//! Applying layer entries to a tree, following the OCI image spec's changeset rules (`layer.md`):
//!
//! - entries replace whatever the lower layers (or earlier entries of the same layer) had at their
//!   path; a directory entry over an existing directory only updates its metadata and xattrs;
//!   a non-directory over a directory removes the whole subtree (and the reverse);
//! - `.wh.NAME` removes NAME from the lower layers; `.wh..wh..opq` removes every child the lower
//!   layers gave its directory. Whiteouts never hide what their own layer adds, wherever in the
//!   layer the whiteout appears;
//! - hard links name an existing inode (from this or an earlier layer) and share it;
//! - parents missing from the tar are created (mode 0755, owner 0:0); parent components that are
//!   symlinks are followed inside the root, as containerd and umoci do.

use std::collections::{BTreeMap, HashSet};

use erofs::tree::{FileData, Inode, InodeId, Kind, Metadata, Tree, ROOT};

use super::entry::{Entry, EntryKind};
use super::show;

/// Most symlinks followed while resolving one parent path (Linux's MAXSYMLINKS).
const MAX_SYMLINKS: usize = 40;

/// Why an entry could not be applied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MergeError {
    #[error("entry {path}: parent {parent} is not a directory")]
    ParentNotDirectory { path: String, parent: String },
    #[error("entry {path}: too many levels of symlinks in its parent path")]
    SymlinkLoop { path: String },
    #[error("entry {path}: hard link target {target} does not exist")]
    LinkTargetMissing { path: String, target: String },
    #[error("entry {path}: hard link target {target} is a directory")]
    LinkToDirectory { path: String, target: String },
    #[error("entry {path}: the root can only be a directory")]
    RootNotDirectory { path: String },
    #[error("entry {path}: whiteout names the root or a special name")]
    BadWhiteout { path: String },
    #[error("entry {path}: {limit}")]
    Limit { path: String, limit: super::limits::LimitError },
}

const WHITEOUT: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";

/// A tree being built from layers.
#[derive(Debug)]
pub struct Merger {
    tree: Tree,
    /// (directory, name) pairs that the current layer added or replaced.
    added: HashSet<(InodeId, Vec<u8>)>,
    /// Most directories one entry's path may create ([`super::limits::Limits::max_implicit_parents`]).
    max_implicit_parents: u64,
    /// Directories created for missing parents so far.
    implicit_dirs: u64,
}

impl Default for Merger {
    fn default() -> Self {
        Self::new()
    }
}

impl Merger {
    pub fn new() -> Self {
        let meta = Metadata { perm: 0o755, ..Default::default() };
        Merger { tree: Tree::new(meta), added: HashSet::new(), max_implicit_parents: u64::MAX, implicit_dirs: 0 }
    }

    /// Sets how many missing parent directories one entry may create (unbounded by default).
    pub fn set_max_implicit_parents(&mut self, max: u64) {
        self.max_implicit_parents = max;
    }

    /// Directories created so far for parents that no entry named.
    pub fn implicit_dirs(&self) -> u64 {
        self.implicit_dirs
    }

    /// Starts the next layer (whiteouts of later entries apply to everything applied so far).
    pub fn begin_layer(&mut self) {
        self.added.clear();
    }

    pub fn tree(&self) -> &Tree {
        &self.tree
    }

    pub fn tree_mut(&mut self) -> &mut Tree {
        &mut self.tree
    }

    pub fn into_tree(self) -> Tree {
        self.tree
    }

    /// Applies one entry. `data` is the content of a regular file (ignored for other kinds). Returns
    /// the inode the entry created, if it created one.
    pub fn apply(&mut self, e: Entry, data: Option<FileData>) -> Result<Option<InodeId>, MergeError> {
        let path = show(&e.path);
        let Some((name, parent)) = e.path.split_last() else {
            return match e.kind {
                EntryKind::Directory => {
                    let root = &mut self.tree.inodes[ROOT];
                    root.meta = e.meta;
                    root.xattrs = e.xattrs;
                    Ok(None)
                }
                _ => Err(MergeError::RootNotDirectory { path: "/".into() }),
            };
        };
        if name.starts_with(WHITEOUT) {
            return self.whiteout(parent, name, &path).map(|()| None);
        }
        let dir = self.resolve_dir(parent, true, &path, &e.meta)?.expect("created when missing");
        let existing = self.tree.entries(dir).and_then(|m| m.get(name.as_slice()).copied());
        let id = match e.kind {
            EntryKind::Directory => {
                if let Some(old) = existing.filter(|&id| matches!(self.tree.inodes[id].kind, Kind::Directory(_))) {
                    let inode = &mut self.tree.inodes[old];
                    inode.meta = e.meta;
                    inode.xattrs = e.xattrs;
                    self.added.insert((dir, name.clone()));
                    return Ok(None);
                }
                self.push(Kind::Directory(BTreeMap::new()), e.meta, e.xattrs)
            }
            EntryKind::HardLink(target) => {
                let target_id = self
                    .lookup(&target)
                    .ok_or_else(|| MergeError::LinkTargetMissing { path: path.clone(), target: show(&target) })?;
                if matches!(self.tree.inodes[target_id].kind, Kind::Directory(_)) {
                    return Err(MergeError::LinkToDirectory { path, target: show(&target) });
                }
                self.link(dir, name, target_id);
                return Ok(None);
            }
            EntryKind::Regular { size, .. } => {
                let data = data.unwrap_or(FileData::Inline { size, extents: Vec::new(), source: 0 });
                self.push(Kind::Regular(data), e.meta, e.xattrs)
            }
            EntryKind::Symlink(t) => self.push(Kind::Symlink(t), e.meta, e.xattrs),
            EntryKind::CharDevice { major, minor } => self.push(Kind::CharDevice { major, minor }, e.meta, e.xattrs),
            EntryKind::BlockDevice { major, minor } => self.push(Kind::BlockDevice { major, minor }, e.meta, e.xattrs),
            EntryKind::Fifo => self.push(Kind::Fifo, e.meta, e.xattrs),
        };
        self.link(dir, name, id);
        Ok(Some(id))
    }

    fn push(&mut self, kind: Kind, meta: Metadata, xattrs: BTreeMap<Vec<u8>, Vec<u8>>) -> InodeId {
        let mut inode = Inode::new(kind, meta);
        inode.xattrs = xattrs;
        self.tree.push(inode)
    }

    /// Points `dir/name` at `id` (replacing whatever was there: a replaced directory's subtree becomes
    /// unreachable) and records it as added by this layer.
    fn link(&mut self, dir: InodeId, name: &[u8], id: InodeId) {
        self.tree.entries_mut(dir).expect("resolved to a directory").insert(name.to_vec(), id);
        self.added.insert((dir, name.to_vec()));
    }

    fn whiteout(&mut self, parent: &[Vec<u8>], name: &[u8], path: &str) -> Result<(), MergeError> {
        let Some(dir) = self.resolve_dir(parent, false, path, &Metadata::default())? else {
            return Ok(()); // nothing below to hide
        };
        if name == OPAQUE {
            let added = &self.added;
            self.tree
                .entries_mut(dir)
                .expect("resolved to a directory")
                .retain(|child, _| added.contains(&(dir, child.clone())));
            return Ok(());
        }
        let target = &name[WHITEOUT.len()..];
        if target.is_empty() || target.starts_with(WHITEOUT) || target == b"." || target == b".." {
            // `.wh..wh.*` other than the opaque marker: aufs metadata (.wh..wh.plnk, .wh..wh.aufs).
            if name.starts_with(b".wh..wh.") {
                return Ok(());
            }
            return Err(MergeError::BadWhiteout { path: path.to_string() });
        }
        if self.added.contains(&(dir, target.to_vec())) {
            return Ok(()); // whiteouts apply to lower layers only
        }
        self.tree.entries_mut(dir).expect("resolved to a directory").remove(target);
        Ok(())
    }

    /// The directory at `components`, following symlinks in every component (scoped to the root;
    /// `..` stops at the root). Missing directories are created when `create` is set (with `meta`'s
    /// times), else `Ok(None)`.
    fn resolve_dir(
        &mut self,
        components: &[Vec<u8>],
        create: bool,
        path: &str,
        meta: &Metadata,
    ) -> Result<Option<InodeId>, MergeError> {
        let mut stack: Vec<InodeId> = vec![ROOT];
        let mut todo: Vec<Vec<u8>> = components.iter().rev().cloned().collect();
        let mut followed = 0;
        let mut walked: Vec<Vec<u8>> = Vec::new();
        let mut created = 0u64;
        while let Some(c) = todo.pop() {
            let cur = *stack.last().expect("root is never popped");
            match c.as_slice() {
                b"" | b"." => continue,
                b".." => {
                    if stack.len() > 1 {
                        stack.pop();
                    }
                    walked.pop();
                    continue;
                }
                _ => {}
            }
            let child = self.tree.entries(cur).expect("stack holds directories").get(c.as_slice()).copied();
            walked.push(c.clone());
            let Some(child) = child else {
                if !create {
                    return Ok(None);
                }
                created += 1;
                if created > self.max_implicit_parents {
                    let limit = super::limits::LimitError::new(
                        format!("its path creates {created} missing parent directories"),
                        self.max_implicit_parents,
                        "max-implicit-parents",
                    );
                    return Err(MergeError::Limit { path: path.to_string(), limit });
                }
                self.implicit_dirs += 1;
                let m = Metadata { perm: 0o755, uid: 0, gid: 0, mtime: meta.mtime, mtime_nsec: meta.mtime_nsec };
                let id = self.push(Kind::Directory(BTreeMap::new()), m, BTreeMap::new());
                self.link(cur, &c, id);
                stack.push(id);
                continue;
            };
            match &self.tree.inodes[child].kind {
                Kind::Directory(_) => stack.push(child),
                Kind::Symlink(target) => {
                    followed += 1;
                    if followed > MAX_SYMLINKS {
                        return Err(MergeError::SymlinkLoop { path: path.to_string() });
                    }
                    if target.first() == Some(&b'/') {
                        stack.truncate(1);
                    }
                    todo.extend(target.split(|&b| b == b'/').rev().map(<[u8]>::to_vec));
                }
                _ => {
                    if !create {
                        return Ok(None);
                    }
                    return Err(MergeError::ParentNotDirectory { path: path.to_string(), parent: show(&walked) });
                }
            }
        }
        Ok(Some(*stack.last().expect("root is never popped")))
    }

    /// The inode at `components` (the last component not followed, like lstat), if any.
    pub fn lookup(&mut self, components: &[Vec<u8>]) -> Option<InodeId> {
        let (name, parent) = components.split_last()?;
        let dir = self.resolve_dir(parent, false, "", &Metadata::default()).ok()??;
        self.tree.entries(dir)?.get(name.as_slice()).copied()
    }
}

/// Every inode reachable from the root (hard links once).
pub fn reachable(tree: &Tree) -> Vec<InodeId> {
    let mut seen = HashSet::from([ROOT]);
    let mut out = vec![ROOT];
    let mut i = 0;
    while i < out.len() {
        if let Kind::Directory(entries) = &tree.inodes[out[i]].kind {
            for &child in entries.values() {
                if seen.insert(child) {
                    out.push(child);
                }
            }
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::changeset::split_name;

    fn e(path: &str, kind: EntryKind) -> Entry {
        Entry {
            name: path.as_bytes().to_vec(),
            path: split_name(path.as_bytes()).unwrap(),
            kind,
            meta: Metadata { perm: 0o644, ..Default::default() },
            xattrs: BTreeMap::new(),
        }
    }
    fn file(path: &str) -> Entry {
        e(path, EntryKind::Regular { size: 0, sparse: None })
    }
    fn names(m: &mut Merger, dir: &str) -> Vec<String> {
        let id = if dir.is_empty() { ROOT } else { m.lookup(&split_name(dir.as_bytes()).unwrap()).unwrap() };
        m.tree().entries(id).unwrap().keys().map(|k| String::from_utf8_lossy(k).into_owned()).collect()
    }

    #[test]
    fn whiteouts_hide_lower_layers_only() {
        let mut m = Merger::new();
        m.begin_layer();
        for p in ["a/x", "a/y", "b/z", "c"] {
            m.apply(file(p), None).unwrap();
        }
        m.begin_layer();
        m.apply(file("a/new"), None).unwrap();
        m.apply(file("a/.wh..wh..opq"), None).unwrap();
        m.apply(file("c"), None).unwrap();
        m.apply(file(".wh.c"), None).unwrap();
        m.apply(file(".wh.b"), None).unwrap();
        m.apply(file("q/.wh.nothing"), None).unwrap();
        assert_eq!(names(&mut m, "a"), vec!["new"]);
        assert_eq!(names(&mut m, ""), vec!["a", "c"]);
    }

    #[test]
    fn type_changes_and_symlinked_parents() {
        let mut m = Merger::new();
        m.begin_layer();
        m.apply(file("f"), None).unwrap();
        m.apply(file("d/child"), None).unwrap();
        m.apply(e("usr/lib", EntryKind::Directory), None).unwrap();
        m.apply(e("lib", EntryKind::Symlink(b"usr/lib".to_vec())), None).unwrap();
        m.begin_layer();
        m.apply(e("f", EntryKind::Directory), None).unwrap();
        m.apply(file("f/inner"), None).unwrap();
        m.apply(file("d"), None).unwrap();
        m.apply(file("lib/libc.so"), None).unwrap();
        assert_eq!(names(&mut m, "f"), vec!["inner"]);
        assert_eq!(names(&mut m, "usr/lib"), vec!["libc.so"]);
        assert!(m.apply(file("d/x"), None).is_err());
    }

    #[test]
    fn symlinked_parents_never_leave_the_root() {
        let mut m = Merger::new();
        m.begin_layer();
        m.apply(e("escape", EntryKind::Symlink(b"/".to_vec())), None).unwrap();
        m.apply(e("up", EntryKind::Symlink(b"../../../..".to_vec())), None).unwrap();
        m.apply(e("loop", EntryKind::Symlink(b"loop".to_vec())), None).unwrap();
        m.begin_layer();
        m.apply(file("escape/etc/x"), None).unwrap();
        m.apply(file("up/etc/y"), None).unwrap();
        assert_eq!(names(&mut m, "etc"), vec!["x", "y"]);
        assert!(matches!(m.apply(file("loop/z"), None), Err(MergeError::SymlinkLoop { .. })));
    }

    #[test]
    fn implicit_parents_are_bounded_per_entry() {
        let mut m = Merger::new();
        m.set_max_implicit_parents(3);
        m.begin_layer();
        m.apply(file("a/b/c/f"), None).unwrap();
        assert_eq!(m.implicit_dirs(), 3);
        m.apply(file("a/b/c/d/e/f/g"), None).unwrap();
        assert_eq!(m.implicit_dirs(), 6);
        let err = m.apply(file("x/y/z/w/f"), None).unwrap_err();
        assert!(matches!(&err, MergeError::Limit { limit, .. } if limit.flag == "max-implicit-parents"), "{err}");
    }

    #[test]
    fn hard_links_share_inodes_and_break_on_replace() {
        let mut m = Merger::new();
        m.begin_layer();
        let a = m.apply(file("a"), None).unwrap().unwrap();
        m.apply(e("b", EntryKind::HardLink(vec![b"a".to_vec()])), None).unwrap();
        assert_eq!(m.lookup(&[b"b".to_vec()]), Some(a));
        m.begin_layer();
        m.apply(e("c", EntryKind::HardLink(vec![b"b".to_vec()])), None).unwrap();
        m.apply(file("a"), None).unwrap();
        assert_eq!(m.lookup(&[b"c".to_vec()]), Some(a));
        assert_ne!(m.lookup(&[b"a".to_vec()]), Some(a));
        let err = m.apply(e("x", EntryKind::HardLink(vec![b"missing".to_vec()])), None).unwrap_err();
        assert!(matches!(err, MergeError::LinkTargetMissing { .. }));
    }
}
