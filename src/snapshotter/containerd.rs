//! Asking containerd where a wisp layer came from. `ctr image pull` (containerd 1.6) passes no image
//! reference to the snapshotter: its snapshot labels are only `containerd.io/snapshot.ref` (the chain
//! id). But containerd's content store labels every blob it pulled with
//! `containerd.io/distribution.source.<registry host>=<repository>`, and the layer blob it unpacked
//! with `containerd.io/uncompressed=<diff id>`. A wisp index image has one layer, so the committed
//! snapshot's chain id is that layer's diff id: a Content.List with that label finds the layer blob.
//! The distribution-source label alone is not enough (containerd drops the registry's port from its
//! key), so the manifests that name the layer (`containerd.io/gc.ref.content.l.0`) are matched against
//! the image store's targets (or their index's `gc.ref.content.m.N` children): the image's name is the
//! reference, preferring a name in the repository the layer was fetched from.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::{InfoRequest, ListContentRequest, ListImagesRequest};
use containerd_snapshots::tonic;
use containerd_snapshots::tonic::transport::Channel;

/// A client of containerd's content service.
#[derive(Debug)]
pub struct ContainerdClient {
    address: PathBuf,
    handle: tokio::runtime::Handle,
}

const SOURCE_LABEL: &str = "containerd.io/distribution.source.";

impl ContainerdClient {
    pub fn new(address: &Path, handle: tokio::runtime::Handle) -> Self {
        ContainerdClient { address: address.to_owned(), handle }
    }

    /// `docker://HOST/REPO` of the layer committed as the backend snapshot `name`
    /// (`NAMESPACE/N/CHAIN_ID`, as containerd's metadata store names backend snapshots). Call from a
    /// blocking thread, not from the runtime's own.
    pub fn layer_source(&self, name: &str) -> Result<String> {
        let mut parts = name.splitn(3, '/');
        let (Some(ns), Some(_), Some(chain)) = (parts.next(), parts.next(), parts.next()) else {
            bail!("{name:?} is not a snapshot name containerd's metadata store made (NAMESPACE/N/KEY)");
        };
        if !chain.starts_with("sha256:") {
            bail!("snapshot {name:?}: its key {chain:?} is not a chain id");
        }
        self.handle.block_on(async {
            let channel = containerd_client::connect(&self.address)
                .await
                .with_context(|| format!("connecting to containerd at {}", self.address.display()))?;
            let q = Query { ns, content: ContentClient::new(channel.clone()), images: ImagesClient::new(channel) };
            q.source(chain).await
        })
    }
}

/// The lookups of one [`ContainerdClient::layer_source`] call, in one namespace.
struct Query<'a> {
    ns: &'a str,
    content: ContentClient<Channel>,
    images: ImagesClient<Channel>,
}

impl Query<'_> {
    fn request<T>(&self, msg: T) -> Result<tonic::Request<T>> {
        let mut req = tonic::Request::new(msg);
        req.metadata_mut().insert("containerd-namespace", self.ns.parse().context("namespace")?);
        Ok(req)
    }

    /// Blobs whose labels match `filter`: (digest, labels).
    async fn blobs(&self, filter: String) -> Result<Vec<(String, HashMap<String, String>)>> {
        let mut stream = self
            .content
            .clone()
            .list(self.request(ListContentRequest { filters: vec![filter] })?)
            .await
            .context("Content.List")?
            .into_inner();
        let mut out = Vec::new();
        while let Some(resp) = stream.message().await.context("Content.List")? {
            out.extend(resp.info.into_iter().map(|i| (i.digest, i.labels)));
        }
        Ok(out)
    }

    async fn source(&self, chain: &str) -> Result<String> {
        let layers = self.blobs(format!("labels.\"containerd.io/uncompressed\"=={chain}")).await?;
        let Some((layer, layer_labels)) = layers.into_iter().next() else {
            bail!("no blob in namespace {:?} of containerd's content store unpacks to {chain}", self.ns)
        };
        // Repositories the layer came from (the host part of the label has no port).
        let repos: Vec<String> = layer_labels
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(SOURCE_LABEL).map(|h| (h, v)))
            .flat_map(|(h, v)| v.split(',').map(move |r| format!("{h}/{r}")))
            .collect();
        let manifests: HashSet<String> = self
            .blobs(format!("labels.\"containerd.io/gc.ref.content.l.0\"=={layer}"))
            .await?
            .into_iter()
            .map(|(d, _)| d)
            .collect();
        let images = self
            .images
            .clone()
            .list(self.request(ListImagesRequest { filters: Vec::new() })?)
            .await
            .context("Images.List")?
            .into_inner()
            .images;
        let mut candidates = Vec::new();
        for img in images {
            let Some(target) = img.target else { continue };
            let hit = manifests.contains(&target.digest) || {
                // An index: its children are gc.ref.content.m.N labels of its blob.
                let info = self
                    .content
                    .clone()
                    .info(self.request(InfoRequest { digest: target.digest.clone() })?)
                    .await
                    .context("Content.Info")?
                    .into_inner()
                    .info
                    .unwrap_or_default();
                info.labels
                    .iter()
                    .any(|(k, v)| k.starts_with("containerd.io/gc.ref.content.m.") && manifests.contains(v))
            };
            if hit {
                candidates.push(img.name);
            }
        }
        // Prefer a name in the repository the layer was fetched from.
        let same_repo = |name: &String| {
            let (host, rest) = name.split_once('/').unwrap_or(("", name));
            let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
            let repo = rest.split(['@', ':']).next().unwrap_or(rest);
            repos.iter().any(|r| *r == format!("{host}/{repo}"))
        };
        let name = candidates
            .iter()
            .find(|n| same_repo(n))
            .or(candidates.first())
            .with_context(|| format!("no image in namespace {:?} has the layer {layer}", self.ns))?;
        Ok(format!("docker://{name}"))
    }
}
