//! The last step of every shutdown: sync and `reboot(2)`. Only PID 1 calls
//! this; everyone else asks PID 1 (signals or the API).

use std::fmt;

use nix::sys::reboot::{reboot, RebootMode};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Reboot,
    Poweroff,
    Halt,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Reboot => "reboot",
            Action::Poweroff => "poweroff",
            Action::Halt => "halt",
        })
    }
}

/// Syncs and resets, powers off or halts the machine. Never returns: if the
/// kernel refuses, there is nothing left to do but wait.
pub fn reboot_now(action: Action) -> ! {
    nix::unistd::sync();
    let mode = match action {
        Action::Reboot => RebootMode::RB_AUTOBOOT,
        Action::Poweroff => RebootMode::RB_POWER_OFF,
        Action::Halt => RebootMode::RB_HALT_SYSTEM,
    };
    let err = reboot(mode);
    eprintln!("ballast: {action} failed: {err:?}");
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
