//! The remote side of the `ballast` CLI: with `--node HOST[:PORT]` the
//! commands `status`, `logs`, `reboot`, `update check|apply|rollback`,
//! `config show` and `user-data put` talk to a node's HTTPS API instead of
//! this machine.
//!
//! Trust is explicit both ways. The client presents the operator's client
//! certificate (`client.crt`, `client.key` in the identity directory, made
//! by `ballast pki issue`). It trusts the node only by pin: the SHA-256 of
//! the node's certificate (announced in its `api-listening` console event
//! and in `/status`), given as `--pin` / `BALLAST_PIN` or recorded in the
//! identity directory's `known_nodes` after a first successful connection
//! with `--pin`. There is no trust on first use: without a pin the client
//! refuses to connect. The pin is checked in a rustls `ServerCertVerifier`;
//! the handshake signature is still verified with ring's algorithms, so a
//! peer must hold the pinned certificate's key. Names and expiry of the
//! node's self-signed certificate are not checked: the pin is the identity.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio_rustls::rustls::{
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName},
    ClientConfig,
};

use super::pki::{CLIENT_CERT, CLIENT_KEY};
use crate::api::identity::Identity;
use crate::api::tls::{pinned_client_config, PinnedServer};

/// The API's port when `--node` names none.
pub const DEFAULT_PORT: u16 = 9465;
/// File in the identity directory: `HOST:PORT SHA256` per line.
pub const KNOWN_NODES: &str = "known_nodes";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for a response head (an update check fetches a manifest;
/// an apply writes a slot).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
const APPLY_TIMEOUT: Duration = Duration::from_secs(900);

/// The global options that make a command remote.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RemoteArgs {
    /// Operate the node at HOST[:PORT] (default port 9465) through its
    /// HTTPS API instead of this machine.
    #[arg(long, global = true, value_name = "HOST[:PORT]")]
    pub node: Option<String>,
    /// Identity directory: client.crt, client.key, known_nodes (default:
    /// $BALLAST_IDENTITY, else $XDG_CONFIG_HOME/ballast, else
    /// ~/.config/ballast).
    #[arg(long, global = true, value_name = "DIR")]
    pub identity: Option<PathBuf>,
    /// SHA-256 of the node's certificate (its `api-listening` console
    /// event's cert_sha256; default: $BALLAST_PIN, else known_nodes).
    #[arg(long, global = true, value_name = "SHA256")]
    pub pin: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("{node:?} is not HOST[:PORT]")]
    BadNode { node: String },
    #[error("{pin:?} is not a SHA-256 fingerprint (64 hex digits, colons allowed)")]
    BadPin { pin: String },
    #[error(
        "no pin for {node}: pass --pin SHA256 (or BALLAST_PIN) with the cert_sha256 of the \
         node's api-listening console event; it is then kept in {}",
        known.display()
    )]
    NoPin { node: String, known: PathBuf },
    #[error("reading the identity file {}", path.display())]
    Identity {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {reason}", path.display())]
    BadIdentity { path: PathBuf, reason: String },
    #[error("writing {}", path.display())]
    KnownNodes {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to {node}")]
    Connect {
        node: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{node} presented a certificate with sha256 {presented}, not the pinned {expected}: \
         refusing it (if the node was reinstalled, check its api-listening event and pass --pin)"
    )]
    PinMismatch {
        node: String,
        expected: String,
        presented: String,
    },
    #[error("TLS handshake with {node}")]
    Tls {
        node: String,
        #[source]
        source: std::io::Error,
    },
    #[error("setting up TLS")]
    TlsConfig(#[source] crate::api::tls::TlsError),
    #[error("{method} {path} on {node}")]
    Http {
        method: Method,
        path: String,
        node: String,
        #[source]
        source: hyper::Error,
    },
    #[error("{method} {path} on {node}: no answer within {} s", timeout.as_secs())]
    Timeout {
        method: Method,
        path: String,
        node: String,
        timeout: Duration,
    },
    #[error("{method} {path} on {node}: {code}: {message}")]
    Status {
        method: Method,
        path: String,
        node: String,
        code: StatusCode,
        message: String,
    },
}

/// `HOST[:PORT]` as given, split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub port: u16,
}

