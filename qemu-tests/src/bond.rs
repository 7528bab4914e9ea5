//! The `bond` scenario: one boot with two NICs, each on a QEMU user network
//! of its own, bonded by user-data (`[network.bonds.bond0]`,
//! active-backup, eth0 primary) with a VLAN on the bond. The bond's DHCP
//! lease (through eth0's user network) proves the members were enslaved and
//! the bond carries traffic; the VLAN's static address proves the 802.1Q
//! link was made on the bond. QEMU's user network drops tagged frames, so
//! the VLAN carries no traffic here.

use crate::scenarios::{Context, ScenarioError};
use crate::vm::Vm;

/// The scenario's user-data.
pub const USER_DATA: &str = r#"[network.bonds.bond0]
mode = "active-backup"
interfaces = ["eth0", "eth1"]
primary = "eth0"
miimon_ms = 100

[network.vlans."bond0.42"]
link = "bond0"
id = 42

[network.interfaces.bond0]

[network.interfaces."bond0.42"]
addresses = ["192.168.42.5/24"]
ipv6 = "off"
"#;

pub fn bond(ctx: &Context) -> Result<(), ScenarioError> {
    let mut vm = ctx
        .vm("bond")
        .second_nic()
        .user_data(USER_DATA.as_bytes())
        .spawn()?;
    let ev = vm.wait_for_any(&["ready", "boot-failed", "config-error"], ctx.boot_timeout)?;
    if ev.name != "ready" {
        return Err(vm.fail(format!("expected ready, got {}", ev.json())).into());
    }
    expect_configured(&mut vm, "bond0", "dhcp", "10.0.2.15/24")?;
    expect_configured(&mut vm, "bond0.42", "static", "192.168.42.5/24")?;
    if let Some(e) = vm
        .events_seen()
        .iter()
        .find(|e| e.name == "network-configured" && e.str_field("interface") == Some("eth0"))
    {
        return Err(vm
            .fail(format!(
                "the bond member eth0 got an address of its own: {}",
                e.json()
            ))
            .into());
    }
    vm.progress(
        "bond0 (eth0 + eth1, active-backup) leased 10.0.2.15/24; VLAN bond0.42 has 192.168.42.5/24",
    );
    Ok(())
}

/// A `network-configured` for `interface` with `source` and `address`,
/// seen already or within a minute.
fn expect_configured(
    vm: &mut Vm,
    interface: &str,
    source: &str,
    address: &str,
) -> Result<(), ScenarioError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let found = vm.events_seen().iter().find(|e| {
            e.name == "network-configured" && e.str_field("interface") == Some(interface)
        });
        if let Some(e) = found {
            if e.str_field("source") == Some(source) && e.str_field("address") == Some(address) {
                return Ok(());
            }
            let json = e.json();
            return Err(vm
                .fail(format!(
                    "network-configured for {interface} should be {source} {address}: {json}"
                ))
                .into());
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(vm
                .fail(format!("no network-configured for {interface}"))
                .into());
        }
        vm.wait_for_event("network-configured", left)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_user_data_is_a_valid_configuration() {
        let config =
            ballast::config::Config::parse(USER_DATA, std::path::Path::new("bond.toml")).unwrap();
        assert_eq!(config.network.bonds["bond0"].interfaces, ["eth0", "eth1"]);
        assert_eq!(config.network.vlans["bond0.42"].id, 42);
    }
}
