//! Asking containerd whether a layer is a wisp index, and where it came from. `ctr image pull`
//! (containerd 1.6) passes the snapshotter neither the image nor its manifest: the unpack's snapshot
//! labels are at most `containerd.io/snapshot.ref` (the chain id). But containerd's content store
//! labels the layer blob it unpacked with `containerd.io/uncompressed=<diff id>`, and every manifest
//! with `containerd.io/gc.ref.content.l.<i>=<layer digest>`. A wisp index image has one layer, so the
//! committed snapshot's chain id is that layer's diff id: a Content.List with that label finds the
//! layer blob, a second one the manifests whose first layer it is. The layer is a wisp index when one
//! of those manifests, read from the content store, is an index image manifest: the
//! `org.wisp.format.version` annotation this wisp reads and exactly that one layer. (Under CRI the
//! snapshot's `containerd.io/snapshot/cri.manifest-digest` and `cri.layer-digest` labels name the pair
//! directly, which also works when the layer blob was discarded after unpacking.)
//!
//! The reference: the image store's images whose target is such a manifest (or an index whose
//! `gc.ref.content.m.N` labels name one) give it, preferring CRI's `cri.image-ref` label, then a name
//! in the repository the layer was fetched from (`containerd.io/distribution.source.<host>`, whose key
//! drops the registry's port, so it cannot be the answer itself).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::{InfoRequest, ListContentRequest, ListImagesRequest, ReadContentRequest};
use containerd_snapshots::tonic;
use containerd_snapshots::tonic::transport::Channel;

use crate::index;
use crate::oci::types::ImageManifest;

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

    /// `Some(docker://HOST/REPO)` when the layer committed as the backend snapshot `name`
    /// (`NAMESPACE/N/CHAIN_ID`, as containerd's metadata store names backend snapshots) is the one
    /// layer of a wisp index image, `None` when it is not (or containerd knows no image with it).
    /// `labels` are the snapshot's own. Call from a blocking thread, not from the runtime's own.
    pub fn wisp_source(&self, name: &str, labels: &BTreeMap<String, String>) -> Result<Option<String>> {
        let mut parts = name.splitn(3, '/');
        let (Some(ns), Some(_), Some(chain)) = (parts.next(), parts.next(), parts.next()) else {
            return Ok(None);
        };
        if !chain.starts_with("sha256:") {
            return Ok(None);
        }
        self.handle.block_on(async {
            let channel = containerd_client::connect(&self.address)
                .await
                .with_context(|| format!("connecting to containerd at {}", self.address.display()))?;
            let q = Query { ns, content: ContentClient::new(channel.clone()), images: ImagesClient::new(channel) };
            q.wisp_source(chain, labels).await
        })
    }
}

const CRI_REF: &str = "containerd.io/snapshot/cri.image-ref";
const CRI_MANIFEST: &str = "containerd.io/snapshot/cri.manifest-digest";
const CRI_LAYER: &str = "containerd.io/snapshot/cri.layer-digest";
/// Manifests are small; a larger blob is not read as one.
const MAX_MANIFEST: i64 = 4 << 20;

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

    /// The bytes of a (small) blob.
    async fn read(&self, digest: &str) -> Result<Vec<u8>> {
        let info = self
            .content
            .clone()
            .info(self.request(InfoRequest { digest: digest.to_owned() })?)
            .await
            .with_context(|| format!("Content.Info {digest}"))?
            .into_inner()
            .info
            .unwrap_or_default();
        if info.size > MAX_MANIFEST {
            bail!("blob {digest}: {} bytes, too large for a manifest", info.size);
        }
        let mut stream = self
            .content
            .clone()
            .read(self.request(ReadContentRequest { digest: digest.to_owned(), offset: 0, size: 0 })?)
            .await
            .with_context(|| format!("Content.Read {digest}"))?
            .into_inner();
        let mut out = Vec::new();
        while let Some(resp) = stream.message().await.with_context(|| format!("Content.Read {digest}"))? {
            out.extend_from_slice(&resp.data);
            if out.len() as i64 > MAX_MANIFEST {
                bail!("blob {digest}: more than {MAX_MANIFEST} bytes, too large for a manifest");
            }
        }
        let got = crate::oci::types::sha256_digest(&out);
        if got != digest {
            bail!("blob {digest} read from containerd has digest {got}");
        }
        Ok(out)
    }

    /// Whether `manifest` is a wisp index image manifest whose one layer is `layer`. A blob that is
    /// missing or not a manifest is not.
    async fn is_wisp_manifest(&self, manifest: &str, layer: &str) -> Result<bool> {
        let bytes = match self.read(manifest).await {
            Ok(b) => b,
            Err(e) if is_not_found(&e) => return Ok(false),
            Err(e) => return Err(e),
        };
        let Ok(m) = serde_json::from_slice::<ImageManifest>(&bytes) else { return Ok(false) };
        Ok(m.annotations.get(index::ANN_FORMAT).map(String::as_str) == Some(index::FORMAT_VERSION)
            && matches!(m.layers.as_slice(), [l] if l.digest == layer))
    }

    async fn wisp_source(&self, chain: &str, labels: &BTreeMap<String, String>) -> Result<Option<String>> {
        // (layer digest, manifest digest) pairs to check, and the repositories the layer came from.
        let mut pairs: Vec<(String, String)> = Vec::new();
        if let (Some(m), Some(l)) = (labels.get(CRI_MANIFEST), labels.get(CRI_LAYER)) {
            pairs.push((l.clone(), m.clone()));
        }
        let mut repos: Vec<String> = Vec::new();
        for (layer, layer_labels) in self.blobs(format!("labels.\"containerd.io/uncompressed\"=={chain}")).await? {
            repos.extend(
                layer_labels
                    .iter()
                    .filter_map(|(k, v)| k.strip_prefix(SOURCE_LABEL).map(|h| (h, v)))
                    .flat_map(|(h, v)| v.split(',').map(move |r| format!("{h}/{r}"))),
            );
            for (m, _) in self.blobs(format!("labels.\"containerd.io/gc.ref.content.l.0\"=={layer}")).await? {
                pairs.push((layer.clone(), m));
            }
        }
        let mut manifests = HashSet::new();
        for (layer, m) in &pairs {
            if self.is_wisp_manifest(m, layer).await? {
                manifests.insert(m.clone());
            }
        }
        if manifests.is_empty() {
            return Ok(None);
        }
        if let Some(r) = labels.get(CRI_REF).filter(|_| labels.get(CRI_MANIFEST).is_some_and(|m| manifests.contains(m)))
        {
            return Ok(Some(format!("docker://{r}")));
        }
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
            .with_context(|| format!("no image in namespace {:?} has the wisp index layer {chain}", self.ns))?;
        Ok(Some(format!("docker://{name}")))
    }
}

/// Whether containerd answered NotFound.
fn is_not_found(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<tonic::Status>().is_some_and(|s| s.code() == tonic::Code::NotFound))
}
