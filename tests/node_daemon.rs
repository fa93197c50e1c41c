//! The node daemon as the node's other users and its many pods see it.
//!
//! Many starts of one image at once (issue 20, "Many starts at once"): 32 `wisp mount` requests of
//! the python image at the same moment on an empty node cache, with the objects in a local `dir:`
//! store, as a new user would try it. Every mount must be made, every file read through every mount
//! must equal the image unpacked by `umoci` (an independent reader), and every object must have been
//! downloaded at most once whatever the number of mounts that needed it.
//!
//! Before the fix, the worker's concurrent requests created an object file under one shared temporary
//! name (`.<sha256>.new-<pid>`) and broke each other's rename: 30 of 32 mounts failed.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::collections::HashMap;
use std::fs;
use std::path::PathBuf;
use std::process::Command;

use common::daemon::{require_fanotify, Daemon};
use common::{corpus_oci, have, is_root, require, run, wisp_bin};

const MOUNTS: usize = 32;

/// Files every mount reads (the python start reads these first), compared with the umoci tree.
const READS: &[&str] = &["usr/bin/python3.11", "usr/lib/python3.11/json/__init__.py", "app/main.py", "etc/passwd"];

fn can_run() -> bool {
    if !require(is_root(), "needs root (mounts, fanotify)") {
        return false;
    }
    require_fanotify() && ["skopeo", "umoci"].iter().all(|t| require(have(t), &format!("needs {t} (scripts/setup)")))
}

