//! Link state from rtnetlink (`RTM_NEWLINK`/`RTM_DELLINK`, group
//! RTNLGRP_LINK) turned into the changes the network manager acts on:
//! a link appeared, lost its carrier, got it back, or went away. The
//! tracker is pure so the event → action logic is tested without root.

use std::collections::BTreeMap;

use netlink_packet_route::link::{LinkAttribute, LinkFlag, LinkLayerType, LinkMessage};

/// What the kernel said about one link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    pub index: u32,
    pub name: String,
    /// ARPHRD_ETHER.
    pub ethernet: bool,
    /// Backed by a device (`/sys/class/net/<name>/device`), not a virtual
    /// link such as a bridge, veth or tunnel.
    pub physical: bool,
    /// IFF_LOWER_UP: the carrier is there.
    pub carrier: bool,
    pub mac: Option<[u8; 6]>,
}

impl LinkInfo {
    /// Reads a netlink link message; `physical` is looked up in sysfs.
    pub fn from_message(msg: &LinkMessage) -> Option<Self> {
        let name = msg.attributes.iter().find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        })?;
        let mac = msg.attributes.iter().find_map(|a| match a {
            LinkAttribute::Address(b) => <[u8; 6]>::try_from(b.as_slice()).ok(),
            _ => None,
        });
        let physical = std::path::Path::new("/sys/class/net")
            .join(&name)
            .join("device")
            .exists();
        Some(LinkInfo {
            index: msg.header.index,
            ethernet: msg.header.link_layer_type == LinkLayerType::Ether,
            physical,
            carrier: msg.header.flags.contains(&LinkFlag::LowerUp),
            mac,
            name,
        })
    }
}

/// A change the manager acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkChange {
    Appeared(LinkInfo),
    CarrierLost(String),
    CarrierBack(String),
    Removed(String),
}

/// The last known state of every link, by index.
#[derive(Debug, Default)]
pub struct LinkTracker {
    links: BTreeMap<u32, LinkInfo>,
}

impl LinkTracker {
    /// A new or changed link (`RTM_NEWLINK`). Repeated messages without a
    /// carrier change (the kernel sends many) yield nothing.
    pub fn update(&mut self, info: LinkInfo) -> Option<LinkChange> {
        let change = match self.links.get(&info.index) {
            None => Some(LinkChange::Appeared(info.clone())),
            // A rename is a new link to whoever manages names.
            Some(old) if old.name != info.name => Some(LinkChange::Appeared(info.clone())),
            Some(old) if old.carrier && !info.carrier => {
                Some(LinkChange::CarrierLost(info.name.clone()))
            }
            Some(old) if !old.carrier && info.carrier => {
                Some(LinkChange::CarrierBack(info.name.clone()))
            }
            Some(_) => None,
        };
        self.links.insert(info.index, info);
        change
    }

    /// A removed link (`RTM_DELLINK`).
    pub fn remove(&mut self, index: u32) -> Option<LinkChange> {
        self.links
            .remove(&index)
            .map(|old| LinkChange::Removed(old.name))
    }
}

/// What a managed interface does about a carrier change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CarrierAction {
    /// Pause DHCP (keeping the lease); the node is not ready meanwhile.
    Pause,
    /// Re-apply static settings and ask for the lease again.
    Resume,
}

/// One interface's carrier as its task sees it. An interface found
/// without carrier (the usual case: links start administratively down)
/// resumes when the carrier first appears; one found with carrier is
/// configured at once and only resumes after a loss.
#[derive(Debug)]
pub struct Carrier {
    lost: bool,
}

impl Carrier {
    pub fn new(carrier: bool) -> Self {
        Carrier { lost: !carrier }
    }

    pub fn on(&mut self, change: &LinkChange) -> Option<CarrierAction> {
        match change {
            LinkChange::CarrierLost(_) if !self.lost => {
                self.lost = true;
                Some(CarrierAction::Pause)
            }
            LinkChange::CarrierBack(_) if self.lost => {
                self.lost = false;
                Some(CarrierAction::Resume)
            }
            _ => None,
        }
    }
}

/// The interface a node with no network configuration manages: the
/// physical Ethernet link with the lowest index (the first NIC the kernel
/// found), never a bridge, veth or tunnel a container runtime made.
pub fn default_link<'a>(links: impl IntoIterator<Item = &'a LinkInfo>) -> Option<&'a LinkInfo> {
    links
        .into_iter()
        .filter(|l| l.ethernet && l.physical && l.name != "lo")
        .min_by_key(|l| l.index)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(index: u32, name: &str, carrier: bool) -> LinkInfo {
        LinkInfo {
            index,
            name: name.into(),
            ethernet: true,
            physical: true,
            carrier,
            mac: Some([2, 0, 0, 0, 0, u8::try_from(index).unwrap()]),
        }
    }

    #[test]
    fn carrier_changes_become_actions_and_repeats_are_quiet() {
        let mut t = LinkTracker::default();
        let events = [
            (link(2, "eth0", false), Some("appeared")),
            (link(2, "eth0", false), None),
            (link(2, "eth0", true), Some("back")),
            (link(2, "eth0", true), None),
            (link(2, "eth0", false), Some("lost")),
            (link(2, "eth0", false), None),
            (link(2, "eth0", true), Some("back")),
            (link(2, "wan0", true), Some("appeared")),
        ];
        for (i, (info, want)) in events.into_iter().enumerate() {
            let got = t.update(info).map(|c| match c {
                LinkChange::Appeared(_) => "appeared",
                LinkChange::CarrierLost(_) => "lost",
                LinkChange::CarrierBack(_) => "back",
                LinkChange::Removed(_) => "removed",
            });
            assert_eq!(got, want, "event {i}");
        }
        assert_eq!(t.remove(2), Some(LinkChange::Removed("wan0".into())));
        assert_eq!(t.remove(2), None);
    }

    #[test]
    fn links_are_tracked_apart() {
        let mut t = LinkTracker::default();
        t.update(link(2, "eth0", true));
        t.update(link(3, "eth1", true));
        assert_eq!(
            t.update(link(3, "eth1", false)),
            Some(LinkChange::CarrierLost("eth1".into()))
        );
        assert_eq!(t.update(link(2, "eth0", true)), None);
    }

    #[test]
    fn only_a_lost_carrier_comes_back() {
        let lost = LinkChange::CarrierLost("eth0".into());
        let back = LinkChange::CarrierBack("eth0".into());
        let mut c = Carrier::new(true);
        // (change, expected action)
        let steps = [
            (&back, None),
            (&lost, Some(CarrierAction::Pause)),
            (&lost, None),
            (&back, Some(CarrierAction::Resume)),
            (&back, None),
            (&lost, Some(CarrierAction::Pause)),
        ];
        for (i, (change, want)) in steps.into_iter().enumerate() {
            assert_eq!(c.on(change), want, "step {i}");
        }
        // Found without carrier: its first carrier is a resume.
        let mut c = Carrier::new(false);
        assert_eq!(c.on(&back), Some(CarrierAction::Resume));
        assert_eq!(c.on(&back), None);
    }

    #[test]
    fn the_default_link_is_the_first_physical_ethernet() {
        let lo = LinkInfo {
            ethernet: false,
            physical: false,
            ..link(1, "lo", true)
        };
        let bridge = LinkInfo {
            physical: false,
            ..link(2, "cni0", true)
        };
        let links = [lo, bridge, link(5, "eth1", true), link(3, "eth0", false)];
        assert_eq!(default_link(&links).map(|l| l.name.as_str()), Some("eth0"));
        assert_eq!(default_link(&links[..2]), None);
    }
}
