//! The automatic update lifecycle of PID 1, as an explicit state machine:
//!
//! ```text
//!            boot on trial entry                      boot on blessed entry
//!                   │                                          │
//!                   ▼                                          ▼
//!   ┌──────────── Trial ──gate passed──▶ Committed ──▶ Idle ◀──┘ (reports
//!   │ gate failed /                                     │  ▲     fall-backs)
//!   │ deadline passed                           interval│  │ nothing / error
//!   ▼                                                   ▼  │
//! RollingBack ──reboot──▶ (previous version)         Checking
//!                                                       │ release applies
//!                                                       ▼
//!                                                  Installing ──error──▶ Idle
//!                                                       │ installed (entry renamed = commit)
//!                                                       ▼
//!                                             RebootPending ──strategy allows──▶ Rebooting
//! ```
//!
//! The install itself is `ballast_updater::install` (blocking I/O, run on a
//! blocking thread); blessing and rollback are `ballast_updater::control`.
//! Every transition prints a console event and updates `/status`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use ballast_updater::control;
use ballast_updater::esp::{list_entries, running_entry, NodeLayout};
use ballast_updater::install::{self, ApplyOptions, Node, Source};
use ballast_updater::keys::TrustedKeys;
use ballast_updater::payload::{Arch, Version};
use ballast_updater::storage::RealStorage;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::console;
use crate::node::health::HealthMonitor;
use crate::node::power::Action;

/// The `[update]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateConfig {
    /// Repository URL; automatic updates are off without one.
    pub repository: Option<String>,
    /// Time between checks, like `"30s"` or `"1h"`; up to a tenth more is
    /// added at random so a fleet does not poll in step.
    #[serde(default = "default_interval", with = "crate::config::duration")]
    pub interval: Duration,
    #[serde(default)]
    pub strategy: Strategy,
    /// How long a new version has to pass its health checks.
    #[serde(default = "default_deadline", with = "crate::config::duration")]
    pub health_deadline: Duration,
    /// Trusted keys (files or directories of `*.pub`); default: the keys
    /// built into the image.
    #[serde(default)]
    pub trust: Vec<PathBuf>,
    /// Release channel to follow (`stable`, `beta`, ...): the node
    /// installs only releases the manifest lists in it.
    #[serde(default = "default_channel", deserialize_with = "channel_name")]
    pub channel: String,
    /// Install exactly this version and nothing newer.
    pub version_lock: Option<Version>,
    /// FleetLock server for `strategy = "fleetlock"`.
    pub fleetlock: Option<FleetLockConfig>,
    /// Maintenance window for `strategy = "window"`.
    pub window: Option<WindowConfig>,
}

impl Default for UpdateConfig {
    fn default() -> Self {
        UpdateConfig {
            repository: None,
            interval: default_interval(),
            strategy: Strategy::default(),
            health_deadline: default_deadline(),
            trust: Vec::new(),
            channel: default_channel(),
            version_lock: None,
            fleetlock: None,
            window: None,
        }
    }
}

fn default_channel() -> String {
    ballast_updater::manifest::DEFAULT_CHANNEL.to_owned()
}

fn channel_name<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let name = String::deserialize(d)?;
    if ballast_updater::manifest::valid_channel(&name) {
        Ok(name)
    } else {
        Err(serde::de::Error::custom(format!(
            "channel {name:?}: names are 1-32 of a-z, 0-9 and '-', not starting with '-'"
        )))
    }
}

fn default_interval() -> Duration {
    Duration::from_secs(3600)
}

fn default_deadline() -> Duration {
    Duration::from_secs(300)
}

/// When a node that installed an update may reboot into it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    #[default]
    Immediate,
    Window,
    Fleetlock,
    /// A Lease semaphore in the cluster, with cordon and drain
    /// (`[kubernetes.reboot]`).
    Kubernetes,
    Off,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetLockConfig {
    /// Base URL of the lock server, e.g. `http://10.0.2.100:8080/`.
    pub url: String,
    #[serde(default = "default_group")]
    pub group: String,
}

fn default_group() -> String {
    "default".into()
}

