//! The `remote` scenario: a node operated only through its HTTPS API with
//! the host's `ballast` client, as an operator would. `ballast pki init`
//! makes the CA the node gets through user-data (fw_cfg); the client pins
//! the fingerprint the node announced in `api-listening`, reads status and
//! logs; a reader's reboot is refused (403); a certificate from another
//! CA and a wrong pin are refused; plain HTTP gets no HTTP answer;
//! `/healthz` answers within 5 s while 400 idle connections are held; an
//! admin reboot goes through the strategy and the node comes back ready
//! with a new boot id and the same certificate.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::http;
use crate::operator::{self, Operator, Run};
use crate::scenarios::{reboot_user_data, Context, ScenarioError};
use crate::tls::TlsClient;
use crate::vm::Vm;

/// Idle connections held open while `/healthz` must still answer.
const IDLE_CONNECTIONS: usize = 400;
/// How long `/healthz` may take under that load.
const HEALTHZ_BUDGET: Duration = Duration::from_secs(5);

/// Fails the VM with `what` and the run's output unless `ok`.
fn expect(vm: &mut Vm, ok: bool, what: &str, run: &Run) -> Result<(), ScenarioError> {
    if ok {
        vm.progress(&format!("{what}: ok"));
        Ok(())
    } else {
        Err(vm.fail(format!("{what}: {}", run.describe())).into())
    }
}

fn json(run: &Run) -> Value {
    serde_json::from_str(run.stdout.trim()).unwrap_or(Value::Null)
}

pub fn remote(ctx: &Context) -> Result<(), ScenarioError> {
    let op = Operator::new()?;
    op.issue("ca", "reader", "rita")?;
    op.init_ca("other-ca")?;
    op.issue("other-ca", "admin", "mallory")?;

    let mut vm = ctx
        .vm("remote")
        .forward_api()
        .user_data(reboot_user_data(&op.api_user_data()?).as_bytes())
        .spawn()?;
    let port = vm
        .api_port()
        .ok_or_else(|| ScenarioError::Setup("no API port forwarded".into()))?;
    let first = vm.wait_for_any(&["ready", "boot-failed", "config-error"], ctx.boot_timeout)?;
    if first.name != "ready" {
        return Err(vm
            .fail(format!("expected ready, got {}", first.json()))
            .into());
    }
    let pin = operator::api_pin(&mut vm, 0)?;
    vm.progress(&format!("api-listening cert_sha256 {pin}"));
    operator::wait_healthz(&mut vm, port, &pin)?;

    // Status as admin with the announced pin: the client records it.
    let run = op.remote("admin", port, Some(&pin), &["status", "--json"])?;
    let status = json(&run);
    let ok = run.ok
        && status["node"]["boot_id"].as_str() == first.str_field("boot_id")
        && status["api"]["cert_sha256"].as_str() == Some(pin.as_str())
        && status["node"]["config_error"].is_null();
    expect(
        &mut vm,
        ok,
        "status --json as admin, pinned: this boot, this certificate",
        &run,
    )?;
    // From known_nodes now, readable output.
    let run = op.remote("admin", port, None, &["status"])?;
    let boot_id = first.str_field("boot_id").unwrap_or("?");
    let ok = run.ok && run.stdout.contains(boot_id);
    expect(&mut vm, ok, "status from the pin kept in known_nodes", &run)?;

    let run = op.remote("admin", port, None, &["logs", "--tail", "5", "kernel"])?;
    let lines = run.stdout.lines().count();
    expect(
        &mut vm,
        run.ok && (1..=5).contains(&lines),
        "logs --tail 5 kernel",
        &run,
    )?;
    let run = op.remote("admin", port, None, &["logs", "--tail", "20", "agent"])?;
    expect(
        &mut vm,
        run.ok && !run.stdout.trim().is_empty(),
        "logs --tail 20 agent",
        &run,
    )?;

    // A reader reads, and cannot reboot.
    let run = op.remote("rita", port, Some(&pin), &["status", "--json"])?;
    expect(
        &mut vm,
        run.ok && json(&run)["node"].is_object(),
        "status as reader",
        &run,
    )?;
    let run = op.remote("rita", port, Some(&pin), &["reboot"])?;
    expect(
        &mut vm,
        !run.ok && run.stderr.contains("403"),
        "reboot as reader is refused with 403",
        &run,
    )?;

    // Another CA's admin certificate is refused (handshake or 401).
    let run = op.remote("mallory", port, Some(&pin), &["reboot"])?;
    let refused = !run.ok
        && ["401", "handshake", "certificate", "alert"]
            .iter()
            .any(|w| run.stderr.to_lowercase().contains(w));
    expect(
        &mut vm,
        refused,
        "reboot with another CA's certificate is refused",
        &run,
    )?;
    // The client refuses a node that does not hold the pinned certificate.
    let wrong = "00".repeat(32);
    let run = op.remote("admin", port, Some(&wrong), &["status"])?;
    let ok = !run.ok && run.stderr.contains("not the pinned") && run.stderr.contains(&pin);
    expect(
        &mut vm,
        ok,
        "a wrong pin is refused, naming the presented certificate",
        &run,
    )?;

    // Plain HTTP is not answered as HTTP.
    match http::request(port, "GET", "/status", None, Duration::from_secs(10)) {
        Ok(r) => {
            return Err(vm
                .fail(format!(
                    "plain HTTP GET /status got an HTTP answer {}: {}",
                    r.status, r.body
                ))
                .into())
        }
        Err(e) => vm.progress(&format!("plain HTTP is not answered as HTTP: {e}")),
    }

    idle_connections_do_not_stop_healthz(&mut vm, port, &pin)?;

    // None of the refused reboots happened.
    if let Some(ev) = vm.events_seen().iter().find(|e| e.name == "shutdown") {
        let ev = ev.json();
        return Err(vm
            .fail(format!("the node shut down before the admin asked: {ev}"))
            .into());
    }
    let run = op.remote("admin", port, None, &["reboot", "--json"])?;
    let answer = json(&run);
    let ok = run.ok
        && answer["accepted"] == Value::Bool(true)
        && answer["forced"] == Value::Bool(false)
        && answer["via"].as_str().is_some_and(|v| !v.is_empty());
    expect(
        &mut vm,
        ok,
        "reboot as admin accepted through the strategy",
        &run,
    )?;
    let down = vm.wait_for_event("shutdown", Duration::from_secs(120))?;
    if down.str_field("action").is_some_and(|a| a != "reboot") {
        return Err(vm
            .fail(format!("shutdown is not a reboot: {}", down.json()))
            .into());
    }
    let since = vm.events_seen().len();
    let second = vm.wait_for_any(&["ready", "boot-failed"], ctx.boot_timeout)?;
    if second.name != "ready" || second.str_field("boot_id") == first.str_field("boot_id") {
        return Err(vm
            .fail(format!(
                "expected ready with a new boot_id, got {}",
                second.json()
            ))
            .into());
    }
    let again = operator::api_pin(&mut vm, since)?;
    if again != pin {
        return Err(vm
            .fail(format!(
                "the node's certificate changed across a reboot ({pin} -> {again}): its key is not kept on STATE"
            ))
            .into());
    }
    operator::wait_healthz(&mut vm, port, &pin)?;
    let run = op.remote("admin", port, None, &["status", "--json"])?;
    let ok = run.ok && json(&run)["node"]["boot_id"].as_str() == second.str_field("boot_id");
    expect(
        &mut vm,
        ok,
        "status after the reboot: the new boot, same pin",
        &run,
    )?;
    vm.kill();
    Ok(())
}

