//! The `[kubernetes]` table: cluster access, node identity, kubelet
//! settings, the standalone mode, the agent's own API credential
//! (`[kubernetes.agent]`) and reboot coordination (`[kubernetes.reboot]`).
//!
//! Types only hold what the TOML says; [`super::kubernetes_validate`] checks values
//! against the API server's own rules and [`crate::kubernetes::render`] turns them into
//! files. Every table rejects unknown keys, like the rest of the config.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Where the kubelet binary is expected when `kubelet_path` is not set.
pub const DEFAULT_KUBELET_PATH: &str = "/usr/bin/kubelet";
/// The pod network of the standalone mode's bridge when `pod_cidr` is not set
/// (containerd's own example network).
pub const DEFAULT_POD_CIDR: &str = "10.88.0.0/16";
/// The cluster's DNS domain when `cluster_domain` is not set.
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";

/// The `[kubernetes]` table. Its presence turns the integration on.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesConfig {
    /// `https://HOST[:PORT]` of the API server; not used when standalone.
    pub api_server: Option<String>,
    /// The cluster CA bundle as a file on the node.
    pub ca_file: Option<PathBuf>,
    /// The cluster CA bundle inline (PEM); rendered to
    /// `/etc/kubernetes/pki/ca.crt`.
    pub ca_pem: Option<String>,
    /// `[a-z0-9]{6}.[a-z0-9]{16}`: joins through TLS bootstrap.
    pub bootstrap_token: Option<Secret>,
    /// A ready kubeconfig for the kubelet instead of a bootstrap token.
    pub kubeconfig: Option<PathBuf>,
    /// Run the kubelet without an API server: static pods only, with a
    /// bridge CNI network.
    #[serde(default)]
    pub standalone: bool,

    /// The Node's name; default: the host name.
    pub node_name: Option<String>,
    /// The address the Node reports.
    pub node_ip: Option<String>,
    /// Labels the kubelet sets on its own Node (NodeRestriction applies).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Taints the Node registers with.
    #[serde(default)]
    pub taints: Vec<TaintConfig>,

    /// Cluster DNS server addresses.
    #[serde(default)]
    pub cluster_dns: Vec<String>,
    /// Default `cluster.local`.
    pub cluster_domain: Option<String>,
    pub max_pods: Option<u32>,
    /// Resource name (`cpu`, `memory`, `ephemeral-storage`, `pid`) to quantity.
    #[serde(default)]
    pub kube_reserved: BTreeMap<String, String>,
    #[serde(default)]
    pub system_reserved: BTreeMap<String, String>,
    /// Eviction signal (`memory.available`, ...) to a quantity or percentage.
    #[serde(default)]
    pub eviction_hard: BTreeMap<String, String>,
    #[serde(default)]
    pub feature_gates: BTreeMap<String, bool>,
    /// Merged last into the rendered KubeletConfiguration (its own camelCase
    /// keys; tables merge, the user's values win).
    #[serde(default)]
    pub kubelet_extra: toml::Table,
    /// Default `/usr/bin/kubelet`.
    pub kubelet_path: Option<PathBuf>,

    /// Standalone mode: the bridge network's pod subnet.
    pub pod_cidr: Option<String>,
    /// Standalone mode: manifests by name, rendered as
    /// `/etc/kubernetes/manifests/<name>.yaml`.
    #[serde(default)]
    pub static_pods: BTreeMap<String, String>,

    /// Registry host (`docker.io`, `HOST:PORT`, `_default`) to mirrors, CA
    /// and pull credentials, rendered for containerd.
    #[serde(default)]
    pub registries: BTreeMap<String, super::kubernetes_registries::RegistryConfig>,

    /// The agent's own credential for its API calls.
    pub agent: Option<AgentCredentials>,
    #[serde(default)]
    pub reboot: RebootConfig,
}

/// A secret string: serialized as is (it goes into 0600 files), but its
/// `Debug` form is redacted so a logged config never carries it.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Secret(s.to_owned())
    }
}

/// One taint, like the `Taint` of the core/v1 API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaintConfig {
    pub key: String,
    #[serde(default)]
    pub value: String,
    /// `NoSchedule`, `PreferNoSchedule` or `NoExecute`.
    pub effect: String,
}

/// `[kubernetes.agent]`: exactly one of the two.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentCredentials {
    /// A service-account token file (bearer token, re-read on every use).
    pub token_file: Option<PathBuf>,
    /// A kubeconfig for the agent.
    pub kubeconfig: Option<PathBuf>,
}

