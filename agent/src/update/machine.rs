//! The update lifecycle as a state machine without I/O: the driver
//! (`update/mod.rs`) feeds it [`Input`]s with the current time and runs the
//! [`Effect`]s it answers with, in order. Time is injected, so deadlines
//! and retries are tested without waiting; a transition the current state
//! does not allow is a [`MachineError`], and leaves the state as it was.
//!
//! ```text
//!  Starting ──Booted(blessed)─────────────────────────────▶ Checking / Disabled
//!     │  └──NoLayout──▶ Disabled      (reports new fall-backs once; back in service when healthy)
//!     │ Booted(trial)
//!     ▼
//!   Trial ──Health(ready)──▶ Committing ──Blessed(ok)──▶ Checking / Disabled
//!     │ ▲ Health(not ready): WakeAt(+2 s)     (committed; locks released)
//!     │ └─Tick before the deadline
//!     │ Tick at/after the deadline
//!     ▼
//!  RollingBack ──RolledBack(ok)──▶ (rebooting into the previous version)
//!
//!  Idle ──Tick──▶ Checking ──nothing new / error──▶ Idle (PollIn interval)
//!                     │ Install(v) decided
//!                     ▼
//!                 Installing ──error / nothing installed──▶ Idle
//!                     │ installed (entry renamed = commit point)
//!                     ▼
//!               RebootPending ──RebootBlocked: WakeAt(retry), Tick asks again
//!                     │ RebootPermitted
//!                     ▼
//!                 Rebooting
//! ```
//!
//! A failed bless or rollback is reported in `last_error` and the node goes
//! on polling, as the install refuses to run before the running version is
//! blessed.

use std::time::{Duration, Instant, SystemTime};

use super::status::{UpdateState, UpdateStatus};
use crate::console;
use ballast_updater::cmdline::Slot;
use ballast_updater::install::Decision;
use ballast_updater::payload::Version;

/// Time between two runs of the health gate during a trial.
pub const GATE_RETRY: Duration = Duration::from_secs(2);

/// What the machine is told once, at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// How long a trial has to pass its health gate.
    pub health_deadline: Duration,
    /// Time between checks (the driver adds jitter).
    pub interval: Duration,
    /// A repository is configured; without one the node never polls.
    pub poll: bool,
}

/// What the driver found about this boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootFacts {
    pub running: Version,
    pub slot: Slot,
    /// The running entry still has a boot counter (`+N`).
    pub trial: bool,
    /// Newer versions that used up their boot tries and are reported now
    /// for the first time (`StateDir::note_rollback_reported`).
    pub rolled_back_from: Vec<Version>,
}

/// One run of the health checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthResult {
    pub ready: bool,
    /// `name: message` of every failing check.
    pub failing: Vec<String>,
}

/// A finished `install::check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub decision: Decision,
    pub running: Version,
    /// Wall-clock time of the check, for `/status` and metrics.
    pub at: SystemTime,
}

/// A release written to the other slot and committed to the ESP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    pub version: Version,
    pub slot: Slot,
    pub entry: String,
}

/// Why a strategy does not let the node reboot yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    pub reason: String,
    /// When to ask again; never when `None`.
    pub retry_after: Option<Duration>,
    /// What, if anything, the console is told.
    pub notice: Notice,
}

/// The console event a refusal prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    /// Nothing (a lock held by another node is normal).
    Quiet,
    /// `reboot-needed`: an operator has to reboot (strategy `off`).
    RebootNeeded,
    /// `reboot-blocked` with the reason.
    RebootBlocked,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// The node's layout could not be found: updates are off.
    NoLayout {
        reason: String,
    },
    /// The boot's facts could not be read; the trial state is unknown.
    FactsUnknown {
        reason: String,
    },
    Booted(BootFacts),
    Health(HealthResult),
    /// The answer to [`Effect::Bless`].
    Blessed(Result<(), String>),
    /// The answer to [`Effect::Rollback`]: the version that boots next.
    RolledBack(Result<Version, String>),
    CheckDone(Result<Checked, String>),
    /// `Ok(None)`: the install found nothing to do after all.
    InstallDone(Result<Option<Installed>, String>),
    RebootPermitted,
    RebootBlocked(Blocked),
    /// A wake-up asked for with [`Effect::WakeAt`] or [`Effect::PollIn`].
    Tick,
}

impl Input {
    fn name(&self) -> &'static str {
        match self {
            Input::NoLayout { .. } => "no-layout",
            Input::FactsUnknown { .. } => "facts-unknown",
            Input::Booted(_) => "booted",
            Input::Health(_) => "health",
            Input::Blessed(_) => "blessed",
            Input::RolledBack(_) => "rolled-back",
            Input::CheckDone(_) => "check-done",
            Input::InstallDone(_) => "install-done",
            Input::RebootPermitted => "reboot-permitted",
            Input::RebootBlocked(_) => "reboot-blocked",
            Input::Tick => "tick",
        }
    }
}