impl Target {
    /// `host`, `host:port`, `[v6]`, `[v6]:port` or a bare IPv6 address.
    pub fn parse(s: &str) -> Result<Target, RemoteError> {
        let bad = || RemoteError::BadNode { node: s.to_owned() };
        let port = |p: &str| p.parse::<u16>().ok().filter(|&p| p != 0).ok_or_else(bad);
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (host, after) = rest.split_once(']').ok_or_else(bad)?;
            match after {
                "" => (host, DEFAULT_PORT),
                _ => (host, port(after.strip_prefix(':').ok_or_else(bad)?)?),
            }
        } else if s.matches(':').count() > 1 {
            (s, DEFAULT_PORT)
        } else {
            match s.split_once(':') {
                Some((host, p)) => (host, port(p)?),
                None => (s, DEFAULT_PORT),
            }
        };
        let ok = !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '_' | '%'));
        if !ok {
            return Err(bad());
        }
        Ok(Target {
            host: host.to_owned(),
            port,
        })
    }

    /// The key in `known_nodes` and the name in messages.
    pub fn key(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// A fingerprint as 32 bytes from hex, with or without colons, any case.
pub fn parse_pin(s: &str) -> Result<[u8; 32], RemoteError> {
    let clean: String = s.trim().chars().filter(|&c| c != ':').collect();
    let mut out = [0u8; 32];
    hex::decode_to_slice(&clean, &mut out)
        .map_err(|_| RemoteError::BadPin { pin: s.to_owned() })?;
    Ok(out)
}

/// The pin `known_nodes` holds for `key`, if any (later lines win).
pub fn known_pin(text: &str, key: &str) -> Option<String> {
    text.lines()
        .rev()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once(char::is_whitespace))
        .filter(|(k, _)| *k == key)
        .map(|(_, v)| v.trim().to_owned())
        .next()
}

