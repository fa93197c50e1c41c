//! Kernel mounts: EROFS file-backed mounts through the new mount API (fsopen/fsconfig/fsmount), which
//! takes one `device=` per object without util-linux inserting loop devices (docs/kernel.md G.2, G.6).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rustix::fd::OwnedFd;
use rustix::mount::{
    fsconfig_create, fsconfig_set_flag, fsconfig_set_string, fsmount, fsopen, move_mount, unmount, FsMountFlags,
    FsOpenFlags, MountAttrFlags, MoveMountFlags, UnmountFlags,
};

/// Mounts the EROFS image file `image` read-only on `target`, with `devices` as its extra devices in
/// device-table order (the object files the image's chunk indexes point into).
///
/// `direct_io` asks EROFS to read its backing files with direct I/O (mount option `directio`, 6.13+;
/// silently left out on a kernel without it). Lazy mounts need it: a file opened while it carries a
/// pre-content mark keeps readahead off for as long as it stays open (mm/readahead.c skips files in
/// FMODE_FSNOTIFY_HSM mode), and EROFS opens every `device=` at mount time, before the objects are
/// filled. Buffered reads of such a file go one 4 KiB page per synchronous I/O, even after the mark
/// is gone; direct I/O reads each EROFS request (its own readahead window) in one go, and does not
/// cache the pages a second time under the object file.
pub fn mount_erofs_file(image: &Path, target: &Path, devices: &[PathBuf], direct_io: bool) -> Result<()> {
    let fs = fsopen("erofs", FsOpenFlags::FSOPEN_CLOEXEC)
        .context("fsopen(erofs): is the erofs module available (CONFIG_EROFS_FS)?")?;
    configure(&fs, image, devices, direct_io)
        .with_context(|| format!("configuring the EROFS mount of {}", image.display()))?;
    let mnt = fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, MountAttrFlags::MOUNT_ATTR_RDONLY)
        .with_context(|| format!("fsmount of {}", image.display()))?;
    move_mount(&mnt, "", rustix::fs::CWD, target, MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH)
        .with_context(|| format!("move_mount to {}", target.display()))?;
    Ok(())
}

fn configure(fs: &OwnedFd, image: &Path, devices: &[PathBuf], direct_io: bool) -> Result<()> {
    fsconfig_set_string(fs, "source", image)
        .context("source: file-backed EROFS needs CONFIG_EROFS_FS_BACKED_BY_FILE (6.12+)")?;
    if direct_io {
        // An unknown parameter fails only this call; the context stays usable.
        if let Err(e) = fsconfig_set_flag(fs, "directio") {
            tracing::debug!(error = %e, "EROFS without the directio mount option; backing files read buffered");
        }
    }
    for (i, dev) in devices.iter().enumerate() {
        fsconfig_set_string(fs, "device", dev.as_path())
            .with_context(|| format!("device #{} {}", i + 1, dev.display()))?;
    }
    fsconfig_set_flag(fs, "ro").context("ro")?;
    fsconfig_create(fs).context("creating the superblock (see dmesg for the kernel's reason)")?;
    Ok(())
}

/// Mounts EROFS over fscache (cachefiles on-demand): the primary blob is the cache object `fsid`, its
/// devices the objects named by the device-table tags, all in the fscache domain `domain_id` (so an
/// object shared by several images is one cache file). Blocks until the daemon has answered the
/// primary's OPEN and the superblock READs, so it must not run on the thread serving /dev/cachefiles.
pub fn mount_erofs_fscache(fsid: &str, domain_id: &str, target: &Path) -> Result<()> {
    let fs = fsopen("erofs", FsOpenFlags::FSOPEN_CLOEXEC)
        .context("fsopen(erofs): is the erofs module available (CONFIG_EROFS_FS)?")?;
    fsconfig_set_string(&fs, "source", "wisp").context("source")?;
    fsconfig_set_string(&fs, "fsid", fsid).map_err(|e| {
        anyhow::anyhow!(
            "fsid={fsid}: {e}: the kernel's EROFS has no fscache mode (CONFIG_EROFS_FS_ONDEMAND is not set)"
        )
    })?;
    fsconfig_set_string(&fs, "domain_id", domain_id).with_context(|| format!("domain_id={domain_id}"))?;
    fsconfig_set_flag(&fs, "ro").context("ro")?;
    fsconfig_create(&fs).with_context(|| {
        format!(
            "creating the EROFS superblock of fsid={fsid},domain_id={domain_id} (see dmesg for the kernel's reason)"
        )
    })?;
    let mnt = fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, MountAttrFlags::MOUNT_ATTR_RDONLY)
        .with_context(|| format!("fsmount of fsid={fsid}"))?;
    move_mount(&mnt, "", rustix::fs::CWD, target, MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH)
        .with_context(|| format!("move_mount to {}", target.display()))?;
    Ok(())
}

/// Unmounts `target`.
pub fn umount(target: &Path) -> Result<()> {
    unmount(target, UnmountFlags::empty()).with_context(|| format!("umount {}", target.display()))
}
