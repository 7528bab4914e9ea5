//! A small async client for the Kubernetes API server: the agent's own calls
//! (Node condition and annotations, reboot Leases, cordon and drain), typed
//! with `k8s-openapi`. It owns the connection settings ([`ClientConfig`]),
//! authentication (bearer token, token file or client certificate), bounded
//! retries of server errors and connection failures, and the mapping of API
//! answers to [`KubeError`]. Credentials never reach a log: the
//! `Authorization` header is marked sensitive and [`Auth`]'s `Debug` is
//! redacted.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::NodeCondition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Status};
use reqwest::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use reqwest::{Method, StatusCode, Url};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// How the agent proves who it is to the API server: `token_file`, or what
/// a `[kubernetes.agent] kubeconfig` holds (a token, a token file or a
/// client certificate).
#[derive(Clone)]
pub enum Auth {
    /// No credential (a test server, or an API server behind a local proxy).
    #[cfg(test)]
    None,
    /// A bearer token held in memory.
    Token(String),
    /// A bearer token read from this file before every request, so a token
    /// that is rotated on disk is picked up without restarting the agent.
    TokenFile(PathBuf),
    /// A TLS client certificate (chain) and its private key, both PEM. The
    /// kubelet's `kubelet-client-current.pem` holds both; pass it twice.
    ClientCert { cert_pem: Vec<u8>, key_pem: Vec<u8> },
}

impl fmt::Debug for Auth {
    // Never print a token or a key, not even in a debug dump of the config.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            #[cfg(test)]
            Auth::None => f.write_str("None"),
            Auth::Token(_) => f.write_str("Token(<redacted>)"),
            Auth::TokenFile(p) => f.debug_tuple("TokenFile").field(p).finish(),
            Auth::ClientCert { .. } => f.write_str("ClientCert(<redacted>)"),
        }
    }
}

/// Bounded exponential backoff for 5xx answers and connection failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Total tries of one request (1 = no retry).
    pub attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 4,
            initial_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(4),
        }
    }
}

impl RetryPolicy {
    /// The pause before try number `attempt + 1` (`attempt` counts from 1).
    fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u32
            .checked_shl(attempt.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.initial_backoff
            .saturating_mul(factor)
            .min(self.max_backoff)
    }
}

/// Everything needed to reach the API server. Built by the caller from the
/// `[kubernetes.agent]` configuration; this module reads no config files.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `https://host:port` (or `http://` for a local test server).
    pub server: String,
    /// The cluster CA (PEM). When set it is the only trusted root; when not,
    /// the built-in web roots are used.
    pub ca_pem: Option<Vec<u8>>,
    /// `[proxy]` (the API server is reached through it unless `no_proxy`
    /// names it) and `[trust] ca` (trusted beside the built-in roots when
    /// `ca_pem` is not set, ignored when it is).
    pub outbound: ballast_updater::http::Outbound,
    pub auth: Auth,
    /// Per-request timeout (connect and answer).
    pub timeout: Duration,
    pub retry: RetryPolicy,
}

impl ClientConfig {
    pub fn new(server: impl Into<String>, ca_pem: Option<Vec<u8>>, auth: Auth) -> Self {
        ClientConfig {
            server: server.into(),
            ca_pem,
            outbound: ballast_updater::http::Outbound::default(),
            auth,
            timeout: Duration::from_secs(30),
            retry: RetryPolicy::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("kubernetes client: {field} {value:?}: {reason}")]
    Config {
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error("kubernetes client: reading the token file {path}")]
    TokenFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kubernetes client: the token file {path} is empty or not a valid header value")]
    BadToken { path: String },
    #[error("{verb} {path}: {source}")]
    Transport {
        verb: Method,
        path: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{verb} {path}: not found (404): {message}")]
    NotFound {
        verb: Method,
        path: String,
        message: String,
    },
    #[error("{verb} {path}: conflict (409, {reason}): {message}")]
    Conflict {
        verb: Method,
        path: String,
        reason: String,
        message: String,
    },
    #[error("{verb} {path}: too many requests (429): {message}")]
    TooManyRequests {
        verb: Method,
        path: String,
        message: String,
        retry_after: Option<Duration>,
    },
    #[error("{verb} {path}: HTTP {status} ({reason}): {message}")]
    Api {
        verb: Method,
        path: String,
        status: u16,
        reason: String,
        message: String,
    },
    #[error("{verb} {path}: decoding the answer")]
    Decode {
        verb: Method,
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{verb} {path}: encoding the request body")]
    Encode {
        verb: Method,
        path: String,
        #[source]
        source: serde_json::Error,
    },
}

impl KubeError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, KubeError::NotFound { .. })
    }

