//! IPv6 autoconfiguration: the per-interface sysctls that turn SLAAC from
//! router advertisements on or off, and RFC 8106 name servers (RDNSS) and
//! search domains (DNSSL) from those advertisements. The kernel handles
//! the RAs and passes the options it does not use itself to user space as
//! `RTM_NEWNDUSEROPT` messages on the RTNLGRP_ND_USEROPT netlink group;
//! netlink-packet-route does not parse them, so the few bytes are read
//! here.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant};

use netlink_sys::{protocols::NETLINK_ROUTE, AsyncSocket, AsyncSocketExt, TokioSocket};
use tokio::sync::mpsc;

use super::resolv::{Entry, Source};
use super::{NetError, Update};
use crate::config::Ipv6Mode;

const RTNLGRP_ND_USEROPT: u32 = 20;
const RTM_NEWNDUSEROPT: u16 = 68;
const NLMSG_HDRLEN: usize = 16;
/// `struct nduseroptmsg`.
const NDUSEROPT_LEN: usize = 16;
const ND_OPT_RDNSS: u8 = 25;
const ND_OPT_DNSSL: u8 = 31;
/// Router advertisement.
const ICMPV6_RA: u8 = 134;
/// Bounds on what RAs may store, per interface: an on-link host can send
/// any number of RAs with fresh addresses and domains, and PID 1's memory
/// must not grow with them. The resolver reads three servers and glibc six
/// search domains; the lifetime cap (above RFC 8106's 3 × the longest RA
/// interval of 1800 s) lets stale entries go even when a router lied.
pub const MAX_RA_SERVERS: usize = 3;
pub const MAX_RA_DOMAINS: usize = super::resolv::MAX_SEARCH_DOMAINS;
pub const MAX_RA_LIFETIME: Duration = Duration::from_secs(2 * 3600);
/// Interfaces whose RA state is kept (ifindexes of vanished links too,
/// until their entries expire).
pub const MAX_RA_INTERFACES: usize = 64;

/// Writes the interface's RA sysctls. `ra` accepts advertisements even
/// when forwarding is on (a Kubernetes node forwards), which the kernel's
/// default `accept_ra=1` would not.
pub fn configure(interface: &str, mode: Ipv6Mode) -> Result<(), NetError> {
    let dir = std::path::Path::new("/proc/sys/net/ipv6/conf").join(interface);
    if !dir.exists() {
        tracing::info!(interface, "no IPv6 in this kernel; skipping RA settings");
        return Ok(());
    }
    let (accept_ra, autoconf) = match mode {
        Ipv6Mode::Ra => ("2", "1"),
        Ipv6Mode::Off => ("0", "0"),
    };
    for (key, value) in [("accept_ra", accept_ra), ("autoconf", autoconf)] {
        let path = dir.join(key);
        std::fs::write(&path, value).map_err(|source| NetError::Sysctl {
            name: interface.to_owned(),
            path: path.display().to_string(),
            source,
        })?;
    }
    Ok(())
}

/// Name servers and domains one RA carried for one interface, each with
/// its lifetime (0 withdraws it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaDns {
    pub ifindex: u32,
    pub servers: Vec<(Ipv6Addr, Duration)>,
    pub domains: Vec<(String, Duration)>,
}

/// Parses the netlink messages in `buf`, keeping RDNSS/DNSSL options of
/// router advertisements; anything malformed is skipped.
pub fn parse_nduseropt(buf: &[u8]) -> Vec<RaDns> {
    let mut out = Vec::new();
    let mut rest = buf;
    while rest.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        if len < NLMSG_HDRLEN || len > rest.len() {
            break;
        }
        if kind == RTM_NEWNDUSEROPT {
            if let Some(dns) = parse_one(&rest[NLMSG_HDRLEN..len]) {
                out.push(dns);
            }
        }
        // Messages are 4-byte aligned.
        let next = (len + 3) & !3;
        rest = rest.get(next..).unwrap_or_default();
    }
    out
}

