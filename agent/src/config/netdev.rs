//! `[network.bonds.<name>]` and `[network.vlans.<name>]`: the virtual links
//! the network manager creates before it manages addresses (bonds of NICs
//! in active-backup or 802.3ad mode, 802.1Q VLANs on a NIC or a bond).
//! Addresses, DHCP and routes of a bond or VLAN come from
//! `[network.interfaces.<name>]` like any link's. [`validate`] checks the
//! whole `[network]` table and names the key of each mistake.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// Longest Linux interface name (IFNAMSIZ - 1).
pub const IFNAME_MAX: usize = 15;
/// The MII link-check interval unless `miimon_ms` says otherwise.
pub const DEFAULT_MIIMON_MS: u32 = 100;

/// One bond: `[network.bonds.<name>]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BondConfig {
    pub mode: BondMode,
    /// The member NICs (at least one); they carry no address of their own.
    pub interfaces: Vec<String>,
    /// active-backup only: the member used whenever its link is up.
    pub primary: Option<String>,
    /// Link check interval in milliseconds (MII monitoring); 100 by default.
    pub miimon_ms: Option<u32>,
    /// 802.3ad only: how often the partner sends LACPDUs; `slow` by default.
    pub lacp_rate: Option<LacpRate>,
}

impl BondConfig {
    pub fn miimon(&self) -> u32 {
        self.miimon_ms.unwrap_or(DEFAULT_MIIMON_MS)
    }
}

/// `network.bonds.<name>.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BondMode {
    /// One member carries the traffic; another takes over when it fails.
    #[serde(rename = "active-backup")]
    ActiveBackup,
    /// IEEE 802.3ad link aggregation (LACP); the switch must take part.
    #[serde(rename = "802.3ad")]
    Lacp,
}

impl BondMode {
    /// The kernel's `IFLA_BOND_MODE` value.
    pub fn kernel_value(self) -> u8 {
        match self {
            BondMode::ActiveBackup => 1,
            BondMode::Lacp => 4,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            BondMode::ActiveBackup => "active-backup",
            BondMode::Lacp => "802.3ad",
        }
    }
}

/// `network.bonds.<name>.lacp_rate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LacpRate {
    /// Every 30 seconds.
    Slow,
    /// Every second.
    Fast,
}

impl LacpRate {
    /// The kernel's `IFLA_BOND_AD_LACP_RATE` value.
    pub fn kernel_value(self) -> u8 {
        match self {
            LacpRate::Slow => 0,
            LacpRate::Fast => 1,
        }
    }
}

/// One VLAN: `[network.vlans.<name>]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VlanConfig {
    /// The link carrying the tagged frames: a NIC or a bond.
    pub link: String,
    /// The 802.1Q VLAN ID, 1 to 4094.
    pub id: u16,
}

/// A mistake in `[network]`, naming its key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetdevError {
    #[error("{key}: {name:?} is not an interface name (1 to 15 characters, no '/', ':', whitespace, not '.' or '..')")]
    Name { key: String, name: String },
    #[error("network.bonds.{bond}.interfaces: a bond needs at least one member")]
    NoMembers { bond: String },
    #[error("network.bonds.{bond}.interfaces: {member:?} is listed twice")]
    DuplicateMember { bond: String, member: String },
    #[error("network.bonds.{bond}.interfaces: {member:?} is already a member of bond {other:?}")]
    MemberOfTwo {
        bond: String,
        member: String,
        other: String,
    },
    #[error(
        "network.bonds.{bond}.interfaces: {member:?} is a bond or VLAN itself; members are NICs"
    )]
    VirtualMember { bond: String, member: String },
    #[error("network.bonds.{bond}.primary: {primary:?} is not one of its interfaces")]
    PrimaryNotMember { bond: String, primary: String },
    #[error("network.bonds.{bond}.{key}: only for mode {wants:?}")]
    WrongMode {
        bond: String,
        key: &'static str,
        wants: &'static str,
    },
    #[error("network.bonds.{bond}.miimon_ms: must be 1 or more (0 turns link monitoring off, so a dead member is never noticed)")]
    Miimon { bond: String },
    #[error("network.vlans.{vlan}.id: {id} is not a VLAN ID (1 to 4094)")]
    VlanId { vlan: String, id: u16 },
    #[error("network.vlans.{vlan}.link: {link:?} is a VLAN; VLANs go on a NIC or a bond")]
    VlanOnVlan { vlan: String, link: String },
    #[error("network.vlans.{vlan}.link: {link:?} is a member of bond {bond:?}; put the VLAN on the bond")]
    VlanOnMember {
        vlan: String,
        link: String,
        bond: String,
    },
    #[error("network.vlans.{vlan}: {link:?} already has VLAN {id} as {other:?}")]
    VlanTwice {
        vlan: String,
        link: String,
        id: u16,
        other: String,
    },
    #[error("network.vlans.{name}: a bond has that name too")]
    NameClash { name: String },
    #[error("network.interfaces.{member}: {member:?} is a member of bond {bond:?} and carries no address; configure the bond")]
    ConfiguredMember { member: String, bond: String },
}