    pub fn is_conflict(&self) -> bool {
        matches!(self, KubeError::Conflict { .. })
    }
}

/// The kinds of PATCH the API server accepts that the agent uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchKind {
    /// RFC 7386 JSON merge patch: objects merge, lists are replaced.
    Merge,
    /// Kubernetes strategic merge patch: lists with a merge key (such as
    /// Node conditions by `type`) merge element by element.
    StrategicMerge,
}

impl PatchKind {
    fn content_type(self) -> &'static str {
        match self {
            PatchKind::Merge => "application/merge-patch+json",
            PatchKind::StrategicMerge => "application/strategic-merge-patch+json",
        }
    }
}

/// A connection to one API server. Cheap to clone (the HTTP pool is shared).
#[derive(Debug, Clone)]
pub struct KubeClient {
    http: reqwest::Client,
    base: Url,
    auth: Auth,
    retry: RetryPolicy,
}

impl KubeClient {
    pub fn new(config: ClientConfig) -> Result<Self, KubeError> {
        let base = Url::parse(&config.server).map_err(|e| KubeError::Config {
            field: "server",
            value: config.server.clone(),
            reason: e.to_string(),
        })?;
        if !matches!(base.scheme(), "https" | "http") || base.host_str().is_none() {
            return Err(KubeError::Config {
                field: "server",
                value: config.server.clone(),
                reason: "must be an http(s)://host[:port] URL".into(),
            });
        }
        if config.retry.attempts == 0 {
            return Err(KubeError::Config {
                field: "retry.attempts",
                value: "0".into(),
                reason: "must be at least 1".into(),
            });
        }
        let mut builder = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("ballast/", env!("CARGO_PKG_VERSION")));
        if let Some(ca) = &config.ca_pem {
            let certs =
                reqwest::Certificate::from_pem_bundle(ca).map_err(|e| KubeError::Config {
                    field: "ca_pem",
                    value: format!("{} bytes", ca.len()),
                    reason: e.to_string(),
                })?;
            if certs.is_empty() {
                return Err(KubeError::Config {
                    field: "ca_pem",
                    value: format!("{} bytes", ca.len()),
                    reason: "holds no PEM certificate".into(),
                });
            }
            // The cluster CA alone decides: a public CA must not be able to
            // impersonate the API server.
            builder = builder.tls_built_in_root_certs(false);
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        } else {
            let certs = config
                .outbound
                .roots()
                .map_err(|reason| KubeError::Config {
                    field: "trust.ca",
                    value: format!("{} bytes", config.outbound.extra_ca_pem.len()),
                    reason,
                })?;
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        // Only the configured proxy: PID 1's environment is not a setting.
        builder = builder.no_proxy();
        let proxies = config
            .outbound
            .proxies()
            .map_err(|reason| KubeError::Config {
                field: "proxy",
                value: "<see [proxy]>".into(),
                reason,
            })?;
        for proxy in proxies {
            builder = builder.proxy(proxy);
        }
        if let Auth::ClientCert { cert_pem, key_pem } = &config.auth {
            let mut pem = cert_pem.clone();
            pem.push(b'\n');
            pem.extend_from_slice(key_pem);
            let identity = reqwest::Identity::from_pem(&pem).map_err(|e| KubeError::Config {
                field: "client certificate",
                value: "<redacted>".into(),
                reason: e.to_string(),
            })?;
            builder = builder.identity(identity);
        }
        if let Auth::Token(t) = &config.auth {
            bearer(t).ok_or_else(|| KubeError::Config {
                field: "token",
                value: "<redacted>".into(),
                reason: "empty or not a valid header value".into(),
            })?;
        }
        let http = builder.build().map_err(|e| KubeError::Config {
            field: "server",
            value: config.server.clone(),
            reason: format!("building the HTTP client: {e}"),
        })?;
        Ok(KubeClient {
            http,
            base,
            auth: config.auth,
            retry: config.retry,
        })
    }

