//! The DHCPv4 message codec (RFC 2131 header, RFC 2132 options): decodes
//! what a server sends, encodes what the client sends. Options are kept as
//! code/bytes pairs in wire order (split long options are joined, RFC 3396),
//! with typed accessors for the ones the client uses; anything else is
//! carried through untouched.

use std::net::Ipv4Addr;
use std::time::Duration;

/// Fixed BOOTP header length before the magic cookie.
const HEADER_LEN: usize = 236;
const MAGIC_COOKIE: [u8; 4] = [99, 130, 83, 99];
/// BOOTP's minimum message size; some servers drop shorter requests.
const MIN_LEN: usize = 300;

pub const OP_REQUEST: u8 = 1;
pub const OP_REPLY: u8 = 2;
/// The "broadcast" flag: ask for replies to 255.255.255.255 because the
/// client cannot receive unicast before it has its address.
pub const FLAG_BROADCAST: u16 = 0x8000;

pub mod code {
    pub const PAD: u8 = 0;
    pub const SUBNET_MASK: u8 = 1;
    pub const ROUTER: u8 = 3;
    pub const DNS: u8 = 6;
    pub const HOSTNAME: u8 = 12;
    pub const DOMAIN_NAME: u8 = 15;
    pub const INTERFACE_MTU: u8 = 26;
    pub const NTP_SERVERS: u8 = 42;
    pub const REQUESTED_IP: u8 = 50;
    pub const LEASE_TIME: u8 = 51;
    pub const MESSAGE_TYPE: u8 = 53;
    pub const SERVER_ID: u8 = 54;
    pub const PARAMETER_LIST: u8 = 55;
    pub const MESSAGE: u8 = 56;
    pub const MAX_SIZE: u8 = 57;
    pub const RENEWAL_TIME: u8 = 58;
    pub const REBINDING_TIME: u8 = 59;
    pub const CLIENT_ID: u8 = 61;
    pub const CLASSLESS_ROUTES: u8 = 121;
    pub const END: u8 = 255;
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DhcpError {
    #[error("DHCP message of {0} bytes is shorter than the 240-byte header")]
    Truncated(usize),
    #[error("DHCP message lacks the magic cookie")]
    NoCookie,
    #[error("DHCP message has hardware address length {0}, expected 6 (Ethernet)")]
    HardwareLength(u8),
    #[error("DHCP option {code} runs past the end of the message")]
    OptionOverrun { code: u8 },
    #[error("DHCP option {code} has length {len}, which is invalid for it")]
    OptionLength { code: u8, len: usize },
    #[error("DHCP message type {0} is unknown")]
    MessageType(u8),
    #[error("DHCP option {code} is longer than 255 bytes ({len})")]
    OptionTooLong { code: u8, len: usize },
    /// A well-formed message whose lease no sane server would give.
    #[error("DHCP lease from {server} refused: {reason}")]
    Refused {
        server: std::net::Ipv4Addr,
        reason: String,
    },
}

/// Option 53.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    Discover = 1,
    Offer = 2,
    Request = 3,
    Decline = 4,
    Ack = 5,
    Nak = 6,
    Release = 7,
    Inform = 8,
}

impl TryFrom<u8> for MessageType {
    type Error = DhcpError;

    fn try_from(v: u8) -> Result<Self, DhcpError> {
        Ok(match v {
            1 => Self::Discover,
            2 => Self::Offer,
            3 => Self::Request,
            4 => Self::Decline,
            5 => Self::Ack,
            6 => Self::Nak,
            7 => Self::Release,
            8 => Self::Inform,
            other => return Err(DhcpError::MessageType(other)),
        })
    }
}

/// One DHCP message. `sname` and `file` are kept only so that a decoded
/// message encodes back to the same bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub op: u8,
    pub hops: u8,
    pub xid: u32,
    pub secs: u16,
    pub flags: u16,
    pub ciaddr: Ipv4Addr,
    pub yiaddr: Ipv4Addr,
    pub siaddr: Ipv4Addr,
    pub giaddr: Ipv4Addr,
    pub chaddr: [u8; 6],
    pub sname: Vec<u8>,
    pub file: Vec<u8>,
    pub options: Vec<(u8, Vec<u8>)>,
}

