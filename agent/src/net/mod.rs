//! The node's network: owns `[network]` at run time. Loopback comes up,
//! then every managed interface gets its static addresses, routes and name
//! servers, a DHCPv4 client where enabled, and IPv6 autoconfiguration from
//! router advertisements. Link events (rtnetlink RTNLGRP_LINK) drive it:
//! a carrier loss pauses DHCP, its return re-applies static settings and
//! asks for the lease again. `/etc/resolv.conf` is rendered from all
//! sources by [`resolv`].
//!
//! Managed interfaces are the ones `[network.interfaces]` names; with none
//! named, the first physical Ethernet link, with DHCP and RA.

pub mod dhcp;
pub mod imds;
pub mod ipv6;
pub mod lease;
pub mod link;
pub mod metadata;
pub mod netdev;
pub mod resolv;
pub mod sntp;
pub mod timesync;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use futures_util::{StreamExt, TryStreamExt};
use netlink_packet_core::NetlinkPayload;
use netlink_packet_route::address::{AddressAttribute, CacheInfo};
use netlink_packet_route::route::RouteProtocol;
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::AsyncSocket;
use tokio::sync::{mpsc, watch};

use crate::config::{parse_cidr, InterfaceConfig, NetworkConfig};
use crate::console::{self, AddressSource, Event};
use lease::{Action, Client, Destination, Lease};
use link::{LinkChange, LinkInfo, LinkTracker};
use resolv::{Entry, Resolv, Source};

