//! The last step of every shutdown: sync and `reboot(2)`. Only PID 1 (and
//! the initramfs `/init` before it) calls this; everyone else asks PID 1
//! (signals or the API). Also the panic hook that turns a panic of either
//! into a console event and a reboot.

use std::fmt;
use std::time::Duration;

use crate::console::{self, Event};
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

/// Makes any panic print `event` with the message and location on the
/// console, then reboot after `delay`. The release profile aborts on panic,
/// so this hook is the only code that runs after one: it reboots itself
/// rather than rely on `panic=` on the kernel command line (a PXE or
/// `-append` boot may lack it, and the node would hang) or on unwinding.
/// The reboot lets systemd-boot's boot counting fall back.
pub fn reboot_on_panic(event: fn(String) -> Event, delay: Duration) {
    install_panic_hook(event, move |_| {
        std::thread::sleep(delay);
        reboot_now(Action::Reboot)
    });
}

/// The hook behind [`reboot_on_panic`]; `then` gets the reason after the
/// event was printed.
fn install_panic_hook(event: fn(String) -> Event, then: impl Fn(&str) + Send + Sync + 'static) {
    std::panic::set_hook(Box::new(move |info| {
        let reason = format!("panic: {info}");
        eprintln!("ballast: {reason}");
        console::emit(&event(reason.clone()));
        then(&reason);
    }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn a_panic_reports_its_message_and_location_then_acts() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&seen);
        install_panic_hook(
            |reason| Event::BootFailed { reason },
            move |reason| {
                record.lock().unwrap().push(reason.to_owned());
            },
        );
        let caught = std::panic::catch_unwind(|| panic!("disk on fire"));
        let _ = std::panic::take_hook();
        assert!(caught.is_err());
        let seen = seen.lock().unwrap();
        let ours: Vec<_> = seen.iter().filter(|r| r.contains("disk on fire")).collect();
        assert_eq!(ours.len(), 1, "{seen:?}");
        assert!(ours[0].contains("power.rs"), "{}", ours[0]);
    }
}
