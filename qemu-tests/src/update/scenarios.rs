//! Bodies of the update scenarios listed in [`super::UPDATE`]. Each starts
//! a repository server over a scratch repository signed with the test key,
//! boots the 1.0.0 test image with `[update]` user-data pointing at it and
//! follows the agent's console events (update-found, install-progress,
//! installed, rebooting, trial-boot, committed, trial-failed, rolled-back,
//! update-error), checking versions and slots at each step.

use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use crate::events::Event;
use crate::operator::Operator;
use crate::scenarios::{Context, ScenarioError};
use crate::vm::{GuestFwd, Vm, VmBuilder};

use super::fixture::{self, Releases, TestRepo};
use super::fleetlock::{self, FleetLockServer};
use super::server::{Flip, RepoServer};
use super::UpdateError;

/// Where guests reach the repository server.
pub const REPO_GUEST_ADDR: &str = "10.0.2.100:80";
/// Where guests reach the FleetLock server.
pub const LOCK_GUEST_ADDR: &str = "10.0.2.101:80";
/// Poll interval the scenarios configure.
const INTERVAL: Duration = Duration::from_secs(10);
/// Events that end a happy path at once.
pub(crate) const UNHAPPY: &[&str] = &["update-error", "trial-failed", "boot-failed", "rolled-back"];
/// Longest wait for a download and install (TCG, 2 busy cores).
pub(crate) const INSTALL_TIMEOUT: Duration = Duration::from_secs(300);

/// The operator (a CA and an admin identity, made with `ballast pki`)
/// whose client certificates every update scenario's node trusts: the TCP
/// API answers `/status` only to them. One per test process.
fn operator() -> Result<&'static Operator, UpdateError> {
    static OPERATOR: OnceLock<Operator> = OnceLock::new();
    if let Some(op) = OPERATOR.get() {
        return Ok(op);
    }
    let op = Operator::new().map_err(|e| UpdateError::Operator(super::error_chain(&e)))?;
    Ok(OPERATOR.get_or_init(|| op))
}

/// User-data: the HTTPS API on all addresses trusting the operator's CA,
/// static address, `[update]` against the test repository, then `extra`
/// (more tables).
pub fn user_data(
    strategy: &str,
    health_deadline: &str,
    extra: &str,
) -> Result<String, UpdateError> {
    let api = operator()?
        .api_user_data()
        .map_err(|e| UpdateError::Operator(super::error_chain(&e)))?;
    Ok(user_data_with(&api, strategy, health_deadline, extra))
}

/// [`user_data`] with a given `[api]` section.
fn user_data_with(api: &str, strategy: &str, health_deadline: &str, extra: &str) -> String {
    format!(
        "{api}\
         [network.interfaces.eth0]\naddresses = [\"10.0.2.15/24\"]\ngateway = \"10.0.2.2\"\n\
         [update]\nrepository = \"http://{REPO_GUEST_ADDR}/\"\ninterval = \"{}s\"\n\
         strategy = \"{strategy}\"\nhealth_deadline = \"{health_deadline}\"\n{extra}",
        INTERVAL.as_secs()
    )
}

/// A started repository server over a scratch repository.
pub(crate) struct Setup {
    releases: Releases,
    repo: TestRepo,
    server: RepoServer,
}

impl Setup {
    /// Repository with `versions` added and signed once.
    pub(crate) fn new(ctx: &Context, versions: &[&str]) -> Result<Self, UpdateError> {
        let releases = Releases::beside(&ctx.image.dir)?;
        let repo = TestRepo::new(releases.key()?)?;
        for v in versions {
            repo.add(&releases.payload(v)?)?;
        }
        let seq = repo.sign()?;
        let server = RepoServer::start(repo.path())?;
        eprintln!(
            "  [{}] repository {} (sequence {seq}, releases {versions:?}) on 127.0.0.1:{}",
            ctx.arch,
            repo.path().display(),
            server.port()
        );
        Ok(Setup {
            releases,
            repo,
            server,
        })
    }

    /// Adds `version` and signs again (sequence + 1).
    fn publish(&self, version: &str) -> Result<(), UpdateError> {
        self.repo.add(&self.releases.payload(version)?)?;
        let seq = self.repo.sign()?;
        eprintln!("  published {version} (sequence {seq})");
        Ok(())
    }

    pub(crate) fn vm(&self, ctx: &Context, name: &str, user_data: &str) -> VmBuilder {
        vm_with_repo(ctx, &self.server, name, user_data)
    }
}

