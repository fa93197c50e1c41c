//! Kernel mounts: EROFS file-backed mounts through the new mount API (fsopen/fsconfig/fsmount), which
//! takes one `device=` per object without util-linux inserting loop devices (KERNEL.md G.2, G.6).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rustix::fd::OwnedFd;
use rustix::mount::{
    fsconfig_create, fsconfig_set_flag, fsconfig_set_string, fsmount, fsopen, move_mount, unmount, FsMountFlags,
    FsOpenFlags, MountAttrFlags, MoveMountFlags, UnmountFlags,
};

/// Mounts the EROFS image file `image` read-only on `target`, with `devices` as its extra devices in
/// device-table order (the object files the image's chunk indexes point into).
pub fn mount_erofs_file(image: &Path, target: &Path, devices: &[PathBuf]) -> Result<()> {
    let fs = fsopen("erofs", FsOpenFlags::FSOPEN_CLOEXEC)
        .context("fsopen(erofs): is the erofs module available (CONFIG_EROFS_FS)?")?;
    configure(&fs, image, devices).with_context(|| format!("configuring the EROFS mount of {}", image.display()))?;
    let mnt = fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, MountAttrFlags::MOUNT_ATTR_RDONLY)
        .with_context(|| format!("fsmount of {}", image.display()))?;
    move_mount(&mnt, "", rustix::fs::CWD, target, MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH)
        .with_context(|| format!("move_mount to {}", target.display()))?;
    Ok(())
}

fn configure(fs: &OwnedFd, image: &Path, devices: &[PathBuf]) -> Result<()> {
    fsconfig_set_string(fs, "source", image)
        .context("source: file-backed EROFS needs CONFIG_EROFS_FS_BACKED_BY_FILE (6.12+)")?;
    for (i, dev) in devices.iter().enumerate() {
        fsconfig_set_string(fs, "device", dev.as_path())
            .with_context(|| format!("device #{} {}", i + 1, dev.display()))?;
    }
    fsconfig_set_flag(fs, "ro").context("ro")?;
    fsconfig_create(fs).context("creating the superblock (see dmesg for the kernel's reason)")?;
    Ok(())
}

/// Unmounts `target`.
pub fn umount(target: &Path) -> Result<()> {
    unmount(target, UnmountFlags::empty()).with_context(|| format!("umount {}", target.display()))
}
