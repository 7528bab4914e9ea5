//! The VM scenarios `cargo xtask vm-test` runs against a built image:
//! `boot` (boot to ready, fields match the payload, a DHCP lease from
//! QEMU's user network without any network configuration), `reboot` (an
//! agent-initiated reboot through the HTTPS API, as the operator's admin,
//! comes back ready with a new boot id), `verity` (one flipped byte in
//! USR-A's data is refused by dm-verity and never booted), `runtime`
//! ([`crate::runtime`]), `k8s` ([`crate::k8s`]), `remote`
//! ([`crate::remote`]), `hostile-disks` ([`crate::hostile`]), `time-lab`
//! ([`crate::timelab`]), `metal` and `metal-sata` ([`crate::metal`]),
//! `bond` ([`crate::bond`]), and
//! `cloud-imds` and `cloud-config-drive` ([`crate::cloud`]). Each is a
//! plain function over a [`Context`]; the runner and reporting live in
//! xtask.

use std::path::PathBuf;
use std::time::Duration;

use ballast_updater::payload::Arch;

use crate::disk::{self, DiskError};
use crate::events::Event;
use crate::http::HttpError;
use crate::image::BuiltImage;
use crate::operator::{self, Operator};
use crate::vm::{Accel, Vm, VmBuilder, VmError};

