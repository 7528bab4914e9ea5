//! The endpoints: which paths exist, the role each needs ([`auth`]), and
//! the answers. Every error is JSON `{"error": "..."}` with its status;
//! mutating and refused requests are recorded ([`audit`]).
//!
//! | method | path | role |
//! |---|---|---|
//! | GET | /healthz, /readyz | none |
//! | GET | /status, /metrics, /v1/config, /v1/logs/{agent,kernel,SERVICE} | reader |
//! | POST | /v1/reboot, /v1/update/{check,apply,rollback} | admin |
//! | PUT | /v1/user-data | admin |

use std::convert::Infallible;
use std::sync::Arc;

use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Body as _, Bytes, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;

use super::auth::{self, Client, Refusal};
use super::limits::{ConnectionSlot, MAX_TAIL_LINES, MAX_USER_DATA};
use super::requests::{self, ApiRequest, RebootRequest, Refused};
use super::{audit, logs, metrics, AgentUsage, ErrorBody, FullStatus, RebootAnswer, Shared};
use crate::node::power::Action;

pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// Default `tail` of a log request.
pub const DEFAULT_TAIL: usize = 100;
/// The slowest acceptable upload of a user-data body.
const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// One connection: who is on it and its place in the connection table.
#[derive(Debug)]
pub struct Connection {
    pub shared: Arc<Shared>,
    pub client: Client,
    pub slot: Arc<ConnectionSlot>,
}

/// The paths and the methods they take.
fn methods(path: &str) -> Option<&'static [Method]> {
    const GET: &[Method] = &[Method::GET];
    const POST: &[Method] = &[Method::POST];
    const PUT: &[Method] = &[Method::PUT];
    match path {
        "/healthz" | "/readyz" | "/status" | "/metrics" | "/v1/config" => Some(GET),
        "/v1/reboot" | "/v1/update/check" | "/v1/update/apply" | "/v1/update/rollback" => {
            Some(POST)
        }
        "/v1/user-data" => Some(PUT),
        p if p.strip_prefix("/v1/logs/").is_some_and(|s| !s.is_empty()) => Some(GET),
        _ => None,
    }
}

pub async fn handle(
    req: Request<Incoming>,
    conn: Arc<Connection>,
) -> Result<Response<Body>, Infallible> {
    let busy = conn.slot.busy();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let mutating = !matches!(method, Method::GET | Method::HEAD);
    let response = match auth::allow(&conn.client, auth::required(&method, &path)) {
        Err(Refusal::Unauthenticated) => error(
            StatusCode::UNAUTHORIZED,
            "a client certificate from the operator CA is required",
        ),
        Err(Refusal::Forbidden) => error(
            StatusCode::FORBIDDEN,
            &format!("{} may not {method} {path}", role_text(&conn.client)),
        ),
        Ok(()) => route(req, &conn, busy).await,
    };
    let status = response.status().as_u16();
    if audit::wanted(mutating, status) {
        let who = conn.client.who();
        let entry = audit::Entry {
            who: &who,
            method: method.as_str(),
            path: &path,
            status,
        };
        audit::record(&entry, matches!(status, 401 | 403 | 413));
    }
    Ok(response)
}

fn role_text(client: &Client) -> String {
    match client {
        Client::Certificate {
            role: Some(role), ..
        } => format!("role {}", role.name()),
        Client::Certificate { role: None, .. } => format!(
            "a certificate without {} or {} in its Organization",
            auth::ROLE_ADMIN,
            auth::ROLE_READER
        ),
        _ => "this client".into(),
    }
}

