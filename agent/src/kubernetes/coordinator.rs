//! The agent's side of the cluster: the `kubernetes` reboot strategy
//! (Lease semaphore, cordon and drain before the reboot; uncordon and
//! release after a healthy boot) and the periodic Node report. It owns the
//! mapping from `[kubernetes]` configuration to the API client, the
//! semaphore and the drain options; the calls themselves live in
//! [`client`](super::client), [`lease`](super::lease),
//! [`drain`](super::drain) and [`node_report`](super::node_report).

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use super::client::{Auth, ClientConfig, KubeClient, KubeError};
use super::drain::{self, DrainError, DrainOptions};
use super::lease::{Acquire, LeaseError, RebootSemaphore, SemaphoreConfig};
use super::node_report::{self, ConditionStatus, NodeReport, NodeReportError};
use crate::config::kubernetes::KubernetesConfig;
use crate::update::strategy::{Blocked, Notice, Permit, RebootStrategy};

/// How long to wait before asking for a reboot slot again.
const SLOT_RETRY: Duration = Duration::from_secs(30);
/// How long to wait after a failed drain before trying again.
const DRAIN_RETRY: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("kubernetes.api_server is not set; the agent has no cluster to talk to")]
    NoApiServer,
    #[error("kubernetes.agent is not set: the agent needs its own credential (token_file or kubeconfig) for Leases and evictions; see docs/kubernetes-rbac.md")]
    NoCredential,
    #[error("kubernetes.agent.kubeconfig")]
    Kubeconfig(#[source] super::kubeconfig::KubeconfigError),
    #[error("reading the cluster CA {path}")]
    Ca {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("node name")]
    NodeName(#[source] super::render::RenderError),
    #[error("API client")]
    Client(#[source] KubeError),
    #[error("reboot semaphore")]
    Lease(#[from] LeaseError),
    #[error("drain of node {node}")]
    Drain {
        node: String,
        #[source]
        source: DrainError,
    },
    #[error("uncordoning node {node}")]
    Uncordon {
        node: String,
        #[source]
        source: DrainError,
    },
    #[error("reporting on node {node}")]
    Report {
        node: String,
        #[source]
        source: NodeReportError,
    },
}

/// The kubelet's current client certificate and key (one PEM file, written
/// after its TLS bootstrap and rotated by the kubelet).
pub const KUBELET_CLIENT_PEM: &str = "/var/lib/kubelet/pki/kubelet-client-current.pem";

/// The agent's identity and handles on the cluster.
#[derive(Debug)]
pub struct Cluster {
    /// The agent's own credential: Leases, pods and evictions, and the
    /// Node when the kubelet's is not usable.
    client: KubeClient,
    /// The settings of `client` with the kubelet's certificate in place of
    /// the agent's credential, for this node's own Node and status (which
    /// NodeRestriction allows a node and nothing else); `None` without a
    /// cluster CA (the kubelet's certificate is only shown to a server
    /// checked against the cluster's CA).
    node_config: Option<ClientConfig>,
    /// Where the kubelet keeps its client certificate.
    kubelet_pem: PathBuf,
    node: String,
    semaphore: RebootSemaphore,
    drain: DrainOptions,
}

impl Cluster {
    /// From `[kubernetes]`; `node` is the node's one identity
    /// ([`super::identity::node_name`]), the same name the kubelet
    /// registers; `outbound` is `[proxy]` (the API server is reached
    /// through it unless `no_proxy` names it) and `[trust] ca` (trusted
    /// beside the public roots when no cluster CA is set; a cluster CA
    /// alone decides).
    pub fn from_config(
        config: &KubernetesConfig,
        node: &str,
        outbound: &ballast_updater::http::Outbound,
    ) -> Result<Self, CoordinatorError> {
        let server = config
            .api_server
            .clone()
            .ok_or(CoordinatorError::NoApiServer)?;
        let config_ca = || -> Result<Option<Vec<u8>>, CoordinatorError> {
            Ok(match (&config.ca_pem, &config.ca_file) {
                (Some(pem), _) => Some(pem.as_bytes().to_vec()),
                (None, Some(path)) => {
                    Some(std::fs::read(path).map_err(|source| CoordinatorError::Ca {
                        path: path.clone(),
                        source,
                    })?)
                }
                (None, None) => None,
            })
        };
        // A kubeconfig names its own server and usually its CA; the
        // table's CA serves when it names none.
        let (server, ca_pem, auth) = match &config.agent {
            Some(a) => match (&a.token_file, &a.kubeconfig) {
                (Some(token), _) => (server, config_ca()?, Auth::TokenFile(token.clone())),
                (None, Some(path)) => {
                    let k = super::kubeconfig::load(path).map_err(CoordinatorError::Kubeconfig)?;
                    let ca = match k.ca_pem {
                        Some(ca) => Some(ca),
                        None => config_ca()?,
                    };
                    (k.server, ca, k.auth)
                }
                (None, None) => return Err(CoordinatorError::NoCredential),
            },
            None => return Err(CoordinatorError::NoCredential),
        };
        crate::config::kubernetes_validate::node_name(node).map_err(|detail| {
            CoordinatorError::NodeName(super::render::RenderError::NodeName {
                name: node.to_owned(),
                source_key: "node identity",
                detail,
            })
        })?;
        let node = node.to_owned();
        let mut client_config = ClientConfig::new(server, ca_pem, auth);
        client_config.outbound = outbound.clone();
        let node_config = client_config.ca_pem.is_some().then(|| ClientConfig {
            // Replaced by the kubelet's certificate at each use.
            auth: Auth::TokenFile(PathBuf::new()),
            ..client_config.clone()
        });
        let client = KubeClient::new(client_config).map_err(CoordinatorError::Client)?;
        let r = &config.reboot;
        let semaphore = RebootSemaphore::new(
            client.clone(),
            SemaphoreConfig {
                group: r.group.clone(),
                slots: r.max_concurrent,
                namespace: r.lease_namespace.clone(),
                holder: node.clone(),
                ttl: r.lease_ttl,
            },
        )?;
        Ok(Cluster {
            client,
            node_config,
            kubelet_pem: PathBuf::from(KUBELET_CLIENT_PEM),
            node,
            semaphore,
            drain: DrainOptions {
                timeout: r.drain_timeout,
                force: r.force,
                delete_emptydir_data: r.delete_emptydir_data,
                disable_eviction: r.disable_eviction,
                ..DrainOptions::default()
            },
        })
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// Reads the kubelet's certificate from `path` instead of
    /// [`KUBELET_CLIENT_PEM`] (tests).
    pub fn with_kubelet_pem(mut self, path: PathBuf) -> Self {
        self.kubelet_pem = path;
        self
    }

    /// The client for this node's own Node object and its status: the
    /// kubelet's certificate (least privilege: NodeRestriction limits it
    /// to this Node) when it is there and the API server accepts it for
    /// this Node, else the agent's credential. Read at every use, as the
    /// kubelet rotates it.
    async fn node_client(&self) -> KubeClient {
        let Some(template) = &self.node_config else {
            return self.client.clone();
        };
        let pem = match std::fs::read(&self.kubelet_pem) {
            Ok(pem) => pem,
            Err(e) => {
                tracing::debug!(path = %self.kubelet_pem.display(), error = %e, "no kubelet certificate yet; the agent's credential serves for the Node");
                return self.client.clone();
            }
        };
        let config = ClientConfig {
            auth: Auth::ClientCert {
                cert_pem: pem,
                key_pem: Vec::new(),
            },
            ..template.clone()
        };
        let kubelet = match KubeClient::new(config) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(path = %self.kubelet_pem.display(), error = %crate::error_chain(&e), "the kubelet's certificate is unusable; the agent's credential serves for the Node");
                return self.client.clone();
            }
        };
        match kubelet.get_node(&self.node).await {
            Ok(_) => kubelet,
            Err(e) => {
                tracing::info!(node = %self.node, error = %crate::error_chain(&e), "the kubelet's certificate may not read this Node (no Node authorizer?); the agent's credential serves for it");
                self.client.clone()
            }
        }
    }

    /// Waits for a reboot slot, then cordons and drains. On a failed drain
    /// the node is already uncordoned (drain's contract) and the slot is
    /// given back, so the caller only retries later.
    pub async fn before_reboot(&self) -> Result<(), CoordinatorError> {
        let slot = loop {
            match self.semaphore.acquire().await? {
                Acquire::Acquired { slot, .. } => break slot,
                Acquire::AllHeld { holders } => {
                    tracing::info!(
                        node = %self.node,
                        holders = ?holders,
                        "every reboot slot is held; waiting"
                    );
                    tokio::time::sleep(SLOT_RETRY).await;
                }
            }
        };
        tracing::info!(node = %self.node, slot, "reboot slot acquired; draining");
        // Renew the slot while a long drain runs, so its TTL never lapses.
        let renew = async {
            loop {
                tokio::time::sleep(SLOT_RETRY).await;
                if let Err(e) = self.semaphore.acquire().await {
                    tracing::warn!(error = %crate::error_chain(&e), "renewing the reboot slot");
                }
            }
        };
        let node_client = self.node_client().await;
        let drained = tokio::select! {
            r = drain::cordon_and_drain(&node_client, &self.client, &self.node, &self.drain) => r,
            () = renew => unreachable!("the renewal loop never ends"),
        };
        match drained {
            Ok(outcome) => {
                tracing::info!(
                    node = %self.node,
                    evicted = outcome.evicted.len(),
                    deleted = outcome.deleted.len(),
                    skipped = outcome.skipped.len(),
                    "drained"
                );
                Ok(())
            }
            Err(source) => {
                if let Err(e) = self.semaphore.release().await {
                    tracing::warn!(error = %crate::error_chain(&e), "releasing the reboot slot after a failed drain");
                }
                Err(CoordinatorError::Drain {
                    node: self.node.clone(),
                    source,
                })
            }
        }
    }

    /// After a healthy boot: uncordon only if we cordoned, then give the
    /// slot back. Both are no-ops when there is nothing of ours.
    pub async fn after_healthy_boot(&self) -> Result<(), CoordinatorError> {
        let uncordoned = drain::uncordon_if_ours(&self.node_client().await, &self.node)
            .await
            .map_err(|source| CoordinatorError::Uncordon {
                node: self.node.clone(),
                source,
            })?;
        let released = self.semaphore.release().await?;
        if uncordoned || !released.is_empty() {
            tracing::info!(node = %self.node, uncordoned, released = ?released, "back in service");
        }
        Ok(())
    }

    /// Sets the `BallastHealthy` condition and the `ballast.dev/*`
    /// annotations.
    pub async fn report(&self, report: &NodeReport) -> Result<(), CoordinatorError> {
        node_report::report_node(&self.node_client().await, &self.node, report)
            .await
            .map(|_| ())
            .map_err(|source| CoordinatorError::Report {
                node: self.node.clone(),
                source,
            })
    }
}

/// The `kubernetes` reboot strategy: a Lease slot, cordon and drain
/// before the reboot; uncordon and release after a healthy boot.
impl RebootStrategy for Cluster {
    fn permit(
        &self,
        _version: ballast_updater::payload::Version,
    ) -> futures_util::future::BoxFuture<'_, Result<Permit, Blocked>> {
        Box::pin(async {
            self.before_reboot().await.map(|()| Permit).map_err(|e| {
                let reason = crate::error_chain(&e);
                tracing::warn!(error = %reason, "not rebooting yet");
                Blocked {
                    reason,
                    retry_after: Some(DRAIN_RETRY),
                    notice: Notice::RebootBlocked,
                }
            })
        })
    }

    fn committed(&self) -> futures_util::future::BoxFuture<'_, ()> {
        self.back_in_service()
    }

    fn back_in_service(&self) -> futures_util::future::BoxFuture<'_, ()> {
        Box::pin(async {
            if let Err(e) = self.after_healthy_boot().await {
                tracing::warn!(error = %crate::error_chain(&e), "node not put back in service");
            }
        })
    }
}