/// `[kubernetes.reboot]`: the cluster-wide reboot semaphore (a Lease per
/// slot) and the drain before a reboot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RebootConfig {
    /// How many nodes of the group may reboot at once.
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent: u32,
    /// Nodes sharing a group share the semaphore.
    #[serde(default = "default_group")]
    pub group: String,
    #[serde(default = "default_lease_namespace")]
    pub lease_namespace: String,
    /// A holder that has not renewed within this is presumed gone.
    #[serde(default = "default_lease_ttl", with = "crate::duration")]
    pub lease_ttl: Duration,
    #[serde(default = "default_drain_timeout", with = "crate::duration")]
    pub drain_timeout: Duration,
    /// Also evict pods no controller owns (kubectl's `--force`).
    #[serde(default)]
    pub force: bool,
    /// Also evict pods with `emptyDir` volumes, losing their data.
    #[serde(default)]
    pub delete_emptydir_data: bool,
    /// Delete pods instead of evicting them, bypassing PodDisruptionBudgets.
    #[serde(default)]
    pub disable_eviction: bool,
}

impl Default for RebootConfig {
    fn default() -> Self {
        RebootConfig {
            max_concurrent: default_max_concurrent(),
            group: default_group(),
            lease_namespace: default_lease_namespace(),
            lease_ttl: default_lease_ttl(),
            drain_timeout: default_drain_timeout(),
            force: false,
            delete_emptydir_data: false,
            disable_eviction: false,
        }
    }
}

fn default_max_concurrent() -> u32 {
    1
}

fn default_group() -> String {
    "default".into()
}

fn default_lease_namespace() -> String {
    "ballast-system".into()
}

fn default_lease_ttl() -> Duration {
    Duration::from_secs(15 * 60)
}

fn default_drain_timeout() -> Duration {
    Duration::from_secs(5 * 60)
}

impl KubernetesConfig {
    /// The kubelet binary this node runs.
    pub fn kubelet_path(&self) -> PathBuf {
        self.kubelet_path
            .clone()
            .unwrap_or_else(|| DEFAULT_KUBELET_PATH.into())
    }

    pub fn cluster_domain(&self) -> &str {
        self.cluster_domain
            .as_deref()
            .unwrap_or(DEFAULT_CLUSTER_DOMAIN)
    }

    pub fn pod_cidr(&self) -> &str {
        self.pod_cidr.as_deref().unwrap_or(DEFAULT_POD_CIDR)
    }
}

/// Service names the integration takes; `[services]` may not reuse them.
pub const CONTAINERD_SERVICE: &str = "containerd";
pub const KUBELET_SERVICE: &str = "kubelet";

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct Doc {
        kubernetes: KubernetesConfig,
    }

    #[test]
    fn reboot_defaults_apply_when_the_table_is_absent_or_partial() {
        let doc: Doc = toml::from_str("[kubernetes]\nstandalone = true\n").unwrap();
        assert_eq!(doc.kubernetes.reboot, RebootConfig::default());
        assert_eq!(doc.kubernetes.reboot.lease_ttl, Duration::from_secs(900));
        let doc: Doc =
            toml::from_str("[kubernetes.reboot]\nmax_concurrent = 3\nlease_ttl = \"1h\"\n")
                .unwrap();
        let r = doc.kubernetes.reboot;
        assert_eq!(r.max_concurrent, 3);
        assert_eq!(r.lease_ttl, Duration::from_secs(3600));
        assert_eq!(r.group, "default");
        assert_eq!(r.lease_namespace, "ballast-system");
        assert_eq!(r.drain_timeout, Duration::from_secs(300));
        assert!(!r.force);
        assert!(!r.delete_emptydir_data);
        assert!(!r.disable_eviction);
        let doc: Doc = toml::from_str(
            "[kubernetes.reboot]\nforce = true\ndelete_emptydir_data = true\ndisable_eviction = true\n",
        )
        .unwrap();
        let r = doc.kubernetes.reboot;
        assert!(r.force && r.delete_emptydir_data && r.disable_eviction);
    }

    #[test]
    fn unknown_keys_and_bad_durations_are_refused_by_name() {
        let err = toml::from_str::<Doc>("[kubernetes]\napi_sever = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("api_sever"), "{err}");
        let err = toml::from_str::<Doc>("[kubernetes.reboot]\ndrain_timeout = \"soon\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("drain_timeout") && err.contains("soon"),
            "{err}"
        );
        let err = toml::from_str::<Doc>(
            "[[kubernetes.taints]]\nkey = \"a\"\neffect = \"NoSchedule\"\nvalu = \"b\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("valu"), "{err}");
    }

    #[test]
    fn the_token_is_redacted_in_debug_output() {
        let doc: Doc =
            toml::from_str("[kubernetes]\nbootstrap_token = \"abcdef.0123456789abcdef\"\n")
                .unwrap();
        let shown = format!("{:?}", doc.kubernetes);
        assert!(!shown.contains("0123456789abcdef"), "{shown}");
        assert_eq!(
            doc.kubernetes.bootstrap_token.unwrap().expose(),
            "abcdef.0123456789abcdef"
        );
    }

    #[test]
    fn defaults_for_paths_and_networks() {
        let c = KubernetesConfig::default();
        assert_eq!(c.kubelet_path(), PathBuf::from("/usr/bin/kubelet"));
        assert_eq!(c.cluster_domain(), "cluster.local");
        assert_eq!(c.pod_cidr(), "10.88.0.0/16");
    }
}
