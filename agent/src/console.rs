//! Lifecycle events on the serial console: one line per event,
//! `BALLAST-EVENT {json}`, so VM tests and users' tooling find them among
//! kernel messages. [`Event`] is the whole contract: the agent prints it and
//! qemu-tests parses it back; docs/console-events.md lists the same events
//! (checked by a test below).

use std::io::Write;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Every event line starts with this.
pub const EVENT_PREFIX: &str = "BALLAST-EVENT ";

/// One lifecycle event. The JSON object has `event` (the variant's kebab
/// name), `ms` (added by [`render`]) and the variant's fields. Field names
/// and types are a public contract: change them only by adding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    /// The initramfs `/init` started and mounted `/proc`, `/sys`, `/dev`.
    EarlyBoot,
    /// Early boot (or PID 1's runtime) cannot continue; the node reboots.
    BootFailed { reason: String },
    /// User-data was malformed; defaults (or the last good config) stay.
    ConfigError { reason: String },
    /// A user-data source was present but not accepted (config::user_data).
    UserDataIgnored {
        source: String,
        /// The block device; `null` for a source that is not one.
        device: Option<String>,
        reason: String,
    },
    /// First boot gave the boot disk and its USR-A, USR-B and STATE
    /// partitions fresh random GUIDs (boot::disk_identity).
    DiskIdentityRenewed {
        /// The block device, `/dev/vda`.
        disk: String,
        /// The renewed partitions' labels.
        partitions: Vec<String>,
    },
    /// PID 1 in the slot finished its setup and serves the API.
    Ready {
        version: String,
        arch: String,
        slot: String,
        boot_id: String,
        /// So a console reader knows which node it is looking at.
        hostname: String,
    },
    /// An address was put on an interface.
    NetworkConfigured {
        interface: String,
        address: String,
        source: AddressSource,
        /// Printed as `null` when there is none.
        gateway: Option<String>,
        /// DHCP only: the lease time in seconds.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lease_s: Option<u64>,
        /// DHCP only: the interface MTU applied from option 26.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mtu: Option<u16>,
        /// DHCP only: routes applied from option 121 besides the default
        /// one (`10.78.0.0/16 via 10.77.0.1`).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        routes: Vec<String>,
    },
    /// An interface lost its carrier, or its DHCP lease ended.
    NetworkLost {
        interface: String,
        reason: String,
        /// The lease's address, when a lease ended.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        address: Option<String>,
    },
    /// Coldplug loaded the drivers the machine's devices need, by modalias
    /// (`initrd` for the boot disk's, `runtime` for NICs and watchdogs).
    DriversLoaded {
        stage: String,
        /// Devices (distinct modaliases) looked at.
        devices: u64,
        /// Modules loaded, in load order.
        modules: Vec<String>,
        /// Modules that failed to load (the reason is in the log).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        failed: Vec<String>,
        /// How long the walk and the loads took.
        took_ms: u64,
    },
    /// The SNTP client corrected the clock: its first sync, and every step.
    TimeSynced { server: String, offset_ms: i64 },
    /// The clock stayed before the image's build date, unsynchronised, for
    /// the whole bounded wait: `purpose` (an update check) goes ahead
    /// anyway. Printed once a boot.
    ClockUnsynced { purpose: String, waited_s: u64 },
    /// PID 1 begins an orderly shutdown (`reboot`, `poweroff` or `halt`).
    Shutdown { action: String },
    /// The agent hit a bug; the node reboots.
    Panic { reason: String },
    /// Test images only: a fail point is armed.
    FailpointArmed { name: String, actions: String },
    /// The API listens on `addr`; clients pin the certificate by its hash.
    ApiListening { addr: String, cert_sha256: String },
    /// One API request was answered.
    ApiRequest {
        who: String,
        method: String,
        path: String,
        status: u16,
        /// Refusals left off the console (rate limit) since the last one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        suppressed: Option<u64>,
    },
    /// The TCP API cannot be served (bad CA, certificate or key, or the
    /// address is taken); the Unix socket still is.
    ApiError { reason: String },
    /// A signed release applies to this node.
    UpdateFound { version: String, running: String },
    /// The install advanced.
    InstallProgress {
        version: String,
        artifact: String,
        percent: u64,
    },
    /// The boot entry was renamed into place (the commit point).
    Installed {
        version: String,
        slot: String,
        entry: String,
    },
    /// A check or install failed; nothing was changed.
    UpdateError { reason: String },
    /// Strategy `off`: installed, waiting for someone to reboot.
    RebootNeeded { version: String },
    /// Strategy `kubernetes`: the reboot may not happen yet.
    RebootBlocked { version: String, reason: String },
    /// The agent reboots into `version`; `reason` is `rollback` going back.
    Rebooting {
        version: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// A trial boot opened the hardware watchdog.
    WatchdogArmed { device: String },
    /// A new version booted on a counted entry and runs its health gate.
    TrialBoot { version: String, deadline_s: u64 },
    /// The gate passed: the entry was blessed.
    Committed { version: String, slot: String },
    /// The gate failed or its deadline passed.
    TrialFailed { version: String, reason: String },
    /// The previous version runs again after a failed trial.
    RolledBack {
        from: String,
        to: String,
        reason: String,
    },
    /// The running version is below the release floor kept on the node
    /// (a fall-back the boot loader made to stay up).
    BelowFloor { version: String, floor: String },
    /// How long each phase of one boot stage took ([`PhaseClock`]): the
    /// initramfs just before `switch_root`, PID 1 in the slot just before
    /// `ready`.
    BootPhases {
        /// `initramfs` or `init`.
        stage: String,
        /// `ms` (since the kernel started) when the stage began.
        start_ms: u64,
        /// The phases in the order they ran.
        phases: Vec<PhaseTime>,
    },
}

