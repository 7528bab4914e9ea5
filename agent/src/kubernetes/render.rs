//! Rendering of the files containerd and the kubelet read: a pure function
//! from the `[kubernetes]` table and the node's name to a set of files with
//! modes ([`render`]), and a writer that puts them under a root directory
//! ([`write`]): `/` on a node at every boot (`/etc` is a tmpfs), any
//! directory for `ballast kubernetes render`.
//!
//! Files (all JSON where the consumer reads YAML: JSON is YAML, so no YAML
//! crate):
//!
//! | path | mode | what |
//! |---|---|---|
//! | `/etc/kubernetes/kubelet-config.json` | 0644 | KubeletConfiguration |
//! | `/etc/kubernetes/kubelet.args` | 0644 | the kubelet's argv, one per line |
//! | `/etc/kubernetes/bootstrap-kubelet.conf` | 0600 | bootstrap kubeconfig (token) |
//! | `/etc/kubernetes/pki/ca.crt` | 0644 | cluster CA, when given inline |
//! | `/etc/containerd/config.toml` | 0644, 0600 with registry credentials | containerd configuration |
//! | `/etc/containerd/certs.d/<host>/hosts.toml` | 0644 | registry mirrors and CA (see [`super::registries`]) |
//! | `/etc/containerd/certs.d/<host>/ca.crt` | 0644 | a registry's CA, when given inline |
//! | `/etc/cni/net.d/10-ballast-bridge.conflist` | 0644 | standalone: bridge network |
//! | `/etc/kubernetes/manifests/<name>.yaml` | 0644 | standalone: static pods |
//!
//! The kubelet writes its own `/var/lib/kubelet/kubeconfig` (on STATE)
//! after TLS bootstrap; the agent never renders it.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Taint;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use serde::Serialize;
use serde_json::Value;

use crate::config::kubernetes::KubernetesConfig;
use crate::config::kubernetes_validate::{self as validate, KubernetesConfigError};

pub const KUBELET_CONFIG: &str = "/etc/kubernetes/kubelet-config.json";
pub const KUBELET_ARGS: &str = "/etc/kubernetes/kubelet.args";
pub const BOOTSTRAP_KUBECONFIG: &str = "/etc/kubernetes/bootstrap-kubelet.conf";
/// Written by the kubelet once its bootstrap CSR is signed.
pub const KUBELET_KUBECONFIG: &str = "/var/lib/kubelet/kubeconfig";
pub const CA_FILE: &str = "/etc/kubernetes/pki/ca.crt";
pub const STATIC_POD_DIR: &str = "/etc/kubernetes/manifests";
pub const CONTAINERD_CONFIG: &str = "/etc/containerd/config.toml";
pub const CONTAINERD_ENDPOINT: &str = "unix:///run/containerd/containerd.sock";
pub const CNI_CONFLIST: &str = "/etc/cni/net.d/10-ballast-bridge.conflist";

/// containerd 1.6+ (Debian's), config version 2. Every value is fixed:
/// cgroupfs (there is no systemd), Debian's CNI plugin directory, state
/// on tmpfs and images on STATE. Loopback needs no file: containerd's CRI
/// sets up `lo` itself with the `loopback` plugin from `bin_dir`.
const CONTAINERD_TOML: &str = r#"# Rendered by ballast at every boot; edits are lost. Configure [kubernetes] instead.
version = 2
root = "/var/lib/containerd"
state = "/run/containerd"

[grpc]
  address = "/run/containerd/containerd.sock"

