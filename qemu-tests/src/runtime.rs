//! The `runtime` scenario: a node configured only by a NoCloud-style
//! `CIDATA` volume (hostname, static address, TCP API, a user HTTP health
//! check against a server of the test's own) becomes ready, and the host
//! reads `/readyz`, `/status` and `/metrics` over HTTPS (pinned, with the
//! operator's admin certificate; the CA is in the same user-data) through
//! a forwarded loopback port.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::disk;
#[cfg(test)]
use crate::http;
use crate::operator::{self, Operator};
use crate::scenarios::{Context, ScenarioError};
use crate::vm::GuestFwd;

/// Where the guest reaches the test's health server.
const HEALTH_ADDR: &str = "10.0.2.100:80";

/// The scenario's user-data around the operator's `[api]` section.
fn user_data(api_section: &str) -> String {
    format!(
        "hostname = \"node-1\"\n{api_section}\
         [network.interfaces.eth0]\naddresses = [\"10.0.2.15/24\"]\ngateway = \"10.0.2.2\"\n\
         [[health.checks]]\nname = \"host-http\"\nhttp = \"http://10.0.2.100/health\"\ntimeout = \"5s\"\n"
    )
}

/// A loopback HTTP server answering `200 ok` to every request, counting
/// them; stops on drop.
#[derive(Debug)]
struct HealthServer {
    port: u16,
    hits: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HealthServer {
    fn start() -> std::io::Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let port = listener.local_addr()?.port();
        let hits = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (h, s) = (hits.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut stream) = stream else { continue };
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                // Read the request head, then answer and close.
                let mut reader = BufReader::new(&stream);
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                    line.clear();
                }
                h.fetch_add(1, Ordering::SeqCst);
                let _ = stream.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n",
                );
            }
        });
        Ok(HealthServer {
            port,
            hits,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for HealthServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(SocketAddr::from((Ipv4Addr::LOCALHOST, self.port)));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A FAT image labelled `CIDATA` holding `user-data`.
pub(crate) fn make_cidata(
    dir: &Path,
    user_data: &str,
) -> Result<std::path::PathBuf, ScenarioError> {
    let img = dir.join("cidata.img");
    let ud = dir.join("user-data");
    std::fs::write(&ud, user_data).map_err(ScenarioError::Scratch)?;
    disk::run(
        Command::new("mkfs.vfat")
            .args(["-C", "-n", "CIDATA"])
            .arg(&img)
            .arg("2048"),
    )?;
    disk::run(
        Command::new("mcopy")
            .arg("-i")
            .arg(&img)
            .arg(&ud)
            .arg("::user-data"),
    )?;
    Ok(img)
}

/// Value of the first sample named `name` (with exactly `labels`, e.g.
/// `{check="x"}`, or none) in a Prometheus text exposition.
pub fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
    let key = format!("{name}{labels} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.trim().parse().ok())
}

/// `runtime`: CIDATA user-data applied; the host sees the node ready.
pub fn runtime(ctx: &Context) -> Result<(), ScenarioError> {
    let scratch = tempfile::tempdir().map_err(ScenarioError::Scratch)?;
    let op = Operator::new()?;
    let cidata = make_cidata(scratch.path(), &user_data(&op.api_user_data()?))?;
    let server = HealthServer::start().map_err(ScenarioError::Scratch)?;
    let mut vm = ctx
        .vm("runtime")
        .forward_api()
        .guestfwd(GuestFwd {
            guest_addr: HEALTH_ADDR.into(),
            host_port: server.port,
        })
        .extra_drive(&cidata)
        .spawn()?;
    let ready = vm.wait_for_any(&["ready", "boot-failed", "config-error"], ctx.boot_timeout)?;
    if ready.name != "ready" {
        return Err(vm
            .fail(format!("expected ready, got {}", ready.json()))
            .into());
    }
    let port = vm
        .api_port()
        .ok_or_else(|| ScenarioError::Setup("no API port".into()))?;
    let timeout = Duration::from_secs(20);
    let pin = operator::api_pin(&mut vm, 0)?;
    let api = op.admin_tls(&pin)?;

    // The checks run every 15 s (the agent's default [health] interval):
    // give the first run with the network up a moment.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = None;
    while Instant::now() < deadline {
        let r = api.request(port, "GET", "/readyz", None, timeout)?;
        if r.status == 200 {
            last = None;
            break;
        }
        last = Some(r);
        std::thread::sleep(Duration::from_secs(2));
    }
    if let Some(r) = last {
        return Err(vm
            .fail(format!("/readyz stayed {}: {}", r.status, r.body))
            .into());
    }
    vm.progress("/readyz 200");

    let status = api.request(port, "GET", "/status", None, timeout)?;
    let v: serde_json::Value = serde_json::from_str(&status.body)
        .map_err(|e| ScenarioError::Setup(format!("/status: {e}")))?;
    if v["node"]["hostname"] != "node-1" || !v["node"]["config_error"].is_null() {
        return Err(vm
            .fail(format!("user-data not applied: {}", status.body))
            .into());
    }
    let metrics = api.request(port, "GET", "/metrics", None, timeout)?;
    let ready = sample(&metrics.body, "ballast_node_ready", "");
    let check = sample(
        &metrics.body,
        "ballast_health_check_ok",
        "{check=\"host-http\"}",
    );
    if metrics.status != 200 || ready != Some(1.0) || check != Some(1.0) {
        return Err(vm
            .fail(format!(
                "metrics: node_ready {ready:?}, host-http check {check:?}"
            ))
            .into());
    }
    if server.hits.load(Ordering::SeqCst) == 0 {
        return Err(vm
            .fail("the user health check never reached the host's server")
            .into());
    }
    vm.progress(&format!(
        "metrics: node ready, user check ok ({} requests served)",
        server.hits.load(Ordering::SeqCst)
    ));
    vm.kill();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_found_by_name_and_labels() {
        let text = "# HELP x y\nballast_node_ready 1\nballast_health_check_ok{check=\"a\"} 0\n\
                    ballast_health_check_ok{check=\"host-http\"} 1\n";
        assert_eq!(sample(text, "ballast_node_ready", ""), Some(1.0));
        assert_eq!(
            sample(text, "ballast_health_check_ok", "{check=\"host-http\"}"),
            Some(1.0)
        );
        assert_eq!(
            sample(text, "ballast_health_check_ok", "{check=\"a\"}"),
            Some(0.0)
        );
        assert_eq!(sample(text, "missing", ""), None);
    }

    #[test]
    fn user_data_is_toml_with_the_api_section() {
        let text = user_data(&operator::api_section("PEM"));
        let v: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(v["hostname"].as_str(), Some("node-1"));
        assert_eq!(v["api"]["client_ca"].as_str().map(str::trim), Some("PEM"));
        assert_eq!(v["health"]["checks"][0]["name"].as_str(), Some("host-http"));
    }

    #[test]
    fn the_health_server_answers_and_counts() {
        let server = HealthServer::start().unwrap();
        let r = http::request(server.port, "GET", "/health", None, Duration::from_secs(5)).unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(server.hits.load(Ordering::SeqCst), 1);
    }
}
