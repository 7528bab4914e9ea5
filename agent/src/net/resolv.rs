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
/// glibc's historical limit of search domains; more only slow every lookup.
pub const MAX_SEARCH_DOMAINS: usize = 6;

/// `raw` as a valid RFC 1123 host or domain name in lower case: labels of
/// 1 to 63 characters `[a-z0-9-]`, not starting or ending with `-`, at most
/// 253 characters in all (a trailing dot is dropped). Names from the network
/// (DHCP host name and domain, RA DNSSL) pass here before they reach the
/// kernel's host name or resolv.conf, where a space or newline would
/// inject settings.
pub fn dns_name(raw: &str) -> Option<String> {
    let name = raw.strip_suffix('.').unwrap_or(raw).to_ascii_lowercase();
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    (!name.is_empty() && name.len() <= 253 && name.split('.').all(label_ok)).then_some(name)
}

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
                // Sources check names already; this keeps the file sound
                // whatever a future source passes.
                if dns_name(d).as_deref() != Some(d.as_str()) {
                    continue;
                }
                if domains.len() < MAX_SEARCH_DOMAINS && !domains.contains(&d.as_str()) {
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

/// Coalesces resolv.conf rewrites: at most one per [`Coalesce::MIN_INTERVAL`].
/// A change inside the interval is written once it ends, together with any
/// later ones, so a flood of router advertisements costs one write a second.
#[derive(Debug, Default)]
pub struct Coalesce {
    last: Option<std::time::Instant>,
    pending: bool,
}

impl Coalesce {
    pub const MIN_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

    /// Something changed at `now`: whether to write it now (otherwise it is
    /// pending until [`Coalesce::due`]).
    pub fn changed(&mut self, now: std::time::Instant) -> bool {
        if self.last.is_none_or(|l| now >= l + Self::MIN_INTERVAL) {
            self.last = Some(now);
            self.pending = false;
            true
        } else {
            self.pending = true;
            false
        }
    }

    /// When a pending change is to be written.
    pub fn due(&self) -> Option<std::time::Instant> {
        self.pending
            .then_some(self.last)
            .flatten()
            .map(|l| l + Self::MIN_INTERVAL)
    }

    /// At `now`: whether the pending change is to be written now.
    pub fn flush(&mut self, now: std::time::Instant) -> bool {
        if self.due().is_some_and(|d| now >= d) {
            self.last = Some(now);
            self.pending = false;
            true
        } else {
            false
        }
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

    #[test]
    fn rewrites_are_coalesced_to_one_a_second() {
        use std::time::{Duration, Instant};
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut c = Coalesce::default();
        assert!(c.changed(t0), "the first change is written at once");
        assert_eq!(c.due(), None);
        // A burst inside the second: nothing written, one write pending.
        for n in [1, 200, 999] {
            assert!(!c.changed(ms(n)));
        }
        assert_eq!(c.due(), Some(ms(1000)));
        assert!(!c.flush(ms(999)));
        assert!(c.flush(ms(1000)));
        assert!(!c.flush(ms(1001)), "written once");
        assert_eq!(c.due(), None);
        // A change a second after the last write goes out at once.
        assert!(c.changed(ms(2000)));
    }

    #[test]
    fn only_rfc_1123_names_pass() {
        let long_label = "a".repeat(63);
        let too_long_label = "a".repeat(64);
        let long_name = vec!["abcdefghi"; 25].join("."); // 249
        let too_long_name = vec!["abcdefghi"; 26].join("."); // 259
        let cases: &[(&str, Option<&str>)] = &[
            ("node-1", Some("node-1")),
            ("Node-1.Example.COM.", Some("node-1.example.com")),
            ("1node", Some("1node")),
            (&long_label, Some(&long_label)),
            (&long_name, Some(&long_name)),
            (&too_long_label, None),
            (&too_long_name, None),
            ("", None),
            (".", None),
            ("Node_1", None),
            ("-node", None),
            ("node-", None),
            ("a..b", None),
            ("a b", None),
            ("evil\nnameserver 1.2.3.4", None),
            ("nöde", None),
        ];
        for (raw, want) in cases {
            assert_eq!(dns_name(raw).as_deref(), *want, "{raw:?}");
        }
    }

    #[test]
    fn bad_or_surplus_search_domains_never_reach_the_file() {
        let mut r = Resolv::default();
        let domains: Vec<String> = (0..10).map(|i| format!("d{i}.example")).collect();
        let mut all: Vec<&str> = domains.iter().map(String::as_str).collect();
        all.insert(0, "x\nnameserver 6.6.6.6");
        r.set(Source::Ra, "eth0", entry(&["10.0.0.1"], &all));
        let text = r.render();
        assert!(!text.contains("6.6.6.6"), "{text}");
        let search = text.lines().find(|l| l.starts_with("search ")).unwrap();
        assert_eq!(search.split(' ').count() - 1, MAX_SEARCH_DOMAINS, "{text}");
    }

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
