//! Registries with TLS and auth for the tests: a private CA and its certificates (openssl), an
//! htpasswd file, and `docker-registry serve` processes with their own config (TLS, auth, proxy mode)
//! whose access log the tests read.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use super::run;

/// `DIR/ca.{key,crt}` (the private CA), `DIR/srv.{key,crt}` (127.0.0.1, signed by it),
/// `DIR/other.crt` (a CA nobody trusts), `DIR/htpasswd` (bcrypt, one user).
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    pub fn new(dir: &Path, user: &str, password: &str) -> Pki {
        fs::create_dir_all(dir).unwrap();
        let script = format!(
            "cd {p}
             openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 2 -subj /CN=wisp-test-ca 2>/dev/null
             openssl req -newkey rsa:2048 -nodes -keyout srv.key -out srv.csr -subj /CN=127.0.0.1 2>/dev/null
             printf 'subjectAltName=IP:127.0.0.1\\n' > san.ext
             openssl x509 -req -in srv.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out srv.crt -days 2 -extfile san.ext 2>/dev/null
             openssl req -x509 -newkey rsa:2048 -nodes -keyout other.key -out other.crt -days 2 -subj /CN=other-ca 2>/dev/null
             htpasswd -Bbc htpasswd {user} {password} 2>/dev/null",
            p = dir.display()
        );
        run(Command::new("sh").args(["-ec", &script]));
        Pki { dir: dir.to_owned() }
    }

    /// The `http:` lines of a registry config that serve TLS with the 127.0.0.1 certificate.
    pub fn tls_config(&self) -> String {
        format!(
            "  tls:\n    certificate: {}\n    key: {}\n",
            self.dir.join("srv.crt").display(),
            self.dir.join("srv.key").display()
        )
    }

    /// The `auth:` section of a registry config with the htpasswd file.
    pub fn auth_config(&self) -> String {
        format!("auth:\n  htpasswd:\n    realm: wisp-test\n    path: {}\n", self.dir.join("htpasswd").display())
    }
}

/// A `docker-registry serve` with its own config; killed on drop.
pub struct Registry {
    child: Child,
    pub log: PathBuf,
}

impl Registry {
    /// `extra` is appended to the config (tls, auth, proxy sections); `env` goes to the process.
    pub fn start(dir: &Path, port: u16, http_extra: &str, extra: &str, env: &[(&str, &Path)]) -> Registry {
        fs::create_dir_all(dir).unwrap();
        let config = format!(
            "version: 0.1\nlog:\n  level: info\n  formatter: text\nstorage:\n  filesystem:\n    rootdirectory: {root}\n  delete:\n    enabled: true\n  redirect:\n    disable: true\n  maintenance:\n    uploadpurging:\n      enabled: false\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: wisp-test-{port}\n{http_extra}health:\n  storagedriver:\n    enabled: false\n{extra}",
            root = dir.join("storage").display()
        );
        fs::write(dir.join("config.yml"), config).unwrap();
        let log = dir.join("registry.log");
        let mut cmd = Command::new("/usr/bin/docker-registry");
        cmd.arg("serve").arg(dir.join("config.yml"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        // The access log (one `"GET /v2/... HTTP/1.1" 200 SIZE` line per request) goes to stdout.
        let f = fs::File::create(&log).unwrap();
        cmd.stdout(f.try_clone().unwrap()).stderr(f);
        let r = Registry { child: cmd.spawn().unwrap(), log };
        let t = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(t.elapsed() < Duration::from_secs(20), "registry on {port} did not start: {}", r.log.display());
            std::thread::sleep(Duration::from_millis(50));
        }
        r
    }

    pub fn log_len(&self) -> u64 {
        fs::metadata(&self.log).unwrap().len()
    }

    /// Blob GETs answered 200 since byte `offset` of the log: digests.
    pub fn blobs_served(&self, offset: u64) -> Vec<String> {
        let bytes = fs::read(&self.log).unwrap();
        String::from_utf8_lossy(&bytes[usize::try_from(offset).unwrap()..])
            .lines()
            .filter(|l| l.contains("\"GET /v2/") && l.contains("/blobs/sha256:"))
            .filter_map(|l| {
                let digest = l.split("/blobs/").nth(1)?.split([' ', '?']).next()?.to_owned();
                let status = l.split("HTTP/").nth(1)?.split("\" ").nth(1)?.split(' ').next()?;
                (status == "200").then_some(digest)
            })
            .collect()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