    /// GET `path` and decode it.
    pub async fn get<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, &str)],
    ) -> Result<T, KubeError> {
        let body = self.send(Method::GET, path, query, None).await?;
        decode(Method::GET, path, &body)
    }

    /// GET `path`; `None` when the object does not exist.
    pub async fn get_opt<T: DeserializeOwned>(&self, path: &str) -> Result<Option<T>, KubeError> {
        match self.get(path, &[]).await {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, KubeError> {
        let bytes = encode(Method::POST, path, body)?;
        let answer = self
            .send(Method::POST, path, &[], Some(("application/json", bytes)))
            .await?;
        decode(Method::POST, path, &answer)
    }

    pub async fn put<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, KubeError> {
        let bytes = encode(Method::PUT, path, body)?;
        let answer = self
            .send(Method::PUT, path, &[], Some(("application/json", bytes)))
            .await?;
        decode(Method::PUT, path, &answer)
    }

    pub async fn patch<T: DeserializeOwned>(
        &self,
        path: &str,
        kind: PatchKind,
        patch: &serde_json::Value,
    ) -> Result<T, KubeError> {
        let bytes = encode(Method::PATCH, path, patch)?;
        let answer = self
            .send(Method::PATCH, path, &[], Some((kind.content_type(), bytes)))
            .await?;
        decode(Method::PATCH, path, &answer)
    }

    /// DELETE `path`; the answer (the object or a Status) is not decoded.
    pub async fn delete(&self, path: &str) -> Result<(), KubeError> {
        self.send(Method::DELETE, path, &[], None).await.map(drop)
    }

    fn url(&self, verb: &Method, path: &str, query: &[(&str, &str)]) -> Result<Url, KubeError> {
        // Appended, not joined: a server URL with a path (an API proxy such
        // as https://proxy/k8s/clusters/c1) keeps it.
        if !path.starts_with('/') {
            return Err(KubeError::Config {
                field: "path",
                value: format!("{verb} {path}"),
                reason: "must start with '/'".into(),
            });
        }
        let mut url = self.base.clone();
        url.set_path(&format!("{}{path}", self.base.path().trim_end_matches('/')));
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        Ok(url)
    }

    fn authorization(&self) -> Result<Option<HeaderValue>, KubeError> {
        match &self.auth {
            #[cfg(test)]
            Auth::None => Ok(None),
            Auth::ClientCert { .. } => Ok(None),
            Auth::Token(t) => Ok(bearer(t)),
            Auth::TokenFile(path) => {
                let token =
                    std::fs::read_to_string(path).map_err(|source| KubeError::TokenFile {
                        path: path.clone(),
                        source,
                    })?;
                bearer(&token).map(Some).ok_or_else(|| KubeError::BadToken {
                    path: path.display().to_string(),
                })
            }
        }
    }

    /// One request with bounded retries; Ok carries the body of a 2xx.
    async fn send(
        &self,
        verb: Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<(&'static str, Vec<u8>)>,
    ) -> Result<Vec<u8>, KubeError> {
        let url = self.url(&verb, path, query)?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut req = self
                .http
                .request(verb.clone(), url.clone())
                .header(ACCEPT, "application/json");
            if let Some(auth) = self.authorization()? {
                req = req.header(AUTHORIZATION, auth);
            }
            if let Some((ctype, bytes)) = &body {
                req = req.header(CONTENT_TYPE, *ctype).body(bytes.clone());
            }
            let last = attempt >= self.retry.attempts;
            let failure = match req.send().await {
                Err(source) => {
                    if last {
                        return Err(KubeError::Transport {
                            verb,
                            path: path.to_string(),
                            source,
                        });
                    }
                    source.to_string()
                }
                Ok(resp) => {
                    let status = resp.status();
                    let retry_after = resp
                        .headers()
                        .get(RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(Duration::from_secs);
                    let bytes = match resp.bytes().await {
                        Ok(b) => b.to_vec(),
                        Err(source) if last => {
                            return Err(KubeError::Transport {
                                verb,
                                path: path.to_string(),
                                source,
                            })
                        }
                        Err(source) => {
                            tracing::debug!(%verb, path, attempt, error = %source, "kubernetes: reading the answer failed, retrying");
                            tokio::time::sleep(self.retry.backoff(attempt)).await;
                            continue;
                        }
                    };
                    if status.is_success() {
                        tracing::debug!(%verb, path, status = status.as_u16(), "kubernetes request");
                        return Ok(bytes);
                    }
                    if !status.is_server_error() || last {
                        return Err(api_error(verb, path, status, &bytes, retry_after));
                    }
                    format!("HTTP {}", status.as_u16())
                }
            };
            let pause = self.retry.backoff(attempt);
            tracing::warn!(%verb, path, attempt, error = %failure, retry_in_ms = u64::try_from(pause.as_millis()).unwrap_or(u64::MAX), "kubernetes request failed, retrying");
            tokio::time::sleep(pause).await;
        }
    }
}

fn bearer(token: &str) -> Option<HeaderValue> {
    let token = token.trim();
    if token.is_empty() {
        return None;
    }
    let mut value = HeaderValue::from_str(&format!("Bearer {token}")).ok()?;
    value.set_sensitive(true);
    Some(value)
}

fn encode<B: Serialize>(verb: Method, path: &str, body: &B) -> Result<Vec<u8>, KubeError> {
    serde_json::to_vec(body).map_err(|source| KubeError::Encode {
        verb,
        path: path.to_string(),
        source,
    })
}

fn decode<T: DeserializeOwned>(verb: Method, path: &str, body: &[u8]) -> Result<T, KubeError> {
    serde_json::from_slice(body).map_err(|source| KubeError::Decode {
        verb,
        path: path.to_string(),
        source,
    })
}

/// Map a non-2xx answer to an error, taking the message from the API's
/// `Status` object when the body is one.
fn api_error(
    verb: Method,
    path: &str,
    status: StatusCode,
    body: &[u8],
    retry_after: Option<Duration>,
) -> KubeError {
    let parsed: Option<Status> = serde_json::from_slice(body).ok();
    let message = parsed
        .as_ref()
        .and_then(|s| s.message.clone())
        .unwrap_or_else(|| {
            let text = String::from_utf8_lossy(body);
            text.chars()
                .take(200)
                .collect::<String>()
                .trim()
                .to_string()
        });
    let reason = parsed
        .and_then(|s| s.reason)
        .unwrap_or_else(|| status.canonical_reason().unwrap_or("").to_string());
    let path = path.to_string();
    match status {
        StatusCode::NOT_FOUND => KubeError::NotFound {
            verb,
            path,
            message,
        },
        StatusCode::CONFLICT => KubeError::Conflict {
            verb,
            path,
            reason,
            message,
        },
        StatusCode::TOO_MANY_REQUESTS => KubeError::TooManyRequests {
            verb,
            path,
            message,
            retry_after,
        },
        _ => KubeError::Api {
            verb,
            path,
            status: status.as_u16(),
            reason,
            message,
        },
    }
}

/// The API path of a Node.
pub(crate) fn node_path(node: &str) -> String {
    format!("/api/v1/nodes/{node}")
}

/// The parts of a Node the agent reads, decoded with k8s-openapi's types.
/// Whole `Node` and `Pod` objects are not decoded: their deserializers
/// (`NodeStatus`, `PodSpec` and everything under them) added 0.8 MB to the
/// static agent (measured), for fields the agent never reads.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeView {
    pub metadata: ObjectMeta,
    pub unschedulable: bool,
    pub conditions: Vec<NodeCondition>,
}

impl NodeView {
    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(key))
            .map(String::as_str)
    }
}

