//! The local HTTP API, on a Unix socket always and on TCP only when
//! configured: `/healthz` (the agent answers), `/readyz` (the node passes
//! its health checks: 200, else 503), `/status` (JSON: node, update state,
//! services, checks), `/metrics` (Prometheus text) and `POST /v1/reboot`.
//! Health answers come from the [`HealthMonitor`]'s last report: a request
//! never runs a check. It never exposes secrets: every answer is built from
//! explicit, secret-free structs.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::mpsc;

use crate::node::health::{HealthMonitor, HealthSnapshot};
pub mod metrics;

use crate::node::power::Action;
use crate::node::supervisor::{ServiceStatus, SupervisorHandle};
use crate::update::{SharedUpdateStatus, UpdateStatus};
use metrics::MetricsInput;

pub const SOCKET_PATH: &str = "/run/ballast/api.sock";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("listening on {addr}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// The fixed part of `/status`: what this boot is.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub hostname: String,
    pub version: String,
    pub arch: String,
    pub slot: String,
    pub boot_id: String,
    /// Why the node's configuration was not applied, if it was not.
    pub config_error: Option<String>,
}

/// Everything the API reads, shared with PID 1.
#[derive(Debug)]
pub struct Shared {
    pub status: Status,
    pub power: mpsc::Sender<Action>,
    pub update: SharedUpdateStatus,
    pub services: Option<SupervisorHandle>,
    pub health: Option<HealthMonitor>,
    pub boots_total: u64,
}

/// The agent's own footprint, from `/proc/self`.
#[derive(Debug, Default, Serialize)]
pub struct AgentUsage {
    /// Resident set size.
    pub rss_kib: u64,
    /// User plus system CPU time since the agent started.
    pub cpu_ms: u64,
}

impl AgentUsage {
    pub fn read() -> Self {
        let rss_kib = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            })
            .unwrap_or(0);
        // Fields 14 and 15 of /proc/self/stat, after the parenthesised name.
        let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .and_then(|t| u64::try_from(t).ok())
            .unwrap_or(100);
        let cpu_ms = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| {
                let rest = s.rsplit_once(')')?.1;
                let fields: Vec<&str> = rest.split_whitespace().collect();
                let utime: u64 = fields.get(11)?.parse().ok()?;
                let stime: u64 = fields.get(12)?.parse().ok()?;
                Some((utime + stime) * 1000 / ticks.max(1))
            })
            .unwrap_or(0);
        AgentUsage { rss_kib, cpu_ms }
    }
}

/// `/status` in full.
#[derive(Debug, Serialize)]
struct FullStatus<'a> {
    node: &'a Status,
    agent: AgentUsage,
    update: Option<UpdateStatus>,
    services: Vec<ServiceStatus>,
    health: Option<&'a HealthSnapshot>,
}

impl Shared {
    /// The last health report; `None` before the first run ends.
    fn health(&self) -> Option<Arc<HealthSnapshot>> {
        self.health.as_ref().and_then(HealthMonitor::latest)
    }

    fn update_status(&self) -> Option<UpdateStatus> {
        self.update.lock().ok().map(|s| s.clone())
    }

    fn services(&self) -> Vec<ServiceStatus> {
        self.services
            .as_ref()
            .map(|s| s.statuses())
            .unwrap_or_default()
    }
}

/// Starts the listeners; requests for a reboot arrive on `shared.power`.
pub async fn serve(shared: Shared, tcp: Option<SocketAddr>) -> Result<(), ApiError> {
    let shared = Arc::new(shared);
    let socket = Path::new(SOCKET_PATH);
    let unix = bind_unix(socket).map_err(|source| ApiError::Listen {
        addr: SOCKET_PATH.into(),
        source,
    })?;
    let s = shared.clone();
    tokio::spawn(async move {
        loop {
            if let Ok((stream, _)) = unix.accept().await {
                spawn_connection(TokioIo::new(stream), s.clone());
            }
        }
    });
    if let Some(addr) = tcp {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ApiError::Listen {
                addr: addr.to_string(),
                source,
            })?;
        tracing::info!(%addr, "API listening on TCP");
        tokio::spawn(async move {
            loop {
                if let Ok((stream, _)) = listener.accept().await {
                    spawn_connection(TokioIo::new(stream), shared.clone());
                }
            }
        });
    }
    Ok(())
}

