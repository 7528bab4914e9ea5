//! The node API. Plain HTTP on the root-only Unix socket (every request
//! there is admin), and, when `[api] listen` is set, HTTPS on TCP with
//! client certificates from the operator CA (see [`auth`] for roles).
//! Endpoints are listed in [`routes`] and docs/api.md. Health answers come
//! from the [`HealthMonitor`]'s last report: a request never runs a check.
//! Answers are built from explicit, secret-free structs; the config is
//! shown through `config::redact`.
//!
//! Modules: [`tls`] and [`identity`] (the server's certificate), [`auth`]
//! (who and which role), [`routes`] (the endpoints), [`logs`],
//! [`user_data`], [`requests`] (the channel to the update driver),
//! [`limits`] (timeouts, connection cap, backoff) and [`audit`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::mpsc;

use crate::node::health::{HealthMonitor, HealthSnapshot};
pub mod audit;
pub mod auth;
pub mod identity;
pub mod limits;
pub mod logs;
pub mod metrics;
pub mod requests;
pub mod routes;
pub mod tls;
pub mod user_data;

#[cfg(test)]
mod tcp_tests;

use crate::config::ApiConfig;
use crate::node::power::Action;
use crate::node::supervisor::{ServiceStatus, SupervisorHandle};
use crate::update::{SharedUpdateStatus, UpdateStatus};
use auth::Client;
use limits::{AcceptBackoff, Admitted, ConnectionSlot, ConnectionTable, Limits};

pub const SOCKET_PATH: &str = "/run/ballast/api.sock";
/// The TCP port the docs and the client use when none is given.
pub const DEFAULT_PORT: u16 = 9465;
/// Connections on the Unix socket (root only, but PID 1's descriptors all the same).
const UNIX_MAX_CONNECTIONS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("listening on {addr}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the API's server identity")]
    Identity(#[from] identity::IdentityError),
    #[error("the API's TLS")]
    Tls(#[from] tls::TlsError),
}

/// Every error answer: `{"error": "<message>"}` with the status code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// The answer to `POST /v1/reboot` (202).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebootAnswer {
    pub accepted: bool,
    /// The strategy was skipped (`?force=true`).
    pub forced: bool,
    /// The strategy the reboot goes through, or `force`.
    pub via: String,
}

/// `"api"` in `/status`: where the TCP API listens and the fingerprint
/// clients pin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiInfo {
    pub listen: String,
    pub cert_sha256: String,
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
    /// Which user-data source is in force and which were ignored this boot
    /// (`config::user_data`); `null` before the policy ran.
    pub user_data: Option<crate::config::user_data::Status>,
}

/// Everything the API reads, shared with PID 1.
#[derive(Debug)]
pub struct Shared {
    pub status: Status,
    /// Forced reboots go straight to PID 1's shutdown.
    pub power: mpsc::Sender<Action>,
    /// Everything else goes to the update driver.
    pub requests: mpsc::Sender<requests::ApiRequest>,
    pub update: SharedUpdateStatus,
    pub services: Option<SupervisorHandle>,
    pub health: Option<HealthMonitor>,
    pub boots_total: u64,
    /// The effective configuration, secrets redacted (`GET /v1/config`).
    pub config: serde_json::Value,
    pub user_data: user_data::UserDataStore,
    pub logs: logs::LogPaths,
    pub limits: Limits,
    /// Set by [`serve`] when TCP is on.
    pub api: Option<ApiInfo>,
}

impl Shared {
    /// Defaults for everything but what PID 1 must give.
    pub fn new(
        status: Status,
        power: mpsc::Sender<Action>,
        requests: mpsc::Sender<requests::ApiRequest>,
        update: SharedUpdateStatus,
    ) -> Self {
        Shared {
            status,
            power,
            requests,
            update,
            services: None,
            health: None,
            boots_total: 0,
            config: serde_json::Value::Object(Default::default()),
            user_data: user_data::UserDataStore::default(),
            logs: logs::LogPaths::default(),
            limits: Limits::default(),
            api: None,
        }
    }
}