/// Whether `name` can be a Linux interface name (the kernel's
/// `dev_valid_name`; ':' is refused too, being the old alias syntax).
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= IFNAME_MAX
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
}

/// Checks bonds and VLANs against each other and against the configured
/// interfaces (`[network.interfaces]`, whose names are given).
pub fn validate<'a>(
    bonds: &BTreeMap<String, BondConfig>,
    vlans: &BTreeMap<String, VlanConfig>,
    interfaces: impl IntoIterator<Item = &'a String>,
) -> Result<(), NetdevError> {
    let mut member_of: BTreeMap<&str, &str> = BTreeMap::new();
    for (name, bond) in bonds {
        if !valid_ifname(name) {
            return Err(NetdevError::Name {
                key: format!("network.bonds.{name}"),
                name: name.clone(),
            });
        }
        if bond.interfaces.is_empty() {
            return Err(NetdevError::NoMembers { bond: name.clone() });
        }
        let mut seen = BTreeSet::new();
        for m in &bond.interfaces {
            if !valid_ifname(m) {
                return Err(NetdevError::Name {
                    key: format!("network.bonds.{name}.interfaces"),
                    name: m.clone(),
                });
            }
            if !seen.insert(m.as_str()) {
                return Err(NetdevError::DuplicateMember {
                    bond: name.clone(),
                    member: m.clone(),
                });
            }
            if bonds.contains_key(m) || vlans.contains_key(m) {
                return Err(NetdevError::VirtualMember {
                    bond: name.clone(),
                    member: m.clone(),
                });
            }
            if let Some(other) = member_of.insert(m, name) {
                return Err(NetdevError::MemberOfTwo {
                    bond: name.clone(),
                    member: m.clone(),
                    other: other.to_owned(),
                });
            }
        }
        if let Some(p) = &bond.primary {
            if bond.mode != BondMode::ActiveBackup {
                return Err(NetdevError::WrongMode {
                    bond: name.clone(),
                    key: "primary",
                    wants: BondMode::ActiveBackup.as_str(),
                });
            }
            if !bond.interfaces.contains(p) {
                return Err(NetdevError::PrimaryNotMember {
                    bond: name.clone(),
                    primary: p.clone(),
                });
            }
        }
        if bond.lacp_rate.is_some() && bond.mode != BondMode::Lacp {
            return Err(NetdevError::WrongMode {
                bond: name.clone(),
                key: "lacp_rate",
                wants: BondMode::Lacp.as_str(),
            });
        }
        if bond.miimon_ms == Some(0) {
            return Err(NetdevError::Miimon { bond: name.clone() });
        }
    }
    let mut tags: BTreeMap<(&str, u16), &str> = BTreeMap::new();
    for (name, vlan) in vlans {
        if !valid_ifname(name) {
            return Err(NetdevError::Name {
                key: format!("network.vlans.{name}"),
                name: name.clone(),
            });
        }
        if bonds.contains_key(name) {
            return Err(NetdevError::NameClash { name: name.clone() });
        }
        if !valid_ifname(&vlan.link) {
            return Err(NetdevError::Name {
                key: format!("network.vlans.{name}.link"),
                name: vlan.link.clone(),
            });
        }
        if !(1..=4094).contains(&vlan.id) {
            return Err(NetdevError::VlanId {
                vlan: name.clone(),
                id: vlan.id,
            });
        }
        if vlans.contains_key(&vlan.link) {
            return Err(NetdevError::VlanOnVlan {
                vlan: name.clone(),
                link: vlan.link.clone(),
            });
        }
        if let Some(bond) = member_of.get(vlan.link.as_str()) {
            return Err(NetdevError::VlanOnMember {
                vlan: name.clone(),
                link: vlan.link.clone(),
                bond: (*bond).to_owned(),
            });
        }
        if let Some(other) = tags.insert((&vlan.link, vlan.id), name) {
            return Err(NetdevError::VlanTwice {
                vlan: name.clone(),
                link: vlan.link.clone(),
                id: vlan.id,
                other: other.to_owned(),
            });
        }
    }
    for iface in interfaces {
        if let Some(bond) = member_of.get(iface.as_str()) {
            return Err(NetdevError::ConfiguredMember {
                member: iface.clone(),
                bond: (*bond).to_owned(),
            });
        }
    }
    Ok(())
}

