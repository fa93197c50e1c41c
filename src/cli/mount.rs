//! `wisp mount`, `wisp umount`, `wisp stats`: clients of the daemon's control socket.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::daemon::protocol::{self, FrontendKind, MountRequest, Request};

#[derive(Debug, clap::Args)]
pub struct StateArg {
    /// The daemon's state directory (its control socket is STATE/control.sock).
    #[arg(long, default_value = "/var/lib/wisp")]
    state: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct MountArgs {
    /// The index image: docker://HOST/REPO:TAG or oci:DIR[:TAG].
    image: String,
    /// Where the container root appears (overlayfs).
    dir: PathBuf,
    /// overlayfs upper directory (default: one under the daemon's state).
    #[arg(long, requires = "work")]
    upper: Option<PathBuf>,
    /// overlayfs work directory (same file system as --upper).
    #[arg(long, requires = "upper")]
    work: Option<PathBuf>,
    /// Where the objects are, when not in the image's repository: dir:PATH.
    #[arg(long, value_name = "STORE")]
    store: Option<String>,
    /// Talk plain HTTP to the registry (a local registry).
    #[arg(long)]
    plain_http: bool,
    /// Kernel interface: auto picks what the kernel supports.
    #[arg(long, value_enum, default_value_t = FrontendKind::Auto)]
    frontend: FrontendKind,
    /// Print the daemon's answer as JSON on stdout (image id, objects, frontend, direct_io, ...).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    state: StateArg,
}

#[derive(Debug, clap::Args)]
pub struct UmountArgs {
    dir: PathBuf,
    #[command(flatten)]
    state: StateArg,
}

#[derive(Debug, clap::Args)]
pub struct StatsArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Print instead the files the image mounted at DIR has read so far, one path per line in
    /// first-read order: a prefetch list for `wisp convert --prefetch`.
    #[arg(long, value_name = "DIR")]
    accessed: Option<PathBuf>,
    #[command(flatten)]
    state: StateArg,
}

fn abs(p: PathBuf) -> Result<PathBuf> {
    std::path::absolute(&p).with_context(|| format!("{}", p.display()))
}

pub fn mount(a: MountArgs) -> Result<()> {
    let req = MountRequest {
        reference: a.image,
        dir: abs(a.dir)?,
        upper: a.upper.map(abs).transpose()?,
        work: a.work.map(abs).transpose()?,
        plain_http: a.plain_http,
        store: a.store,
        frontend: a.frontend,
        index: None,
        lower_only: false,
    };
    let v =
        protocol::call(&protocol::socket_path(&a.state.state), &Request::Mount(req), Some(Duration::from_secs(600)))?;
    eprintln!(
        "wisp mount: {} on {} ({} objects, {:.1} MB, {} frontend)",
        v["image"].as_str().unwrap_or("?"),
        v["dir"].as_str().unwrap_or("?"),
        v["objects"],
        v["content_bytes"].as_f64().unwrap_or(0.0) / 1e6,
        v["frontend"].as_str().unwrap_or("?")
    );
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    }
    Ok(())
}

pub fn umount(a: UmountArgs) -> Result<()> {
    let req = Request::Umount { dir: abs(a.dir)? };
    protocol::call(&protocol::socket_path(&a.state.state), &req, Some(Duration::from_secs(120)))?;
    Ok(())
}

pub fn stats(a: StatsArgs) -> Result<()> {
    if let Some(dir) = a.accessed {
        let req = Request::Accessed { dir: abs(dir)? };
        let v = protocol::call(&protocol::socket_path(&a.state.state), &req, Some(Duration::from_secs(60)))?;
        print!("{}", v["list"].as_str().unwrap_or_default());
        return Ok(());
    }
    let v = protocol::call(&protocol::socket_path(&a.state.state), &Request::Stats, Some(Duration::from_secs(30)))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "{:<48} {:>8} {:>8} {:>10} {:>10} {:>6} {:>8} {:>8} {:>8} {:>10}",
        "IMAGE", "OBJECTS", "FETCHED", "FETCHED_MB", "IMAGE_MB", "HITS", "P50_MS", "P90_MS", "P99_MS", "PREFETCHED"
    );
    for i in v["images"].as_array().into_iter().flatten() {
        let f = |k: &str| i[k].as_f64().unwrap_or(0.0);
        println!(
            "{:<48} {:>8} {:>8} {:>10.2} {:>10.2} {:>6} {:>8.1} {:>8.1} {:>8.1} {:>10}",
            i["reference"].as_str().unwrap_or("?"),
            f("objects"),
            f("objects_fetched"),
            f("bytes_fetched") / 1e6,
            f("stored_bytes") / 1e6,
            f("cache_hits"),
            f("latency_ms_p50"),
            f("latency_ms_p90"),
            f("latency_ms_p99"),
            format!("{}/{}", f("prefetched"), f("prefetch_listed"))
        );
    }
    let fe = &v["frontend"];
    for kind in ["open", "read"] {
        let t = &fe[kind];
        if t["count"].as_u64().unwrap_or(0) > 0 {
            let g = |k: &str| t[k].as_f64().unwrap_or(0.0);
            println!(
                "{} {}: {} answered, handling p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                fe["kind"].as_str().unwrap_or("?"),
                kind.to_uppercase(),
                t["count"],
                g("p50_ms"),
                g("p90_ms"),
                g("p99_ms"),
                g("max_ms")
            );
        }
    }
    Ok(())
}