/// The parts of a Pod a drain reads (see [`NodeView`] for why not `Pod`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PodView {
    pub metadata: ObjectMeta,
    pub phase: Option<String>,
    /// Names of the pod's `emptyDir` volumes (data lost with the pod).
    pub empty_dir_volumes: Vec<String>,
}

/// Decode the part of `object` at `pointer` (absent or null: `None`).
fn part<T: DeserializeOwned>(
    object: &serde_json::Value,
    pointer: &str,
    verb: &Method,
    path: &str,
) -> Result<Option<T>, KubeError> {
    match object.pointer(pointer) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => T::deserialize(v)
            .map(Some)
            .map_err(|source| KubeError::Decode {
                verb: verb.clone(),
                path: path.to_string(),
                source,
            }),
    }
}

impl KubeClient {
    /// GET a Node, decoding only what the agent reads.
    pub async fn get_node(&self, name: &str) -> Result<NodeView, KubeError> {
        let path = node_path(name);
        let node: serde_json::Value = self.get(&path, &[]).await?;
        let verb = Method::GET;
        Ok(NodeView {
            metadata: part(&node, "/metadata", &verb, &path)?.unwrap_or_default(),
            unschedulable: part(&node, "/spec/unschedulable", &verb, &path)?.unwrap_or(false),
            conditions: part(&node, "/status/conditions", &verb, &path)?.unwrap_or_default(),
        })
    }

