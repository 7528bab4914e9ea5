//! The automatic-update VM scenarios (issue 5): a node boots 1.0.0 from
//! the test image and updates itself from a signed repository the test
//! serves on 127.0.0.1 ([`server`]), reached through guestfwd at
//! `10.0.2.100:80`; the FleetLock scenario adds a lock server
//! ([`fleetlock`]) at `10.0.2.101:80`. Keys, release payloads and
//! repositories come from [`fixture`]; the scenario bodies are in
//! [`scenarios`]. This module owns the list `vm-test` runs and which of
//! them run by default on each architecture.

pub mod delta;
pub mod fixture;
pub mod fleetlock;
pub mod scenarios;
pub mod server;

use ballast_updater::payload::Arch;

use crate::scenarios::{Scenario, ScenarioError, Tier};
use crate::{disk::DiskError, http::HttpError, vm::VmError};

/// Errors of the update scenarios.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("talking to the agent's API")]
    Http(#[from] HttpError),
    #[error("preparing keys, releases or the repository")]
    Fixture(#[from] fixture::FixtureError),
    #[error("the repository server")]
    Server(#[from] server::ServerError),
    #[error("the FleetLock server")]
    FleetLock(#[from] fleetlock::FleetLockError),
    #[error("preparing a disk")]
    Disk(#[from] DiskError),
    #[error("creating a scratch directory")]
    Scratch(#[source] std::io::Error),
    #[error("a VM thread of the FleetLock scenario panicked")]
    Thread,
    #[error("the operator's CA and admin identity: {0}")]
    Operator(String),
    #[error("the delta scenario's releases or repository: {0}")]
    Delta(String),
}

impl From<UpdateError> for ScenarioError {
    fn from(e: UpdateError) -> Self {
        match e {
            UpdateError::Vm(e) => ScenarioError::Vm(e),
            UpdateError::Http(e) => ScenarioError::Http(e),
            UpdateError::Disk(e) => ScenarioError::Disk(e),
            other => ScenarioError::Setup(error_chain(&other)),
        }
    }
}

/// `a: b: c` from an error and its sources.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}

/// Name that selects every update scenario on the command line.
pub const GROUP_ALL: &str = "update-all";

/// The update scenarios, in the order `vm-test` runs them.
pub const UPDATE: &[Scenario] = &[
    Scenario {
        name: "update",
        about: "1.0.0 finds 1.1.0: installed, rebooted, committed on slot b; then 1.2.0 back to slot a",
        run: scenarios::update,
        tier: Tier::Core,
    },
    Scenario {
        name: "update-unhealthy",
        about: "1.1.0's health check answers 503: trial-failed, back on 1.0.0, rolled-back reported, no retry",
        run: scenarios::unhealthy,
        tier: Tier::Extended,
    },
    Scenario {
        name: "update-never-boots",
        about: "1.1.0 with a wrong verity root hash: boot-failed on each try, systemd-boot falls back, rolled-back",
        run: scenarios::never_boots,
        tier: Tier::Extended,
    },
    Scenario {
        name: "update-power-cut",
        about: "QEMU killed at a random moment of the install (BALLAST_TEST_SEED replays), restarted: 1.0.0 ready, then committed 1.1.0",
        run: scenarios::power_cut,
        tier: Tier::Extended,
    },
    Scenario {
        name: "update-tampered",
        about: "one byte of usr.img flipped by the server: update-error on the hash, nothing installed, ESP entries unchanged",
        run: scenarios::tampered,
        tier: Tier::Extended,
    },
    Scenario {
        name: "update-fleetlock",
        about: "two nodes with strategy fleetlock share one lock slot: reboot windows never overlap, both committed",
        run: scenarios::fleetlock,
        tier: Tier::Extended,
    },
    Scenario {
        name: "update-watchdog",
        about: "1.1.0 (metal flavour: i6300esb by modalias; a fail point) hangs in its trial: the watchdog resets each try, the counter runs out, 1.0.0 reports rolled-back",
        run: scenarios::hung_trial,
        tier: Tier::Core,
    },
    Scenario {
        name: "update-delta",
        about: "1.0.0 to a 1.1.0 whose only change is the agent, from a chunked repository: the server's log shows only chunks 1.0.0 lacks were fetched (ranges of the objects), 1.1.0 committed",
        run: delta::delta,
        tier: Tier::Extended,
    },
];

/// Whether an update scenario runs by default (no names given) on `arch`:
/// its [`Tier`](crate::scenarios::Tier) decides. `update` and
/// `update-watchdog` are core (both arches); the failure modes and
/// FleetLock run on x86_64, being the same agent code on both.
pub fn runs_by_default(name: &str, arch: Arch) -> bool {
    find(name).is_some_and(|s| s.tier.runs_by_default_on(arch))
}

pub fn find(name: &str) -> Option<&'static Scenario> {
    UPDATE.iter().find(|s| s.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_do_not_clash_with_the_base_scenarios() {
        for s in UPDATE {
            assert_eq!(find(s.name).map(|f| f.name), Some(s.name));
            assert!(crate::scenarios::find(s.name).is_none(), "{}", s.name);
            assert!(runs_by_default(s.name, Arch::X86_64));
        }
        assert!(find(GROUP_ALL).is_none());
        assert!(!runs_by_default("update-fleetlock", Arch::Aarch64));
        assert!(runs_by_default("update-watchdog", Arch::Aarch64));
        assert!(runs_by_default("update", Arch::Aarch64));
    }
}
