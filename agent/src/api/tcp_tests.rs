//! The TCP API end to end on loopback: real TLS, client certificates made
//! here with rcgen, the limits, and the 400 idle connections.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::{Method, StatusCode};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::identity::Identity;
use super::requests::{ApiRequest, RebootAccepted};
use super::*;

struct Ca {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    fn issue(&self, cn: &str, org: &str) -> Identity {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, org);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        Identity {
            chain: vec![cert.der().clone()],
            key: rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        }
    }
}

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

struct Node {
    addr: SocketAddr,
    /// The `api-listening` event the node would print.
    announced: crate::console::Event,
    pin: String,
    power: mpsc::Receiver<crate::node::power::Action>,
    requests: Option<mpsc::Receiver<ApiRequest>>,
    dir: tempfile::TempDir,
}

/// A node serving HTTPS on 127.0.0.1 with `ca` as its client CA.
async fn start(ca: &Ca, limits: Limits, edit: impl FnOnce(&mut Shared, &Path)) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let config = ApiConfig {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        client_ca: Some(ca.cert.pem()),
        ..ApiConfig::default()
    };
    let tcp = prepare_tcp(&config, &dir.path().join("api"), "node-1")
        .unwrap()
        .unwrap();
    let announced = listening_event(&tcp);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (power, power_rx) = mpsc::channel(1);
    let (requests, requests_rx) = requests::channel();
    let mut shared = Shared::new(status(), power, requests, crate::update::new_status());
    shared.limits = limits;
    shared.api = Some(ApiInfo {
        listen: addr.to_string(),
        cert_sha256: tcp.cert_sha256.clone(),
    });
    shared.user_data = user_data::UserDataStore {
        path: dir.path().join("user-data.toml"),
        with_node_layers: false,
    };
    shared.logs = logs::LogPaths {
        services: dir.path().to_owned(),
        kmsg: dir.path().join("kmsg"),
    };
    edit(&mut shared, dir.path());
    tokio::spawn(serve_tcp(listener, Arc::new(shared), tcp.tls));
    Node {
        addr,
        announced,
        pin: tcp.cert_sha256,
        power: power_rx,
        requests: Some(requests_rx),
        dir,
    }
}

/// One HTTPS request; `Err` when TLS or HTTP fails.
async fn https(
    node: &Node,
    who: Option<Identity>,
    method: Method,
    path: &str,
    body: Vec<u8>,
) -> Result<(StatusCode, String), String> {
    https_pinned(node.addr, &node.pin, who, method, path, body).await
}

async fn https_pinned(
    addr: SocketAddr,
    pin: &str,
    who: Option<Identity>,
    method: Method,
    path: &str,
    body: Vec<u8>,
) -> Result<(StatusCode, String), String> {
    let config = tls::client_config(pin, who).map_err(|e| e.to_string())?;
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("node-1").unwrap();
    let stream = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    exchange(stream, "node-1", method, path, body).await
}

fn error_of(body: &str) -> String {
    serde_json::from_str::<ErrorBody>(body)
        .unwrap_or_else(|e| panic!("not an error body ({e}): {body}"))
        .error
}

