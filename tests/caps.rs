//! A command that needs a capability says which one is missing, before it touches anything.
//!
//! `wisp daemon` started without CAP_SYS_ADMIN (as root: util-linux `setpriv` removes it from the
//! bounding and inheritable sets, so the exec'd binary cannot have it; as another user: no
//! capabilities at all) must exit at once with an error naming CAP_SYS_ADMIN, and must not have
//! created its state or cache directory. That the process really lacked the capability is read from
//! the kernel (`CapEff` in /proc/self/status of the same `setpriv` command), not from wisp.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{have, is_root, require, wisp_bin};

/// CAP_SYS_ADMIN's bit in the capability sets (linux/capability.h).
const CAP_SYS_ADMIN_BIT: u32 = 21;

/// `PROGRAM ARGS...` without CAP_SYS_ADMIN: under setpriv as root, directly otherwise.
fn without_sys_admin(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--inh-caps=-all", "--bounding-set=-sys_admin", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

#[test]
fn daemon_without_cap_sys_admin_names_it() {
    if !require(!is_root() || have("setpriv"), "setpriv (util-linux) is needed to drop CAP_SYS_ADMIN as root") {
        return;
    }
    // The kernel's view of such a process: CAP_SYS_ADMIN is not in its effective set.
    let status = common::run(without_sys_admin(Path::new("/bin/cat")).arg("/proc/self/status"));
    let eff = status.lines().find_map(|l| l.strip_prefix("CapEff:")).expect("CapEff line").trim();
    let eff = u64::from_str_radix(eff, 16).expect("CapEff is hex");
    assert_eq!(eff & (1 << CAP_SYS_ADMIN_BIT), 0, "the test process still has CAP_SYS_ADMIN: {status}");

    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let cache = tmp.path().join("cache");
    let mut child = without_sys_admin(&wisp_bin())
        .arg("daemon")
        .arg("--state")
        .arg(&state)
        .arg("--cache")
        .arg(&cache)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning wisp daemon");
    // Refusing is immediate; a daemon still running after a minute did not refuse (liveness, not speed).
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "wisp daemon without CAP_SYS_ADMIN was still running after 60 s; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "wisp daemon without CAP_SYS_ADMIN succeeded; stderr:\n{stderr}");
    assert!(
        stderr.contains("wisp daemon needs CAP_SYS_ADMIN ("),
        "the error does not name the missing capability:\n{stderr}"
    );
    assert!(!state.exists(), "the state directory was created before the capability check");
    assert!(!cache.exists(), "the cache directory was created before the capability check");
}