/// One phase of a `boot-phases` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseTime {
    pub phase: String,
    pub took_ms: u64,
}

/// Times the phases of a boot stage from `CLOCK_BOOTTIME` (one vDSO read
/// per phase, no syscall on the hot path) and prints them as one
/// `boot-phases` event at the end, so the stage's timing costs one
/// console line.
#[derive(Debug)]
pub struct PhaseClock {
    stage: &'static str,
    start_ms: u64,
    last_ms: u64,
    phases: Vec<PhaseTime>,
}

impl PhaseClock {
    /// Starts timing `stage` now.
    pub fn start(stage: &'static str) -> Self {
        let now = ms_since_boot();
        PhaseClock {
            stage,
            start_ms: now,
            last_ms: now,
            phases: Vec::with_capacity(12),
        }
    }

    /// Ends the phase `phase` now; the next one starts.
    pub fn mark(&mut self, phase: &str) {
        self.mark_at(phase, ms_since_boot());
    }

    fn mark_at(&mut self, phase: &str, now: u64) {
        self.phases.push(PhaseTime {
            phase: phase.to_owned(),
            took_ms: now.saturating_sub(self.last_ms),
        });
        self.last_ms = now;
    }

    /// The `boot-phases` event for the phases marked so far.
    pub fn event(&self) -> Event {
        Event::BootPhases {
            stage: self.stage.to_owned(),
            start_ms: self.start_ms,
            phases: self.phases.clone(),
        }
    }
}

/// Where a `network-configured` address came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AddressSource {
    Static,
    Dhcp,
}