async fn route(
    req: Request<Incoming>,
    conn: &Connection,
    busy: super::limits::BusyGuard,
) -> Response<Body> {
    let shared = &conn.shared;
    let path = req.uri().path().to_owned();
    let Some(allowed) = methods(&path) else {
        return error(StatusCode::NOT_FOUND, &format!("no such endpoint: {path}"));
    };
    if !allowed.contains(req.method()) {
        let mut r = error(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("{path} takes {}", allowed[0]),
        );
        r.headers_mut().insert(
            hyper::header::ALLOW,
            HeaderValue::from_static(allowed[0].as_str()),
        );
        return r;
    }
    // Only user-data has a body; anything sent elsewhere is refused unread.
    if path != "/v1/user-data" && req.body().size_hint().lower() > 0 {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("{path} takes no body"),
        );
    }
    let query = req.uri().query().unwrap_or("").to_owned();
    match path.as_str() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            let snapshot = shared.health();
            let code = if snapshot.as_ref().is_some_and(|s| s.report.ready) {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            json(code, &snapshot.as_deref())
        }
        "/status" => {
            let health = shared.health();
            let full = FullStatus {
                node: &shared.status,
                agent: AgentUsage::read(),
                update: shared.update_status(),
                services: shared.services(),
                health: health.as_deref(),
                api: shared.api.as_ref(),
            };
            json(StatusCode::OK, &full)
        }
        "/metrics" => metrics_answer(shared),
        "/v1/config" => json(StatusCode::OK, &shared.config),
        "/v1/reboot" => reboot(shared, &conn.client, &query).await,
        "/v1/update/check" | "/v1/update/apply" | "/v1/update/rollback" => {
            update(shared, &conn.client, &path).await
        }
        "/v1/user-data" => put_user_data(shared, req).await,
        logs_path => match logs_path.strip_prefix("/v1/logs/") {
            Some(name) => log_answer(shared, name, &query, busy),
            None => error(StatusCode::NOT_FOUND, &format!("no such endpoint: {path}")),
        },
    }
}

fn metrics_answer(shared: &Shared) -> Response<Body> {
    let update = shared.update_status();
    let health = shared.health();
    let input = metrics::MetricsInput {
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
        CONTENT_TYPE,
        HeaderValue::from_static(metrics::CONTENT_TYPE),
    );
    r
}

/// `key=value` pairs of a query string (no percent-decoding: our values
/// are plain words and numbers).
fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

fn parse_bool(query: &str, key: &str) -> Result<bool, String> {
    match query_param(query, key) {
        None | Some("false" | "0") => Ok(false),
        Some("true" | "1" | "") => Ok(true),
        Some(other) => Err(format!("{key}={other:?}: expected true or false")),
    }
}

async fn reboot(shared: &Shared, client: &Client, query: &str) -> Response<Body> {
    let force = match parse_bool(query, "force") {
        Ok(f) => f,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
    };
    let who = client.who();
    if force {
        return match shared.power.try_send(Action::Reboot) {
            Ok(()) => {
                tracing::warn!(
                    who,
                    "forced reboot through the API: the update strategy is skipped"
                );
                json(
                    StatusCode::ACCEPTED,
                    &RebootAnswer {
                        accepted: true,
                        forced: true,
                        via: "force".into(),
                    },
                )
            }
            Err(_) => error(StatusCode::CONFLICT, "a shutdown is already under way"),
        };
    }
    let asked = requests::ask(&shared.requests, |reply| ApiRequest::Reboot {
        request: RebootRequest { force, who },
        reply,
    })
    .await;
    match asked {
        Ok(accepted) => json(
            StatusCode::ACCEPTED,
            &RebootAnswer {
                accepted: true,
                forced: false,
                via: accepted.via,
            },
        ),
        Err(refused) => refused_answer(&refused),
    }
}

async fn update(shared: &Shared, client: &Client, path: &str) -> Response<Body> {
    let who = client.who();
    let asked = requests::ask(&shared.requests, |reply| match path {
        "/v1/update/check" => ApiRequest::UpdateCheck { who, reply },
        "/v1/update/apply" => ApiRequest::UpdateApply { who, reply },
        _ => ApiRequest::UpdateRollback { who, reply },
    })
    .await;
    match asked {
        Ok(answer) => json(StatusCode::OK, &answer),
        Err(refused) => refused_answer(&refused),
    }
}

fn refused_answer(refused: &Refused) -> Response<Body> {
    let code = StatusCode::from_u16(refused.status)
        .ok()
        .filter(|c| c.is_client_error() || c.is_server_error())
        .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    error(code, &refused.message)
}

