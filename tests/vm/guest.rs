//! Shared by the daemon, containerd and fault suites: the host-side python fixture and the guest-side
//! daemon, registry and helpers.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common;
pub use crate::common::chroot;
use crate::common::registry;
pub use crate::common::registry::blobs_served;
use crate::harness::WAIT;

/// Host side: the corpus's python v1 converted by `wisp convert` into a registry storage directory
/// (through a registry on 127.0.0.1:5101, stopped afterwards).
pub struct PythonFixture {
    pub dir: PathBuf,
}

impl PythonFixture {
    /// `port`: the host registry used while building (one per test: tests run in parallel);
    /// `oracle`: also `wisp pull --eager` v1 into `oracle-v1`.
    pub fn build(port: &str, oracle: bool) -> PythonFixture {
        let dir = PathBuf::from(format!("/var/tmp/wisp-vm-cachefiles-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let port: u16 = port.parse().unwrap();
        registry::start(port, &dir.join("registry"));
        let oci = common::corpus_oci(&["python"]).display().to_string();
        let result = std::panic::catch_unwind(|| {
            common::run(Command::new(common::wisp_bin()).args([
                "convert",
                &format!("oci:{oci}/python:v1"),
                &format!("docker://127.0.0.1:{port}/wisp/python:v1"),
                "--plain-http",
            ]));
            if oracle {
                common::run(
                    Command::new(common::wisp_bin())
                        .args(["pull", "--eager", &format!("docker://127.0.0.1:{port}/wisp/python:v1")])
                        .arg(dir.join("oracle-v1"))
                        .arg("--plain-http"),
                );
            }
        });
        registry::stop(port);
        if let Err(e) = result {
            std::panic::resume_unwind(e);
        }
        PythonFixture { dir }
    }
}

impl Drop for PythonFixture {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Guest side: a `wisp daemon` (supervisor + worker) with its cache and state on /scratch.
pub struct GuestDaemon {
    child: std::process::Child,
    pub state: PathBuf,
}

impl GuestDaemon {
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> GuestDaemon {
        let state = PathBuf::from("/scratch/state");
        let log = std::fs::File::create("/scratch/daemon.log").unwrap();
        let child = Command::new(common::wisp_bin())
            .args(["daemon", "--cache", "/scratch/cache", "--state", "/scratch/state"])
            .args(args)
            .env("WISP_LOG", "info")
            .envs(env.iter().copied())
            .stderr(log)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let sock = state.join("control.sock");
        let t = Instant::now();
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            assert!(t.elapsed() < WAIT, "the daemon did not start: {}", daemon_log());
            std::thread::sleep(Duration::from_millis(100));
        }
        GuestDaemon { child, state }
    }

    pub fn wisp(&self, args: &[&str]) -> String {
        common::run(Command::new(common::wisp_bin()).args(args).arg("--state").arg(&self.state))
    }

    pub fn call(&self, req: &wisp::daemon::protocol::Request) -> serde_json::Value {
        wisp::daemon::protocol::call(&self.state.join("control.sock"), req, Some(WAIT)).unwrap()
    }

    /// `wisp mount IMAGE DIR/mnt --upper DIR/upper --work DIR/work`; returns the mount point.
    pub fn mount(&self, image: &str, dir: &Path) -> PathBuf {
        for d in ["mnt", "upper", "work"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        let (mnt, upper, work) = (dir.join("mnt"), dir.join("upper"), dir.join("work"));
        let args = [image, mnt.to_str().unwrap(), "--upper", upper.to_str().unwrap(), "--work", work.to_str().unwrap()];
        let out = self.wisp(&[&["mount"][..], &args, &["--plain-http"]].concat());
        println!("{}", out.trim());
        mnt
    }
}

impl Drop for GuestDaemon {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap()),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
        if std::thread::panicking() {
            println!("--- daemon log ---\n{}", daemon_log());
            // The console is quiet (loglevel 1): kernel messages (a process's segfault, an oops) are
            // only in the ring buffer.
            let dmesg = Command::new("dmesg").output().map(|o| o.stdout).unwrap_or_default();
            let dmesg = String::from_utf8_lossy(&dmesg);
            let lines: Vec<&str> = dmesg.lines().collect();
            println!("--- dmesg (last 60 lines) ---\n{}", lines[lines.len().saturating_sub(60)..].join("\n"));
        }
    }
}

pub fn daemon_log() -> String {
    std::fs::read_to_string("/scratch/daemon.log").unwrap_or_default()
}

/// The guest's registry (docker-registry on 127.0.0.1:5000, storage copied to /scratch).
pub fn guest_registry(fixture: &Path) -> PathBuf {
    let root = common::repo_root();
    common::run(Command::new("cp").arg("-a").arg(fixture.join("registry")).arg("/scratch/registry"));
    common::run(Command::new(root.join("scripts/registry")).args(["start", "--root", "/scratch/registry"]));
    PathBuf::from("/tmp/wisp-registry/5000/registry.log")
}

pub fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// The guest's environment naming the host-side fixture (none when the VM tests do not run).
pub fn fixture_env(fixture: Option<&PythonFixture>) -> Vec<(&'static str, String)> {
    fixture.iter().map(|f| ("WISP_VM_FIXTURE", f.dir.display().to_string())).collect()
}

/// The guest's fixture directory (`WISP_VM_FIXTURE`, set by the host side).
pub fn guest_fixture() -> PathBuf {
    PathBuf::from(std::env::var("WISP_VM_FIXTURE").expect("WISP_VM_FIXTURE from the host side"))
}