/// `known_nodes` with `key`'s line set to `pin` (others kept as they are).
pub fn with_known_pin(text: &str, key: &str, pin: &str) -> String {
    let mut out: String = text
        .lines()
        .filter(|l| {
            l.trim()
                .split_once(char::is_whitespace)
                .is_none_or(|(k, _)| k != key)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    out.push_str(&format!("{key} {pin}\n"));
    out
}

/// The identity directory the options name.
pub fn identity_dir(args: &RemoteArgs) -> PathBuf {
    if let Some(dir) = &args.identity {
        return dir.clone();
    }
    if let Some(dir) = std::env::var_os("BALLAST_IDENTITY").filter(|d| !d.is_empty()) {
        return dir.into();
    }
    let config = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("."));
    config.join("ballast")
}

/// The client's certificate chain and key from the identity directory.
/// The key must not be readable by others, as ssh insists too.
fn load_identity(
    dir: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), RemoteError> {
    let (cert_path, key_path) = (dir.join(CLIENT_CERT), dir.join(CLIENT_KEY));
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| RemoteError::Identity {
            path: path.to_owned(),
            source,
        })
    };
    let bad = |path: &Path, reason: &str| RemoteError::BadIdentity {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    let cert_pem = read(&cert_path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|_| bad(&cert_path, "not a PEM certificate"))?;
    if certs.is_empty() {
        return Err(bad(&cert_path, "holds no certificate"));
    }
    let meta = std::fs::metadata(&key_path).map_err(|source| RemoteError::Identity {
        path: key_path.clone(),
        source,
    })?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(bad(
            &key_path,
            "readable by group or others; chmod 600 it (a client key is a credential)",
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(&read(&key_path)?)
        .map_err(|_| bad(&key_path, "not a PEM private key"))?;
    Ok((certs, key))
}

/// A connection recipe for one node: TLS configuration with the pin and
/// (optionally) the client identity.
#[derive(Debug)]
pub struct Remote {
    target: Target,
    tls: Arc<ClientConfig>,
    verifier: Arc<PinnedServer>,
    pin_hex: String,
    /// Where to record the pin after it worked, when it came from the
    /// command line or environment rather than from there.
    record_in: Option<PathBuf>,
}

impl Remote {
    /// From the global options: target, pin, identity.
    pub fn from_args(args: &RemoteArgs) -> Result<Remote, RemoteError> {
        let node = args.node.as_deref().unwrap_or_default();
        let target = Target::parse(node)?;
        let dir = identity_dir(args);
        let known = dir.join(KNOWN_NODES);
        let explicit = args
            .pin
            .clone()
            .or_else(|| std::env::var("BALLAST_PIN").ok().filter(|p| !p.is_empty()));
        let (pin, record_in) = match explicit {
            Some(pin) => (pin, Some(known)),
            None => {
                let text = std::fs::read_to_string(&known).unwrap_or_default();
                let pin = known_pin(&text, &target.key()).ok_or(RemoteError::NoPin {
                    node: target.key(),
                    known,
                })?;
                (pin, None)
            }
        };
        let pin = parse_pin(&pin)?;
        let identity = load_identity(&dir)?;
        Remote::new(target, pin, Some(identity), record_in)
    }

    /// A client for `target` trusting only `pin`, presenting `identity`
    /// when given.
    pub fn new(
        target: Target,
        pin: [u8; 32],
        identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
        record_in: Option<PathBuf>,
    ) -> Result<Remote, RemoteError> {
        let pin_hex = hex::encode(pin);
        let verifier = Arc::new(PinnedServer::new(&pin_hex));
        let identity = identity.map(|(chain, key)| Identity { chain, key });
        let tls =
            pinned_client_config(verifier.clone(), identity).map_err(RemoteError::TlsConfig)?;
        Ok(Remote {
            target,
            tls,
            verifier,
            pin_hex,
            record_in,
        })
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Sends one request; returns the response with its body unread.
    /// Non-2xx answers become [`RemoteError::Status`] with the API's
    /// `{"error": ...}` message.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<(&'static str, Vec<u8>)>,
        timeout: Duration,
    ) -> Result<hyper::Response<hyper::body::Incoming>, RemoteError> {
        let node = self.target.key();
        let timeout_err = || RemoteError::Timeout {
            method: method.clone(),
            path: path.to_owned(),
            node: node.clone(),
            timeout,
        };
        let connect = tokio::net::TcpStream::connect((self.target.host.as_str(), self.target.port));
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| RemoteError::Connect {
                node: node.clone(),
                source: std::io::ErrorKind::TimedOut.into(),
            })?
            .map_err(|source| RemoteError::Connect {
                node: node.clone(),
                source,
            })?;
        // The name only sets SNI; the pin, not the name, is checked.
        let name = ServerName::try_from(self.target.host.clone())
            .unwrap_or_else(|_| ServerName::try_from("ballast-node").expect("a valid DNS name"));
        let connector = tokio_rustls::TlsConnector::from(self.tls.clone());
        let handshake = tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, tcp)).await;
        let tls = match handshake {
            Err(_) => {
                return Err(RemoteError::Tls {
                    node,
                    source: std::io::ErrorKind::TimedOut.into(),
                })
            }
            Ok(Err(source)) => {
                let presented = self.verifier.presented();
                return Err(match presented {
                    Some(presented) if presented != self.pin_hex => RemoteError::PinMismatch {
                        node,
                        expected: self.pin_hex.clone(),
                        presented,
                    },
                    _ => RemoteError::Tls { node, source },
                });
            }
            Ok(Ok(tls)) => tls,
        };
        let http_err = |source| RemoteError::Http {
            method: method.clone(),
            path: path.to_owned(),
            node: node.clone(),
            source,
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(http_err)?;
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(hyper::header::HOST, node.as_str());
        let body = match body {
            Some((content_type, data)) => {
                req = req.header(hyper::header::CONTENT_TYPE, content_type);
                Bytes::from(data)
            }
            None => Bytes::new(),
        };
        let req = req
            .body(Full::new(body))
            .map_err(|_| RemoteError::BadNode { node: node.clone() })?;
        let resp = tokio::time::timeout(timeout, sender.send_request(req))
            .await
            .map_err(|_| timeout_err())?
            .map_err(http_err)?;
        // The node answered over the pinned channel: remember the pin.
        self.record_pin();
        let code = resp.status();
        if code.is_success() {
            return Ok(resp);
        }
        let text = match tokio::time::timeout(timeout, resp.into_body().collect()).await {
            Ok(Ok(b)) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
            _ => String::new(),
        };
        Err(RemoteError::Status {
            method,
            path: path.to_owned(),
            node,
            code,
            message: error_message(&text),
        })
    }

    /// Sends one request and reads the whole body as text.
    pub async fn text(
        &self,
        method: Method,
        path: &str,
        body: Option<(&'static str, Vec<u8>)>,
        timeout: Duration,
    ) -> Result<String, RemoteError> {
        let resp = self.send(method.clone(), path, body, timeout).await?;
        let collected = tokio::time::timeout(timeout, resp.into_body().collect())
            .await
            .map_err(|_| RemoteError::Timeout {
                method: method.clone(),
                path: path.to_owned(),
                node: self.target.key(),
                timeout,
            })?
            .map_err(|source| RemoteError::Http {
                method,
                path: path.to_owned(),
                node: self.target.key(),
                source,
            })?;
        Ok(String::from_utf8_lossy(&collected.to_bytes()).into_owned())
    }

    /// Writes `HOST:PORT PIN` to known_nodes once an explicit pin worked.
    /// Failing to record it does not fail the command.
    fn record_pin(&self) {
        let Some(path) = &self.record_in else { return };
        let key = self.target.key();
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if known_pin(&text, &key).as_deref() == Some(self.pin_hex.as_str()) {
            return;
        }
        let result = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(path, with_known_pin(&text, &key, &self.pin_hex)));
        if let Err(source) = result {
            let e = RemoteError::KnownNodes {
                path: path.clone(),
                source,
            };
            eprintln!("warning: {}", crate::error_chain(&e));
        }
    }
}

