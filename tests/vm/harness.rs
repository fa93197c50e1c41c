//! The host/guest harness: each test re-executes itself inside a fresh VM (see the crate docs).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use erofs::tree::Digest;
use sha2::{Digest as _, Sha256};

use crate::common;

/// The name of the enclosing test function as libtest names it and its `--exact` filter wants it: the
/// module path without the crate (`daemon::daemon_cachefiles_python_lazy_start`).
macro_rules! test_name {
    () => {{
        fn f() {}
        let name = std::any::type_name_of_val(&f);
        let name = name.strip_suffix("::f").unwrap_or(name);
        name.split_once("::").map_or(name, |(_crate, rest)| rest)
    }};
}

/// True when the calling test should run its body here (inside the VM). On the host, runs the test in
/// the VM and checks its result, or skips; then returns false.
pub fn in_vm(name: &str) -> bool {
    in_vm_env(name, &[])
}

/// True on the host when the VM tests run (the host side of a test prepares its fixtures then).
pub fn vm_tests_enabled() -> bool {
    std::env::var_os("WISP_IN_VM").is_none() && std::env::var("WISP_VM_TESTS").as_deref() == Ok("1")
}

/// [`in_vm`] with extra environment variables for the guest (e.g. where the host put fixtures).
pub fn in_vm_env(name: &str, extra: &[(&str, String)]) -> bool {
    let env = |k: &str| std::env::var(k).ok();
    if env("WISP_IN_VM").is_some() {
        wisp_from_ram();
        return true;
    }
    if env("WISP_VM_TESTS").as_deref() != Some("1") {
        if env("WISP_REQUIRE_ALL").as_deref() == Some("1") {
            panic!("{name} runs in the VM: set WISP_VM_TESTS=1 (WISP_REQUIRE_ALL=1 makes skipping a failure)");
        }
        eprintln!("skipped: set WISP_VM_TESTS=1 to run {name} inside the VM (vm-tests/run)");
        return false;
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    let runner = Path::new(env!("CARGO_MANIFEST_DIR")).join("vm-tests/run");
    let mut cmd = Command::new(&runner);
    if let Some(t) = env("WISP_VM_TIMEOUT") {
        cmd.args(["--timeout", &t]);
    }
    for (k, v) in extra {
        cmd.args(["--env", &format!("{k}={v}")]);
    }
    // The checkout, this binary and wisp's: the guest sees them at the same paths, also when they are
    // where it mounts its own file systems (a checkout under /tmp; the runner shares those separately).
    let wisp = common::wisp_bin();
    for dir in [Path::new(env!("CARGO_MANIFEST_DIR")), exe.parent().unwrap(), wisp.parent().unwrap()] {
        cmd.arg("--share").arg(dir);
    }
    cmd.args(["--env", "WISP_IN_VM=1", "--"]).arg(&exe).args(["--exact", name, "--nocapture", "--test-threads=1"]);
    let start = Instant::now();
    let out = cmd.output().unwrap_or_else(|e| panic!("running {}: {e}", runner.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    // Shown by libtest when the test fails, or with --nocapture.
    println!("--- {name} in the VM ({:.1}s, {}) ---\n{stdout}", start.elapsed().as_secs_f64(), out.status);
    println!("--- vm-tests/run stderr ---\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{name} failed in the VM ({}); its output is above", out.status);
    assert!(
        stdout.contains("test result: ok. 1 passed"),
        "{name}: the VM run passed but did not run exactly this test (name filter?)"
    );
    false
}

/// Guest side: the `wisp` binary (97 MB with debug info) runs from a copy in the guest's RAM, bind-mounted
/// over its 9p path. Twice, under host load 8-10 and after a full cold walk (4,469 files read through
/// 9p, the page cache dropped), a `wisp umount` client died of SIGSEGV before it had printed anything,
/// while its daemon (started earlier, its pages resident) kept working; the same test passed at lower
/// load. Its text pages are read from 9p again after `drop_caches`; running from tmpfs takes 9p out of
/// the picture. The test binary itself still runs from 9p. (GuestDaemon prints dmesg on failure.)
fn wisp_from_ram() {
    let bin = common::wisp_bin();
    let copy = Path::new("/tmp/wisp-bin");
    if copy.exists() {
        return;
    }
    std::fs::copy(&bin, copy).expect("copying the wisp binary into the guest's /tmp");
    common::run(Command::new("mount").arg("--bind").arg(copy).arg(&bin));
}

pub const WAIT: Duration = Duration::from_secs(120);

pub fn sha256(bytes: &[u8]) -> Digest {
    Sha256::digest(bytes).into()
}
