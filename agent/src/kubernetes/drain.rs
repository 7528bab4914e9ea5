//! Cordon, drain and uncordon of this node before and after an update
//! reboot, as `kubectl drain` does it: mark the Node unschedulable, evict
//! its pods through the Eviction API (so PodDisruptionBudgets are honoured:
//! a 429 is retried until the drain timeout), and wait for them to be gone.
//! A drain that does not finish in time fails; nothing is deleted past a
//! budget.
//!
//! Pods that a drain leaves alone: DaemonSet pods (their controller puts
//! them back and tolerates unschedulable nodes), mirror pods of static pods
//! (the API cannot delete them) and pods that already finished.
//!
//! Pods a drain refuses to move, like `kubectl drain`, unless told: pods no
//! controller owns (gone for good once evicted; `force`, kubectl's
//! `--force`) and pods with `emptyDir` volumes (their data is lost;
//! `delete_emptydir_data`). The refusal names every such pod and happens
//! before anything is evicted. `disable_eviction` deletes pods instead of
//! evicting them, bypassing PodDisruptionBudgets (kubectl's
//! `--disable-eviction`); nothing else ever does.
//!
//! Ownership of the cordon: the agent marks a Node it cordons with the
//! annotation `ballast.dev/cordoned=true`, so after the reboot (or an agent
//! restart) it knows the cordon is its own. A node an operator cordoned is
//! never annotated and never uncordoned by the agent. A drain that fails
//! uncordons a node the agent cordoned: a failed update must not leave a
//! node out of service for good.
//!
//! Permissions: the node's own credential may patch its Node (cordon), but
//! listing pods cluster-wide, creating evictions and deleting pods need the
//! agent's RBAC (docs/kubernetes-rbac.md).

use std::time::Duration;

use k8s_openapi::api::policy::v1::Eviction;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::{json, Value};
use tokio::time::Instant;

use super::client::{
    is_dns_subdomain, node_path, KubeClient, KubeError, NodeView, PatchKind, PodView,
};

/// Present (value `true`) while the node is cordoned by the agent.
pub const ANNOTATION_CORDONED: &str = "ballast.dev/cordoned";
pub const ANNOTATION_MIRROR: &str = "kubernetes.io/config.mirror";

/// Node updates that keep meeting 409 are given up after this many tries.
const MAX_CONFLICTS: u32 = 5;
/// The longest pause between eviction rounds and between polls.
const MAX_PAUSE: Duration = Duration::from_secs(10);

/// The `[kubernetes.reboot]` drain settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainOptions {
    /// How long evictions and pod termination may take in all.
    pub timeout: Duration,
    /// Also move pods no controller owns (kubectl's `--force`).
    pub force: bool,
    /// Also move pods with `emptyDir` volumes, losing their data.
    pub delete_emptydir_data: bool,
    /// Delete pods instead of evicting them: PodDisruptionBudgets are not
    /// consulted.
    pub disable_eviction: bool,
    /// First pause between eviction rounds and between polls (it doubles,
    /// up to 10 s).
    pub poll_interval: Duration,
}

impl Default for DrainOptions {
    fn default() -> Self {
        DrainOptions {
            timeout: Duration::from_secs(5 * 60),
            force: false,
            delete_emptydir_data: false,
            disable_eviction: false,
            poll_interval: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    DaemonSet,
    Mirror,
    Finished,
}

/// What a drain did, pods named `namespace/name`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DrainOutcome {
    /// The agent cordoned the node (and will uncordon it after the reboot).
    pub cordoned_by_us: bool,
    pub evicted: Vec<String>,
    /// Deleted without an eviction because `disable_eviction` was set.
    pub deleted: Vec<String>,
    pub skipped: Vec<(String, SkipReason)>,
}

#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    #[error("node name {0:?} is not a valid Kubernetes object name")]
    NodeName(String),
    #[error("cordoning node {node}")]
    Cordon {
        node: String,
        #[source]
        source: Box<KubeError>,
    },
    #[error("uncordoning node {node}")]
    Uncordon {
        node: String,
        #[source]
        source: Box<KubeError>,
    },
    #[error("node {node}: changed by others {tries} times in a row while updating it")]
    Contended { node: String, tries: u32 },
    #[error("listing the pods on node {node}")]
    ListPods {
        node: String,
        #[source]
        source: Box<KubeError>,
    },
    #[error("evicting pod {pod}")]
    Evict {
        pod: String,
        #[source]
        source: Box<KubeError>,
    },
    #[error("deleting pod {pod}")]
    Delete {
        pod: String,
        #[source]
        source: Box<KubeError>,
    },
    #[error("draining node {node}: {}", refusal(unmanaged, empty_dir))]
    Refused {
        node: String,
        /// Pods no controller owns (`namespace/name`).
        unmanaged: Vec<String>,
        /// Pods with `emptyDir` volumes.
        empty_dir: Vec<String>,
    },
    #[error("draining node {node}: {} pod(s) still there after {}: {}", remaining.len(), humantime::format_duration(*timeout), remaining.join(", "))]
    Timeout {
        node: String,
        timeout: Duration,
        remaining: Vec<String>,
    },
}

