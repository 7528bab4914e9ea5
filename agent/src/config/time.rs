//! The `[time]` table: which NTP servers the SNTP client asks. Each entry
//! is parsed when the file loads (`host`, `host:port`, `IPv4`, `[IPv6]` or
//! `[IPv6]:port`), so a bad one is a configuration error naming the key.
//! Servers from DHCP option 42 are asked after these; with neither, the
//! clock is left alone.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The NTP port.
pub const NTP_PORT: u16 = 123;
/// Amazon's time service, reachable from every EC2 instance (and served
/// at the same link-local address by some other clouds).
pub const EC2_TIME_SERVER: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 123);

/// The `[time]` table.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeConfig {
    /// NTP servers, asked in order until one answers.
    #[serde(default)]
    pub servers: Vec<NtpServer>,
}

/// One NTP server: a host name or address, and a port (123 by default).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct NtpServer {
    pub host: String,
    pub port: u16,
}

impl NtpServer {
    pub fn ip(ip: IpAddr) -> NtpServer {
        NtpServer {
            host: ip.to_string(),
            port: NTP_PORT,
        }
    }

    /// Parses `host`, `host:port`, an IPv4 address (with `:port`), a bare
    /// IPv6 address, or `[IPv6]:port`.
    pub fn parse(s: &str) -> Result<NtpServer, String> {
        let bad = |why: &str| format!("NTP server {s:?}: {why}");
        let s = s.trim();
        if s.is_empty() {
            return Err(bad("empty"));
        }
        if let Ok(v6) = s.parse::<std::net::Ipv6Addr>() {
            return Ok(NtpServer::ip(IpAddr::V6(v6)));
        }
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (host, after) = rest.split_once(']').ok_or_else(|| bad("no closing ]"))?;
            host.parse::<std::net::Ipv6Addr>()
                .map_err(|_| bad("not an IPv6 address in brackets"))?;
            match after {
                "" => (host, None),
                p => (
                    host,
                    Some(p.strip_prefix(':').ok_or_else(|| bad("junk after ]"))?),
                ),
            }
        } else {
            match s.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (s, None),
            }
        };
        let port = match port {
            None => NTP_PORT,
            Some(p) => match p.parse::<u16>() {
                Ok(0) | Err(_) => return Err(bad("port must be 1..65535")),
                Ok(p) => p,
            },
        };
        let name_ok = host.parse::<IpAddr>().is_ok()
            || (host.len() <= 253
                && host.split('.').all(|label| {
                    !label.is_empty()
                        && label.len() <= 63
                        && label
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                        && !label.starts_with('-')
                        && !label.ends_with('-')
                }));
        if !name_ok {
            return Err(bad("not a host name or address"));
        }
        Ok(NtpServer {
            host: host.to_owned(),
            port,
        })
    }
}

impl fmt::Display for NtpServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v6 = self.host.parse::<std::net::Ipv6Addr>().is_ok();
        match (v6, self.port) {
            (false, NTP_PORT) => write!(f, "{}", self.host),
            (true, NTP_PORT) => write!(f, "[{}]", self.host),
            (false, p) => write!(f, "{}:{p}", self.host),
            (true, p) => write!(f, "[{}]:{p}", self.host),
        }
    }
}

impl Serialize for NtpServer {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for NtpServer {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        NtpServer::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// The servers a cloud platform offers every instance, for the metadata
/// source to put in front of DHCP's when it finds itself on such a cloud
/// (never used by default: a node elsewhere would wait on an address that
/// does not answer).
pub fn cloud_default_servers() -> Vec<NtpServer> {
    vec![NtpServer::ip(IpAddr::V4(EC2_TIME_SERVER))]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_parse_in_every_written_form_and_print_back() {
        let config: TimeConfig = toml::from_str(
            r#"servers = ["time.example.org", "127.0.0.1:11123", "10.0.0.1", "fd00::1", "[fd00::2]:1123", "[fd00::3]"]"#,
        )
        .unwrap();
        let shown: Vec<String> = config.servers.iter().map(|s| s.to_string()).collect();
        assert_eq!(
            shown,
            [
                "time.example.org",
                "127.0.0.1:11123",
                "10.0.0.1",
                "[fd00::1]",
                "[fd00::2]:1123",
                "[fd00::3]"
            ]
        );
        assert_eq!(config.servers[1].port, 11123);
        assert_eq!(config.servers[3].port, NTP_PORT);
        assert_eq!(config.servers[4].host, "fd00::2");
        let again: TimeConfig = toml::from_str(&toml::to_string(&config).unwrap()).unwrap();
        assert_eq!(again, config);
    }

    #[test]
    fn bad_servers_are_errors_naming_the_value() {
        for bad in [
            "",
            "a b",
            "host:0",
            "host:99999",
            "host:x",
            "-bad.example",
            "[fd00::1",
            "[nope]:123",
            "[fd00::1]x",
            "a..b",
        ] {
            let text = format!("servers = [{bad:?}]");
            let err = toml::from_str::<TimeConfig>(&text).unwrap_err().to_string();
            assert!(err.contains("NTP server"), "{bad:?}: {err}");
        }
        let err = toml::from_str::<TimeConfig>("server = [\"x\"]")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field"), "{err}");
    }

    #[test]
    fn the_cloud_default_is_the_ec2_time_service() {
        assert_eq!(
            cloud_default_servers(),
            [NtpServer {
                host: "169.254.169.123".into(),
                port: 123
            }]
        );
    }
}
