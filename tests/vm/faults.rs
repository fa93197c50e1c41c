//! Fault scenarios and concurrent mounts (issue 6): tampered objects, a stopped or hung registry, two
//! containers of one image beside its sibling.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use erofs::tree::{Digest, FileData};

use crate::common;
use crate::guest::*;
use crate::harness::{in_vm_env, sha256, vm_tests_enabled, WAIT};

/// Host side: [`PythonFixture`] with the sibling python:v2 converted into the same registry storage
/// (objects v1 already has are not uploaded again).
fn python_fixture_with_sibling(port: &str) -> PythonFixture {
    let fx = PythonFixture::build(port, false);
    let port: u16 = port.parse().unwrap();
    common::registry::start(port, &fx.dir.join("registry"));
    let oci = common::corpus_oci(&[]).display().to_string();
    let result = std::panic::catch_unwind(|| {
        common::run(Command::new(common::wisp_bin()).args([
            "convert",
            &format!("oci:{oci}/python:v2"),
            &format!("docker://127.0.0.1:{port}/wisp/python:v2"),
            "--plain-http",
        ]));
    });
    common::registry::stop(port);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
    fx
}

/// The object map of a pulled image (`STATE/images/<id>/objects.map`), by content digest.
fn image_objects(d: &GuestDaemon, id: &str) -> HashMap<Digest, wisp::object::ObjectEntry> {
    let bytes = std::fs::read(d.state.join("images").join(id).join("objects.map")).unwrap();
    wisp::index::objmap::decode(&bytes).unwrap().into_iter().map(|e| (e.digest, e)).collect()
}

/// Every regular file of a pulled image whose data is an external object: (path relative to the root,
/// content digest, size), in path order.
fn image_files(d: &GuestDaemon, id: &str) -> Vec<(String, Digest, u64)> {
    let bytes = std::fs::read(d.state.join("images").join(id).join("index.erofs")).unwrap();
    let tree = erofs::reader::Image::open(&bytes[..]).unwrap().read_tree().unwrap();
    let mut files: Vec<(String, Digest, u64)> = wisp::index::regular_files(&tree)
        .into_iter()
        .filter_map(|(p, data)| match data {
            FileData::External { size, digest } => {
                Some((String::from_utf8_lossy(&p).trim_start_matches('/').to_owned(), *digest, *size))
            }
            _ => None,
        })
        .collect();
    files.sort();
    files
}