const DHCP_SERVER_PORT: u16 = 67;
const DHCP_CLIENT_PORT: u16 = 68;
/// Netlink multicast group bit for link changes (RTMGRP_LINK).
const RTMGRP_LINK: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("opening a netlink socket")]
    Socket(#[source] std::io::Error),
    #[error("subscribing to link events")]
    Subscribe(#[source] std::io::Error),
    #[error("interface {name}: {what}")]
    Netlink {
        name: String,
        what: &'static str,
        #[source]
        source: Box<rtnetlink::Error>,
    },
    #[error("interface {name}: opening the DHCP socket")]
    DhcpSocket {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("interface {name}: writing {path}")]
    Sysctl {
        name: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// What interface tasks tell the manager.
#[derive(Debug)]
enum Update {
    Dns {
        source: Source,
        interface: String,
        entry: Entry,
    },
    Hostname(String),
    /// NTP servers from an interface's DHCP lease (empty: none, or gone).
    Ntp {
        interface: String,
        servers: Vec<Ipv4Addr>,
    },
    /// The node's name from instance metadata: DHCP no longer renames it.
    NodeName(String),
    Configured,
}

/// Lets PID 1 wait for the first configured address.
#[derive(Debug, Clone)]
pub struct NetworkHandle {
    online: watch::Receiver<bool>,
    ntp: watch::Receiver<Vec<Ipv4Addr>>,
    updates: mpsc::Sender<Update>,
}

impl NetworkHandle {
    /// Waits until some managed interface has an address, at most
    /// `timeout`; returns whether one has.
    pub async fn wait_online(&mut self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, self.online.wait_for(|up| *up))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// NTP servers from every current DHCP lease (option 42), in
    /// interface-name order, without duplicates.
    pub fn ntp_servers(&self) -> watch::Receiver<Vec<Ipv4Addr>> {
        self.ntp.clone()
    }

    /// Tells the manager the node's name came from instance metadata (set
    /// by PID 1 after the first lease), so a DHCP host name no longer
    /// replaces it.
    pub async fn keep_hostname(&self, name: String) {
        let _ = self.updates.send(Update::NodeName(name)).await;
    }
}

/// The host name to take from a DHCP lease: none when the node has a
/// configured (or metadata) name, which DHCP never overrides, or when the
/// offered one is not a valid RFC 1123 name (warned).
pub fn dhcp_hostname(configured: Option<&str>, offered: &str) -> Option<String> {
    if configured.is_some() {
        return None;
    }
    let name = resolv::dns_name(offered);
    if name.is_none() {
        tracing::warn!(hostname = ?offered, "DHCP host name is not a valid RFC 1123 name; ignored");
    }
    name
}

/// Whether router advertisements on `interface` may feed resolv.conf: only
/// on a managed interface with `ipv6 = "ra"` (the default). Others (a
/// second NIC, a CNI bridge where a pod can send RAs) are ignored.
pub fn ra_counts(managed: &BTreeMap<String, InterfaceConfig>, interface: &str) -> bool {
    managed
        .get(interface)
        .is_some_and(|c| c.ipv6_mode() == crate::config::Ipv6Mode::Ra)
}

/// Starts managing the network. `hostname` is the configured host name:
/// sent to DHCP servers, and when set a server's host name is not taken.
pub async fn start(
    config: &NetworkConfig,
    hostname: Option<String>,
) -> Result<NetworkHandle, NetError> {
    let (mut connection, handle, messages) =
        rtnetlink::new_connection().map_err(NetError::Socket)?;
    // Subscribing before the dump below means no change is missed.
    connection
        .socket_mut()
        .socket_mut()
        .bind(&netlink_sys::SocketAddr::new(0, RTMGRP_LINK))
        .map_err(NetError::Subscribe)?;
    tokio::spawn(connection);

    let links: Vec<LinkInfo> = handle
        .link()
        .get()
        .execute()
        .map_ok(|m| LinkInfo::from_message(&m))
        .try_collect::<Vec<_>>()
        .await
        .map_err(|source| NetError::Netlink {
            name: "*".into(),
            what: "listing links",
            source: Box::new(source),
        })?
        .into_iter()
        .flatten()
        .collect();
    let netdevs = netdev::Netdevs {
        bonds: config.bonds.clone(),
        vlans: config.vlans.clone(),
    };
    // Bonds exist before their members are looked at below; a failure
    // leaves the other links managed as configured.
    let existing: BTreeMap<String, u32> = links.iter().map(|l| (l.name.clone(), l.index)).collect();
    if let Err(e) = netdevs
        .create_bonds(
            &handle,
            &crate::boot::modules::running_kernel_dir(),
            &existing,
        )
        .await
    {
        tracing::error!(error = %crate::error_chain(&e), "bonds and VLANs not set up");
    }
    if let Some(lo) = links.iter().find(|l| l.name == "lo") {
        handle
            .link()
            .set(lo.index)
            .up()
            .execute()
            .await
            .map_err(|source| NetError::Netlink {
                name: "lo".into(),
                what: "bringing up",
                source: Box::new(source),
            })?;
    }

    let (online_tx, online) = watch::channel(false);
    let (ntp_tx, ntp) = watch::channel(Vec::new());
    let (updates_tx, updates) = mpsc::channel(32);
    let mut manager = Manager {
        interfaces: config.interfaces.clone(),
        auto: config.interfaces.is_empty(),
        netdevs,
        hostname,
        handle,
        tracker: LinkTracker::default(),
        running: BTreeMap::new(),
        updates_tx,
        resolv: Resolv::default(),
        coalesce: resolv::Coalesce::default(),
        online: online_tx,
        ntp_by_interface: BTreeMap::new(),
        ntp: ntp_tx,
    };
    for l in links {
        if let Some(change) = manager.tracker.update(l) {
            manager.dispatch(change).await;
        }
    }
    if manager.auto && manager.interfaces.is_empty() {
        tracing::info!("no physical Ethernet link yet; waiting for one");
    }
    ipv6::spawn_rdnss_listener(manager.updates_tx.clone());
    let handle = NetworkHandle {
        online,
        ntp,
        updates: manager.updates_tx.clone(),
    };
    tokio::spawn(manager.run(messages, updates));
    Ok(handle)
}

struct Manager {
    interfaces: BTreeMap<String, InterfaceConfig>,
    /// No interfaces were configured: the first physical Ethernet link is
    /// taken (and then recorded in `interfaces`).
    auto: bool,
    /// Bonds and VLANs: members are enslaved, VLANs made, as links appear.
    netdevs: netdev::Netdevs,
    hostname: Option<String>,
    handle: rtnetlink::Handle,
    tracker: LinkTracker,
    running: BTreeMap<String, mpsc::Sender<LinkChange>>,
    updates_tx: mpsc::Sender<Update>,
    resolv: Resolv,
    /// resolv.conf is rewritten at most once a second.
    coalesce: resolv::Coalesce,
    online: watch::Sender<bool>,
    ntp_by_interface: BTreeMap<String, Vec<Ipv4Addr>>,
    ntp: watch::Sender<Vec<Ipv4Addr>>,
}

type LinkMessage = (
    netlink_packet_core::NetlinkMessage<RouteNetlinkMessage>,
    netlink_sys::SocketAddr,
);

impl Manager {
    async fn run(
        mut self,
        mut messages: impl futures_util::Stream<Item = LinkMessage> + Unpin,
        mut updates: mpsc::Receiver<Update>,
    ) {
        loop {
            tokio::select! {
                Some((msg, _)) = messages.next() => {
                    let change = match msg.payload {
                        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(m)) => {
                            LinkInfo::from_message(&m).and_then(|l| self.tracker.update(l))
                        }
                        NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(m)) => {
                            self.tracker.remove(m.header.index)
                        }
                        _ => None,
                    };
                    if let Some(change) = change {
                        self.dispatch(change).await;
                    }
                }
                Some(update) = updates.recv() => self.apply_update(update),
                _ = sleep_until(self.coalesce.due()) => {
                    if self.coalesce.flush(Instant::now()) {
                        self.write_resolv();
                    }
                }
                else => return,
            }
        }
    }

    /// Routes a link change to the interface's task, starting one for a
    /// managed link that appeared.
    async fn dispatch(&mut self, change: LinkChange) {
        tracing::debug!(?change, "link change");
        match change {
            LinkChange::Appeared(mut info) => {
                let mut joined = Vec::new();
                for action in netdev::on_appeared(&self.netdevs, &info.name) {
                    match self.netdevs.apply(&self.handle, &action, info.index).await {
                        Ok(()) => {
                            if let netdev::Action::Enslave { bond, .. } = action {
                                joined.push(bond);
                            }
                        }
                        Err(e) => {
                            tracing::error!(?action, error = %crate::error_chain(&e), "bond or VLAN not set up")
                        }
                    }
                }
                // A bond takes its first member's MAC address: a bond whose
                // task started with the old one starts over with the new.
                for bond in joined {
                    if self.running.contains_key(&bond) {
                        if let Some(fresh) = self.link_info_by_name(&bond).await {
                            self.start_interface(fresh);
                        }
                    }
                }
                if self.netdevs.is_member(&info.name) {
                    return;
                }
                if self.netdevs.bonds.contains_key(&info.name) {
                    // The message may predate the members joining.
                    if let Some(fresh) = self.link_info_by_name(&info.name).await {
                        info = fresh;
                    }
                }
                if self.auto && self.interfaces.is_empty() {
                    if let Some(l) = link::default_link([&info]) {
                        tracing::info!(interface = %l.name, "no interfaces configured: using DHCP and RA on the first Ethernet link");
                        self.interfaces
                            .insert(l.name.clone(), InterfaceConfig::default());
                    }
                }
                self.start_interface(info);
            }
            LinkChange::Removed(name) => {
                self.running.remove(&name);
            }
            LinkChange::CarrierLost(ref name) | LinkChange::CarrierBack(ref name) => {
                if let Some(tx) = self.running.get(name) {
                    let _ = tx.send(change.clone()).await;
                }
            }
        }
    }

    /// Starts (or restarts) the task of a managed link; others are left.
    fn start_interface(&mut self, info: LinkInfo) {
        let Some(config) = self.interfaces.get(&info.name).cloned() else {
            return;
        };
        let (tx, rx) = mpsc::channel(8);
        // A restarted link (renamed, re-created, a bond with a new MAC)
        // gets a fresh task; dropping the old sender ends the old one.
        self.running.insert(info.name.clone(), tx);
        let task = Interface {
            name: info.name.clone(),
            index: info.index,
            mac: info.mac,
            carrier: info.carrier,
            config,
            hostname: self.hostname.clone(),
            handle: self.handle.clone(),
            updates: self.updates_tx.clone(),
            applied: None,
        };
        tokio::spawn(task.run(rx));
    }

    /// The link named `name` as the kernel describes it now.
    async fn link_info_by_name(&self, name: &str) -> Option<LinkInfo> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        match links.try_next().await {
            Ok(Some(m)) => LinkInfo::from_message(&m),
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(link = %name, error = %e, "link not found");
                None
            }
        }
    }

    fn write_resolv(&self) {
        let text = self.resolv.render();
        match resolv::write(Path::new(resolv::RESOLV_CONF), &text) {
            Ok(()) => tracing::info!(path = resolv::RESOLV_CONF, "name servers updated"),
            Err(e) => tracing::warn!(error = %e, "resolv.conf not written"),
        }
    }

    fn apply_update(&mut self, update: Update) {
        match update {
            Update::Dns {
                source,
                interface,
                entry,
            } => {
                if source == Source::Ra && !ra_counts(&self.interfaces, &interface) {
                    tracing::debug!(%interface, "RA name servers from an interface not managed with ipv6 = ra; ignored");
                    return;
                }
                if self.resolv.set(source, &interface, entry)
                    && self.coalesce.changed(Instant::now())
                {
                    self.write_resolv();
                }
            }
            Update::Hostname(offered) => {
                let Some(name) = dhcp_hostname(self.hostname.as_deref(), &offered) else {
                    return;
                };
                match nix::unistd::sethostname(&name) {
                    Ok(()) => {
                        tracing::info!(hostname = %name, "host name from DHCP");
                        let _ = std::fs::write("/etc/hostname", format!("{name}\n"));
                    }
                    Err(e) => tracing::warn!(error = %e, "hostname from DHCP not set"),
                }
            }
            Update::Ntp { interface, servers } => {
                if servers.is_empty() {
                    self.ntp_by_interface.remove(&interface);
                } else {
                    self.ntp_by_interface.insert(interface, servers);
                }
                let mut all: Vec<Ipv4Addr> = Vec::new();
                for s in self.ntp_by_interface.values().flatten() {
                    if !all.contains(s) {
                        all.push(*s);
                    }
                }
                self.ntp.send_if_modified(|current| {
                    let changed = *current != all;
                    *current = all;
                    changed
                });
            }
            Update::NodeName(name) => self.hostname = Some(name),
            Update::Configured => {
                self.online.send_replace(true);
            }
        }
    }
}

