//! When a node that installed an update may reboot into it: one
//! [`RebootStrategy`] trait, and the strategies that need nothing outside
//! this module: `immediate`, `window`, `off`, `fleetlock` (Zincati's
//! protocol), and [`Unavailable`] for a strategy whose prerequisites are
//! missing. The `kubernetes` strategy is implemented by the cluster
//! coordinator (`kubernetes/coordinator.rs`), so `update` does not depend
//! on `kubernetes`; `init.rs` picks the object.

use ballast_updater::fetch::redact_url;
use std::time::{Duration, SystemTime};

use ballast_updater::payload::Version;
use futures_util::future::BoxFuture;

pub use super::machine::{Blocked, Notice};
use crate::config::update::{FleetLockConfig, WindowConfig};

/// How often a closed window is looked at again.
const WINDOW_RETRY: Duration = Duration::from_secs(30);
/// How often a FleetLock slot held by another node is asked for again.
const FLEETLOCK_RETRY: Duration = Duration::from_secs(5);

/// The strategy's yes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Permit;

/// A reboot policy. `permit` is asked when an update is installed, and
/// again after each [`Blocked::retry_after`]; the other two hooks give
/// back what `permit` took (a lock, a cordon) once the node is healthy.
pub trait RebootStrategy: Send + Sync + std::fmt::Debug {
    /// May the node reboot into `version` now?
    fn permit(&self, version: Version) -> BoxFuture<'_, Result<Permit, Blocked>>;

    /// A new version passed its trial.
    fn committed(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    /// The node booted a blessed version and its checks pass.
    fn back_in_service(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// `immediate`: reboot as soon as the update is installed.
#[derive(Debug, Clone, Copy)]
pub struct Immediate;

impl RebootStrategy for Immediate {
    fn permit(&self, _version: Version) -> BoxFuture<'_, Result<Permit, Blocked>> {
        Box::pin(async { Ok(Permit) })
    }
}

/// `off`: install, say `reboot-needed`, and leave the reboot to an
/// operator.
#[derive(Debug, Clone, Copy)]
pub struct Off;

impl RebootStrategy for Off {
    fn permit(&self, _version: Version) -> BoxFuture<'_, Result<Permit, Blocked>> {
        Box::pin(async {
            Err(Blocked {
                reason: "update.strategy is off".into(),
                retry_after: None,
                notice: Notice::RebootNeeded,
            })
        })
    }
}

/// `window`: reboot only inside the maintenance window (UTC).
#[derive(Debug, Clone)]
pub struct Window(pub WindowConfig);

impl Window {
    fn decide(&self, now: SystemTime) -> Result<Permit, Blocked> {
        if self.0.contains(now) {
            Ok(Permit)
        } else {
            Err(Blocked {
                reason: format!(
                    "outside the maintenance window (starts {} UTC)",
                    self.0.start
                ),
                retry_after: Some(WINDOW_RETRY),
                notice: Notice::Quiet,
            })
        }
    }
}

impl RebootStrategy for Window {
    fn permit(&self, _version: Version) -> BoxFuture<'_, Result<Permit, Blocked>> {
        Box::pin(async { self.decide(SystemTime::now()) })
    }
}

/// A strategy that cannot work on this node (`kubernetes` without an
/// agent credential): never reboots, and says why each time it is asked.
#[derive(Debug, Clone)]
pub struct Unavailable {
    pub reason: String,
}

