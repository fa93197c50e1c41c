//! `wisp snapshotter`: the containerd proxy snapshotter (docs/containerd.md).

use std::path::PathBuf;

use anyhow::Result;

use crate::snapshotter::{self, Config};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Snapshot directories and metadata.
    #[arg(long, default_value = "/var/lib/wisp-snapshotter")]
    root: PathBuf,
    /// The unix socket containerd's proxy_plugins entry names.
    #[arg(long, default_value = "/run/wisp-snapshotter/snapshotter.sock")]
    address: PathBuf,
    /// The wisp daemon's state directory (its control socket is STATE/control.sock).
    #[arg(long, default_value = "/var/lib/wisp")]
    daemon_state: PathBuf,
    /// containerd's socket, to look up which repository a wisp image was pulled from.
    #[arg(long, default_value = "/run/containerd/containerd.sock")]
    containerd: PathBuf,
    /// Fetch objects over plain HTTP (a registry on this machine).
    #[arg(long)]
    plain_http: bool,
}

pub fn run(a: Args) -> Result<()> {
    let abs = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
    snapshotter::run(&Config {
        root: abs(a.root),
        address: abs(a.address),
        daemon_state: abs(a.daemon_state),
        containerd: Some(abs(a.containerd)),
        plain_http: a.plain_http,
    })
}
