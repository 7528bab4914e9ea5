//! EC2-style instance metadata (IMDSv2 only): when a node asks, and the
//! client that asks. A session token is taken with `PUT /latest/api/token`
//! and sent with every `GET` (`/latest/user-data`,
//! `/latest/meta-data/instance-id`, `/latest/meta-data/local-hostname`);
//! IMDSv1 (a GET without a token) is never used. Timeouts are short and
//! bodies bounded, so a node without a metadata service boots without
//! delay and a hostile one cannot fill PID 1's memory.
//!
//! Asked only on EC2: when the kernel command line says
//! `ballast.platform=ec2`, or, without a `ballast.platform` word, when the
//! DMI vendor strings name Amazon EC2 ([`wanted`]).

use std::time::Duration;

use reqwest::{Method, StatusCode};

/// Where AWS (and clouds copying it) serve instance metadata.
pub const ENDPOINT: &str = "http://169.254.169.254";
/// EC2's own user-data limit.
pub const MAX_USER_DATA: usize = 16 * 1024;
/// Instance ids and host names are short; anything longer is refused.
const MAX_META_DATA: usize = 255;
/// A session token is a short opaque string.
const MAX_TOKEN: usize = 4096;
/// A token lives six hours, as cloud-init asks; the node uses it for seconds.
const TOKEN_TTL_SECONDS: &str = "21600";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest the whole exchange may take, retries included.
pub const DEADLINE: Duration = Duration::from_secs(5);
/// Pause between token attempts while the service is not reachable yet.
const RETRY_PAUSE: Duration = Duration::from_millis(500);

/// DMI strings that identify an EC2 instance (Nitro: `sys_vendor`;
/// Xen-based: `bios_vendor`/`bios_version` say Amazon).
pub const DMI_FILES: [&str; 3] = [
    "/sys/class/dmi/id/sys_vendor",
    "/sys/class/dmi/id/bios_vendor",
    "/sys/class/dmi/id/bios_version",
];

#[derive(Debug, thiserror::Error)]
pub enum ImdsError {
    #[error("instance metadata {url}: building the client")]
    Client {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("instance metadata {url}")]
    Request {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("instance metadata {url}: HTTP {status}")]
    Status { url: String, status: StatusCode },
    #[error("instance metadata {url}: larger than {limit} bytes")]
    TooLarge { url: String, limit: usize },
    #[error("instance metadata {url}: not UTF-8 text")]
    NotText { url: String },
    #[error("instance metadata {url}: no answer within {deadline:?}")]
    Deadline { url: String, deadline: Duration },
}

/// What the metadata service said about this instance. A path the
/// service answers with 404 (no user-data given) is `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata {
    pub user_data: Option<String>,
    pub instance_id: Option<String>,
    pub local_hostname: Option<String>,
}

/// Whether to ask the metadata service: `ballast.platform=ec2` on the
/// command line forces it, any other `ballast.platform` value turns it off
/// (so `ballast.platform=none` disables detection), and without the word
/// the DMI strings decide.
pub fn wanted(cmdline: &str, dmi: &[String]) -> bool {
    let platform = cmdline
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("ballast.platform="))
        .next_back();
    match platform {
        Some(p) => p.trim_matches('"') == "ec2",
        None => dmi
            .iter()
            .any(|s| s.trim().eq_ignore_ascii_case("amazon ec2") || s.contains("amazon")),
    }
}

/// Reads the DMI strings [`wanted`] looks at (missing files are skipped:
/// aarch64 QEMU without firmware tables has none).
pub fn read_dmi() -> Vec<String> {
    DMI_FILES
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .collect()
}

/// Asks the service at `base` (normally [`ENDPOINT`]) for this instance's
/// metadata, within [`DEADLINE`].
pub async fn fetch(base: &str) -> Result<Metadata, ImdsError> {
    fetch_within(base, DEADLINE).await
}