fn bind_unix(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    // Root only: the API can reboot the node.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

fn spawn_connection<I>(io: I, shared: Arc<Shared>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let service = hyper::service::service_fn(move |req| handle(req, shared.clone()));
        if let Err(e) = hyper::server::conn::http1::Builder::new()
            .serve_connection(io, service)
            .await
        {
            tracing::debug!(error = %e, "API connection ended");
        }
    });
}

async fn handle(
    req: Request<Incoming>,
    shared: Arc<Shared>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let response = match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") => {
            let snapshot = shared.health();
            let code = if snapshot.as_ref().is_some_and(|s| s.report.ready) {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            to_json(code, &snapshot.as_deref())
        }
        (&Method::GET, "/status") => {
            let health = shared.health();
            let full = FullStatus {
                node: &shared.status,
                agent: AgentUsage::read(),
                update: shared.update_status(),
                services: shared.services(),
                health: health.as_deref(),
            };
            to_json(StatusCode::OK, &full)
        }
        (&Method::GET, "/metrics") => {
            let update = shared.update_status();
            let health = shared.health();
            let input = MetricsInput {
                version: shared.status.version.clone(),
                arch: shared.status.arch.clone(),
                boots_total: shared.boots_total,
                rollbacks_total: update.as_ref().map_or(0, |u| u.rollbacks),
                update_state: update
                    .as_ref()
                    .map(|u| u.state.name().to_owned())
                    .unwrap_or_default(),
                last_update_check: update.as_ref().and_then(|u| u.last_check),
                services: shared.services(),
                health_age: health.as_ref().map(|s| s.age()),
                health: health.map(|s| s.report.clone()),
            };
            let mut r = text(StatusCode::OK, &metrics::render(&input));
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(metrics::CONTENT_TYPE),
            );
            r
        }
        (&Method::POST, "/v1/reboot") => match shared.power.try_send(Action::Reboot) {
            Ok(()) => text(StatusCode::ACCEPTED, "rebooting\n"),
            Err(_) => text(StatusCode::CONFLICT, "a shutdown is already under way\n"),
        },
        (_, "/healthz" | "/readyz" | "/status" | "/metrics" | "/v1/reboot") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    };
    Ok(response)
}

fn text(code: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_owned())));
    *r.status_mut() = code;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain"),
    );
    r
}

fn to_json(code: StatusCode, value: &impl Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => json(code, body),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e}\n")),
    }
}

