//! The registry the tests run against (`scripts/registry`: Debian's docker-registry on 127.0.0.1) and
//! what its access log shows, outside wisp.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{repo_root, run};

/// Starts a registry on `port` with its storage at `root`, after stopping one a previous run may have
/// left on that port.
pub fn start(port: u16, root: &Path) {
    stop(port);
    run(Command::new(repo_root().join("scripts/registry"))
        .args(["start", "--port", &port.to_string(), "--root"])
        .arg(root));
}

/// Stops the registry on `port`, if any.
pub fn stop(port: u16) {
    let _ = Command::new(repo_root().join("scripts/registry")).args(["stop", "--port", &port.to_string()]).output();
}

/// The access log of the registry on `port` (under `$WISP_REGISTRY_STATE`, default `/tmp/wisp-registry`).
pub fn log(port: u16) -> PathBuf {
    let state_base = std::env::var("WISP_REGISTRY_STATE").unwrap_or_else(|_| "/tmp/wisp-registry".into());
    PathBuf::from(state_base).join(port.to_string()).join("registry.log")
}

/// The log's length: the offset to count from.
pub fn log_len(log: &Path) -> u64 {
    fs::metadata(log).unwrap().len()
}

/// Blob GETs the registry served since byte `offset` of its access log: (digest, bytes).
pub fn blobs_served(log: &Path, offset: u64) -> Vec<(String, u64)> {
    blobs_served_between(log, offset, u64::MAX)
}

/// Blob GETs logged between two byte offsets of the registry's access log: (digest, bytes).
pub fn blobs_served_between(log: &Path, from: u64, to: u64) -> Vec<(String, u64)> {
    let bytes = fs::read(log).unwrap();
    let to = usize::try_from(to.min(bytes.len() as u64)).unwrap();
    let text = String::from_utf8_lossy(&bytes[usize::try_from(from).unwrap()..to]);
    text.lines()
        .filter(|l| l.contains("\"GET /v2/") && l.contains("/blobs/sha256:"))
        .filter_map(|l| {
            let digest = l.split("/blobs/").nth(1)?.split(' ').next()?.to_owned();
            let after = l.split("HTTP/1.1\" ").nth(1)?;
            let mut it = after.split(' ');
            (it.next()? == "200").then_some(())?;
            Some((digest, it.next()?.parse().ok()?))
        })
        .collect()
}