/// A VM with the API forwarded, `server` at [`REPO_GUEST_ADDR`] and
/// `user_data`.
pub(super) fn vm_with_repo(
    ctx: &Context,
    server: &RepoServer,
    name: &str,
    user_data: &str,
) -> VmBuilder {
    ctx.vm(name)
        .forward_api()
        .guestfwd(GuestFwd {
            guest_addr: REPO_GUEST_ADDR.into(),
            host_port: server.port(),
        })
        .user_data(user_data.as_bytes())
}

/// Waits for `want` (optionally with `version`), failing on any of `bad`.
pub(crate) fn step(
    vm: &mut Vm,
    want: &str,
    version: Option<&str>,
    bad: &[&str],
    timeout: Duration,
) -> Result<Event, UpdateError> {
    let names: Vec<&str> = std::iter::once(want)
        .chain(bad.iter().copied().filter(|b| *b != want))
        .collect();
    let ev = vm.wait_for_any(&names, timeout)?;
    if ev.name != want {
        return Err(vm
            .fail(format!(
                "waiting for {want}, got {}: {}",
                ev.name,
                ev.json()
            ))
            .into());
    }
    if let Some(v) = version {
        if ev.str_field("version") != Some(v) {
            return Err(vm
                .fail(format!("{want} for version {v} expected: {}", ev.json()))
                .into());
        }
    }
    Ok(ev)
}

/// Waits for `ready`, failing on `boot-failed`, and checks version and slot.
pub(crate) fn ready(
    vm: &mut Vm,
    ctx: &Context,
    version: &str,
    slot: &str,
) -> Result<Event, UpdateError> {
    let ev = step(vm, "ready", None, &["boot-failed"], ctx.boot_timeout)?;
    check_field(vm, &ev, "version", version)?;
    check_field(vm, &ev, "slot", slot)?;
    Ok(ev)
}

fn check_field(vm: &mut Vm, ev: &Event, key: &str, want: &str) -> Result<(), UpdateError> {
    if ev.str_field(key) == Some(want) {
        Ok(())
    } else {
        Err(vm
            .fail(format!(
                "{} event has {key} {:?}, expected {want:?}: {}",
                ev.name,
                ev.str_field(key),
                ev.json()
            ))
            .into())
    }
}

/// An event named `name` seen since index `mark`, else the next one.
pub(crate) fn seen_or_wait(
    vm: &mut Vm,
    mark: usize,
    name: &str,
    bad: &[&str],
    timeout: Duration,
) -> Result<Event, UpdateError> {
    if let Some(ev) = vm.events_seen()[mark.min(vm.events_seen().len())..]
        .iter()
        .find(|e| e.name == name)
    {
        return Ok(ev.clone());
    }
    step(vm, name, None, bad, timeout)
}

/// The whole cycle from a running `from` to a committed `to`.
pub(super) fn update_cycle(
    vm: &mut Vm,
    ctx: &Context,
    to: &str,
    to_slot: &str,
    bad_before_found: &[&str],
) -> Result<(), UpdateError> {
    let t = Instant::now();
    step(
        vm,
        "update-found",
        Some(to),
        bad_before_found,
        INSTALL_TIMEOUT,
    )?;
    let found = t.elapsed();
    let installed = step(vm, "installed", Some(to), UNHAPPY, INSTALL_TIMEOUT)?;
    check_field(vm, &installed, "slot", to_slot)?;
    let install = t.elapsed() - found;
    step(vm, "rebooting", Some(to), UNHAPPY, Duration::from_secs(60))?;
    let mark = vm.events_seen().len();
    ready(vm, ctx, to, to_slot)?;
    seen_or_wait(vm, mark, "trial-boot", UNHAPPY, Duration::from_secs(60))?;
    let committed = seen_or_wait(vm, mark, "committed", UNHAPPY, Duration::from_secs(120))?;
    check_field(vm, &committed, "version", to)?;
    check_field(vm, &committed, "slot", to_slot)?;
    vm.progress(&format!(
        "{to} committed on slot {to_slot}: found after {:.1} s, install {:.1} s, reboot+trial {:.1} s",
        found.as_secs_f64(),
        install.as_secs_f64(),
        (t.elapsed() - found - install).as_secs_f64()
    ));
    Ok(())
}

