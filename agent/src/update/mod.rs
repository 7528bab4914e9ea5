//! The automatic update lifecycle of PID 1. The lifecycle itself is the
//! pure state machine in [`machine`] (states, transitions and their tests);
//! this module is its driver: it reads the boot's facts, feeds the machine
//! inputs with the current time, and runs the effects it answers with
//! (updater calls on a blocking thread, health gate, watchdog, reboot
//! strategy, power, console), one at a time and in order. The driver is
//! the only writer of the shared [`UpdateStatus`].
//!
//! - [`layout`]: where the node's slots, ESP and state are (shared with
//!   `ballast update`).
//! - [`strategy`]: the [`RebootStrategy`] trait and the strategies that
//!   need nothing outside `update`; `kubernetes` implements it itself.
//! - [`watchdog`]: the hardware watchdog during a trial.
//!
//! The install is `ballast_updater::install`; blessing and rollback are
//! `ballast_updater::control`.

pub mod layout;
pub mod machine;
pub mod status;
pub mod strategy;
pub mod watchdog;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ballast_updater::control;
use ballast_updater::esp::{list_entries, running_entry, NodeLayout};
use ballast_updater::install::{self, ApplyOptions, Node, Source};
use ballast_updater::keys::TrustedKeys;
use ballast_updater::payload::{Arch, Version};
use ballast_updater::state::StateDir;
use ballast_updater::storage::RealStorage;
use tokio::sync::mpsc;

use self::machine::{BootFacts, Checked, Effect, Event, HealthResult, Input, Installed, Machine};
pub use self::status::{new_status, SharedUpdateStatus, UpdateState, UpdateStatus};
pub use self::strategy::RebootStrategy;
use self::watchdog::TrialWatchdog;
use crate::config::update::UpdateConfig;
use crate::console;
use crate::node::health::HealthMonitor;
use crate::node::power::Action;

/// How often the background "back in service" task looks at the health.
const READY_POLL: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error("loading the trusted keys")]
    Trust(#[source] ballast_updater::keys::KeyError),
    #[error("repository {url}")]
    Repository {
        url: String,
        #[source]
        source: ballast_updater::fetch::FetchError,
    },
    #[error("node layout")]
    Layout(#[from] layout::LayoutError),
    #[error("checking for updates")]
    Install(#[from] ballast_updater::install::InstallError),
    #[error("boot control")]
    Control(#[from] ballast_updater::control::ControlError),
    #[error("the update worker stopped")]
    Worker(#[from] tokio::task::JoinError),
}

/// Everything the lifecycle needs from PID 1.
pub struct UpdateContext {
    pub config: UpdateConfig,
    pub health: HealthMonitor,
    /// Decides when an installed update may be rebooted into.
    pub strategy: Arc<dyn RebootStrategy>,
    /// Everything that may hold a reboot lock of this node (FleetLock,
    /// the Kubernetes slot and cordon), released after a healthy boot
    /// whatever the current strategy, so a strategy change strands none.
    pub holders: Vec<Arc<dyn RebootStrategy>>,
    pub status: SharedUpdateStatus,
    pub power: mpsc::Sender<Action>,
    /// Ends the wait for the next poll at once (an operator's "apply now").
    pub wake: Arc<tokio::sync::Notify>,
}

impl std::fmt::Debug for UpdateContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpdateContext")
            .field("config", &self.config)
            .field("strategy", &self.strategy)
            .field("holders", &self.holders)
            .finish_non_exhaustive()
    }
}

/// Runs the lifecycle until the machine waits for nothing more (updates
/// disabled, rebooting, or a reboot left to an operator).
pub async fn run(ctx: UpdateContext) {
    let mut machine = Machine::new(machine::Settings {
        health_deadline: ctx.config.health_deadline,
        interval: ctx.config.interval,
        poll: ctx.config.repository.is_some(),
    });
    let mut driver = Driver {
        ctx,
        layout: None,
        watchdog: None,
        gate_reached: false,
    };
    let mut inputs = VecDeque::from([driver.boot().await]);
    while let Some(input) = inputs.pop_front() {
        let effects = match machine.step(input, Instant::now()) {
            Ok(effects) => effects,
            Err(e) => {
                tracing::error!(error = %e, "update machine input ignored");
                Vec::new()
            }
        };
        if let Ok(mut s) = driver.ctx.status.lock() {
            *s = machine.status();
        }
        for effect in effects {
            inputs.extend(driver.run(effect).await);
        }
    }
    tracing::info!(
        state = machine.status().state.name(),
        "update lifecycle idle for good"
    );
}

struct Driver {
    ctx: UpdateContext,
    layout: Option<Arc<NodeLayout>>,
    watchdog: Option<TrialWatchdog>,
    gate_reached: bool,
}

fn emit(event: &Event) {
    console::emit(&event.to_console());
}

/// Runs a blocking updater call with the layout on the blocking pool.
async fn blocking<T: Send + 'static>(
    layout: &Arc<NodeLayout>,
    f: impl FnOnce(&NodeLayout) -> Result<T, UpdateError> + Send + 'static,
) -> Result<T, String> {
    let l = layout.clone();
    match tokio::task::spawn_blocking(move || f(&l)).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(crate::error_chain(&e)),
        Err(e) => Err(crate::error_chain(&UpdateError::Worker(e))),
    }
}