fn refusal(unmanaged: &[String], empty_dir: &[String]) -> String {
    let mut parts = Vec::new();
    if !unmanaged.is_empty() {
        parts.push(format!(
            "cannot move pods no controller owns (set kubernetes.reboot.force = true to evict them anyway): {}",
            unmanaged.join(", ")
        ));
    }
    if !empty_dir.is_empty() {
        parts.push(format!(
            "cannot move pods with emptyDir data (set kubernetes.reboot.delete_emptydir_data = true to lose it): {}",
            empty_dir.join(", ")
        ));
    }
    parts.join("; ")
}

/// A pod the drain has to move.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PodRef {
    namespace: String,
    name: String,
    uid: Option<String>,
}

impl PodRef {
    fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    fn path(&self) -> String {
        format!("/api/v1/namespaces/{}/pods/{}", self.namespace, self.name)
    }
}

fn check_name(node: &str) -> Result<(), DrainError> {
    if is_dns_subdomain(node) {
        Ok(())
    } else {
        Err(DrainError::NodeName(node.to_string()))
    }
}

fn cordoned_by_us(node: &NodeView) -> bool {
    node.annotation(ANNOTATION_CORDONED) == Some("true")
}

/// Mark the node unschedulable. Returns whether the cordon is ours: false
/// when it was already unschedulable without our annotation (an operator's
/// cordon, which we then leave alone).
pub async fn cordon(client: &KubeClient, node: &str) -> Result<bool, DrainError> {
    let kube = |source: KubeError| DrainError::Cordon {
        node: node.to_string(),
        source: Box::new(source),
    };
    let settled = |current: &NodeView| {
        current.unschedulable.then(|| {
            let ours = cordoned_by_us(current);
            tracing::info!(node, ours, "node already cordoned");
            ours
        })
    };
    match patch_cordon(client, node, kube, settled, json!("true"), json!(true)).await? {
        Cordon::Patched => {
            tracing::info!(node, "node cordoned");
            Ok(true)
        }
        Cordon::Settled(ours) => Ok(ours),
    }
}

/// After a healthy boot: make the node schedulable again if, and only if,
/// the agent cordoned it. Returns whether it did.
pub async fn uncordon_if_ours(client: &KubeClient, node: &str) -> Result<bool, DrainError> {
    let kube = |source: KubeError| DrainError::Uncordon {
        node: node.to_string(),
        source: Box::new(source),
    };
    let settled = |current: &NodeView| (!cordoned_by_us(current)).then_some(false);
    match patch_cordon(client, node, kube, settled, Value::Null, Value::Null).await? {
        Cordon::Patched => {
            tracing::info!(node, "node uncordoned");
            Ok(true)
        }
        Cordon::Settled(done) => Ok(done),
    }
}

/// What [`patch_cordon`] did.
enum Cordon {
    Patched,
    /// Nothing to do; the caller's answer for the node as it was.
    Settled(bool),
}