/// One managed interface: its static settings and its DHCP client.
struct Interface {
    name: String,
    index: u32,
    mac: Option<[u8; 6]>,
    /// Carrier when the link was found.
    carrier: bool,
    config: InterfaceConfig,
    hostname: Option<String>,
    handle: rtnetlink::Handle,
    updates: mpsc::Sender<Update>,
    /// The lease whose address is in place, so renewals are quiet.
    applied: Option<Lease>,
}

impl Interface {
    async fn run(mut self, mut link: mpsc::Receiver<LinkChange>) {
        if let Err(e) = ipv6::configure(&self.name, self.config.ipv6_mode()) {
            tracing::warn!(error = %crate::error_chain(&e), "IPv6 autoconfiguration not set");
        }
        if let Err(e) = self.link_up().await {
            tracing::error!(error = %crate::error_chain(&e), "interface not brought up");
        }
        // Without carrier, settings wait for it (see link::Carrier).
        if self.carrier {
            self.apply_static().await;
        }
        let mut dhcp = match (self.config.dhcp_enabled(), self.mac) {
            (false, _) => None,
            (true, None) => {
                tracing::warn!(interface = %self.name, "no hardware address: no DHCP");
                None
            }
            (true, Some(mac)) => match dhcp_socket(&self.name) {
                Ok(socket) => {
                    let mut seed = [0u8; 4];
                    let _ = getrandom::getrandom(&mut seed);
                    let client = Client::new(mac, self.hostname.clone(), u32::from_ne_bytes(seed));
                    Some((client, socket))
                }
                Err(e) => {
                    tracing::error!(error = %crate::error_chain(&e), "DHCP not started");
                    None
                }
            },
        };
        if let Some((client, socket)) = &mut dhcp {
            if self.carrier {
                let actions = client.start(Instant::now());
                self.act(socket, actions).await;
            } else {
                client.link_down();
            }
        }
        let mut buf = vec![0u8; 1500];
        let mut carrier = link::Carrier::new(self.carrier);
        loop {
            let deadline = dhcp.as_ref().and_then(|(c, _)| c.deadline());
            tokio::select! {
                change = link.recv() => {
                    let Some(change) = change else { return };
                    match carrier.on(&change) {
                        Some(link::CarrierAction::Pause) => {
                            tracing::info!(interface = %self.name, "carrier lost");
                            console::emit(&Event::NetworkLost {
                                interface: self.name.clone(),
                                reason: "carrier lost".into(),
                                address: None,
                            });
                            if let Some((client, _)) = &mut dhcp {
                                client.link_down();
                            }
                        }
                        Some(link::CarrierAction::Resume) => {
                            tracing::info!(interface = %self.name, "carrier back");
                            self.apply_static().await;
                            if let Some((client, socket)) = &mut dhcp {
                                let actions = client.link_up(Instant::now());
                                self.act(socket, actions).await;
                            }
                        }
                        None => {}
                    }
                }
                received = recv(dhcp.as_ref().map(|(_, s)| s), &mut buf) => {
                    let Some((client, socket)) = &mut dhcp else { continue };
                    let Ok(len) = received else { continue };
                    let actions = match dhcp::Message::decode(&buf[..len])
                        .and_then(|m| client.on_message(Instant::now(), &m))
                    {
                        Ok(actions) => {
                            tracing::debug!(interface = %self.name, state = client.state_name(), "DHCP message");
                            actions
                        }
                        Err(e @ dhcp::DhcpError::Refused { .. }) => {
                            tracing::warn!(interface = %self.name, error = %e, "DHCP message ignored");
                            continue;
                        }
                        Err(e) => {
                            tracing::debug!(interface = %self.name, error = %e, "DHCP message ignored");
                            continue;
                        }
                    };
                    self.act(socket, actions).await;
                }
                _ = sleep_until(deadline) => {
                    if let Some((client, socket)) = &mut dhcp {
                        let actions = client.on_timeout(Instant::now());
                        self.act(socket, actions).await;
                    }
                }
            }
        }
    }

