//! `wisp convert` + `wisp pull --eager` against the oracle `umoci unpack`: the pulled tree must equal
//! the flattened source image in content and metadata (type, mode, owner, mtime ns, size, bytes,
//! symlink targets, device numbers, xattrs, hard-link groups).
//!
//! Needs root, skopeo, umoci, python3 and the corpus (`scripts/corpus build`); the registry tests also
//! need docker-registry (`scripts/registry`). Missing tools skip, or fail under WISP_REQUIRE_ALL=1.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{
    compare_trees, corpus_oci, have, is_root, repo_root, require, run, umoci_unpack, wisp_bin, CompareOptions,
};

const FAMILIES: &[(&str, &[&str])] = &[("debian", &["a", "b"]), ("python", &["v1", "v2"]), ("node", &["v1", "v2"])];

fn ready(what: &str, tools: &[&str]) -> bool {
    if !require(is_root(), &format!("{what}: needs root (ownership, devices, xattrs)")) {
        return false;
    }
    tools.iter().all(|t| require(have(t), &format!("{what}: needs {t}")))
}

/// KEY=VALUE lines of a script's `env` output.
fn env_lines(out: &str) -> BTreeMap<String, String> {
    out.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn wisp(args: &[&str]) -> String {
    run(Command::new(wisp_bin()).args(args))
}

fn assert_same(expected: &Path, actual: &Path, what: &str) {
    let diffs = compare_trees(expected, actual, &CompareOptions::default());
    assert!(
        diffs.is_empty(),
        "{what}: {} differences:\n{}",
        diffs.len(),
        diffs.iter().take(40).cloned().collect::<Vec<_>>().join("\n")
    );
}

/// Sets the mtime of `rel` under each root to 0: umoci gives directories that no tar entry names
/// the time of the unpack, which no converter can reproduce.
fn normalize_mtime(roots: &[&Path], rel: &[&str]) {
    for root in roots {
        for r in rel {
            run(Command::new("touch").args(["-h", "-d", "@0"]).arg(root.join(r)));
        }
    }
}

#[test]
fn edge_image_oci_to_dir_store_equals_umoci() {
    if !ready("edge", &["skopeo", "umoci", "python3", "zstd"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let layout = t.join("edge");
    run(Command::new("python3").arg(repo_root().join("scripts/corpus-edge.py")).arg(&layout));
    let expected = umoci_unpack(&layout, "1", t);
    let store = t.join("store");
    let out = t.join("out");
    let json = wisp(&[
        "convert",
        &format!("oci:{}:1", layout.display()),
        &format!("oci:{}:1", out.display()),
        "--store",
        &format!("dir:{}", store.display()),
        "--json",
    ]);
    let sum: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(sum["files"].as_u64().unwrap() > 50 && sum["distinct_objects"].as_u64().unwrap() > 3, "{json}");
    let pulled = t.join("pulled");
    wisp(&[
        "pull",
        "--eager",
        &format!("oci:{}:1", out.display()),
        pulled.to_str().unwrap(),
        "--store",
        &format!("dir:{}", store.display()),
    ]);
    normalize_mtime(&[&expected, &pulled], &["implicit/a/b", "implicit/a", "implicit"]);
    assert_same(&expected, &pulled, "edge:1");

    // edge:gnu-sparse: umoci rejects typeflag S, so check the old-GNU sparse file against the PAX 1.0
    // one (same map, same bytes) and the rest against edge:1.
    wisp(&[
        "convert",
        &format!("oci:{}:gnu-sparse", layout.display()),
        &format!("oci:{}:gnu-sparse", out.display()),
        "--store",
        &format!("dir:{}", store.display()),
    ]);
    let pulled2 = t.join("pulled2");
    wisp(&[
        "pull",
        "--eager",
        &format!("oci:{}:gnu-sparse", out.display()),
        pulled2.to_str().unwrap(),
        "--store",
        &format!("dir:{}", store.display()),
    ]);
    let a = std::fs::read(pulled2.join("gnu/sparse")).unwrap();
    let b = std::fs::read(pulled2.join("pax/sparse-1.0")).unwrap();
    assert_eq!(a.len(), 16 << 20);
    assert!(a == b, "gnu/sparse and pax/sparse-1.0 differ");
}

#[test]
fn corpus_oci_to_dir_store_equals_umoci() {
    if !ready("corpus", &["skopeo", "umoci", "debootstrap"]) {
        return;
    }
    let oci = corpus_oci(&["debian", "python", "node"]);
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let store = t.join("store");
    for (family, tags) in FAMILIES {
        for tag in *tags {
            let src = format!("oci:{}:{tag}", oci.join(family).display());
            let out = format!("oci:{}:{tag}", t.join(format!("idx-{family}")).display());
            wisp(&["convert", &src, &out, "--store", &format!("dir:{}", store.display())]);
            let pulled = t.join(format!("pulled-{family}-{tag}"));
            wisp(&["pull", "--eager", &out, pulled.to_str().unwrap(), "--store", &format!("dir:{}", store.display())]);
            let bundle = t.join(format!("umoci-{family}-{tag}"));
            run(Command::new("umoci")
                .args(["unpack", "--image"])
                .arg(format!("{}:{tag}", oci.join(family).display()))
                .arg(&bundle));
            assert_same(&bundle.join("rootfs"), &pulled, &format!("{family}:{tag}"));
            let _ = std::fs::remove_dir_all(&pulled);
            let _ = std::fs::remove_dir_all(&bundle);
        }
    }
}

#[test]
fn docker_archive_source_equals_oci_source() {
    if !ready("docker-archive", &["skopeo", "umoci", "debootstrap"]) {
        return;
    }
    let oci = corpus_oci(&["python"]);
    let env = env_lines(&run(Command::new(repo_root().join("scripts/corpus")).arg("env")));
    let archive = PathBuf::from(&env["WISP_CORPUS_ARCHIVE"]);
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let store = format!("dir:{}", t.join("store").display());
    let out = format!("oci:{}:v1", t.join("idx").display());
    wisp(&["convert", &format!("docker-archive:{}", archive.display()), &out, "--store", &store]);
    let pulled = t.join("pulled");
    wisp(&["pull", "--eager", &out, pulled.to_str().unwrap(), "--store", &store]);
    let bundle = t.join("umoci");
    run(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:v1", oci.join("python").display()))
        .arg(&bundle));
    assert_same(&bundle.join("rootfs"), &pulled, "python:v1 from docker-archive");
}

/// A registry of our own on a test port, stopped on drop.
struct Registry {
    port: u16,
    addr: String,
}

impl Registry {
    fn start(port: u16, root: &Path) -> Self {
        let script = repo_root().join("scripts/registry");
        let _ = Command::new(&script).args(["stop", "--port", &port.to_string()]).output();
        run(Command::new(&script).args(["start", "--port", &port.to_string(), "--root"]).arg(root));
        Registry { port, addr: format!("127.0.0.1:{port}") }
    }

    fn gc(&self, delete_untagged: bool) -> String {
        let mut c = Command::new(repo_root().join("scripts/registry"));
        c.args(["gc", "--port", &self.port.to_string()]);
        if delete_untagged {
            c.arg("--delete-untagged");
        }
        let out = c.output().unwrap();
        assert!(out.status.success(), "gc failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = Command::new(repo_root().join("scripts/registry"))
            .args(["stop", "--port", &self.port.to_string()])
            .output();
    }
}

#[test]
fn registry_to_registry_survives_gc_and_skopeo_copy_all() {
    if !ready("registry", &["skopeo", "umoci", "debootstrap", "docker-registry", "python3"]) {
        return;
    }
    let oci = corpus_oci(&["debian", "python", "node", "edge"]);
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let reg = Registry::start(5077, &t.join("registry"));
    run(Command::new(repo_root().join("scripts/corpus")).args(["push", "--registry", &reg.addr]));

    let mut images: Vec<(String, String)> = Vec::new();
    for (family, tags) in FAMILIES {
        for tag in *tags {
            images.push((family.to_string(), tag.to_string()));
        }
    }
    images.push(("edge".into(), "1".into()));
    let mut expected = BTreeMap::new();
    for (family, tag) in &images {
        let src = format!("docker://{}/{family}:{tag}", reg.addr);
        let dst = format!("docker://{}/{family}-wisp:{tag}", reg.addr);
        wisp(&["convert", &src, &dst, "--plain-http"]);
        let oracle = if family == "edge" {
            umoci_unpack(&oci.join("edge"), "1", t)
        } else {
            let bundle = t.join(format!("umoci-{family}-{tag}"));
            run(Command::new("umoci")
                .args(["unpack", "--image"])
                .arg(format!("{}:{tag}", oci.join(family).display()))
                .arg(&bundle));
            bundle.join("rootfs")
        };
        expected.insert((family.clone(), tag.clone()), oracle);
    }
    let check = |repo: &str, family: &str, tag: &str, what: &str| {
        let pulled = t.join(format!("pulled-{repo}-{tag}"));
        let _ = std::fs::remove_dir_all(&pulled);
        wisp(&[
            "pull",
            "--eager",
            &format!("docker://{}/{repo}:{tag}", reg.addr),
            pulled.to_str().unwrap(),
            "--plain-http",
        ]);
        let oracle = &expected[&(family.to_string(), tag.to_string())];
        if family == "edge" {
            normalize_mtime(&[oracle, &pulled], &["implicit/a/b", "implicit/a", "implicit"]);
        }
        assert_same(oracle, &pulled, &format!("{repo}:{tag} {what}"));
        let _ = std::fs::remove_dir_all(&pulled);
    };
    for (family, tag) in &images {
        check(&format!("{family}-wisp"), family, tag, "after convert");
    }

    // Garbage collection, both modes: objects are kept alive by the object lists, and the lists and
    // the index manifest by their own tags. The source images are deleted first, so the collector
    // has real garbage to remove (their layers).
    for (family, tag) in &images {
        run(Command::new("skopeo")
            .args(["delete", "--tls-verify=false"])
            .arg(format!("docker://{}/{family}:{tag}", reg.addr)));
    }
    let verdict = reg.gc(false);
    assert!(!verdict.contains(" 0 blobs and"), "the collector found nothing to delete: {verdict}");
    eprintln!("gc: {verdict}");
    let verdict = reg.gc(true);
    eprintln!("gc --delete-untagged: {verdict}");
    for (family, tag) in &images {
        check(&format!("{family}-wisp"), family, tag, "after garbage-collect");
    }

    // skopeo copy --all carries the index image and every object (as the object lists' layers).
    run(Command::new("skopeo")
        .args(["copy", "--quiet", "--all", "--src-tls-verify=false", "--dest-tls-verify=false"])
        .arg(format!("docker://{}/python-wisp:v1", reg.addr))
        .arg(format!("docker://{}/copied:v1", reg.addr)));
    check("copied", "python", "v1", "after skopeo copy --all");
    // The copy's children arrive untagged; `wisp keepalive` tags them, and then even
    // `--delete-untagged` keeps the copy whole.
    wisp(&["keepalive", &format!("docker://{}/copied:v1", reg.addr), "--plain-http"]);
    reg.gc(true);
    check("copied", "python", "v1", "after skopeo copy --all, wisp keepalive and garbage-collect --delete-untagged");
    // ... and to an OCI layout, which wisp reads as well.
    let copied = t.join("copied-layout");
    run(Command::new("skopeo")
        .args(["copy", "--quiet", "--all", "--src-tls-verify=false"])
        .arg(format!("docker://{}/python-wisp:v1", reg.addr))
        .arg(format!("oci:{}:v1", copied.display())));
    let pulled = t.join("pulled-copied-layout");
    wisp(&["pull", "--eager", &format!("oci:{}:v1", copied.display()), pulled.to_str().unwrap()]);
    assert_same(
        &expected[&("python".to_string(), "v1".to_string())],
        &pulled,
        "python-wisp:v1 copied to an OCI layout",
    );
}

/// A private containerd (own root, state and socket), stopped on drop.
struct Containerd {
    dir: PathBuf,
    child: std::process::Child,
}

impl Containerd {
    fn start(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let config = format!(
            "version = 2\nroot = \"{0}/root\"\nstate = \"{0}/state\"\n[grpc]\n  address = \"{0}/containerd.sock\"\n\
             [plugins.\"io.containerd.grpc.v1.cri\"]\n  disable = true\n",
            dir.display()
        );
        std::fs::write(dir.join("config.toml"), config).unwrap();
        let log = std::fs::File::create(dir.join("log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(dir.join("config.toml"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let c = Containerd { dir: dir.to_path_buf(), child };
        for _ in 0..100 {
            if c.ctr(&["version"]).status.success() {
                return c;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("containerd did not start; see {}", dir.join("log").display());
    }

    fn ctr(&self, args: &[&str]) -> std::process::Output {
        Command::new("ctr").arg("--address").arg(self.dir.join("containerd.sock")).args(args).output().unwrap()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn containerd_pulls_and_unpacks_the_index_image() {
    if !ready("containerd", &["containerd", "ctr", "docker-registry", "python3", "zstd"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let layout = t.join("edge");
    run(Command::new("python3").arg(repo_root().join("scripts/corpus-edge.py")).arg(&layout));
    let reg = Registry::start(5078, &t.join("registry"));
    let dst = format!("docker://{}/edge-wisp:1", reg.addr);
    wisp(&["convert", &format!("oci:{}:1", layout.display()), &dst, "--plain-http"]);
    let ctd = Containerd::start(&t.join("containerd"));
    let image = format!("{}/edge-wisp:1", reg.addr);
    let out = ctd.ctr(&["images", "pull", "--plain-http", &image]);
    assert!(out.status.success(), "ctr pull: {}", String::from_utf8_lossy(&out.stderr));
    let mnt = t.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let out = ctd.ctr(&["images", "mount", &image, mnt.to_str().unwrap()]);
    assert!(out.status.success(), "ctr mount: {}", String::from_utf8_lossy(&out.stderr));
    let erofs = std::fs::read(mnt.join("wisp/index.erofs"));
    let map = std::fs::metadata(mnt.join("wisp/objects.map"));
    let _ = ctd.ctr(&["images", "unmount", mnt.to_str().unwrap()]);
    let erofs = erofs.expect("wisp/index.erofs in the unpacked image");
    assert!(map.is_ok(), "wisp/objects.map in the unpacked image");
    erofs::reader::Image::open(erofs.as_slice()).unwrap().read_tree().unwrap();
    // The config survived: entrypoint, env, user, workdir.
    let out = ctd.ctr(&["images", "check"]);
    assert!(out.status.success());
    let cfg = run(Command::new("skopeo").args(["inspect", "--config", "--tls-verify=false"]).arg(&dst));
    let cfg: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    assert_eq!(cfg["config"]["Entrypoint"][0], "/bin/wisp-edge");
    assert_eq!(cfg["config"]["User"], "65534:65534");
    assert_eq!(cfg["config"]["WorkingDir"], "/data");
    assert_eq!(cfg["rootfs"]["diff_ids"].as_array().unwrap().len(), 1);
}