/// The bond `name` is a member of, if any.
pub fn bond_of<'a>(bonds: &'a BTreeMap<String, BondConfig>, name: &str) -> Option<&'a str> {
    bonds
        .iter()
        .find(|(_, b)| b.interfaces.iter().any(|m| m == name))
        .map(|(n, _)| n.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct Net {
        #[serde(default)]
        bonds: BTreeMap<String, BondConfig>,
        #[serde(default)]
        vlans: BTreeMap<String, VlanConfig>,
        #[serde(default)]
        interfaces: BTreeMap<String, toml::Value>,
    }

    fn check(text: &str) -> Result<Net, String> {
        let net: Net = toml::from_str(text).map_err(|e| e.to_string())?;
        validate(&net.bonds, &net.vlans, net.interfaces.keys()).map_err(|e| e.to_string())?;
        Ok(net)
    }

    #[test]
    fn a_bond_with_a_vlan_on_it_is_accepted() {
        let net = check(
            r#"
            [bonds.bond0]
            mode = "802.3ad"
            interfaces = ["eth0", "eth1"]
            lacp_rate = "fast"
            [bonds.bond1]
            mode = "active-backup"
            interfaces = ["eth2", "eth3"]
            primary = "eth3"
            miimon_ms = 50
            [vlans."bond0.100"]
            link = "bond0"
            id = 100
            [vlans.storage]
            link = "eth4"
            id = 4094
            [interfaces."bond0.100"]
            [interfaces.bond1]
            "#,
        )
        .unwrap();
        let b0 = &net.bonds["bond0"];
        assert_eq!(b0.mode.kernel_value(), 4);
        assert_eq!(b0.lacp_rate.map(LacpRate::kernel_value), Some(1));
        assert_eq!(b0.miimon(), DEFAULT_MIIMON_MS);
        let b1 = &net.bonds["bond1"];
        assert_eq!(b1.mode.kernel_value(), 1);
        assert_eq!(b1.miimon(), 50);
        assert_eq!(net.vlans["bond0.100"].id, 100);
        assert_eq!(bond_of(&net.bonds, "eth3"), Some("bond1"));
        assert_eq!(bond_of(&net.bonds, "eth4"), None);
    }

    #[test]
    fn every_mistake_names_its_key() {
        let cases: &[(&str, &str)] = &[
            (
                "[bonds.bond0]\nmode = \"balance-rr\"\ninterfaces = [\"eth0\"]\n",
                "unknown variant `balance-rr`",
            ),
            (
                "[bonds.bond0]\nmode = \"active-backup\"\ninterfaces = []\n",
                "network.bonds.bond0.interfaces: a bond needs at least one member",
            ),
            (
                "[bonds.bond0]\nmode = \"active-backup\"\ninterfaces = [\"eth0\", \"eth0\"]\n",
                "network.bonds.bond0.interfaces: \"eth0\" is listed twice",
            ),
            (
                "[bonds.a]\nmode = \"active-backup\"\ninterfaces = [\"eth0\"]\n\
                 [bonds.b]\nmode = \"active-backup\"\ninterfaces = [\"eth0\"]\n",
                "network.bonds.b.interfaces: \"eth0\" is already a member of bond \"a\"",
            ),
            (
                "[bonds.a]\nmode = \"active-backup\"\ninterfaces = [\"b\"]\n\
                 [bonds.b]\nmode = \"active-backup\"\ninterfaces = [\"eth0\"]\n",
                "network.bonds.a.interfaces: \"b\" is a bond or VLAN itself",
            ),
            (
                "[bonds.bond0]\nmode = \"active-backup\"\ninterfaces = [\"eth0\"]\nprimary = \"eth1\"\n",
                "network.bonds.bond0.primary: \"eth1\" is not one of its interfaces",
            ),
            (
                "[bonds.bond0]\nmode = \"802.3ad\"\ninterfaces = [\"eth0\"]\nprimary = \"eth0\"\n",
                "network.bonds.bond0.primary: only for mode \"active-backup\"",
            ),
            (
                "[bonds.bond0]\nmode = \"active-backup\"\ninterfaces = [\"eth0\"]\nlacp_rate = \"fast\"\n",
                "network.bonds.bond0.lacp_rate: only for mode \"802.3ad\"",
            ),
            (
                "[bonds.bond0]\nmode = \"active-backup\"\ninterfaces = [\"eth0\"]\nmiimon_ms = 0\n",
                "network.bonds.bond0.miimon_ms: must be 1 or more",
            ),
            (
                "[bonds.bond0]\nmode = \"active-backup\"\ninterfaces = [\"eth0\"]\nmtu = 9000\n",
                "unknown field `mtu`",
            ),
            (
                "[bonds.averyveryverylongname]\nmode = \"active-backup\"\ninterfaces = [\"eth0\"]\n",
                "network.bonds.averyveryverylongname: \"averyveryverylongname\" is not an interface name",
            ),
            (
                "[bonds.bond0]\nmode = \"active-backup\"\ninterfaces = [\"eth/0\"]\n",
                "network.bonds.bond0.interfaces: \"eth/0\" is not an interface name",
            ),
            (
                "[vlans.v]\nlink = \"eth0\"\nid = 0\n",
                "network.vlans.v.id: 0 is not a VLAN ID (1 to 4094)",
            ),
            (
                "[vlans.v]\nlink = \"eth0\"\nid = 4095\n",
                "network.vlans.v.id: 4095 is not a VLAN ID",
            ),
            (
                "[vlans.v]\nlink = \"eth0\"\nid = 70000\n",
                "invalid value",
            ),
            (
                "[vlans.v]\nlink = \"w\"\nid = 5\n[vlans.w]\nlink = \"eth0\"\nid = 6\n",
                "network.vlans.v.link: \"w\" is a VLAN",
            ),
            (
                "[vlans.v]\nlink = \"eth0\"\nid = 5\n[vlans.w]\nlink = \"eth0\"\nid = 5\n",
                "network.vlans.w: \"eth0\" already has VLAN 5 as \"v\"",
            ),
            (
                "[bonds.bond0]\nmode = \"active-backup\"\ninterfaces = [\"eth0\"]\n\
                 [vlans.v]\nlink = \"eth0\"\nid = 5\n",
                "network.vlans.v.link: \"eth0\" is a member of bond \"bond0\"; put the VLAN on the bond",
            ),
            (
                "[bonds.x]\nmode = \"active-backup\"\ninterfaces = [\"eth0\"]\n\
                 [vlans.x]\nlink = \"eth1\"\nid = 5\n",
                "network.vlans.x: a bond has that name too",
            ),
            (
                "[vlans.v]\nlink = \"\"\nid = 5\n",
                "network.vlans.v.link: \"\" is not an interface name",
            ),
            (
                "[bonds.bond0]\nmode = \"active-backup\"\ninterfaces = [\"eth0\"]\n\
                 [interfaces.eth0]\n",
                "network.interfaces.eth0: \"eth0\" is a member of bond \"bond0\" and carries no address",
            ),
        ];
        for (text, want) in cases {
            let err = check(text)
                .err()
                .unwrap_or_else(|| panic!("accepted: {text}"));
            assert!(err.contains(want), "{text}\n  gave {err}\n  wanted {want}");
        }
    }

    #[test]
    fn interface_names_follow_the_kernel() {
        for ok in [
            "eth0",
            "bond0.100",
            "a",
            "enp0s31f6",
            "x-y_z",
            "123456789012345",
        ] {
            assert!(valid_ifname(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a b",
            "a:1",
            "1234567890123456",
            "tab\t",
        ] {
            assert!(!valid_ifname(bad), "{bad:?}");
        }
    }
}