/// What the driver does, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    Emit(Event),
    /// Open and pet the hardware watchdog for the trial.
    ArmWatchdog,
    /// Stop it with the magic close.
    DisarmWatchdog,
    /// Run the health checks now; answer with [`Input::Health`].
    RunHealthGate,
    /// Bless the running version; answer with [`Input::Blessed`].
    Bless,
    /// Make the other slot boot next; answer with [`Input::RolledBack`].
    Rollback {
        reason: String,
    },
    /// After a committed trial: give back every reboot lock this node
    /// holds (FleetLock, Kubernetes slot and cordon).
    ReleaseHolds,
    /// After a blessed boot: put the node back in service once its
    /// checks pass, in the background.
    BackInService,
    /// Check the repository; answer with [`Input::CheckDone`].
    Check,
    /// Install this release; answer with [`Input::InstallDone`].
    Install(Version),
    /// Ask the reboot strategy; answer with `RebootPermitted/Blocked`.
    AskStrategy(Version),
    Reboot,
    /// Send [`Input::Tick`] at this time.
    WakeAt(Instant),
    /// Send [`Input::Tick`] after this interval plus random jitter.
    PollIn(Duration),
}

/// The update lifecycle's console events (docs/console-events.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    TrialBoot {
        version: Version,
        deadline_s: u64,
    },
    WatchdogArmed {
        device: &'static str,
    },
    Committed {
        version: Version,
        slot: Slot,
    },
    TrialFailed {
        version: Version,
        reason: String,
    },
    /// `reason` is `rollback` when the reboot is a fall-back.
    Rebooting {
        version: Version,
        rollback: bool,
    },
    RolledBack {
        from: Version,
        to: Version,
    },
    UpdateFound {
        version: Version,
        running: Version,
    },
    UpdateError {
        reason: String,
    },
    InstallProgress {
        version: Version,
        artifact: String,
        percent: u64,
    },
    Installed {
        version: Version,
        slot: Slot,
        entry: String,
    },
    RebootNeeded {
        version: Version,
    },
    RebootBlocked {
        version: Version,
        reason: String,
    },
}

/// The reason `rolled-back` gives for a fall-back seen at boot.
pub const ROLLED_BACK_REASON: &str = "the new version did not pass its trial boot";

impl Event {
    /// The console event (`crate::console::Event`, the typed contract
    /// with qemu-tests); the driver prints it.
    pub fn to_console(&self) -> console::Event {
        let v = |version: &Version| version.to_string();
        match self {
            Event::TrialBoot {
                version,
                deadline_s,
            } => console::Event::TrialBoot {
                version: v(version),
                deadline_s: *deadline_s,
            },
            Event::WatchdogArmed { device } => console::Event::WatchdogArmed {
                device: (*device).to_owned(),
            },
            Event::Committed { version, slot } => console::Event::Committed {
                version: v(version),
                slot: slot.to_string(),
            },
            Event::TrialFailed { version, reason } => console::Event::TrialFailed {
                version: v(version),
                reason: reason.clone(),
            },
            Event::Rebooting { version, rollback } => console::Event::Rebooting {
                version: v(version),
                reason: rollback.then(|| "rollback".to_owned()),
            },
            Event::RolledBack { from, to } => console::Event::RolledBack {
                from: v(from),
                to: v(to),
                reason: ROLLED_BACK_REASON.to_owned(),
            },
            Event::UpdateFound { version, running } => console::Event::UpdateFound {
                version: v(version),
                running: v(running),
            },
            Event::UpdateError { reason } => console::Event::UpdateError {
                reason: reason.clone(),
            },
            Event::InstallProgress {
                version,
                artifact,
                percent,
            } => console::Event::InstallProgress {
                version: v(version),
                artifact: artifact.clone(),
                percent: *percent,
            },
            Event::Installed {
                version,
                slot,
                entry,
            } => console::Event::Installed {
                version: v(version),
                slot: slot.to_string(),
                entry: entry.clone(),
            },
            Event::RebootNeeded { version } => console::Event::RebootNeeded {
                version: v(version),
            },
            Event::RebootBlocked { version, reason } => console::Event::RebootBlocked {
                version: v(version),
                reason: reason.clone(),
            },
        }
    }
}