/// The API's `{"error": "..."}` message, else the body as it is.
fn error_message(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
        .unwrap_or_else(|| body.trim().to_owned())
}

/// What a remote command does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Status {
        json: bool,
    },
    Logs {
        source: String,
        tail: usize,
        follow: bool,
    },
    Reboot {
        force: bool,
        json: bool,
    },
    UpdateCheck {
        json: bool,
    },
    UpdateApply {
        json: bool,
    },
    UpdateRollback {
        json: bool,
    },
    ConfigShow {
        json: bool,
    },
    UserDataPut {
        file: PathBuf,
        json: bool,
    },
}

/// Runs `action` against the node `args` names.
pub fn run(args: &RemoteArgs, action: Action) -> anyhow::Result<()> {
    let remote = Remote::from_args(args)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run_action(&remote, action))
}

async fn run_action(remote: &Remote, action: Action) -> anyhow::Result<()> {
    match action {
        Action::Status { json } => {
            let body = remote
                .text(Method::GET, "/status", None, RESPONSE_TIMEOUT)
                .await?;
            if json {
                println!("{}", body.trim_end());
            } else {
                let v: serde_json::Value = serde_json::from_str(&body)?;
                print!("{}", super::render_status(&v));
            }
        }
        Action::Logs {
            source,
            tail,
            follow,
        } => {
            let path = logs_path(&source, tail, follow)?;
            // Following has no end; the first answer still has a deadline.
            let resp = remote
                .send(Method::GET, &path, None, RESPONSE_TIMEOUT)
                .await?;
            let mut body = resp.into_body();
            let stdout = std::io::stdout();
            while let Some(frame) = body.frame().await {
                let frame = frame?;
                if let Some(data) = frame.data_ref() {
                    let mut out = stdout.lock();
                    out.write_all(data)?;
                    out.flush()?;
                }
            }
        }
        Action::Reboot { force, json } => {
            let path = if force {
                "/v1/reboot?force=true"
            } else {
                "/v1/reboot"
            };
            let body = remote
                .text(Method::POST, path, None, RESPONSE_TIMEOUT)
                .await?;
            if json {
                println!("{}", body.trim_end());
            } else {
                let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                let via = v
                    .get("via")
                    .and_then(|v| v.as_str())
                    .unwrap_or("the node's strategy");
                let forced = v.get("forced").and_then(|f| f.as_bool()).unwrap_or(force);
                if forced {
                    println!(
                        "{}: reboot accepted, forced (skipping {via})",
                        remote.target().key()
                    );
                } else {
                    println!("{}: reboot accepted, through {via}", remote.target().key());
                }
            }
        }
        Action::UpdateCheck { json } => {
            let body = remote
                .text(Method::POST, "/v1/update/check", None, RESPONSE_TIMEOUT)
                .await?;
            print_object(&body, json);
        }
        Action::UpdateApply { json } => {
            let body = remote
                .text(Method::POST, "/v1/update/apply", None, APPLY_TIMEOUT)
                .await?;
            print_object(&body, json);
        }
        Action::UpdateRollback { json } => {
            let body = remote
                .text(Method::POST, "/v1/update/rollback", None, RESPONSE_TIMEOUT)
                .await?;
            print_object(&body, json);
        }
        Action::ConfigShow { json } => {
            let body = remote
                .text(Method::GET, "/v1/config", None, RESPONSE_TIMEOUT)
                .await?;
            let v: serde_json::Value = serde_json::from_str(&body)?;
            match (json, toml::to_string(&v)) {
                (false, Ok(text)) => print!("{text}"),
                _ => println!("{}", serde_json::to_string_pretty(&v)?),
            }
        }
        Action::UserDataPut { file, json } => {
            let data = std::fs::read(&file).map_err(|source| RemoteError::Identity {
                path: file.clone(),
                source,
            })?;
            let body = remote
                .text(
                    Method::PUT,
                    "/v1/user-data",
                    Some(("application/toml", data)),
                    RESPONSE_TIMEOUT,
                )
                .await?;
            if json {
                println!("{}", body.trim_end());
            } else {
                println!(
                    "{}: user-data stored; the node applies it at its next boot",
                    remote.target().key()
                );
            }
        }
    }
    Ok(())
}