fn json(code: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

/// Client side for the CLI: one request over the Unix socket.
pub async fn request(
    socket: PathBuf,
    method: Method,
    path: &str,
) -> Result<(StatusCode, String), String> {
    use http_body_util::BodyExt;
    let stream = tokio::net::UnixStream::connect(&socket)
        .await
        .map_err(|e| format!("{}: {e}", socket.display()))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> Status {
        Status {
            hostname: "node-1".into(),
            version: "1.0.0".into(),
            arch: "x86_64".into(),
            slot: "a".into(),
            boot_id: "b".into(),
            config_error: None,
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn endpoints_answer_over_a_real_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let listener = bind_unix(&path).unwrap();
        let (tx, mut rx) = mpsc::channel(1);
        let shared = Arc::new(Shared {
            status: status(),
            power: tx,
            update: crate::update::new_status(),
            services: None,
            health: None,
            boots_total: 3,
        });
        tokio::spawn(async move {
            loop {
                let (s, _) = listener.accept().await.unwrap();
                spawn_connection(TokioIo::new(s), shared.clone());
            }
        });
        let (code, body) = request(path.clone(), Method::GET, "/healthz")
            .await
            .unwrap();
        assert_eq!((code, body.as_str()), (StatusCode::OK, "ok\n"));
        let (code, body) = request(path.clone(), Method::GET, "/status").await.unwrap();
        assert_eq!(code, StatusCode::OK);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["node"]["version"], "1.0.0");
        assert!(v["agent"]["rss_kib"].as_u64().unwrap() > 0);
        assert_eq!(v["update"]["state"]["state"], "disabled");
        let (code, _) = request(path.clone(), Method::GET, "/readyz").await.unwrap();
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        let (code, body) = request(path.clone(), Method::GET, "/metrics")
            .await
            .unwrap();
        assert_eq!(code, StatusCode::OK);
        let lines = body.lines().map(|l| Ok(l.to_owned()));
        let scrape = prometheus_parse::Scrape::parse(lines).unwrap();
        assert!(scrape
            .samples
            .iter()
            .any(|s| s.metric == "ballast_boots_total"));
        let (code, _) = request(path.clone(), Method::GET, "/v1/reboot")
            .await
            .unwrap();
        assert_eq!(code, StatusCode::METHOD_NOT_ALLOWED);
        let (code, _) = request(path.clone(), Method::POST, "/v1/reboot")
            .await
            .unwrap();
        assert_eq!(code, StatusCode::ACCEPTED);
        assert_eq!(rx.recv().await, Some(Action::Reboot));
        let (code, _) = request(path, Method::GET, "/nope").await.unwrap();
        assert_eq!(code, StatusCode::NOT_FOUND);
    }

    /// Health answers come from the monitor's last report: requests run no
    /// check, and they say how old the report is.
    #[tokio::test(flavor = "current_thread")]
    async fn health_endpoints_read_the_last_report() {
        use crate::node::health::{BuiltinSources, HealthChecker, HealthConfig};
        use crate::node::supervisor::{ReapScope, Reaper};
        use std::time::Duration;

        let dir = tempfile::tempdir().unwrap();
        let runs = dir.path().join("runs");
        let config = HealthConfig {
            interval: Duration::from_secs(3600),
            checks: vec![crate::node::health::counting_check(&runs)],
        };
        // STATE is whatever the test host has on /: ready or not, the
        // endpoints must agree with the report.
        let sources = BuiltinSources {
            state_mount: "/".into(),
            ..BuiltinSources::default()
        };
        let reaper = Reaper::start(ReapScope::OwnChildren).unwrap();
        let checker = HealthChecker::new(&config, sources, None, reaper).unwrap();
        let monitor = HealthMonitor::start(checker, config.interval);
        let path = dir.path().join("api.sock");
        let listener = bind_unix(&path).unwrap();
        let (tx, _rx) = mpsc::channel(1);
        let shared = Arc::new(Shared {
            status: status(),
            power: tx,
            update: crate::update::new_status(),
            services: None,
            health: Some(monitor.clone()),
            boots_total: 1,
        });
        tokio::spawn(async move {
            loop {
                let (s, _) = listener.accept().await.unwrap();
                spawn_connection(TokioIo::new(s), shared.clone());
            }
        });
        while monitor.latest().is_none() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let ready = monitor.latest().unwrap().report.ready;
        for _ in 0..3 {
            let (code, body) = request(path.clone(), Method::GET, "/readyz").await.unwrap();
            let expected = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            assert_eq!(code, expected, "{body}");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["ready"], ready);
            assert!(v["age_ms"].is_u64() && v["checked_at"].is_string(), "{v}");

            let (_, body) = request(path.clone(), Method::GET, "/status").await.unwrap();
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["health"]["checks"][4]["name"], "count", "{v}");
            assert!(v["health"]["checked_at"].is_string(), "{v}");

            let (_, body) = request(path.clone(), Method::GET, "/metrics")
                .await
                .unwrap();
            let lines = body.lines().map(|l| Ok(l.to_owned()));
            let scrape = prometheus_parse::Scrape::parse(lines).unwrap();
            let age = scrape
                .samples
                .iter()
                .find(|s| s.metric == "ballast_health_report_age_seconds")
                .expect("report age exposed");
            assert!(
                matches!(age.value, prometheus_parse::Value::Gauge(v) if (0.0..60.0).contains(&v)),
                "{age:?}"
            );
        }
        let runs = std::fs::read_to_string(&runs).unwrap();
        assert_eq!(runs.lines().count(), 1, "requests ran the checks");
    }
}