[plugins."io.containerd.grpc.v1.cri"]
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "/etc/cni/net.d"
"#;

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error(transparent)]
    Config(#[from] KubernetesConfigError),
    #[error("no node name: set kubernetes.node_name or hostname, or pass --node-name")]
    NoNodeName,
    #[error("node name {name:?} (from {source_key}): {detail}")]
    NodeName {
        name: String,
        source_key: &'static str,
        detail: String,
    },
    #[error("encoding {path}")]
    Encode {
        path: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("writing {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One file to write: absolute path on the node, mode, contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedFile {
    pub path: PathBuf,
    pub mode: u32,
    pub contents: Vec<u8>,
}

/// Everything a node needs to run containerd and the kubelet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub node_name: String,
    /// Sorted by path.
    pub files: Vec<RenderedFile>,
    /// The kubelet's argv, program first.
    pub kubelet_argv: Vec<String>,
}

/// The Node's name: `kubernetes.node_name`, else the host name lowercased
/// (as the kubelet does), checked as a DNS-1123 subdomain.
pub fn node_name(config: &KubernetesConfig, hostname: Option<&str>) -> Result<String, RenderError> {
    let (name, source_key) = match (&config.node_name, hostname) {
        (Some(name), _) => (name.clone(), "kubernetes.node_name"),
        (None, Some(host)) if !host.trim().is_empty() => {
            (host.trim().to_ascii_lowercase(), "hostname")
        }
        _ => return Err(RenderError::NoNodeName),
    };
    validate::node_name(&name).map_err(|detail| RenderError::NodeName {
        name: name.clone(),
        source_key,
        detail,
    })?;
    Ok(name)
}

/// kubelet.config.k8s.io/v1beta1 `KubeletConfiguration`, the fields the
/// agent sets. Hand-modelled: k8s-openapi generates the API server's REST
/// types only, and the kubelet's file is a component config that no API
/// serves (the same holds for kubeconfig below).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct KubeletConfiguration {
    kind: &'static str,
    api_version: &'static str,
    cgroup_driver: &'static str,
    container_runtime_endpoint: &'static str,
    authentication: KubeletAuthentication,
    authorization: KubeletAuthorization,
    /// The unauthenticated read-only port stays closed.
    read_only_port: u16,
    rotate_certificates: bool,
    #[serde(rename = "clusterDNS", skip_serializing_if = "Vec::is_empty")]
    cluster_dns: Vec<String>,
    cluster_domain: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_pods: Option<u32>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    kube_reserved: BTreeMap<String, Quantity>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    system_reserved: BTreeMap<String, Quantity>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    eviction_hard: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    feature_gates: BTreeMap<String, bool>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    register_with_taints: Vec<Taint>,
    #[serde(skip_serializing_if = "Option::is_none")]
    static_pod_path: Option<&'static str>,
}

#[derive(Debug, Serialize)]
struct KubeletAuthentication {
    anonymous: Enabled,
    webhook: AuthnWebhook,
    x509: X509,
}

