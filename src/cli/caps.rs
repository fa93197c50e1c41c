//! The Linux capabilities a subcommand needs, checked before it touches anything, so that a process
//! without them (a non-root user, a container or systemd unit that drops them) is told which one is
//! missing instead of a bare EPERM from the first mount.
//!
//! Only the effective set matters: it is what the kernel checks at each `mount`, `fanotify_init` and
//! `open("/dev/cachefiles")` (capabilities(7)).

use anyhow::{anyhow, bail, Result};
use caps::{CapSet, Capability, CapsHashSet};

/// What `wisp daemon` needs: it mounts EROFS and overlayfs, marks them with fanotify pre-content
/// events, or drives /dev/cachefiles; each of these checks CAP_SYS_ADMIN.
pub(crate) const DAEMON: &[(Capability, &str)] =
    &[(Capability::CAP_SYS_ADMIN, "mounting EROFS and overlayfs, fanotify pre-content marks, /dev/cachefiles")];

/// Fails, naming `command`, each capability of `needed` missing from this process's effective set
/// and what it is needed for.
pub(crate) fn require(command: &str, needed: &[(Capability, &str)]) -> Result<()> {
    let effective =
        caps::read(None, CapSet::Effective).map_err(|e| anyhow!("reading this process's capabilities: {e}"))?;
    check(command, needed, &effective)
}

fn check(command: &str, needed: &[(Capability, &str)], effective: &CapsHashSet) -> Result<()> {
    let missing: Vec<String> =
        needed.iter().filter(|(cap, _)| !effective.contains(cap)).map(|(cap, why)| format!("{cap} ({why})")).collect();
    if !missing.is_empty() {
        bail!(
            "{command} needs {}, which this process lacks: run it as root with that capability (a container \
             runtime or service manager may have dropped it)",
            missing.join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_each_missing_capability_and_why() {
        let need = [(Capability::CAP_SYS_ADMIN, "mounts"), (Capability::CAP_MKNOD, "devices")];
        let held: CapsHashSet = [Capability::CAP_MKNOD, Capability::CAP_CHOWN].into_iter().collect();
        let err = check("wisp x", &need, &held).unwrap_err().to_string();
        assert!(err.starts_with("wisp x needs CAP_SYS_ADMIN (mounts), which this process lacks"), "{err}");
        assert!(!err.contains("CAP_MKNOD"), "{err}");
        let err = check("wisp x", &need, &CapsHashSet::default()).unwrap_err().to_string();
        assert!(err.starts_with("wisp x needs CAP_SYS_ADMIN (mounts), CAP_MKNOD (devices), which"), "{err}");
        check("wisp x", &need[1..], &held).unwrap();
    }
}