/// Days and a daily start time in UTC, with a length.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowConfig {
    /// `mon`..`sun`; every day when empty.
    #[serde(default)]
    pub days: Vec<String>,
    /// `HH:MM`, UTC.
    pub start: String,
    #[serde(with = "crate::config::duration")]
    pub length: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum UpdateLoopError {
    #[error("loading the trusted keys")]
    Trust(#[source] ballast_updater::keys::KeyError),
    #[error("repository {url}")]
    Repository {
        url: String,
        #[source]
        source: ballast_updater::fetch::FetchError,
    },
    #[error("checking for updates")]
    Install(#[from] ballast_updater::install::InstallError),
    #[error("boot control")]
    Control(#[from] ballast_updater::control::ControlError),
    #[error("fleetlock {url}")]
    FleetLock { url: String, reason: String },
    #[error("the update worker stopped")]
    Worker(#[from] tokio::task::JoinError),
}

/// Where the lifecycle is, for `/status` and metrics.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum UpdateState {
    Disabled,
    Trial { version: Version },
    Idle,
    Checking,
    Installing { version: Version },
    RebootPending { version: Version },
    Rebooting { version: Version },
    RollingBack { version: Version, reason: String },
}

impl UpdateState {
    /// Short name for metrics labels.
    pub fn name(&self) -> &'static str {
        match self {
            UpdateState::Disabled => "disabled",
            UpdateState::Trial { .. } => "trial",
            UpdateState::Idle => "idle",
            UpdateState::Checking => "checking",
            UpdateState::Installing { .. } => "installing",
            UpdateState::RebootPending { .. } => "reboot-pending",
            UpdateState::Rebooting { .. } => "rebooting",
            UpdateState::RollingBack { .. } => "rolling-back",
        }
    }
}

/// Shared view of the loop.
#[derive(Debug, Clone, Serialize)]
pub struct UpdateStatus {
    pub state: UpdateState,
    pub last_check: Option<String>,
    pub last_error: Option<String>,
    pub rollbacks: u64,
}

pub type SharedUpdateStatus = Arc<Mutex<UpdateStatus>>;

pub fn new_status() -> SharedUpdateStatus {
    Arc::new(Mutex::new(UpdateStatus {
        state: UpdateState::Disabled,
        last_check: None,
        last_error: None,
        rollbacks: 0,
    }))
}

/// Everything the loop needs from PID 1.
#[derive(Debug)]
pub struct UpdateContext {
    pub config: UpdateConfig,
    pub health: HealthMonitor,
    /// The cluster, when `[kubernetes]` gives the agent a credential.
    pub cluster: Option<Arc<crate::kubernetes::coordinator::Cluster>>,
    pub status: SharedUpdateStatus,
    pub power: mpsc::Sender<Action>,
    /// Stable id of this node for FleetLock.
    pub node_id: String,
}

const DEFAULT_TRUST: &str = "/usr/lib/ballast/trust";
const OS_RELEASE: &str = "/usr/lib/os-release";

fn set_state(status: &SharedUpdateStatus, state: UpdateState) {
    if let Ok(mut s) = status.lock() {
        s.state = state;
    }
}

fn set_error(status: &SharedUpdateStatus, error: Option<String>) {
    if let Ok(mut s) = status.lock() {
        s.last_error = error;
    }
}

fn v(version: Version) -> Value {
    Value::from(version.to_string())
}

/// Runs the lifecycle until the node reboots. Errors are reported and
/// retried on the next interval; only a missing layout ends the loop.
pub async fn run(ctx: UpdateContext) {
    let layout = match crate::cli::update::node_layout() {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "updates disabled: node layout unknown");
            set_error(&ctx.status, Some(format!("{e:#}")));
            return;
        }
    };
    let layout = Arc::new(layout);

    // 1. Settle the running version: pass or fail its trial, or notice
    //    that we are a fall-back from a version that never came up.
    if let Err(e) = settle_running_version(&ctx, &layout).await {
        let reason = crate::error_chain(&e);
        tracing::error!(error = %reason, "settling the running version failed");
        set_error(&ctx.status, Some(reason));
    }
    let Some(repository) = ctx.config.repository.clone() else {
        set_state(&ctx.status, UpdateState::Disabled);
        return;
    };

    // 2. Poll.
    loop {
        set_state(&ctx.status, UpdateState::Checking);
        match check_and_install(&ctx, &layout, &repository).await {
            Ok(Some(version)) => {
                set_error(&ctx.status, None);
                set_state(&ctx.status, UpdateState::RebootPending { version });
                wait_for_reboot_permission(&ctx, version).await;
                set_state(&ctx.status, UpdateState::Rebooting { version });
                console::emit_raw("rebooting", &[("version", v(version))]);
                let _ = ctx.power.send(Action::Reboot).await;
                return;
            }
            Ok(None) => set_error(&ctx.status, None),
            Err(e) => {
                let reason = crate::error_chain(&e);
                tracing::warn!(error = %reason, "update check failed");
                console::emit_raw("update-error", &[("reason", Value::from(reason.clone()))]);
                set_error(&ctx.status, Some(reason));
            }
        }
        set_state(&ctx.status, UpdateState::Idle);
        tokio::time::sleep(with_jitter(ctx.config.interval)).await;
    }
}

