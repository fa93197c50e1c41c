//! Tests that need the VM kernel (6.1 with cachefiles on-demand, vm-tests/kernel.config): the
//! cachefiles session of the `fscache` crate against EROFS images written by the `erofs` crate.
//!
//! Each test is a plain `#[test]` that runs in two places. On the host it re-executes its own test binary
//! inside a fresh VM (`vm-tests/run -- <this binary> --exact <name> --nocapture --test-threads=1`, with
//! `WISP_IN_VM=1`) and asserts that exactly that test passed there; in the VM (`WISP_IN_VM=1`) it runs its
//! body. One VM per test: `/dev/cachefiles` has a single opener and a bound cache lives until the
//! session ends, so tests must not share a kernel. On the host the tests are opt-in: without
//! `WISP_VM_TESTS=1` they print why and pass, unless `WISP_REQUIRE_ALL=1` (scripts/test), which makes the
//! skip a failure. `WISP_VM_TIMEOUT` (seconds) overrides the runner's timeout.
//!
//! One test binary, one module per suite: `selftest` (the VM and the cachefiles session), `daemon`
//! (`wisp daemon` with the cachefiles frontend), `containerd`, `faults` (fault scenarios and concurrent
//! mounts). Test names carry the module (`daemon::daemon_cachefiles_python_lazy_start`); `cargo test
//! --test vm NAME` still selects by substring.

#[path = "../common/mod.rs"]
mod common;

#[macro_use]
mod harness;
mod guest;

mod containerd;
mod daemon;
mod faults;
mod selftest;