impl Event {
    /// The kebab-case names of all events, in declaration order: the
    /// `event` values a consumer can meet.
    pub const NAMES: &'static [&'static str] = &[
        "early-boot",
        "boot-failed",
        "config-error",
        "user-data-ignored",
        "disk-identity-renewed",
        "ready",
        "network-configured",
        "network-lost",
        "drivers-loaded",
        "time-synced",
        "clock-unsynced",
        "shutdown",
        "panic",
        "failpoint-armed",
        "api-listening",
        "api-request",
        "api-error",
        "update-found",
        "install-progress",
        "installed",
        "update-error",
        "reboot-needed",
        "reboot-blocked",
        "rebooting",
        "watchdog-armed",
        "trial-boot",
        "committed",
        "trial-failed",
        "rolled-back",
        "below-floor",
        "boot-phases",
    ];

    /// The `event` value of this event (one of [`Event::NAMES`]).
    pub fn name(&self) -> &'static str {
        match self {
            Event::EarlyBoot => "early-boot",
            Event::BootFailed { .. } => "boot-failed",
            Event::ConfigError { .. } => "config-error",
            Event::UserDataIgnored { .. } => "user-data-ignored",
            Event::DiskIdentityRenewed { .. } => "disk-identity-renewed",
            Event::Ready { .. } => "ready",
            Event::NetworkConfigured { .. } => "network-configured",
            Event::NetworkLost { .. } => "network-lost",
            Event::DriversLoaded { .. } => "drivers-loaded",
            Event::TimeSynced { .. } => "time-synced",
            Event::ClockUnsynced { .. } => "clock-unsynced",
            Event::Shutdown { .. } => "shutdown",
            Event::Panic { .. } => "panic",
            Event::FailpointArmed { .. } => "failpoint-armed",
            Event::ApiListening { .. } => "api-listening",
            Event::ApiRequest { .. } => "api-request",
            Event::ApiError { .. } => "api-error",
            Event::UpdateFound { .. } => "update-found",
            Event::InstallProgress { .. } => "install-progress",
            Event::Installed { .. } => "installed",
            Event::UpdateError { .. } => "update-error",
            Event::RebootNeeded { .. } => "reboot-needed",
            Event::RebootBlocked { .. } => "reboot-blocked",
            Event::Rebooting { .. } => "rebooting",
            Event::WatchdogArmed { .. } => "watchdog-armed",
            Event::TrialBoot { .. } => "trial-boot",
            Event::Committed { .. } => "committed",
            Event::TrialFailed { .. } => "trial-failed",
            Event::RolledBack { .. } => "rolled-back",
            Event::BelowFloor { .. } => "below-floor",
            Event::BootPhases { .. } => "boot-phases",
        }
    }
}

/// Milliseconds since the kernel started (CLOCK_BOOTTIME includes suspend,
/// which a booting node never does, and starts with the kernel).
pub fn ms_since_boot() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| {
            // A clock before the epoch of boot cannot happen; 0 if it did.
            let secs = u64::try_from(t.tv_sec()).unwrap_or(0);
            let nanos = u64::try_from(t.tv_nsec()).unwrap_or(0);
            secs * 1000 + nanos / 1_000_000
        })
        .unwrap_or(0)
}

/// Renders one event line (without the newline). The keys come out
/// sorted (serde_json's map), as they always have.
pub fn render(event: &Event, ms: u64) -> String {
    let mut map = match serde_json::to_value(event) {
        Ok(Value::Object(map)) => map,
        // Cannot happen for this enum (strings and numbers only); keep the
        // name rather than lose the line.
        _ => {
            let mut map = Map::new();
            map.insert("event".into(), Value::from(event.name()));
            map
        }
    };
    map.insert("ms".into(), Value::from(ms));
    format!("{EVENT_PREFIX}{}", Value::Object(map))
}

/// Prints an event on the console. Best effort: a console that cannot be
/// written must never stop a boot.
pub fn emit(event: &Event) {
    tracing::info!(event = event.name(), "console event");
    write_line(&render(event, ms_since_boot()));
}

/// Transitional: the untyped form, for the call sites in `update/` and
/// `api/` until they move to [`Event`]. Prints exactly what [`emit`] would.
pub fn emit_raw(event: &str, fields: &[(&str, Value)]) {
    let mut map = Map::new();
    map.insert("event".into(), Value::from(event));
    map.insert("ms".into(), Value::from(ms_since_boot()));
    for (k, v) in fields {
        map.insert((*k).to_owned(), v.clone());
    }
    tracing::info!(event, "console event");
    write_line(&format!("{EVENT_PREFIX}{}", Value::Object(map)));
}

