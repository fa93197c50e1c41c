//! Where and how to reach a registry, read from the node's host configuration in containerd's format,
//! so one file configures containerd, its CRI and wisp alike:
//!
//! * `DIR/HOST/hosts.toml` (DIR is `/etc/containerd/certs.d`, or `$WISP_HOSTS_DIR`; HOST is the
//!   registry as named in image references, with its port: `registry.example:5000`, `docker.io`;
//!   `DIR/_default/` applies to registries without a directory of their own). `[host."URL"]` tables are
//!   mirrors, tried in the order they appear, each for the `capabilities` it lists (`pull`, `resolve`,
//!   `push`; all three when absent); `server = "URL"` is the upstream, tried last (by default
//!   `https://HOST`). `ca` (a path or a list; relative paths are relative to the HOST directory) and
//!   `skip_verify` apply to the table they are in, the top level being the upstream's.
//! * Without a `hosts.toml`, the directory may hold the upstream's CA certificates as `*.crt` files
//!   (the docker `certs.d` layout).
//!
//! Format: <https://github.com/containerd/containerd/blob/main/docs/hosts.md>. Not supported: client
//! certificates (`client`, `*.cert`/`*.key`), `header` and `override_path`; a file that uses them is
//! refused with an error naming the key, rather than half-honoured.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The default host configuration directory (containerd's `config_path` convention).
pub const DEFAULT_DIR: &str = "/etc/containerd/certs.d";

/// The host configuration directory: `$WISP_HOSTS_DIR`, else [`DEFAULT_DIR`].
pub fn config_dir() -> PathBuf {
    std::env::var_os("WISP_HOSTS_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(DEFAULT_DIR))
}

/// One place a registry's content can come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// `host[:port]`, as it goes in URLs.
    pub host: String,
    /// Plain HTTP (credentials are never sent to such a host).
    pub http: bool,
    /// Serves blobs.
    pub pull: bool,
    /// Resolves tags to manifests.
    pub resolve: bool,
    /// Takes uploads.
    pub push: bool,
    /// PEM files of CAs to trust besides the system store.
    pub ca: Vec<PathBuf>,
    /// Accept any certificate (the file says so: `skip_verify = true`).
    pub skip_verify: bool,
    /// A mirror (not the registry the reference names).
    pub mirror: bool,
}

impl Host {
    /// A host with every capability, no CA of its own, and certificates verified.
    fn new(host: String, http: bool, mirror: bool) -> Host {
        Host { host, http, pull: true, resolve: true, push: true, ca: Vec::new(), skip_verify: false, mirror }
    }
}

/// The hosts to try for `registry` (as named in a reference, with its port), mirrors first in order,
/// the upstream last. `plain_http` makes the upstream plain HTTP when no `server` says otherwise.
pub fn resolve(dir: &Path, registry: &str, plain_http: bool) -> Result<Vec<Host>> {
    let upstream = |http| Host::new(registry.to_owned(), http, false);
    let Some(hdir) = [registry, "_default"].iter().map(|h| dir.join(h)).find(|d| d.is_dir()) else {
        return Ok(vec![upstream(plain_http)]);
    };
    let file = hdir.join("hosts.toml");
    let text = match std::fs::read_to_string(&file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut up = upstream(plain_http);
            up.ca = crt_files(&hdir)?;
            return Ok(vec![up]);
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
    };
    parse(&text, &hdir, registry, plain_http).with_context(|| format!("host configuration {}", file.display()))
}

fn crt_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let p = e.with_context(|| format!("listing {}", dir.display()))?.path();
        match p.extension().and_then(|x| x.to_str()) {
            Some("crt") => out.push(p),
            Some("cert" | "key") => {
                bail!("{}: client certificates are not supported by wisp", p.display())
            }
            _ => {}
        }
    }
    out.sort();
    Ok(out)
}

/// Parses a `hosts.toml` (its directory `hdir` anchors relative `ca` paths).
pub fn parse(text: &str, hdir: &Path, registry: &str, plain_http: bool) -> Result<Vec<Host>> {
    let doc: toml::Table = text.parse().context("not valid TOML")?;
    let mut hosts = Vec::new();
    if let Some(t) = doc.get("host") {
        let t = t.as_table().context("`host` is not a table")?;
        for (url, v) in t {
            let v = v.as_table().with_context(|| format!("host {url:?} is not a table"))?;
            let (host, http) = split_url(url).with_context(|| format!("host {url:?}"))?;
            let mut h = Host::new(host, http, true);
            apply(&mut h, v, hdir).with_context(|| format!("host {url:?}"))?;
            hosts.push(h);
        }
    }
    let (host, http) = match doc.get("server") {
        Some(s) => split_url(s.as_str().context("`server` is not a string")?).context("`server`")?,
        None => (registry.to_owned(), plain_http),
    };
    let mut up = Host::new(host, http, false);
    let mut top = doc.clone();
    top.remove("host");
    top.remove("server");
    apply(&mut up, &top, hdir)?;
    // A `host` table naming the upstream itself (containerd 1.6 wants at least one `host` table, so a
    // file for one private registry has `[host."https://HOST"]` with its `ca`) configures the upstream:
    // it is not a mirror in front of it.
    if let Some(i) = hosts.iter().position(|h| h.host == up.host && h.http == up.http) {
        let same = hosts.remove(i);
        up.ca.extend(same.ca);
        up.skip_verify |= same.skip_verify;
    }
    hosts.push(up);
    Ok(hosts)
}