/// Sets `spec.unschedulable` and our annotation to the given values unless
/// `settled` says there is nothing to do (its answer is then returned).
/// The patch carries the node's resourceVersion, so a change by someone
/// else in between (a 409) makes us look again instead of claiming or
/// undoing their cordon.
async fn patch_cordon(
    client: &KubeClient,
    node: &str,
    kube: impl Fn(KubeError) -> DrainError,
    settled: impl Fn(&NodeView) -> Option<bool>,
    annotation: Value,
    unschedulable: Value,
) -> Result<Cordon, DrainError> {
    check_name(node)?;
    let path = node_path(node);
    for _ in 0..MAX_CONFLICTS {
        let current = client.get_node(node).await.map_err(&kube)?;
        if let Some(answer) = settled(&current) {
            return Ok(Cordon::Settled(answer));
        }
        let patch = json!({
            "metadata": {
                "resourceVersion": current.metadata.resource_version,
                "annotations": {ANNOTATION_CORDONED: annotation},
            },
            "spec": {"unschedulable": unschedulable},
        });
        match client.patch::<Value>(&path, PatchKind::Merge, &patch).await {
            Ok(_) => return Ok(Cordon::Patched),
            Err(e) if e.is_conflict() => continue,
            Err(e) => return Err(kube(e)),
        }
    }
    Err(DrainError::Contended {
        node: node.to_string(),
        tries: MAX_CONFLICTS,
    })
}

/// Cordon the node (with `node_client`, which may be the node's own
/// credential) and move its pods off (with `client`, which may list and
/// evict pods). On any failure a cordon the agent made is undone before
/// the error is returned.
pub async fn cordon_and_drain(
    node_client: &KubeClient,
    client: &KubeClient,
    node: &str,
    options: &DrainOptions,
) -> Result<DrainOutcome, DrainError> {
    let ours = cordon(node_client, node).await?;
    match drain(client, node, options).await {
        Ok(mut outcome) => {
            outcome.cordoned_by_us = ours;
            Ok(outcome)
        }
        Err(e) => {
            if ours {
                if let Err(undo) = uncordon_if_ours(node_client, node).await {
                    tracing::warn!(node, error = %undo, "drain failed and the node could not be uncordoned; it will be on the next boot");
                }
            }
            Err(e)
        }
    }
}

async fn list_pods(client: &KubeClient, node: &str) -> Result<Vec<PodView>, DrainError> {
    client
        .list_pods_on(node)
        .await
        .map_err(|source| DrainError::ListPods {
            node: node.to_string(),
            source: Box::new(source),
        })
}

fn skip_reason(pod: &PodView) -> Option<SkipReason> {
    let meta = &pod.metadata;
    if meta
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(ANNOTATION_MIRROR))
    {
        return Some(SkipReason::Mirror);
    }
    if meta
        .owner_references
        .as_ref()
        .is_some_and(|o| o.iter().any(|r| r.kind == "DaemonSet"))
    {
        return Some(SkipReason::DaemonSet);
    }
    if matches!(pod.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return Some(SkipReason::Finished);
    }
    None
}

fn pod_ref(pod: &PodView) -> PodRef {
    PodRef {
        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        name: pod.metadata.name.clone().unwrap_or_default(),
        uid: pod.metadata.uid.clone(),
    }
}

/// The pods from `wanted` still on the node (matched by uid, so a new pod
/// that reuses a name is not waited for).
async fn still_there(
    client: &KubeClient,
    node: &str,
    wanted: &[PodRef],
) -> Result<Vec<PodRef>, DrainError> {
    let present: Vec<PodRef> = list_pods(client, node).await?.iter().map(pod_ref).collect();
    Ok(wanted
        .iter()
        .filter(|w| present.iter().any(|p| p == *w))
        .cloned()
        .collect())
}

enum Evicted {
    Yes,
    Gone,
    Blocked(Option<Duration>),
}

async fn evict(client: &KubeClient, pod: &PodRef) -> Result<Evicted, DrainError> {
    let eviction = Eviction {
        metadata: ObjectMeta {
            name: Some(pod.name.clone()),
            namespace: Some(pod.namespace.clone()),
            ..ObjectMeta::default()
        },
        delete_options: None,
    };
    match client
        // The answer is a Status (or, from some servers, the Eviction):
        // only the HTTP status matters.
        .post::<_, serde_json::Value>(&format!("{}/eviction", pod.path()), &eviction)
        .await
    {
        Ok(_) => Ok(Evicted::Yes),
        Err(KubeError::NotFound { .. }) => Ok(Evicted::Gone),
        Err(KubeError::TooManyRequests { retry_after, .. }) => Ok(Evicted::Blocked(retry_after)),
        Err(source) => Err(DrainError::Evict {
            pod: pod.key(),
            source: Box::new(source),
        }),
    }
}