fn parse_one(msg: &[u8]) -> Option<RaDns> {
    if msg.len() < NDUSEROPT_LEN {
        return None;
    }
    let opts_len = usize::from(u16::from_ne_bytes([msg[2], msg[3]]));
    let ifindex = u32::try_from(i32::from_ne_bytes([msg[4], msg[5], msg[6], msg[7]])).ok()?;
    if msg[8] != ICMPV6_RA {
        return None;
    }
    let mut opts = msg.get(NDUSEROPT_LEN..NDUSEROPT_LEN + opts_len)?;
    let mut dns = RaDns {
        ifindex,
        servers: Vec::new(),
        domains: Vec::new(),
    };
    while opts.len() >= 8 {
        let kind = opts[0];
        let len = usize::from(opts[1]) * 8;
        if len < 8 || len > opts.len() {
            break;
        }
        let body = &opts[..len];
        let lifetime = Duration::from_secs(u64::from(u32::from_be_bytes([
            body[4], body[5], body[6], body[7],
        ])));
        match kind {
            ND_OPT_RDNSS => {
                for a in body[8..].chunks_exact(16) {
                    let mut octets = [0u8; 16];
                    octets.copy_from_slice(a);
                    dns.servers.push((Ipv6Addr::from(octets), lifetime));
                }
            }
            ND_OPT_DNSSL => {
                for d in dns_names(&body[8..]) {
                    dns.domains.push((d, lifetime));
                }
            }
            _ => {}
        }
        opts = &opts[len..];
    }
    (!dns.servers.is_empty() || !dns.domains.is_empty()).then_some(dns)
}

/// Uncompressed DNS names (RFC 8106 §5.2), padded with zero bytes.
fn dns_names(mut b: &[u8]) -> Vec<String> {
    let mut names = Vec::new();
    let mut labels: Vec<String> = Vec::new();
    while let Some((&len, tail)) = b.split_first() {
        let len = usize::from(len);
        if len == 0 {
            if !labels.is_empty() {
                names.push(labels.join("."));
                labels.clear();
            }
            b = tail;
            continue;
        }
        let Some(label) = tail.get(..len) else { break };
        match std::str::from_utf8(label) {
            Ok(l) if l.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-') => {
                labels.push(l.to_owned())
            }
            _ => return names,
        }
        b = &tail[len..];
    }
    names
}

/// What RAs said per interface, with expiry times; bounded by the
/// `MAX_RA_*` constants.
#[derive(Debug, Default)]
pub struct RaState {
    servers: BTreeMap<u32, BTreeMap<Ipv6Addr, Instant>>,
    domains: BTreeMap<u32, BTreeMap<String, Instant>>,
}

/// Adds or refreshes `key` until `now + life` (capped), or withdraws it at
/// lifetime 0. A new key beyond `max` is dropped: entries already there
/// stay until they expire, so a flood cannot push out the real router's.
fn record<K: Ord>(
    map: &mut BTreeMap<K, Instant>,
    key: K,
    now: Instant,
    life: Duration,
    max: usize,
) {
    if life.is_zero() {
        map.remove(&key);
        return;
    }
    if map.len() >= max && !map.contains_key(&key) {
        return;
    }
    let until = now.checked_add(life.min(MAX_RA_LIFETIME)).unwrap_or(now);
    map.insert(key, until);
}

impl RaState {
    /// Records one RA's options; returns the interface it concerns, or
    /// `None` when RA state is already kept for as many interfaces as allowed.
    pub fn update(&mut self, now: Instant, ra: &RaDns) -> Option<u32> {
        let known =
            self.servers.contains_key(&ra.ifindex) || self.domains.contains_key(&ra.ifindex);
        if !known && self.interfaces() >= MAX_RA_INTERFACES {
            tracing::debug!(
                ifindex = ra.ifindex,
                "RA options ignored: too many interfaces"
            );
            return None;
        }
        let servers = self.servers.entry(ra.ifindex).or_default();
        for (a, life) in &ra.servers {
            record(servers, *a, now, *life, MAX_RA_SERVERS);
        }
        let domains = self.domains.entry(ra.ifindex).or_default();
        for (d, life) in &ra.domains {
            // Only names resolv.conf can carry; others are dropped.
            if let Some(d) = super::resolv::dns_name(d) {
                record(domains, d, now, *life, MAX_RA_DOMAINS);
            }
        }
        Some(ra.ifindex)
    }

    fn interfaces(&self) -> usize {
        let mut keys: Vec<&u32> = self.servers.keys().chain(self.domains.keys()).collect();
        keys.sort();
        keys.dedup();
        keys.len()
    }