    async fn link_up(&self) -> Result<(), NetError> {
        self.handle
            .link()
            .set(self.index)
            .up()
            .execute()
            .await
            .map_err(|source| NetError::Netlink {
                name: self.name.clone(),
                what: "bringing up",
                source: Box::new(source),
            })
    }

    /// Puts the static addresses and gateway in place; idempotent, so it
    /// also runs when the carrier comes back.
    async fn apply_static(&self) {
        let name = &self.name;
        for a in &self.config.addresses {
            let Some(cidr) = parse_cidr(a) else { continue };
            let added = self
                .handle
                .address()
                .add(self.index, cidr.addr, cidr.prefix)
                .replace()
                .execute()
                .await;
            match added {
                Ok(()) => {
                    console::emit(&Event::NetworkConfigured {
                        interface: name.clone(),
                        address: a.clone(),
                        source: AddressSource::Static,
                        gateway: self.config.gateway.map(|g| g.to_string()),
                        lease_s: None,
                        mtu: None,
                        routes: Vec::new(),
                    });
                    let _ = self.updates.send(Update::Configured).await;
                }
                Err(e) => {
                    tracing::error!(interface = %name, address = %a, error = %e, "static address not added")
                }
            }
        }
        let route = match self.config.gateway {
            Some(IpAddr::V4(gw)) => {
                self.handle
                    .route()
                    .add()
                    .v4()
                    .gateway(gw)
                    .output_interface(self.index)
                    .replace()
                    .execute()
                    .await
            }
            Some(IpAddr::V6(gw)) => {
                self.handle
                    .route()
                    .add()
                    .v6()
                    .gateway(gw)
                    .output_interface(self.index)
                    .replace()
                    .execute()
                    .await
            }
            None => Ok(()),
        };
        if let Err(e) = route {
            tracing::error!(interface = %name, error = %e, "default route not added");
        }
        let entry = Entry {
            servers: self.config.dns.clone(),
            domains: Vec::new(),
        };
        let _ = self
            .updates
            .send(Update::Dns {
                source: Source::Static,
                interface: name.clone(),
                entry,
            })
            .await;
    }