/// Sleep `pause` unless that would pass `deadline`; false when out of time.
async fn pause_before(deadline: Instant, pause: Duration) -> bool {
    if Instant::now() + pause >= deadline {
        return false;
    }
    tokio::time::sleep(pause).await;
    true
}

async fn drain(
    client: &KubeClient,
    node: &str,
    options: &DrainOptions,
) -> Result<DrainOutcome, DrainError> {
    let now = Instant::now();
    // Bounded at load (config::duration::MAX); checked all the same.
    let deadline = now
        .checked_add(options.timeout)
        .unwrap_or_else(|| now + crate::duration::MAX);
    let mut outcome = DrainOutcome::default();
    let mut movable = Vec::new();
    let (mut unmanaged, mut empty_dir) = (Vec::new(), Vec::new());
    for pod in list_pods(client, node).await? {
        let r = pod_ref(&pod);
        match skip_reason(&pod) {
            Some(why) => outcome.skipped.push((r.key(), why)),
            None => {
                if !options.force && !has_controller(&pod) {
                    unmanaged.push(r.key());
                }
                if !options.delete_emptydir_data && !pod.empty_dir_volumes.is_empty() {
                    empty_dir.push(r.key());
                }
                movable.push(r);
            }
        }
    }
    if !unmanaged.is_empty() || !empty_dir.is_empty() {
        return Err(DrainError::Refused {
            node: node.to_string(),
            unmanaged,
            empty_dir,
        });
    }
    if options.disable_eviction {
        for pod in &movable {
            tracing::warn!(node, pod = %pod.key(), "deleting the pod without an eviction (disable_eviction: disruption budgets not consulted)");
            match client.delete(&pod.path()).await {
                Ok(()) => outcome.deleted.push(pod.key()),
                Err(KubeError::NotFound { .. }) => {}
                Err(source) => {
                    return Err(DrainError::Delete {
                        pod: pod.key(),
                        source: Box::new(source),
                    })
                }
            }
        }
    }
    tracing::info!(
        node,
        pods = movable.len(),
        skipped = outcome.skipped.len(),
        "draining node"
    );

    // Evict in rounds: a pod whose budget says no (429) waits for the next
    // round while the others proceed.
    let mut blocked = if options.disable_eviction {
        Vec::new()
    } else {
        movable.clone()
    };
    let mut pause = options.poll_interval;
    let mut in_time = true;
    while !blocked.is_empty() {
        let mut next = Vec::new();
        let mut server_pause = None;
        for pod in blocked {
            match evict(client, &pod).await? {
                Evicted::Yes => outcome.evicted.push(pod.key()),
                Evicted::Gone => {}
                Evicted::Blocked(after) => {
                    tracing::debug!(pod = %pod.key(), "eviction refused by a disruption budget, retrying");
                    server_pause = server_pause.max(after);
                    next.push(pod);
                }
            }
        }
        blocked = next;
        if blocked.is_empty() {
            break;
        }
        let wait = server_pause.unwrap_or(pause).clamp(pause, MAX_PAUSE);
        if !pause_before(deadline, wait).await {
            in_time = false;
            break;
        }
        pause = (pause * 2).min(MAX_PAUSE);
    }

    // Evicted pods terminate within their grace period; wait for them.
    let mut pause = options.poll_interval;
    let mut remaining = still_there(client, node, &movable).await?;
    while in_time && !remaining.is_empty() {
        if !pause_before(deadline, pause).await {
            break;
        }
        pause = (pause * 2).min(MAX_PAUSE);
        remaining = still_there(client, node, &movable).await?;
    }
    if remaining.is_empty() {
        tracing::info!(
            node,
            evicted = outcome.evicted.len(),
            deleted = outcome.deleted.len(),
            "node drained"
        );
        return Ok(outcome);
    }
    Err(DrainError::Timeout {
        node: node.to_string(),
        timeout: options.timeout,
        remaining: remaining.iter().map(PodRef::key).collect(),
    })
}

