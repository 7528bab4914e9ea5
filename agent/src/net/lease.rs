//! The DHCPv4 client state machine (RFC 2131 §4.4), without I/O: it is fed
//! received messages, timeouts and link changes with the current time, and
//! answers with [`Action`]s (send this, apply that lease, drop that one).
//! Time is injected, so renewal, rebinding and expiry are tested without
//! waiting.
//!
//! INIT → SELECTING (DISCOVER) → REQUESTING (REQUEST) → BOUND; at T1
//! RENEWING (unicast REQUEST to the server), at T2 REBINDING (broadcast),
//! at expiry back to INIT. After a carrier loss the client keeps its lease
//! and asks for it again (INIT-REBOOT); with no answer it goes on using it
//! until it expires, as RFC 2131 §3.2 allows.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use super::dhcp::{
    code, mask_prefix, DhcpError, Message, MessageType, StaticRoute, FLAG_BROADCAST, OP_REPLY,
};

/// Options asked for in every request.
/// Option 121 comes before option 3, as RFC 3442 asks.
const PARAMETERS: [u8; 12] = [
    code::SUBNET_MASK,
    code::CLASSLESS_ROUTES,
    code::ROUTER,
    code::INTERFACE_MTU,
    code::DNS,
    code::NTP_SERVERS,
    code::HOSTNAME,
    code::DOMAIN_NAME,
    code::LEASE_TIME,
    code::SERVER_ID,
    code::RENEWAL_TIME,
    code::REBINDING_TIME,
];
/// Longest wait between retransmissions in INIT/SELECTING.
const MAX_BACKOFF: Duration = Duration::from_secs(64);
/// Shortest wait between retransmissions while renewing or rebinding.
const MIN_RENEW_RETRY: Duration = Duration::from_secs(60);
/// REQUESTs sent for an offer (or at INIT-REBOOT) before giving up on it.
const REQUEST_TRIES: u32 = 4;
/// A lease without a lease-time option is taken as this long... and
/// "infinite" (0xffffffff) too: the address then never expires by itself.
const INFINITE: Duration = Duration::from_secs(u32::MAX as u64);

/// An address lease and what came with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    /// NTP servers (option 42).
    pub ntp: Vec<Ipv4Addr>,
    /// Routes other than the default one from option 121.
    pub routes: Vec<StaticRoute>,
    /// Option 26.
    pub mtu: Option<u16>,
    pub domain: Option<String>,
    pub hostname: Option<String>,
    pub server: Ipv4Addr,
    /// When the REQUEST that got this lease was sent (RFC 2131 §4.4.1:
    /// times count from then).
    pub acquired: Instant,
    pub lease_time: Duration,
    pub t1: Duration,
    pub t2: Duration,
}

impl Lease {
    pub fn renew_at(&self) -> Instant {
        later(self.acquired, self.t1)
    }
    pub fn rebind_at(&self) -> Instant {
        later(self.acquired, self.t2)
    }
    pub fn expires_at(&self) -> Instant {
        later(self.acquired, self.lease_time)
    }
    /// Lifetime left at `now`, for the kernel's address lifetime.
    pub fn remaining(&self, now: Instant) -> Duration {
        self.expires_at().saturating_duration_since(now)
    }
    pub fn infinite(&self) -> bool {
        self.lease_time >= INFINITE
    }
}

/// `at + d`, never panicking: a time past what `Instant` can hold is
/// taken as the furthest it can (an infinite lease never expires anyway).
fn later(at: Instant, d: Duration) -> Instant {
    at.checked_add(d)
        .or_else(|| at.checked_add(INFINITE))
        .unwrap_or(at)
}

/// Whether an address may be a host's own unicast address: not
/// unspecified, broadcast, multicast, loopback or class E (reserved).
fn unicast(a: Ipv4Addr) -> bool {
    !(a.is_unspecified() || a.is_broadcast() || a.is_multicast() || a.is_loopback())
        && a.octets()[0] < 240
}