/// Where the lifecycle is. [`UpdateState`] is its public view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Waiting for the boot's facts.
    Starting,
    Disabled,
    /// A new version runs its health gate.
    Trial {
        version: Version,
        slot: Slot,
        deadline: Instant,
        /// The last run's failing checks, for the rollback reason.
        failing: Vec<String>,
    },
    /// The gate passed; blessing.
    Committing {
        version: Version,
        slot: Slot,
    },
    /// The gate failed; `rebooting` once the other slot boots next.
    RollingBack {
        version: Version,
        reason: String,
        rebooting: bool,
    },
    Idle,
    Checking,
    Installing {
        version: Version,
    },
    RebootPending {
        version: Version,
    },
    Rebooting {
        version: Version,
    },
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Disabled => "disabled",
            State::Trial { .. } => "trial",
            State::Committing { .. } => "committing",
            State::RollingBack { .. } => "rolling-back",
            State::Idle => "idle",
            State::Checking => "checking",
            State::Installing { .. } => "installing",
            State::RebootPending { .. } => "reboot-pending",
            State::Rebooting { .. } => "rebooting",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MachineError {
    #[error("update machine: input {input} is not allowed in state {state}")]
    NotAllowed {
        state: &'static str,
        input: &'static str,
    },
}

/// The lifecycle and what `/status` shows of it.
#[derive(Debug, Clone)]
pub struct Machine {
    settings: Settings,
    state: State,
    last_check: Option<SystemTime>,
    last_error: Option<String>,
    rollbacks: u64,
}