    /// Drops expired entries; returns the interfaces that changed.
    pub fn expire(&mut self, now: Instant) -> Vec<u32> {
        let mut changed = Vec::new();
        for (i, s) in &mut self.servers {
            let before = s.len();
            s.retain(|_, until| *until > now);
            if s.len() != before {
                changed.push(*i);
            }
        }
        for (i, d) in &mut self.domains {
            let before = d.len();
            d.retain(|_, until| *until > now);
            if d.len() != before && !changed.contains(i) {
                changed.push(*i);
            }
        }
        // Interfaces with nothing left no longer count against the cap.
        self.servers.retain(|_, s| !s.is_empty());
        self.domains.retain(|_, d| !d.is_empty());
        changed
    }

    pub fn next_expiry(&self) -> Option<Instant> {
        let s = self.servers.values().flat_map(|m| m.values());
        let d = self.domains.values().flat_map(|m| m.values());
        s.chain(d).min().copied()
    }

    /// The resolv.conf contribution of one interface, in address order.
    pub fn entry(&self, ifindex: u32) -> Entry {
        Entry {
            servers: self
                .servers
                .get(&ifindex)
                .map(|m| m.keys().map(|a| IpAddr::V6(*a)).collect())
                .unwrap_or_default(),
            domains: self
                .domains
                .get(&ifindex)
                .map(|m| m.keys().cloned().collect())
                .unwrap_or_default(),
        }
    }
}

/// Listens for RA options and feeds resolv.conf. Best effort: without the
/// socket, IPv6 name servers simply do not appear.
pub(super) fn spawn_rdnss_listener(updates: mpsc::Sender<Update>) {
    let mut socket = match TokioSocket::new(NETLINK_ROUTE) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "no netlink socket for IPv6 name servers");
            return;
        }
    };
    let group = netlink_sys::SocketAddr::new(0, 1 << (RTNLGRP_ND_USEROPT - 1));
    if let Err(e) = socket.socket_mut().bind(&group) {
        tracing::warn!(error = %e, "not subscribed to IPv6 RA options");
        return;
    }
    tokio::spawn(async move {
        let mut state = RaState::default();
        loop {
            let expiry = state.next_expiry();
            let changed = tokio::select! {
                received = socket.recv_from_full() => match received {
                    Ok((buf, _)) => {
                        let now = Instant::now();
                        parse_nduseropt(&buf).iter().filter_map(|ra| state.update(now, ra)).collect::<Vec<_>>()
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "IPv6 RA option listener stopped");
                        return;
                    }
                },
                _ = super::sleep_until(expiry) => state.expire(Instant::now()),
            };
            for ifindex in changed {
                let update = Update::Dns {
                    source: Source::Ra,
                    interface: interface_name(ifindex),
                    entry: state.entry(ifindex),
                };
                if updates.send(update).await.is_err() {
                    return;
                }
            }
        }
    });
}