/// Whether a controller (ReplicaSet, StatefulSet, Job, ...) owns the pod
/// and so recreates it elsewhere.
fn has_controller(pod: &PodView) -> bool {
    pod.metadata
        .owner_references
        .as_ref()
        .is_some_and(|o| o.iter().any(|r| r.controller == Some(true)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kubernetes::testserver::{PodSpec, TestServer};

    fn fast(timeout_ms: u64, force: bool) -> DrainOptions {
        DrainOptions {
            timeout: Duration::from_millis(timeout_ms),
            force,
            poll_interval: Duration::from_millis(10),
            ..DrainOptions::default()
        }
    }

    fn unschedulable(server: &TestServer, node: &str) -> bool {
        server
            .node(node)
            .spec
            .and_then(|s| s.unschedulable)
            .unwrap_or(false)
    }

    fn annotated(server: &TestServer, node: &str) -> bool {
        server
            .node(node)
            .metadata
            .annotations
            .is_some_and(|a| a.get(ANNOTATION_CORDONED).is_some_and(|v| v == "true"))
    }

    fn workload(server: &TestServer) {
        server.add_node("n1");
        server.add_node("n2");
        server.add_pod("default", "web-1", "n1", PodSpec::default());
        server.add_pod("shop", "db-0", "n1", PodSpec::default());
        server.add_pod(
            "kube-system",
            "proxy-x",
            "n1",
            PodSpec {
                daemonset: true,
                ..PodSpec::default()
            },
        );
        server.add_pod(
            "kube-system",
            "etcd-n1",
            "n1",
            PodSpec {
                mirror: true,
                ..PodSpec::default()
            },
        );
        server.add_pod(
            "batch",
            "job-done",
            "n1",
            PodSpec {
                phase: Some("Succeeded"),
                ..PodSpec::default()
            },
        );
        server.add_pod("default", "web-2", "n2", PodSpec::default());
    }

    #[tokio::test]
    async fn drain_evicts_workloads_and_leaves_daemonsets_mirrors_and_finished_pods() {
        let server = TestServer::start().await;
        workload(&server);
        // db-0's budget refuses twice; web-1 takes a while to terminate.
        server.set_evict_429("shop", "db-0", 2);
        server.set_linger("default", "web-1", 3);
        let client = server.client();

        let outcome = cordon_and_drain(&client, &client, "n1", &fast(5_000, false))
            .await
            .unwrap();
        assert!(outcome.cordoned_by_us);
        let mut evicted = outcome.evicted.clone();
        evicted.sort();
        assert_eq!(evicted, ["default/web-1", "shop/db-0"]);
        let mut on_server = server.evicted();
        on_server.sort();
        assert_eq!(on_server, evicted);
        assert!(outcome.deleted.is_empty());
        let mut skipped = outcome.skipped.clone();
        skipped.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            skipped,
            [
                ("batch/job-done".to_string(), SkipReason::Finished),
                ("kube-system/etcd-n1".to_string(), SkipReason::Mirror),
                ("kube-system/proxy-x".to_string(), SkipReason::DaemonSet),
            ]
        );
        // Three eviction attempts for db-0: two 429s, then accepted.
        assert_eq!(
            server.requests_matching("POST", "/api/v1/namespaces/shop/pods/db-0/eviction"),
            3
        );
        // The drain waited until the terminating pod was gone.
        assert!(!server.pod_exists("default", "web-1"));
        assert!(server.pod_exists("kube-system", "proxy-x"));
        assert!(server.pod_exists("kube-system", "etcd-n1"));
        assert!(server.pod_exists("default", "web-2"), "another node's pod");
        assert!(unschedulable(&server, "n1") && annotated(&server, "n1"));
        assert!(!unschedulable(&server, "n2"));

        // After the reboot: ours, so uncordoned, annotation gone; twice is a no-op.
        assert!(uncordon_if_ours(&client, "n1").await.unwrap());
        assert!(!unschedulable(&server, "n1"));
        assert!(!annotated(&server, "n1"));
        assert!(!uncordon_if_ours(&client, "n1").await.unwrap());
    }

    #[tokio::test]
    async fn a_budget_that_never_allows_times_out_and_uncordons() {
        let server = TestServer::start().await;
        workload(&server);
        server.set_evict_429("shop", "db-0", u32::MAX);
        let client = server.client();

        let err = cordon_and_drain(&client, &client, "n1", &fast(300, false))
            .await
            .unwrap_err();
        match &err {
            DrainError::Timeout {
                node, remaining, ..
            } => {
                assert_eq!(node, "n1");
                assert_eq!(remaining, &["shop/db-0".to_string()]);
            }
            other => panic!("expected a timeout, got {other:?}"),
        }
        assert!(err.to_string().contains("shop/db-0"), "{err}");
        assert!(server.pod_exists("shop", "db-0"));
        assert!(server.deleted().is_empty());
        // We cordoned, so the failed drain undid it.
        assert!(!unschedulable(&server, "n1"));
        assert!(!annotated(&server, "n1"));
    }

    #[tokio::test]
    async fn no_option_bypasses_a_budget_on_timeout_but_disable_eviction_deletes() {
        let server = TestServer::start().await;
        workload(&server);
        server.set_evict_429("shop", "db-0", u32::MAX);
        let client = server.client();

        // force and delete_emptydir_data do not touch budgets: a timeout
        // fails, deletes nothing and uncordons.
        let mut options = fast(300, true);
        options.delete_emptydir_data = true;
        let err = cordon_and_drain(&client, &client, "n1", &options)
            .await
            .unwrap_err();
        assert!(matches!(err, DrainError::Timeout { .. }), "{err:?}");
        assert!(server.deleted().is_empty());
        assert!(server.pod_exists("shop", "db-0"));
        assert!(!unschedulable(&server, "n1"));

        // disable_eviction: DELETE, no eviction asked, budgets not consulted.
        let mut options = fast(5_000, false);
        options.disable_eviction = true;
        let before = server.requests_matching("POST", "/api/v1/namespaces/shop/pods/db-0/eviction");
        let outcome = cordon_and_drain(&client, &client, "n1", &options)
            .await
            .unwrap();
        // web-1 went with the first attempt's eviction; db-0 is left.
        assert_eq!(outcome.deleted, ["shop/db-0"]);
        assert!(outcome.evicted.is_empty());
        assert_eq!(
            server.requests_matching("POST", "/api/v1/namespaces/shop/pods/db-0/eviction"),
            before
        );
        assert!(!server.pod_exists("shop", "db-0"));
        assert!(
            server.pod_exists("kube-system", "proxy-x"),
            "DaemonSet pods stay"
        );
        assert!(
            unschedulable(&server, "n1"),
            "a successful drain stays cordoned"
        );
    }

    #[tokio::test]
    async fn unmanaged_and_emptydir_pods_are_refused_unless_allowed() {
        let server = TestServer::start().await;
        workload(&server);
        server.add_pod(
            "default",
            "bare",
            "n1",
            PodSpec {
                unmanaged: true,
                ..PodSpec::default()
            },
        );
        server.add_pod(
            "cache",
            "redis-0",
            "n1",
            PodSpec {
                empty_dir: true,
                ..PodSpec::default()
            },
        );
        let client = server.client();

        // (force, delete_emptydir_data, refused unmanaged, refused emptyDir)
        type Case<'a> = (bool, bool, &'a [&'a str], &'a [&'a str]);
        let table: &[Case<'_>] = &[
            (false, false, &["default/bare"], &["cache/redis-0"]),
            (true, false, &[], &["cache/redis-0"]),
            (false, true, &["default/bare"], &[]),
        ];
        for (force, emptydir, unmanaged_want, empty_want) in table {
            let mut options = fast(5_000, *force);
            options.delete_emptydir_data = *emptydir;
            let err = cordon_and_drain(&client, &client, "n1", &options)
                .await
                .unwrap_err();
            match &err {
                DrainError::Refused {
                    node,
                    unmanaged,
                    empty_dir,
                } => {
                    assert_eq!(node, "n1");
                    assert_eq!(unmanaged, unmanaged_want, "{force} {emptydir}");
                    assert_eq!(empty_dir, empty_want, "{force} {emptydir}");
                }
                other => panic!("expected a refusal, got {other:?}"),
            }
            let text = err.to_string();
            if !unmanaged_want.is_empty() {
                assert!(text.contains("kubernetes.reboot.force"), "{text}");
            }
            if !empty_want.is_empty() {
                assert!(
                    text.contains("kubernetes.reboot.delete_emptydir_data"),
                    "{text}"
                );
            }
            // Refused before anything moved; the cordon was undone.
            assert!(server.evicted().is_empty());
            assert!(!unschedulable(&server, "n1"));
        }

        let mut options = fast(5_000, true);
        options.delete_emptydir_data = true;
        let outcome = cordon_and_drain(&client, &client, "n1", &options)
            .await
            .unwrap();
        let mut evicted = outcome.evicted.clone();
        evicted.sort();
        assert_eq!(
            evicted,
            [
                "cache/redis-0",
                "default/bare",
                "default/web-1",
                "shop/db-0"
            ]
        );
        assert!(outcome.deleted.is_empty());
    }

    #[tokio::test]
    async fn a_node_cordoned_by_an_operator_stays_cordoned() {
        let server = TestServer::start().await;
        workload(&server);
        server.cordon_by_operator("n1");
        let client = server.client();

        let outcome = cordon_and_drain(&client, &client, "n1", &fast(5_000, false))
            .await
            .unwrap();
        assert!(!outcome.cordoned_by_us);
        assert!(!annotated(&server, "n1"));
        assert!(!uncordon_if_ours(&client, "n1").await.unwrap());
        assert!(unschedulable(&server, "n1"));

        // Nor does a failed drain uncordon it.
        server.add_pod("shop", "db-1", "n1", PodSpec::default());
        server.set_evict_429("shop", "db-1", u32::MAX);
        cordon_and_drain(&client, &client, "n1", &fast(200, false))
            .await
            .unwrap_err();
        assert!(unschedulable(&server, "n1"));
    }

    #[tokio::test]
    async fn a_restarted_agent_recognises_its_own_cordon() {
        let server = TestServer::start().await;
        server.add_node("n1");
        let client = server.client();
        assert!(cordon(&client, "n1").await.unwrap());
        // The agent restarts mid-drain and cordons again: still ours.
        assert!(cordon(&client, "n1").await.unwrap());
        let outcome = cordon_and_drain(&client, &client, "n1", &fast(1_000, false))
            .await
            .unwrap();
        assert!(outcome.cordoned_by_us);
        assert!(uncordon_if_ours(&client, "n1").await.unwrap());
    }

    #[tokio::test]
    async fn an_api_error_mid_drain_fails_it_and_uncordons() {
        let server = TestServer::start().await;
        workload(&server);
        server.forbid_evictions();
        let client = server.client();
        let err = cordon_and_drain(&client, &client, "n1", &fast(5_000, false))
            .await
            .unwrap_err();
        match &err {
            DrainError::Evict { pod, source } => {
                assert!(
                    ["default/web-1", "shop/db-0"].contains(&pod.as_str()),
                    "{pod}"
                );
                assert!(
                    matches!(**source, KubeError::Api { status: 403, .. }),
                    "{source:?}"
                );
                assert!(source.to_string().contains("pods/eviction"), "{source}");
            }
            other => panic!("expected an eviction error, got {other:?}"),
        }
        assert!(!unschedulable(&server, "n1"));
        assert!(!annotated(&server, "n1"));
        assert!(server.pod_exists("default", "web-1"));
    }

    #[tokio::test]
    async fn a_pod_gone_before_its_eviction_is_fine_and_bad_names_are_refused() {
        let server = TestServer::start().await;
        server.add_node("n1");
        let client = server.client();
        let gone = PodRef {
            namespace: "default".into(),
            name: "vanished".into(),
            uid: None,
        };
        assert!(matches!(
            evict(&client, &gone).await.unwrap(),
            Evicted::Gone
        ));
        let err = cordon_and_drain(&client, &client, "bad/name", &fast(100, false))
            .await
            .unwrap_err();
        assert!(matches!(err, DrainError::NodeName(_)), "{err:?}");
        let err = uncordon_if_ours(&client, "Bad").await.unwrap_err();
        assert!(err.to_string().contains("\"Bad\""), "{err}");
        assert_eq!(server.requests_matching("PATCH", "/api/v1/nodes/n1"), 0);
    }
}