#[derive(Debug, Serialize)]
struct Enabled {
    enabled: bool,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct AuthnWebhook {
    enabled: bool,
    #[serde(rename = "cacheTTL")]
    cache_ttl: &'static str,
}

#[derive(Debug, Serialize)]
struct X509 {
    #[serde(rename = "clientCAFile", skip_serializing_if = "Option::is_none")]
    client_ca_file: Option<String>,
}

#[derive(Debug, Serialize)]
struct KubeletAuthorization {
    mode: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    webhook: Option<AuthzWebhook>,
}

#[derive(Debug, Serialize)]
struct AuthzWebhook {
    #[serde(rename = "cacheAuthorizedTTL")]
    cache_authorized_ttl: &'static str,
    #[serde(rename = "cacheUnauthorizedTTL")]
    cache_unauthorized_ttl: &'static str,
}

/// A kubeconfig (clientcmd v1 `Config`) with one cluster, user and context.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
struct Kubeconfig {
    #[serde(rename = "apiVersion")]
    api_version: &'static str,
    kind: &'static str,
    clusters: Vec<Named<KubeconfigCluster>>,
    users: Vec<Named<KubeconfigUser>>,
    contexts: Vec<Named<KubeconfigContext>>,
    current_context: &'static str,
}

#[derive(Debug, Serialize)]
struct Named<T> {
    name: &'static str,
    #[serde(flatten)]
    item: T,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
struct KubeconfigCluster {
    cluster: ClusterEntry,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
struct ClusterEntry {
    server: String,
    certificate_authority: String,
}

#[derive(Debug, Serialize)]
struct KubeconfigUser {
    user: UserEntry,
}

#[derive(Debug, Serialize)]
struct UserEntry {
    token: String,
}

#[derive(Debug, Serialize)]
struct KubeconfigContext {
    context: ContextEntry,
}

#[derive(Debug, Serialize)]
struct ContextEntry {
    cluster: &'static str,
    user: &'static str,
}

/// Renders every file for `node_name` (see [`node_name`]). Fails only on an
/// incomplete or invalid table.
pub fn render(config: &KubernetesConfig, node_name: &str) -> Result<Rendered, RenderError> {
    validate::check_complete(config)?;
    let mut files = Vec::new();
    let mut file = |path: &str, mode: u32, contents: Vec<u8>| {
        files.push(RenderedFile {
            path: path.into(),
            mode,
            contents,
        })
    };

    let ca_path = match (&config.ca_file, &config.ca_pem) {
        (Some(path), _) => Some(path.display().to_string()),
        (None, Some(pem)) => {
            let mut pem = pem.clone();
            if !pem.ends_with('\n') {
                pem.push('\n');
            }
            file(CA_FILE, 0o644, pem.into_bytes());
            Some(CA_FILE.to_owned())
        }
        (None, None) => None,
    };

    file(
        KUBELET_CONFIG,
        0o644,
        json_file(
            KUBELET_CONFIG,
            &kubelet_configuration(config, ca_path.clone())?,
        )?,
    );

    if let (Some(server), Some(token), Some(ca)) =
        (&config.api_server, &config.bootstrap_token, &ca_path)
    {
        let kubeconfig = Kubeconfig {
            api_version: "v1",
            kind: "Config",
            clusters: vec![Named {
                name: "cluster",
                item: KubeconfigCluster {
                    cluster: ClusterEntry {
                        server: server.clone(),
                        certificate_authority: ca.clone(),
                    },
                },
            }],
            users: vec![Named {
                name: "kubelet-bootstrap",
                item: KubeconfigUser {
                    user: UserEntry {
                        token: token.expose().to_owned(),
                    },
                },
            }],
            contexts: vec![Named {
                name: "bootstrap",
                item: KubeconfigContext {
                    context: ContextEntry {
                        cluster: "cluster",
                        user: "kubelet-bootstrap",
                    },
                },
            }],
            current_context: "bootstrap",
        };
        let value = serde_json::to_value(&kubeconfig).map_err(|source| RenderError::Encode {
            path: BOOTSTRAP_KUBECONFIG,
            source,
        })?;
        file(
            BOOTSTRAP_KUBECONFIG,
            0o600,
            json_file(BOOTSTRAP_KUBECONFIG, &value)?,
        );
    }

    let (registry_section, has_credentials) =
        super::registries::containerd_section(&config.registries);
    let mut containerd = CONTAINERD_TOML.to_owned();
    containerd.push_str(&registry_section);
    file(
        CONTAINERD_CONFIG,
        if has_credentials { 0o600 } else { 0o644 },
        containerd.into_bytes(),
    );
    for (path, mode, contents) in super::registries::host_files(&config.registries) {
        file(&path, mode, contents);
    }

    if config.standalone {
        let conflist = cni_conflist(config.pod_cidr());
        file(CNI_CONFLIST, 0o644, json_file(CNI_CONFLIST, &conflist)?);
        for (name, manifest) in &config.static_pods {
            let mut text = manifest.clone();
            if !text.ends_with('\n') {
                text.push('\n');
            }
            let path = format!("{STATIC_POD_DIR}/{name}.yaml");
            file(&path, 0o644, text.into_bytes());
        }
    }

    let kubelet_argv = kubelet_argv(config, node_name);
    let mut args = kubelet_argv.join("\n");
    args.push('\n');
    file(KUBELET_ARGS, 0o644, args.into_bytes());

    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(Rendered {
        node_name: node_name.to_owned(),
        files,
        kubelet_argv,
    })
}

fn kubelet_configuration(
    config: &KubernetesConfig,
    ca_path: Option<String>,
) -> Result<Value, RenderError> {
    let quantities = |map: &BTreeMap<String, String>| {
        map.iter()
            .map(|(k, v)| (k.clone(), Quantity(v.clone())))
            .collect()
    };
    // Without an API server there is nobody to ask about tokens and
    // permissions: webhooks off, and with anonymous access off and no
    // client CA nobody can authenticate, so AlwaysAllow opens nothing.
    let cluster = !config.standalone;
    let kubelet = KubeletConfiguration {
        kind: "KubeletConfiguration",
        api_version: "kubelet.config.k8s.io/v1beta1",
        cgroup_driver: "cgroupfs",
        container_runtime_endpoint: CONTAINERD_ENDPOINT,
        authentication: KubeletAuthentication {
            anonymous: Enabled { enabled: false },
            webhook: AuthnWebhook {
                enabled: cluster,
                cache_ttl: "2m0s",
            },
            // Standalone never trusts a client CA (check_complete refuses
            // one; this holds even if that check is bypassed).
            x509: X509 {
                client_ca_file: ca_path.filter(|_| cluster),
            },
        },
        authorization: if cluster {
            KubeletAuthorization {
                mode: "Webhook",
                webhook: Some(AuthzWebhook {
                    cache_authorized_ttl: "5m0s",
                    cache_unauthorized_ttl: "30s",
                }),
            }
        } else {
            KubeletAuthorization {
                mode: "AlwaysAllow",
                webhook: None,
            }
        },
        read_only_port: 0,
        rotate_certificates: cluster,
        cluster_dns: config.cluster_dns.clone(),
        cluster_domain: config.cluster_domain().to_owned(),
        max_pods: config.max_pods,
        kube_reserved: quantities(&config.kube_reserved),
        system_reserved: quantities(&config.system_reserved),
        eviction_hard: config.eviction_hard.clone(),
        feature_gates: config.feature_gates.clone(),
        register_with_taints: config
            .taints
            .iter()
            .map(|t| Taint {
                key: t.key.clone(),
                value: (!t.value.is_empty()).then(|| t.value.clone()),
                effect: t.effect.clone(),
                time_added: None,
            })
            .collect(),
        static_pod_path: config.standalone.then_some(STATIC_POD_DIR),
    };
    let mut value = serde_json::to_value(&kubelet).map_err(|source| RenderError::Encode {
        path: KUBELET_CONFIG,
        source,
    })?;
    let extra = crate::config::kubernetes_validate::toml_to_json(&toml::Value::Table(
        config.kubelet_extra.clone(),
    ))
    .map_err(|(path, detail)| KubernetesConfigError::Invalid {
        key: format!("kubernetes.kubelet_extra{path}"),
        detail,
    })?;
    merge_json(&mut value, extra);
    Ok(value)
}

/// The standalone bridge network: host-local addresses from the pod CIDR,
/// a default route through the bridge, masquerade, and host ports.
fn cni_conflist(pod_cidr: &str) -> Value {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "ballast",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": true,
                "ipMasq": true,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{ "subnet": pod_cidr }]],
                    "routes": [{ "dst": if pod_cidr.contains(':') { "::/0" } else { "0.0.0.0/0" } }]
                }
            },
            {
                "type": "portmap",
                "capabilities": { "portMappings": true }
            }
        ]
    })
}