    /// The Pods bound to `node` (all namespaces).
    pub async fn list_pods_on(&self, node: &str) -> Result<Vec<PodView>, KubeError> {
        let path = "/api/v1/pods";
        let selector = format!("spec.nodeName={node}");
        let list: serde_json::Value = self.get(path, &[("fieldSelector", &selector)]).await?;
        let verb = Method::GET;
        let empty = Vec::new();
        let items = list
            .get("items")
            .and_then(serde_json::Value::as_array)
            .unwrap_or(&empty);
        items
            .iter()
            .map(|pod| {
                let volumes: Vec<k8s_openapi::api::core::v1::Volume> =
                    part(pod, "/spec/volumes", &verb, path)?.unwrap_or_default();
                Ok(PodView {
                    metadata: part(pod, "/metadata", &verb, path)?.unwrap_or_default(),
                    phase: part(pod, "/status/phase", &verb, path)?,
                    empty_dir_volumes: volumes
                        .into_iter()
                        .filter(|v| v.empty_dir.is_some())
                        .map(|v| v.name)
                        .collect(),
                })
            })
            .collect()
    }
}

/// A Kubernetes object name that is a DNS subdomain (RFC 1123): what Node,
/// Lease and namespace names must be. Checked before a name goes into a path.
pub(crate) fn is_dns_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Where "now" comes from; tests inject their own.
pub type Clock = std::sync::Arc<dyn Fn() -> std::time::SystemTime + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    std::sync::Arc::new(std::time::SystemTime::now)
}

/// A `SystemTime` as the timestamp type the API types use (times before
/// 1970 or past jiff's range clamp to the epoch; a node clock is neither).
pub(crate) fn timestamp(t: std::time::SystemTime) -> k8s_openapi::jiff::Timestamp {
    let d = t
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    i64::try_from(d.as_secs())
        .ok()
        .and_then(|s| {
            k8s_openapi::jiff::Timestamp::new(s, i32::try_from(d.subsec_nanos()).ok()?).ok()
        })
        .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)
}