#[tokio::test(flavor = "current_thread")]
async fn certificates_decide_who_may_do_what() {
    let ca = Ca::new("operator");
    let mut node = start(&ca, Limits::default(), |_, _| {}).await;
    let admin = || Some(ca.issue("alice", auth::ROLE_ADMIN));
    let reader = || Some(ca.issue("bob", auth::ROLE_READER));
    let get = Method::GET;

    // Probes need no certificate; everything else does.
    let (code, body) = https(&node, None, get.clone(), "/healthz", vec![])
        .await
        .unwrap();
    assert_eq!((code, body.as_str()), (StatusCode::OK, "ok\n"));
    let (code, _) = https(&node, None, get.clone(), "/readyz", vec![])
        .await
        .unwrap();
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    for path in [
        "/status",
        "/metrics",
        "/v1/config",
        "/v1/logs/agent",
        "/nope",
    ] {
        let (code, body) = https(&node, None, get.clone(), path, vec![]).await.unwrap();
        assert_eq!(code, StatusCode::UNAUTHORIZED, "{path}");
        assert!(error_of(&body).contains("certificate"), "{body}");
    }
    let (code, _) = https(&node, None, Method::POST, "/v1/reboot?force=true", vec![])
        .await
        .unwrap();
    assert_eq!(code, StatusCode::UNAUTHORIZED);

    // A reader reads and may not change anything.
    let (code, body) = https(&node, reader(), get.clone(), "/status", vec![])
        .await
        .unwrap();
    assert_eq!(code, StatusCode::OK, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["api"]["cert_sha256"], node.pin.as_str());
    assert_eq!(v["api"]["listen"], node.addr.to_string());
    for (method, path) in [
        (Method::POST, "/v1/reboot?force=true"),
        (Method::POST, "/v1/update/apply"),
        (Method::PUT, "/v1/user-data"),
    ] {
        let (code, body) = https(&node, reader(), method, path, vec![]).await.unwrap();
        assert_eq!(code, StatusCode::FORBIDDEN, "{path}");
        assert!(error_of(&body).contains(auth::ROLE_READER), "{body}");
    }
    // A certificate of the CA without a role reads nothing.
    let nobody = Some(ca.issue("carol", "Acme"));
    let (code, _) = https(&node, nobody, get.clone(), "/status", vec![])
        .await
        .unwrap();
    assert_eq!(code, StatusCode::FORBIDDEN);

    // A certificate from another CA does not get through the handshake.
    let other = Ca::new("someone else");
    let refused = https(
        &node,
        Some(other.issue("mallory", auth::ROLE_ADMIN)),
        get.clone(),
        "/status",
        vec![],
    )
    .await;
    assert!(refused.is_err(), "{refused:?}");
    // Nor does a client that pins another fingerprint.
    let wrong_pin = "00".repeat(32);
    assert!(https_pinned(
        node.addr,
        &wrong_pin,
        admin(),
        get.clone(),
        "/healthz",
        vec![]
    )
    .await
    .is_err());

    // Admin: unknown paths, wrong methods, bodies where none belong.
    let (code, body) = https(&node, admin(), get.clone(), "/nope", vec![])
        .await
        .unwrap();
    assert_eq!(code, StatusCode::NOT_FOUND);
    assert!(error_of(&body).contains("/nope"));
    let (code, body) = https(&node, admin(), get.clone(), "/v1/reboot", vec![])
        .await
        .unwrap();
    assert_eq!(code, StatusCode::METHOD_NOT_ALLOWED, "{body}");
    error_of(&body);
    let (code, _) = https(&node, admin(), Method::POST, "/v1/reboot", b"x".to_vec())
        .await
        .unwrap();
    assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE);

    // Reboots: through the driver, or forced straight to PID 1.
    let mut driver = node.requests.take().unwrap();
    tokio::spawn(async move {
        while let Some(request) = driver.recv().await {
            if let ApiRequest::Reboot { request, reply } = request {
                assert!(!request.force);
                let _ = reply.send(Ok(RebootAccepted {
                    via: format!("window:{}", request.who),
                }));
            }
            // Update requests are dropped: 503.
        }
    });
    let (code, body) = https(&node, admin(), Method::POST, "/v1/reboot", vec![])
        .await
        .unwrap();
    assert_eq!(code, StatusCode::ACCEPTED, "{body}");
    let answer: RebootAnswer = serde_json::from_str(&body).unwrap();
    assert_eq!(
        answer,
        RebootAnswer {
            accepted: true,
            forced: false,
            via: "window:alice".into()
        }
    );
    assert!(node.power.try_recv().is_err(), "the strategy was skipped");
    let (code, body) = https(&node, admin(), Method::POST, "/v1/update/check", vec![])
        .await
        .unwrap();
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    error_of(&body);
    let (code, body) = https(
        &node,
        admin(),
        Method::POST,
        "/v1/reboot?force=true",
        vec![],
    )
    .await
    .unwrap();
    assert_eq!(code, StatusCode::ACCEPTED, "{body}");
    let answer: RebootAnswer = serde_json::from_str(&body).unwrap();
    assert!(answer.forced);
    assert_eq!(answer.via, "force");
    assert_eq!(
        node.power.recv().await,
        Some(crate::node::power::Action::Reboot)
    );
}

