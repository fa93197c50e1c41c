//! A registry that answers blob GETs with a redirect (as registries backed by object storage do, issue
//! 21): a small front written in Python relays manifests from the real registry and answers every blob
//! GET with `307 Location:` the real registry's URL for it. `wisp pull --eager` through the front must
//! give umoci's tree, and both logs must show each object blob redirected and then served.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::registry::{self, blobs_served, log_len};
use common::{compare_trees, have, is_root, require, run, umoci_unpack, wisp_bin, CompareOptions};

const PORT: u16 = 5165;
const FRONT: u16 = 5166;

const FRONT_PY: &str = r#"
import http.server, sys, urllib.request
up, port, log = sys.argv[1], int(sys.argv[2]), open(sys.argv[3], "a", buffering=1)
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def relay(self, body):
        if "/blobs/sha256:" in self.path:
            log.write("redirect %s %s\n" % (self.command, self.path))
            self.send_response(307)
            self.send_header("Location", "http://%s%s" % (up, self.path))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        req = urllib.request.Request("http://%s%s" % (up, self.path), method=self.command,
                                     headers={k: v for k, v in self.headers.items() if k.lower() in ("accept", "authorization")})
        try:
            r = urllib.request.urlopen(req)
        except urllib.error.HTTPError as e:
            r = e
        data = r.read()
        self.send_response(r.status if hasattr(r, "status") else r.code)
        for k, v in r.headers.items():
            if k.lower() not in ("content-length", "connection", "transfer-encoding", "date", "server"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)
    def do_GET(self): self.relay(True)
    def do_HEAD(self): self.relay(False)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
"#;

struct Front(Child);

impl Drop for Front {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn blobs_behind_redirects_are_followed_and_verified() {
    if !require(is_root(), "needs root (pull writes owners and devices)")
        || !require(have("docker-registry") && have("skopeo") && have("umoci"), "docker-registry, skopeo, umoci")
    {
        return;
    }
    let tmp = PathBuf::from(format!("/var/tmp/wisp-registry-redirect-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).unwrap();
    registry::start(PORT, &tmp.join("registry"));
    let log = registry::log(PORT);
    let up = format!("127.0.0.1:{PORT}");
    let oci = common::corpus_oci(&["debian"]);
    let src = format!("oci:{}/debian:a", oci.display());
    run(Command::new(wisp_bin()).args(["convert", &src, &format!("docker://{up}/wisp/debian:a"), "--plain-http"]));

    fs::write(tmp.join("front.py"), FRONT_PY).unwrap();
    let front_log = tmp.join("front.log");
    let front = Front(
        Command::new("python3")
            .arg(tmp.join("front.py"))
            .args([&up, &FRONT.to_string()])
            .arg(&front_log)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", FRONT)).is_err() {
        assert!(t.elapsed() < Duration::from_secs(20), "the redirecting front did not start");
        std::thread::sleep(Duration::from_millis(50));
    }

    let off = log_len(&log);
    let pulled = tmp.join("pulled");
    run(Command::new(wisp_bin()).args([
        "pull",
        "--eager",
        &format!("docker://127.0.0.1:{FRONT}/wisp/debian:a"),
        pulled.to_str().unwrap(),
        "--plain-http",
    ]));
    drop(front);
    let redirected: Vec<String> = fs::read_to_string(&front_log)
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("redirect GET "))
        .filter_map(|p| p.split("/blobs/").nth(1).map(str::to_owned))
        .collect();
    let served: Vec<String> = blobs_served(&log, off).into_iter().map(|(b, _)| b).collect();
    println!("{} blob GETs redirected, {} served by the registry", redirected.len(), served.len());
    assert!(redirected.len() > 1000, "the objects did not go through the redirecting front: {}", redirected.len());
    for b in &redirected {
        assert!(served.contains(b), "{b} was redirected but the registry never served it");
    }

    // The tree equals umoci's unpack of the source image.
    let oracle = umoci_unpack(&oci.join("debian"), "a", &tmp);
    let diffs = compare_trees(&oracle, &pulled, &CompareOptions::default());
    assert!(diffs.is_empty(), "pulled through redirects: {:?}", &diffs[..diffs.len().min(20)]);
    registry::stop(PORT);
    let _ = fs::remove_dir_all(&tmp);
}