/// The name of interface `index` from sysfs (`if<index>` if not found).
fn interface_name(index: u32) -> String {
    std::fs::read_dir("/sys/class/net")
        .into_iter()
        .flatten()
        .flatten()
        .find(|e| {
            std::fs::read_to_string(e.path().join("ifindex"))
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
                == Some(index)
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .unwrap_or_else(|| format!("if{index}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An RTM_NEWNDUSEROPT message as the kernel sends it for an RA on
    /// ifindex 2 carrying RDNSS fec0::3 (lifetime 3600 s) and DNSSL
    /// "example.org" (lifetime 600 s).
    fn nduseropt() -> Vec<u8> {
        let mut opts = vec![ND_OPT_RDNSS, 3, 0, 0];
        opts.extend_from_slice(&3600u32.to_be_bytes());
        opts.extend_from_slice(&"fec0::3".parse::<Ipv6Addr>().unwrap().octets());
        let mut dnssl = vec![ND_OPT_DNSSL, 3, 0, 0];
        dnssl.extend_from_slice(&600u32.to_be_bytes());
        dnssl.extend_from_slice(b"\x07example\x03org\x00");
        dnssl.resize(24, 0);
        opts.extend_from_slice(&dnssl);
        let mut body = vec![10u8, 0];
        body.extend_from_slice(&u16::try_from(opts.len()).unwrap().to_ne_bytes());
        body.extend_from_slice(&2i32.to_ne_bytes());
        body.extend_from_slice(&[ICMPV6_RA, 0, 0, 0, 0, 0, 0, 0]);
        body.extend_from_slice(&opts);
        let mut msg = Vec::new();
        msg.extend_from_slice(
            &u32::try_from(NLMSG_HDRLEN + body.len())
                .unwrap()
                .to_ne_bytes(),
        );
        msg.extend_from_slice(&RTM_NEWNDUSEROPT.to_ne_bytes());
        msg.extend_from_slice(&[0; 10]);
        msg.extend_from_slice(&body);
        msg
    }

    #[test]
    fn rdnss_and_dnssl_are_read_from_the_netlink_message() {
        let got = parse_nduseropt(&nduseropt());
        assert_eq!(
            got,
            [RaDns {
                ifindex: 2,
                servers: vec![("fec0::3".parse().unwrap(), Duration::from_secs(3600))],
                domains: vec![("example.org".into(), Duration::from_secs(600))],
            }]
        );
        // Truncated or foreign bytes yield nothing rather than garbage.
        let b = nduseropt();
        assert!(parse_nduseropt(&b[..30]).is_empty());
        let mut other = b.clone();
        other[NLMSG_HDRLEN + 8] = 135; // not an RA
        assert!(parse_nduseropt(&other).is_empty());
    }

    #[test]
    fn ra_servers_expire_and_zero_lifetimes_withdraw() {
        let t0 = Instant::now();
        let mut s = RaState::default();
        let ra = &parse_nduseropt(&nduseropt())[0];
        assert_eq!(s.update(t0, ra), Some(2));
        assert_eq!(s.entry(2).servers, ["fec0::3".parse::<IpAddr>().unwrap()]);
        assert_eq!(s.entry(2).domains, ["example.org"]);
        assert_eq!(s.next_expiry(), Some(t0 + Duration::from_secs(600)));
        assert_eq!(s.expire(t0 + Duration::from_secs(600)), [2]);
        assert!(s.entry(2).domains.is_empty());
        assert_eq!(s.entry(2).servers.len(), 1);
        let withdraw = RaDns {
            ifindex: 2,
            servers: vec![("fec0::3".parse().unwrap(), Duration::ZERO)],
            domains: vec![],
        };
        s.update(t0, &withdraw);
        assert_eq!(s.entry(2), Entry::default());
    }

    #[test]
    fn ra_state_is_bounded_per_interface_in_lifetime_and_in_interfaces() {
        let t0 = Instant::now();
        let mut s = RaState::default();
        let year = Duration::from_secs(365 * 86400);
        // A flood of fresh servers and domains with huge lifetimes.
        let flood = RaDns {
            ifindex: 2,
            servers: (1..=100u16)
                .map(|i| (Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, i), year))
                .collect(),
            domains: (0..100)
                .map(|i| (format!("d{i}.example"), year))
                .chain([("Bad Domain".to_owned(), year)])
                .collect(),
        };
        s.update(t0, &flood);
        let e = s.entry(2);
        assert_eq!(e.servers.len(), MAX_RA_SERVERS);
        assert_eq!(e.domains.len(), MAX_RA_DOMAINS);
        // The first ones stay: a flood cannot push out what was there.
        assert_eq!(e.servers[0], "fec0::1".parse::<IpAddr>().unwrap());
        assert!(e.domains.iter().all(|d| dns_ok(d)));
        assert_eq!(s.next_expiry(), Some(t0 + MAX_RA_LIFETIME));
        assert_eq!(s.expire(t0 + MAX_RA_LIFETIME), [2]);
        assert_eq!(s.entry(2), Entry::default());
        // Interfaces beyond the cap are refused, known ones still update.
        for i in 0..u32::try_from(MAX_RA_INTERFACES).unwrap() {
            let ra = RaDns {
                ifindex: 100 + i,
                servers: vec![("fec0::1".parse().unwrap(), Duration::from_secs(60))],
                domains: vec![],
            };
            assert_eq!(s.update(t0, &ra), Some(100 + i));
        }
        let extra = RaDns {
            ifindex: 9999,
            servers: vec![("fec0::1".parse().unwrap(), Duration::from_secs(60))],
            domains: vec![],
        };
        assert_eq!(s.update(t0, &extra), None);
        assert_eq!(s.entry(9999), Entry::default());
        let again = RaDns {
            ifindex: 100,
            ..extra
        };
        assert_eq!(s.update(t0, &again), Some(100));
    }

    fn dns_ok(d: &str) -> bool {
        super::super::resolv::dns_name(d).as_deref() == Some(d)
    }
}