/// The daemon's record of the mount at `dir` (from its status: id, image, fsid, lower, ...).
fn mounted_image(d: &GuestDaemon, dir: &Path) -> serde_json::Value {
    let status = d.call(&wisp::daemon::protocol::Request::Status);
    status["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["dir"].as_str() == dir.to_str())
        .unwrap_or_else(|| panic!("no mount at {} in {status}", dir.display()))
        .clone()
}

/// The stats entry of the mount whose mount id (`status` mounts' `id`) is `id`.
fn mount_stats(d: &GuestDaemon, id: &str) -> serde_json::Value {
    let stats: serde_json::Value = serde_json::from_str(&d.wisp(&["stats", "--json"])).unwrap();
    stats["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["image"].as_str() == Some(id))
        .unwrap_or_else(|| panic!("no stats for mount {id}: {stats}"))
        .clone()
}

/// Reads `path` on a thread; panics if the read has not returned within `limit` (a hang), else
/// returns its result and how long it took.
fn read_within(path: &Path, limit: Duration) -> (io::Result<Vec<u8>>, Duration) {
    let p = path.to_owned();
    let t = Instant::now();
    let h = std::thread::spawn(move || std::fs::read(p));
    while !h.is_finished() {
        assert!(t.elapsed() < limit, "reading {} did not return within {limit:?}: hung", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
    (h.join().unwrap(), t.elapsed())
}

/// The cachefiles cache file of the object `hex` (`D` + the cookie key, the sha256 hex). The kernel
/// creates a new cache file as an unlinked tmpfile and links it into the cache directory only when the
/// object is withdrawn (the last umount using it), so look after an umount.
fn cache_file_of(hex: &str) -> PathBuf {
    fn walk(dir: &Path, hex: &str, seen: &mut Vec<PathBuf>) -> Option<PathBuf> {
        for e in std::fs::read_dir(dir).ok()?.flatten() {
            let p = e.path();
            if e.file_type().ok()?.is_dir() {
                if let Some(f) = walk(&p, hex, seen) {
                    return Some(f);
                }
            } else if e.file_name().to_string_lossy().ends_with(hex) {
                return Some(p);
            } else if seen.len() < 10 {
                seen.push(p);
            }
        }
        None
    }
    // The withdrawal is asynchronous (fscache's work queue): wait for the link.
    let t = Instant::now();
    loop {
        let mut seen = Vec::new();
        match walk(Path::new("/scratch/cache/cachefiles"), hex, &mut seen) {
            Some(f) => return f,
            None if t.elapsed() < Duration::from_secs(60) => std::thread::sleep(Duration::from_millis(500)),
            None => panic!("no cache file for object {hex} under /scratch/cache/cachefiles; some files: {seen:#?}"),
        }
    }
}

/// Whether the cache file holds any data (SEEK_DATA from 0 finds some).
fn cache_file_has_data(path: &Path) -> bool {
    let f = std::fs::File::open(path).unwrap();
    match nix::unistd::lseek(std::os::fd::AsRawFd::as_raw_fd(&f), 0, nix::unistd::Whence::SeekData) {
        Ok(_) => true,
        Err(nix::errno::Errno::ENXIO) => false,
        Err(e) => panic!("SEEK_DATA on {}: {e}", path.display()),
    }
}

fn drop_caches() {
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
}

/// The registry storage path of blob `hex` (docker-registry's filesystem driver).
fn registry_blob(hex: &str) -> PathBuf {
    PathBuf::from(format!("/scratch/registry/docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2]))
}

/// A tampered object in the registry (bytes changed, same length, name kept), once stored zstd-compressed
/// and once stored raw (blob digest = content digest): reading its file through `wisp mount` fails with
/// EIO, never with wrong bytes, also after drop_caches; the kernel's cache file gets no data, the stats
/// count a failure and no fetch, the daemon log names the object; once the blob is restored the same read
/// returns the right bytes (sha256 = the object's digest) and the cache file holds them.
#[test]
fn daemon_cachefiles_tampered_object_eio() {
    let fixture = vm_tests_enabled().then(|| PythonFixture::build("5150", false));
    let env = fixture_env(fixture.as_ref());
    if !in_vm_env(test_name!(), &env) {
        return;
    }
    let t0 = Instant::now();
    guest_registry(&guest_fixture());
    let d = GuestDaemon::start(&["--frontend", "cachefiles"], &[]);
    let dir = Path::new("/scratch/c1");
    let mnt = d.mount("docker://127.0.0.1:5000/wisp/python:v1", dir);
    let rec = mounted_image(&d, &mnt);
    let (image, key) = (rec["image"].as_str().unwrap().to_owned(), rec["id"].as_str().unwrap().to_owned());
    let objects = image_objects(&d, &image);
    let files = image_files(&d, &image);
    use wisp::object::Compression;
    let pick = |want: Compression| {
        files
            .iter()
            .find(|(p, digest, size)| {
                let e = &objects[digest];
                e.compression == want && p.starts_with("usr/") && *size >= 64 && *size <= 256 << 10
            })
            .cloned()
            .unwrap_or_else(|| panic!("no {want:?} object of 64 B..256 KiB under /usr"))
    };
    let targets = [pick(Compression::Zstd), pick(Compression::None)];
    let before = mount_stats(&d, &key);

    // Tamper: flip bytes in the middle of each blob, same length, same name.
    let mut originals = Vec::new();
    for (path, digest, size) in &targets {
        let e = &objects[digest];
        let blob = registry_blob(&hex::encode(e.blob));
        let good = std::fs::read(&blob).unwrap();
        assert_eq!(u64::try_from(good.len()).unwrap(), e.stored_size);
        let mut bad = good.clone();
        let mid = bad.len() / 2;
        for b in &mut bad[mid..(mid + 8).min(good.len())] {
            *b ^= 0x5a;
        }
        std::fs::write(&blob, &bad).unwrap();
        assert_eq!(std::fs::metadata(&blob).unwrap().len(), e.stored_size);
        println!(
            "tampered {path}: object {} ({size} B, {:?}, blob {} of {} B)",
            hex::encode(digest),
            e.compression,
            hex::encode(e.blob),
            e.stored_size
        );
        originals.push((blob, good));
    }

    for pass in ["cold", "after drop_caches"] {
        for (path, digest, _) in &targets {
            let (r, took) = read_within(&mnt.join(path), WAIT);
            match r {
                Err(e) => {
                    println!("{pass}: {path}: {e} after {:.2}s", took.as_secs_f64());
                    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{path}: {e}");
                }
                Ok(b) => panic!(
                    "{pass}: {path} read {} bytes from a tampered object ({})",
                    b.len(),
                    if sha256(&b) == *digest { "right bytes?!" } else { "WRONG bytes" }
                ),
            }
        }
        drop_caches();
    }
    let log = daemon_log();
    for (path, digest, _) in &targets {
        let hex = hex::encode(digest);
        let lines: Vec<&str> = log.lines().filter(|l| l.contains(&hex)).collect();
        assert!(!lines.is_empty(), "the daemon log does not name {hex} ({path}):\n{log}");
        println!("daemon log on {hex}:\n  {}", lines.join("\n  "));
    }
    let after = mount_stats(&d, &key);
    println!("stats before: {before}\nstats after the failed reads: {after}");
    assert_eq!(after["objects_fetched"], before["objects_fetched"], "a tampered object was counted as fetched");
    // Each of the 4 reads reached the daemon (the one after drop_caches too: no cached data answered it).
    assert!(after["failures"].as_u64().unwrap() >= before["failures"].as_u64().unwrap() + 4, "{after}");

    // Nothing entered the cache: umount (the kernel links its new cache files into the cache directory
    // when the objects are withdrawn) and look at the tampered objects' files.
    d.wisp(&["umount", mnt.to_str().unwrap()]);
    for (path, digest, _) in &targets {
        let f = cache_file_of(&hex::encode(digest));
        println!("{path}: cache file {} ({} B), no data", f.display(), file_len(&f));
        assert!(!cache_file_has_data(&f), "{path}: the cache file {} holds data of a tampered object", f.display());
    }
    let mnt = d.mount("docker://127.0.0.1:5000/wisp/python:v1", dir);
    let before = mount_stats(&d, &key);
    for (path, _, _) in &targets {
        let (r, _) = read_within(&mnt.join(path), WAIT);
        assert_eq!(r.map(|b| b.len()).map_err(|e| e.raw_os_error()), Err(Some(libc::EIO)), "{path} after the remount");
    }

    // The store fixed: the same reads return the right bytes, and the cache now holds them.
    for (blob, good) in &originals {
        std::fs::write(blob, good).unwrap();
    }
    // Past the fetcher's hold of a failure, as a reader retrying later would be.
    std::thread::sleep(wisp::daemon::fetcher::FAILURE_HOLD + Duration::from_secs(1));
    for pass in ["restored", "restored, after drop_caches"] {
        for (path, digest, size) in &targets {
            let (r, took) = read_within(&mnt.join(path), WAIT);
            let b = r.unwrap_or_else(|e| panic!("{pass}: {path}: {e}"));
            assert_eq!(u64::try_from(b.len()).unwrap(), *size, "{pass}: {path}");
            assert!(sha256(&b) == *digest, "{pass}: {path}: wrong bytes");
            println!("{pass}: {path}: {} B, right bytes, {:.2}s", b.len(), took.as_secs_f64());
        }
        drop_caches();
    }
    let fixed = mount_stats(&d, &key);
    assert_eq!(
        fixed["objects_fetched"].as_u64().unwrap(),
        before["objects_fetched"].as_u64().unwrap() + 2,
        "after the fix each object is fetched once: {fixed}"
    );
    d.wisp(&["umount", mnt.to_str().unwrap()]);
    for (path, digest, _) in &targets {
        assert!(cache_file_has_data(&cache_file_of(&hex::encode(digest))), "{path}: the cache file got no data");
    }
    println!("guest time: {:.1}s", t0.elapsed().as_secs_f64());
    drop(fixture);
}

/// The registry stopped mid-start (after the mount and a first file): reads of files not fetched yet fail
/// with EIO instead of hanging, with the registry gone (connection refused) and with the registry hung
/// (SIGSTOP: connections accepted, never answered, so only the daemon's `--fetch-deadline 5` ends them);
/// the daemon survives (the same worker answers Status; fetched files still read from the cache); once
/// the registry is back the same paths read equal to the eager pull.
#[test]
fn daemon_cachefiles_registry_stopped_eio() {
    let fixture = vm_tests_enabled().then(|| PythonFixture::build("5151", true));
    let env = fixture_env(fixture.as_ref());
    if !in_vm_env(test_name!(), &env) {
        return;
    }
    let t0 = Instant::now();
    let fx = guest_fixture();
    let oracle = fx.join("oracle-v1");
    guest_registry(&fx);
    let deadline = Duration::from_secs(5);
    let d = GuestDaemon::start(&["--frontend", "cachefiles", "--fetch-deadline", "5"], &[]);
    let mnt = d.mount("docker://127.0.0.1:5000/wisp/python:v1", Path::new("/scratch/c1"));
    let worker = d.call(&wisp::daemon::protocol::Request::Status)["worker_pid"].clone();
    let registry = |args: &[&str]| common::run(Command::new(common::repo_root().join("scripts/registry")).args(args));

    // The start is under way: one file fetched.
    let first = "usr/lib/python3.11/json/__init__.py";
    let (r, _) = read_within(&mnt.join(first), WAIT);
    assert!(r.unwrap() == std::fs::read(oracle.join(first)).unwrap(), "{first}");

    registry(&["stop"]);
    let gone = ["usr/lib/python3.11/json/decoder.py", "usr/lib/python3.11/email/parser.py"];
    let hung = ["usr/lib/python3.11/json/encoder.py", "usr/lib/python3.11/email/utils.py"];
    let expect_eio = |what: &str, paths: &[&str]| {
        for p in paths {
            let (r, took) = read_within(&mnt.join(p), 3 * deadline);
            match r {
                Err(e) => {
                    println!("{what}: {p}: {e} after {:.2}s (deadline {deadline:?})", took.as_secs_f64());
                    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{what}: {p}: {e}");
                }
                Ok(b) => panic!("{what}: {p} read {} bytes with no registry", b.len()),
            }
        }
    };
    expect_eio("registry stopped", &gone);
    let status = d.call(&wisp::daemon::protocol::Request::Status);
    assert_eq!(status["worker_pid"], worker, "the worker must survive: {status}");
    drop_caches();
    let (r, _) = read_within(&mnt.join(first), WAIT);
    assert!(r.unwrap() == std::fs::read(oracle.join(first)).unwrap(), "{first} from the cache, no registry");

    // A hung registry: only the fetch deadline ends the reads.
    registry(&["start", "--root", "/scratch/registry"]);
    let pid: i32 = std::fs::read_to_string("/tmp/wisp-registry/5000/registry.pid").unwrap().trim().parse().unwrap();
    let pid = nix::unistd::Pid::from_raw(pid);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    expect_eio("registry hung (SIGSTOP)", &hung);
    let status = d.call(&wisp::daemon::protocol::Request::Status);
    assert_eq!(status["worker_pid"], worker, "the worker must survive: {status}");
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    // Past the fetcher's hold of a failure (the kernel's immediate second READ gets the same EIO).
    std::thread::sleep(wisp::daemon::fetcher::FAILURE_HOLD + Duration::from_secs(1));

    // The registry back: the same paths read correctly.
    for p in gone.iter().chain(&hung) {
        let (r, took) = read_within(&mnt.join(p), WAIT);
        let b = r.unwrap_or_else(|e| panic!("registry back: {p}: {e}"));
        assert!(b == std::fs::read(oracle.join(p)).unwrap(), "registry back: {p}: differs from the eager pull");
        println!("registry back: {p}: {} B equal to the eager pull, {:.2}s", b.len(), took.as_secs_f64());
    }
    drop_caches();
    for p in gone.iter().chain(&hung).chain([&first]) {
        assert!(std::fs::read(mnt.join(p)).unwrap() == std::fs::read(oracle.join(p)).unwrap(), "{p} after drop_caches");
    }
    let stats: serde_json::Value = serde_json::from_str(&d.wisp(&["stats", "--json"])).unwrap();
    println!("stats: {}", stats["images"][0]);
    d.wisp(&["umount", mnt.to_str().unwrap()]);
    println!("guest time: {:.1}s", t0.elapsed().as_secs_f64());
    drop(fixture);
}

/// Two containers of python:v1 (the second mount of an image gets the fsid `<id>.1`) and one of its
/// sibling python:v2, all mounted at once in the one fscache domain: `python3 -c 'import json, email'`
/// runs in the three concurrently and prints 1 in each; a write in each container lands in its own upper
/// dir only; the registry's log shows no object blob fetched twice, and v2 is charged only for objects
/// v1 lacks; reads of the same files in the three lowers give the bytes of the index; all three unmount
/// cleanly.
#[test]
fn daemon_cachefiles_two_containers_and_sibling() {
    let fixture = vm_tests_enabled().then(|| python_fixture_with_sibling("5152"));
    let env = fixture_env(fixture.as_ref());
    if !in_vm_env(test_name!(), &env) {
        return;
    }
    let t0 = Instant::now();
    let log = guest_registry(&guest_fixture());
    let d = GuestDaemon::start(&["--frontend", "cachefiles"], &[]);
    let off = file_len(&log);
    let (v1, v2) = ("docker://127.0.0.1:5000/wisp/python:v1", "docker://127.0.0.1:5000/wisp/python:v2");
    let containers = [("a", v1), ("b", v1), ("c", v2)];
    let mut mnts = Vec::new();
    for (name, image) in containers {
        let t = Instant::now();
        mnts.push(d.mount(image, &Path::new("/scratch").join(name)));
        println!("mounted {image} as {name} in {:.1}s", t.elapsed().as_secs_f64());
    }
    let recs: Vec<serde_json::Value> = mnts.iter().map(|m| mounted_image(&d, m)).collect();
    let field = |i: usize, k: &str| recs[i][k].as_str().unwrap().to_owned();
    let (v1_id, v2_id) = (field(0, "image"), field(2, "image"));
    assert_eq!(field(1, "image"), v1_id);
    assert_ne!(v1_id, v2_id);
    assert_eq!(field(0, "fsid"), v1_id, "{recs:?}");
    assert_eq!(field(1, "fsid"), format!("{v1_id}.1"), "the second mount of an image: {recs:?}");
    assert_eq!(field(2, "fsid"), v2_id, "{recs:?}");
    let (o1, o2) = (image_objects(&d, &v1_id), image_objects(&d, &v2_id));
    let v2_only: BTreeSet<String> = o2
        .values()
        .filter(|e| !o1.contains_key(&e.digest))
        .map(|e| format!("sha256:{}", hex::encode(e.blob)))
        .collect();
    let object_blobs: BTreeSet<String> =
        o1.values().chain(o2.values()).map(|e| format!("sha256:{}", hex::encode(e.blob))).collect();
    println!("v1: {} objects; v2: {} objects, {} of them not in v1", o1.len(), o2.len(), v2_only.len());

    // The three start at once.
    let t = Instant::now();
    let runs: Vec<_> = mnts
        .iter()
        .map(|m| {
            let m = m.clone();
            std::thread::spawn(move || chroot(&m, "python3 -c 'import json, email; print(1)'"))
        })
        .collect();
    for (run, (name, _)) in runs.into_iter().zip(containers) {
        assert_eq!(run.join().unwrap(), "1\n", "container {name}");
    }
    println!("three concurrent starts: {:.1}s", t.elapsed().as_secs_f64());

    // Writes stay in their own container.
    for (m, (name, _)) in mnts.iter().zip(containers) {
        chroot(m, &format!("echo {name} > /root/wisp-{name} && echo '# {name}' >> /app/main.py"));
    }
    for (i, (m, (name, _))) in mnts.iter().zip(containers).enumerate() {
        let upper = Path::new("/scratch").join(name).join("upper");
        assert_eq!(std::fs::read_to_string(upper.join(format!("root/wisp-{name}"))).unwrap(), format!("{name}\n"));
        let main = std::fs::read_to_string(m.join("app/main.py")).unwrap();
        assert!(main.ends_with(&format!("# {name}\n")), "{name}: {main}");
        for (other, _) in containers.iter().enumerate().filter(|&(j, _)| j != i).map(|(_, c)| c) {
            assert!(!m.join(format!("root/wisp-{other}")).exists(), "{other}'s write is visible in {name}");
            assert!(!upper.join(format!("root/wisp-{other}")).exists(), "{other}'s write is in {name}'s upper");
            assert!(!main.contains(&format!("# {other}\n")), "{other}'s append is in {name}'s main.py");
        }
    }

    // The same files in the three containers: the index's bytes, fetched once on the node.
    let files1 = image_files(&d, &v1_id);
    let files2 = image_files(&d, &v2_id);
    let json: Vec<&(String, Digest, u64)> =
        files1.iter().filter(|(p, _, _)| p.starts_with("usr/lib/python3.11/json/")).collect();
    let yaml: Vec<&(String, Digest, u64)> =
        files2.iter().filter(|(p, _, _)| p.starts_with("usr/lib/python3/dist-packages/yaml/")).collect();
    assert!(!json.is_empty() && !yaml.is_empty(), "json {} files, yaml {} files", json.len(), yaml.len());
    let before_yaml = file_len(&log);
    // Through each mount's EROFS lower: python may have rewritten a .pyc into the container's upper dir.
    let lowers: Vec<PathBuf> = recs.iter().map(|r| PathBuf::from(r["lower"].as_str().unwrap())).collect();
    for (m, files) in [(&lowers[0], &json), (&lowers[1], &json), (&lowers[2], &json), (&lowers[2], &yaml)] {
        for (p, digest, _) in files.iter() {
            let b = std::fs::read(m.join(p)).unwrap_or_else(|e| panic!("{}: {e}", m.join(p).display()));
            assert!(sha256(&b) == *digest, "{}: wrong bytes", m.join(p).display());
        }
    }
    let served_walk = blobs_served(&log, before_yaml);
    let yaml_blobs: BTreeSet<String> =
        yaml.iter().map(|(_, dg, _)| format!("sha256:{}", hex::encode(o2[dg].blob))).collect();
    for (b, _) in &served_walk {
        assert!(object_blobs.contains(b), "a non-object blob was fetched during the walk: {b}");
    }
    let yaml_fetched = served_walk.iter().filter(|(b, _)| yaml_blobs.contains(b)).count();
    assert!(yaml_fetched > 0, "the v2-only yaml package was never fetched?");
    assert!(yaml_blobs.iter().all(|b| v2_only.contains(b)), "yaml objects are all new in v2");

    // The registry's view: no object blob twice; v2 charged only for objects v1 lacks.
    let served = blobs_served(&log, off);
    let mut count: HashMap<&str, usize> = HashMap::new();
    for (b, _) in served.iter().filter(|(b, _)| object_blobs.contains(b)) {
        *count.entry(b.as_str()).or_default() += 1;
    }
    let twice: Vec<_> = count.iter().filter(|(_, &n)| n > 1).collect();
    let index_blobs: Vec<&String> = served.iter().map(|(b, _)| b).filter(|b| !object_blobs.contains(*b)).collect();
    let fetched_new = count.keys().filter(|b| v2_only.contains(**b)).count();
    let wire: u64 = served.iter().map(|(_, n)| n).sum();
    println!(
        "registry served {} object blobs ({} new in v2) and {} other blobs (index layers, configs), {:.2} MB in all",
        count.len(),
        fetched_new,
        index_blobs.len(),
        wire as f64 / 1e6
    );
    assert!(twice.is_empty(), "object blobs fetched more than once: {twice:?}");
    let (sa, sb, sc) =
        (mount_stats(&d, &field(0, "id")), mount_stats(&d, &field(1, "id")), mount_stats(&d, &field(2, "id")));
    println!("stats a: {sa}\nstats b: {sb}\nstats c: {sc}");
    let fetched = |s: &serde_json::Value| s["objects_fetched"].as_u64().unwrap();
    assert_eq!(fetched(&sb), 0, "the second v1 container fetched objects the first has: {sb}");
    assert_eq!(
        fetched(&sc),
        u64::try_from(fetched_new).unwrap(),
        "v2 must fetch exactly the objects v1 lacks that it read: {sc}"
    );
    assert_eq!(
        fetched(&sa) + fetched(&sb) + fetched(&sc),
        u64::try_from(count.len()).unwrap(),
        "every object blob served was fetched by the daemon once"
    );

    for m in &mnts {
        d.wisp(&["umount", m.to_str().unwrap()]);
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    for (m, rec) in mnts.iter().zip(&recs) {
        for p in [m.to_str().unwrap(), rec["lower"].as_str().unwrap()] {
            assert!(!mountinfo.contains(&format!(" {p} ")), "{p} is still mounted:\n{mountinfo}");
        }
    }
    let status = d.call(&wisp::daemon::protocol::Request::Status);
    assert_eq!(status["mounts"].as_array().map(Vec::len), Some(0), "{status}");
    println!("guest time: {:.1}s", t0.elapsed().as_secs_f64());
    drop(fixture);
}
