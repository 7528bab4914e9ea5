//! Boot Loader Specification type #1 entries as Ballast writes them, and
//! their file names with systemd-boot's boot counter.
//!
//! `loader/entries/ballast-<version>[+<left>[-<done>]].conf`: an entry with a
//! counter is on trial; systemd-boot decrements `left` (and increments
//! `done`) by renaming the file before it boots it, and skips entries whose
//! `left` is 0. An entry without a counter is blessed. The kernel and initrd
//! of a version live under `ballast/<version>/` on the ESP.

use std::fmt;
use std::str::FromStr;

use crate::cmdline::BootParams;
use crate::payload::{Arch, Version};

/// Directory of entries, relative to the ESP root.
pub const ENTRIES_DIR: &str = "loader/entries";
/// Prefix of every entry file Ballast owns.
pub const ENTRY_PREFIX: &str = "ballast-";

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum BootEntryError {
    #[error("{0:?} is not a Ballast boot entry name (ballast-X.Y.Z[+LEFT[-DONE]].conf)")]
    Name(String),
    #[error("boot entry lacks the key {0:?}")]
    MissingKey(&'static str),
    #[error("boot entry has an invalid {key}: {value:?}")]
    Invalid { key: &'static str, value: String },
}

/// systemd-boot's boot counter in an entry's file name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootCounter {
    pub left: u32,
    pub done: u32,
}

/// A parsed entry file name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryName {
    pub version: Version,
    /// `None` when the entry is blessed (no counter).
    pub counter: Option<BootCounter>,
}

impl EntryName {
    pub fn blessed(version: Version) -> Self {
        EntryName {
            version,
            counter: None,
        }
    }

    pub fn on_trial(version: Version, tries: u32) -> Self {
        EntryName {
            version,
            counter: Some(BootCounter {
                left: tries,
                done: 0,
            }),
        }
    }

    /// The entry's id as systemd-boot sees it: the name without counter.
    pub fn id(&self) -> String {
        format!("{ENTRY_PREFIX}{}.conf", self.version)
    }

    /// True when systemd-boot will no longer pick this entry by itself.
    pub fn is_exhausted(&self) -> bool {
        matches!(self.counter, Some(BootCounter { left: 0, .. }))
    }
}

impl fmt::Display for EntryName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{ENTRY_PREFIX}{}", self.version)?;
        match self.counter {
            None => {}
            Some(BootCounter { left, done: 0 }) => write!(f, "+{left}")?,
            Some(BootCounter { left, done }) => write!(f, "+{left}-{done}")?,
        }
        f.write_str(".conf")
    }
}

impl FromStr for EntryName {
    type Err = BootEntryError;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        let err = || BootEntryError::Name(name.to_owned());
        let stem = name
            .strip_prefix(ENTRY_PREFIX)
            .and_then(|s| s.strip_suffix(".conf"))
            .ok_or_else(err)?;
        let (version, counter) = match stem.split_once('+') {
            None => (stem, None),
            Some((v, c)) => {
                let (left, done) = c.split_once('-').unwrap_or((c, "0"));
                let num = |s: &str| -> Result<u32, BootEntryError> {
                    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                        return Err(err());
                    }
                    s.parse().map_err(|_| err())
                };
                (
                    v,
                    Some(BootCounter {
                        left: num(left)?,
                        done: num(done)?,
                    }),
                )
            }
        };
        Ok(EntryName {
            version: version.parse().map_err(|_| err())?,
            counter,
        })
    }
}

/// ESP-relative directory holding a version's kernel and initrd.
pub fn version_dir(version: Version) -> String {
    format!("ballast/{version}")
}

/// Contents of one entry file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootEntry {
    pub params: BootParams,
    /// Kernel arguments that are not Ballast's (console, log level).
    pub extra_args: String,
}

impl BootEntry {
    /// The kernel arguments every Ballast entry gets for `arch`.
    pub fn default_extra_args(arch: Arch) -> String {
        format!("console={} panic=10 loglevel=4", arch.serial_console())
    }

    /// Renders the entry in the Boot Loader Specification's format.
    pub fn render(&self) -> String {
        let v = self.params.version;
        let dir = version_dir(v);
        format!(
            "title Ballast {v}\nversion {v}\nlinux /{dir}/vmlinuz\ninitrd /{dir}/initrd\noptions {} {}\n",
            self.extra_args, self.params
        )
    }

    /// Parses an entry file written by [`BootEntry::render`].
    pub fn parse(text: &str) -> Result<Self, BootEntryError> {
        let mut options = None;
        let mut version = None;
        for line in text.lines() {
            let line = line.trim();
            let (key, value) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
            match key {
                "options" => options = Some(value.trim()),
                "version" => version = Some(value.trim()),
                _ => {}
            }
        }
        let options = options.ok_or(BootEntryError::MissingKey("options"))?;
        let params = BootParams::parse(options).map_err(|e| BootEntryError::Invalid {
            key: "options",
            value: e.to_string(),
        })?;
        if let Some(v) = version {
            if v != params.version.to_string() {
                return Err(BootEntryError::Invalid {
                    key: "version",
                    value: v.to_owned(),
                });
            }
        }
        // Configuration words (`ballast.hostname=...`) are the node's, not
        // the boot chain's: they stay with the other arguments.
        let extra_args = options
            .split_ascii_whitespace()
            .filter(|w| !w.starts_with("ballast.") || crate::cmdline::is_config_word(w))
            .collect::<Vec<_>>()
            .join(" ");
        Ok(BootEntry { params, extra_args })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmdline::Slot;

    #[test]
    fn names_round_trip_with_and_without_counter() {
        for name in [
            "ballast-1.0.0.conf",
            "ballast-1.1.0+3.conf",
            "ballast-1.1.0+0-3.conf",
            "ballast-2.10.1+1-2.conf",
        ] {
            let parsed: EntryName = name.parse().unwrap();
            assert_eq!(parsed.to_string(), name);
        }
        let n: EntryName = "ballast-1.1.0+0-3.conf".parse().unwrap();
        assert!(n.is_exhausted());
        assert_eq!(n.id(), "ballast-1.1.0.conf");
    }

    #[test]
    fn foreign_or_escaping_names_are_refused() {
        for bad in [
            "ballast-1.0.conf",
            "other-1.0.0.conf",
            "ballast-1.0.0+.conf",
            "ballast-1.0.0+a.conf",
            "ballast-../1.0.0.conf",
            "ballast-1.0.0+1-.conf",
        ] {
            assert!(bad.parse::<EntryName>().is_err(), "{bad}");
        }
    }

    #[test]
    fn entry_render_parse_round_trip() {
        let entry = BootEntry {
            params: BootParams {
                version: "1.0.0".parse().unwrap(),
                slot: Slot::A,
                usr_partuuid: uuid::Uuid::from_u128(7),
                usr_was: None,
                usr_fstype: "erofs".into(),
                root_hash: "b".repeat(64),
                salt: "aa".into(),
                data_blocks: 10,
            },
            extra_args: BootEntry::default_extra_args(Arch::X86_64),
        };
        let text = entry.render();
        assert!(text.contains("linux /ballast/1.0.0/vmlinuz\n"));
        assert_eq!(BootEntry::parse(&text).unwrap(), entry);
        // Configuration words stay with the other arguments.
        let mut configured = entry.clone();
        configured
            .extra_args
            .push_str(" ballast.hostname=n1 ballast.debug");
        let text = configured.render();
        assert_eq!(BootEntry::parse(&text).unwrap(), configured);
    }
}
