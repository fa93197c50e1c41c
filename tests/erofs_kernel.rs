//! The EROFS writer proven by the real kernel: images built by `wisp mkfs` from a debootstrap rootfs and
//! from a generated edge-case tree are mounted by the host kernel (file-backed EROFS; for --external each
//! object is a `device=`) and compared path by path with their source. fsck.erofs (erofs-utils) and
//! `wisp fsck` must accept every image.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{compare_trees, require, run, wisp_bin, CompareOptions};

#[path = "common/edge.rs"]
mod edge;

/// Unmounts on drop, so a failed assertion does not leave mounts behind.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = wisp::mount::umount(&self.0);
    }
}

fn can_mount() -> bool {
    require(common::is_root(), "needs root to mount EROFS")
        && require(
            std::fs::read_to_string("/proc/filesystems").map(|s| s.contains("erofs")).unwrap_or(false),
            "the kernel has no erofs (CONFIG_EROFS_FS)",
        )
}

/// The object files an image references, in device-table order.
fn devices_of(image: &Path, objects: &Path) -> Vec<PathBuf> {
    let bytes = std::fs::read(image).unwrap();
    let img = erofs::reader::Image::open(bytes.as_slice()).unwrap();
    let dir = wisp::object::dir::ObjectDir::new(objects);
    img.devices().iter().map(|d| dir.path(&d.digest.expect("device tag is a sha256"))).collect()
}

fn mkfs(src: &Path, image: &Path, external: Option<&Path>) {
    let mut cmd = Command::new(wisp_bin());
    cmd.arg("mkfs");
    if let Some(dir) = external {
        cmd.arg("--external").arg(dir);
    }
    run(cmd.arg(src).arg(image));
    run(Command::new(wisp_bin()).arg("fsck").arg(image));
}

fn fsck_erofs(image: &Path, devices: &[PathBuf]) {
    let mut cmd = Command::new("fsck.erofs");
    for d in devices {
        cmd.arg(format!("--device={}", d.display()));
    }
    run(cmd.arg(image));
}

/// The kernel's SEEK_DATA view of `mounted` covers every data extent of `source`, and stores no more
/// than those extents rounded out to `GRAIN`: holes stayed holes. (The writer may store a sparse file in
/// chunks larger than a block when that makes the image smaller: chunk indexes cost 8 bytes each.)
fn holes_kept(source: &Path, mounted: &Path) {
    const GRAIN: u64 = 1 << 20;
    let src = common::data_extents(source);
    let mnt = common::data_extents(mounted);
    for &(s, e) in &src {
        assert!(
            mnt.iter().any(|&(ms, me)| ms <= s && e <= me),
            "{}: data {s}..{e} is a hole in the image (image data: {mnt:?})",
            mounted.display()
        );
    }
    let rounded: u64 = src.iter().map(|&(s, e)| e.div_ceil(GRAIN) * GRAIN - s / GRAIN * GRAIN).sum();
    let stored: u64 = mnt.iter().map(|&(s, e)| e - s).sum();
    assert!(
        stored <= rounded,
        "{}: the image stores {stored} bytes of data where the source has {src:?} (at most {rounded} bytes)",
        mounted.display()
    );
}

/// Builds both kinds of image from `src`, mounts each and compares it with `src`.
fn round_trip(src: &Path, fsck_external: bool, sparse_files: &[&str]) {
    let work = tempfile::tempdir_in("/var/tmp").unwrap();
    let opts = CompareOptions { root_metadata: true, ..Default::default() };

    let inline = work.path().join("inline.erofs");
    mkfs(src, &inline, None);
    fsck_erofs(&inline, &[]);
    let mnt = work.path().join("mnt-inline");
    std::fs::create_dir(&mnt).unwrap();
    wisp::mount::mount_erofs_file(&inline, &mnt, &[], false).unwrap();
    let guard = Mounted(mnt.clone());
    let diffs = compare_trees(src, &mnt, &opts);
    assert!(diffs.is_empty(), "inline image differs from {}:\n{}", src.display(), diffs.join("\n"));
    for rel in sparse_files {
        holes_kept(&src.join(rel), &mnt.join(rel));
    }
    drop(guard);

    let objects = work.path().join("objects");
    let external = work.path().join("external.erofs");
    mkfs(src, &external, Some(&objects));
    let devices = devices_of(&external, &objects);
    if fsck_external {
        assert!(devices.len() <= 200, "fsck.erofs 1.5 handles up to a few hundred devices, got {}", devices.len());
        fsck_erofs(&external, &devices);
    }
    let mnt = work.path().join("mnt-external");
    std::fs::create_dir(&mnt).unwrap();
    wisp::mount::mount_erofs_file(&external, &mnt, &devices, false).unwrap();
    let guard = Mounted(mnt.clone());
    let diffs = compare_trees(src, &mnt, &opts);
    assert!(diffs.is_empty(), "external image differs from {}:\n{}", src.display(), diffs.join("\n"));
    drop(guard);
}

#[test]
fn edge_case_tree_round_trips_through_the_kernel() {
    if !can_mount() || !require(common::have("fsck.erofs"), "fsck.erofs missing (apt-get install erofs-utils)") {
        return;
    }
    let src = tempfile::tempdir_in("/var/tmp").unwrap();
    edge::make_edge_tree(src.path());
    round_trip(src.path(), true, &["sparse/big", "sparse/empty-10M", "sparse/unaligned"]);

    // Holes stay holes: a 1 GiB sparse file with 16 KiB of data must not make a large image.
    let work = tempfile::tempdir_in("/var/tmp").unwrap();
    let image = work.path().join("img.erofs");
    mkfs(src.path(), &image, None);
    let size = std::fs::metadata(&image).unwrap().len();
    assert!(size < 64 << 20, "inline image is {size} bytes: holes of sparse files were stored as data");
}

#[test]
fn debian_rootfs_round_trips_through_the_kernel() {
    if !can_mount()
        || !require(common::have("debootstrap"), "debootstrap missing")
        || !require(common::have("fsck.erofs"), "fsck.erofs missing (apt-get install erofs-utils)")
    {
        return;
    }
    let rootfs = common::debian_rootfs();
    round_trip(&rootfs, false, &[]);
}
