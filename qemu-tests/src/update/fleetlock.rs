//! A FleetLock server (Zincati's reboot-lock protocol, as airlock speaks
//! it) on 127.0.0.1 for the tests: one lock slot per group,
//! `POST /v1/pre-reboot` takes it (200) or is refused (409) while another
//! node holds it, `POST /v1/steady-state` releases it. Requests must carry
//! `fleet-lock-protocol: true` and `{"client_params":{"id","group"}}`.
//! Every decision is logged with its time, for the non-overlap checks.

use std::collections::HashMap;
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use super::server::{self, Listener, ServerError};

#[derive(Debug, thiserror::Error)]
pub enum FleetLockError {
    #[error("starting the FleetLock server")]
    Start(#[source] ServerError),
    #[error("the lock log is inconsistent: {0}")]
    Log(String),
}

/// What happened to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockOp {
    /// `pre-reboot` granted (the node may reboot).
    Grant,
    /// `pre-reboot` refused: someone else holds the slot.
    Deny,
    /// `steady-state` released the node's slot.
    Release,
    /// `steady-state` from a node that held nothing.
    ReleaseNothing,
}

/// One decision of the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockEvent {
    /// Host time since the server started.
    pub at: Instant,
    pub wall: SystemTime,
    pub id: String,
    pub group: String,
    pub op: LockOp,
}

#[derive(Debug, Default)]
struct State {
    holders: HashMap<String, String>,
    log: Vec<LockEvent>,
}

/// The server; stops on drop.
#[derive(Debug)]
pub struct FleetLockServer {
    state: Arc<Mutex<State>>,
    listener: Listener,
}

impl FleetLockServer {
    pub fn start() -> Result<Self, FleetLockError> {
        let state = Arc::new(Mutex::new(State::default()));
        let s = Arc::clone(&state);
        let listener = Listener::start("fleetlock", move |stream| handle(&s, stream))
            .map_err(FleetLockError::Start)?;
        Ok(FleetLockServer { state, listener })
    }

    pub fn port(&self) -> u16 {
        self.listener.port
    }

    pub fn log(&self) -> Vec<LockEvent> {
        self.state.lock().map(|s| s.log.clone()).unwrap_or_default()
    }
}

fn handle(state: &Mutex<State>, mut stream: TcpStream) {
    let req = match server::read_request(&mut stream) {
        Ok(r) => r,
        Err(e) => {
            let _ = server::respond(&mut stream, 400, &error_body("bad_request", &e.to_string()));
            return;
        }
    };
    let (status, body) = decide(state, &req);
    let _ = server::respond(&mut stream, status, &body);
}

fn error_body(kind: &str, value: &str) -> String {
    serde_json::json!({"kind": kind, "value": value}).to_string()
}

/// The protocol: status and body for one request.
fn decide(state: &Mutex<State>, req: &server::Request) -> (u16, String) {
    if req.method != "POST" {
        return (405, error_body("method", "POST only"));
    }
    if req.header("fleet-lock-protocol") != Some("true") {
        return (
            400,
            error_body("bad_request", "missing fleet-lock-protocol: true"),
        );
    }
    let params = serde_json::from_slice::<serde_json::Value>(&req.body)
        .ok()
        .and_then(|v| {
            let p = v.get("client_params")?;
            Some((
                p.get("id")?.as_str()?.to_owned(),
                p.get("group")?.as_str()?.to_owned(),
            ))
        });
    let Some((id, group)) = params.filter(|(id, g)| !id.is_empty() && !g.is_empty()) else {
        return (
            400,
            error_body("bad_request", "client_params.id and .group needed"),
        );
    };
    let Ok(mut st) = state.lock() else {
        return (500, error_body("internal", "state lock poisoned"));
    };
    let (op, status, body) = match req.path.as_str() {
        "/v1/pre-reboot" => match st.holders.get(&group) {
            Some(holder) if *holder != id => (
                LockOp::Deny,
                409,
                error_body("failed_lock", &format!("group {group} is held by {holder}")),
            ),
            _ => {
                st.holders.insert(group.clone(), id.clone());
                (LockOp::Grant, 200, String::new())
            }
        },
        "/v1/steady-state" => {
            if st.holders.get(&group) == Some(&id) {
                st.holders.remove(&group);
                (LockOp::Release, 200, String::new())
            } else {
                (LockOp::ReleaseNothing, 200, String::new())
            }
        }
        _ => return (404, error_body("not_found", &req.path)),
    };
    let wall = SystemTime::now();
    if op != LockOp::Deny
        || !st
            .log
            .last()
            .is_some_and(|l| l.op == LockOp::Deny && l.id == id)
    {
        eprintln!(
            "  [fleetlock {}] {op:?} group {group} node {id}",
            humantime_like(wall)
        );
    }
    st.log.push(LockEvent {
        at: Instant::now(),
        wall,
        id,
        group,
        op,
    });
    (status, body)
}

