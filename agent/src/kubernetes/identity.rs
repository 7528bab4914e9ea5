//! The node's one identity: the name the kubelet registers
//! (`--hostname-override`), the Node the agent reports on, cordons and
//! drains, the holder of its reboot Lease, and its FleetLock id. PID 1
//! computes it once with [`node_name`], before the network and the services
//! start, and hands the same value to each of them, so a DHCP host name
//! that arrives later never renames a Kubernetes node.
//!
//! Sources, first usable wins: `kubernetes.node_name`, the name the cloud's
//! metadata gives (an argument, `None` until a metadata source exists), the
//! configured `hostname` (lowercased, as the kubelet does), then
//! `ballast-` and the first 8 hex digits of the machine id. A source whose
//! value is not a valid Node name (DNS-1123 subdomain) is skipped with a
//! warning naming it; the machine id always gives a valid name.

use crate::config::kubernetes::KubernetesConfig;
use crate::config::kubernetes_validate as validate;

/// Where the name came from (logged at boot, so an operator sees why a
/// node has the name it has).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameSource {
    /// `kubernetes.node_name`.
    NodeName,
    /// The cloud's instance metadata.
    Metadata,
    /// The configured `hostname`.
    Hostname,
    /// `ballast-<machine id prefix>`.
    MachineId,
}

impl NameSource {
    /// The configuration key or source, as error messages name it.
    pub fn key(self) -> &'static str {
        match self {
            NameSource::NodeName => "kubernetes.node_name",
            NameSource::Metadata => "metadata",
            NameSource::Hostname => "hostname",
            NameSource::MachineId => "machine id",
        }
    }
}

/// The node's identity for this boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeIdentity {
    /// The Node's name (a DNS-1123 subdomain).
    pub name: String,
    pub source: NameSource,
    /// The 32 hex digits kept on STATE.
    pub machine_id: String,
    /// Whether `[kubernetes]` is configured.
    kubernetes: bool,
}

impl NodeIdentity {
    /// FleetLock's node id: the Node's name on a Kubernetes node (the
    /// cluster keeps names unique, and a lock held by a name is readable
    /// next to `kubectl get nodes`), the machine id elsewhere (host names
    /// need not be unique without a cluster).
    pub fn fleetlock_id(&self) -> &str {
        if self.kubernetes {
            &self.name
        } else {
            &self.machine_id
        }
    }

    /// The name DHCP must not replace: the Node's name on a Kubernetes
    /// node, `None` elsewhere (a DHCP host name may rename a plain node).
    pub fn pinned_hostname(&self) -> Option<&str> {
        self.kubernetes.then_some(self.name.as_str())
    }
}

/// `ballast-` and the first 8 hex digits of the machine id.
pub fn machine_id_name(machine_id: &str) -> String {
    let prefix: String = machine_id
        .chars()
        .filter(char::is_ascii_hexdigit)
        .take(8)
        .collect::<String>()
        .to_ascii_lowercase();
    if prefix.is_empty() {
        "ballast".to_owned()
    } else {
        format!("ballast-{prefix}")
    }
}

/// Computes the node's identity (see the module doc for the order).
/// `kubernetes` is the `[kubernetes]` table if any, `hostname` the
/// configured `hostname`, `metadata` the name instance metadata gives.
pub fn node_name(
    kubernetes: Option<&KubernetesConfig>,
    hostname: Option<&str>,
    metadata: Option<&str>,
    machine_id: &str,
) -> NodeIdentity {
    let candidates = [
        (
            NameSource::NodeName,
            kubernetes.and_then(|k| k.node_name.clone()),
        ),
        (
            NameSource::Metadata,
            metadata.map(|m| m.trim().to_ascii_lowercase()),
        ),
        (
            NameSource::Hostname,
            hostname.map(|h| h.trim().to_ascii_lowercase()),
        ),
    ];
    let chosen = candidates.into_iter().find_map(|(source, name)| {
        let name = name.filter(|n| !n.is_empty())?;
        match validate::node_name(&name) {
            Ok(()) => Some((name, source)),
            Err(detail) => {
                tracing::warn!(source = source.key(), %detail, "not a valid node name; skipped");
                None
            }
        }
    });
    let (name, source) =
        chosen.unwrap_or_else(|| (machine_id_name(machine_id), NameSource::MachineId));
    NodeIdentity {
        name,
        source,
        machine_id: machine_id.to_owned(),
        kubernetes: kubernetes.is_some(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef";

    fn k8s(node_name: Option<&str>) -> KubernetesConfig {
        KubernetesConfig {
            node_name: node_name.map(str::to_owned),
            ..KubernetesConfig::default()
        }
    }

    #[test]
    fn sources_in_order() {
        // (kubernetes.node_name, metadata, hostname) -> (name, source)
        type Case<'a> = (
            Option<&'a str>,
            Option<&'a str>,
            Option<&'a str>,
            &'a str,
            NameSource,
        );
        let table: &[Case<'_>] = &[
            (
                Some("worker-1"),
                Some("meta"),
                Some("host"),
                "worker-1",
                NameSource::NodeName,
            ),
            (
                None,
                Some("Meta-1.example"),
                Some("host"),
                "meta-1.example",
                NameSource::Metadata,
            ),
            (None, None, Some("Host-1\n"), "host-1", NameSource::Hostname),
            (None, None, None, "ballast-01234567", NameSource::MachineId),
            // Invalid or empty sources are skipped, not used.
            (
                None,
                Some("bad_name"),
                Some("host"),
                "host",
                NameSource::Hostname,
            ),
            (
                None,
                Some("  "),
                Some("x_y"),
                "ballast-01234567",
                NameSource::MachineId,
            ),
        ];
        for (node, meta, host, want, source) in table {
            let id = node_name(Some(&k8s(*node)), *host, *meta, ID);
            assert_eq!(
                (id.name.as_str(), id.source),
                (*want, *source),
                "{node:?} {meta:?} {host:?}"
            );
            assert!(validate::node_name(&id.name).is_ok());
        }
    }

    #[test]
    fn fleetlock_id_and_pinning_follow_kubernetes() {
        let id = node_name(Some(&k8s(None)), Some("node-1"), None, ID);
        assert_eq!(id.fleetlock_id(), "node-1");
        assert_eq!(id.pinned_hostname(), Some("node-1"));
        let id = node_name(None, Some("node-1"), None, ID);
        assert_eq!(id.name, "node-1");
        assert_eq!(id.fleetlock_id(), ID);
        assert_eq!(id.pinned_hostname(), None);
    }

    #[test]
    fn machine_id_names_are_valid_even_for_odd_ids() {
        assert_eq!(machine_id_name(ID), "ballast-01234567");
        assert_eq!(machine_id_name("ABCDEF"), "ballast-abcdef");
        assert_eq!(machine_id_name(""), "ballast");
        for id in [ID, "ABCDEF", "", "zz"] {
            assert!(validate::node_name(&machine_id_name(id)).is_ok(), "{id}");
        }
    }
}
