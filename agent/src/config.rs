//! Node configuration: the TOML schema and where it comes from. User-data
//! arrives at first boot through QEMU's fw_cfg (`opt/ballast/user-data`) and
//! is kept on STATE so later boots need no source. Unknown keys and wrong
//! types are errors that name the source and key; a bad config leaves the
//! last good one in force.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// fw_cfg entry exposed by the `qemu_fw_cfg` driver.
pub const FW_CFG_USER_DATA: &str = "/sys/firmware/qemu_fw_cfg/by_name/opt/ballast/user-data/raw";
/// Where user-data is kept once seen.
pub const SAVED_USER_DATA: &str = "/var/lib/ballast/user-data.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The TOML error already says line, column and key; it is part of
    /// this message rather than a separate cause so it is printed once.
    #[error("{path}: {detail}")]
    Parse {
        path: PathBuf,
        detail: toml::de::Error,
    },
    #[error("{path}: interface {interface}: address {value:?} is not ADDRESS/PREFIX")]
    Address {
        path: PathBuf,
        interface: String,
        value: String,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub hostname: Option<String>,
    #[serde(default)]
    pub api: ApiConfig,
    #[serde(default)]
    pub network: NetworkConfig,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// TCP address for the API besides the Unix socket; off when unset.
    pub listen: Option<SocketAddr>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    #[serde(default)]
    pub interfaces: BTreeMap<String, InterfaceConfig>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterfaceConfig {
    /// `ADDRESS/PREFIX`, IPv4 or IPv6.
    #[serde(default)]
    pub addresses: Vec<String>,
    pub gateway: Option<IpAddr>,
    #[serde(default)]
    pub dns: Vec<IpAddr>,
}

/// An address with its prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

pub fn parse_cidr(s: &str) -> Option<Cidr> {
    let (addr, prefix) = s.split_once('/')?;
    let addr: IpAddr = addr.parse().ok()?;
    let prefix: u8 = prefix.parse().ok()?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    (prefix <= max).then_some(Cidr { addr, prefix })
}

impl Config {
    /// Parses and validates one TOML document; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|detail| ConfigError::Parse {
            path: path.to_owned(),
            detail,
        })?;
        for (name, iface) in &config.network.interfaces {
            for a in &iface.addresses {
                if parse_cidr(a).is_none() {
                    return Err(ConfigError::Address {
                        path: path.to_owned(),
                        interface: name.clone(),
                        value: a.clone(),
                    });
                }
            }
        }
        Ok(config)
    }
}

/// Finds user-data: fw_cfg first (and keeps a copy on STATE), else the
/// copy from an earlier boot. Returns the text and where it came from.
pub fn find_user_data() -> Option<(String, PathBuf)> {
    if let Ok(text) = std::fs::read_to_string(FW_CFG_USER_DATA) {
        let saved = Path::new(SAVED_USER_DATA);
        if let Some(dir) = saved.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        if let Err(e) = std::fs::write(saved, &text) {
            tracing::warn!(error = %e, "user-data not kept on STATE");
        }
        return Some((text, FW_CFG_USER_DATA.into()));
    }
    std::fs::read_to_string(SAVED_USER_DATA)
        .ok()
        .map(|t| (t, SAVED_USER_DATA.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_example_parses() {
        let text = r#"
hostname = "node-1"
[api]
listen = "0.0.0.0:9465"
[network.interfaces.eth0]
addresses = ["10.0.2.15/24"]
gateway = "10.0.2.2"
dns = ["10.0.2.3"]
"#;
        let c = Config::parse(text, Path::new("user-data")).unwrap();
        assert_eq!(c.hostname.as_deref(), Some("node-1"));
        assert_eq!(c.api.listen.unwrap().port(), 9465);
        let eth0 = &c.network.interfaces["eth0"];
        assert_eq!(parse_cidr(&eth0.addresses[0]).unwrap().prefix, 24);
    }

    #[test]
    fn errors_name_the_source_and_key() {
        let err = Config::parse("hostnme = \"x\"\n", Path::new("/etc/x.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/etc/x.toml") && err.contains("hostnme"),
            "{err}"
        );
        let err = Config::parse("[api]\nlisten = 5\n", Path::new("u"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("listen"), "{err}");
        let err = Config::parse(
            "[network.interfaces.eth0]\naddresses = [\"10.0.0.1\"]\n",
            Path::new("u"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("eth0") && err.contains("10.0.0.1"), "{err}");
        assert!(parse_cidr("10.0.0.1/33").is_none());
    }
}