/// Interval plus up to a tenth at random.
fn with_jitter(interval: Duration) -> Duration {
    let mut seed = [0u8; 8];
    let _ = getrandom::getrandom(&mut seed);
    let tenth = u64::try_from(interval.as_millis() / 10).unwrap_or(u64::MAX);
    let extra = if tenth == 0 {
        0
    } else {
        u64::from_le_bytes(seed) % tenth
    };
    interval + Duration::from_millis(extra)
}

async fn settle_running_version(
    ctx: &UpdateContext,
    layout: &Arc<NodeLayout>,
) -> Result<(), UpdateLoopError> {
    let running = layout.running.version;
    let entries =
        list_entries(&RealStorage, &layout.esp).map_err(|e| UpdateLoopError::Control(e.into()))?;
    let on_trial =
        running_entry(&entries, &layout.running).is_some_and(|e| e.name.counter.is_some());
    if !on_trial {
        // Blessed: report newer versions that used up their tries.
        let l = layout.clone();
        let report = tokio::task::spawn_blocking(move || {
            control::mark_good(&RealStorage, &l, SystemTime::now())
        })
        .await??;
        for failed in report.rolled_back_from {
            if first_report_of_rollback(layout, failed) {
                if let Ok(mut s) = ctx.status.lock() {
                    s.rollbacks += 1;
                }
                console::emit_raw(
                    "rolled-back",
                    &[
                        ("from", v(failed)),
                        ("to", v(running)),
                        (
                            "reason",
                            Value::from("the new version did not pass its trial boot"),
                        ),
                    ],
                );
            }
        }
        // Back from a reboot we drained for (or from a rollback): put the
        // node back in service once its checks pass, however long that
        // takes, and never before.
        if let Some(cluster) = ctx.cluster.clone() {
            let health = ctx.health.clone();
            tokio::spawn(async move {
                while !health.latest().is_some_and(|s| s.report.ready) {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
                if let Err(e) = cluster.after_healthy_boot().await {
                    tracing::warn!(error = %crate::error_chain(&e), "node not put back in service");
                }
            });
        }
        set_state(&ctx.status, UpdateState::Idle);
        return Ok(());
    }

    set_state(&ctx.status, UpdateState::Trial { version: running });
    // A hung trial must fall back too: with a hardware watchdog, stop
    // petting it and the machine resets, spending one boot try.
    let watchdog = TrialWatchdog::arm();
    console::emit_raw(
        "trial-boot",
        &[
            ("version", v(running)),
            (
                "deadline_s",
                Value::from(ctx.config.health_deadline.as_secs()),
            ),
        ],
    );
    // Test images only (see failpoints.rs): `pause` here hangs the trial.
    fail::fail_point!("trial-gate");
    let now = tokio::time::Instant::now();
    // Bounded at load (config::duration::MAX); checked all the same.
    let deadline = now
        .checked_add(ctx.config.health_deadline)
        .unwrap_or_else(|| now + crate::config::duration::MAX);
    let mut last = None;
    while tokio::time::Instant::now() < deadline {
        let report = ctx.health.run_now().await;
        if report.ready {
            let l = layout.clone();
            tokio::task::spawn_blocking(move || {
                control::mark_good(&RealStorage, &l, SystemTime::now())
            })
            .await??;
            if let Some(w) = watchdog {
                w.disarm();
            }
            console::emit_raw(
                "committed",
                &[
                    ("version", v(running)),
                    ("slot", Value::from(layout.running.slot.to_string())),
                ],
            );
            if let Some(fl) = &ctx.config.fleetlock {
                if let Err(e) = fleetlock(fl, &ctx.node_id, "steady-state").await {
                    tracing::warn!(error = %crate::error_chain(&e), "fleetlock lock not released");
                }
            }
            back_in_cluster(ctx).await;
            set_state(&ctx.status, UpdateState::Idle);
            return Ok(());
        }
        last = Some(report);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let failing: Vec<String> = last
        .map(|r| {
            r.checks
                .into_iter()
                .filter(|c| !c.ok)
                .map(|c| format!("{}: {}", c.name, c.message))
                .collect()
        })
        .unwrap_or_default();
    let reason = format!(
        "health gate not passed within {:?}: {}",
        ctx.config.health_deadline,
        failing.join("; ")
    );
    set_state(
        &ctx.status,
        UpdateState::RollingBack {
            version: running,
            reason: reason.clone(),
        },
    );
    console::emit_raw(
        "trial-failed",
        &[
            ("version", v(running)),
            ("reason", Value::from(reason.clone())),
        ],
    );
    let l = layout.clone();
    let r = reason.clone();
    let report = tokio::task::spawn_blocking(move || {
        control::rollback(&RealStorage, &l, &r, SystemTime::now())
    })
    .await??;
    console::emit_raw(
        "rebooting",
        &[
            ("version", v(report.to)),
            ("reason", Value::from("rollback")),
        ],
    );
    let _ = ctx.power.send(Action::Reboot).await;
    // PID 1 is shutting down; never go on to poll.
    std::future::pending::<()>().await;
    Ok(())
}

/// `/dev/watchdog` kept alive by a task while a trial runs.
#[derive(Debug)]
struct TrialWatchdog {
    pet: tokio::task::JoinHandle<()>,
    device: Arc<std::fs::File>,
}

impl TrialWatchdog {
    const DEVICE: &'static str = "/dev/watchdog";

    /// Opens the watchdog (which starts it) and pets it every 5 s; `None`
    /// when the machine has none.
    fn arm() -> Option<Self> {
        let device = Arc::new(
            std::fs::OpenOptions::new()
                .write(true)
                .open(Self::DEVICE)
                .ok()?,
        );
        console::emit_raw("watchdog-armed", &[("device", Value::from(Self::DEVICE))]);
        let d = device.clone();
        let pet = tokio::spawn(async move {
            loop {
                let _ = std::io::Write::write_all(&mut &*d, b"\0");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        });
        Some(TrialWatchdog { pet, device })
    }

    /// Stops it with the magic close, so it does not reset the machine.
    fn disarm(self) {
        self.pet.abort();
        let _ = std::io::Write::write_all(&mut &*self.device, b"V");
    }
}

/// True the first time a rollback from `failed` is seen on this node
/// (a marker on STATE), so it is reported once, not at every boot.
fn first_report_of_rollback(layout: &NodeLayout, failed: Version) -> bool {
    let marker = layout.state_dir.join(format!("rollback-reported-{failed}"));
    if marker.exists() {
        return false;
    }
    let _ = std::fs::create_dir_all(&layout.state_dir);
    let _ = std::fs::write(&marker, b"");
    true
}

async fn check_and_install(
    ctx: &UpdateContext,
    layout: &Arc<NodeLayout>,
    repository: &str,
) -> Result<Option<Version>, UpdateLoopError> {
    let trust_paths = if ctx.config.trust.is_empty() {
        vec![PathBuf::from(DEFAULT_TRUST)]
    } else {
        ctx.config.trust.clone()
    };
    let trust = TrustedKeys::load(&trust_paths, None).map_err(UpdateLoopError::Trust)?;
    let fetch = ballast_updater::http::for_location(repository).map_err(|source| {
        UpdateLoopError::Repository {
            url: repository.to_owned(),
            source,
        }
    })?;
    let variant = std::fs::read_to_string(OS_RELEASE)
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("VARIANT_ID="))
                .map(|v| v.trim_matches('"').to_owned())
        })
        .unwrap_or_else(|| "base".into());
    let channel = ctx.config.channel.clone();
    let opts = ApplyOptions {
        version: ctx.config.version_lock,
        allow_downgrade: false,
    };
    let l = layout.clone();
    let status = ctx.status.clone();
    let outcome =
        tokio::task::spawn_blocking(move || -> Result<Option<Version>, UpdateLoopError> {
            let node = Node {
                storage: &RealStorage,
                layout: &l,
                arch: Arch::native(),
                variant,
                channel,
                now: SystemTime::now(),
            };
            let source = Source {
                fetch: fetch.as_ref(),
                trust: &trust,
            };
            let check = install::check(&node, &source, &opts)?;
            if let Ok(mut s) = status.lock() {
                s.last_check =
                    Some(humantime::format_rfc3339_seconds(SystemTime::now()).to_string());
            }
            let Some(version) = check.version.filter(|_| check.decision == "install") else {
                tracing::info!(decision = check.decision, reason = %check.reason, "no update");
                return Ok(None);
            };
            console::emit_raw(
                "update-found",
                &[("version", v(version)), ("running", v(check.running))],
            );
            set_state(&status, UpdateState::Installing { version });
            let mut next_percent = 0u64;
            let mut progress = |p: install::Progress| {
                let percent = (p.done * 100).checked_div(p.total).unwrap_or(100);
                if percent >= next_percent {
                    console::emit_raw(
                        "install-progress",
                        &[
                            ("version", v(version)),
                            ("artifact", Value::from(p.artifact.to_string())),
                            ("percent", Value::from(percent)),
                        ],
                    );
                    next_percent = percent + 25;
                }
            };
            let report = install::apply(
                &node,
                &source,
                &ApplyOptions {
                    version: Some(version),
                    ..opts
                },
                &mut progress,
            )?;
            let Some(installed) = report.installed else {
                return Ok(None);
            };
            console::emit_raw(
                "installed",
                &[
                    ("version", v(installed.version)),
                    ("slot", Value::from(installed.slot.to_string())),
                    ("entry", Value::from(installed.entry)),
                ],
            );
            Ok(Some(installed.version))
        })
        .await??;
    Ok(outcome)
}