/// Errors of a scenario. Check failures are [`VmError::Check`] so they
/// carry the console tail and keep the serial log.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("preparing a disk")]
    Disk(#[from] DiskError),
    #[error("talking to the agent's API")]
    Http(#[from] HttpError),
    #[error("creating a scratch directory")]
    Scratch(#[source] std::io::Error),
    #[error("{0}")]
    Setup(String),
}

/// What every scenario gets.
#[derive(Debug, Clone)]
pub struct Context {
    pub arch: Arch,
    pub image: BuiltImage,
    pub accel: Accel,
    /// Where serial logs of failed VMs are kept.
    pub log_dir: PathBuf,
    /// Keep serial logs of passing VMs too.
    pub keep_logs: bool,
    /// Longest wait for one boot to reach `ready` (firmware included).
    pub boot_timeout: Duration,
}

impl Context {
    /// A VM builder with the context's accelerator and log settings, the
    /// image's disk attached through an overlay.
    pub fn vm(&self, name: &str) -> VmBuilder {
        VmBuilder::new(name, self.arch)
            .accel(self.accel)
            .log_dir(&self.log_dir)
            .keep_log(self.keep_logs)
            .disk(&self.image.disk)
    }
}

/// One named scenario.
#[derive(Debug, Clone, Copy)]
pub struct Scenario {
    pub name: &'static str,
    pub about: &'static str,
    pub run: fn(&Context) -> Result<(), ScenarioError>,
    /// Where the default set (CI) runs it.
    pub tier: Tier,
}

/// How widely a scenario runs by default, so CI stays within its time
/// budget as scenarios are added: VM boots under TCG are the scarce
/// resource (2 cores), so only what can differ between architectures runs
/// on both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// Every submission, on both architectures: the boot chain, dm-verity,
    /// the A/B update path, the hardware watchdog and the metal flavour's
    /// drivers by hardware (NVMe, e1000e), whose firmware, loader, kernel
    /// and drivers differ per architecture.
    Core,
    /// Every submission, on x86_64 only: agent logic that is the same code
    /// on both architectures (runtime config, k8s profile, update failure
    /// modes, FleetLock). Runnable on aarch64 by name.
    Extended,
    /// Not in the default set: run by name or with `all`. Scenarios that
    /// need their own image flavour or a long setup wait here until the
    /// CI budget has room for them (README lists them).
    OnDemand,
}

impl Tier {
    /// Whether the default set on `arch` includes this tier.
    pub fn runs_by_default_on(self, arch: ballast_updater::payload::Arch) -> bool {
        match self {
            Tier::Core => true,
            Tier::Extended => arch == ballast_updater::payload::Arch::X86_64,
            Tier::OnDemand => false,
        }
    }
}

/// Every scenario, in the order `vm-test` runs them.
pub const ALL: &[Scenario] = &[
    Scenario {
        name: "boot",
        about: "UEFI boot to ready; version/arch/slot match the payload; DHCP lease 10.0.2.15/24 with no network config",
        run: boot,
        tier: Tier::Core,
    },
    Scenario {
        name: "reboot",
        about: "POST /v1/reboot over HTTPS as admin: shutdown event, then ready again with a new boot_id",
        run: reboot,
        tier: Tier::Extended,
    },
    Scenario {
        name: "verity",
        about: "one flipped byte in USR-A data: boot-failed from dm-verity, never ready",
        run: verity,
        tier: Tier::Core,
    },
    Scenario {
        name: "runtime",
        about: "CIDATA user-data (hostname, static address, TCP API, HTTP check): /readyz, /status, /metrics from the host",
        run: crate::runtime::runtime,
        tier: Tier::Extended,
    },
    Scenario {
        name: "k8s",
        about: "k8s-profile image: containerd supervised, a local OCI image imported with ctr, its container's console event, /status",
        run: crate::k8s::k8s,
        tier: Tier::Extended,
    },
    Scenario {
        name: "update-kubernetes",
        about: "strategy kubernetes against the test API server via guestfwd: Lease, cordon, eviction, reboot into 1.1.0, uncordon, release",
        run: crate::k8s_strategy::update_kubernetes,
        tier: Tier::Extended,
    },
    Scenario {
        name: "remote",
        about: "ballast pki + ballast --node: pinned status and logs, reader 403 on reboot, foreign CA refused, no plain HTTP, /healthz under 400 idle connections, admin reboot",
        run: crate::remote::remote,
        // The issue asks for it on both architectures (TLS and the client
        // run on each); the lead may re-tier it.
        tier: Tier::Core,
    },
    Scenario {
        name: "hostile-disks",
        about: "fw_cfg-provisioned node with five hostile partition tables attached reaches ready; a CIDATA volume attached later is ignored, reported by user-data-ignored and /status",
        run: crate::hostile::hostile_disks,
        tier: Tier::Extended,
    },
    Scenario {
        name: "time-lab",
        about: "network lab (netns, bridge, TAP, dnsmasq, chronyd -x): RTC in 2015, DHCP names the NTP server, time-synced steps the clock, ready",
        run: crate::timelab::time_lab,
        tier: Tier::Extended,
    },
    Scenario {
        name: "metal",
        about: "metal-flavour image from NVMe with an e1000e NIC and an i6300esb: nvme, e1000e and i6300esb loaded by modalias (drivers-loaded), ready, DHCP lease",
        run: crate::metal::metal,
        // Firmware (OVMF, AAVMF), kernel and drivers differ per arch.
        tier: Tier::Core,
    },
    Scenario {
        name: "metal-sata",
        about: "metal-flavour image from a SATA disk on AHCI with an igb NIC: ready, DHCP lease",
        run: crate::metal::metal_sata,
        // Issue 13 names this machine for x86_64: one more boot of the
        // image `metal` already built (about a minute under TCG).
        tier: Tier::Extended,
    },
    Scenario {
        name: "bond",
        about: "two NICs on their own user networks bonded by user-data (active-backup) with a VLAN on the bond: bond0 leases 10.0.2.15/24, bond0.42 gets its static address, eth0 none",
        run: crate::bond::bond,
        tier: Tier::Extended,
    },
    Scenario {
        name: "cloud-imds",
        about: "EC2-like VM (SMBIOS Amazon EC2, 169.254.0.0/16): IMDSv2 token PUT first, user-data applied, host name from local-hostname",
        run: crate::cloud::cloud_imds,
        tier: Tier::Extended,
    },
    Scenario {
        name: "cloud-config-drive",
        about: "an iso9660 config-2 volume: openstack/latest/user_data applied, host name from meta_data.json; a second, vfat, config-2 volume reported ignored",
        run: crate::cloud::cloud_config_drive,
        tier: Tier::Extended,
    },
];

pub fn find(name: &str) -> Option<&'static Scenario> {
    ALL.iter().find(|s| s.name == name)
}

/// Static address for QEMU's user network.
pub const STATIC_NETWORK: &str =
    "[network.interfaces.eth0]\naddresses = [\"10.0.2.15/24\"]\ngateway = \"10.0.2.2\"\n";

/// User-data of the reboot scenario: the operator's `[api]` section (all
/// addresses, its client CA), static address for QEMU's user network.
pub fn reboot_user_data(api_section: &str) -> String {
    format!("{api_section}{STATIC_NETWORK}")
}

/// Waits for `ready`, failing at once on `boot-failed`, then checks that
/// the event describes the image's USR-A version.
fn wait_ready(vm: &mut Vm, ctx: &Context) -> Result<Event, ScenarioError> {
    let ev = vm.wait_for_any(&["ready", "boot-failed"], ctx.boot_timeout)?;
    if ev.name == "boot-failed" {
        return Err(vm.fail(format!("boot failed: {}", ev.json())).into());
    }
    let meta = &ctx.image.meta;
    let version = meta.version.to_string();
    let expect = [
        ("version", version.as_str()),
        ("arch", meta.arch.as_str()),
        ("slot", "a"),
    ];
    for (key, want) in expect {
        if ev.str_field(key) != Some(want) {
            return Err(vm
                .fail(format!(
                    "ready event has {key} {:?}, expected {want:?}: {}",
                    ev.str_field(key),
                    ev.json()
                ))
                .into());
        }
    }
    if ev.str_field("boot_id").is_none_or(str::is_empty) || ev.ms().is_none() {
        return Err(vm
            .fail(format!("ready event lacks boot_id or ms: {}", ev.json()))
            .into());
    }
    vm.progress(&format!(
        "ready: {} ms since kernel start, {:.1} s since QEMU start",
        ev.ms().unwrap_or(0),
        ev.host_elapsed.unwrap_or_default().as_secs_f64()
    ));
    Ok(ev)
}

