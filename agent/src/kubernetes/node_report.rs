//! The node's health and update state as the cluster sees it: a Node
//! condition of type [`CONDITION_TYPE`] (`BallastHealthy`: True, False or
//! Unknown, with a CamelCase reason and a message) and the annotations
//! `ballast.dev/version`, `ballast.dev/slot`, `ballast.dev/update-state` and
//! `ballast.dev/last-check`.
//!
//! Reporting is idempotent: the current condition is read first and its
//! `lastTransitionTime` kept unless the status changes, so re-reporting
//! after an agent restart, or every check interval, moves only
//! `lastHeartbeatTime`. A problem that clears is reported as status True
//! with its own reason, which replaces the failing one.
//!
//! Permissions: with the NodeRestriction admission plugin a node's own
//! credential (`system:node:<name>`, e.g. the kubelet's client certificate)
//! may GET and PATCH its own Node object and its `status` subresource, which
//! is all this module needs. It is not enough for the reboot Leases (outside
//! `kube-node-lease`) or for evictions: those need the agent's own
//! credential with the RBAC in docs/kubernetes-rbac.md.

use std::time::SystemTime;

use k8s_openapi::api::core::v1::NodeCondition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::json;

use super::client::{is_dns_subdomain, node_path, timestamp, KubeClient, KubeError, PatchKind};
use serde_json::Value;

/// The Node condition type the agent owns.
pub const CONDITION_TYPE: &str = "BallastHealthy";
pub const ANNOTATION_VERSION: &str = "ballast.dev/version";
pub const ANNOTATION_SLOT: &str = "ballast.dev/slot";
pub const ANNOTATION_UPDATE_STATE: &str = "ballast.dev/update-state";
pub const ANNOTATION_LAST_CHECK: &str = "ballast.dev/last-check";

/// Messages longer than this are cut (at a character boundary): a condition
/// is for a person reading `kubectl describe node`, not a log.
const MAX_MESSAGE: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

impl ConditionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionStatus::True => "True",
            ConditionStatus::False => "False",
            ConditionStatus::Unknown => "Unknown",
        }
    }
}

/// What the agent reports about its node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeReport {
    pub status: ConditionStatus,
    /// CamelCase, as Kubernetes condition reasons are (`HealthChecksPassed`).
    pub reason: String,
    pub message: String,
    pub version: String,
    pub slot: String,
    pub update_state: String,
    /// When the health was checked: `ballast.dev/last-check`, the
    /// heartbeat, and the transition time when the status changes.
    pub checked_at: SystemTime,
}

/// What a report changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReportOutcome {
    /// The condition's status changed (or the condition was new).
    pub transitioned: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeReportError {
    #[error("node name {0:?} is not a valid Kubernetes object name")]
    NodeName(String),
    #[error("condition reason {0:?} must be CamelCase ASCII letters and digits, starting with an upper-case letter, at most 128 characters")]
    Reason(String),
    #[error("annotation {key}: value {value:?} must be non-empty and at most 256 characters")]
    AnnotationValue { key: &'static str, value: String },
    #[error("reading node {node}")]
    Read {
        node: String,
        #[source]
        source: Box<KubeError>,
    },
    #[error("setting the {CONDITION_TYPE} condition on node {node}")]
    Condition {
        node: String,
        #[source]
        source: Box<KubeError>,
    },
    #[error("setting the ballast.dev annotations on node {node}")]
    Annotations {
        node: String,
        #[source]
        source: Box<KubeError>,
    },
}

fn is_camel_case(reason: &str) -> bool {
    reason.len() <= 128
        && reason.starts_with(|c: char| c.is_ascii_uppercase())
        && reason.chars().all(|c| c.is_ascii_alphanumeric())
}

fn truncate(message: &str) -> String {
    if message.len() <= MAX_MESSAGE {
        return message.to_string();
    }
    let mut end = MAX_MESSAGE;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &message[..end])
}

impl NodeReport {
    fn validate(&self) -> Result<(), NodeReportError> {
        if !is_camel_case(&self.reason) {
            return Err(NodeReportError::Reason(self.reason.clone()));
        }
        for (key, value) in [
            (ANNOTATION_VERSION, &self.version),
            (ANNOTATION_SLOT, &self.slot),
            (ANNOTATION_UPDATE_STATE, &self.update_state),
        ] {
            if value.is_empty() || value.len() > 256 {
                return Err(NodeReportError::AnnotationValue {
                    key,
                    value: value.clone(),
                });
            }
        }
        Ok(())
    }
}