/// Waits until the configured strategy lets this node reboot.
async fn wait_for_reboot_permission(ctx: &UpdateContext, version: Version) {
    match ctx.config.strategy {
        Strategy::Immediate => {}
        Strategy::Off => {
            console::emit_raw("reboot-needed", &[("version", v(version))]);
            std::future::pending::<()>().await;
        }
        Strategy::Window => loop {
            match &ctx.config.window {
                Some(w) if in_window(w, SystemTime::now()) => return,
                Some(_) => {}
                None => {
                    tracing::error!("strategy window without [update.window]; not rebooting");
                }
            }
            tokio::time::sleep(Duration::from_secs(30)).await;
        },
        Strategy::Kubernetes => {
            let Some(cluster) = &ctx.cluster else {
                tracing::error!(
                    "strategy kubernetes without a usable [kubernetes] agent credential; not rebooting"
                );
                console::emit_raw(
                    "reboot-blocked",
                    &[
                        ("version", v(version)),
                        (
                            "reason",
                            Value::from("no Kubernetes credential for the agent"),
                        ),
                    ],
                );
                std::future::pending::<()>().await;
                return;
            };
            loop {
                match cluster.before_reboot().await {
                    Ok(()) => return,
                    Err(e) => {
                        let reason = crate::error_chain(&e);
                        tracing::warn!(error = %reason, "not rebooting yet");
                        console::emit_raw(
                            "reboot-blocked",
                            &[("version", v(version)), ("reason", Value::from(reason))],
                        );
                        tokio::time::sleep(Duration::from_secs(60)).await;
                    }
                }
            }
        }
        Strategy::Fleetlock => {
            let Some(fl) = &ctx.config.fleetlock else {
                tracing::error!("strategy fleetlock without [update.fleetlock]; not rebooting");
                std::future::pending::<()>().await;
                return;
            };
            loop {
                match fleetlock(fl, &ctx.node_id, "pre-reboot").await {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::info!(reason = %crate::error_chain(&e), "reboot lock not granted; retrying");
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                }
            }
        }
    }
}