impl Message {
    /// A client request (BOOTREQUEST) with an empty option list.
    pub fn request(xid: u32, chaddr: [u8; 6]) -> Self {
        Message {
            op: OP_REQUEST,
            hops: 0,
            xid,
            secs: 0,
            flags: 0,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            yiaddr: Ipv4Addr::UNSPECIFIED,
            siaddr: Ipv4Addr::UNSPECIFIED,
            giaddr: Ipv4Addr::UNSPECIFIED,
            chaddr,
            sname: vec![0; 64],
            file: vec![0; 128],
            options: Vec::new(),
        }
    }

    pub fn decode(buf: &[u8]) -> Result<Self, DhcpError> {
        if buf.len() < HEADER_LEN + MAGIC_COOKIE.len() {
            return Err(DhcpError::Truncated(buf.len()));
        }
        if buf[236..240] != MAGIC_COOKIE {
            return Err(DhcpError::NoCookie);
        }
        // Only Ethernet is handled: htype 1, hlen 6.
        if buf[2] != 6 {
            return Err(DhcpError::HardwareLength(buf[2]));
        }
        let ip = |at: usize| Ipv4Addr::new(buf[at], buf[at + 1], buf[at + 2], buf[at + 3]);
        let mut chaddr = [0u8; 6];
        chaddr.copy_from_slice(&buf[28..34]);
        let mut options: Vec<(u8, Vec<u8>)> = Vec::new();
        let mut rest = &buf[240..];
        while let Some((&code, tail)) = rest.split_first() {
            match code {
                code::PAD => rest = tail,
                code::END => break,
                _ => {
                    let (&len, tail) = tail
                        .split_first()
                        .ok_or(DhcpError::OptionOverrun { code })?;
                    let len = usize::from(len);
                    if tail.len() < len {
                        return Err(DhcpError::OptionOverrun { code });
                    }
                    let (data, tail) = tail.split_at(len);
                    // RFC 3396: repeated codes are one option split in parts.
                    match options.iter_mut().find(|(c, _)| *c == code) {
                        Some((_, existing)) => existing.extend_from_slice(data),
                        None => options.push((code, data.to_vec())),
                    }
                    rest = tail;
                }
            }
        }
        Ok(Message {
            op: buf[0],
            hops: buf[3],
            xid: u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]),
            secs: u16::from_be_bytes([buf[8], buf[9]]),
            flags: u16::from_be_bytes([buf[10], buf[11]]),
            ciaddr: ip(12),
            yiaddr: ip(16),
            siaddr: ip(20),
            giaddr: ip(24),
            chaddr,
            sname: buf[44..108].to_vec(),
            file: buf[108..236].to_vec(),
            options,
        })
    }

    pub fn encode(&self) -> Result<Vec<u8>, DhcpError> {
        let mut out = Vec::with_capacity(MIN_LEN + 64);
        out.extend_from_slice(&[self.op, 1, 6, self.hops]);
        out.extend_from_slice(&self.xid.to_be_bytes());
        out.extend_from_slice(&self.secs.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        for a in [self.ciaddr, self.yiaddr, self.siaddr, self.giaddr] {
            out.extend_from_slice(&a.octets());
        }
        out.extend_from_slice(&self.chaddr);
        out.extend_from_slice(&[0; 10]);
        let mut fixed = |field: &[u8], len: usize| {
            let n = field.len().min(len);
            out.extend_from_slice(&field[..n]);
            out.resize(out.len() + len - n, 0);
        };
        fixed(&self.sname, 64);
        fixed(&self.file, 128);
        out.extend_from_slice(&MAGIC_COOKIE);
        for (code, data) in &self.options {
            let len = u8::try_from(data.len()).map_err(|_| DhcpError::OptionTooLong {
                code: *code,
                len: data.len(),
            })?;
            out.push(*code);
            out.push(len);
            out.extend_from_slice(data);
        }
        out.push(code::END);
        if out.len() < MIN_LEN {
            out.resize(MIN_LEN, 0);
        }
        Ok(out)
    }

    pub fn option(&self, code: u8) -> Option<&[u8]> {
        self.options
            .iter()
            .find(|(c, _)| *c == code)
            .map(|(_, d)| d.as_slice())
    }

    /// Sets (replaces) an option.
    pub fn set(&mut self, code: u8, data: Vec<u8>) {
        match self.options.iter_mut().find(|(c, _)| *c == code) {
            Some((_, existing)) => *existing = data,
            None => self.options.push((code, data)),
        }
    }

    pub fn message_type(&self) -> Result<Option<MessageType>, DhcpError> {
        match self.option(code::MESSAGE_TYPE) {
            None => Ok(None),
            Some([t]) => MessageType::try_from(*t).map(Some),
            Some(d) => Err(DhcpError::OptionLength {
                code: code::MESSAGE_TYPE,
                len: d.len(),
            }),
        }
    }

    fn addr_option(&self, code: u8) -> Result<Option<Ipv4Addr>, DhcpError> {
        match self.option(code) {
            None => Ok(None),
            Some(&[a, b, c, d]) => Ok(Some(Ipv4Addr::new(a, b, c, d))),
            Some(d) => Err(DhcpError::OptionLength { code, len: d.len() }),
        }
    }

    fn addr_list(&self, code: u8) -> Result<Vec<Ipv4Addr>, DhcpError> {
        match self.option(code) {
            None => Ok(Vec::new()),
            Some(d) if !d.is_empty() && d.len() % 4 == 0 => Ok(d
                .chunks_exact(4)
                .map(|c| Ipv4Addr::new(c[0], c[1], c[2], c[3]))
                .collect()),
            Some(d) => Err(DhcpError::OptionLength { code, len: d.len() }),
        }
    }

    fn seconds(&self, code: u8) -> Result<Option<Duration>, DhcpError> {
        match self.option(code) {
            None => Ok(None),
            Some(&[a, b, c, d]) => Ok(Some(Duration::from_secs(u64::from(u32::from_be_bytes([
                a, b, c, d,
            ]))))),
            Some(d) => Err(DhcpError::OptionLength { code, len: d.len() }),
        }
    }

    fn text(&self, code: u8) -> Option<String> {
        let d = self.option(code)?;
        // Some servers NUL-terminate strings.
        let d = d.split(|b| *b == 0).next().unwrap_or_default();
        let s = std::str::from_utf8(d).ok()?.trim();
        (!s.is_empty()).then(|| s.to_owned())
    }

    /// Option 26; values under 68 (RFC 791's minimum) are refused.
    fn mtu(&self) -> Result<Option<u16>, DhcpError> {
        match self.option(code::INTERFACE_MTU) {
            None => Ok(None),
            Some(&[a, b]) => {
                let mtu = u16::from_be_bytes([a, b]);
                if mtu < 68 {
                    Err(DhcpError::OptionLength {
                        code: code::INTERFACE_MTU,
                        len: usize::from(mtu),
                    })
                } else {
                    Ok(Some(mtu))
                }
            }
            Some(d) => Err(DhcpError::OptionLength {
                code: code::INTERFACE_MTU,
                len: d.len(),
            }),
        }
    }

    /// Option 121 (RFC 3442): each route is a prefix width, the
    /// significant octets of the destination, and the router (0.0.0.0:
    /// on-link). `None` when absent; a malformed option is an error.
    fn classless_routes(&self) -> Result<Option<Vec<StaticRoute>>, DhcpError> {
        let Some(mut d) = self.option(code::CLASSLESS_ROUTES) else {
            return Ok(None);
        };
        let bad = DhcpError::OptionLength {
            code: code::CLASSLESS_ROUTES,
            len: d.len(),
        };
        let mut routes = Vec::new();
        while let Some((&width, rest)) = d.split_first() {
            if width > 32 {
                return Err(bad);
            }
            let significant = usize::from(width).div_ceil(8);
            if rest.len() < significant + 4 {
                return Err(bad);
            }
            let mut dest = [0u8; 4];
            dest[..significant].copy_from_slice(&rest[..significant]);
            let r = &rest[significant..significant + 4];
            let mask = u32::MAX.checked_shl(32 - u32::from(width)).unwrap_or(0);
            routes.push(StaticRoute {
                destination: Ipv4Addr::from(u32::from_be_bytes(dest) & mask),
                prefix: width,
                router: Ipv4Addr::new(r[0], r[1], r[2], r[3]),
            });
            d = &rest[significant + 4..];
        }
        Ok(Some(routes))
    }

    /// The options a client acts on, checked for well-formed lengths.
    pub fn lease_options(&self) -> Result<LeaseOptions, DhcpError> {
        Ok(LeaseOptions {
            server_id: self.addr_option(code::SERVER_ID)?,
            subnet_mask: self.addr_option(code::SUBNET_MASK)?,
            routers: self.addr_list(code::ROUTER)?,
            dns: self.addr_list(code::DNS)?,
            ntp: self.addr_list(code::NTP_SERVERS)?,
            classless_routes: self.classless_routes()?,
            mtu: self.mtu()?,
            lease_time: self.seconds(code::LEASE_TIME)?,
            renewal_time: self.seconds(code::RENEWAL_TIME)?,
            rebinding_time: self.seconds(code::REBINDING_TIME)?,
            hostname: self.text(code::HOSTNAME),
            domain: self.text(code::DOMAIN_NAME),
            message: self.text(code::MESSAGE),
        })
    }
}