/// `HH:MM:SS.mmm` UTC, for log lines.
fn humantime_like(t: SystemTime) -> String {
    let d = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    let s = d.as_secs() % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:03}Z",
        s / 3600,
        s / 60 % 60,
        s % 60,
        d.subsec_millis()
    )
}

/// Who held the lock of `group` when: `(id, granted, released)` in grant
/// order (`released` is `None` while held). Fails if the log shows two
/// holders at once or a release by a non-holder that was counted as one.
pub fn holds(
    log: &[LockEvent],
    group: &str,
) -> Result<Vec<(String, Instant, Option<Instant>)>, FleetLockError> {
    let mut out: Vec<(String, Instant, Option<Instant>)> = Vec::new();
    for e in log.iter().filter(|e| e.group == group) {
        match e.op {
            LockOp::Grant => {
                if let Some(open) = out.iter().find(|h| h.2.is_none()) {
                    if open.0 != e.id {
                        return Err(FleetLockError::Log(format!(
                            "{} granted while {} held the lock",
                            e.id, open.0
                        )));
                    }
                    continue; // a repeated pre-reboot by the holder
                }
                out.push((e.id.clone(), e.at, None));
            }
            LockOp::Release => match out.iter_mut().find(|h| h.2.is_none()) {
                Some(h) if h.0 == e.id => h.2 = Some(e.at),
                _ => {
                    return Err(FleetLockError::Log(format!(
                        "{} released a lock it did not hold",
                        e.id
                    )))
                }
            },
            LockOp::Deny | LockOp::ReleaseNothing => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn post(port: u16, path: &str, id: &str) -> u16 {
        use std::io::{Read, Write};
        let body = format!("{{\"client_params\":{{\"id\":\"{id}\",\"group\":\"default\"}}}}");
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(
            s,
            "POST {path} HTTP/1.1\r\nfleet-lock-protocol: true\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).unwrap();
        raw[9..12].parse().unwrap()
    }

    #[test]
    fn one_holder_per_group() {
        let srv = FleetLockServer::start().unwrap();
        let p = srv.port();
        assert_eq!(post(p, "/v1/pre-reboot", "a"), 200);
        assert_eq!(post(p, "/v1/pre-reboot", "a"), 200);
        assert_eq!(post(p, "/v1/pre-reboot", "b"), 409);
        assert_eq!(post(p, "/v1/steady-state", "b"), 200);
        assert_eq!(post(p, "/v1/pre-reboot", "b"), 409);
        assert_eq!(post(p, "/v1/steady-state", "a"), 200);
        assert_eq!(post(p, "/v1/pre-reboot", "b"), 200);
        assert_eq!(post(p, "/v1/steady-state", "b"), 200);
        let h = holds(&srv.log(), "default").unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!((h[0].0.as_str(), h[1].0.as_str()), ("a", "b"));
        assert!(h[0].2.unwrap() <= h[1].1);
        assert!(h[1].2.is_some());
    }

    #[test]
    fn the_protocol_header_and_params_are_required() {
        let state = Mutex::new(State::default());
        let req = |headers: Vec<(String, String)>, body: &str| server::Request {
            method: "POST".into(),
            path: "/v1/pre-reboot".into(),
            headers,
            body: body.as_bytes().to_vec(),
        };
        let h = vec![("Fleet-Lock-Protocol".to_owned(), "true".to_owned())];
        assert_eq!(decide(&state, &req(vec![], "{}")).0, 400);
        assert_eq!(decide(&state, &req(h.clone(), "{}")).0, 400);
        let ok = "{\"client_params\":{\"id\":\"n\",\"group\":\"g\"}}";
        assert_eq!(decide(&state, &req(h, ok)).0, 200);
    }
}
