//! A `wisp daemon` run by a test on the host, stopped on drop, and the check that the host kernel can
//! run it.

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{require, run, wisp_bin};

/// Whether fanotify pre-content marks work on this kernel (6.14+) and file system (`/var/tmp`); skips
/// with the reason otherwise (a failure under `WISP_REQUIRE_ALL=1`).
pub fn require_fanotify() -> bool {
    let ok = fscache::fanotify::Group::new().and_then(|g| {
        fs::create_dir_all("/var/tmp").ok();
        g.probe(Path::new("/var/tmp"))
    });
    require(ok.is_ok(), &format!("fanotify pre-content marks unavailable: {:?}", ok.err()))
}

/// A running `wisp daemon` with its cache, state and log (`daemon.log`) in one directory; on drop it
/// unmounts what is left in `mounts`, then stops the daemon (SIGTERM, SIGKILL after 20 s).
pub struct Daemon {
    pub child: Child,
    pub dir: PathBuf,
    pub state: PathBuf,
    pub cache: PathBuf,
    /// Mount points to unmount on drop ([`Daemon::mount`] adds, [`Daemon::umount`] removes).
    pub mounts: Vec<PathBuf>,
    /// Remove `dir` on drop once the daemon has stopped, unless the test failed.
    pub remove_dir: bool,
}

impl Daemon {
    /// `wisp daemon` in `dir` with these extra environment variables; returns once its control socket
    /// accepts connections.
    pub fn start(dir: &Path, env: &[(&str, &str)]) -> Daemon {
        let mut cmd = Command::new(wisp_bin());
        cmd.envs(env.iter().copied());
        let d = Daemon::launch(dir, cmd);
        let t = Instant::now();
        while std::os::unix::net::UnixStream::connect(d.sock()).is_err() {
            assert!(t.elapsed() < Duration::from_secs(30), "daemon did not start; see {}", d.log_path().display());
            std::thread::sleep(Duration::from_millis(50));
        }
        d
    }

    /// Spawns `cmd` (a wisp binary, or a wrapper that runs one) with `daemon --cache DIR/cache --state
    /// DIR/state` appended, `WISP_LOG=info` unless `cmd` sets it, stderr into `DIR/daemon.log`; does not
    /// wait for it.
    pub fn launch(dir: &Path, mut cmd: Command) -> Daemon {
        let (state, cache) = (dir.join("state"), dir.join("cache"));
        fs::create_dir_all(dir).unwrap();
        cmd.args(["daemon", "--cache"]).arg(&cache).arg("--state").arg(&state);
        if !cmd.get_envs().any(|(k, _)| k == "WISP_LOG") {
            cmd.env("WISP_LOG", "info");
        }
        cmd.stderr(fs::File::create(dir.join("daemon.log")).unwrap()).stdout(Stdio::null());
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
        Daemon { child, dir: dir.to_owned(), state, cache, mounts: Vec::new(), remove_dir: false }
    }

    pub fn sock(&self) -> PathBuf {
        self.state.join("control.sock")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("daemon.log")
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// `wisp ARGS --state STATE`; panics when it fails, returns stdout.
    pub fn wisp(&self, args: &[&str]) -> String {
        run(Command::new(wisp_bin()).args(args).arg("--state").arg(&self.state))
    }

    /// The daemon's `Status` answer, asked on the control socket with this timeout.
    pub fn try_status(&self, timeout: Duration) -> anyhow::Result<serde_json::Value> {
        wisp::daemon::protocol::call(&self.sock(), &wisp::daemon::protocol::Request::Status, Some(timeout))
    }

    /// [`Daemon::try_status`] with 30 s; panics when it fails.
    pub fn status(&self) -> serde_json::Value {
        self.try_status(Duration::from_secs(30)).unwrap()
    }

    /// `wisp stats --json`.
    pub fn stats(&self) -> serde_json::Value {
        serde_json::from_str(&self.wisp(&["stats", "--json"])).unwrap()
    }

    /// `wisp mount IMAGE DIR ARGS... --state STATE` (creating DIR); DIR is unmounted on drop.
    pub fn mount(&mut self, image: &str, dir: &Path, args: &[&str]) {
        self.mount_with(image, dir, args.iter().map(OsStr::new));
    }

    /// [`Daemon::mount`] with `--upper UPPER --work WORK` first (creating both).
    pub fn mount_overlay(&mut self, image: &str, dir: &Path, upper: &Path, work: &Path, args: &[&str]) {
        for d in [upper, work] {
            fs::create_dir_all(d).unwrap();
        }
        let overlay = [OsStr::new("--upper"), upper.as_os_str(), OsStr::new("--work"), work.as_os_str()];
        self.mount_with(image, dir, overlay.into_iter().chain(args.iter().map(OsStr::new)));
    }

    fn mount_with<'a>(&mut self, image: &str, dir: &Path, args: impl IntoIterator<Item = &'a OsStr>) {
        fs::create_dir_all(dir).unwrap();
        run(Command::new(wisp_bin()).args(["mount", image]).arg(dir).args(args).arg("--state").arg(&self.state));
        self.mounts.push(dir.to_owned());
    }

    /// `wisp umount DIR --state STATE`.
    pub fn umount(&mut self, dir: &Path) {
        run(Command::new(wisp_bin()).arg("umount").arg(dir).arg("--state").arg(&self.state));
        self.mounts.retain(|m| m != dir);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        for m in self.mounts.clone() {
            let _ = Command::new(wisp_bin()).arg("umount").arg(&m).arg("--state").arg(&self.state).status();
        }
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(_)) = self.child.try_wait() {
                if self.remove_dir && !std::thread::panicking() {
                    let _ = fs::remove_dir_all(&self.dir);
                }
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