    async fn act(&mut self, socket: &tokio::net::UdpSocket, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Send(msg, to) => {
                    let dest = match to {
                        Destination::Broadcast => Ipv4Addr::BROADCAST,
                        Destination::Server(ip) => ip,
                    };
                    let sent = match msg.encode() {
                        Ok(bytes) => socket
                            .send_to(&bytes, SocketAddr::from((dest, DHCP_SERVER_PORT)))
                            .await
                            .map(|_| ()),
                        Err(e) => Err(std::io::Error::other(e)),
                    };
                    // A link without carrier refuses sends; the client's
                    // retransmission timer tries again.
                    if let Err(e) = sent {
                        tracing::debug!(interface = %self.name, error = %e, "DHCP message not sent");
                    }
                }
                Action::Apply(lease) => self.apply_lease(lease).await,
                Action::Drop(lease) => self.drop_lease(lease).await,
            }
        }
    }

    async fn apply_lease(&mut self, lease: Lease) {
        let name = self.name.clone();
        let secs = u32::try_from(lease.remaining(Instant::now()).as_secs()).unwrap_or(u32::MAX);
        let mut req = self
            .handle
            .address()
            .add(self.index, IpAddr::V4(lease.address), lease.prefix)
            .replace();
        if !lease.infinite() {
            // The kernel removes the address itself if we ever stop renewing.
            let mut lifetime = CacheInfo::default();
            lifetime.ifa_preferred = secs;
            lifetime.ifa_valid = secs;
            req.message_mut()
                .attributes
                .push(AddressAttribute::CacheInfo(lifetime));
        }
        if let Err(e) = req.execute().await {
            tracing::error!(interface = %name, address = %lease.address, error = %e, "DHCP address not added");
            return;
        }
        let mtu = match lease.mtu {
            Some(mtu) => match self
                .handle
                .link()
                .set(self.index)
                .mtu(u32::from(mtu))
                .execute()
                .await
            {
                Ok(()) => Some(mtu),
                Err(e) => {
                    tracing::error!(interface = %name, mtu, error = %e, "DHCP MTU not set");
                    None
                }
            },
            None => None,
        };
        if let Some(router) = lease.router {
            if let Err(e) = self.default_route(router, lease.address).await {
                tracing::error!(interface = %name, %router, error = %e, "DHCP default route not added");
            }
        }
        let mut routes = Vec::new();
        for route in &lease.routes {
            match self.static_route(route, lease.address).await {
                Ok(()) => routes.push(route.to_string()),
                Err(e) => {
                    tracing::error!(interface = %name, %route, error = %e, "DHCP classless route not added")
                }
            }
        }
        let mut servers: Vec<IpAddr> = lease.dns.iter().copied().map(IpAddr::V4).collect();
        servers.dedup();
        let _ = self
            .updates
            .send(Update::Dns {
                source: Source::Dhcp,
                interface: name.clone(),
                entry: Entry {
                    servers,
                    domains: lease
                        .domain
                        .iter()
                        .filter_map(|d| resolv::dns_name(d))
                        .collect(),
                },
            })
            .await;
        if let Some(h) = &lease.hostname {
            let _ = self.updates.send(Update::Hostname(h.clone())).await;
        }
        let _ = self
            .updates
            .send(Update::Ntp {
                interface: name.clone(),
                servers: lease.ntp.clone(),
            })
            .await;
        let _ = self.updates.send(Update::Configured).await;
        let fresh = self
            .applied
            .as_ref()
            .is_none_or(|old| old.address != lease.address || old.prefix != lease.prefix);
        if fresh {
            let address = format!("{}/{}", lease.address, lease.prefix);
            tracing::info!(interface = %name, %address, lease = ?lease.lease_time, "DHCP lease bound");
            console::emit(&Event::NetworkConfigured {
                interface: name,
                address,
                source: AddressSource::Dhcp,
                gateway: lease.router.map(|g| g.to_string()),
                lease_s: Some(lease.lease_time.as_secs()),
                mtu,
                routes,
            });
        } else {
            tracing::debug!(interface = %name, address = %lease.address, "DHCP lease renewed");
        }
        self.applied = Some(lease);
    }

    /// One option-121 route: through its router, or on-link when the
    /// router is 0.0.0.0; sourced from the lease address.
    async fn static_route(
        &self,
        route: &dhcp::StaticRoute,
        source: Ipv4Addr,
    ) -> Result<(), rtnetlink::Error> {
        let req = self
            .handle
            .route()
            .add()
            .v4()
            .destination_prefix(route.destination, route.prefix)
            .output_interface(self.index)
            .pref_source(source)
            .protocol(RouteProtocol::Dhcp)
            .replace();
        if route.router.is_unspecified() {
            req.scope(netlink_packet_route::route::RouteScope::Link)
                .execute()
                .await
        } else {
            req.gateway(route.router).execute().await
        }
    }

    /// Default route through `router`, sourced from the lease address so it
    /// goes away with it. A router outside the leased subnet (a /32 lease)
    /// gets an on-link host route first.
    async fn default_route(
        &self,
        router: Ipv4Addr,
        source: Ipv4Addr,
    ) -> Result<(), rtnetlink::Error> {
        let add = || {
            self.handle
                .route()
                .add()
                .v4()
                .gateway(router)
                .output_interface(self.index)
                .pref_source(source)
                .protocol(RouteProtocol::Dhcp)
                .replace()
                .execute()
        };
        match add().await {
            // ENETUNREACH: the router is not on a connected subnet.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -101 => {
                self.handle
                    .route()
                    .add()
                    .v4()
                    .destination_prefix(router, 32)
                    .output_interface(self.index)
                    .pref_source(source)
                    .scope(netlink_packet_route::route::RouteScope::Link)
                    .protocol(RouteProtocol::Dhcp)
                    .replace()
                    .execute()
                    .await?;
                add().await
            }
            other => other,
        }
    }

    async fn drop_lease(&mut self, lease: Lease) {
        let name = self.name.clone();
        tracing::info!(interface = %name, address = %lease.address, "DHCP lease ended");
        let found: Result<Vec<_>, _> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(self.index)
            .set_address_filter(IpAddr::V4(lease.address))
            .set_prefix_length_filter(lease.prefix)
            .execute()
            .try_collect()
            .await;
        for msg in found.unwrap_or_default() {
            if let Err(e) = self.handle.address().del(msg).execute().await {
                tracing::warn!(interface = %name, error = %e, "expired DHCP address not removed");
            }
        }
        self.applied = None;
        console::emit(&Event::NetworkLost {
            interface: name.clone(),
            reason: "DHCP lease ended".into(),
            address: Some(lease.address.to_string()),
        });
        let _ = self
            .updates
            .send(Update::Ntp {
                interface: name.clone(),
                servers: Vec::new(),
            })
            .await;
        let _ = self
            .updates
            .send(Update::Dns {
                source: Source::Dhcp,
                interface: name,
                entry: Entry::default(),
            })
            .await;
    }
}