async fn put_user_data(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    if req.body().size_hint().lower() > MAX_USER_DATA as u64 {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("user-data is limited to {MAX_USER_DATA} bytes"),
        );
    }
    let body = Limited::new(req.into_body(), MAX_USER_DATA);
    let bytes = match tokio::time::timeout(BODY_TIMEOUT, body.collect()).await {
        Err(_) => return error(StatusCode::REQUEST_TIMEOUT, "the body took too long"),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("user-data is limited to {MAX_USER_DATA} bytes"),
            )
        }
        Ok(Err(e)) => return error(StatusCode::BAD_REQUEST, &format!("reading the body: {e}")),
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    let store = shared.user_data.clone();
    // File writes and fsync: off the runtime thread.
    let put = tokio::task::spawn_blocking(move || store.put(&bytes)).await;
    match put {
        Ok(Ok(())) => json(
            StatusCode::OK,
            &serde_json::json!({
                "saved": true,
                "path": shared.user_data.path.display().to_string(),
                "applies": "at the next boot",
            }),
        ),
        Ok(Err(super::user_data::UserDataError::Invalid(message))) => {
            error(StatusCode::BAD_REQUEST, &message)
        }
        Ok(Err(e)) => {
            let reason = crate::error_chain(&e);
            tracing::error!(error = %reason, "user-data not kept");
            error(StatusCode::INTERNAL_SERVER_ERROR, &reason)
        }
        Err(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "keeping the user-data failed",
        ),
    }
}

fn log_answer(
    shared: &Shared,
    name: &str,
    query: &str,
    busy: super::limits::BusyGuard,
) -> Response<Body> {
    let tail = match query_param(query, "tail") {
        None => DEFAULT_TAIL,
        Some(n) => match n.parse::<usize>() {
            Ok(n) => n.min(MAX_TAIL_LINES),
            Err(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    &format!("tail={n:?}: expected a number of lines"),
                )
            }
        },
    };
    let follow = match parse_bool(query, "follow") {
        Ok(f) => f,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
    };
    let source = match logs::Source::parse(name) {
        Ok(s) => s,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let (first, reader) = match logs::open(&shared.logs, &source, tail) {
        Ok(opened) => opened,
        Err(e @ logs::LogError::NoLog(_)) => return error(StatusCode::NOT_FOUND, &e.to_string()),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, &crate::error_chain(&e)),
    };
    let body: Body = if follow {
        // The stream holds the connection busy: it is not pushed out.
        let stream = logs::body_stream(first, Some(reader), shared.limits.max_follow, Some(busy));
        BodyExt::boxed_unsync(StreamBody::new(stream))
    } else {
        BodyExt::boxed_unsync(Full::new(first))
    };
    let mut r = Response::new(body);
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn full(code: StatusCode, body: Vec<u8>, content_type: &'static str) -> Response<Body> {
    let mut r = Response::new(BodyExt::boxed_unsync(Full::new(Bytes::from(body))));
    *r.status_mut() = code;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn text(code: StatusCode, body: &str) -> Response<Body> {
    full(code, body.as_bytes().to_vec(), "text/plain; charset=utf-8")
}

fn json(code: StatusCode, value: &impl Serialize) -> Response<Body> {
    match serde_json::to_vec_pretty(value) {
        Ok(mut body) => {
            body.push(b'\n');
            full(code, body, "application/json")
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

/// `{"error": message}` with `code`.
pub fn error(code: StatusCode, message: &str) -> Response<Body> {
    let body = ErrorBody {
        error: message.to_owned(),
    };
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    full(code, bytes, "application/json")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_methods() {
        assert_eq!(methods("/v1/logs/kernel"), Some(&[Method::GET][..]));
        assert_eq!(methods("/v1/logs/"), None);
        assert_eq!(methods("/v1/user-data"), Some(&[Method::PUT][..]));
        assert_eq!(methods("/nope"), None);
    }

    #[test]
    fn query_values() {
        assert_eq!(query_param("tail=5&follow=true", "follow"), Some("true"));
        assert_eq!(query_param("force", "force"), Some(""));
        assert_eq!(parse_bool("force=true", "force"), Ok(true));
        assert_eq!(parse_bool("", "force"), Ok(false));
        assert!(parse_bool("force=yes", "force").is_err());
    }
}