/// After a healthy boot: uncordon the node if we cordoned it and give
/// back the reboot slot (no-ops when there is nothing of ours).
async fn back_in_cluster(ctx: &UpdateContext) {
    if let Some(cluster) = &ctx.cluster {
        if let Err(e) = cluster.after_healthy_boot().await {
            tracing::warn!(error = %crate::error_chain(&e), "node not put back in service");
        }
    }
}

/// Whether `now` falls in the window (UTC).
pub fn in_window(w: &WindowConfig, now: SystemTime) -> bool {
    const DAYS: [&str; 7] = ["thu", "fri", "sat", "sun", "mon", "tue", "wed"]; // 1970-01-01 was a Thursday
    let Some((h, m)) = w.start.split_once(':') else {
        return false;
    };
    let (Ok(h), Ok(m)) = (h.parse::<u64>(), m.parse::<u64>()) else {
        return false;
    };
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let start_of_day = |day: u64| day * 86_400 + h * 3600 + m * 60;
    let today = secs / 86_400;
    // A window may have started yesterday and still be open.
    [today, today.saturating_sub(1)].into_iter().any(|day| {
        let name = DAYS[(day % 7) as usize];
        let allowed = w.days.is_empty()
            || w.days
                .iter()
                .any(|d| d.to_ascii_lowercase().starts_with(name));
        let start = start_of_day(day);
        allowed && secs >= start && secs < start + w.length.as_secs()
    })
}