/// Holds [`IDLE_CONNECTIONS`] idle TCP connections to the API (opened,
/// nothing sent) and requires `/healthz` over TLS within
/// [`HEALTHZ_BUDGET`]; the connections are closed at the end either way.
fn idle_connections_do_not_stop_healthz(
    vm: &mut Vm,
    port: u16,
    pin: &str,
) -> Result<(), ScenarioError> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut idle = Vec::with_capacity(IDLE_CONNECTIONS);
    let mut refused = 0;
    for _ in 0..IDLE_CONNECTIONS {
        // QEMU accepts for the guest; a refusal is the node's cap at work
        // and still counts as load on the forwarder.
        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(s) => idle.push(s),
            Err(_) => refused += 1,
        }
    }
    vm.progress(&format!(
        "{} idle connections held ({refused} refused)",
        idle.len()
    ));
    let probe = TlsClient::pinned(pin, None)?;
    let start = Instant::now();
    let mut last = String::new();
    let mut answered = None;
    while start.elapsed() < HEALTHZ_BUDGET {
        let left = HEALTHZ_BUDGET.saturating_sub(start.elapsed());
        match probe.request(
            port,
            "GET",
            "/healthz",
            None,
            left.max(Duration::from_millis(100)),
        ) {
            Ok(r) if r.status == 200 => {
                answered = Some(start.elapsed());
                break;
            }
            Ok(r) => last = format!("{} {}", r.status, r.body.trim()),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let held = idle.len();
    drop(idle);
    match answered {
        Some(t) => {
            vm.progress(&format!(
                "/healthz answered in {:.2} s with {held} idle connections held (now closed)",
                t.as_secs_f64()
            ));
            Ok(())
        }
        None => Err(vm
            .fail(format!(
                "/healthz did not answer 200 within {} s while {held} idle connections were held: {last}",
                HEALTHZ_BUDGET.as_secs()
            ))
            .into()),
    }
}