/// Set the condition (status subresource, strategic merge: conditions merge
/// by type, so the kubelet's own conditions are untouched) and the
/// annotations (merge patch on the Node).
pub async fn report_node(
    client: &KubeClient,
    node: &str,
    report: &NodeReport,
) -> Result<ReportOutcome, NodeReportError> {
    if !is_dns_subdomain(node) {
        return Err(NodeReportError::NodeName(node.to_string()));
    }
    report.validate()?;
    let path = node_path(node);
    let current = client
        .get_node(node)
        .await
        .map_err(|source| NodeReportError::Read {
            node: node.to_string(),
            source: Box::new(source),
        })?;
    let previous = current
        .conditions
        .iter()
        .find(|c| c.type_ == CONDITION_TYPE);
    let now = Time(timestamp(report.checked_at));
    let status = report.status.as_str();
    let (transitioned, transition_time) = match previous {
        Some(p) if p.status == status && p.last_transition_time.is_some() => {
            (false, p.last_transition_time.clone())
        }
        _ => (true, Some(now.clone())),
    };
    let condition = NodeCondition {
        type_: CONDITION_TYPE.to_string(),
        status: status.to_string(),
        reason: Some(report.reason.clone()),
        message: Some(truncate(&report.message)),
        last_heartbeat_time: Some(now.clone()),
        last_transition_time: transition_time,
    };
    let patch = json!({"status": {"conditions": [condition]}});
    client
        .patch::<Value>(&format!("{path}/status"), PatchKind::StrategicMerge, &patch)
        .await
        .map_err(|source| NodeReportError::Condition {
            node: node.to_string(),
            source: Box::new(source),
        })?;

    let last_check = serde_json::to_value(&now)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    let patch = json!({"metadata": {"annotations": {
        ANNOTATION_VERSION: report.version,
        ANNOTATION_SLOT: report.slot,
        ANNOTATION_UPDATE_STATE: report.update_state,
        ANNOTATION_LAST_CHECK: last_check,
    }}});
    client
        .patch::<Value>(&path, PatchKind::Merge, &patch)
        .await
        .map_err(|source| NodeReportError::Annotations {
            node: node.to_string(),
            source: Box::new(source),
        })?;
    if transitioned {
        tracing::info!(node, condition = CONDITION_TYPE, status, reason = %report.reason, "node condition changed");
    }
    Ok(ReportOutcome { transitioned })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kubernetes::testserver::TestServer;
    use std::time::{Duration, UNIX_EPOCH};

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_790_000_000 + secs)
    }

    fn report(status: ConditionStatus, reason: &str, secs: u64) -> NodeReport {
        NodeReport {
            status,
            reason: reason.into(),
            message: format!("{reason} at {secs}"),
            version: "1.2.0".into(),
            slot: "B".into(),
            update_state: "idle".into(),
            checked_at: at(secs),
        }
    }

    fn condition(server: &TestServer, node: &str) -> NodeCondition {
        server
            .node(node)
            .status
            .unwrap()
            .conditions
            .unwrap()
            .into_iter()
            .find(|c| c.type_ == CONDITION_TYPE)
            .expect("condition present")
    }

    fn rfc3339(t: SystemTime) -> String {
        serde_json::to_value(Time(timestamp(t)))
            .unwrap()
            .as_str()
            .unwrap()
            .to_string()
    }

    #[tokio::test]
    async fn condition_is_set_flipped_and_cleared_with_stable_transition_times() {
        let server = TestServer::start().await;
        server.add_node("n1");
        let client = server.client();

        let out = report_node(
            &client,
            "n1",
            &report(ConditionStatus::True, "HealthChecksPassed", 0),
        )
        .await
        .unwrap();
        assert!(out.transitioned);
        let c = condition(&server, "n1");
        assert_eq!(c.status, "True");
        assert_eq!(c.reason.as_deref(), Some("HealthChecksPassed"));
        assert_eq!(c.last_transition_time.as_ref().unwrap().0, timestamp(at(0)));

        // Same status later (or after an agent restart): only the heartbeat moves.
        let out = report_node(
            &client,
            "n1",
            &report(ConditionStatus::True, "HealthChecksPassed", 60),
        )
        .await
        .unwrap();
        assert!(!out.transitioned);
        let c = condition(&server, "n1");
        assert_eq!(c.last_transition_time.as_ref().unwrap().0, timestamp(at(0)));
        assert_eq!(c.last_heartbeat_time.as_ref().unwrap().0, timestamp(at(60)));

        // A failing check flips it, with its reason and message.
        let out = report_node(
            &client,
            "n1",
            &report(ConditionStatus::False, "CheckFailed", 120),
        )
        .await
        .unwrap();
        assert!(out.transitioned);
        let c = condition(&server, "n1");
        assert_eq!(c.status, "False");
        assert_eq!(c.reason.as_deref(), Some("CheckFailed"));
        assert_eq!(c.message.as_deref(), Some("CheckFailed at 120"));
        assert_eq!(
            c.last_transition_time.as_ref().unwrap().0,
            timestamp(at(120))
        );

        // Still failing: transition time stays at the flip.
        report_node(
            &client,
            "n1",
            &report(ConditionStatus::False, "CheckFailed", 180),
        )
        .await
        .unwrap();
        assert_eq!(
            condition(&server, "n1").last_transition_time.unwrap().0,
            timestamp(at(120))
        );

        // Cleared: True again, the failing reason is gone.
        report_node(
            &client,
            "n1",
            &report(ConditionStatus::True, "HealthChecksPassed", 240),
        )
        .await
        .unwrap();
        let c = condition(&server, "n1");
        assert_eq!(c.status, "True");
        assert_eq!(c.reason.as_deref(), Some("HealthChecksPassed"));
        assert_eq!(
            c.last_transition_time.as_ref().unwrap().0,
            timestamp(at(240))
        );

        // The kubelet's own condition was merged around, not replaced.
        let conditions = server.node("n1").status.unwrap().conditions.unwrap();
        assert_eq!(conditions.len(), 2);
        assert!(conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True"));
    }

    #[tokio::test]
    async fn annotations_carry_version_slot_state_and_last_check() {
        let server = TestServer::start().await;
        server.add_node("n1");
        let client = server.client();
        let mut r = report(ConditionStatus::Unknown, "GateRunning", 30);
        r.update_state = "trial".into();
        report_node(&client, "n1", &r).await.unwrap();
        let ann = server.node("n1").metadata.annotations.unwrap();
        assert_eq!(ann[ANNOTATION_VERSION], "1.2.0");
        assert_eq!(ann[ANNOTATION_SLOT], "B");
        assert_eq!(ann[ANNOTATION_UPDATE_STATE], "trial");
        assert_eq!(ann[ANNOTATION_LAST_CHECK], rfc3339(at(30)));
        assert_eq!(condition(&server, "n1").status, "Unknown");
        // Labels set by others are untouched by the merge patch.
        let labels = server.node("n1").metadata.labels.unwrap();
        assert_eq!(labels["kubernetes.io/hostname"], "n1");

        r.update_state = "idle".into();
        r.checked_at = at(90);
        report_node(&client, "n1", &r).await.unwrap();
        let ann = server.node("n1").metadata.annotations.unwrap();
        assert_eq!(ann[ANNOTATION_UPDATE_STATE], "idle");
        assert_eq!(ann[ANNOTATION_LAST_CHECK], rfc3339(at(90)));
    }

    #[tokio::test]
    async fn bad_reports_are_refused_before_any_request() {
        let server = TestServer::start().await;
        server.add_node("n1");
        let client = server.client();
        let err = report_node(
            &client,
            "n1",
            &report(ConditionStatus::True, "not camel", 0),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("\"not camel\""), "{err}");
        let mut r = report(ConditionStatus::True, "Ok", 0);
        r.slot = String::new();
        let err = report_node(&client, "n1", &r).await.unwrap_err();
        assert!(err.to_string().contains(ANNOTATION_SLOT), "{err}");
        let err = report_node(&client, "../etc", &report(ConditionStatus::True, "Ok", 0))
            .await
            .unwrap_err();
        assert!(matches!(err, NodeReportError::NodeName(_)), "{err}");
        assert_eq!(server.requests_matching("GET", "/api/v1/nodes/n1"), 0);
        assert!(server.node("n1").metadata.annotations.is_none());
    }

    #[tokio::test]
    async fn a_missing_node_is_a_read_error_naming_it() {
        let server = TestServer::start().await;
        let client = server.client();
        let err = report_node(&client, "n9", &report(ConditionStatus::True, "Ok", 0))
            .await
            .unwrap_err();
        assert!(matches!(err, NodeReportError::Read { .. }), "{err:?}");
        assert!(err.to_string().contains("n9"), "{err}");
    }

    #[test]
    fn long_messages_are_cut_at_a_character_boundary() {
        let long = "é".repeat(MAX_MESSAGE);
        let cut = truncate(&long);
        assert!(cut.len() <= MAX_MESSAGE + '…'.len_utf8());
        assert!(cut.ends_with('…'));
        assert_eq!(truncate("short"), "short");
    }
}
