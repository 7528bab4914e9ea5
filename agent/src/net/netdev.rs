//! Bonds and VLANs from `[network.bonds]` and `[network.vlans]`
//! ([`crate::config::netdev`]), made through rtnetlink like every other
//! link change. Bonds are created when the manager starts (the bonding
//! module loaded with `max_bonds=0`, so it makes no `bond0` of its own);
//! a member NIC is enslaved, and a VLAN created on its link, when that link
//! appears, so NICs found late (hotplug) join too. What to do about an
//! appearing link is decided by the pure [`on_appeared`].

use std::collections::BTreeMap;
use std::path::Path;

use futures_util::TryStreamExt;

use crate::config::netdev::{bond_of, BondConfig, VlanConfig};

#[derive(Debug, thiserror::Error)]
pub enum NetdevError {
    #[error("loading kernel module {module}")]
    Module {
        module: &'static str,
        #[source]
        source: crate::boot::modules::ModuleError,
    },
    #[error("{link}: {what}")]
    Netlink {
        link: String,
        what: &'static str,
        #[source]
        source: Box<rtnetlink::Error>,
    },
    #[error("{link}: no such link after creating it")]
    Missing { link: String },
}

/// The configured bonds and VLANs.
#[derive(Debug, Clone, Default)]
pub struct Netdevs {
    pub bonds: BTreeMap<String, BondConfig>,
    pub vlans: BTreeMap<String, VlanConfig>,
}

/// What to do when a link appears.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Put the member NIC into its bond.
    Enslave { member: String, bond: String },
    /// Create the VLAN on the link that appeared.
    CreateVlan { name: String, id: u16 },
}

/// The actions a link named `name` appearing calls for: its enslavement
/// when it is a bond member, the VLANs that ride on it.
pub fn on_appeared(netdevs: &Netdevs, name: &str) -> Vec<Action> {
    let mut out = Vec::new();
    if let Some(bond) = bond_of(&netdevs.bonds, name) {
        out.push(Action::Enslave {
            member: name.to_owned(),
            bond: bond.to_owned(),
        });
    }
    for (vlan, cfg) in &netdevs.vlans {
        if cfg.link == name {
            out.push(Action::CreateVlan {
                name: vlan.clone(),
                id: cfg.id,
            });
        }
    }
    out
}

impl Netdevs {
    /// Whether `name` is a bond member (never managed on its own, never
    /// the default link).
    pub fn is_member(&self, name: &str) -> bool {
        bond_of(&self.bonds, name).is_some()
    }

    /// Loads the modules the configuration needs and creates the bonds.
    /// `existing` maps the links present now, name to index (for a
    /// `primary` that exists already). A bond of the same name made by
    /// someone else is replaced.
    pub async fn create_bonds(
        &self,
        handle: &rtnetlink::Handle,
        modules: &Path,
        existing: &BTreeMap<String, u32>,
    ) -> Result<(), NetdevError> {
        if !self.bonds.is_empty() {
            crate::boot::modules::load_with_params(modules, "bonding", "max_bonds=0").map_err(
                |source| NetdevError::Module {
                    module: "bonding",
                    source,
                },
            )?;
        }
        if !self.vlans.is_empty() {
            crate::boot::modules::load(modules, &["8021q"]).map_err(|source| {
                NetdevError::Module {
                    module: "8021q",
                    source,
                }
            })?;
        }
        for (name, bond) in &self.bonds {
            if let Some(index) = existing.get(name) {
                tracing::warn!(bond = %name, "a link of the bond's name exists; replacing it");
                handle
                    .link()
                    .del(*index)
                    .execute()
                    .await
                    .map_err(nl(name, "deleting the old link"))?;
            }
            let mut req = handle
                .link()
                .add()
                .bond(name.clone())
                .mode(bond.mode.kernel_value())
                .miimon(bond.miimon());
            if let Some(rate) = bond.lacp_rate {
                req = req.ad_lacp_rate(rate.kernel_value());
            }
            match bond.primary.as_ref().map(|p| (p, existing.get(p))) {
                Some((_, Some(index))) => req = req.primary(*index),
                Some((p, None)) => {
                    tracing::warn!(bond = %name, primary = %p, "primary member not present yet; the bond picks its active member")
                }
                None => {}
            }
            req.execute().await.map_err(nl(name, "creating the bond"))?;
            tracing::info!(bond = %name, mode = bond.mode.as_str(), members = ?bond.interfaces, "bond created");
        }
        Ok(())
    }