impl RebootStrategy for Unavailable {
    fn permit(&self, _version: Version) -> BoxFuture<'_, Result<Permit, Blocked>> {
        Box::pin(async {
            Err(Blocked {
                reason: self.reason.clone(),
                retry_after: None,
                notice: Notice::RebootBlocked,
            })
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FleetLockError {
    #[error("fleetlock {url}: {reason}")]
    Refused { url: String, reason: String },
    #[error("fleetlock {url}")]
    Worker {
        url: String,
        #[source]
        source: tokio::task::JoinError,
    },
}

/// `fleetlock`: one lock slot per group on a FleetLock server, taken with
/// `pre-reboot` and given back with `steady-state` after the commit.
#[derive(Debug, Clone)]
pub struct FleetLock {
    pub config: FleetLockConfig,
    /// This node's stable id.
    pub node_id: String,
    /// `[proxy]` and `[trust] ca`.
    pub outbound: ballast_updater::http::Outbound,
}

impl FleetLock {
    /// One call (`pre-reboot` or `steady-state`); Ok when granted.
    async fn call(&self, op: &'static str) -> Result<(), FleetLockError> {
        let url = format!("{}/v1/{op}", self.config.url.trim_end_matches('/'));
        let body =
            serde_json::json!({"client_params": {"id": self.node_id, "group": self.config.group}})
                .to_string();
        let u = url.clone();
        let outbound = self.outbound.clone();
        let result = tokio::task::spawn_blocking(move || {
            // Only the configured proxy: PID 1's environment is not a setting.
            let mut builder = reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(10))
                .no_proxy();
            for proxy in outbound.proxies()? {
                builder = builder.proxy(proxy);
            }
            for root in outbound.roots()? {
                builder = builder.add_root_certificate(root);
            }
            let client = builder.build().map_err(|e| e.to_string())?;
            let resp = client
                .post(&u)
                .header("fleet-lock-protocol", "true")
                .header("content-type", "application/json")
                .body(body)
                .send()
                .map_err(|e| e.to_string())?;
            if resp.status().is_success() {
                Ok(())
            } else {
                Err(format!(
                    "{}: {}",
                    resp.status(),
                    resp.text().unwrap_or_default()
                ))
            }
        })
        .await
        .map_err(|source| FleetLockError::Worker {
            url: redact_url(&url),
            source,
        })?;
        // The URL may carry credentials (user info), and reqwest's message
        // quotes it: neither is shown with them.
        result.map_err(|reason| FleetLockError::Refused {
            url: redact_url(&url),
            reason: redact_url(&reason),
        })
    }
}

impl RebootStrategy for FleetLock {
    fn permit(&self, _version: Version) -> BoxFuture<'_, Result<Permit, Blocked>> {
        Box::pin(async {
            self.call("pre-reboot").await.map(|()| Permit).map_err(|e| {
                let reason = crate::error_chain(&e);
                tracing::info!(reason = %reason, "reboot lock not granted; retrying");
                Blocked {
                    reason,
                    retry_after: Some(FLEETLOCK_RETRY),
                    notice: Notice::Quiet,
                }
            })
        })
    }

    fn committed(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {
            if let Err(e) = self.call("steady-state").await {
                tracing::warn!(error = %crate::error_chain(&e), "fleetlock lock not released");
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpListener;

    use super::*;
    use crate::config::update::{TimeOfDay, Weekday};

    fn v() -> Version {
        "1.2.0".parse().unwrap()
    }

    #[tokio::test]
    async fn immediate_permits_and_off_never_does() {
        assert_eq!(Immediate.permit(v()).await, Ok(Permit));
        let blocked = Off.permit(v()).await.unwrap_err();
        assert_eq!(blocked.retry_after, None);
        assert_eq!(blocked.notice, Notice::RebootNeeded);
        let blocked = Unavailable {
            reason: "no credential".into(),
        }
        .permit(v())
        .await
        .unwrap_err();
        assert_eq!(
            (blocked.reason.as_str(), blocked.notice, blocked.retry_after),
            ("no credential", Notice::RebootBlocked, None)
        );
    }

    #[test]
    fn a_window_permits_inside_and_retries_quietly_outside() {
        let w = Window(WindowConfig {
            days: vec![Weekday::Thu],
            start: TimeOfDay::new(2, 0).unwrap(),
            length: Duration::from_secs(3600),
        });
        // 2026-11-26 is a Thursday.
        let inside = humantime::parse_rfc3339("2026-11-26T02:30:00Z").unwrap();
        let outside = humantime::parse_rfc3339("2026-11-26T04:00:00Z").unwrap();
        assert_eq!(w.decide(inside), Ok(Permit));
        let blocked = w.decide(outside).unwrap_err();
        assert_eq!(blocked.retry_after, Some(WINDOW_RETRY));
        assert_eq!(blocked.notice, Notice::Quiet);
        assert!(blocked.reason.contains("02:00"), "{}", blocked.reason);
    }

    /// A one-request FleetLock server on loopback answering `status`.
    fn server(status: &'static str) -> (String, std::thread::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let handle = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = vec![0u8; 4096];
            let mut got = Vec::new();
            // Headers and the small JSON body arrive in a read or two.
            while !String::from_utf8_lossy(&got).contains("client_params") {
                let n = s.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            let body = "{}";
            write!(
                s,
                "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
            String::from_utf8_lossy(&got).into_owned()
        });
        (url, handle)
    }

    #[tokio::test]
    async fn fleetlock_asks_with_the_protocol_header_and_retries_when_refused() {
        let (url, handle) = server("200 OK");
        let fl = FleetLock {
            config: FleetLockConfig {
                url,
                group: "workers".into(),
            },
            node_id: "node-a".into(),
            outbound: Default::default(),
        };
        assert_eq!(fl.permit(v()).await, Ok(Permit));
        let request = handle.join().unwrap();
        assert!(request.starts_with("POST /v1/pre-reboot "), "{request}");
        assert!(request
            .to_ascii_lowercase()
            .contains("fleet-lock-protocol: true"));
        assert!(request.contains("\"id\":\"node-a\"") && request.contains("\"group\":\"workers\""));

        let (url, handle) = server("409 Conflict");
        let fl = FleetLock {
            config: FleetLockConfig {
                url,
                group: "workers".into(),
            },
            node_id: "node-a".into(),
            outbound: Default::default(),
        };
        let blocked = fl.permit(v()).await.unwrap_err();
        handle.join().unwrap();
        assert_eq!(blocked.retry_after, Some(FLEETLOCK_RETRY));
        assert_eq!(blocked.notice, Notice::Quiet);
        assert!(blocked.reason.contains("409"), "{}", blocked.reason);
    }

    #[tokio::test]
    async fn fleetlock_goes_through_the_http_proxy() {
        // The recording server plays the proxy: an absolute-form request
        // for a host no resolver knows can only have been sent to it.
        let (proxy, handle) = server("200 OK");
        let fl = FleetLock {
            config: FleetLockConfig {
                url: "http://fleetlock.test:8080/".into(),
                group: "workers".into(),
            },
            node_id: "node-a".into(),
            outbound: ballast_updater::http::Outbound {
                http_proxy: Some(proxy.trim_end_matches('/').to_owned()),
                ..Default::default()
            },
        };
        assert_eq!(fl.permit(v()).await, Ok(Permit));
        let request = handle.join().unwrap();
        assert!(
            request.starts_with("POST http://fleetlock.test:8080/v1/pre-reboot "),
            "{request}"
        );
    }
}
