//! The `time-lab` scenario: one boot in the [`crate::netlab`] network lab
//! with the guest's RTC started in 2015. DHCP from dnsmasq gives the
//! address and names the lab's chronyd as NTP server (option 42); the
//! node's SNTP client steps the clock by more than ten years
//! (`time-synced`) and the node reaches `ready`. The same lease carries
//! option 121 (a route to [`netlab::ROUTED_NET`] and the default route,
//! so option 3 is ignored) and option 26 (MTU [`netlab::MTU`]): the
//! `network-configured` event shows both applied.

use std::time::Duration;

use crate::netlab::{self, NetLab};
use crate::scenarios::{Context, ScenarioError};
use crate::vm::TapNet;

/// Where the guest's clock starts.
pub const RTC_BASE: &str = "2015-06-01T00:00:00";
/// The least the clock must have moved: ten years (the RTC starts in 2015,
/// the lab's server has this machine's time, 2026 or later).
const MIN_OFFSET_MS: i64 = 10 * 365 * 86_400 * 1000;

pub fn time_lab(ctx: &Context) -> Result<(), ScenarioError> {
    let lab = NetLab::start().map_err(|e| ScenarioError::Setup(format!("{e}")))?;
    let mut vm = ctx
        .vm("time-lab")
        .tap(TapNet {
            netns: lab.netns().to_owned(),
            ifname: netlab::TAP.to_owned(),
            mac: netlab::GUEST_MAC.to_owned(),
        })
        .rtc_base(RTC_BASE)
        .spawn()?;

    let mut seen_configured = None;
    let mut seen_synced = None;
    let mut seen_ready = false;
    let deadline = std::time::Instant::now() + ctx.boot_timeout + Duration::from_secs(60);
    while seen_configured.is_none() || seen_synced.is_none() || !seen_ready {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let ev = vm.wait_for_any(
            &["network-configured", "time-synced", "ready", "boot-failed"],
            left,
        )?;
        match ev.name.as_str() {
            "boot-failed" => return Err(vm.fail(format!("boot failed: {}", ev.json())).into()),
            "network-configured" => seen_configured = Some(ev),
            "time-synced" => seen_synced = Some(ev),
            _ => seen_ready = true,
        }
    }
    let (Some(configured), Some(synced)) = (seen_configured, seen_synced) else {
        return Err(vm.fail("events missing").into());
    };

    let address = configured
        .str_field("address")
        .unwrap_or_default()
        .to_owned();
    let in_range = address
        .strip_suffix(&format!("/{}", netlab::PREFIX))
        .and_then(|a| a.parse::<std::net::Ipv4Addr>().ok())
        .is_some_and(|a| (netlab::DHCP_FIRST..=netlab::DHCP_LAST).contains(&a));
    if configured.str_field("source") != Some("dhcp") || !in_range {
        return Err(vm
            .fail(format!(
                "network-configured is not a lab DHCP lease in {}..{}: {}",
                netlab::DHCP_FIRST,
                netlab::DHCP_LAST,
                configured.json()
            ))
            .into());
    }
    if configured.str_field("gateway") != Some(&netlab::SERVER.to_string()) {
        return Err(vm
            .fail(format!(
                "network-configured gateway is not the lab router {}: {}",
                netlab::SERVER,
                configured.json()
            ))
            .into());
    }
    let want_route = format!("{} via {}", netlab::ROUTED_NET, netlab::SERVER);
    let mtu = configured
        .fields
        .get("mtu")
        .and_then(serde_json::Value::as_u64);
    let routes: Vec<&str> = configured
        .fields
        .get("routes")
        .and_then(serde_json::Value::as_array)
        .map(|a| a.iter().filter_map(serde_json::Value::as_str).collect())
        .unwrap_or_default();
    if mtu != Some(u64::from(netlab::MTU)) || routes != [want_route.as_str()] {
        return Err(vm
            .fail(format!(
                "network-configured should show MTU {} (option 26) and the route {want_route} (option 121): {}",
                netlab::MTU,
                configured.json()
            ))
            .into());
    }
    let server = netlab::SERVER.to_string();
    let offset_ms = synced
        .fields
        .get("offset_ms")
        .and_then(serde_json::Value::as_i64)
        .unwrap_or(0);
    if synced.str_field("server") != Some(server.as_str()) || offset_ms < MIN_OFFSET_MS {
        return Err(vm
            .fail(format!(
                "time-synced should name {server} (from DHCP option 42) with an offset over ten years: {}",
                synced.json()
            ))
            .into());
    }
    let log = lab.dnsmasq_log();
    if !log.contains(&format!(
        "DHCPACK(br0) {}",
        address.split('/').next().unwrap_or("")
    )) {
        return Err(vm
            .fail(format!("dnsmasq did not log the lease {address}: {log}"))
            .into());
    }
    vm.progress(&format!(
        "lease {address} via {} (MTU {}, route {want_route}), clock stepped {:.1} years from {server}",
        netlab::SERVER,
        netlab::MTU,
        offset_ms as f64 / (365.25 * 86_400_000.0)
    ));
    vm.kill();
    drop(lab);
    Ok(())
}