impl Machine {
    pub fn new(settings: Settings) -> Self {
        Machine {
            settings,
            state: State::Starting,
            last_check: None,
            last_error: None,
            rollbacks: 0,
        }
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    /// The view for `/status`, metrics and the Node report.
    pub fn status(&self) -> UpdateStatus {
        let state = match &self.state {
            State::Starting | State::Disabled => UpdateState::Disabled,
            State::Trial { version, .. } | State::Committing { version, .. } => {
                UpdateState::Trial { version: *version }
            }
            State::RollingBack {
                version, reason, ..
            } => UpdateState::RollingBack {
                version: *version,
                reason: reason.clone(),
            },
            State::Idle => UpdateState::Idle,
            State::Checking => UpdateState::Checking,
            State::Installing { version } => UpdateState::Installing { version: *version },
            State::RebootPending { version } => UpdateState::RebootPending { version: *version },
            State::Rebooting { version } => UpdateState::Rebooting { version: *version },
        };
        UpdateStatus {
            state,
            last_check: self.last_check,
            last_error: self.last_error.clone(),
            rollbacks: self.rollbacks,
        }
    }

    /// One transition. On an error nothing changes.
    pub fn step(&mut self, input: Input, now: Instant) -> Result<Vec<Effect>, MachineError> {
        let not_allowed = MachineError::NotAllowed {
            state: self.state.name(),
            input: input.name(),
        };
        let mut fx = Vec::new();
        match (&self.state, input) {
            (State::Starting, Input::NoLayout { reason }) => {
                self.last_error = Some(reason);
                self.state = State::Disabled;
            }
            (State::Starting, Input::FactsUnknown { reason }) => {
                self.last_error = Some(reason);
                self.start_polling(&mut fx);
            }
            (State::Starting, Input::Booted(facts)) if facts.trial => {
                // Bounded at load time (config::duration::MAX), but a
                // deadline past the clock's end must not panic PID 1.
                let deadline = now
                    .checked_add(self.settings.health_deadline)
                    .unwrap_or(now);
                fx.push(Effect::ArmWatchdog);
                fx.push(Effect::Emit(Event::TrialBoot {
                    version: facts.running,
                    deadline_s: self.settings.health_deadline.as_secs(),
                }));
                self.state = State::Trial {
                    version: facts.running,
                    slot: facts.slot,
                    deadline,
                    failing: Vec::new(),
                };
                self.gate_or_fail(now, &mut fx);
            }
            (State::Starting, Input::Booted(facts)) => {
                for from in facts.rolled_back_from {
                    self.rollbacks += 1;
                    fx.push(Effect::Emit(Event::RolledBack {
                        from,
                        to: facts.running,
                    }));
                }
                fx.push(Effect::BackInService);
                self.start_polling(&mut fx);
            }
            (State::Trial { version, slot, .. }, Input::Health(h)) if h.ready => {
                self.state = State::Committing {
                    version: *version,
                    slot: *slot,
                };
                fx.push(Effect::Bless);
            }
            (State::Trial { .. }, Input::Health(h)) => {
                if let State::Trial { failing, .. } = &mut self.state {
                    *failing = h.failing;
                }
                fx.push(Effect::WakeAt(now + GATE_RETRY));
            }
            (State::Trial { .. }, Input::Tick) => self.gate_or_fail(now, &mut fx),
            (State::Committing { version, slot }, Input::Blessed(Ok(()))) => {
                fx.push(Effect::DisarmWatchdog);
                fx.push(Effect::Emit(Event::Committed {
                    version: *version,
                    slot: *slot,
                }));
                fx.push(Effect::ReleaseHolds);
                self.start_polling(&mut fx);
            }
            (State::Committing { .. }, Input::Blessed(Err(reason))) => {
                // The watchdog stays armed: a version that cannot be
                // blessed should not stay for good.
                self.last_error = Some(reason);
                self.start_polling(&mut fx);
            }
            (
                State::RollingBack {
                    version,
                    reason,
                    rebooting: false,
                },
                Input::RolledBack(Ok(to)),
            ) => {
                self.state = State::RollingBack {
                    version: *version,
                    reason: reason.clone(),
                    rebooting: true,
                };
                fx.push(Effect::Emit(Event::Rebooting {
                    version: to,
                    rollback: true,
                }));
                fx.push(Effect::Reboot);
            }
            (
                State::RollingBack {
                    rebooting: false, ..
                },
                Input::RolledBack(Err(reason)),
            ) => {
                self.last_error = Some(reason);
                self.start_polling(&mut fx);
            }
            (State::Idle, Input::Tick) => {
                self.state = State::Checking;
                fx.push(Effect::Check);
            }
            (State::Checking, Input::CheckDone(Ok(checked))) => {
                self.last_check = Some(checked.at);
                match checked.decision {
                    Decision::Install(version) => {
                        fx.push(Effect::Emit(Event::UpdateFound {
                            version,
                            running: checked.running,
                        }));
                        self.state = State::Installing { version };
                        fx.push(Effect::Install(version));
                    }
                    Decision::UpToDate | Decision::Waiting(_) => {
                        self.last_error = None;
                        self.idle(&mut fx);
                    }
                }
            }
            (State::Checking, Input::CheckDone(Err(reason)))
            | (State::Installing { .. }, Input::InstallDone(Err(reason))) => {
                fx.push(Effect::Emit(Event::UpdateError {
                    reason: reason.clone(),
                }));
                self.last_error = Some(reason);
                self.idle(&mut fx);
            }
            (State::Installing { .. }, Input::InstallDone(Ok(None))) => {
                self.last_error = None;
                self.idle(&mut fx);
            }
            (State::Installing { .. }, Input::InstallDone(Ok(Some(installed)))) => {
                let version = installed.version;
                fx.push(Effect::Emit(Event::Installed {
                    version,
                    slot: installed.slot,
                    entry: installed.entry,
                }));
                self.last_error = None;
                self.state = State::RebootPending { version };
                fx.push(Effect::AskStrategy(version));
            }
            (State::RebootPending { version }, Input::RebootPermitted) => {
                let version = *version;
                self.state = State::Rebooting { version };
                fx.push(Effect::Emit(Event::Rebooting {
                    version,
                    rollback: false,
                }));
                fx.push(Effect::Reboot);
            }
            (State::RebootPending { version }, Input::RebootBlocked(blocked)) => {
                let version = *version;
                match blocked.notice {
                    Notice::Quiet => {}
                    Notice::RebootNeeded => {
                        fx.push(Effect::Emit(Event::RebootNeeded { version }));
                    }
                    Notice::RebootBlocked => fx.push(Effect::Emit(Event::RebootBlocked {
                        version,
                        reason: blocked.reason,
                    })),
                }
                if let Some(after) = blocked.retry_after {
                    fx.push(Effect::WakeAt(now + after));
                }
            }
            (State::RebootPending { version }, Input::Tick) => {
                fx.push(Effect::AskStrategy(*version));
            }
            // A wake-up nobody waits for any more changes nothing.
            (_, Input::Tick) => {}
            _ => return Err(not_allowed),
        }
        Ok(fx)
    }

    /// During a trial: run the gate again, or fail it at the deadline.
    fn gate_or_fail(&mut self, now: Instant, fx: &mut Vec<Effect>) {
        let State::Trial {
            version,
            deadline,
            failing,
            ..
        } = &self.state
        else {
            return;
        };
        if now < *deadline {
            fx.push(Effect::RunHealthGate);
            return;
        }
        let version = *version;
        let reason = format!(
            "health gate not passed within {:?}: {}",
            self.settings.health_deadline,
            failing.join("; ")
        );
        fx.push(Effect::Emit(Event::TrialFailed {
            version,
            reason: reason.clone(),
        }));
        fx.push(Effect::Rollback {
            reason: reason.clone(),
        });
        self.state = State::RollingBack {
            version,
            reason,
            rebooting: false,
        };
    }

    /// After the boot is settled: check now, or never without a repository.
    fn start_polling(&mut self, fx: &mut Vec<Effect>) {
        if self.settings.poll {
            self.state = State::Checking;
            fx.push(Effect::Check);
        } else {
            self.state = State::Disabled;
        }
    }

    fn idle(&mut self, fx: &mut Vec<Effect>) {
        self.state = State::Idle;
        fx.push(Effect::PollIn(self.settings.interval));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEADLINE: Duration = Duration::from_secs(20);
    const INTERVAL: Duration = Duration::from_secs(30);

    fn v(s: &str) -> Version {
        s.parse().unwrap()
    }

    fn machine(poll: bool) -> Machine {
        Machine::new(Settings {
            health_deadline: DEADLINE,
            interval: INTERVAL,
            poll,
        })
    }

    fn facts(trial: bool, rolled_back_from: &[&str]) -> BootFacts {
        BootFacts {
            running: v("1.1.0"),
            slot: Slot::B,
            trial,
            rolled_back_from: rolled_back_from.iter().map(|s| v(s)).collect(),
        }
    }

    fn healthy() -> Input {
        Input::Health(HealthResult {
            ready: true,
            failing: vec![],
        })
    }

    fn unhealthy(why: &str) -> Input {
        Input::Health(HealthResult {
            ready: false,
            failing: vec![why.to_owned()],
        })
    }

    fn checked(decision: Decision) -> Input {
        Input::CheckDone(Ok(Checked {
            decision,
            running: v("1.1.0"),
            at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_000),
        }))
    }

    fn events(fx: &[Effect]) -> Vec<&'static str> {
        fx.iter()
            .filter_map(|e| match e {
                Effect::Emit(ev) => Some(ev.to_console().name()),
                _ => None,
            })
            .collect()
    }