/// One FleetLock call (`pre-reboot` or `steady-state`); Ok when granted.
async fn fleetlock(
    config: &FleetLockConfig,
    node_id: &str,
    op: &str,
) -> Result<(), UpdateLoopError> {
    let url = format!("{}/v1/{op}", config.url.trim_end_matches('/'));
    let body =
        serde_json::json!({"client_params": {"id": node_id, "group": config.group}}).to_string();
    let u = url.clone();
    let result = tokio::task::spawn_blocking(move || {
        let client = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| e.to_string())?;
        let resp = client
            .post(&u)
            .header("fleet-lock-protocol", "true")
            .header("content-type", "application/json")
            .body(body)
            .send()
            .map_err(|e| e.to_string())?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(format!(
                "{}: {}",
                resp.status(),
                resp.text().unwrap_or_default()
            ))
        }
    })
    .await?;
    result.map_err(|reason| UpdateLoopError::FleetLock { url, reason })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_update_table_parses() {
        let c: UpdateConfig = toml::from_str(
            "repository = \"http://10.0.2.100/\"\ninterval = \"30s\"\nstrategy = \"immediate\"\nhealth_deadline = \"2m\"\n",
        )
        .unwrap();
        assert_eq!(c.interval, Duration::from_secs(30));
        assert_eq!(c.strategy, Strategy::Immediate);
        assert_eq!(c.health_deadline, Duration::from_secs(120));
        assert!(toml::from_str::<UpdateConfig>("strategy = \"sometimes\"\n").is_err());
        assert!(toml::from_str::<UpdateConfig>("interval = \"soon\"\n").is_err());
        assert_eq!(c.channel, "stable");
        let beta: UpdateConfig = toml::from_str("channel = \"beta\"\n").unwrap();
        assert_eq!(beta.channel, "beta");
        let err = toml::from_str::<UpdateConfig>("channel = \"Beta 2\"\n").unwrap_err();
        assert!(err.to_string().contains("channel \"Beta 2\""), "{err}");
    }

    #[test]
    fn windows_open_on_their_days_and_hours_only() {
        // 2026-11-26 is a Thursday.
        let thursday_0230 = humantime::parse_rfc3339("2026-11-26T02:30:00Z").unwrap();
        let thursday_0500 = humantime::parse_rfc3339("2026-11-26T05:00:00Z").unwrap();
        let friday_0100 = humantime::parse_rfc3339("2026-11-27T01:00:00Z").unwrap();
        let w = WindowConfig {
            days: vec!["thu".into()],
            start: "02:00".into(),
            length: Duration::from_secs(3600),
        };
        assert!(in_window(&w, thursday_0230));
        assert!(!in_window(&w, thursday_0500));
        assert!(!in_window(&w, friday_0100));
        let overnight = WindowConfig {
            days: vec!["Thursday".into()],
            start: "23:00".into(),
            length: Duration::from_secs(4 * 3600),
        };
        assert!(in_window(&overnight, friday_0100));
    }

    #[test]
    fn jitter_adds_at_most_a_tenth() {
        for _ in 0..100 {
            let d = with_jitter(Duration::from_secs(30));
            assert!(d >= Duration::from_secs(30) && d < Duration::from_secs(33));
        }
    }
}