impl Driver {
    /// The first input: this boot's facts, read from the ESP and STATE.
    async fn boot(&mut self) -> Input {
        let layout = match layout::node_layout() {
            Ok(l) => Arc::new(l),
            Err(e) => {
                let reason = crate::error_chain(&e);
                tracing::error!(error = %reason, "updates disabled: node layout unknown");
                return Input::NoLayout { reason };
            }
        };
        self.layout = Some(layout.clone());
        match blocking(&layout, boot_facts).await {
            Ok(facts) => Input::Booted(facts),
            Err(reason) => {
                tracing::error!(error = %reason, "settling the running version failed");
                Input::FactsUnknown { reason }
            }
        }
    }

    async fn run(&mut self, effect: Effect) -> Option<Input> {
        let layout = self.layout.clone();
        match effect {
            Effect::Emit(event) => emit(&event),
            Effect::ArmWatchdog => {
                self.watchdog = TrialWatchdog::arm();
                if self.watchdog.is_some() {
                    emit(&Event::WatchdogArmed {
                        device: TrialWatchdog::DEVICE,
                    });
                }
            }
            Effect::DisarmWatchdog => {
                if let Some(w) = self.watchdog.take() {
                    w.disarm();
                }
            }
            Effect::RunHealthGate => {
                if !self.gate_reached {
                    self.gate_reached = true;
                    // Test images only (see failpoints.rs): `pause` here
                    // hangs the trial.
                    fail::fail_point!("trial-gate");
                }
                let report = self.ctx.health.run_now().await;
                return Some(Input::Health(HealthResult {
                    ready: report.ready,
                    failing: report
                        .checks
                        .into_iter()
                        .filter(|c| !c.ok)
                        .map(|c| format!("{}: {}", c.name, c.message))
                        .collect(),
                }));
            }
            Effect::Bless => {
                let layout = layout?;
                let result = blocking(&layout, |l| {
                    control::mark_good(&RealStorage, l, SystemTime::now())?;
                    Ok(())
                })
                .await;
                if let Err(reason) = &result {
                    tracing::error!(error = %reason, "blessing the running version failed");
                }
                return Some(Input::Blessed(result));
            }
            Effect::Rollback { reason } => {
                let layout = layout?;
                let result = blocking(&layout, move |l| {
                    Ok(control::rollback(&RealStorage, l, &reason, SystemTime::now())?.to)
                })
                .await;
                if let Err(reason) = &result {
                    tracing::error!(error = %reason, "rollback failed");
                }
                return Some(Input::RolledBack(result));
            }
            Effect::ReleaseHolds => {
                for holder in &self.ctx.holders {
                    holder.committed().await;
                }
            }
            Effect::BackInService => {
                if !self.ctx.holders.is_empty() {
                    // However long the checks take, and never before.
                    let health = self.ctx.health.clone();
                    let holders = self.ctx.holders.clone();
                    tokio::spawn(async move {
                        while !health.latest().is_some_and(|s| s.report.ready) {
                            tokio::time::sleep(READY_POLL).await;
                        }
                        for holder in holders {
                            holder.back_in_service().await;
                        }
                    });
                }
            }
            Effect::Check => {
                let layout = layout?;
                let config = self.ctx.config.clone();
                let result = blocking(&layout, move |l| check(&config, l)).await;
                match &result {
                    Ok(c) => tracing::info!(decision = %c.decision, "update check"),
                    Err(reason) => tracing::warn!(error = %reason, "update check failed"),
                }
                return Some(Input::CheckDone(result));
            }
            Effect::Install(version) => {
                let layout = layout?;
                let config = self.ctx.config.clone();
                let result = blocking(&layout, move |l| apply(&config, l, version)).await;
                if let Err(reason) = &result {
                    tracing::warn!(error = %reason, "update install failed");
                }
                return Some(Input::InstallDone(result));
            }
            Effect::AskStrategy(version) => {
                return Some(match self.ctx.strategy.permit(version).await {
                    Ok(strategy::Permit) => Input::RebootPermitted,
                    Err(blocked) => {
                        tracing::info!(reason = %blocked.reason, "not rebooting yet");
                        Input::RebootBlocked(blocked)
                    }
                });
            }
            Effect::Reboot => {
                let _ = self.ctx.power.send(Action::Reboot).await;
            }
            Effect::WakeAt(at) => {
                tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
                return Some(Input::Tick);
            }
            Effect::PollIn(interval) => {
                tokio::select! {
                    () = tokio::time::sleep(with_jitter(interval)) => {}
                    () = self.ctx.wake.notified() => {
                        tracing::info!("update check asked for now");
                    }
                }
                return Some(Input::Tick);
            }
        }
        None
    }
}