/// The effective configuration as JSON with secrets redacted.
pub fn redacted_config(table: &toml::Table) -> serde_json::Value {
    serde_json::to_value(crate::config::redact(table)).unwrap_or_default()
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
pub(crate) struct FullStatus<'a> {
    pub(crate) node: &'a Status,
    pub(crate) agent: AgentUsage,
    pub(crate) update: Option<UpdateStatus>,
    pub(crate) services: Vec<ServiceStatus>,
    pub(crate) health: Option<&'a HealthSnapshot>,
    /// The TCP API and its certificate's fingerprint; `null` when off.
    pub(crate) api: Option<&'a ApiInfo>,
}

impl Shared {
    /// The last health report; `None` before the first run ends.
    pub(crate) fn health(&self) -> Option<Arc<HealthSnapshot>> {
        self.health.as_ref().and_then(HealthMonitor::latest)
    }

    pub(crate) fn update_status(&self) -> Option<UpdateStatus> {
        self.update.lock().ok().map(|s| s.clone())
    }

    pub(crate) fn services(&self) -> Vec<ServiceStatus> {
        self.services
            .as_ref()
            .map(|s| s.statuses())
            .unwrap_or_default()
    }
}

/// The TCP side, ready to bind: address, TLS and the fingerprint to announce.
#[derive(Debug, Clone)]
pub struct TcpOptions {
    pub listen: SocketAddr,
    pub tls: Arc<rustls::ServerConfig>,
    pub cert_sha256: String,
}

/// Loads the client CA and the server identity (made on first boot,
/// kept in `identity_dir`) for `[api] listen`; `None` when TCP is off.
pub fn prepare_tcp(
    config: &ApiConfig,
    identity_dir: &Path,
    hostname: &str,
) -> Result<Option<TcpOptions>, ApiError> {
    let Some(listen) = config.listen else {
        return Ok(None);
    };
    let ca = identity::client_ca(config)?;
    let id = identity::load_or_create(config, identity_dir, hostname, &identity::node_addresses())?;
    let cert_sha256 = id.fingerprint();
    let tls = tls::server_config(id, ca)?;
    Ok(Some(TcpOptions {
        listen,
        tls,
        cert_sha256,
    }))
}

/// Starts the listeners: the Unix socket always, TCP (HTTPS) when given.
pub async fn serve(mut shared: Shared, tcp: Option<TcpOptions>) -> Result<(), ApiError> {
    let socket = Path::new(SOCKET_PATH);
    let unix = bind_unix(socket).map_err(|source| ApiError::Listen {
        addr: SOCKET_PATH.into(),
        source,
    })?;
    let listener = match &tcp {
        Some(t) => Some(
            TcpListener::bind(t.listen)
                .await
                .map_err(|source| ApiError::Listen {
                    addr: t.listen.to_string(),
                    source,
                })?,
        ),
        None => None,
    };
    if let Some(t) = &tcp {
        shared.api = Some(ApiInfo {
            listen: t.listen.to_string(),
            cert_sha256: t.cert_sha256.clone(),
        });
    }
    let shared = Arc::new(shared);
    tokio::spawn(serve_unix(unix, shared.clone()));
    if let (Some(t), Some(listener)) = (tcp, listener) {
        tracing::info!(addr = %t.listen, cert_sha256 = %t.cert_sha256, "API listening on TCP (HTTPS)");
        crate::console::emit(&listening_event(&t));
        tokio::spawn(serve_tcp(listener, shared, t.tls));
    }
    Ok(())
}

/// What `api-listening` says: the same fingerprint `/status` shows.
fn listening_event(tcp: &TcpOptions) -> crate::console::Event {
    crate::console::Event::ApiListening {
        addr: tcp.listen.to_string(),
        cert_sha256: tcp.cert_sha256.clone(),
    }
}

fn bind_unix(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    // Root only: every request here is admin.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Accepts on the Unix socket until the process ends.
pub async fn serve_unix(listener: UnixListener, shared: Arc<Shared>) {
    let table = ConnectionTable::new(UNIX_MAX_CONNECTIONS);
    let mut backoff = AcceptBackoff::default();
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                backoff.success();
                let Some(admitted) = table.admit() else {
                    continue; // dropped: closed at once
                };
                let shared = shared.clone();
                tokio::spawn(async move {
                    let slot = admitted.slot.clone();
                    serve_http(TokioIo::new(stream), Client::Local, shared, slot).await;
                    drop(admitted);
                });
            }
            Err(e) => accept_failed(&mut backoff, &e).await,
        }
    }
}

