//! `/etc/resolv.conf` from every source of name servers: static
//! configuration, DHCP leases and IPv6 router advertisements (RDNSS/DNSSL).
//! The rendering is deterministic: static before DHCP before RA, interfaces
//! in name order within each, duplicates dropped at their first place.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::IpAddr;
use std::path::Path;

pub const RESOLV_CONF: &str = "/etc/resolv.conf";
/// musl and glibc use the first three name servers only.
const MAX_NAMESERVERS: usize = 3;

/// Where a set of servers came from; the order is the precedence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Source {
    Static,
    Dhcp,
    Ra,
}

/// What one source on one interface contributes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Entry {
    pub servers: Vec<IpAddr>,
    pub domains: Vec<String>,
}

/// Every source's contribution, keyed by (source, interface).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolv {
    entries: BTreeMap<(Source, String), Entry>,
}

impl Resolv {
    /// Replaces what `source` on `interface` contributes; returns whether
    /// anything changed.
    pub fn set(&mut self, source: Source, interface: &str, entry: Entry) -> bool {
        let key = (source, interface.to_owned());
        if entry.servers.is_empty() && entry.domains.is_empty() {
            return self.entries.remove(&key).is_some();
        }
        if self.entries.get(&key) == Some(&entry) {
            return false;
        }
        self.entries.insert(key, entry);
        true
    }

    pub fn render(&self) -> String {
        let mut servers: Vec<IpAddr> = Vec::new();
        let mut domains: Vec<&str> = Vec::new();
        for entry in self.entries.values() {
            for s in &entry.servers {
                if !servers.contains(s) {
                    servers.push(*s);
                }
            }
            for d in &entry.domains {
                if !domains.contains(&d.as_str()) {
                    domains.push(d);
                }
            }
        }
        let mut out = String::from("# Written by ballast from static, DHCP and RA settings.\n");
        if !domains.is_empty() {
            out.push_str(&format!("search {}\n", domains.join(" ")));
        }
        for (i, s) in servers.iter().enumerate() {
            if i == MAX_NAMESERVERS {
                out.push_str("# not used by the resolver (it reads three):\n");
            }
            let prefix = if i >= MAX_NAMESERVERS { "# " } else { "" };
            out.push_str(&format!("{prefix}nameserver {s}\n"));
        }
        out
    }
}

/// Writes `text` to `path` through a temporary file and a rename, so a
/// reader never sees half a file.
pub fn write(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("ballast-tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    drop(f);
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(servers: &[&str], domains: &[&str]) -> Entry {
        Entry {
            servers: servers.iter().map(|s| s.parse().unwrap()).collect(),
            domains: domains.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn sources_render_in_a_fixed_order_without_duplicates() {
        let mut r = Resolv::default();
        // Inserted in the "wrong" order on purpose.
        assert!(r.set(Source::Ra, "eth0", entry(&["fec0::3"], &["ra.example"])));
        assert!(r.set(Source::Dhcp, "eth1", entry(&["10.1.0.3"], &[])));
        assert!(r.set(
            Source::Dhcp,
            "eth0",
            entry(&["10.0.2.3", "1.1.1.1"], &["lan"])
        ));
        assert!(r.set(Source::Static, "eth1", entry(&["1.1.1.1"], &[])));
        assert_eq!(
            r.render(),
            "# Written by ballast from static, DHCP and RA settings.\n\
             search lan ra.example\n\
             nameserver 1.1.1.1\n\
             nameserver 10.0.2.3\n\
             nameserver 10.1.0.3\n\
             # not used by the resolver (it reads three):\n\
             # nameserver fec0::3\n"
        );
    }

    #[test]
    fn unchanged_sets_report_no_change_and_empty_ones_remove() {
        let mut r = Resolv::default();
        assert!(r.set(Source::Dhcp, "eth0", entry(&["10.0.2.3"], &[])));
        assert!(!r.set(Source::Dhcp, "eth0", entry(&["10.0.2.3"], &[])));
        assert!(r.set(Source::Dhcp, "eth0", Entry::default()));
        assert!(!r.set(Source::Dhcp, "eth0", Entry::default()));
        assert_eq!(r, Resolv::default());
    }

    #[test]
    fn the_file_is_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("resolv.conf");
        std::fs::write(&p, "old\n").unwrap();
        write(&p, "nameserver 10.0.2.3\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            "nameserver 10.0.2.3\n"
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