/// Typed view of a server's options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseOptions {
    pub server_id: Option<Ipv4Addr>,
    pub subnet_mask: Option<Ipv4Addr>,
    pub routers: Vec<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    /// Option 42: NTP servers, in order of preference.
    pub ntp: Vec<Ipv4Addr>,
    /// Option 121; when present, option 3 is ignored (RFC 3442).
    pub classless_routes: Option<Vec<StaticRoute>>,
    /// Option 26.
    pub mtu: Option<u16>,
    pub lease_time: Option<Duration>,
    pub renewal_time: Option<Duration>,
    pub rebinding_time: Option<Duration>,
    pub hostname: Option<String>,
    pub domain: Option<String>,
    pub message: Option<String>,
}

/// One route from option 121. `router` 0.0.0.0 means on-link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StaticRoute {
    pub destination: Ipv4Addr,
    pub prefix: u8,
    pub router: Ipv4Addr,
}

impl std::fmt::Display for StaticRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{} via {}",
            self.destination, self.prefix, self.router
        )
    }
}

/// Prefix length of a netmask; `None` when its ones are not contiguous.
pub fn mask_prefix(mask: Ipv4Addr) -> Option<u8> {
    let m = u32::from(mask);
    let ones = m.leading_ones();
    (m.checked_shl(ones).unwrap_or(0) == 0)
        .then(|| u8::try_from(ones).ok())
        .flatten()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A DHCPOFFER laid out the way QEMU's user-mode network (libslirp)
    /// builds one for a client with MAC 52:54:00:12:34:56 (BOOTP part
    /// padded to 548 bytes): op 2, xid 0x3903f326, flags 0x8000, yiaddr
    /// 10.0.2.15, siaddr 10.0.2.2; options 53=2, 54=10.0.2.2, 51=86400,
    /// 1=255.255.255.0, 3=10.0.2.2, 6=10.0.2.3, end.
    pub(crate) fn slirp_offer() -> Vec<u8> {
        let mut b = vec![0u8; 240];
        b[..4].copy_from_slice(&[2, 1, 6, 0]);
        b[4..8].copy_from_slice(&[0x39, 0x03, 0xf3, 0x26]);
        b[10..12].copy_from_slice(&[0x80, 0x00]);
        b[16..20].copy_from_slice(&[10, 0, 2, 15]);
        b[20..24].copy_from_slice(&[10, 0, 2, 2]);
        b[28..34].copy_from_slice(&[0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
        b[236..240].copy_from_slice(&MAGIC_COOKIE);
        b.extend_from_slice(&[
            53, 1, 2, // OFFER
            54, 4, 10, 0, 2, 2, // server id
            51, 4, 0x00, 0x01, 0x51, 0x80, // 86400 s
            1, 4, 255, 255, 255, 0, // mask
            3, 4, 10, 0, 2, 2, // router
            6, 4, 10, 0, 2, 3, // DNS
            255,
        ]);
        b.resize(548, 0);
        b
    }

    #[test]
    fn an_offer_decodes_and_encodes_back_to_the_same_bytes() {
        let bytes = slirp_offer();
        let m = Message::decode(&bytes).unwrap();
        assert_eq!(m.op, OP_REPLY);
        assert_eq!(m.xid, 0x3903_f326);
        assert_eq!(m.flags, FLAG_BROADCAST);
        assert_eq!(m.yiaddr, Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(m.chaddr, [0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
        assert_eq!(m.message_type().unwrap(), Some(MessageType::Offer));
        let o = m.lease_options().unwrap();
        assert_eq!(o.server_id, Some(Ipv4Addr::new(10, 0, 2, 2)));
        assert_eq!(o.subnet_mask.and_then(mask_prefix), Some(24));
        assert_eq!(o.routers, [Ipv4Addr::new(10, 0, 2, 2)]);
        assert_eq!(o.dns, [Ipv4Addr::new(10, 0, 2, 3)]);
        assert_eq!(o.lease_time, Some(Duration::from_secs(86400)));
        let mut again = m.encode().unwrap();
        // The offer is padded to 548 bytes after `end`; ours to 300.
        again.resize(bytes.len(), 0);
        assert_eq!(again, bytes);
    }

    #[test]
    fn a_request_encodes_to_the_expected_bytes() {
        let mut m = Message::request(0x0102_0304, [2, 0, 0, 0, 0, 1]);
        m.flags = FLAG_BROADCAST;
        m.set(code::MESSAGE_TYPE, vec![MessageType::Discover as u8]);
        m.set(code::PARAMETER_LIST, vec![1, 3, 6]);
        let b = m.encode().unwrap();
        assert_eq!(b.len(), MIN_LEN);
        assert_eq!(&b[..12], &[1, 1, 6, 0, 1, 2, 3, 4, 0, 0, 0x80, 0]);
        assert_eq!(&b[28..34], &[2, 0, 0, 0, 0, 1]);
        assert_eq!(
            &b[236..252],
            &[99, 130, 83, 99, 53, 1, 1, 55, 3, 1, 3, 6, 255, 0, 0, 0]
        );
        assert_eq!(Message::decode(&b).unwrap(), m);
    }

    #[test]
    fn split_options_are_joined_and_pads_skipped() {
        let mut b = slirp_offer();
        b.truncate(240);
        b.extend_from_slice(&[0, 0, 6, 4, 1, 1, 1, 1, 0, 6, 4, 8, 8, 8, 8, 255]);
        let m = Message::decode(&b).unwrap();
        assert_eq!(
            m.lease_options().unwrap().dns,
            [Ipv4Addr::new(1, 1, 1, 1), Ipv4Addr::new(8, 8, 8, 8)]
        );
    }

    #[test]
    fn classless_routes_and_mtu_decode_and_bad_ones_are_refused() {
        let mut b = slirp_offer();
        b.truncate(240);
        // 10.78.0.0/16 via 10.77.0.1, 0.0.0.0/0 via 10.77.0.1,
        // 192.168.5.0/24 on-link, 10.1.2.3/32 via 10.77.0.2; MTU 1400.
        b.extend_from_slice(&[
            121, 29, 16, 10, 78, 10, 77, 0, 1, 0, 10, 77, 0, 1, 24, 192, 168, 5, 0, 0, 0, 0, 32,
            10, 1, 2, 3, 10, 77, 0, 2, 26, 2, 0x05, 0x78, 255,
        ]);
        let o = Message::decode(&b).unwrap().lease_options().unwrap();
        let routes: Vec<String> = o
            .classless_routes
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            routes,
            [
                "10.78.0.0/16 via 10.77.0.1",
                "0.0.0.0/0 via 10.77.0.1",
                "192.168.5.0/24 via 0.0.0.0",
                "10.1.2.3/32 via 10.77.0.2"
            ]
        );
        assert_eq!(o.mtu, Some(1400));
        assert_eq!(
            Message::decode(&slirp_offer())
                .unwrap()
                .lease_options()
                .unwrap()
                .classless_routes,
            None
        );
        for bad in [
            &[121u8, 2, 33, 10][..],
            &[121, 4, 16, 10, 78, 10],
            &[26, 2, 0, 20],
            &[26, 1, 5],
        ] {
            let mut b = slirp_offer();
            b.truncate(240);
            b.extend_from_slice(bad);
            b.push(255);
            assert!(
                Message::decode(&b).unwrap().lease_options().is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn ntp_servers_come_from_option_42_and_a_bad_length_is_refused() {
        let m = Message::decode(&slirp_offer()).unwrap();
        assert!(m.lease_options().unwrap().ntp.is_empty());
        let mut b = slirp_offer();
        b.truncate(240);
        b.extend_from_slice(&[42, 8, 10, 0, 0, 1, 10, 0, 0, 2, 255]);
        let m = Message::decode(&b).unwrap();
        assert_eq!(
            m.lease_options().unwrap().ntp,
            [Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2)]
        );
        let mut b = slirp_offer();
        b.truncate(240);
        b.extend_from_slice(&[42, 3, 10, 0, 0, 255]);
        assert_eq!(
            Message::decode(&b).unwrap().lease_options(),
            Err(DhcpError::OptionLength {
                code: code::NTP_SERVERS,
                len: 3
            })
        );
    }

    #[test]
    fn malformed_messages_are_refused_with_the_reason() {
        let good = slirp_offer();
        assert_eq!(
            Message::decode(&good[..100]),
            Err(DhcpError::Truncated(100))
        );
        let mut b = good.clone();
        b[236] = 0;
        assert_eq!(Message::decode(&b), Err(DhcpError::NoCookie));
        let mut b = good.clone();
        b[2] = 16;
        assert_eq!(Message::decode(&b), Err(DhcpError::HardwareLength(16)));
        let mut b = good[..240].to_vec();
        b.extend_from_slice(&[6, 8, 1, 2]);
        assert_eq!(
            Message::decode(&b),
            Err(DhcpError::OptionOverrun { code: 6 })
        );
        let mut b = good[..240].to_vec();
        b.extend_from_slice(&[54, 3, 1, 2, 3, 53, 1, 9, 255]);
        let m = Message::decode(&b).unwrap();
        assert_eq!(
            m.lease_options(),
            Err(DhcpError::OptionLength { code: 54, len: 3 })
        );
        assert_eq!(m.message_type(), Err(DhcpError::MessageType(9)));
        let mut m = Message::request(1, [0; 6]);
        m.set(code::HOSTNAME, vec![b'a'; 300]);
        assert_eq!(
            m.encode(),
            Err(DhcpError::OptionTooLong { code: 12, len: 300 })
        );
    }

    #[test]
    fn netmasks_become_prefixes() {
        assert_eq!(mask_prefix(Ipv4Addr::new(255, 255, 255, 0)), Some(24));
        assert_eq!(mask_prefix(Ipv4Addr::new(255, 255, 240, 0)), Some(20));
        assert_eq!(mask_prefix(Ipv4Addr::new(255, 255, 255, 255)), Some(32));
        assert_eq!(mask_prefix(Ipv4Addr::new(0, 0, 0, 0)), Some(0));
        assert_eq!(mask_prefix(Ipv4Addr::new(255, 0, 255, 0)), None);
    }
}