    /// A machine that booted blessed and is checking.
    fn checking(t0: Instant) -> Machine {
        let mut m = machine(true);
        m.step(Input::Booted(facts(false, &[])), t0).unwrap();
        assert_eq!(m.state(), &State::Checking);
        m
    }

    /// A machine with 1.2.0 installed, waiting for its strategy.
    fn reboot_pending(t0: Instant) -> Machine {
        let mut m = checking(t0);
        m.step(checked(Decision::Install(v("1.2.0"))), t0).unwrap();
        m.step(
            Input::InstallDone(Ok(Some(Installed {
                version: v("1.2.0"),
                slot: Slot::A,
                entry: "ballast-1.2.0+3.conf".into(),
            }))),
            t0,
        )
        .unwrap();
        assert_eq!(
            m.state(),
            &State::RebootPending {
                version: v("1.2.0")
            }
        );
        m
    }

    #[test]
    fn a_trial_that_passes_its_gate_is_committed_then_polls() {
        let t0 = Instant::now();
        let mut m = machine(true);
        let fx = m.step(Input::Booted(facts(true, &[])), t0).unwrap();
        assert_eq!(
            fx,
            [
                Effect::ArmWatchdog,
                Effect::Emit(Event::TrialBoot {
                    version: v("1.1.0"),
                    deadline_s: 20
                }),
                Effect::RunHealthGate,
            ]
        );
        assert_eq!(
            m.status().state,
            UpdateState::Trial {
                version: v("1.1.0")
            }
        );
        assert_eq!(m.step(healthy(), t0).unwrap(), [Effect::Bless]);
        // Still on trial until the bless is durable.
        assert!(matches!(m.status().state, UpdateState::Trial { .. }));
        let fx = m.step(Input::Blessed(Ok(())), t0).unwrap();
        assert_eq!(
            fx,
            [
                Effect::DisarmWatchdog,
                Effect::Emit(Event::Committed {
                    version: v("1.1.0"),
                    slot: Slot::B
                }),
                Effect::ReleaseHolds,
                Effect::Check,
            ]
        );
        assert_eq!(m.status().state, UpdateState::Checking);
    }

    #[test]
    fn an_unhealthy_trial_is_retried_every_two_seconds_until_it_passes() {
        let t0 = Instant::now();
        let mut m = machine(true);
        m.step(Input::Booted(facts(true, &[])), t0).unwrap();
        let fx = m.step(unhealthy("app: 503"), t0).unwrap();
        assert_eq!(fx, [Effect::WakeAt(t0 + GATE_RETRY)]);
        let t1 = t0 + GATE_RETRY;
        assert_eq!(m.step(Input::Tick, t1).unwrap(), [Effect::RunHealthGate]);
        assert_eq!(m.step(healthy(), t1).unwrap(), [Effect::Bless]);
    }