/// Checks what a server offers or acknowledges; `Err` says why a lease
/// is refused. A router outside the subnet is dropped with a warning, not
/// fatal (the address is still good), except on a /32 lease, where the
/// router is always outside and reached on-link (clouds do this).
pub fn check_lease(
    address: Ipv4Addr,
    server: Option<Ipv4Addr>,
    prefix: u8,
    router: Option<Ipv4Addr>,
) -> Result<Option<Ipv4Addr>, String> {
    if !unicast(address) {
        return Err(format!("address {address} is not a unicast host address"));
    }
    match server {
        None => return Err("no server identifier".into()),
        Some(s) if !unicast(s) => {
            return Err(format!("server identifier {s} is not a unicast address"))
        }
        Some(_) => {}
    }
    // Shorter than a /8 is no real subnet: everything would be on-link.
    if !(8..=32).contains(&prefix) {
        return Err(format!("prefix /{prefix} is not a sane subnet"));
    }
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    let host = u32::from(address) & !mask;
    if prefix <= 30 && (host == 0 || host == !mask) {
        return Err(format!(
            "address {address} is the network or broadcast address of its /{prefix}"
        ));
    }
    let router = router.filter(|r| {
        let inside = u32::from(*r) & mask == u32::from(address) & mask;
        let ok = unicast(*r) && *r != address && (inside || prefix == 32);
        if !ok {
            tracing::warn!(router = %r, %address, prefix, "DHCP router refused: not a unicast address in the leased subnet");
        }
        ok
    });
    Ok(router)
}

/// Where a message goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    Broadcast,
    Server(Ipv4Addr),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Send(Message, Destination),
    /// Put this lease in place (new, renewed, or confirmed after a reboot).
    Apply(Lease),
    /// Remove this lease's address: it expired or the server refused it.
    Drop(Lease),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Init,
    Selecting {
        xid: u32,
        started: Instant,
        next: Instant,
        attempt: u32,
    },
    Requesting {
        xid: u32,
        started: Instant,
        next: Instant,
        attempt: u32,
        server: Ipv4Addr,
        address: Ipv4Addr,
    },
    Bound(Lease),
    Renewing {
        lease: Lease,
        xid: u32,
        sent: Instant,
        next: Instant,
    },
    Rebinding {
        lease: Lease,
        xid: u32,
        sent: Instant,
        next: Instant,
    },
    /// INIT-REBOOT: asking for the lease we had after the link came back.
    Rebooting {
        lease: Lease,
        xid: u32,
        started: Instant,
        next: Instant,
        attempt: u32,
    },
    /// No carrier: nothing is sent; the lease (if any) is kept.
    LinkDown(Option<Lease>),
}

/// One interface's DHCP client.
#[derive(Debug)]
pub struct Client {
    mac: [u8; 6],
    hostname: Option<String>,
    xid: u32,
    state: State,
}

impl Client {
    /// `xid_seed` should be random; tests pass a fixed one.
    pub fn new(mac: [u8; 6], hostname: Option<String>, xid_seed: u32) -> Self {
        Client {
            mac,
            hostname,
            xid: xid_seed,
            state: State::Init,
        }
    }