async fn fetch_within(base: &str, deadline: Duration) -> Result<Metadata, ImdsError> {
    let base = base.trim_end_matches('/');
    tokio::time::timeout(deadline, fetch_unbounded(base))
        .await
        .unwrap_or_else(|_| {
            Err(ImdsError::Deadline {
                url: base.to_owned(),
                deadline,
            })
        })
}

async fn fetch_unbounded(base: &str) -> Result<Metadata, ImdsError> {
    let client = reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT)
        // Link-local and never through a proxy named in the environment;
        // a redirect would send the token elsewhere.
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|source| ImdsError::Client {
            url: base.to_owned(),
            source,
        })?;
    let token_url = format!("{base}/latest/api/token");
    // Right after the first lease the service may not answer yet: retry
    // connection failures until the deadline ends the exchange.
    let token = loop {
        let sent = client
            .request(Method::PUT, &token_url)
            .header("X-aws-ec2-metadata-token-ttl-seconds", TOKEN_TTL_SECONDS)
            .send()
            .await;
        match sent {
            Ok(response) => match read(response, &token_url, MAX_TOKEN).await? {
                Some(token) => break token,
                None => {
                    return Err(ImdsError::Status {
                        url: token_url,
                        status: StatusCode::NOT_FOUND,
                    })
                }
            },
            Err(e) if e.is_connect() => {
                tracing::debug!(error = %e, "metadata service not reachable yet");
                tokio::time::sleep(RETRY_PAUSE).await;
            }
            Err(source) => {
                return Err(ImdsError::Request {
                    url: token_url,
                    source,
                })
            }
        }
    };
    let get = |path: &'static str, limit: usize| {
        let client = &client;
        let token = token.trim();
        async move {
            let url = format!("{base}{path}");
            let response = client
                .get(&url)
                .header("X-aws-ec2-metadata-token", token)
                .send()
                .await
                .map_err(|source| ImdsError::Request {
                    url: url.clone(),
                    source,
                })?;
            read(response, &url, limit).await
        }
    };
    Ok(Metadata {
        user_data: get("/latest/user-data", MAX_USER_DATA).await?,
        instance_id: get("/latest/meta-data/instance-id", MAX_META_DATA)
            .await?
            .map(|s| s.trim().to_owned()),
        local_hostname: get("/latest/meta-data/local-hostname", MAX_META_DATA)
            .await?
            .map(|s| s.trim().to_owned()),
    })
}