fn write_line(line: &str) {
    // /dev/console reaches the kernel console (serial) even when stdout was
    // redirected; fall back to stdout off a node (tests, CLI).
    let written = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/console")
        .and_then(|mut c| writeln!(c, "{line}"));
    if written.is_err() {
        println!("{line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One of every event; the match in `name` keeps this honest: a new
    /// variant must get a name, and `every_variant_is_named_once` needs it
    /// here.
    fn samples() -> Vec<Event> {
        let s = |t: &str| t.to_owned();
        vec![
            Event::EarlyBoot,
            Event::BootFailed { reason: s("r") },
            Event::ConfigError { reason: s("r") },
            Event::UserDataIgnored {
                source: s("cidata"),
                device: Some(s("/dev/vdb")),
                reason: s("r"),
            },
            Event::DiskIdentityRenewed {
                disk: s("/dev/vda"),
                partitions: vec![s("USR-A"), s("USR-B"), s("STATE")],
            },
            Event::Ready {
                version: s("1.0.0"),
                arch: s("x86_64"),
                slot: s("a"),
                boot_id: s("b"),
                hostname: s("node-1"),
            },
            Event::NetworkConfigured {
                interface: s("eth0"),
                address: s("10.0.2.15/24"),
                source: AddressSource::Dhcp,
                gateway: None,
                lease_s: Some(86400),
                mtu: Some(1400),
                routes: vec![s("10.78.0.0/16 via 10.0.2.2")],
            },
            Event::NetworkLost {
                interface: s("eth0"),
                reason: s("carrier lost"),
                address: None,
            },
            Event::DriversLoaded {
                stage: s("runtime"),
                devices: 12,
                modules: vec![s("e1000e"), s("i6300esb")],
                failed: vec![],
                took_ms: 140,
            },
            Event::TimeSynced {
                server: s("10.0.2.2"),
                offset_ms: 1234,
            },
            Event::ClockUnsynced {
                purpose: s("update-check"),
                waited_s: 90,
            },
            Event::Shutdown {
                action: s("reboot"),
            },
            Event::Panic { reason: s("r") },
            Event::FailpointArmed {
                name: s("n"),
                actions: s("pause"),
            },
            Event::ApiListening {
                addr: s("0.0.0.0:8443"),
                cert_sha256: s("ab"),
            },
            Event::ApiRequest {
                who: s("admin"),
                method: s("GET"),
                path: s("/status"),
                status: 200,
                suppressed: None,
            },
            Event::ApiError { reason: s("r") },
            Event::UpdateFound {
                version: s("1.1.0"),
                running: s("1.0.0"),
            },
            Event::InstallProgress {
                version: s("1.1.0"),
                artifact: s("usr"),
                percent: 25,
            },
            Event::Installed {
                version: s("1.1.0"),
                slot: s("b"),
                entry: s("e.conf"),
            },
            Event::UpdateError { reason: s("r") },
            Event::RebootNeeded {
                version: s("1.1.0"),
            },
            Event::RebootBlocked {
                version: s("1.1.0"),
                reason: s("r"),
            },
            Event::Rebooting {
                version: s("1.1.0"),
                reason: Some(s("rollback")),
            },
            Event::WatchdogArmed {
                device: s("/dev/watchdog"),
            },
            Event::TrialBoot {
                version: s("1.1.0"),
                deadline_s: 300,
            },
            Event::Committed {
                version: s("1.1.0"),
                slot: s("b"),
            },
            Event::TrialFailed {
                version: s("1.1.0"),
                reason: s("r"),
            },
            Event::RolledBack {
                from: s("1.1.0"),
                to: s("1.0.0"),
                reason: s("r"),
            },
            Event::BelowFloor {
                version: s("1.0.0"),
                floor: s("1.1.0"),
            },
            Event::BootPhases {
                stage: s("initramfs"),
                start_ms: 900,
                phases: vec![PhaseTime {
                    phase: s("modules"),
                    took_ms: 12,
                }],
            },
        ]
    }

    #[test]
    fn a_phase_clock_times_each_phase_from_the_last_mark() {
        let mut clock = PhaseClock {
            stage: "init",
            start_ms: 100,
            last_ms: 100,
            phases: Vec::new(),
        };
        clock.mark_at("mounts", 130);
        clock.mark_at("network", 1130);
        // A clock that went backwards (cannot happen) gives 0, not a wrap.
        clock.mark_at("api", 1000);
        let line = render(&clock.event(), 1000);
        assert_eq!(
            line.strip_prefix(EVENT_PREFIX).unwrap(),
            r#"{"event":"boot-phases","ms":1000,"phases":[{"phase":"mounts","took_ms":30},{"phase":"network","took_ms":1000},{"phase":"api","took_ms":0}],"stage":"init","start_ms":100}"#
        );
    }

    #[test]
    fn event_lines_are_prefixed_single_line_json() {
        let line = render(
            &Event::BootFailed {
                reason: "a\nb".into(),
            },
            42,
        );
        assert!(!line.contains('\n'));
        let json = line.strip_prefix(EVENT_PREFIX).unwrap();
        let v: Value = serde_json::from_str(json).unwrap();
        assert_eq!(v["event"], "boot-failed");
        assert_eq!(v["reason"], "a\nb");
        assert_eq!(v["ms"], 42);
    }

    #[test]
    fn lines_keep_the_bytes_of_the_untyped_form() {
        // The exact lines the agent printed before the enum (sorted keys,
        // `null` gateway, optional fields left out).
        let cases = [
            (
                Event::Ready {
                    version: "1.0.0".into(),
                    arch: "x86_64".into(),
                    slot: "a".into(),
                    boot_id: "b1".into(),
                    hostname: "node-1".into(),
                },
                r#"{"arch":"x86_64","boot_id":"b1","event":"ready","hostname":"node-1","ms":7,"slot":"a","version":"1.0.0"}"#,
            ),
            (
                Event::NetworkConfigured {
                    interface: "eth0".into(),
                    address: "10.0.2.16/24".into(),
                    source: AddressSource::Static,
                    gateway: None,
                    lease_s: None,
                    mtu: None,
                    routes: Vec::new(),
                },
                r#"{"address":"10.0.2.16/24","event":"network-configured","gateway":null,"interface":"eth0","ms":7,"source":"static"}"#,
            ),
            (Event::EarlyBoot, r#"{"event":"early-boot","ms":7}"#),
            (
                Event::Rebooting {
                    version: "1.1.0".into(),
                    reason: None,
                },
                r#"{"event":"rebooting","ms":7,"version":"1.1.0"}"#,
            ),
        ];
        for (event, json) in cases {
            assert_eq!(render(&event, 7), format!("{EVENT_PREFIX}{json}"));
        }
    }

    #[test]
    fn every_event_round_trips_with_its_name() {
        for event in samples() {
            let line = render(&event, 1);
            let json = line.strip_prefix(EVENT_PREFIX).unwrap();
            let v: Value = serde_json::from_str(json).unwrap();
            assert_eq!(v["event"], event.name(), "{line}");
            // `ms` is not part of the enum; consumers ignore unknown keys.
            let back: Event = serde_json::from_str(json).unwrap();
            assert_eq!(back, event);
        }
    }

    #[test]
    fn every_variant_is_named_once() {
        let names: Vec<&str> = samples().iter().map(Event::name).collect();
        assert_eq!(names, Event::NAMES, "samples and NAMES disagree");
        // serde's own variant list (from its unknown-variant error) is the
        // source of truth for what parses.
        let err = serde_json::from_str::<Event>(r#"{"event":"no-such-event"}"#)
            .unwrap_err()
            .to_string();
        let listed: Vec<&str> = err.split('`').skip(3).step_by(2).collect();
        assert_eq!(listed, Event::NAMES, "{err}");
    }

    #[test]
    fn the_doc_lists_exactly_the_events() {
        let doc = include_str!("../../docs/console-events.md");
        // First cell of every table row: | `name` | ...
        let mut documented: Vec<&str> = doc
            .lines()
            .filter_map(|l| l.strip_prefix("| `"))
            .filter_map(|l| l.split_once('`').map(|(name, _)| name))
            .collect();
        documented.sort_unstable();
        let mut names = Event::NAMES.to_vec();
        names.sort_unstable();
        assert_eq!(
            documented, names,
            "docs/console-events.md's tables must list exactly console::Event's variants"
        );
    }
}