/// `boot`: the image boots through firmware and systemd-boot to `ready`.
pub fn boot(ctx: &Context) -> Result<(), ScenarioError> {
    let size = disk::file_size(&ctx.image.disk)?;
    // A disk larger than the image, as a cloud volume would be: STATE grows.
    let mut vm = ctx.vm("boot").disk_size(size + (1 << 30)).spawn()?;
    let ready = wait_ready(&mut vm, ctx)?;
    // The initrd's /init announces itself before anything else.
    let early = vm.events_seen().iter().find(|e| e.name == "early-boot");
    match early.and_then(Event::ms) {
        Some(ms) if Some(ms) <= ready.ms() => {}
        _ => {
            return Err(vm
                .fail(format!(
                    "expected an early-boot event with ms before ready's, saw {:?}",
                    early.map(Event::json)
                ))
                .into())
        }
    }
    check_disk_identity_renewed(&mut vm, 1)?;
    check_dhcp_lease(&mut vm)
}

/// Every node renews its disk's GUIDs on its first boot, before `ready`,
/// and never again: `boots_so_far` boots, one `disk-identity-renewed`.
fn check_disk_identity_renewed(vm: &mut Vm, boots_so_far: usize) -> Result<(), ScenarioError> {
    let renewed: Vec<Event> = vm
        .events_seen()
        .iter()
        .filter(|e| e.name == "disk-identity-renewed")
        .cloned()
        .collect();
    let parts = renewed.first().map(|e| e.json()).unwrap_or_default();
    let labels_ok = parts.contains(r#""partitions":["USR-A","USR-B","STATE"]"#);
    if renewed.len() != 1 || !labels_ok {
        return Err(vm
            .fail(format!(
                "expected one disk-identity-renewed event for USR-A, USR-B and STATE in {boots_so_far} boot(s), saw {}: {parts}",
                renewed.len()
            ))
            .into());
    }
    vm.progress(&format!("disk identity renewed once: {parts}"));
    Ok(())
}

/// With no network configuration the agent runs DHCP on the first NIC and
/// gets QEMU's user-network lease, 10.0.2.15/24. With `restrict=on` (as
/// every test VM runs) libslirp sends no router or DNS option, so the
/// event's gateway is null.
pub fn check_dhcp_lease(vm: &mut Vm) -> Result<(), ScenarioError> {
    let seen = vm
        .events_seen()
        .iter()
        .find(|e| e.name == "network-configured")
        .cloned();
    let ev = match seen {
        Some(ev) => ev,
        None => vm.wait_for_event("network-configured", Duration::from_secs(60))?,
    };
    let expect = [
        ("interface", "eth0"),
        ("source", "dhcp"),
        ("address", "10.0.2.15/24"),
    ];
    for (key, want) in expect {
        if ev.str_field(key) != Some(want) {
            return Err(vm
                .fail(format!(
                    "network-configured has {key} {:?}, expected {want:?}: {}",
                    ev.str_field(key),
                    ev.json()
                ))
                .into());
        }
    }
    vm.progress(&format!("DHCP lease: {}", ev.json()));
    Ok(())
}

/// `reboot`: the agent's API reboots the node and it comes back.
pub fn reboot(ctx: &Context) -> Result<(), ScenarioError> {
    let op = Operator::new()?;
    let mut vm = ctx
        .vm("reboot")
        .forward_api()
        .user_data(reboot_user_data(&op.api_user_data()?).as_bytes())
        .spawn()?;
    let port = vm
        .api_port()
        .ok_or_else(|| ScenarioError::Setup("no API port forwarded".into()))?;
    let first = wait_ready(&mut vm, ctx)?;
    let pin = operator::api_pin(&mut vm, 0)?;
    let admin = op.admin_tls(&pin)?;

    let t = Duration::from_secs(10);
    operator::wait_healthz(&mut vm, port, &pin)?;
    vm.progress("GET /healthz over TLS: 200");
    let status = admin.request(port, "GET", "/status", None, t)?;
    let json = serde_json::from_str::<serde_json::Value>(&status.body).ok();
    let Some(json) = json.filter(|_| status.status == 200) else {
        return Err(vm
            .fail(format!(
                "GET /status answered {} {:?}, expected 200 with JSON",
                status.status, status.body
            ))
            .into());
    };
    // The user-data above is valid: the agent must have applied it.
    if let Some(err) = json.get("config_error").filter(|e| !e.is_null()) {
        return Err(vm
            .fail(format!(
                "the agent did not apply the user-data: config_error {err}"
            ))
            .into());
    }
    vm.progress(&format!("GET /status: 200 {json}"));
    let r = admin.request(port, "POST", "/v1/reboot", Some(""), t)?;
    if r.status != 202 {
        return Err(vm
            .fail(format!(
                "POST /v1/reboot answered {} {:?}, expected 202",
                r.status, r.body
            ))
            .into());
    }
    vm.progress("POST /v1/reboot: 202");

    let down = vm.wait_for_event("shutdown", Duration::from_secs(60))?;
    if let Some(action) = down.str_field("action") {
        if action != "reboot" {
            return Err(vm
                .fail(format!(
                    "shutdown event has action {action:?}, expected \"reboot\""
                ))
                .into());
        }
    }
    let second = wait_ready(&mut vm, ctx)?;
    check_disk_identity_renewed(&mut vm, 2)?;
    if first.str_field("boot_id") == second.str_field("boot_id") {
        return Err(vm
            .fail(format!(
                "boot_id did not change across the reboot: {}",
                second.json()
            ))
            .into());
    }
    Ok(())
}

/// Words a dm-verity refusal's reason is expected to contain (lowercase).
const VERITY_WORDS: &[&str] = &["verity", "corrupt", "i/o", "input/output"];

/// `verity`: a flipped byte in USR-A's filesystem is refused.
pub fn verity(ctx: &Context) -> Result<(), ScenarioError> {
    let scratch = tempfile::Builder::new()
        .prefix("ballast-verity-")
        .tempdir()
        .map_err(ScenarioError::Scratch)?;
    let copy = scratch.path().join("disk.raw");
    disk::sparse_copy(&ctx.image.disk, &copy)?;
    let v = &ctx.image.meta.verity;
    let data_bytes = v.data_blocks * u64::from(v.data_block_size);
    // A byte inside a block in the middle of the verified filesystem.
    let rel = (v.data_blocks / 2) * u64::from(v.data_block_size) + 1234;
    if rel >= data_bytes || rel >= ctx.image.usr_a.size() {
        return Err(ScenarioError::Setup(format!(
            "USR-A is too small to corrupt: {} data blocks, partition {} bytes",
            v.data_blocks,
            ctx.image.usr_a.size()
        )));
    }
    let offset = ctx.image.usr_a.offset() + rel;
    let (old, new) = disk::flip_byte(&copy, offset)?;
    eprintln!(
        "  [verity {}] flipped byte at disk offset {offset} (USR-A + {rel}, data block {}): {old:#04x} -> {new:#04x}",
        ctx.arch,
        rel / u64::from(v.data_block_size)
    );

    let mut vm = VmBuilder::new("verity", ctx.arch)
        .accel(ctx.accel)
        .log_dir(&ctx.log_dir)
        .keep_log(ctx.keep_logs)
        .disk(&copy)
        .spawn()?;
    let ev = vm.wait_for_any(&["boot-failed", "ready"], ctx.boot_timeout)?;
    if ev.name == "ready" {
        return Err(vm
            .fail(format!("a corrupted USR-A booted to ready: {}", ev.json()))
            .into());
    }
    let reason = ev.str_field("reason").unwrap_or("").to_lowercase();
    if !VERITY_WORDS.iter().any(|w| reason.contains(w)) {
        return Err(vm
            .fail(format!(
                "boot-failed reason does not name verity/corruption/I/O: {}",
                ev.json()
            ))
            .into());
    }
    // The agent reboots after 10 s and would fail again; stop here.
    vm.kill();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenario_names_are_unique_and_found() {
        for s in ALL {
            assert_eq!(find(s.name).map(|f| f.name), Some(s.name));
        }
        assert!(find("nope").is_none());
    }

    #[test]
    fn reboot_user_data_is_the_documented_toml() {
        let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----";
        let text = reboot_user_data(&operator::api_section(pem));
        let v: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(v["api"]["listen"].as_str(), Some("0.0.0.0:9465"));
        assert!(v["api"]["client_ca"].as_str().unwrap().contains("MIIB"));
        assert_eq!(
            v["network"]["interfaces"]["eth0"]["gateway"].as_str(),
            Some("10.0.2.2")
        );
        assert!(find("remote").is_some());
    }
}