/// `/v1/logs/SOURCE?tail=N[&follow=true]`, the source checked so it
/// cannot leave its path segment.
fn logs_path(source: &str, tail: usize, follow: bool) -> anyhow::Result<String> {
    anyhow::ensure!(
        crate::node::supervisor::valid_service_name(source),
        "{source:?} is not a log source (agent, kernel or a service name)"
    );
    let mut path = format!("/v1/logs/{source}?tail={tail}");
    if follow {
        path.push_str("&follow=true");
    }
    Ok(path)
}

/// A JSON object as `key: value` lines, or as it came with `--json`.
fn print_object(body: &str, json: bool) {
    let parsed = serde_json::from_str::<serde_json::Value>(body);
    match parsed {
        Ok(serde_json::Value::Object(map)) if !json => {
            for (k, v) in map {
                let v = v
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| v.to_string());
                println!("{k:>10}: {v}");
            }
        }
        _ => println!("{}", body.trim_end()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::pki::sha256;
    use tokio_rustls::rustls::crypto::ring as ring_provider;

    #[test]
    fn targets_parse_with_and_without_ports() {
        let t = |h: &str, p| Target {
            host: h.into(),
            port: p,
        };
        assert_eq!(Target::parse("node-1").unwrap(), t("node-1", 9465));
        assert_eq!(Target::parse("10.0.0.5:443").unwrap(), t("10.0.0.5", 443));
        assert_eq!(Target::parse("[::1]:9000").unwrap(), t("::1", 9000));
        assert_eq!(Target::parse("[fe80::1]").unwrap(), t("fe80::1", 9465));
        assert_eq!(Target::parse("fe80::1").unwrap(), t("fe80::1", 9465));
        assert_eq!(Target::parse("[::1]:9000").unwrap().key(), "[::1]:9000");
        assert_eq!(Target::parse("n").unwrap().key(), "n:9465");
        for bad in [
            "", ":80", "h:", "h:0", "h:99999", "[::1", "[::1]x", "a b", "h/x",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn pins_parse_in_common_spellings() {
        let hex64 = "ab".repeat(32);
        assert_eq!(parse_pin(&hex64).unwrap(), [0xab; 32]);
        let colons = vec!["AB"; 32].join(":");
        assert_eq!(parse_pin(&colons).unwrap(), [0xab; 32]);
        assert!(parse_pin("abcd").is_err());
        assert!(parse_pin(&"zz".repeat(32)).is_err());
        assert!(parse_pin(&"ab".repeat(33)).is_err());
    }

    #[test]
    fn known_nodes_are_read_and_updated_per_node() {
        let text = "# comment\nn1:9465 aaaa\nn2:9465 bbbb\n";
        assert_eq!(known_pin(text, "n1:9465").as_deref(), Some("aaaa"));
        assert_eq!(known_pin(text, "n3:9465"), None);
        assert_eq!(
            known_pin("n1:9465 old\nn1:9465 new\n", "n1:9465").as_deref(),
            Some("new")
        );
        let updated = with_known_pin(text, "n1:9465", "cccc");
        assert_eq!(known_pin(&updated, "n1:9465").as_deref(), Some("cccc"));
        assert_eq!(known_pin(&updated, "n2:9465").as_deref(), Some("bbbb"));
        assert!(updated.starts_with("# comment\n"));
        assert_eq!(updated.matches("n1:9465").count(), 1);
    }

    #[test]
    fn log_paths_keep_the_source_in_its_segment() {
        assert_eq!(
            logs_path("kernel", 20, false).unwrap(),
            "/v1/logs/kernel?tail=20"
        );
        assert_eq!(
            logs_path("web", 5, true).unwrap(),
            "/v1/logs/web?tail=5&follow=true"
        );
        assert!(logs_path("../status", 5, false).is_err());
        assert!(logs_path("a?b", 5, false).is_err());
    }

    /// A node stand-in: HTTPS on loopback with a self-signed certificate,
    /// client certificates required from `ca`; `/forbidden` answers 403
    /// with a JSON error, anything else 200 with the client's request path.
    async fn node(ca: &Path) -> (u16, String) {
        use std::convert::Infallible;
        use tokio_rustls::rustls::server::WebPkiClientVerifier;
        use tokio_rustls::rustls::{RootCertStore, ServerConfig};

        let provider = Arc::new(ring_provider::default_provider());
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(ca.join("ca.crt")).unwrap())
            .unwrap();
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .unwrap();
        let server = rcgen::generate_simple_self_signed(vec!["node".to_owned()]).unwrap();
        let pin = hex::encode(sha256(server.cert.der()));
        let key =
            PrivateKeyDer::from_pem_slice(server.key_pair.serialize_pem().as_bytes()).unwrap();
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![server.cert.der().clone()], key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(
                        |req: Request<hyper::body::Incoming>| async move {
                            let (code, body) = match req.uri().path() {
                                "/forbidden" => (403, "{\"error\":\"readers may not\"}".to_owned()),
                                _ => (200, req.uri().to_string()),
                            };
                            let resp = hyper::Response::builder()
                                .status(code)
                                .body(Full::new(Bytes::from(body)))
                                .unwrap();
                            Ok::<_, Infallible>(resp)
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        (port, pin)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn talks_to_a_pinned_node_with_a_client_certificate_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        super::super::pki::init(&ca, 2).unwrap();
        let id = dir.path().join("alice");
        super::super::pki::issue(&ca, super::super::pki::Role::Admin, "alice", &id, 2).unwrap();
        let (port, pin) = node(&ca).await;
        let target = Target::parse(&format!("127.0.0.1:{port}")).unwrap();
        let known = dir.path().join(KNOWN_NODES);
        let t = Duration::from_secs(10);

        let remote = Remote::new(
            target.clone(),
            parse_pin(&pin).unwrap(),
            Some(load_identity(&id).unwrap()),
            Some(known.clone()),
        )
        .unwrap();
        let body = remote
            .text(Method::GET, "/v1/logs/kernel?tail=3", None, t)
            .await
            .unwrap();
        assert_eq!(body, "/v1/logs/kernel?tail=3");
        let recorded = std::fs::read_to_string(&known).unwrap();
        assert_eq!(known_pin(&recorded, &target.key()), Some(pin.clone()));
        let err = remote
            .text(Method::POST, "/forbidden", None, t)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, RemoteError::Status { code, message, .. }
                if *code == StatusCode::FORBIDDEN && message == "readers may not"),
            "{err}"
        );

        // Another pin: refused by the client, naming what it was shown.
        let wrong = Remote::new(
            target.clone(),
            [7; 32],
            Some(load_identity(&id).unwrap()),
            None,
        )
        .unwrap();
        let err = wrong
            .text(Method::GET, "/status", None, t)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, RemoteError::PinMismatch { presented, .. } if *presented == pin),
            "{err}"
        );

        // No client certificate, or one from another CA: the node refuses.
        let other = dir.path().join("other");
        super::super::pki::init(&other, 2).unwrap();
        let mallory = dir.path().join("mallory");
        super::super::pki::issue(&other, super::super::pki::Role::Admin, "m", &mallory, 2).unwrap();
        for identity in [None, Some(load_identity(&mallory).unwrap())] {
            let anon =
                Remote::new(target.clone(), parse_pin(&pin).unwrap(), identity, None).unwrap();
            assert!(anon.text(Method::GET, "/status", None, t).await.is_err());
        }
    }

    #[test]
    fn identities_with_open_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        super::super::pki::init(&ca, 2).unwrap();
        let id = dir.path().join("alice");
        super::super::pki::issue(&ca, super::super::pki::Role::Reader, "alice", &id, 2).unwrap();
        assert!(load_identity(&id).is_ok());
        std::fs::set_permissions(id.join(CLIENT_KEY), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        let err = load_identity(&id).unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");
        let err = load_identity(dir.path()).unwrap_err();
        assert!(matches!(err, RemoteError::Identity { .. }), "{err}");
    }

    #[test]
    fn api_errors_show_their_message() {
        assert_eq!(
            error_message("{\"error\":\"reader may not\"}"),
            "reader may not"
        );
        assert_eq!(error_message("plain\n"), "plain");
    }
}
