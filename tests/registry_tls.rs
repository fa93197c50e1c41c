//! Registries as nodes reach them (issue 21), against real Debian `docker-registry` processes on
//! 127.0.0.1: an upstream with TLS from a private CA and htpasswd auth, a plain mirror that lacks some
//! objects, and a pull-through cache (the registry's proxy mode) in front of the upstream. The node's
//! configuration is containerd's: `WISP_HOSTS_DIR/HOST/{ca.crt,hosts.toml}` and the docker config.
//! Which host served what is read from each registry's own access log; bytes are checked against
//! `umoci unpack` of the corpus image.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::collections::{BTreeSet, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::daemon::{require_fanotify, Daemon};
use common::tls::{Pki, Registry};
use common::{compare_trees, have, is_root, require, run, umoci_unpack, wisp_bin, CompareOptions};

const UPSTREAM: u16 = 5160;
const MIRROR: u16 = 5161;
const PROXY: u16 = 5162;
const OPEN_UPSTREAM: u16 = 5163;
const USER: &str = "alice";
const PASSWORD: &str = "s3cret-pw";

fn can_run() -> bool {
    if !require(is_root(), "needs root (mounts, fanotify)") {
        return false;
    }
    require_fanotify()
        && require(Path::new("/usr/bin/docker-registry").exists(), "docker-registry is not installed (scripts/setup)")
        && require(have("htpasswd"), "htpasswd is not installed (apache2-utils, scripts/setup)")
        && require(have("openssl") && have("umoci") && have("skopeo"), "openssl, umoci, skopeo (scripts/setup)")
}

/// A `wisp daemon` in `dir` with the node's registry configuration in `env`.
fn daemon(dir: &Path, env: &[(&str, &Path)]) -> Daemon {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.to_str().unwrap())).collect();
    Daemon::start(dir, &env)
}

/// Object blob digests of the one mounted image (its object map, as the daemon pulled it).
fn object_blobs(d: &Daemon) -> Vec<String> {
    let id = d.status()["mounts"][0]["image"].as_str().unwrap().to_owned();
    let map = fs::read(d.state.join("images").join(id).join("objects.map")).unwrap();
    wisp::index::objmap::decode(&map).unwrap().iter().map(|e| e.blob_digest()).collect()
}

/// `wisp ARGS` with `env`: (success, stdout + stderr).
fn wisp_env(args: &[&str], env: &[(&str, &Path)]) -> (bool, String) {
    let mut cmd = Command::new(wisp_bin());
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn docker_config(dir: &Path, registry: &str, user: &str, password: &str) -> PathBuf {
    use base64::Engine as _;
    fs::create_dir_all(dir).unwrap();
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    fs::write(dir.join("config.json"), serde_json::json!({ "auths": { registry: { "auth": auth } } }).to_string())
        .unwrap();
    dir.to_owned()
}

fn sha256_file(p: &Path) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))))
}

/// Files the lazy starts read, through the mount, checked against the umoci tree.
const FILES: &[&str] = &["usr/bin/bash", "usr/bin/ls", "usr/lib/x86_64-linux-gnu/libc.so.6", "etc/os-release"];

fn read_and_check(mnt: &Path, oracle: &Path) {
    for f in FILES {
        assert_eq!(sha256_file(&mnt.join(f)), sha256_file(&oracle.join(f)), "{f} through {}", mnt.display());
    }
    assert_eq!(run(Command::new("chroot").arg(mnt).args(["sh", "-c", "bash -c 'echo ok'"])), "ok\n");
}