/// `scheme://host[:port][/path]` to (`host[:port]`, plain HTTP).
fn split_url(url: &str) -> Result<(String, bool)> {
    let (scheme, rest) = url.split_once("://").context("not a URL (scheme://host[:port])")?;
    let http = match scheme {
        "http" => true,
        "https" => false,
        s => bail!("scheme {s:?} is neither http nor https"),
    };
    let host = rest.split('/').next().unwrap_or_default();
    if !rest.trim_end_matches('/').eq(host) && !rest.trim_end_matches('/').ends_with("/v2") {
        bail!("a path in the URL is not supported");
    }
    if host.is_empty() {
        bail!("no host in the URL");
    }
    Ok((host.to_owned(), http))
}

fn apply(h: &mut Host, t: &toml::Table, hdir: &Path) -> Result<()> {
    for (k, v) in t {
        match k.as_str() {
            "capabilities" => {
                let caps = v.as_array().context("`capabilities` is not a list")?;
                (h.pull, h.resolve, h.push) = (false, false, false);
                for c in caps {
                    match c.as_str() {
                        Some("pull") => h.pull = true,
                        Some("resolve") => h.resolve = true,
                        Some("push") => h.push = true,
                        _ => bail!("unknown capability {c}"),
                    }
                }
            }
            "ca" => {
                let list = match v {
                    toml::Value::String(s) => vec![s.as_str()],
                    toml::Value::Array(a) => {
                        a.iter().map(|x| x.as_str().context("`ca` entries must be strings")).collect::<Result<_>>()?
                    }
                    _ => bail!("`ca` is neither a path nor a list of paths"),
                };
                h.ca = list.into_iter().map(|p| hdir.join(p)).collect();
            }
            "skip_verify" => h.skip_verify = v.as_bool().context("`skip_verify` is not a boolean")?,
            other => bail!("`{other}` is not supported by wisp"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrors_in_order_then_server() {
        let text = r#"
server = "https://reg.example:5000"
ca = "up.pem"

[host."http://127.0.0.1:5001"]
  capabilities = ["pull"]

[host."https://mirror.example/v2"]
  capabilities = ["pull", "resolve"]
  ca = ["/abs/m.pem", "rel.pem"]
  skip_verify = true
"#;
        let h = parse(text, Path::new("/d/reg.example:5000"), "reg.example:5000", true).unwrap();
        assert_eq!(h.len(), 3);
        assert_eq!(
            (h[0].host.as_str(), h[0].http, h[0].pull, h[0].resolve, h[0].push),
            ("127.0.0.1:5001", true, true, false, false)
        );
        assert_eq!(h[1].host, "mirror.example");
        assert!(!h[1].http && h[1].resolve && h[1].skip_verify && h[1].mirror);
        assert_eq!(h[1].ca, [PathBuf::from("/abs/m.pem"), PathBuf::from("/d/reg.example:5000/rel.pem")]);
        // `server` names the upstream's scheme; plain_http does not override it.
        assert_eq!((h[2].host.as_str(), h[2].http, h[2].mirror), ("reg.example:5000", false, false));
        assert_eq!(h[2].ca, [PathBuf::from("/d/reg.example:5000/up.pem")]);
    }

    /// A `host` table naming the upstream configures it (containerd 1.6's way to give it a CA).
    #[test]
    fn host_table_of_the_upstream_is_the_upstream() {
        let text = "server = \"https://r:5\"\n[host.\"https://r:5\"]\n  ca = \"ca.crt\"\n";
        let h = parse(text, Path::new("/d/r:5"), "r:5", false).unwrap();
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(!h[0].mirror);
        assert_eq!(h[0].ca, [PathBuf::from("/d/r:5/ca.crt")]);
    }

    #[test]
    fn unsupported_keys_are_refused_by_name() {
        let e = parse("[host.\"https://m\"]\nheader = {}\n", Path::new("/d"), "r", false).unwrap_err();
        assert!(format!("{e:#}").contains("`header`"), "{e:#}");
        let e = parse("server = \"ftp://x\"\n", Path::new("/d"), "r", false).unwrap_err();
        assert!(format!("{e:#}").contains("ftp"), "{e:#}");
    }

    #[test]
    fn directory_lookup() {
        let d = tempfile::tempdir_in("/var/tmp").unwrap();
        // No directory: the upstream alone, its scheme from plain_http.
        let h = resolve(d.path(), "r:1", true).unwrap();
        assert_eq!(
            h,
            [Host {
                host: "r:1".into(),
                http: true,
                pull: true,
                resolve: true,
                push: true,
                ca: vec![],
                skip_verify: false,
                mirror: false
            }]
        );
        // certs.d layout: *.crt files are CAs.
        std::fs::create_dir(d.path().join("r:1")).unwrap();
        std::fs::write(d.path().join("r:1/ca.crt"), "x").unwrap();
        assert_eq!(resolve(d.path(), "r:1", false).unwrap()[0].ca, [d.path().join("r:1/ca.crt")]);
        // _default applies to others.
        std::fs::create_dir(d.path().join("_default")).unwrap();
        std::fs::write(d.path().join("_default/hosts.toml"), "[host.\"http://m:2\"]\n").unwrap();
        let h = resolve(d.path(), "other", false).unwrap();
        assert_eq!((h[0].host.as_str(), h[1].host.as_str()), ("m:2", "other"));
        std::fs::write(d.path().join("_default/hosts.toml"), "nonsense = [").unwrap();
        let e = resolve(d.path(), "other", false).unwrap_err();
        assert!(format!("{e:#}").contains("_default/hosts.toml"), "{e:#}");
    }
}