/// The body of a 200 answer, at most `limit` bytes; `None` for 404.
async fn read(
    mut response: reqwest::Response,
    url: &str,
    limit: usize,
) -> Result<Option<String>, ImdsError> {
    let status = response.status();
    if status == StatusCode::NOT_FOUND {
        return Ok(None);
    }
    if status != StatusCode::OK {
        return Err(ImdsError::Status {
            url: url.to_owned(),
            status,
        });
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|source| ImdsError::Request {
            url: url.to_owned(),
            source,
        })?
    {
        if body.len() + chunk.len() > limit {
            return Err(ImdsError::TooLarge {
                url: url.to_owned(),
                limit,
            });
        }
        body.extend_from_slice(&chunk);
    }
    String::from_utf8(body)
        .map(Some)
        .map_err(|_| ImdsError::NotText {
            url: url.to_owned(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use std::sync::{Arc, Mutex};

    use http_body_util::Full;
    use hyper::body::{Bytes, Incoming};
    use hyper::{Request, Response};

    /// A metadata service on loopback that enforces IMDSv2 as AWS does
    /// (a GET without a valid token is 401) and records what it was asked.
    struct Service {
        user_data: Option<Vec<u8>>,
        seen: Mutex<Vec<String>>,
    }

    const TOKEN: &str = "AQAEAFake-session-token==";

    fn answer(service: &Service, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_owned();
        service
            .seen
            .lock()
            .unwrap()
            .push(format!("{} {path}", req.method()));
        let reply = |status: u16, body: Vec<u8>| {
            Response::builder()
                .status(status)
                .body(Full::new(Bytes::from(body)))
                .unwrap()
        };
        if req.method() == hyper::Method::PUT && path == "/latest/api/token" {
            return match req.headers().get("x-aws-ec2-metadata-token-ttl-seconds") {
                Some(_) => reply(200, TOKEN.into()),
                None => reply(400, Vec::new()),
            };
        }
        if req
            .headers()
            .get("x-aws-ec2-metadata-token")
            .map(|v| v.as_bytes())
            != Some(TOKEN.as_bytes())
        {
            return reply(401, Vec::new());
        }
        match path.as_str() {
            "/latest/user-data" => match &service.user_data {
                Some(d) => reply(200, d.clone()),
                None => reply(404, Vec::new()),
            },
            "/latest/meta-data/instance-id" => reply(200, b"i-0123456789abcdef0".to_vec()),
            "/latest/meta-data/local-hostname" => {
                reply(200, b"ip-10-0-0-7.ec2.internal\n".to_vec())
            }
            _ => reply(404, Vec::new()),
        }
    }

    async fn serve(user_data: Option<Vec<u8>>) -> (String, Arc<Service>) {
        let service = Arc::new(Service {
            user_data,
            seen: Mutex::new(Vec::new()),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let s = service.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let s = s.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let r = answer(&s, &req);
                        async move { Ok::<_, Infallible>(r) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        (base, service)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_token_is_taken_first_and_sent_with_every_get() {
        let (base, service) = serve(Some(b"hostname = \"from-imds\"\n".to_vec())).await;
        let m = fetch(&base).await.unwrap();
        assert_eq!(m.user_data.as_deref(), Some("hostname = \"from-imds\"\n"));
        assert_eq!(m.instance_id.as_deref(), Some("i-0123456789abcdef0"));
        assert_eq!(
            m.local_hostname.as_deref(),
            Some("ip-10-0-0-7.ec2.internal")
        );
        let seen = service.seen.lock().unwrap().clone();
        assert_eq!(
            seen,
            [
                "PUT /latest/api/token",
                "GET /latest/user-data",
                "GET /latest/meta-data/instance-id",
                "GET /latest/meta-data/local-hostname",
            ]
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn no_user_data_is_none_not_an_error() {
        let (base, _) = serve(None).await;
        let m = fetch(&base).await.unwrap();
        assert_eq!(m.user_data, None);
        assert!(m.local_hostname.is_some());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn user_data_over_the_ec2_limit_is_refused() {
        let (base, _) = serve(Some(vec![b'#'; MAX_USER_DATA + 1])).await;
        let err = fetch(&base).await.unwrap_err();
        assert!(matches!(err, ImdsError::TooLarge { limit, .. } if limit == MAX_USER_DATA));
        let (base, _) = serve(Some(vec![0xff, 0xfe])).await;
        assert!(matches!(
            fetch(&base).await.unwrap_err(),
            ImdsError::NotText { .. }
        ));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_node_without_a_service_gives_up_within_the_deadline() {
        // A port nothing listens on: connection refused at once, retried
        // until the deadline (shortened here).
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);
        let err = fetch_within(&base, Duration::from_millis(1200))
            .await
            .unwrap_err();
        assert!(matches!(err, ImdsError::Deadline { .. }), "{err}");
    }

    #[test]
    fn asked_on_ec2_or_when_the_command_line_says_so() {
        let nitro = ["Amazon EC2\n".to_owned()];
        let xen = ["Xen\n".to_owned(), "4.11.amazon\n".to_owned()];
        let qemu = ["QEMU\n".to_owned()];
        assert!(wanted("console=ttyS0", &nitro));
        assert!(wanted("", &xen));
        assert!(!wanted("console=ttyS0", &qemu));
        assert!(!wanted("", &[]));
        assert!(wanted("ballast.platform=ec2", &qemu));
        assert!(!wanted("ballast.platform=none", &nitro));
        assert!(wanted("ballast.platform=none ballast.platform=ec2", &[]));
    }
}