/// Interval plus up to a tenth at random, so a fleet does not poll in step.
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

/// Trial or blessed; on a blessed boot, bless again (a no-op that records
/// newer versions which used up their tries) and note which of those
/// fall-backs are reported for the first time.
fn boot_facts(layout: &NodeLayout) -> Result<BootFacts, UpdateError> {
    let entries = list_entries(&RealStorage, &layout.esp).map_err(control::ControlError::from)?;
    let trial = running_entry(&entries, &layout.running).is_some_and(|e| e.name.counter.is_some());
    let mut rolled_back_from = Vec::new();
    if !trial {
        let report = control::mark_good(&RealStorage, layout, SystemTime::now())?;
        let state = StateDir::new(&RealStorage, &layout.state_dir);
        for failed in report.rolled_back_from {
            // Unsure is reported: twice is better than never.
            let first = state.note_rollback_reported(failed).unwrap_or_else(|e| {
                tracing::warn!(error = %crate::error_chain(&e), version = %failed, "rollback marker not written");
                true
            });
            if first {
                rolled_back_from.push(failed);
            }
        }
    }
    // The boot loader may fall back below the floor to keep the node up;
    // that is reported, and the lifecycle installs a release above it.
    let floor = StateDir::new(&RealStorage, &layout.state_dir).floor();
    if let Ok(Some(floor)) = floor {
        if layout.running.version < floor {
            tracing::warn!(version = %layout.running.version, %floor, "running below the release floor");
            crate::console::emit(&crate::console::Event::BelowFloor {
                version: layout.running.version.to_string(),
                floor: floor.to_string(),
            });
        }
    }
    Ok(BootFacts {
        running: layout.running.version,
        slot: layout.running.slot,
        trial,
        rolled_back_from,
    })
}