    #[test]
    fn a_trial_past_its_deadline_rolls_back_and_reboots() {
        let t0 = Instant::now();
        let mut m = machine(true);
        m.step(Input::Booted(facts(true, &[])), t0).unwrap();
        m.step(unhealthy("app: 503"), t0 + Duration::from_secs(19))
            .unwrap();
        let reason = "health gate not passed within 20s: app: 503".to_owned();
        let fx = m.step(Input::Tick, t0 + DEADLINE).unwrap();
        assert_eq!(
            fx,
            [
                Effect::Emit(Event::TrialFailed {
                    version: v("1.1.0"),
                    reason: reason.clone()
                }),
                Effect::Rollback {
                    reason: reason.clone()
                },
            ]
        );
        assert_eq!(
            m.status().state,
            UpdateState::RollingBack {
                version: v("1.1.0"),
                reason
            }
        );
        let fx = m.step(Input::RolledBack(Ok(v("1.0.0"))), t0 + DEADLINE);
        assert_eq!(
            fx.unwrap(),
            [
                Effect::Emit(Event::Rebooting {
                    version: v("1.0.0"),
                    rollback: true
                }),
                Effect::Reboot,
            ]
        );
        // Rolling back twice is a driver bug, not a second reboot.
        assert!(m.step(Input::RolledBack(Ok(v("1.0.0"))), t0).is_err());
        assert!(matches!(m.status().state, UpdateState::RollingBack { .. }));
        assert_eq!(m.step(Input::Tick, t0 + DEADLINE * 2).unwrap(), []);
    }

    #[test]
    fn a_zero_deadline_fails_the_trial_at_once() {
        let t0 = Instant::now();
        let mut m = Machine::new(Settings {
            health_deadline: Duration::ZERO,
            interval: INTERVAL,
            poll: true,
        });
        let fx = m.step(Input::Booted(facts(true, &[])), t0).unwrap();
        assert_eq!(events(&fx), ["trial-boot", "trial-failed"]);
        assert!(matches!(fx.last(), Some(Effect::Rollback { .. })));
    }

    #[test]
    fn a_failed_rollback_or_bless_is_reported_and_polling_goes_on() {
        let t0 = Instant::now();
        let mut m = machine(true);
        m.step(Input::Booted(facts(true, &[])), t0).unwrap();
        m.step(Input::Tick, t0 + DEADLINE).unwrap();
        let fx = m.step(Input::RolledBack(Err("esp: read-only".into())), t0);
        assert_eq!(fx.unwrap(), [Effect::Check]);
        assert_eq!(m.status().last_error.as_deref(), Some("esp: read-only"));

        let mut m = machine(false);
        m.step(Input::Booted(facts(true, &[])), t0).unwrap();
        m.step(healthy(), t0).unwrap();
        let fx = m.step(Input::Blessed(Err("esp full".into())), t0).unwrap();
        // No commit event, and the watchdog stays armed.
        assert_eq!(fx, []);
        assert_eq!(m.state(), &State::Disabled);
        assert_eq!(m.status().last_error.as_deref(), Some("esp full"));
    }

    #[test]
    fn a_blessed_boot_reports_each_new_fall_back_once_and_polls() {
        let t0 = Instant::now();
        let mut m = machine(true);
        let fx = m
            .step(Input::Booted(facts(false, &["1.2.0", "1.3.0"])), t0)
            .unwrap();
        assert_eq!(
            fx,
            [
                Effect::Emit(Event::RolledBack {
                    from: v("1.2.0"),
                    to: v("1.1.0")
                }),
                Effect::Emit(Event::RolledBack {
                    from: v("1.3.0"),
                    to: v("1.1.0")
                }),
                Effect::BackInService,
                Effect::Check,
            ]
        );
        assert_eq!(m.status().rollbacks, 2);
        // The facts are read once per boot.
        assert!(m.step(Input::Booted(facts(false, &["1.2.0"])), t0).is_err());
        assert_eq!(m.status().rollbacks, 2);
    }

    #[test]
    fn without_a_repository_updates_are_disabled_after_the_boot_is_settled() {
        let t0 = Instant::now();
        let mut m = machine(false);
        let fx = m.step(Input::Booted(facts(false, &[])), t0).unwrap();
        assert_eq!(fx, [Effect::BackInService]);
        assert_eq!(m.status().state, UpdateState::Disabled);
        assert_eq!(m.step(Input::Tick, t0 + INTERVAL).unwrap(), []);
        assert!(m.step(Input::CheckDone(Err("x".into())), t0).is_err());
    }