    /// Name of the current state, for logs and tests.
    pub fn state_name(&self) -> &'static str {
        match self.state {
            State::Init => "init",
            State::Selecting { .. } => "selecting",
            State::Requesting { .. } => "requesting",
            State::Bound(_) => "bound",
            State::Renewing { .. } => "renewing",
            State::Rebinding { .. } => "rebinding",
            State::Rebooting { .. } => "rebooting",
            State::LinkDown(_) => "link-down",
        }
    }

    /// The lease in force, if any.
    pub fn lease(&self) -> Option<&Lease> {
        match &self.state {
            State::Bound(l)
            | State::Renewing { lease: l, .. }
            | State::Rebinding { lease: l, .. }
            | State::Rebooting { lease: l, .. } => Some(l),
            State::LinkDown(l) => l.as_ref(),
            _ => None,
        }
    }

    /// When [`Client::on_timeout`] must be called next.
    pub fn deadline(&self) -> Option<Instant> {
        match &self.state {
            State::Init => None,
            State::Selecting { next, .. }
            | State::Requesting { next, .. }
            | State::Rebooting { next, .. } => Some(*next),
            State::Bound(l) => Some(l.renew_at()),
            State::Renewing { next, .. } | State::Rebinding { next, .. } => Some(*next),
            State::LinkDown(l) => l.as_ref().map(Lease::expires_at),
        }
    }

    fn next_xid(&mut self) -> u32 {
        self.xid = self.xid.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        self.xid
    }

    /// Starts (or restarts) acquiring an address: DISCOVER.
    pub fn start(&mut self, now: Instant) -> Vec<Action> {
        let xid = self.next_xid();
        self.state = State::Selecting {
            xid,
            started: now,
            next: now + backoff(0, xid),
            attempt: 0,
        };
        vec![Action::Send(self.discover(xid, 0), Destination::Broadcast)]
    }

    pub fn link_down(&mut self) {
        self.state = State::LinkDown(self.lease().cloned());
    }

    /// Carrier is back: ask for the old lease again, or start over.
    pub fn link_up(&mut self, now: Instant) -> Vec<Action> {
        match self.lease().cloned() {
            Some(lease) if now < lease.expires_at() => {
                let xid = self.next_xid();
                let msg = self.reboot_request(xid, lease.address, 0);
                self.state = State::Rebooting {
                    lease,
                    xid,
                    started: now,
                    next: now + backoff(0, xid),
                    attempt: 0,
                };
                vec![Action::Send(msg, Destination::Broadcast)]
            }
            Some(lease) => {
                let mut actions = vec![Action::Drop(lease)];
                actions.extend(self.start(now));
                actions
            }
            None => self.start(now),
        }
    }

    pub fn on_timeout(&mut self, now: Instant) -> Vec<Action> {
        match self.state.clone() {
            State::Init => self.start(now),
            State::Selecting {
                xid,
                started,
                next,
                attempt,
            } if now >= next => {
                let attempt = attempt + 1;
                let secs = elapsed_secs(started, now);
                self.state = State::Selecting {
                    xid,
                    started,
                    next: now + backoff(attempt, xid),
                    attempt,
                };
                vec![Action::Send(
                    self.discover(xid, secs),
                    Destination::Broadcast,
                )]
            }
            State::Requesting {
                xid,
                started,
                next,
                attempt,
                server,
                address,
            } if now >= next => {
                if attempt + 1 >= REQUEST_TRIES {
                    return self.start(now);
                }
                let attempt = attempt + 1;
                let msg = self.select_request(xid, server, address, elapsed_secs(started, now));
                self.state = State::Requesting {
                    xid,
                    started,
                    next: now + backoff(attempt, xid),
                    attempt,
                    server,
                    address,
                };
                vec![Action::Send(msg, Destination::Broadcast)]
            }
            State::Rebooting {
                lease,
                xid,
                started,
                next,
                attempt,
            } if now >= next => {
                if now >= lease.expires_at() {
                    let mut actions = vec![Action::Drop(lease)];
                    actions.extend(self.start(now));
                    return actions;
                }
                if attempt + 1 >= REQUEST_TRIES {
                    // No server answered: keep using the unexpired lease.
                    self.state = State::Bound(lease);
                    return self.on_timeout(now);
                }
                let attempt = attempt + 1;
                let msg = self.reboot_request(xid, lease.address, elapsed_secs(started, now));
                self.state = State::Rebooting {
                    lease,
                    xid,
                    started,
                    next: now + backoff(attempt, xid),
                    attempt,
                };
                vec![Action::Send(msg, Destination::Broadcast)]
            }
            State::Bound(lease)
            | State::Renewing { lease, .. }
            | State::Rebinding { lease, .. }
            | State::LinkDown(Some(lease))
                if now >= lease.expires_at() =>
            {
                let link_down = matches!(self.state, State::LinkDown(_));
                if link_down {
                    self.state = State::LinkDown(None);
                    return vec![Action::Drop(lease)];
                }
                let mut actions = vec![Action::Drop(lease)];
                actions.extend(self.start(now));
                actions
            }
            State::Bound(lease) if now >= lease.renew_at() => {
                let xid = self.next_xid();
                self.renew(lease, xid, now, false)
            }
            State::Renewing { lease, .. } if now >= lease.rebind_at() => {
                let xid = self.next_xid();
                self.renew(lease, xid, now, true)
            }
            State::Renewing {
                lease, xid, next, ..
            } if now >= next => self.renew(lease, xid, now, false),
            State::Rebinding {
                lease, xid, next, ..
            } if now >= next => self.renew(lease, xid, now, true),
            _ => Vec::new(),
        }
    }

    /// Sends a RENEWING (unicast) or REBINDING (broadcast) request.
    fn renew(&mut self, lease: Lease, xid: u32, now: Instant, rebind: bool) -> Vec<Action> {
        let until = if rebind {
            lease.expires_at()
        } else {
            lease.rebind_at()
        };
        // RFC 2131 §4.4.5: wait half the time left, at least 60 s.
        let wait = (until.saturating_duration_since(now) / 2).max(MIN_RENEW_RETRY);
        let next = (now + wait).min(until);
        let mut msg = self.base(xid, MessageType::Request, 0);
        msg.ciaddr = lease.address;
        msg.flags = 0;
        let to = if rebind {
            Destination::Broadcast
        } else {
            Destination::Server(lease.server)
        };
        self.state = if rebind {
            State::Rebinding {
                lease,
                xid,
                sent: now,
                next,
            }
        } else {
            State::Renewing {
                lease,
                xid,
                sent: now,
                next,
            }
        };
        vec![Action::Send(msg, to)]
    }

    /// Handles a received message; anything not for us is ignored.
    pub fn on_message(&mut self, now: Instant, msg: &Message) -> Result<Vec<Action>, DhcpError> {
        if msg.op != OP_REPLY || msg.chaddr != self.mac {
            return Ok(Vec::new());
        }
        let Some(kind) = msg.message_type()? else {
            return Ok(Vec::new());
        };
        let opts = msg.lease_options()?;
        match (self.state.clone(), kind) {
            (
                State::Selecting {
                    xid,
                    started,
                    attempt: _,
                    next: _,
                },
                MessageType::Offer,
            ) if msg.xid == xid => {
                let Some(server) = opts.server_id else {
                    return Ok(Vec::new());
                };
                let address = msg.yiaddr;
                // A bogus offer is not worth a REQUEST; the next one may be good.
                let prefix = opts
                    .subnet_mask
                    .and_then(mask_prefix)
                    .unwrap_or_else(|| classful_prefix(address));
                if let Err(reason) = check_lease(address, Some(server), prefix, None) {
                    return Err(DhcpError::Refused { server, reason });
                }
                let request = self.select_request(xid, server, address, elapsed_secs(started, now));
                self.state = State::Requesting {
                    xid,
                    started: now,
                    next: now + backoff(0, xid),
                    attempt: 0,
                    server,
                    address,
                };
                Ok(vec![Action::Send(request, Destination::Broadcast)])
            }
            // Only the server we asked may acknowledge (RFC 2131 §4.3.2).
            (
                State::Requesting {
                    xid,
                    started,
                    server,
                    ..
                },
                MessageType::Ack,
            ) if msg.xid == xid && opts.server_id == Some(server) => {
                let lease = self.lease_from(msg, started, opts.server_id)?;
                self.state = State::Bound(lease.clone());
                Ok(vec![Action::Apply(lease)])
            }
            (
                State::Renewing {
                    lease: old,
                    xid,
                    sent,
                    ..
                }
                | State::Rebinding {
                    lease: old,
                    xid,
                    sent,
                    ..
                },
                MessageType::Ack,
            ) if msg.xid == xid => self.bind_again(msg, sent, opts.server_id, old),
            (
                State::Rebooting {
                    lease: old,
                    xid,
                    started,
                    ..
                },
                MessageType::Ack,
            ) if msg.xid == xid => self.bind_again(msg, started, opts.server_id, old),
            (
                State::Requesting { xid, .. }
                | State::Renewing { xid, .. }
                | State::Rebinding { xid, .. }
                | State::Rebooting { xid, .. },
                MessageType::Nak,
            ) if msg.xid == xid => {
                tracing::info!(message = ?opts.message, "DHCPNAK: starting over");
                let mut actions: Vec<Action> = self
                    .lease()
                    .cloned()
                    .map(Action::Drop)
                    .into_iter()
                    .collect();
                actions.extend(self.start(now));
                Ok(actions)
            }
            _ => Ok(Vec::new()),
        }
    }

    /// An ACK while holding `old` (renewing, rebinding or rebooting): bound
    /// to the new lease, and the old address dropped if it changed.
    fn bind_again(
        &mut self,
        msg: &Message,
        sent: Instant,
        server_id: Option<Ipv4Addr>,
        old: Lease,
    ) -> Result<Vec<Action>, DhcpError> {
        let lease = self.lease_from(msg, sent, server_id.or(Some(old.server)))?;
        self.state = State::Bound(lease.clone());
        let mut actions = Vec::new();
        if lease.address != old.address {
            actions.push(Action::Drop(old));
        }
        actions.push(Action::Apply(lease));
        Ok(actions)
    }

    fn lease_from(
        &self,
        msg: &Message,
        sent: Instant,
        server: Option<Ipv4Addr>,
    ) -> Result<Lease, DhcpError> {
        let o = msg.lease_options()?;
        let lease_time = o.lease_time.unwrap_or(INFINITE).min(INFINITE);
        let mut t1 = o.renewal_time.unwrap_or(lease_time / 2);
        let mut t2 = o.rebinding_time.unwrap_or(lease_time * 7 / 8);
        // Nonsense timers from a server fall back to the RFC defaults.
        if !(t1 < t2 && t2 < lease_time) {
            t1 = lease_time / 2;
            t2 = lease_time * 7 / 8;
        }
        let refused = |reason: String| DhcpError::Refused {
            server: server.unwrap_or(msg.siaddr),
            reason,
        };
        let prefix = match o.subnet_mask {
            Some(mask) => mask_prefix(mask)
                .ok_or_else(|| refused(format!("subnet mask {mask} is not contiguous")))?,
            None => classful_prefix(msg.yiaddr),
        };
        // RFC 3442: with option 121, option 3 is ignored; its 0/0 route
        // (if any) is the default route.
        let (offered_router, routes) = match o.classless_routes {
            Some(all) => {
                let default = all
                    .iter()
                    .find(|r| r.prefix == 0 && !r.router.is_unspecified())
                    .map(|r| r.router);
                let rest = all.into_iter().filter(|r| r.prefix != 0).collect();
                (default, rest)
            }
            None => (o.routers.first().copied(), Vec::new()),
        };
        let router = check_lease(msg.yiaddr, server, prefix, offered_router).map_err(refused)?;
        Ok(Lease {
            address: msg.yiaddr,
            prefix,
            router,
            dns: o.dns,
            ntp: o.ntp,
            routes,
            mtu: o.mtu,
            domain: o.domain,
            hostname: o.hostname,
            // check_lease refused a lease without one.
            server: server.unwrap_or(msg.siaddr),
            acquired: sent,
            lease_time,
            t1,
            t2,
        })
    }

    fn base(&self, xid: u32, kind: MessageType, secs: u16) -> Message {
        let mut m = Message::request(xid, self.mac);
        m.secs = secs;
        m.flags = FLAG_BROADCAST;
        m.set(code::MESSAGE_TYPE, vec![kind as u8]);
        let mut client_id = vec![1];
        client_id.extend_from_slice(&self.mac);
        m.set(code::CLIENT_ID, client_id);
        m.set(code::MAX_SIZE, 1500u16.to_be_bytes().to_vec());
        m.set(code::PARAMETER_LIST, PARAMETERS.to_vec());
        if let Some(h) = &self.hostname {
            m.set(code::HOSTNAME, h.as_bytes().to_vec());
        }
        m
    }

    fn discover(&self, xid: u32, secs: u16) -> Message {
        self.base(xid, MessageType::Discover, secs)
    }

    fn select_request(&self, xid: u32, server: Ipv4Addr, address: Ipv4Addr, secs: u16) -> Message {
        let mut m = self.base(xid, MessageType::Request, secs);
        m.set(code::SERVER_ID, server.octets().to_vec());
        m.set(code::REQUESTED_IP, address.octets().to_vec());
        m
    }

    fn reboot_request(&self, xid: u32, address: Ipv4Addr, secs: u16) -> Message {
        let mut m = self.base(xid, MessageType::Request, secs);
        m.set(code::REQUESTED_IP, address.octets().to_vec());
        m
    }
}