#[test]
fn many_mounts_of_one_image_at_once_on_an_empty_cache() {
    if !can_run() {
        return;
    }
    let tmp = PathBuf::from(format!("/var/tmp/wisp-concurrent-test-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).unwrap();
    let oci = corpus_oci(&["python"]);
    let src = format!("oci:{}:v1", oci.join("python").display());
    let index = format!("oci:{}:v1", tmp.join("index").display());
    let store = format!("dir:{}", tmp.join("store").display());
    run(Command::new(wisp_bin()).args(["convert", &src, &index, "--store", &store, "--json"]));

    // The oracle: the source image unpacked by umoci (gzip layers, which umoci reads).
    let bundle = tmp.join("umoci");
    run(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(oci.join("python").display().to_string() + ":v1")
        .arg(&bundle));
    let oracle: HashMap<&str, Vec<u8>> =
        READS.iter().map(|r| (*r, fs::read(bundle.join("rootfs").join(r)).unwrap())).collect();

    let mut d = Daemon::start(&tmp, &[]);
    let dirs: Vec<PathBuf> = (0..MOUNTS).map(|i| tmp.join(format!("mnt{i}"))).collect();
    let results: Vec<(PathBuf, std::process::Output)> = std::thread::scope(|s| {
        let handles: Vec<_> = dirs
            .iter()
            .map(|dir| {
                let (index, store, state) = (&index, &store, &d.state);
                s.spawn(move || {
                    fs::create_dir_all(dir).unwrap();
                    let out = Command::new(wisp_bin())
                        .args(["mount", index.as_str()])
                        .arg(dir)
                        .args(["--store", store.as_str(), "--state"])
                        .arg(state)
                        .output()
                        .unwrap();
                    (dir.clone(), out)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut failed = Vec::new();
    for (dir, out) in &results {
        if out.status.success() {
            d.mounts.push(dir.clone());
        } else {
            failed.push(format!("{}: {}", dir.display(), String::from_utf8_lossy(&out.stderr).trim()));
        }
    }
    assert!(failed.is_empty(), "{} of {MOUNTS} mounts failed: {:#?}", failed.len(), &failed[..failed.len().min(5)]);

    // Every mount reads the same files at once, and gets the image's bytes.
    let wrong: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = dirs
            .iter()
            .map(|dir| {
                let oracle = &oracle;
                s.spawn(move || {
                    let mut bad = Vec::new();
                    for r in READS {
                        match fs::read(dir.join(r)) {
                            Ok(b) if b == oracle[r] => {}
                            Ok(b) => bad.push(format!(
                                "{}/{r}: wrong bytes ({} of {})",
                                dir.display(),
                                b.len(),
                                oracle[r].len()
                            )),
                            Err(e) => bad.push(format!("{}/{r}: {e}", dir.display())),
                        }
                    }
                    bad
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    assert!(wrong.is_empty(), "{wrong:#?}");

    // Each object was downloaded once: the images' fetch counts add up to the objects filled, which
    // the node cache holds complete (the other mounts joined those downloads or found them done).
    let stats: serde_json::Value =
        serde_json::from_str(&run(Command::new(wisp_bin()).args(["stats", "--json", "--state"]).arg(&d.state)))
            .unwrap();
    let images = stats["images"].as_array().unwrap();
    assert_eq!(images.len(), MOUNTS, "{stats}");
    let fetched: u64 = images.iter().map(|i| i["objects_fetched"].as_u64().unwrap()).sum();
    let failures: u64 = images.iter().map(|i| i["failures"].as_u64().unwrap()).sum();
    let filled = images.iter().map(|i| i["objects_fetched"].as_u64().unwrap() + i["shared"].as_u64().unwrap()).max();
    eprintln!("{MOUNTS} mounts: {fetched} objects fetched in all, {failures} failures; stats of one: {}", images[0]);
    assert_eq!(failures, 0, "{stats}");
    assert!(
        fetched >= 1 && fetched <= READS.len() as u64,
        "{fetched} downloads for {} distinct files: {stats}",
        READS.len()
    );
    assert!(filled.unwrap() >= 1);
    drop(d);
    let _ = fs::remove_dir_all(&tmp);
}

/// `cmd` run as `nobody` (uid and gid 65534, no supplementary groups).
fn as_nobody(cmd: &str) -> std::process::Output {
    common::as_nobody().args(["sh", "-c", cmd]).output().unwrap()
}

/// Issue 16: the state and cache roots were created with the umask (0755), so any local user could
/// read index images and object files and run an image's setuid-root programs under the lower mount
/// `STATE/mounts/<id>/lower`. They are 0700 now, and an unprivileged user reaches nothing below them
/// (checked by the kernel, as that user, with coreutils).
#[test]
fn state_and_cache_are_root_only() {
    if !can_run() || !require(have("setpriv"), "needs setpriv (util-linux)") {
        return;
    }
    let tmp = PathBuf::from(format!("/var/tmp/wisp-perm-test-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).unwrap();
    // The test's own scratch directory is open to nobody; only wisp's roots may close paths.
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)).unwrap();
    let oci = corpus_oci(&["python"]);
    let src = format!("oci:{}:v1", oci.join("python").display());
    let index = format!("oci:{}:v1", tmp.join("index").display());
    let store = format!("dir:{}", tmp.join("store").display());
    run(Command::new(wisp_bin()).args(["convert", &src, &index, "--store", &store]));
    // A node upgraded from a release that made the roots with the umask.
    for d in ["state", "cache"] {
        fs::create_dir_all(tmp.join(d)).unwrap();
        fs::set_permissions(tmp.join(d), fs::Permissions::from_mode(0o755)).unwrap();
    }
    let mut d = Daemon::start(&tmp, &[]);
    let mnt = tmp.join("mnt");
    d.mount(&index, &mnt, &["--store", &store]);
    // Fill one object so that the cache holds a complete one.
    assert!(!fs::read(mnt.join("usr/bin/passwd")).unwrap().is_empty());

    for root in ["state", "cache"] {
        let mode = fs::metadata(tmp.join(root)).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o700, "{root} is {mode:o}");
    }
    let mut lower = None;
    for e in fs::read_dir(d.state.join("mounts")).unwrap() {
        let p = e.unwrap().path().join("lower");
        if p.join("usr/bin/passwd").exists() {
            lower = Some(p);
        }
    }
    let lower = lower.expect("a lower mount with usr/bin/passwd");
    let passwd = lower.join("usr/bin/passwd");
    assert!(fs::metadata(&passwd).unwrap().permissions().mode() & 0o4000 != 0, "passwd is setuid in the image");
    let object = fs::read_dir(tmp.join("cache/objects")).unwrap().flatten().find_map(|e| {
        fs::read_dir(e.path())
            .ok()?
            .flatten()
            .map(|f| f.path())
            .find(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
    });
    let object = object.expect("an object file");
    let index_file = fs::read_dir(d.state.join("images")).unwrap().next().unwrap().unwrap().path().join("index.erofs");
    assert!(index_file.is_file());
    for (what, cmd) in [
        ("list the state directory", format!("ls {}", d.state.display())),
        ("read an index image", format!("cat {} >/dev/null", index_file.display())),
        ("read an object file", format!("cat {} >/dev/null", object.display())),
        ("stat a setuid program of a lower mount", format!("stat {}", passwd.display())),
        ("run a setuid program of a lower mount", format!("{} --version", passwd.display())),
    ] {
        let out = as_nobody(&cmd);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "nobody could {what}: `{cmd}` succeeded");
        assert!(err.contains("Permission denied"), "{what}: `{cmd}` failed for another reason: {err}");
    }
    // Paths the overlay options cannot carry are refused before anything is made: `,` would end the
    // option (here smuggling a second lowerdir into the data), `:` separates lower layers.
    for bad in ["mnt,lowerdir=/etc", "mnt:etc"] {
        let dir = tmp.join(bad);
        let out = Command::new(wisp_bin())
            .args(["mount", &index])
            .arg(&dir)
            .args(["--store", &store, "--state"])
            .arg(&d.state)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "a mount at {} was made", dir.display());
        assert!(err.contains("overlayfs mount options cannot carry"), "{err}");
        assert!(!dir.exists(), "{} was created", dir.display());
    }
    // The container's root itself stays usable: it is the mount point the client chose.
    let out = as_nobody(&format!("cat {}/etc/os-release", mnt.display()));
    assert!(out.status.success(), "the mounted root should be readable: {}", String::from_utf8_lossy(&out.stderr));
    drop(d);
    let _ = fs::remove_dir_all(&tmp);
}