    /// Carries out one [`Action`] for the link `index` that appeared.
    pub async fn apply(
        &self,
        handle: &rtnetlink::Handle,
        action: &Action,
        index: u32,
    ) -> Result<(), NetdevError> {
        match action {
            Action::Enslave { member, bond } => {
                let bond_index = index_of(handle, bond)
                    .await?
                    .ok_or_else(|| NetdevError::Missing { link: bond.clone() })?;
                // The kernel takes only a member that is down; the bond
                // brings it up.
                handle
                    .link()
                    .set(index)
                    .down()
                    .execute()
                    .await
                    .map_err(nl(member, "bringing down to enslave"))?;
                handle
                    .link()
                    .set(index)
                    .controller(bond_index)
                    .execute()
                    .await
                    .map_err(nl(member, "adding to the bond"))?;
                handle
                    .link()
                    .set(index)
                    .up()
                    .execute()
                    .await
                    .map_err(nl(member, "bringing up in the bond"))?;
                tracing::info!(%member, %bond, "bond member added");
            }
            Action::CreateVlan { name, id } => {
                if index_of(handle, name).await?.is_some() {
                    return Ok(());
                }
                // The kernel refuses an up VLAN on a down link (ENETDOWN);
                // the link's own task would bring it up anyway.
                handle
                    .link()
                    .set(index)
                    .up()
                    .execute()
                    .await
                    .map_err(nl(name, "bringing up the VLAN's link"))?;
                handle
                    .link()
                    .add()
                    .vlan(name.clone(), index, *id)
                    .execute()
                    .await
                    .map_err(nl(name, "creating the VLAN"))?;
                tracing::info!(vlan = %name, id, link_index = index, "VLAN created");
            }
        }
        Ok(())
    }
}

fn nl(link: &str, what: &'static str) -> impl FnOnce(rtnetlink::Error) -> NetdevError {
    let link = link.to_owned();
    move |source| NetdevError::Netlink {
        link,
        what,
        source: Box::new(source),
    }
}

/// The index of the link named `name`, if there is one.
async fn index_of(handle: &rtnetlink::Handle, name: &str) -> Result<Option<u32>, NetdevError> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(found) => Ok(found.map(|m| m.header.index)),
        // ENODEV: no such link.
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -nix::libc::ENODEV => Ok(None),
        Err(source) => Err(NetdevError::Netlink {
            link: name.to_owned(),
            what: "looking up",
            source: Box::new(source),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::netdev::BondMode;

    fn netdevs() -> Netdevs {
        let mut n = Netdevs::default();
        n.bonds.insert(
            "bond0".into(),
            BondConfig {
                mode: BondMode::ActiveBackup,
                interfaces: vec!["eth0".into(), "eth1".into()],
                primary: Some("eth0".into()),
                miimon_ms: None,
                lacp_rate: None,
            },
        );
        for (name, link, id) in [
            ("bond0.7", "bond0", 7),
            ("mgmt", "eth2", 20),
            ("san", "eth2", 30),
        ] {
            n.vlans.insert(
                name.into(),
                VlanConfig {
                    link: link.into(),
                    id,
                },
            );
        }
        n
    }

    #[test]
    fn members_join_their_bond_and_vlans_follow_their_link() {
        let n = netdevs();
        assert_eq!(
            on_appeared(&n, "eth1"),
            vec![Action::Enslave {
                member: "eth1".into(),
                bond: "bond0".into()
            }]
        );
        assert_eq!(
            on_appeared(&n, "bond0"),
            vec![Action::CreateVlan {
                name: "bond0.7".into(),
                id: 7
            }]
        );
        assert_eq!(
            on_appeared(&n, "eth2"),
            vec![
                Action::CreateVlan {
                    name: "mgmt".into(),
                    id: 20
                },
                Action::CreateVlan {
                    name: "san".into(),
                    id: 30
                }
            ]
        );
        assert!(on_appeared(&n, "eth3").is_empty());
        assert!(on_appeared(&n, "mgmt").is_empty());
        assert!(n.is_member("eth0") && !n.is_member("eth2") && !n.is_member("bond0"));
    }
}