fn kubelet_argv(config: &KubernetesConfig, node_name: &str) -> Vec<String> {
    let mut argv = vec![
        config.kubelet_path().display().to_string(),
        format!("--config={KUBELET_CONFIG}"),
    ];
    if !config.standalone {
        match &config.kubeconfig {
            Some(path) => argv.push(format!("--kubeconfig={}", path.display())),
            None => {
                argv.push(format!("--bootstrap-kubeconfig={BOOTSTRAP_KUBECONFIG}"));
                argv.push(format!("--kubeconfig={KUBELET_KUBECONFIG}"));
            }
        }
        if !config.labels.is_empty() {
            // Keys and values cannot hold ',' or '=' (validated).
            let labels: Vec<String> = config
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            argv.push(format!("--node-labels={}", labels.join(",")));
        }
    }
    if let Some(ip) = &config.node_ip {
        argv.push(format!("--node-ip={ip}"));
    }
    argv.push(format!("--hostname-override={node_name}"));
    argv
}

fn json_file(path: &'static str, value: &impl Serialize) -> Result<Vec<u8>, RenderError> {
    let mut bytes =
        serde_json::to_vec_pretty(value).map_err(|source| RenderError::Encode { path, source })?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// Objects merge key by key; anything else in `from` replaces.
fn merge_json(into: &mut Value, from: Value) {
    match (into, from) {
        (Value::Object(a), Value::Object(b)) => {
            for (key, value) in b {
                match a.get_mut(&key) {
                    Some(existing) => merge_json(existing, value),
                    None => {
                        a.insert(key, value);
                    }
                }
            }
        }
        (into, from) => *into = from,
    }
}

/// Writes `files` under `root` (each path taken relative to `/`): to a
/// temporary name created with the final mode, so a secret never exists
/// with wider permissions, then renamed into place. Returns the paths
/// written.
pub fn write(files: &[RenderedFile], root: &Path) -> Result<Vec<PathBuf>, RenderError> {
    let mut written = Vec::with_capacity(files.len());
    for f in files {
        let relative = f.path.strip_prefix("/").unwrap_or(&f.path);
        let target = root.join(relative);
        let err = |source| RenderError::Write {
            path: target.clone(),
            source,
        };
        if let Some(dir) = target.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let mut tmp_name = target.clone().into_os_string();
        tmp_name.push(".tmp");
        let tmp = PathBuf::from(tmp_name);
        let _ = std::fs::remove_file(&tmp);
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(f.mode)
            .open(&tmp)
            .map_err(err)?;
        out.write_all(&f.contents).map_err(err)?;
        // The umask may have narrowed the mode; make it exact.
        out.set_permissions(std::fs::Permissions::from_mode(f.mode))
            .map_err(err)?;
        drop(out);
        std::fs::rename(&tmp, &target).map_err(err)?;
        written.push(target);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fixture cases: `tests/fixtures/kubernetes/<case>/config.toml` (a
    /// whole node configuration) and `expected/`, the rendered tree, plus
    /// `expected.files`, one `MODE PATH` line per file, and
    /// `expected.node`, the node's name, sysctls, modules and the services'
    /// environment. Set
    /// BALLAST_UPDATE_FIXTURES=1 to rewrite the expectations.
    #[test]
    fn fixtures_render_byte_for_byte() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kubernetes");
        let update = std::env::var_os("BALLAST_UPDATE_FIXTURES").is_some();
        let mut cases: Vec<PathBuf> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.join("config.toml").is_file())
            .collect();
        cases.sort();
        assert!(cases.len() >= 3, "fixture cases in {}", root.display());
        for case in cases {
            let config_path = case.join("config.toml");
            let text = std::fs::read_to_string(&config_path).unwrap();
            let config = crate::config::Config::parse(&text, &config_path).unwrap();
            let k8s = config.kubernetes.clone().expect("a [kubernetes] table");
            let identity = super::super::identity::node_name(
                Some(&k8s),
                config.hostname.as_deref(),
                None,
                "0123456789abcdef0123456789abcdef",
            );
            let name = identity.name.clone();
            let rendered = render(&k8s, &name).unwrap();
            // What is not a file: the node's name, sysctls, modules and the
            // services' proxy environment.
            let mut node = format!("node {name} (from {})\n", identity.source.key());
            for (sysctl, value) in config.kernel.sysctls(true) {
                node.push_str(&format!("sysctl {sysctl} = {value}\n"));
            }
            for module in config.kernel.modules(true) {
                node.push_str(&format!("module {module}\n"));
            }
            for (key, value) in config.proxy.environment() {
                node.push_str(&format!("env {key}={value}\n"));
            }
            let out = tempfile::tempdir().unwrap();
            write(&rendered.files, out.path()).unwrap();
            let listing: String = rendered
                .files
                .iter()
                .map(|f| format!("{:04o} {}\n", f.mode, f.path.display()))
                .collect();
            let expected = case.join("expected");
            if update {
                let _ = std::fs::remove_dir_all(&expected);
                write(&rendered.files, &expected).unwrap();
                std::fs::write(case.join("expected.files"), &listing).unwrap();
                std::fs::write(case.join("expected.node"), &node).unwrap();
                continue;
            }
            assert_eq!(
                std::fs::read_to_string(case.join("expected.node")).unwrap(),
                node,
                "{}",
                case.display()
            );
            assert_eq!(
                std::fs::read_to_string(case.join("expected.files")).unwrap(),
                listing,
                "{}",
                case.display()
            );
            let mut on_disk = Vec::new();
            collect_files(&expected, &expected, &mut on_disk);
            on_disk.sort();
            let rendered_paths: Vec<PathBuf> =
                rendered.files.iter().map(|f| f.path.clone()).collect();
            assert_eq!(on_disk, rendered_paths, "{}", case.display());
            for f in &rendered.files {
                let relative = f.path.strip_prefix("/").unwrap();
                let want = std::fs::read(expected.join(relative)).unwrap();
                let got = std::fs::read(out.path().join(relative)).unwrap();
                assert!(
                    want == got,
                    "{}: {} differs from the fixture (BALLAST_UPDATE_FIXTURES=1 to accept):\n{}",
                    case.display(),
                    f.path.display(),
                    String::from_utf8_lossy(&got)
                );
                let mode = std::fs::metadata(out.path().join(relative))
                    .unwrap()
                    .permissions()
                    .mode()
                    & 0o7777;
                assert_eq!(mode, f.mode, "{}", f.path.display());
            }
        }
    }

    fn collect_files(base: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                collect_files(base, &path, out);
            } else {
                out.push(Path::new("/").join(path.strip_prefix(base).unwrap()));
            }
        }
    }

    fn cluster() -> KubernetesConfig {
        KubernetesConfig {
            api_server: Some("https://10.0.0.1:6443".into()),
            ca_pem: Some("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----".into()),
            bootstrap_token: Some("abcdef.0123456789abcdef".into()),
            ..KubernetesConfig::default()
        }
    }

    fn find<'a>(r: &'a Rendered, path: &str) -> Option<&'a RenderedFile> {
        r.files.iter().find(|f| f.path == Path::new(path))
    }

    #[test]
    fn secrets_are_0600_and_only_in_the_bootstrap_kubeconfig() {
        let r = render(&cluster(), "node-1").unwrap();
        for f in &r.files {
            let has_token = String::from_utf8_lossy(&f.contents).contains("0123456789abcdef");
            assert_eq!(
                has_token,
                f.path == Path::new(BOOTSTRAP_KUBECONFIG),
                "{}",
                f.path.display()
            );
            if has_token {
                assert_eq!(f.mode, 0o600);
            }
        }
        assert!(!r.kubelet_argv.join(" ").contains("0123456789abcdef"));
        let dir = tempfile::tempdir().unwrap();
        write(&r.files, dir.path()).unwrap();
        let meta =
            std::fs::metadata(dir.path().join("etc/kubernetes/bootstrap-kubelet.conf")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn registry_credentials_make_containerd_config_0600_and_stay_there() {
        let mut c = cluster();
        c.registries = toml::from_str(
            "[\"quay.io\"]\nusername = \"u\"\npassword = \"pw-9f8e7d\"\nmirrors = [\"https://m.example\"]\n",
        )
        .unwrap();
        let r = render(&c, "node-1").unwrap();
        for f in &r.files {
            let has = String::from_utf8_lossy(&f.contents).contains("pw-9f8e7d");
            assert_eq!(
                has,
                f.path == Path::new(CONTAINERD_CONFIG),
                "{}",
                f.path.display()
            );
        }
        assert_eq!(find(&r, CONTAINERD_CONFIG).unwrap().mode, 0o600);
        assert!(find(&r, "/etc/containerd/certs.d/quay.io/hosts.toml").is_some());
        assert!(!format!("{c:?}").contains("pw-9f8e7d"));
        // Without credentials the file stays 0644.
        assert_eq!(
            find(&render(&cluster(), "node-1").unwrap(), CONTAINERD_CONFIG)
                .unwrap()
                .mode,
            0o644
        );
    }

    #[test]
    fn kubelet_extra_merges_deeply_and_wins() {
        let mut c = cluster();
        c.kubelet_extra = toml::from_str(
            "serializeImagePulls = false\nreadOnlyPort = 10255\n[authentication.webhook]\ncacheTTL = \"10s\"\n",
        )
        .unwrap();
        let r = render(&c, "node-1").unwrap();
        let v: Value = serde_json::from_slice(&find(&r, KUBELET_CONFIG).unwrap().contents).unwrap();
        assert_eq!(v["serializeImagePulls"], false);
        assert_eq!(v["readOnlyPort"], 10255);
        assert_eq!(v["authentication"]["webhook"]["cacheTTL"], "10s");
        // Siblings of a merged key stay.
        assert_eq!(v["authentication"]["webhook"]["enabled"], true);
        assert_eq!(v["authentication"]["anonymous"]["enabled"], false);
        assert_eq!(v["kind"], "KubeletConfiguration");
    }

    #[test]
    fn argv_per_credential() {
        let r = render(&cluster(), "node-1").unwrap();
        assert_eq!(
            r.kubelet_argv,
            [
                "/usr/bin/kubelet",
                "--config=/etc/kubernetes/kubelet-config.json",
                "--bootstrap-kubeconfig=/etc/kubernetes/bootstrap-kubelet.conf",
                "--kubeconfig=/var/lib/kubelet/kubeconfig",
                "--hostname-override=node-1",
            ]
        );
        let mut c = cluster();
        c.bootstrap_token = None;
        c.kubeconfig = Some("/var/lib/ballast/kubelet.conf".into());
        c.node_ip = Some("10.0.0.5".into());
        let r = render(&c, "node-1").unwrap();
        assert!(r
            .kubelet_argv
            .contains(&"--kubeconfig=/var/lib/ballast/kubelet.conf".to_owned()));
        assert!(r.kubelet_argv.contains(&"--node-ip=10.0.0.5".to_owned()));
        assert!(!r.kubelet_argv.iter().any(|a| a.starts_with("--bootstrap")));
        assert!(find(&r, BOOTSTRAP_KUBECONFIG).is_none());
    }

    #[test]
    fn incomplete_config_is_refused() {
        let c = KubernetesConfig {
            api_server: Some("https://h".into()),
            ..KubernetesConfig::default()
        };
        let err = render(&c, "n").unwrap_err().to_string();
        assert!(err.contains("kubernetes.bootstrap_token"), "{err}");
    }

    #[test]
    fn node_names() {
        let c = KubernetesConfig::default();
        assert_eq!(node_name(&c, Some("Node-1\n")).unwrap(), "node-1");
        assert!(matches!(node_name(&c, None), Err(RenderError::NoNodeName)));
        let err = node_name(&c, Some("node_1")).unwrap_err().to_string();
        assert!(err.contains("hostname") && err.contains("node_1"), "{err}");
        let c = KubernetesConfig {
            node_name: Some("worker-7".into()),
            ..KubernetesConfig::default()
        };
        assert_eq!(node_name(&c, Some("other")).unwrap(), "worker-7");
    }

    #[test]
    fn containerd_config_is_valid_toml_with_cgroupfs() {
        let t: toml::Table = toml::from_str(CONTAINERD_TOML).unwrap();
        assert_eq!(t["version"].as_integer(), Some(2));
        let cri = &t["plugins"]["io.containerd.grpc.v1.cri"];
        let runc = &cri["containerd"]["runtimes"]["runc"];
        assert_eq!(runc["runtime_type"].as_str(), Some("io.containerd.runc.v2"));
        assert_eq!(runc["options"]["SystemdCgroup"].as_bool(), Some(false));
        assert_eq!(cri["cni"]["bin_dir"].as_str(), Some("/usr/lib/cni"));
        assert_eq!(cri["cni"]["conf_dir"].as_str(), Some("/etc/cni/net.d"));
    }

    #[test]
    fn rewriting_replaces_files() {
        let dir = tempfile::tempdir().unwrap();
        let file = |contents: &str| RenderedFile {
            path: "/etc/x/y.json".into(),
            mode: 0o644,
            contents: contents.as_bytes().to_vec(),
        };
        write(&[file("one")], dir.path()).unwrap();
        write(&[file("two")], dir.path()).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("etc/x/y.json")).unwrap(),
            "two"
        );
        assert!(!dir.path().join("etc/x/y.json.tmp").exists());
    }
}