/// UDP port 68 on one interface, able to broadcast before the interface
/// has an address: SO_BINDTODEVICE picks the interface, SO_BROADCAST lets
/// the DISCOVER out, and the client asks servers to broadcast replies.
fn dhcp_socket(name: &str) -> Result<tokio::net::UdpSocket, NetError> {
    use nix::sys::socket::{
        bind, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn,
    };
    let err = |source: std::io::Error| NetError::DhcpSocket {
        name: name.to_owned(),
        source,
    };
    let errno = |e: nix::errno::Errno| err(std::io::Error::from(e));
    let fd = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(errno)?;
    setsockopt(&fd, sockopt::BindToDevice, &std::ffi::OsString::from(name)).map_err(errno)?;
    setsockopt(&fd, sockopt::Broadcast, &true).map_err(errno)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(errno)?;
    bind(
        fd.as_raw_fd(),
        &SockaddrIn::new(0, 0, 0, 0, DHCP_CLIENT_PORT),
    )
    .map_err(errno)?;
    tokio::net::UdpSocket::from_std(std::net::UdpSocket::from(fd)).map_err(err)
}

async fn recv(socket: Option<&tokio::net::UdpSocket>, buf: &mut [u8]) -> std::io::Result<usize> {
    match socket {
        Some(s) => s.recv(buf).await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dhcp_host_name_never_overrides_a_configured_one_and_must_be_valid() {
        assert_eq!(dhcp_hostname(None, "Node-7"), Some("node-7".into()));
        assert_eq!(dhcp_hostname(Some("mine"), "node-7"), None);
        for bad in ["Node_1", "a b", &"x".repeat(64), "-x", "evil\nx"] {
            assert_eq!(dhcp_hostname(None, bad), None, "{bad:?}");
        }
    }

    #[test]
    fn router_advertisements_count_only_on_managed_ra_interfaces() {
        let config: NetworkConfig = toml::from_str(
            "[interfaces.eth0]\n[interfaces.eth1]\nipv6 = \"off\"\n[interfaces.eth2]\nipv6 = \"ra\"\n",
        )
        .unwrap();
        let i = &config.interfaces;
        assert!(ra_counts(i, "eth0"));
        assert!(!ra_counts(i, "eth1"));
        assert!(ra_counts(i, "eth2"));
        assert!(!ra_counts(i, "cni0"));
        assert!(!ra_counts(i, "if7"));
    }
}