/// From a running 1.0.0: `update-found`, `installed` on `slot` and
/// `rebooting`, all for `version`.
fn install_until_reboot(vm: &mut Vm, version: &str, slot: &str) -> Result<(), UpdateError> {
    step(vm, "update-found", Some(version), UNHAPPY, INSTALL_TIMEOUT)?;
    let inst = step(vm, "installed", Some(version), UNHAPPY, INSTALL_TIMEOUT)?;
    check_field(vm, &inst, "slot", slot)?;
    step(
        vm,
        "rebooting",
        Some(version),
        UNHAPPY,
        Duration::from_secs(60),
    )?;
    Ok(())
}

/// `GET /status` as JSON, retried while the API comes up.
fn status(vm: &mut Vm) -> Result<serde_json::Value, UpdateError> {
    let port = vm
        .api_port()
        .ok_or_else(|| vm.fail("no API port forwarded"))?;
    // The node's key is kept on STATE, so the pin holds across reboots.
    let pin = crate::operator::api_pin(vm, 0)
        .map_err(|e| UpdateError::Operator(super::error_chain(&e)))?;
    let admin = operator()?
        .admin_tls(&pin)
        .map_err(|e| UpdateError::Operator(super::error_chain(&e)))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = admin.request(port, "GET", "/status", None, Duration::from_secs(10));
        match r {
            Ok(r) if r.status == 200 => {
                if let Ok(v) = serde_json::from_str(&r.body) {
                    return Ok(v);
                }
            }
            Err(e) if Instant::now() >= deadline => return Err(e.into()),
            _ => {}
        }
        if Instant::now() >= deadline {
            return Err(vm.fail("GET /status never answered 200 with JSON").into());
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn run(f: impl FnOnce() -> Result<(), UpdateError>) -> Result<(), ScenarioError> {
    f().map_err(ScenarioError::from)
}

/// Scenario 1, `update`: 1.0.0 → 1.1.0 on slot b → 1.2.0 on slot a.
pub fn update(ctx: &Context) -> Result<(), ScenarioError> {
    run(|| {
        let setup = Setup::new(ctx, &["1.1.0"])?;
        let ud = user_data("immediate", "60s", "")?;
        let mut vm = setup.vm(ctx, "update", &ud).spawn()?;
        ready(&mut vm, ctx, "1.0.0", "a")?;
        update_cycle(&mut vm, ctx, "1.1.0", "b", UNHAPPY)?;
        setup.publish("1.2.0")?;
        // A poll may catch the repository between manifest and signature
        // being rewritten: an update-error then is the test's doing.
        update_cycle(
            &mut vm,
            ctx,
            "1.2.0",
            "a",
            &["trial-failed", "boot-failed", "rolled-back"],
        )?;
        let st = status(&mut vm)?;
        vm.progress(&format!("status update: {}", st["update"]));
        Ok(())
    })
}

/// `[[health.checks]]` against the repository server's `/health`.
const HEALTH_CHECK: &str = "[[health.checks]]\nname = \"app\"\n\
    http = \"http://10.0.2.100/health\"\ntimeout = \"2s\"\n";

/// Scenario 2, `update-unhealthy`: 1.1.0 fails its health gate and is rolled back.
pub fn unhealthy(ctx: &Context) -> Result<(), ScenarioError> {
    run(|| {
        let setup = Setup::new(ctx, &["1.1.0"])?;
        setup.server.set_health(503);
        let ud = user_data("immediate", "20s", HEALTH_CHECK)?;
        let mut vm = setup.vm(ctx, "update-unhealthy", &ud).spawn()?;
        ready(&mut vm, ctx, "1.0.0", "a")?;
        install_until_reboot(&mut vm, "1.1.0", "b")?;
        let mark = vm.events_seen().len();
        ready(&mut vm, ctx, "1.1.0", "b")?;
        seen_or_wait(
            &mut vm,
            mark,
            "trial-boot",
            &["committed"],
            Duration::from_secs(60),
        )?;
        let failed = seen_or_wait(
            &mut vm,
            mark,
            "trial-failed",
            &["committed"],
            Duration::from_secs(120),
        )?;
        check_field(&mut vm, &failed, "version", "1.1.0")?;
        step(
            &mut vm,
            "rebooting",
            None,
            &["committed"],
            Duration::from_secs(60),
        )?;
        let mark = vm.events_seen().len();
        ready(&mut vm, ctx, "1.0.0", "a")?;
        let rb = seen_or_wait(&mut vm, mark, "rolled-back", &[], Duration::from_secs(60))?;
        check_field(&mut vm, &rb, "from", "1.1.0")?;
        check_field(&mut vm, &rb, "to", "1.0.0")?;
        let st = status(&mut vm)?;
        let rollbacks = st["update"]["rollbacks"].as_u64().unwrap_or(0);
        vm.progress(&format!("status update: {}", st["update"]));
        if rollbacks < 1 {
            return Err(vm
                .fail(format!(
                    "/status update.rollbacks is {rollbacks}, expected >= 1: {st}"
                ))
                .into());
        }
        // Two intervals and some: the bad release must not come back.
        let quiet = INTERVAL * 2 + Duration::from_secs(5);
        let again = vm.try_wait_for_any(&["update-found", "installed", "rebooting"], quiet)?;
        if let Some(ev) = again {
            return Err(vm
                .fail(format!(
                    "the rolled-back release is tried again: {}",
                    ev.json()
                ))
                .into());
        }
        // ... because it was skipped, not because nobody looked.
        let st = status(&mut vm)?;
        let checked = st["update"]["last_check"].is_string();
        let error = &st["update"]["last_error"];
        if !checked || !error.is_null() {
            return Err(vm
                .fail(format!(
                    "no repository check succeeded after the rollback: {}",
                    st["update"]
                ))
                .into());
        }
        vm.progress(&format!(
            "no new install within {} s after the rollback; status update: {}",
            quiet.as_secs(),
            st["update"]
        ));
        Ok(())
    })
}

/// systemd-boot tries a new entry this many times (`+3`).
const BOOT_TRIES: usize = 3;

/// Scenario 3, `update-never-boots`: a release whose verity root hash is wrong.
pub fn never_boots(ctx: &Context) -> Result<(), ScenarioError> {
    run(|| {
        let scratch = tempfile::Builder::new()
            .prefix("ballast-never-boots-")
            .tempdir()
            .map_err(UpdateError::Scratch)?;
        let releases = Releases::beside(&ctx.image.dir)?;
        let bad_payload = scratch.path().join("payload");
        let root = fixture::wrong_verity_payload(&releases.payload("1.1.0")?, &bad_payload)?;
        eprintln!(
            "  [{}] 1.1.0 published with verity root hash {root}",
            ctx.arch
        );
        let repo = TestRepo::new(releases.key()?)?;
        repo.add(&bad_payload)?;
        repo.sign()?;
        let server = RepoServer::start(repo.path())?;
        let ud = user_data("immediate", "60s", "")?;
        let mut vm = ctx
            .vm("update-never-boots")
            .forward_api()
            .guestfwd(GuestFwd {
                guest_addr: REPO_GUEST_ADDR.into(),
                host_port: server.port(),
            })
            .user_data(ud.as_bytes())
            .spawn()?;
        ready(&mut vm, ctx, "1.0.0", "a")?;
        install_until_reboot(&mut vm, "1.1.0", "b")?;
        let mut failures = 0;
        let back = loop {
            // Each failed try waits 10 s before rebooting.
            let ev = vm.wait_for_any(&["boot-failed", "ready"], ctx.boot_timeout)?;
            if ev.name == "ready" {
                break ev;
            }
            failures += 1;
            let reason = ev.str_field("reason").unwrap_or("").to_lowercase();
            if !reason.contains("verity") {
                return Err(vm
                    .fail(format!(
                        "boot-failed does not name dm-verity: {}",
                        ev.json()
                    ))
                    .into());
            }
            if failures > BOOT_TRIES {
                return Err(vm
                    .fail(format!(
                        "more than {BOOT_TRIES} failed boots: the boot counter does not run out"
                    ))
                    .into());
            }
        };
        let mark = vm.events_seen().len();
        check_field(&mut vm, &back, "version", "1.0.0")?;
        check_field(&mut vm, &back, "slot", "a")?;
        if failures != BOOT_TRIES {
            return Err(vm
                .fail(format!(
                    "{failures} failed boot(s) of 1.1.0 before falling back, expected {BOOT_TRIES} (entry +{BOOT_TRIES})"
                ))
                .into());
        }
        let rb = seen_or_wait(&mut vm, mark, "rolled-back", &[], Duration::from_secs(60))?;
        check_field(&mut vm, &rb, "from", "1.1.0")?;
        let st = status(&mut vm)?;
        vm.progress(&format!("status update: {}", st["update"]));
        Ok(())
    })
}

/// A small deterministic generator (splitmix64) for replayable choices.
fn splitmix(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The seed: `BALLAST_TEST_SEED`, else the clock.
fn seed() -> u64 {
    std::env::var("BALLAST_TEST_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
                .unwrap_or(1)
        })
}

/// Latest cut after `update-found`, in ms: a little under the shortest
/// found-to-installed time measured under TCG (`BALLAST_POWER_CUT_MAX_MS`
/// overrides).
fn cut_window_ms(arch: ballast_updater::payload::Arch) -> u64 {
    std::env::var("BALLAST_POWER_CUT_MAX_MS")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(match arch {
            // found -> installed took 7-10 s on x86_64, 13 s on aarch64.
            ballast_updater::payload::Arch::X86_64 => 6000,
            ballast_updater::payload::Arch::Aarch64 => 10000,
        })
}

/// Scenario 4, `update-power-cut`: QEMU killed during the install, restarted
/// on the same disk and firmware variables.
pub fn power_cut(ctx: &Context) -> Result<(), ScenarioError> {
    run(|| {
        let setup = Setup::new(ctx, &["1.1.0"])?;
        let work = tempfile::Builder::new()
            .prefix("ballast-power-cut-")
            .tempdir()
            .map_err(UpdateError::Scratch)?;
        let seed = seed();
        let window = cut_window_ms(ctx.arch);
        let delay = Duration::from_millis(splitmix(seed) % window.max(1));
        eprintln!(
            "  [{}] power cut {} ms after update-found (of 0..{window} ms); replay with BALLAST_TEST_SEED={seed}",
            ctx.arch,
            delay.as_millis()
        );
        let ud = user_data("immediate", "60s", "")?;
        // writeback: guest flushes reach the overlay file, as they would a disk.
        let builder = setup
            .vm(ctx, "update-power-cut", &ud)
            .work_dir(work.path())
            .cache("writeback");
        let mut vm = builder.clone().spawn()?;
        ready(&mut vm, ctx, "1.0.0", "a")?;
        step(
            &mut vm,
            "update-found",
            Some("1.1.0"),
            UNHAPPY,
            INSTALL_TIMEOUT,
        )?;
        let done = vm.try_wait_for_any(&["installed"], delay)?;
        let last = vm
            .events_seen()
            .last()
            .map(|e| e.json())
            .unwrap_or_default();
        vm.progress(&format!(
            "SIGKILL to QEMU pid {} (last event {last})",
            vm.pid()
        ));
        vm.kill();
        drop(vm);
        let cut_after_install = done.is_some();
        if cut_after_install {
            eprintln!(
                "  [{}] note: the install finished before the cut (delay {} ms): the restart boots 1.1.0's trial",
                ctx.arch,
                delay.as_millis()
            );
        }

        let mut vm = builder.resume(true).spawn()?;
        let mark = vm.events_seen().len();
        let first = step(&mut vm, "ready", None, &["boot-failed"], ctx.boot_timeout)?;
        if first.str_field("version") == Some("1.1.0") {
            // The cut came after the commit point (the entry rename), even
            // if `installed` had not been printed yet: 1.1.0's trial boot.
            check_field(&mut vm, &first, "slot", "b")?;
            let c = seen_or_wait(
                &mut vm,
                mark,
                "committed",
                UNHAPPY,
                Duration::from_secs(120),
            )?;
            check_field(&mut vm, &c, "version", "1.1.0")?;
            vm.progress("restarted into 1.1.0's trial (cut after the commit point): committed");
            return Ok(());
        }
        check_field(&mut vm, &first, "version", "1.0.0")?;
        check_field(&mut vm, &first, "slot", "a")?;
        if cut_after_install {
            return Err(vm
                .fail("installed was reported before the cut, but the node came back on 1.0.0")
                .into());
        }
        update_cycle(&mut vm, ctx, "1.1.0", "b", UNHAPPY)?;
        Ok(())
    })
}

/// Words the refusal of a tampered object is expected to use (lowercase).
const HASH_WORDS: &[&str] = &["sha256", "sha-256", "hash", "mismatch", "does not match"];

/// Scenario 5, `update-tampered`: one byte of usr.img flipped in transit.
pub fn tampered(ctx: &Context) -> Result<(), ScenarioError> {
    run(|| {
        let setup = Setup::new(ctx, &["1.1.0"])?;
        let payload = setup.releases.payload("1.1.0")?;
        let object = TestRepo::object_path(&payload, "usr.img")?;
        let size = crate::disk::file_size(&payload.join("usr.img"))?;
        let offset = size / 2 + 17;
        setup.server.set_flip(Some(Flip {
            path: object.clone(),
            offset,
        }));
        eprintln!(
            "  [{}] serving {object} with byte {offset} flipped",
            ctx.arch
        );
        let work = tempfile::Builder::new()
            .prefix("ballast-tampered-")
            .tempdir()
            .map_err(UpdateError::Scratch)?;
        let ud = user_data("immediate", "60s", "")?;
        let mut vm = setup
            .vm(ctx, "update-tampered", &ud)
            .work_dir(work.path())
            .spawn()?;
        ready(&mut vm, ctx, "1.0.0", "a")?;
        step(
            &mut vm,
            "update-found",
            Some("1.1.0"),
            UNHAPPY,
            INSTALL_TIMEOUT,
        )?;
        let err = step(
            &mut vm,
            "update-error",
            None,
            &["installed", "rebooting", "boot-failed"],
            INSTALL_TIMEOUT,
        )?;
        let reason = err.str_field("reason").unwrap_or("").to_lowercase();
        if !HASH_WORDS.iter().any(|w| reason.contains(w)) {
            return Err(vm
                .fail(format!(
                    "update-error does not name the hash mismatch: {}",
                    err.json()
                ))
                .into());
        }
        let tampered = setup.server.log().iter().filter(|s| s.tampered).count();
        if tampered == 0 {
            return Err(vm
                .fail("the node refused, but no tampered byte was ever served")
                .into());
        }
        // Still up and serving, on 1.0.0.
        let st = status(&mut vm)?;
        vm.progress(&format!(
            "status update: {} ({tampered} tampered response(s) served)",
            st["update"]
        ));
        // The next poll must refuse again, not install.
        let next = vm.try_wait_for_any(
            &["installed", "rebooting"],
            INTERVAL + Duration::from_secs(10),
        )?;
        if let Some(ev) = next {
            return Err(vm
                .fail(format!("a tampered release was installed: {}", ev.json()))
                .into());
        }
        vm.kill();
        let before = fixture::esp_entries(&ctx.image.disk)?;
        let raw = work.path().join("after.raw");
        fixture::overlay_to_raw(&work.path().join("overlay.qcow2"), &raw)?;
        let after = fixture::esp_entries(&raw)?;
        if before != after {
            return Err(vm
                .fail(format!(
                    "ESP boot entries changed: {before:?} before, {after:?} after"
                ))
                .into());
        }
        vm.progress(&format!("ESP boot entries unchanged: {after:?}"));
        Ok(())
    })
}

/// What one FleetLock node went through, in host time.
#[derive(Debug)]
struct Timeline {
    name: String,
    rebooting: Instant,
    committed: Instant,
}

fn host_time(vm: &Vm, ev: &Event) -> Instant {
    let start = Instant::now() - vm.elapsed();
    start + ev.host_elapsed.unwrap_or_default()
}

fn fleetlock_node(mut vm: Vm, ctx: &Context) -> Result<Timeline, UpdateError> {
    ready(&mut vm, ctx, "1.0.0", "a")?;
    step(
        &mut vm,
        "update-found",
        Some("1.1.0"),
        UNHAPPY,
        INSTALL_TIMEOUT,
    )?;
    step(
        &mut vm,
        "installed",
        Some("1.1.0"),
        UNHAPPY,
        INSTALL_TIMEOUT,
    )?;
    // The other node may hold the lock through its reboot and trial.
    let rb = step(
        &mut vm,
        "rebooting",
        Some("1.1.0"),
        UNHAPPY,
        ctx.boot_timeout * 2 + INSTALL_TIMEOUT,
    )?;
    let rebooting = host_time(&vm, &rb);
    let mark = vm.events_seen().len();
    ready(&mut vm, ctx, "1.1.0", "b")?;
    let c = seen_or_wait(
        &mut vm,
        mark,
        "committed",
        UNHAPPY,
        Duration::from_secs(120),
    )?;
    let committed = host_time(&vm, &c);
    // Give the steady-state call a moment to reach the server.
    std::thread::sleep(Duration::from_secs(5));
    Ok(Timeline {
        name: vm.name().to_owned(),
        rebooting,
        committed,
    })
}

/// Scenario 6, `update-fleetlock`: two nodes, one lock slot.
pub fn fleetlock(ctx: &Context) -> Result<(), ScenarioError> {
    run(|| {
        let setup = Setup::new(ctx, &["1.1.0"])?;
        let lock = FleetLockServer::start()?;
        eprintln!(
            "  [{}] FleetLock server on 127.0.0.1:{}",
            ctx.arch,
            lock.port()
        );
        let extra = format!(
            "[update.fleetlock]\nurl = \"http://{LOCK_GUEST_ADDR}/\"\ngroup = \"default\"\n"
        );
        let ud = user_data("fleetlock", "60s", &extra)?;
        let mut vms = Vec::new();
        for name in ["update-fleetlock-1", "update-fleetlock-2"] {
            let vm = setup
                .vm(ctx, name, &ud)
                .cpus(1)
                .guestfwd(GuestFwd {
                    guest_addr: LOCK_GUEST_ADDR.into(),
                    host_port: lock.port(),
                })
                .spawn()?;
            vms.push(vm);
        }
        let results: Vec<Result<Timeline, UpdateError>> = std::thread::scope(|s| {
            let handles: Vec<_> = vms
                .into_iter()
                .map(|vm| s.spawn(move || fleetlock_node(vm, ctx)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or(Err(UpdateError::Thread)))
                .collect()
        });
        let mut lines = Vec::new();
        for r in results {
            lines.push(r?);
        }
        let log = lock.log();
        let holds = fleetlock::holds(&log, "default")?;
        let denied = log
            .iter()
            .filter(|e| e.op == fleetlock::LockOp::Deny)
            .count();
        let t0 = log.first().map(|e| e.at).unwrap_or_else(Instant::now);
        let secs = |t: Instant| t.saturating_duration_since(t0).as_secs_f64();
        for (id, granted, released) in &holds {
            eprintln!(
                "  [fleetlock] node {id}: held {:.1} s .. {}",
                secs(*granted),
                released.map_or("still held".into(), |r| format!("{:.1} s", secs(r)))
            );
        }
        for l in &lines {
            eprintln!(
                "  [{}] rebooting at {:.1} s, committed at {:.1} s",
                l.name,
                secs(l.rebooting),
                secs(l.committed)
            );
        }
        eprintln!("  [fleetlock] {denied} pre-reboot request(s) refused while the slot was held");
        let fail = |m: String| UpdateError::FleetLock(fleetlock::FleetLockError::Log(m));
        if holds.len() != 2 || holds[0].0 == holds[1].0 {
            return Err(fail(format!(
                "expected two grants to two nodes, log has {holds:?}"
            )));
        }
        // Each node's reboot window (rebooting .. committed) lies inside
        // one hold, the two in different holds: so they never overlap.
        let slack = Duration::from_secs(2);
        let mut owner = Vec::new();
        for l in &lines {
            let i = holds.iter().position(|(_, g, r)| {
                *g <= l.rebooting && r.is_some_and(|r| l.committed <= r + slack)
            });
            let Some(i) = i else {
                return Err(fail(format!(
                    "{}'s reboot ({:.1} s .. {:.1} s) is not inside a lock hold",
                    l.name,
                    secs(l.rebooting),
                    secs(l.committed)
                )));
            };
            owner.push(i);
        }
        if owner[0] == owner[1] {
            return Err(fail("both nodes rebooted under the same hold".into()));
        }
        let (a, b) = if lines[0].rebooting < lines[1].rebooting {
            (&lines[0], &lines[1])
        } else {
            (&lines[1], &lines[0])
        };
        if b.rebooting < a.committed {
            return Err(fail(format!(
                "{} rebooted at {:.1} s before {} committed at {:.1} s",
                b.name,
                secs(b.rebooting),
                a.name,
                secs(a.committed)
            )));
        }
        Ok(())
    })
}

/// The release of the watchdog scenario, beside the test image: 1.1.0 of
/// the metal flavour (generic kernel; its i6300esb driver is loaded by
/// modalias, as a server's iTCO_wdt or sbsa_gwdt would be) with the
/// agent's `trial-gate=pause` fail point, so its trial hangs.
pub const HUNG_RELEASE: &str = "watchdog-metal/1.1.0";

/// Scenario 7, `update-watchdog`: 1.1.0 hangs in its trial boot. The
/// agent armed the i6300esb watchdog before the gate, so the machine
/// resets on each try (no `rebooting` from the agent in between) until
/// systemd-boot's counter runs out, and 1.0.0 reports the rollback.
pub fn hung_trial(ctx: &Context) -> Result<(), ScenarioError> {
    run(|| {
        let setup = Setup::new(ctx, &[HUNG_RELEASE])?;
        // A gate deadline far beyond the watchdog's: only a reset ends a try.
        let ud = user_data("immediate", "30m", "")?;
        let mut vm = setup.vm(ctx, "update-watchdog", &ud).watchdog().spawn()?;
        ready(&mut vm, ctx, "1.0.0", "a")?;
        install_until_reboot(&mut vm, "1.1.0", "b")?;
        let mut hung = 0;
        let mut mark = vm.events_seen().len();
        let mut ev = step(
            &mut vm,
            "ready",
            None,
            &["boot-failed", "panic"],
            ctx.boot_timeout,
        )?;
        let back = loop {
            if ev.str_field("version") != Some("1.1.0") {
                break ev;
            }
            hung += 1;
            if hung > BOOT_TRIES {
                return Err(vm
                    .fail(format!(
                        "1.1.0 booted {hung} times: the boot counter does not run out"
                    ))
                    .into());
            }
            let trial_over = ["committed", "trial-failed"];
            seen_or_wait(
                &mut vm,
                mark,
                "failpoint-armed",
                &[],
                Duration::from_secs(5),
            )?;
            seen_or_wait(
                &mut vm,
                mark,
                "watchdog-armed",
                &trial_over,
                Duration::from_secs(60),
            )?;
            seen_or_wait(
                &mut vm,
                mark,
                "trial-boot",
                &trial_over,
                Duration::from_secs(30),
            )?;
            // The hang: nothing from the agent until the firmware starts
            // over. `rebooting`, `committed` or `trial-failed` here would
            // mean the agent, not the watchdog, ended the try.
            let t = Instant::now();
            mark = vm.events_seen().len();
            let next = vm.wait_for_any(
                &["ready", "rebooting", "committed", "trial-failed", "panic"],
                Duration::from_secs(300),
            )?;
            if next.name != "ready" {
                return Err(vm
                    .fail(format!(
                        "{} during the hung trial: {}",
                        next.name,
                        next.json()
                    ))
                    .into());
            }
            vm.progress(&format!(
                "try {hung}: 1.1.0 hung in its trial; the watchdog reset the machine, ready again after {:.0} s",
                t.elapsed().as_secs_f64()
            ));
            ev = next;
        };
        let mark = vm.events_seen().len();
        check_field(&mut vm, &back, "version", "1.0.0")?;
        check_field(&mut vm, &back, "slot", "a")?;
        if hung != BOOT_TRIES {
            return Err(vm
                .fail(format!(
                    "{hung} hung boot(s) of 1.1.0 before falling back, expected {BOOT_TRIES}"
                ))
                .into());
        }
        let rb = seen_or_wait(&mut vm, mark, "rolled-back", &[], Duration::from_secs(60))?;
        check_field(&mut vm, &rb, "from", "1.1.0")?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_is_the_documented_toml() {
        let ud = user_data_with("[api]\n", "fleetlock", "20s", HEALTH_CHECK);
        let v: toml_like::Doc = toml_like::parse(&ud);
        assert_eq!(
            v.get("update.repository"),
            Some("\"http://10.0.2.100:80/\"")
        );
        assert_eq!(v.get("update.strategy"), Some("\"fleetlock\""));
        assert_eq!(v.get("update.health_deadline"), Some("\"20s\""));
        assert!(ud.contains("[[health.checks]]\nname = \"app\"\n"));
    }

    #[test]
    fn seeds_replay() {
        assert_eq!(splitmix(42), splitmix(42));
        assert_ne!(splitmix(42), splitmix(43));
    }

    /// Just enough TOML reading for the test above: `table.key` → raw value.
    mod toml_like {
        pub struct Doc(Vec<(String, String)>);
        impl Doc {
            pub fn get(&self, k: &str) -> Option<&str> {
                self.0.iter().find(|(a, _)| a == k).map(|(_, v)| v.as_str())
            }
        }
        pub fn parse(text: &str) -> Doc {
            let mut table = String::new();
            let mut out = Vec::new();
            for l in text.lines() {
                if let Some(t) = l.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
                    table = t.trim_matches(['[', ']']).to_owned();
                } else if let Some((k, v)) = l.split_once(" = ") {
                    out.push((format!("{table}.{k}"), v.to_owned()));
                }
            }
            Doc(out)
        }
    }
}