/// An API timestamp back as a `SystemTime` (`None` before 1970).
pub(crate) fn system_time(ts: k8s_openapi::jiff::Timestamp) -> Option<std::time::SystemTime> {
    let secs = u64::try_from(ts.as_second()).ok()?;
    let nanos = u32::try_from(ts.subsec_nanosecond()).ok()?;
    std::time::UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kubernetes::testserver::TestServer;
    use k8s_openapi::api::core::v1::Node;

    #[test]
    fn backoff_doubles_and_is_capped() {
        let p = RetryPolicy {
            attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(500),
        };
        assert_eq!(p.backoff(1), Duration::from_millis(100));
        assert_eq!(p.backoff(2), Duration::from_millis(200));
        assert_eq!(p.backoff(3), Duration::from_millis(400));
        assert_eq!(p.backoff(4), Duration::from_millis(500));
        assert_eq!(p.backoff(40), Duration::from_millis(500));
    }

    #[test]
    fn bad_configs_are_refused_with_the_field() {
        let err = KubeClient::new(ClientConfig::new("not a url", None, Auth::None)).unwrap_err();
        assert!(err.to_string().contains("server"), "{err}");
        let err = KubeClient::new(ClientConfig::new("ftp://x", None, Auth::None)).unwrap_err();
        assert!(err.to_string().contains("ftp://x"), "{err}");
        let err = KubeClient::new(ClientConfig::new(
            "https://x",
            Some(b"not pem".to_vec()),
            Auth::None,
        ))
        .unwrap_err();
        assert!(err.to_string().contains("ca_pem"), "{err}");
        let err = KubeClient::new(ClientConfig::new(
            "https://x",
            None,
            Auth::Token("  ".into()),
        ))
        .unwrap_err();
        assert!(err.to_string().contains("token"), "{err}");
    }

    #[test]
    fn urls_keep_the_server_path_and_encode_the_query() {
        let client = KubeClient::new(ClientConfig::new(
            "https://proxy.example:8443/k8s/clusters/c1/",
            None,
            Auth::None,
        ))
        .unwrap();
        let url = client
            .url(
                &Method::GET,
                "/api/v1/pods",
                &[("fieldSelector", "spec.nodeName=n1")],
            )
            .unwrap();
        assert_eq!(
            url.as_str(),
            "https://proxy.example:8443/k8s/clusters/c1/api/v1/pods?fieldSelector=spec.nodeName%3Dn1"
        );
        let plain =
            KubeClient::new(ClientConfig::new("https://10.0.0.1:6443", None, Auth::None)).unwrap();
        assert_eq!(
            plain
                .url(&Method::GET, "/api/v1/nodes/n1", &[])
                .unwrap()
                .as_str(),
            "https://10.0.0.1:6443/api/v1/nodes/n1"
        );
        assert!(plain.url(&Method::GET, "api/v1", &[]).is_err());
    }

    #[test]
    fn secrets_do_not_show_in_debug_output() {
        let config = ClientConfig::new("https://x", None, Auth::Token("s3cr3t-token-value".into()));
        let client = KubeClient::new(config.clone()).unwrap();
        assert!(!format!("{config:?}").contains("s3cr3t"));
        assert!(!format!("{client:?}").contains("s3cr3t"));
        let header = bearer("s3cr3t-token-value").unwrap();
        assert!(header.is_sensitive());
        assert!(!format!("{header:?}").contains("s3cr3t"));
    }

    #[tokio::test]
    async fn server_errors_are_retried_then_reported() {
        let server = TestServer::start().await;
        server.add_node("n1");
        let client = server.client();
        server.fail_next(2);
        let node: Node = client.get(&node_path("n1"), &[]).await.unwrap();
        assert_eq!(node.metadata.name.as_deref(), Some("n1"));
        assert_eq!(server.requests_matching("GET", "/api/v1/nodes/n1"), 3);

        // More failures than tries: the 500 and the API's message come back.
        server.fail_next(10);
        let err = client.get::<Node>(&node_path("n1"), &[]).await.unwrap_err();
        match &err {
            KubeError::Api {
                status, message, ..
            } => {
                assert_eq!(*status, 500);
                assert!(message.contains("injected"), "{message}");
            }
            other => panic!("expected Api error, got {other:?}"),
        }
        assert!(err.to_string().contains("GET /api/v1/nodes/n1"), "{err}");
    }

    #[tokio::test]
    async fn not_found_is_its_own_variant_and_not_retried() {
        let server = TestServer::start().await;
        let client = server.client();
        let err = client
            .get::<Node>(&node_path("ghost"), &[])
            .await
            .unwrap_err();
        assert!(err.is_not_found(), "{err:?}");
        assert_eq!(server.requests_matching("GET", "/api/v1/nodes/ghost"), 1);
        assert!(client
            .get_opt::<Node>(&node_path("ghost"))
            .await
            .unwrap()
            .is_none());
    }

    #[tokio::test]
    async fn bearer_tokens_are_sent_and_token_files_reread() {
        let server = TestServer::start_with_token("first-token").await;
        server.add_node("n1");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "first-token\n").unwrap();
        let client = server.client_with(Auth::TokenFile(file.clone()));
        client.get::<Node>(&node_path("n1"), &[]).await.unwrap();

        // A rotated token on disk is used by the next request.
        server.set_token("second-token");
        let err = client.get::<Node>(&node_path("n1"), &[]).await.unwrap_err();
        assert!(matches!(err, KubeError::Api { status: 401, .. }), "{err:?}");
        std::fs::write(&file, "second-token").unwrap();
        client.get::<Node>(&node_path("n1"), &[]).await.unwrap();

        let missing = server.client_with(Auth::TokenFile(dir.path().join("nope")));
        let err = missing
            .get::<Node>(&node_path("n1"), &[])
            .await
            .unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }

    #[tokio::test]
    async fn https_with_the_cluster_ca_and_a_node_client_certificate() {
        use crate::kubernetes::testserver::tls;
        let server = TestServer::start_tls(true).await;
        server.add_node("n1");
        let ca = Some(tls::CA_PEM.as_bytes().to_vec());
        let cert = Auth::ClientCert {
            cert_pem: tls::CLIENT_PEM.as_bytes().to_vec(),
            key_pem: tls::CLIENT_KEY.as_bytes().to_vec(),
        };
        let client = KubeClient::new(server.config(ca.clone(), cert.clone())).unwrap();
        let node: Node = client.get(&node_path("n1"), &[]).await.unwrap();
        assert_eq!(node.metadata.name.as_deref(), Some("n1"));

        // No client certificate: the server refuses the handshake.
        let anonymous = KubeClient::new(server.config(ca, Auth::None)).unwrap();
        let err = anonymous
            .get::<Node>(&node_path("n1"), &[])
            .await
            .unwrap_err();
        assert!(matches!(err, KubeError::Transport { .. }), "{err:?}");

        // A server certificate from another CA (or only the web roots) is
        // not trusted, client certificate or not.
        let other = Some(tls::OTHER_PEM.as_bytes().to_vec());
        for ca in [other, None] {
            let client = KubeClient::new(server.config(ca, cert.clone())).unwrap();
            let err = client.get::<Node>(&node_path("n1"), &[]).await.unwrap_err();
            assert!(matches!(err, KubeError::Transport { .. }), "{err:?}");
        }
        assert_eq!(server.requests_matching("GET", "/api/v1/nodes/n1"), 1);

        // A key that is not PEM is a config error, not a panic.
        let bad = Auth::ClientCert {
            cert_pem: tls::CLIENT_PEM.as_bytes().to_vec(),
            key_pem: b"garbage".to_vec(),
        };
        let err = KubeClient::new(ClientConfig::new(server.url(), None, bad)).unwrap_err();
        assert!(err.to_string().contains("client certificate"), "{err}");
        assert!(!err.to_string().contains("garbage"), "{err}");
    }

    #[tokio::test]
    async fn connection_failures_are_retried_then_reported() {
        // A port nobody listens on: bind, note the port, close.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut config = ClientConfig::new(format!("http://127.0.0.1:{port}"), None, Auth::None);
        config.retry = RetryPolicy {
            attempts: 2,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(10),
        };
        let client = KubeClient::new(config).unwrap();
        let err = client.get::<Node>(&node_path("n1"), &[]).await.unwrap_err();
        assert!(matches!(err, KubeError::Transport { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn the_api_server_is_reached_through_the_proxy_unless_no_proxy_names_it() {
        use crate::config::proxy_testing::ForwardProxy;
        let server = TestServer::start().await;
        server.add_node("n1");
        let proxy = ForwardProxy::start(server.addr());
        // A name no resolver knows: only the proxy can reach it.
        let url = format!("http://kube.test:{}", server.addr().port());
        let mut config = server.config(None, Auth::None);
        config.server = url.clone();
        config.outbound.http_proxy = Some(proxy.url.clone());
        let client = KubeClient::new(config.clone()).unwrap();
        assert_eq!(
            client
                .get_node("n1")
                .await
                .unwrap()
                .metadata
                .name
                .as_deref(),
            Some("n1")
        );
        let seen = proxy.seen();
        assert_eq!(
            seen,
            [format!("GET {url}/api/v1/nodes/n1 HTTP/1.1")],
            "{seen:?}"
        );

        config.outbound.no_proxy = vec!["kube.test".into()];
        config.retry.attempts = 1;
        let client = KubeClient::new(config).unwrap();
        assert!(client.get_node("n1").await.is_err());
        assert_eq!(proxy.seen().len(), 1);
    }

    #[tokio::test]
    async fn trust_ca_is_trusted_beside_the_public_roots_without_a_cluster_ca() {
        use crate::kubernetes::testserver::tls;
        let server = TestServer::start_tls(false).await;
        server.add_node("n1");
        let mut config = server.config(None, Auth::None);
        config.retry.attempts = 1;
        assert!(KubeClient::new(config.clone())
            .unwrap()
            .get_node("n1")
            .await
            .is_err());
        config.outbound.extra_ca_pem = tls::CA_PEM.to_owned();
        let client = KubeClient::new(config).unwrap();
        assert_eq!(
            client
                .get_node("n1")
                .await
                .unwrap()
                .metadata
                .name
                .as_deref(),
            Some("n1")
        );
    }
}