/// How often the Node report is refreshed (it is also the heartbeat of
/// `ballast.dev/last-check`).
pub const REPORT_INTERVAL: Duration = Duration::from_secs(60);

/// Reports on the Node every [`REPORT_INTERVAL`], and at once when the
/// health verdict or the update state changes (checked every 5 s). Runs
/// for the life of the agent; a failed report is logged and retried.
pub async fn report_loop(
    cluster: std::sync::Arc<Cluster>,
    health: crate::node::health::HealthMonitor,
    update: crate::update::SharedUpdateStatus,
    version: String,
    slot: String,
) {
    tracing::info!(
        node = cluster.node(),
        "reporting health and update state on the Node"
    );
    let mut last: Option<(Option<bool>, String)> = None;
    let mut last_sent = tokio::time::Instant::now();
    loop {
        let snapshot = health.latest();
        let state = update
            .lock()
            .map(|s| s.state.name().to_owned())
            .unwrap_or_else(|_| "unknown".to_owned());
        let key = (snapshot.as_ref().map(|s| s.report.ready), state.clone());
        if last.as_ref() != Some(&key) || last_sent.elapsed() >= REPORT_INTERVAL {
            let report = node_report(
                snapshot.as_ref().map(|s| &s.report),
                &version,
                &slot,
                &state,
                snapshot
                    .as_ref()
                    .map_or_else(SystemTime::now, |s| s.checked_at),
            );
            match cluster.report(&report).await {
                Ok(()) => last = Some(key),
                Err(e) => tracing::warn!(error = %crate::error_chain(&e), "node report failed"),
            }
            last_sent = tokio::time::Instant::now();
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

/// A Node report from the health checks and the update state.
pub fn node_report(
    health: Option<&crate::node::health::HealthReport>,
    version: &str,
    slot: &str,
    update_state: &str,
    checked_at: SystemTime,
) -> NodeReport {
    let (status, reason, message) = match health {
        None => (
            ConditionStatus::Unknown,
            "HealthNotChecked",
            "the health checks have not run yet".to_owned(),
        ),
        Some(h) if h.ready => (
            ConditionStatus::True,
            "HealthChecksPassed",
            format!("{} checks passed", h.checks.len()),
        ),
        Some(h) => (
            ConditionStatus::False,
            "HealthChecksFailing",
            h.checks
                .iter()
                .filter(|c| !c.ok)
                .map(|c| format!("{}: {}", c.name, c.message))
                .collect::<Vec<_>>()
                .join("; "),
        ),
    };
    let (status, reason) = match update_state {
        "rolling-back" => (ConditionStatus::False, "RollingBack"),
        "trial" if status == ConditionStatus::True => (ConditionStatus::True, "TrialBoot"),
        _ => (status, reason),
    };
    NodeReport {
        status,
        reason: reason.to_owned(),
        message,
        version: version.to_owned(),
        slot: slot.to_owned(),
        update_state: update_state.to_owned(),
        checked_at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kubernetes::testserver::TestServer;
    use ballast_updater::http::Outbound;

    fn config(server: &str, token: &std::path::Path) -> KubernetesConfig {
        let mut c: KubernetesConfig = toml::from_str(&format!(
            "api_server = \"{server}\"\nbootstrap_token = \"abcdef.0123456789abcdef\"\nnode_name = \"node-1\"\n\
             [agent]\ntoken_file = \"{}\"\n[reboot]\ndrain_timeout = \"5s\"\n",
            token.display()
        ))
        .unwrap();
        c.reboot.max_concurrent = 1;
        c
    }

    #[test]
    fn reports_follow_health_and_update_state() {
        use crate::node::health::{CheckResult, HealthReport};
        let now = SystemTime::now();
        let r = node_report(None, "1.0.0", "a", "idle", now);
        assert_eq!(
            (r.status, r.reason.as_str()),
            (ConditionStatus::Unknown, "HealthNotChecked")
        );
        let failing = HealthReport {
            ready: false,
            checks: vec![CheckResult {
                name: "app".into(),
                ok: false,
                message: "503".into(),
                duration_ms: 1,
            }],
        };
        let r = node_report(Some(&failing), "1.0.0", "a", "idle", now);
        assert_eq!(
            (r.status, r.reason.as_str()),
            (ConditionStatus::False, "HealthChecksFailing")
        );
        assert_eq!(r.message, "app: 503");
        let passing = HealthReport {
            ready: true,
            checks: vec![],
        };
        let r = node_report(Some(&passing), "1.1.0", "b", "trial", now);
        assert_eq!(
            (r.status, r.reason.as_str()),
            (ConditionStatus::True, "TrialBoot")
        );
        let r = node_report(Some(&passing), "1.1.0", "b", "rolling-back", now);
        assert_eq!(
            (r.status, r.reason.as_str()),
            (ConditionStatus::False, "RollingBack")
        );
    }

    #[test]
    fn missing_server_or_credential_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config("https://k8s.example:6443", &dir.path().join("t"));
        c.agent = None;
        let e = Cluster::from_config(&c, "node-1", &Outbound::default()).unwrap_err();
        assert!(e.to_string().contains("kubernetes.agent"), "{e}");
        c.api_server = None;
        assert!(matches!(
            Cluster::from_config(&c, "node-1", &Outbound::default()),
            Err(CoordinatorError::NoApiServer)
        ));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_agent_kubeconfig_with_a_client_certificate_reaches_the_api_server() {
        use crate::kubernetes::testserver::tls;
        use base64::Engine;
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let server = TestServer::start_tls(true).await;
        server.add_node("node-1");
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("agent.conf");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\ncurrent-context: agent\n\
                 clusters:\n- name: test\n  cluster:\n    server: {}\n    certificate-authority-data: {}\n\
                 users:\n- name: agent\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\n\
                 contexts:\n- name: agent\n  context:\n    cluster: test\n    user: agent\n",
                server.url(),
                b64(tls::CA_PEM),
                b64(tls::CLIENT_PEM),
                b64(tls::CLIENT_KEY),
            ),
        )
        .unwrap();
        let mut c = config("https://unused.example:6443", &dir.path().join("t"));
        c.agent = Some(crate::config::kubernetes::AgentCredentials {
            token_file: None,
            kubeconfig: Some(kubeconfig.clone()),
        });
        crate::config::kubernetes_validate::validate(&c).unwrap();
        let cluster = Cluster::from_config(&c, "node-1", &Outbound::default()).unwrap();
        let node = cluster.client.get_node("node-1").await.unwrap();
        assert_eq!(node.metadata.name.as_deref(), Some("node-1"));
        assert_eq!(server.requests_matching("GET", "/api/v1/nodes/node-1"), 1);

        // A broken kubeconfig is an error naming the file and the field.
        std::fs::write(&kubeconfig, "current-context: nowhere\n").unwrap();
        let err = crate::error_chain(
            &Cluster::from_config(&c, "node-1", &Outbound::default()).unwrap_err(),
        );
        assert!(
            err.contains("agent.conf") && err.contains("current-context"),
            "{err}"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn reboot_cycle_against_a_test_api_server() {
        let server = TestServer::start_with_token("t0ken").await;
        server.add_node("node-1");
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "t0ken").unwrap();
        let cluster = Cluster::from_config(
            &config(&server.url(), &token),
            "node-1",
            &Outbound::default(),
        )
        .unwrap();
        assert_eq!(cluster.node(), "node-1");
        cluster.before_reboot().await.unwrap();
        let unschedulable = |s: &TestServer| {
            s.node("node-1")
                .spec
                .and_then(|spec| spec.unschedulable)
                .unwrap_or(false)
        };
        let holder = |s: &TestServer| {
            s.lease("ballast-system", "ballast-reboot-default-0")
                .and_then(|l| l.spec)
                .and_then(|spec| spec.holder_identity)
        };
        assert!(unschedulable(&server));
        assert_eq!(holder(&server).as_deref(), Some("node-1"));
        cluster.after_healthy_boot().await.unwrap();
        assert!(!unschedulable(&server));
        assert_eq!(holder(&server), None);
        let report = node_report(None, "1.0.0", "a", "idle", SystemTime::now());
        cluster.report(&report).await.unwrap();
        let node = server.node("node-1");
        let conditions = node.status.and_then(|s| s.conditions).unwrap_or_default();
        assert!(conditions
            .iter()
            .any(|c| c.type_ == "BallastHealthy" && c.status == "Unknown"));
    }

    /// Least privilege: against an API server with the Node authorizer,
    /// the node's own Node and status are written with the kubelet's
    /// certificate, and only Leases, pods and evictions with the agent's
    /// token; without the kubelet's certificate the token serves for all.
    #[tokio::test(flavor = "current_thread")]
    async fn the_kubelet_certificate_writes_the_node_and_the_agent_token_the_rest() {
        use crate::kubernetes::testserver::tls;
        let server = TestServer::start_with_node_authorizer("t0ken", "node-1").await;
        server.add_node("node-1");
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "t0ken").unwrap();
        let mut c = config(&server.url(), &token);
        c.ca_pem = Some(tls::CA_PEM.into());
        let pem = dir.path().join("kubelet-client-current.pem");
        let cluster = Cluster::from_config(&c, "node-1", &Outbound::default())
            .unwrap()
            .with_kubelet_pem(pem.clone());

        // No kubelet certificate yet: the agent's token does everything.
        let report = node_report(None, "1.0.0", "a", "idle", SystemTime::now());
        cluster.report(&report).await.unwrap();
        assert!(server.requests_as_node().is_empty());

        std::fs::write(&pem, format!("{}{}", tls::CLIENT_PEM, tls::CLIENT_KEY)).unwrap();
        cluster.report(&report).await.unwrap();
        cluster.before_reboot().await.unwrap();
        cluster.after_healthy_boot().await.unwrap();
        let as_node = server.requests_as_node();
        let methods: std::collections::BTreeSet<_> =
            as_node.iter().map(|(m, p)| format!("{m} {p}")).collect();
        assert_eq!(
            methods.into_iter().collect::<Vec<_>>(),
            [
                "GET /api/v1/nodes/node-1",
                "PATCH /api/v1/nodes/node-1",
                "PATCH /api/v1/nodes/node-1/status",
            ],
            "{as_node:?}"
        );
        // The Lease was taken and given back, the node cordoned and
        // uncordoned, with no 403 on the way (the node may do nothing else).
        assert!(
            server.requests_matching(
                "POST",
                "/apis/coordination.k8s.io/v1/namespaces/ballast-system/leases"
            ) >= 1
        );
        let node = server.node("node-1");
        assert!(!node.spec.and_then(|s| s.unschedulable).unwrap_or(false));
        let conditions = node.status.and_then(|s| s.conditions).unwrap_or_default();
        assert!(conditions.iter().any(|c| c.type_ == "BallastHealthy"));
    }

    /// Every body the agent sends in a reboot cycle (Lease create and
    /// updates, the cordon and uncordon patches, the eviction, the Node
    /// report) follows the Kubernetes OpenAPI schema (schema_check.rs).
    #[tokio::test(flavor = "current_thread")]
    async fn every_body_sent_follows_the_openapi_schema() {
        use crate::kubernetes::schema_check;
        use crate::kubernetes::testserver::PodSpec;
        let server = TestServer::start().await;
        server.add_node("node-1");
        server.add_pod("default", "web-1", "node-1", PodSpec::default());
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "t0ken").unwrap();
        let cluster = Cluster::from_config(
            &config(&server.url(), &token),
            "node-1",
            &Outbound::default(),
        )
        .unwrap();
        let report = node_report(None, "1.0.0", "a", "idle", SystemTime::now());
        cluster.report(&report).await.unwrap();
        cluster.before_reboot().await.unwrap();
        cluster.after_healthy_boot().await.unwrap();
        let bodies = server.bodies();
        let kinds: std::collections::BTreeSet<String> = bodies
            .iter()
            .map(|(m, p, _)| {
                let (name, _) = schema_check::schema_for(m, p)
                    .unwrap_or_else(|| panic!("no schema for {m} {p}"));
                format!("{m} {name}")
            })
            .collect();
        assert_eq!(
            kinds.into_iter().collect::<Vec<_>>(),
            ["PATCH Node", "POST Eviction", "POST Lease", "PUT Lease"],
            "{bodies:?}"
        );
        for (method, path, body) in &bodies {
            let (name, patch) = schema_check::schema_for(method, path).unwrap();
            schema_check::check(name, body, patch)
                .unwrap_or_else(|e| panic!("{method} {path}: {e}\n{body}"));
        }
    }
}