/// Accepts HTTPS connections until the process ends.
pub async fn serve_tcp(listener: TcpListener, shared: Arc<Shared>, tls: Arc<rustls::ServerConfig>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let table = ConnectionTable::new(shared.limits.max_connections);
    let mut backoff = AcceptBackoff::default();
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                backoff.success();
                let Some(admitted) = table.admit() else {
                    continue; // every connection busy: this one is closed at once
                };
                let _ = stream.set_nodelay(true);
                tokio::spawn(tls_connection(
                    stream,
                    peer,
                    admitted,
                    shared.clone(),
                    acceptor.clone(),
                ));
            }
            Err(e) => accept_failed(&mut backoff, &e).await,
        }
    }
}

/// EMFILE and friends: wait instead of spinning (the error repeats until
/// a descriptor is freed).
async fn accept_failed(backoff: &mut AcceptBackoff, e: &std::io::Error) {
    let pause = backoff.failure();
    if pause >= std::time::Duration::from_secs(1) {
        tracing::warn!(error = %e, "API accept failing; backing off");
    }
    tokio::time::sleep(pause).await;
}

async fn tls_connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    admitted: Admitted,
    shared: Arc<Shared>,
    acceptor: tokio_rustls::TlsAcceptor,
) {
    let slot = admitted.slot.clone();
    let handshake = tokio::time::timeout(shared.limits.handshake_timeout, acceptor.accept(stream));
    let stream = tokio::select! {
        done = handshake => match done {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "API TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "API TLS handshake timed out");
                return;
            }
        },
        _ = slot.closed() => return,
    };
    let client = Client::from_peer(
        stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.as_ref()),
    );
    serve_http(TokioIo::new(stream), client, shared, slot).await;
    drop(admitted);
}

/// One connection's HTTP/1.1, until it ends, times out or is pushed out.
async fn serve_http<I>(io: I, client: Client, shared: Arc<Shared>, slot: Arc<ConnectionSlot>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let conn = Arc::new(routes::Connection {
        shared: shared.clone(),
        client,
        slot: slot.clone(),
    });
    let service = hyper::service::service_fn(move |req| routes::handle(req, conn.clone()));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(shared.limits.header_timeout)
        .max_buf_size(16 * 1024);
    let serving = builder.serve_connection(io, service);
    tokio::select! {
        done = serving => if let Err(e) = done {
            tracing::debug!(error = %e, "API connection ended");
        },
        _ = slot.closed() => tracing::debug!("idle API connection pushed out by a new one"),
    }
}

/// Client side for the CLI: one request over the Unix socket.
pub async fn request(
    socket: PathBuf,
    method: Method,
    path: &str,
) -> Result<(StatusCode, String), String> {
    let stream = tokio::net::UnixStream::connect(&socket)
        .await
        .map_err(|e| format!("{}: {e}", socket.display()))?;
    exchange(stream, "localhost", method, path, Vec::new()).await
}

/// One HTTP/1.1 request over an open stream (Unix socket, TCP or TLS):
/// the status and the body as text.
pub(crate) async fn exchange<S>(
    stream: S,
    host: &str,
    method: Method,
    path: &str,
    body: Vec<u8>,
) -> Result<(StatusCode, String), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    use http_body_util::BodyExt;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, host)
        .body(Full::new(Bytes::from(body)))
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
            user_data: None,
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn endpoints_answer_over_a_real_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let listener = bind_unix(&path).unwrap();
        let (tx, mut rx) = mpsc::channel(1);
        let (requests, _) = requests::channel();
        let mut shared = Shared::new(status(), tx, requests, crate::update::new_status());
        shared.boots_total = 3;
        tokio::spawn(serve_unix(listener, Arc::new(shared)));
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
        // The Unix socket is admin: a forced reboot goes straight to PID 1.
        let (code, body) = request(path.clone(), Method::POST, "/v1/reboot?force=true")
            .await
            .unwrap();
        assert_eq!(code, StatusCode::ACCEPTED, "{body}");
        let answer: RebootAnswer = serde_json::from_str(&body).unwrap();
        assert!(answer.accepted && answer.forced);
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
        let (requests, _) = requests::channel();
        let mut shared = Shared::new(status(), tx, requests, crate::update::new_status());
        shared.health = Some(monitor.clone());
        shared.boots_total = 1;
        tokio::spawn(serve_unix(listener, Arc::new(shared)));
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