#[test]
fn tls_auth_mirror_and_pull_through_cache() {
    if !can_run() {
        return;
    }
    let tmp = PathBuf::from(format!("/var/tmp/wisp-registry-tls-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).unwrap();
    let corpus = common::run(Command::new(common::repo_root().join("scripts/corpus")).arg("env"));
    let oci = corpus.lines().find_map(|l| l.strip_prefix("WISP_CORPUS_OCI=")).unwrap().to_owned();
    run(Command::new(common::repo_root().join("scripts/corpus")).args(["build", "debian"]));
    let src = format!("oci:{oci}/debian:a");

    // A private CA, the upstream's certificate for 127.0.0.1, another CA nobody trusts, a password file.
    let pki = Pki::new(&tmp.join("pki"), USER, PASSWORD);
    let (tls, auth) = (pki.tls_config(), pki.auth_config());
    let upstream = Registry::start(&tmp.join("upstream"), UPSTREAM, &tls, &auth, &[]);
    let up_host = format!("127.0.0.1:{UPSTREAM}");
    let image = format!("docker://{up_host}/wisp/debian:a");

    // The node's configuration: the CA in certs.d, the credentials in a docker config.
    let hosts = tmp.join("certs.d");
    fs::create_dir_all(hosts.join(&up_host)).unwrap();
    fs::copy(pki.dir.join("ca.crt"), hosts.join(&up_host).join("ca.crt")).unwrap();
    let creds = docker_config(&tmp.join("docker"), &up_host, USER, PASSWORD);
    let bad_creds = docker_config(&tmp.join("docker-bad"), &up_host, USER, "wrong");
    let no_creds = tmp.join("docker-none");
    fs::create_dir_all(&no_creds).unwrap();
    let untrusted = tmp.join("certs.d-other");
    fs::create_dir_all(untrusted.join(&up_host)).unwrap();
    fs::copy(pki.dir.join("other.crt"), untrusted.join(&up_host).join("ca.crt")).unwrap();

    // Refused with errors that say why: a certificate this node does not trust; wrong, then no
    // credentials.
    let convert = ["convert", src.as_str(), image.as_str()];
    let (ok, out) = wisp_env(&convert, &[("WISP_HOSTS_DIR", &untrusted), ("DOCKER_CONFIG", &creds)]);
    assert!(!ok && out.contains("certificate") && out.contains("ca.crt"), "untrusted certificate: {out}");
    let (ok, out) = wisp_env(&convert, &[("WISP_HOSTS_DIR", &hosts), ("DOCKER_CONFIG", &bad_creds)]);
    assert!(!ok && out.contains("refused the credentials") && out.contains("docker-bad"), "wrong password: {out}");
    let (ok, out) = wisp_env(&convert, &[("WISP_HOSTS_DIR", &hosts), ("DOCKER_CONFIG", &no_creds)]);
    assert!(!ok && out.contains("wants credentials"), "no credentials: {out}");
    // Credentials from a docker credential helper (credHelpers), here one that gives a wrong password.
    let bin = tmp.join("bin");
    fs::create_dir_all(&bin).unwrap();
    for (name, pw) in [("wisptest", PASSWORD), ("wispbad", "nope")] {
        let helper = bin.join(format!("docker-credential-{name}"));
        fs::write(
            &helper,
            format!("#!/bin/sh\n[ \"$1\" = get ] || exit 1\nread host\n[ \"$host\" = {up_host} ] || {{ echo credentials not found in native keychain; exit 1; }}\necho '{{\"ServerURL\":\"{up_host}\",\"Username\":\"{USER}\",\"Secret\":\"{pw}\"}}'\n"),
        )
        .unwrap();
        fs::set_permissions(&helper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let path = PathBuf::from(format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default()));
    let helper_config = |name: &str| {
        let d = tmp.join(format!("docker-helper-{name}"));
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("config.json"), format!("{{\"credHelpers\": {{\"{up_host}\": \"{name}\"}}}}")).unwrap();
        d
    };
    let (good_helper, bad_helper) = (helper_config("wisptest"), helper_config("wispbad"));
    let (ok, out) = wisp_env(&convert, &[("WISP_HOSTS_DIR", &hosts), ("DOCKER_CONFIG", &bad_helper), ("PATH", &path)]);
    assert!(!ok && out.contains("refused the credentials from docker-credential-wispbad"), "helper: {out}");
    assert!(upstream.blobs_served(0).is_empty());

    // Convert and pull over TLS with credentials; the pulled tree equals umoci's.
    let node_env: [(&str, &Path); 2] = [("WISP_HOSTS_DIR", &hosts), ("DOCKER_CONFIG", &creds)];
    let (ok, out) = wisp_env(&convert, &node_env);
    assert!(ok, "convert over TLS with credentials: {out}");
    let oracle = umoci_unpack(&Path::new(&oci).join("debian"), "a", &tmp);
    let pulled = tmp.join("pulled");
    let (ok, out) = wisp_env(&["pull", "--eager", image.as_str(), pulled.to_str().unwrap()], &node_env);
    assert!(ok, "pull over TLS with credentials: {out}");
    let diffs = compare_trees(&oracle, &pulled, &CompareOptions::default());
    assert!(diffs.is_empty(), "pulled tree differs from umoci's: {:?}", &diffs[..diffs.len().min(20)]);

    // A lazy start over TLS with credentials.
    {
        let mut d = daemon(&tmp.join("node0"), &node_env);
        let mnt = tmp.join("node0/mnt");
        d.mount(&image, &mnt, &[]);
        read_and_check(&mnt, &oracle);
    }

    // A plain mirror that has the index and only some objects: the rest come from the upstream.
    let mirror = Registry::start(&tmp.join("mirror"), MIRROR, "", "", &[]);
    let mirror_host = format!("127.0.0.1:{MIRROR}");
    let (ok, out) = wisp_env(&["convert", &src, &format!("docker://{mirror_host}/wisp/debian:a"), "--plain-http"], &[]);
    assert!(ok, "convert to the mirror: {out}");
    let with_mirror = tmp.join("certs.d-mirror");
    fs::create_dir_all(with_mirror.join(&up_host)).unwrap();
    fs::copy(pki.dir.join("ca.crt"), with_mirror.join(&up_host).join("ca.crt")).unwrap();
    fs::write(
        with_mirror.join(&up_host).join("hosts.toml"),
        format!(
            "server = \"https://{up_host}\"\nca = \"ca.crt\"\n\n[host.\"http://{mirror_host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        ),
    )
    .unwrap();
    // This node's credentials come from the helper.
    let mirror_env: [(&str, &Path); 3] =
        [("WISP_HOSTS_DIR", &with_mirror), ("DOCKER_CONFIG", &good_helper), ("PATH", &path)];
    {
        let mut d = daemon(&tmp.join("node1"), &mirror_env);
        let mnt = tmp.join("node1/mnt");
        let (up0, m0) = (upstream.log_len(), mirror.log_len());
        d.mount(&image, &mnt, &[]);
        // Remove every other object from the mirror (the registry's delete API).
        let objects: BTreeSet<String> = object_blobs(&d).into_iter().collect();
        let removed: HashSet<String> = objects.iter().step_by(2).cloned().collect();
        for b in &removed {
            let code = run(Command::new("curl").args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-X",
                "DELETE",
                &format!("http://{mirror_host}/v2/wisp/debian/blobs/{b}"),
            ]));
            assert_eq!(code, "202", "deleting {b} from the mirror");
        }
        read_and_check(&mnt, &oracle);
        let (from_up, from_mirror) = (upstream.blobs_served(up0), mirror.blobs_served(m0));
        let up_objects: Vec<&String> = from_up.iter().filter(|b| objects.contains(*b)).collect();
        let mirror_objects: Vec<&String> = from_mirror.iter().filter(|b| objects.contains(*b)).collect();
        println!(
            "mirror lacking {} of {} objects: {} objects from the mirror, {} from the upstream; upstream blobs {from_up:?}",
            removed.len(),
            objects.len(),
            mirror_objects.len(),
            up_objects.len()
        );
        assert!(!mirror_objects.is_empty() && !up_objects.is_empty(), "both hosts served objects");
        assert!(up_objects.iter().all(|b| removed.contains(*b)), "the upstream served an object the mirror has");
        assert!(from_up.iter().all(|b| objects.contains(b)), "the index came from the mirror: {from_up:?}");
    }

    // A pull-through cache (the registry's proxy mode, trusting the private CA) in front of a TLS
    // upstream: a second node's cold start is served by the cache, the upstream serves nothing new.
    // The upstream here is a second registry over the same storage with TLS and no auth: in proxy mode,
    // distribution 2.8.2 got "authentication required" from the htpasswd upstream with the
    // username/password of its config (it authenticates to token-auth upstreams).
    drop(upstream);
    let upstream = Registry::start(&tmp.join("upstream"), OPEN_UPSTREAM, &tls, "", &[]);
    let up_host = format!("127.0.0.1:{OPEN_UPSTREAM}");
    let image = format!("docker://{up_host}/wisp/debian:a");
    let proxy = Registry::start(
        &tmp.join("proxy"),
        PROXY,
        "",
        &format!("proxy:\n  remoteurl: https://{up_host}\n"),
        &[("SSL_CERT_FILE", &pki.dir.join("ca.crt"))],
    );
    let proxy_host = format!("127.0.0.1:{PROXY}");
    let with_proxy = tmp.join("certs.d-proxy");
    fs::create_dir_all(with_proxy.join(&up_host)).unwrap();
    fs::write(
        with_proxy.join(&up_host).join("hosts.toml"),
        format!(
            "ca = \"{}\"\n\n[host.\"http://{proxy_host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            pki.dir.join("ca.crt").display()
        ),
    )
    .unwrap();
    let proxy_env: [(&str, &Path); 2] = [("WISP_HOSTS_DIR", &with_proxy), ("DOCKER_CONFIG", &creds)];
    let mut served_by_proxy = Vec::new();
    for node in ["node2", "node3"] {
        let (up0, p0) = (upstream.log_len(), proxy.log_len());
        let mut d = daemon(&tmp.join(node), &proxy_env);
        let mnt = tmp.join(node).join("mnt");
        d.mount(&image, &mnt, &[]);
        read_and_check(&mnt, &oracle);
        let objects: HashSet<String> = object_blobs(&d).into_iter().collect();
        let (from_up, from_proxy) = (upstream.blobs_served(up0), proxy.blobs_served(p0));
        let n = from_proxy.iter().filter(|b| objects.contains(*b)).count();
        println!("{node}: {n} objects from the cache, upstream blobs: {}", from_up.len());
        assert!(n > 0, "{node}: nothing came through the pull-through cache");
        if node == "node3" {
            assert!(from_up.is_empty(), "the second node's start reached the upstream: {from_up:?}");
        }
        served_by_proxy.push(n);
    }
    drop((upstream, mirror, proxy));
    let _ = fs::remove_dir_all(&tmp);
}
