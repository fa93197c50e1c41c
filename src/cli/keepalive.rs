//! `wisp keepalive REF`: tag the children of a copied index image so that registries whose garbage
//! collector deletes untagged manifests keep them (docs/convert.md, "Keeping objects alive").

use anyhow::{Context, Result};

use crate::oci::{self, ImageRef, TransportOptions};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The index image: oci:DIR:TAG or docker://HOST/REPO:TAG.
    image: ImageRef,
    /// Talk plain HTTP to registries (a local registry).
    #[arg(long)]
    plain_http: bool,
    /// Seconds a registry may take to accept a connection or to send the next bytes of an answer
    /// before the request fails (a stalled registry is reported, not waited for). Default: 30, or
    /// $WISP_REGISTRY_TIMEOUT.
    #[arg(long, value_name = "SECS")]
    registry_timeout: Option<f64>,
}

pub fn run(a: Args) -> Result<()> {
    let repo = oci::open(
        &a.image,
        &TransportOptions { plain_http: a.plain_http, timeout: oci::registry_timeout(a.registry_timeout) },
        false,
    )
    .with_context(|| format!("opening {}", a.image))?;
    for t in crate::index::retag(&*repo)? {
        eprintln!("wisp keepalive: tagged {t}");
    }
    Ok(())
}