    #[test]
    fn an_unknown_layout_disables_updates_and_says_why() {
        let t0 = Instant::now();
        let mut m = machine(true);
        let fx = m.step(
            Input::NoLayout {
                reason: "no /proc".into(),
            },
            t0,
        );
        assert_eq!(fx.unwrap(), []);
        assert_eq!(m.status().state, UpdateState::Disabled);
        assert_eq!(m.status().last_error.as_deref(), Some("no /proc"));
        assert_eq!(m.step(Input::Tick, t0).unwrap(), []);
    }

    #[test]
    fn unknown_boot_facts_are_reported_and_polling_starts() {
        let t0 = Instant::now();
        let mut m = machine(true);
        let fx = m.step(
            Input::FactsUnknown {
                reason: "esp".into(),
            },
            t0,
        );
        assert_eq!(fx.unwrap(), [Effect::Check]);
        assert_eq!(m.status().last_error.as_deref(), Some("esp"));
    }

    #[test]
    fn nothing_new_or_waiting_goes_idle_until_the_next_interval() {
        let t0 = Instant::now();
        for decision in [Decision::UpToDate, Decision::Waiting(v("1.2.0"))] {
            let mut m = checking(t0);
            let fx = m.step(checked(decision), t0).unwrap();
            assert_eq!(fx, [Effect::PollIn(INTERVAL)]);
            let status = m.status();
            assert_eq!(status.state, UpdateState::Idle);
            assert_eq!(
                status.last_check,
                Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_000))
            );
            assert_eq!(m.step(Input::Tick, t0 + INTERVAL).unwrap(), [Effect::Check]);
            assert_eq!(m.state(), &State::Checking);
        }
    }

    #[test]
    fn a_failed_check_is_an_update_error_and_a_later_success_clears_it() {
        let t0 = Instant::now();
        let mut m = checking(t0);
        let fx = m
            .step(Input::CheckDone(Err("signature".into())), t0)
            .unwrap();
        assert_eq!(
            fx,
            [
                Effect::Emit(Event::UpdateError {
                    reason: "signature".into()
                }),
                Effect::PollIn(INTERVAL),
            ]
        );
        let status = m.status();
        assert_eq!(status.last_error.as_deref(), Some("signature"));
        assert_eq!(status.last_check, None);
        m.step(Input::Tick, t0).unwrap();
        m.step(checked(Decision::UpToDate), t0).unwrap();
        assert_eq!(m.status().last_error, None);
    }

    #[test]
    fn a_found_release_is_installed_then_waits_for_the_strategy() {
        let t0 = Instant::now();
        let mut m = checking(t0);
        let fx = m.step(checked(Decision::Install(v("1.2.0"))), t0).unwrap();
        assert_eq!(
            fx,
            [
                Effect::Emit(Event::UpdateFound {
                    version: v("1.2.0"),
                    running: v("1.1.0")
                }),
                Effect::Install(v("1.2.0")),
            ]
        );
        assert_eq!(
            m.status().state,
            UpdateState::Installing {
                version: v("1.2.0")
            }
        );
        let fx = m
            .step(
                Input::InstallDone(Ok(Some(Installed {
                    version: v("1.2.0"),
                    slot: Slot::A,
                    entry: "ballast-1.2.0+3.conf".into(),
                }))),
                t0,
            )
            .unwrap();
        assert_eq!(
            fx,
            [
                Effect::Emit(Event::Installed {
                    version: v("1.2.0"),
                    slot: Slot::A,
                    entry: "ballast-1.2.0+3.conf".into()
                }),
                Effect::AskStrategy(v("1.2.0")),
            ]
        );
    }

    #[test]
    fn an_install_error_or_nothing_to_install_goes_back_to_idle() {
        let t0 = Instant::now();
        let mut m = checking(t0);
        m.step(checked(Decision::Install(v("1.2.0"))), t0).unwrap();
        let fx = m
            .step(Input::InstallDone(Err("sha256 mismatch".into())), t0)
            .unwrap();
        assert_eq!(events(&fx), ["update-error"]);
        assert_eq!(fx.last(), Some(&Effect::PollIn(INTERVAL)));
        assert_eq!(m.state(), &State::Idle);
        assert_eq!(m.status().last_error.as_deref(), Some("sha256 mismatch"));

        let mut m = checking(t0);
        m.step(checked(Decision::Install(v("1.2.0"))), t0).unwrap();
        let fx = m.step(Input::InstallDone(Ok(None)), t0).unwrap();
        assert_eq!(fx, [Effect::PollIn(INTERVAL)]);
        assert_eq!(m.state(), &State::Idle);
    }

    #[test]
    fn a_permitted_reboot_reboots_into_the_new_version() {
        let t0 = Instant::now();
        let mut m = reboot_pending(t0);
        let fx = m.step(Input::RebootPermitted, t0).unwrap();
        assert_eq!(
            fx,
            [
                Effect::Emit(Event::Rebooting {
                    version: v("1.2.0"),
                    rollback: false
                }),
                Effect::Reboot,
            ]
        );
        assert_eq!(
            m.status().state,
            UpdateState::Rebooting {
                version: v("1.2.0")
            }
        );
        assert!(m.step(Input::RebootPermitted, t0).is_err());
    }

    #[test]
    fn a_blocked_reboot_is_asked_again_after_its_retry() {
        let t0 = Instant::now();
        let mut m = reboot_pending(t0);
        let fx = m.step(
            Input::RebootBlocked(Blocked {
                reason: "drain: pdb".into(),
                retry_after: Some(Duration::from_secs(60)),
                notice: Notice::RebootBlocked,
            }),
            t0,
        );
        assert_eq!(
            fx.unwrap(),
            [
                Effect::Emit(Event::RebootBlocked {
                    version: v("1.2.0"),
                    reason: "drain: pdb".into()
                }),
                Effect::WakeAt(t0 + Duration::from_secs(60)),
            ]
        );
        let t1 = t0 + Duration::from_secs(60);
        assert_eq!(
            m.step(Input::Tick, t1).unwrap(),
            [Effect::AskStrategy(v("1.2.0"))]
        );
        // A lock held elsewhere is normal: no event.
        let fx = m.step(
            Input::RebootBlocked(Blocked {
                reason: "409".into(),
                retry_after: Some(Duration::from_secs(5)),
                notice: Notice::Quiet,
            }),
            t1,
        );
        assert_eq!(fx.unwrap(), [Effect::WakeAt(t1 + Duration::from_secs(5))]);
        assert!(matches!(
            m.status().state,
            UpdateState::RebootPending { .. }
        ));
    }

    #[test]
    fn strategy_off_says_reboot_needed_once_and_waits_for_good() {
        let t0 = Instant::now();
        let mut m = reboot_pending(t0);
        let fx = m.step(
            Input::RebootBlocked(Blocked {
                reason: "strategy off".into(),
                retry_after: None,
                notice: Notice::RebootNeeded,
            }),
            t0,
        );
        assert_eq!(
            fx.unwrap(),
            [Effect::Emit(Event::RebootNeeded {
                version: v("1.2.0")
            })]
        );
        assert!(matches!(
            m.status().state,
            UpdateState::RebootPending { .. }
        ));
    }

    #[test]
    fn inputs_out_of_turn_are_errors_that_change_nothing() {
        let t0 = Instant::now();
        let mut m = machine(true);
        for input in [
            healthy(),
            Input::Blessed(Ok(())),
            Input::RolledBack(Ok(v("1.0.0"))),
            checked(Decision::UpToDate),
            Input::InstallDone(Ok(None)),
            Input::RebootPermitted,
        ] {
            let err = m.step(input, t0).unwrap_err();
            assert!(err.to_string().contains("state starting"), "{err}");
            assert_eq!(m.state(), &State::Starting);
        }
        let mut m = checking(t0);
        assert_eq!(
            m.step(healthy(), t0).unwrap_err(),
            MachineError::NotAllowed {
                state: "checking",
                input: "health"
            }
        );
        // A stale wake-up while checking changes nothing.
        assert_eq!(m.step(Input::Tick, t0).unwrap(), []);
        assert_eq!(m.state(), &State::Checking);
    }

    #[test]
    fn events_keep_their_console_names_and_fields() {
        let line = |e: Event| serde_json::to_value(e.to_console()).unwrap();
        let json = line(Event::Rebooting {
            version: v("1.0.0"),
            rollback: true,
        });
        assert_eq!(json["event"], "rebooting");
        assert_eq!(json["version"], "1.0.0");
        assert_eq!(json["reason"], "rollback");
        let json = line(Event::Rebooting {
            version: v("1.2.0"),
            rollback: false,
        });
        assert!(json.get("reason").is_none(), "{json}");
        let json = line(Event::RolledBack {
            from: v("1.1.0"),
            to: v("1.0.0"),
        });
        assert_eq!(json["event"], "rolled-back");
        assert_eq!(json["reason"], ROLLED_BACK_REASON);
        let json = line(Event::Committed {
            version: v("1.1.0"),
            slot: Slot::B,
        });
        assert_eq!(json["event"], "committed");
        assert_eq!(json["slot"], "b");
        let json = line(Event::TrialBoot {
            version: v("1.1.0"),
            deadline_s: 20,
        });
        assert_eq!(json["event"], "trial-boot");
        assert_eq!(json["deadline_s"], 20);
    }
}
