//! `wisp pull --eager REF DIR`: materialize an index image's whole tree, verifying every object.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};

use crate::oci::{self, ImageRef, TransportOptions};
use crate::store::{self, StoreSpec};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Fetch every object now and write the tree (the only mode so far).
    #[arg(long)]
    eager: bool,
    /// The index image: oci:DIR[:TAG] or docker://HOST/REPO:TAG.
    image: ImageRef,
    /// Where to write the tree (must not exist, or be empty).
    dir: PathBuf,
    /// Where the objects are: dir:PATH. Default: the image's repository.
    #[arg(long, value_name = "STORE")]
    store: Option<StoreSpec>,
    /// Talk plain HTTP to registries (a local registry).
    #[arg(long)]
    plain_http: bool,
    /// Seconds a registry may take to accept a connection or to send the next bytes of an answer
    /// before the request fails (a stalled registry is reported, not waited for). Default: 30, or
    /// $WISP_REGISTRY_TIMEOUT.
    #[arg(long, value_name = "SECS")]
    registry_timeout: Option<f64>,
    /// Parallel object fetches.
    #[arg(long, default_value_t = 8)]
    jobs: usize,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    if !a.eager {
        bail!("only `wisp pull --eager` exists so far; lazy mounting is `wisp mount`");
    }
    let topts = TransportOptions { plain_http: a.plain_http, timeout: oci::registry_timeout(a.registry_timeout) };
    let repo: Arc<dyn oci::Repo> =
        Arc::from(oci::open(&a.image, &topts, false).with_context(|| format!("opening {}", a.image))?);
    let store = store::open(a.store.as_ref(), &a.image, Arc::clone(&repo), false)?;
    let s = crate::pull::pull_eager(&*repo, &*store, &a.dir, a.jobs, !a.json)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        eprintln!(
            "wisp pull: {} -> {}: {} inodes, {} files, {} objects ({:.1} MB, {:.1} MB stored), index {:.1} MB, {:.2}s",
            s.image,
            a.dir.display(),
            s.inodes,
            s.files,
            s.objects,
            s.object_bytes as f64 / 1e6,
            s.stored_bytes as f64 / 1e6,
            s.index_bytes as f64 / 1e6,
            s.seconds
        );
    }
    Ok(())
}
