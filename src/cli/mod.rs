//! Command-line interface: one module per subcommand; this module only parses and dispatches.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod caps;
mod convert;
mod daemon;
mod fsck;
mod inspect;
mod keepalive;
mod mkfs;
mod mount;
mod pull;
mod snapshotter;

#[derive(Debug, Parser)]
#[command(name = "wisp", version, about = "Containers that start before their image has been downloaded")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build an EROFS image from a directory (file data inside the image, or as external objects).
    Mkfs(mkfs::Args),
    /// Show an EROFS image's tree, sizes and counts.
    Inspect(inspect::Args),
    /// Check an EROFS image's structure.
    Fsck(fsck::Args),
    /// Convert an OCI image into a wisp index image plus content-addressed objects.
    Convert(convert::Args),
    /// Fetch an index image and its objects and write the whole tree (`--eager`).
    Pull(pull::Args),
    /// Tag a copied index image's children so that garbage collection keeps its objects.
    Keepalive(keepalive::Args),
    /// Run the node daemon (mounts images lazily, fills objects on first read).
    Daemon(daemon::Args),
    /// Mount an index image lazily through the daemon (overlayfs root at DIR).
    Mount(mount::MountArgs),
    /// Unmount an image the daemon mounted.
    Umount(mount::UmountArgs),
    /// Per-image fetch statistics from the daemon.
    Stats(mount::StatsArgs),
    /// Serve containerd as a proxy snapshotter (wisp images lazily, others as overlayfs).
    Snapshotter(snapshotter::Args),
}

/// Parses the command line, runs the subcommand and reports its error, if any, once.
pub fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("WISP_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Mkfs(a) => mkfs::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Fsck(a) => fsck::run(a),
        Command::Convert(a) => convert::run(a),
        Command::Pull(a) => pull::run(a),
        Command::Keepalive(a) => keepalive::run(a),
        Command::Daemon(a) => daemon::run(a),
        Command::Mount(a) => mount::mount(a),
        Command::Umount(a) => mount::umount(a),
        Command::Stats(a) => mount::stats(a),
        Command::Snapshotter(a) => snapshotter::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wisp: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A progress bar on stderr that hides itself when stderr is not a terminal.
pub(crate) fn progress_bar(len: u64, what: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::with_draw_target(Some(len), indicatif::ProgressDrawTarget::stderr());
    pb.set_style(
        indicatif::ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} {per_sec} eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}