#[tokio::test(flavor = "current_thread")]
async fn config_logs_and_user_data() {
    let ca = Ca::new("operator");
    let node = start(&ca, Limits::default(), |shared, dir| {
        let table: toml::Table =
            toml::from_str("hostname = \"n\"\n[api]\nserver_key = \"KEY\"\n").unwrap();
        shared.config = redacted_config(&table);
        std::fs::write(dir.join("web.log"), "one\ntwo\nthree\n").unwrap();
    })
    .await;
    let admin = || Some(ca.issue("alice", auth::ROLE_ADMIN));
    let reader = || Some(ca.issue("bob", auth::ROLE_READER));

    let (code, body) = https(&node, reader(), Method::GET, "/v1/config", vec![])
        .await
        .unwrap();
    assert_eq!(code, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["hostname"], "n");
    assert_eq!(v["api"]["server_key"], "<redacted>");
    assert!(!body.contains("KEY"));

    let (code, body) = https(&node, reader(), Method::GET, "/v1/logs/web?tail=2", vec![])
        .await
        .unwrap();
    assert_eq!((code, body.as_str()), (StatusCode::OK, "two\nthree\n"));
    let (code, body) = https(&node, reader(), Method::GET, "/v1/logs/db", vec![])
        .await
        .unwrap();
    assert_eq!(code, StatusCode::NOT_FOUND, "{body}");
    let (code, _) = https(&node, reader(), Method::GET, "/v1/logs/web?tail=x", vec![])
        .await
        .unwrap();
    assert_eq!(code, StatusCode::BAD_REQUEST);
    let (code, _) = https(&node, reader(), Method::GET, "/v1/logs/..", vec![])
        .await
        .unwrap();
    assert_eq!(code, StatusCode::BAD_REQUEST);

    let kept = node.dir.path().join("user-data.toml");
    let (code, body) = https(
        &node,
        admin(),
        Method::PUT,
        "/v1/user-data",
        b"hostname = \"new\"\n".to_vec(),
    )
    .await
    .unwrap();
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(
        std::fs::read_to_string(&kept).unwrap(),
        "hostname = \"new\"\n"
    );
    let (code, body) = https(
        &node,
        admin(),
        Method::PUT,
        "/v1/user-data",
        b"[kubernetes]\nbootstrap_token = \"abcdef.0123456789abcdef\"\nbogus = 1\n".to_vec(),
    )
    .await
    .unwrap();
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert!(!body.contains("0123456789abcdef"), "{body}");
    let too_big = vec![b'#'; limits::MAX_USER_DATA + 1];
    let (code, _) = https(&node, admin(), Method::PUT, "/v1/user-data", too_big)
        .await
        .unwrap();
    assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        std::fs::read_to_string(&kept).unwrap(),
        "hostname = \"new\"\n"
    );
}

/// The fingerprint the node announces is the certificate it serves.
#[tokio::test(flavor = "current_thread")]
async fn the_announced_fingerprint_is_the_served_certificate() {
    let ca = Ca::new("operator");
    let node = start(&ca, Limits::default(), |_, _| {}).await;
    let config = tls::client_config(&node.pin, None).unwrap();
    let tcp = TcpStream::connect(node.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("node-1").unwrap();
    let stream = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .unwrap();
    let served = stream.get_ref().1.peer_certificates().unwrap()[0].clone();
    let crate::console::Event::ApiListening { cert_sha256, addr } = &node.announced else {
        panic!("{:?}", node.announced);
    };
    assert_eq!(&identity::cert_sha256(&served), cert_sha256);
    assert_eq!(addr, "127.0.0.1:0");
    // /status shows the same.
    assert_eq!(cert_sha256, &node.pin);
}

/// Reads until the server closes the connection; `false` on timeout.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 256];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn silent_and_idle_connections_are_closed() {
    let ca = Ca::new("operator");
    let limits = Limits {
        header_timeout: Duration::from_millis(500),
        handshake_timeout: Duration::from_millis(500),
        ..Limits::default()
    };
    let node = start(&ca, limits, |_, _| {}).await;
    // No TLS at all (plain HTTP is not answered either).
    let mut silent = TcpStream::connect(node.addr).await.unwrap();
    assert!(closed_within(&mut silent, Duration::from_secs(5)).await);
    let mut plain = TcpStream::connect(node.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut plain, b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut answer)).await;
    assert!(
        !String::from_utf8_lossy(&answer).contains("ok"),
        "plain HTTP answered"
    );
    // TLS done, then no request: the header timer closes it.
    let config = tls::client_config(&node.pin, None).unwrap();
    let tcp = TcpStream::connect(node.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("node-1").unwrap();
    let mut stream = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");
}

/// 400 idle connections (more than the cap) must not lock out the probes.
#[tokio::test(flavor = "current_thread")]
async fn four_hundred_idle_connections_do_not_stop_the_api() {
    let ca = Ca::new("operator");
    let node = start(&ca, Limits::default(), |_, _| {}).await;
    let mut idle = Vec::with_capacity(400);
    for _ in 0..400 {
        idle.push(TcpStream::connect(node.addr).await.unwrap());
    }
    // Let the server accept them all.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..3 {
        let started = std::time::Instant::now();
        let answer = tokio::time::timeout(
            Duration::from_secs(5),
            https(&node, None, Method::GET, "/healthz", vec![]),
        )
        .await
        .expect("/healthz answered within 5 s");
        assert_eq!(answer.unwrap().0, StatusCode::OK);
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    // The cap holds: all but the newest 64 (at most) were closed.
    let mut closed = 0;
    for s in idle.iter_mut() {
        if closed_within(s, Duration::from_millis(5)).await {
            closed += 1;
        }
    }
    assert!(
        closed >= 400 - Limits::default().max_connections,
        "{closed} closed"
    );
}