/// 1, 2, 4 … 64 s, plus up to ~1 s derived from the transaction id so a
/// rack of nodes does not retransmit in step. RFC 2131 starts at 4 s; a
/// booting node whose first DISCOVER went out before the carrier settled
/// should not idle that long.
fn backoff(attempt: u32, xid: u32) -> Duration {
    let base = Duration::from_secs(1u64 << attempt.min(6)).min(MAX_BACKOFF);
    base + Duration::from_millis(u64::from(xid % 1000))
}

fn elapsed_secs(from: Instant, now: Instant) -> u16 {
    u16::try_from(now.saturating_duration_since(from).as_secs()).unwrap_or(u16::MAX)
}

/// The pre-CIDR prefix of an address, for a server that sends no mask.
fn classful_prefix(a: Ipv4Addr) -> u8 {
    match a.octets()[0] {
        0..=127 => 8,
        128..=191 => 16,
        _ => 24,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::dhcp::tests::slirp_offer;

    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
    const ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);

    fn sent(actions: &[Action]) -> (&Message, Destination) {
        match actions {
            [.., Action::Send(m, d)] => (m, *d),
            other => panic!("expected a send, got {other:?}"),
        }
    }

    /// A reply of `kind` to `req`, built from the slirp offer.
    fn reply(req: &Message, kind: MessageType, lease_secs: u32) -> Message {
        let mut m = Message::decode(&slirp_offer()).unwrap();
        m.xid = req.xid;
        m.set(code::MESSAGE_TYPE, vec![kind as u8]);
        m.set(code::LEASE_TIME, lease_secs.to_be_bytes().to_vec());
        m
    }

    fn bound(client: &mut Client, t0: Instant, lease_secs: u32) -> Lease {
        let a = client.start(t0);
        let (discover, to) = sent(&a);
        assert_eq!(to, Destination::Broadcast);
        assert_eq!(
            discover.message_type().unwrap(),
            Some(MessageType::Discover)
        );
        assert_eq!(discover.flags, FLAG_BROADCAST);
        let a = client
            .on_message(t0, &reply(discover, MessageType::Offer, lease_secs))
            .unwrap();
        let (request, _) = sent(&a);
        assert_eq!(request.message_type().unwrap(), Some(MessageType::Request));
        assert_eq!(request.option(code::SERVER_ID), Some(&SERVER.octets()[..]));
        assert_eq!(request.option(code::REQUESTED_IP), Some(&ADDR.octets()[..]));
        let t = t0 + Duration::from_millis(300);
        let a = client
            .on_message(t, &reply(request, MessageType::Ack, lease_secs))
            .unwrap();
        match a.as_slice() {
            [Action::Apply(l)] => l.clone(),
            other => panic!("expected apply, got {other:?}"),
        }
    }

    #[test]
    fn classless_routes_replace_option_3() {
        let mut client = Client::new(MAC, None, 7);
        let t0 = Instant::now();
        let a = client.start(t0);
        let (discover, _) = sent(&a);
        let mut offer = reply(discover, MessageType::Offer, 3600);
        // Option 3 says 10.0.2.2; option 121 says 10.0.2.9 and a subnet.
        offer.set(
            code::CLASSLESS_ROUTES,
            vec![0, 10, 0, 2, 9, 16, 10, 78, 10, 0, 2, 9],
        );
        offer.set(code::INTERFACE_MTU, 1400u16.to_be_bytes().to_vec());
        let a = client.on_message(t0, &offer).unwrap();
        let (request, _) = sent(&a);
        let mut ack = reply(request, MessageType::Ack, 3600);
        ack.options = offer.options.clone();
        ack.set(code::MESSAGE_TYPE, vec![MessageType::Ack as u8]);
        let a = client.on_message(t0, &ack).unwrap();
        let lease = a
            .iter()
            .find_map(|x| match x {
                Action::Apply(l) => Some(l.clone()),
                _ => None,
            })
            .unwrap();
        assert_eq!(lease.router, Some(Ipv4Addr::new(10, 0, 2, 9)));
        assert_eq!(lease.routes.len(), 1);
        assert_eq!(lease.routes[0].to_string(), "10.78.0.0/16 via 10.0.2.9");
        assert_eq!(lease.mtu, Some(1400));
    }

    #[test]
    fn discover_offer_request_ack_binds_the_lease() {
        let t0 = Instant::now();
        let mut c = Client::new(MAC, Some("node-1".into()), 7);
        let lease = bound(&mut c, t0, 3600);
        assert_eq!(c.state_name(), "bound");
        assert_eq!(lease.address, ADDR);
        assert_eq!(lease.prefix, 24);
        assert_eq!(lease.router, Some(SERVER));
        assert_eq!(lease.dns, [Ipv4Addr::new(10, 0, 2, 3)]);
        assert_eq!(lease.t1, Duration::from_secs(1800));
        assert_eq!(lease.t2, Duration::from_secs(3150));
        assert_eq!(lease.acquired, t0, "lease times count from the REQUEST");
        assert_eq!(c.deadline(), Some(t0 + Duration::from_secs(1800)));
    }

    #[test]
    fn replies_for_other_transactions_or_clients_are_ignored() {
        let t0 = Instant::now();
        let mut c = Client::new(MAC, None, 7);
        let a = c.start(t0);
        let (discover, _) = sent(&a);
        let mut offer = reply(discover, MessageType::Offer, 60);
        offer.xid ^= 1;
        assert!(c.on_message(t0, &offer).unwrap().is_empty());
        let mut offer = reply(discover, MessageType::Offer, 60);
        offer.chaddr[5] ^= 1;
        assert!(c.on_message(t0, &offer).unwrap().is_empty());
        // An ACK while selecting is not an answer to anything we sent.
        assert!(c
            .on_message(t0, &reply(discover, MessageType::Ack, 60))
            .unwrap()
            .is_empty());
        assert_eq!(c.state_name(), "selecting");
    }

    #[test]
    fn discovers_are_retransmitted_with_growing_waits() {
        let t0 = Instant::now();
        let mut c = Client::new(MAC, None, 0);
        c.start(t0);
        let mut waits = Vec::new();
        let mut now = t0;
        for _ in 0..8 {
            let next = c.deadline().unwrap();
            waits.push((next - now).as_secs());
            now = next;
            let a = c.on_timeout(now);
            let (m, _) = sent(&a);
            assert_eq!(m.message_type().unwrap(), Some(MessageType::Discover));
        }
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 64, 64]);
        // Nothing happens before the deadline.
        assert!(c.on_timeout(now).is_empty());
    }

    #[test]
    fn renewal_at_t1_rebinding_at_t2_and_expiry() {
        let t0 = Instant::now();
        let mut c = Client::new(MAC, None, 7);
        let lease = bound(&mut c, t0, 1000);
        // T1 = 500 s: unicast REQUEST to the server with ciaddr set.
        let t1 = t0 + Duration::from_secs(500);
        let a = c.on_timeout(t1);
        let (m, to) = sent(&a);
        assert_eq!(c.state_name(), "renewing");
        assert_eq!(to, Destination::Server(SERVER));
        assert_eq!(m.ciaddr, ADDR);
        assert!(m.option(code::REQUESTED_IP).is_none());
        assert!(m.option(code::SERVER_ID).is_none());
        // Retransmit: half of the 375 s to T2, at least 60 s.
        assert_eq!(c.deadline(), Some(t1 + Duration::from_millis(187_500)));
        // T2 = 875 s: broadcast.
        let t2 = t0 + Duration::from_secs(875);
        let a = c.on_timeout(t2);
        let (m, to) = sent(&a);
        assert_eq!(c.state_name(), "rebinding");
        assert_eq!(to, Destination::Broadcast);
        assert_eq!(m.ciaddr, ADDR);
        // Half of the 125 s to expiry.
        assert_eq!(c.deadline(), Some(t2 + Duration::from_millis(62_500)));
        // Close to expiry the 60 s minimum applies, but never past expiry.
        let late = t0 + Duration::from_secs(990);
        c.on_timeout(late);
        assert_eq!(c.deadline(), Some(t0 + Duration::from_secs(1000)));
        // Expiry: the address goes and DISCOVER starts over.
        let end = t0 + Duration::from_secs(1000);
        let a = c.on_timeout(end);
        assert_eq!(a[0], Action::Drop(lease));
        assert_eq!(
            sent(&a).0.message_type().unwrap(),
            Some(MessageType::Discover)
        );
        assert_eq!(c.state_name(), "selecting");
        assert!(c.lease().is_none());
    }

    #[test]
    fn an_ack_while_renewing_extends_the_lease() {
        let t0 = Instant::now();
        let mut c = Client::new(MAC, None, 7);
        bound(&mut c, t0, 1000);
        let t1 = t0 + Duration::from_secs(500);
        let a = c.on_timeout(t1);
        let (req, _) = sent(&a);
        let a = c
            .on_message(t1, &reply(req, MessageType::Ack, 1000))
            .unwrap();
        match a.as_slice() {
            [Action::Apply(l)] => {
                assert_eq!(l.acquired, t1);
                assert_eq!(l.expires_at(), t1 + Duration::from_secs(1000));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(c.state_name(), "bound");
    }

    #[test]
    fn a_nak_drops_the_lease_and_starts_over() {
        let t0 = Instant::now();
        let mut c = Client::new(MAC, None, 7);
        let lease = bound(&mut c, t0, 1000);
        let t = t0 + Duration::from_secs(500);
        let a = c.on_timeout(t);
        let (req, _) = sent(&a);
        let a = c.on_message(t, &reply(req, MessageType::Nak, 0)).unwrap();
        assert_eq!(a[0], Action::Drop(lease));
        assert_eq!(c.state_name(), "selecting");
    }

    #[test]
    fn carrier_loss_keeps_the_lease_and_asks_for_it_again() {
        let t0 = Instant::now();
        let mut c = Client::new(MAC, None, 7);
        let lease = bound(&mut c, t0, 1000);
        c.link_down();
        assert_eq!(c.state_name(), "link-down");
        assert_eq!(c.lease(), Some(&lease));
        // No renewal while the link is down; only expiry.
        assert_eq!(c.deadline(), Some(lease.expires_at()));
        let t = t0 + Duration::from_secs(600);
        let a = c.link_up(t);
        let (m, to) = sent(&a);
        assert_eq!(c.state_name(), "rebooting");
        assert_eq!(to, Destination::Broadcast);
        assert_eq!(m.option(code::REQUESTED_IP), Some(&ADDR.octets()[..]));
        assert!(m.option(code::SERVER_ID).is_none());
        assert_eq!(m.ciaddr, Ipv4Addr::UNSPECIFIED);
        let a = c.on_message(t, &reply(m, MessageType::Ack, 1000)).unwrap();
        assert!(matches!(a.as_slice(), [Action::Apply(l)] if l.address == ADDR));
    }

    #[test]
    fn init_reboot_without_answer_keeps_the_unexpired_lease() {
        let t0 = Instant::now();
        let mut c = Client::new(MAC, None, 7);
        bound(&mut c, t0, 1000);
        c.link_down();
        let mut now = t0 + Duration::from_secs(10);
        c.link_up(now);
        // The first REQUEST went out with link_up; three more, then the
        // fourth timeout gives up asking.
        for _ in 0..REQUEST_TRIES {
            now = c.deadline().unwrap();
            c.on_timeout(now);
        }
        assert_eq!(c.state_name(), "bound");
        assert!(c.lease().is_some());
    }

    #[test]
    fn a_lease_expiring_while_the_link_is_down_is_dropped() {
        let t0 = Instant::now();
        let mut c = Client::new(MAC, None, 7);
        let lease = bound(&mut c, t0, 100);
        c.link_down();
        let a = c.on_timeout(t0 + Duration::from_secs(100));
        assert_eq!(a, [Action::Drop(lease)]);
        assert_eq!(c.deadline(), None);
        // Carrier back: a fresh DISCOVER.
        let a = c.link_up(t0 + Duration::from_secs(200));
        assert_eq!(
            sent(&a).0.message_type().unwrap(),
            Some(MessageType::Discover)
        );
    }

    #[test]
    fn an_unanswered_offer_is_abandoned_after_four_requests() {
        let t0 = Instant::now();
        let mut c = Client::new(MAC, None, 7);
        let a = c.start(t0);
        let (d, _) = sent(&a);
        c.on_message(t0, &reply(d, MessageType::Offer, 60)).unwrap();
        let mut kinds = Vec::new();
        for _ in 0..REQUEST_TRIES {
            let now = c.deadline().unwrap();
            let a = c.on_timeout(now);
            kinds.push(sent(&a).0.message_type().unwrap().unwrap());
        }
        assert_eq!(
            kinds,
            [
                MessageType::Request,
                MessageType::Request,
                MessageType::Request,
                MessageType::Discover
            ]
        );
    }

    #[test]
    fn bad_timers_fall_back_and_a_missing_mask_is_classful() {
        let t0 = Instant::now();
        let mut c = Client::new(MAC, None, 7);
        let a = c.start(t0);
        let (d, _) = sent(&a);
        let a = c
            .on_message(t0, &reply(d, MessageType::Offer, 100))
            .unwrap();
        let (r, _) = sent(&a);
        let mut ack = reply(r, MessageType::Ack, 100);
        ack.set(code::RENEWAL_TIME, 200u32.to_be_bytes().to_vec());
        ack.options.retain(|(c, _)| *c != code::SUBNET_MASK);
        let a = c.on_message(t0, &ack).unwrap();
        let [Action::Apply(l)] = a.as_slice() else {
            panic!("{a:?}")
        };
        assert_eq!((l.t1.as_secs(), l.t2.as_secs()), (50, 87));
        assert_eq!(l.prefix, 8);
    }
}