/// The node and source for the updater, from `[update]`.
fn with_source<T>(
    config: &UpdateConfig,
    layout: &NodeLayout,
    f: impl FnOnce(&Node<'_>, &Source<'_>, ApplyOptions) -> Result<T, UpdateError>,
) -> Result<T, UpdateError> {
    let repository = config.repository.as_deref().unwrap_or_default();
    let trust_paths = if config.trust.is_empty() {
        vec![PathBuf::from(layout::DEFAULT_TRUST)]
    } else {
        config.trust.clone()
    };
    let trust = TrustedKeys::load(&trust_paths, None).map_err(UpdateError::Trust)?;
    let fetch = ballast_updater::http::for_location_with(repository, &config.outbound).map_err(
        |source| UpdateError::Repository {
            url: ballast_updater::fetch::redact_url(repository),
            source,
        },
    )?;
    let node = Node {
        storage: &RealStorage,
        layout,
        arch: Arch::native(),
        variant: layout::variant()?,
        channel: config.channel.clone(),
        now: SystemTime::now(),
        config_words: running_config_words(),
    };
    let source = Source {
        fetch: fetch.as_ref(),
        trust: &trust,
    };
    let opts = ApplyOptions {
        version: config.version_lock,
        allow_downgrade: false,
    };
    f(&node, &source, opts)
}

/// An operator's check from the API: what the repository offers this
/// node now, as `ballast update check --json` prints it. Reads only; the
/// lifecycle's own polling is not disturbed.
pub async fn check_now(config: UpdateConfig) -> Result<serde_json::Value, UpdateError> {
    tokio::task::spawn_blocking(move || {
        let layout = layout::node_layout()?;
        with_source(&config, &layout, |node, source, opts| {
            let report = install::check(node, source, &opts)?;
            Ok(serde_json::to_value(&report).unwrap_or_default())
        })
    })
    .await?
}

/// An operator's rollback from the API: the previous version's entry
/// becomes the default (as `ballast update rollback` does); the caller
/// reboots through the strategy. Returns the version the node will boot.
pub async fn rollback_now(reason: String) -> Result<Version, UpdateError> {
    tokio::task::spawn_blocking(move || {
        let layout = layout::node_layout()?;
        Ok(control::rollback(&RealStorage, &layout, &reason, SystemTime::now())?.to)
    })
    .await?
}

fn check(config: &UpdateConfig, layout: &NodeLayout) -> Result<Checked, UpdateError> {
    with_source(config, layout, |node, source, opts| {
        let report = install::check(node, source, &opts)?;
        tracing::info!(decision = %report.decision, reason = %report.reason, "update check");
        Ok(Checked {
            decision: report.decision,
            running: report.running,
            at: SystemTime::now(),
        })
    })
}

fn apply(
    config: &UpdateConfig,
    layout: &NodeLayout,
    version: Version,
) -> Result<Option<Installed>, UpdateError> {
    with_source(config, layout, |node, source, opts| {
        let mut next_percent = 0u64;
        let mut progress = |p: install::Progress| {
            let percent = (p.done * 100).checked_div(p.total).unwrap_or(100);
            if percent >= next_percent {
                emit(&Event::InstallProgress {
                    version,
                    artifact: p.artifact.to_string(),
                    percent,
                });
                next_percent = percent + 25;
            }
        };
        let report = install::apply(
            node,
            source,
            &ApplyOptions {
                version: Some(version),
                ..opts
            },
            &mut progress,
        )?;
        Ok(report.installed.map(|i| Installed {
            version: i.version,
            slot: i.slot,
            entry: i.entry,
        }))
    })
}

/// The running command line's `ballast.<key>=` configuration words: the
/// next entry carries them, so configuration given there survives updates.
pub fn running_config_words() -> Vec<String> {
    let cmdline = std::fs::read_to_string(crate::config::CMDLINE).unwrap_or_default();
    ballast_updater::cmdline::config_words(&cmdline)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_adds_at_most_a_tenth() {
        for _ in 0..100 {
            let d = with_jitter(Duration::from_secs(30));
            assert!(d >= Duration::from_secs(30) && d < Duration::from_secs(33));
        }
        assert_eq!(with_jitter(Duration::ZERO), Duration::ZERO);
    }
}
