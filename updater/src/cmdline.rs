//! The `ballast.*` kernel command-line keys that name the version a boot
//! entry starts: its slot, the slot's partition, and the dm-verity
//! parameters. A boot entry carries all of them, so renaming one entry into
//! place commits a whole version at once.
//!
//! ```text
//! ballast.version=1.2.0 ballast.slot=b ballast.usr=PARTUUID=<uuid>
//! ballast.usrfs=erofs ballast.verity=<root hash> ballast.verity.salt=<hex>
//! ballast.verity.blocks=<data blocks>
//! ```
//! Data and hash blocks are 4096 bytes and the hash is SHA-256; the hash
//! tree follows the data (see [`crate::payload::VerityParams`]).

use std::fmt;
use std::str::FromStr;

use uuid::Uuid;

use crate::payload::{PayloadMetadata, VerityParams, Version};

/// Block size of data and hash tree, fixed by the image build.
pub const VERITY_BLOCK_SIZE: u32 = 4096;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CmdlineError {
    #[error("kernel command line lacks {0}")]
    Missing(&'static str),
    #[error("kernel command line has an invalid {key}: {value:?}")]
    Invalid { key: &'static str, value: String },
}

/// One of the two update slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    A,
    B,
}

impl Slot {
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    /// GPT partition label of the slot.
    pub fn partition_label(self) -> &'static str {
        match self {
            Slot::A => "USR-A",
            Slot::B => "USR-B",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Slot::A => "a",
            Slot::B => "b",
        }
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Slot {
    type Err = CmdlineError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "a" | "A" => Ok(Slot::A),
            "b" | "B" => Ok(Slot::B),
            _ => Err(CmdlineError::Invalid {
                key: "ballast.slot",
                value: s.to_owned(),
            }),
        }
    }
}

/// What early boot needs to open and mount a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootParams {
    pub version: Version,
    pub slot: Slot,
    pub usr_partuuid: Uuid,
    /// `ballast.usr.was`: the slot's previous PARTUUID, carried only while
    /// the node renews its disk's GUIDs (see the agent's
    /// `boot::disk_identity`); early boot falls back to it only when no
    /// partition has `usr_partuuid`.
    pub usr_was: Option<Uuid>,
    pub usr_fstype: String,
    pub root_hash: String,
    pub salt: String,
    pub data_blocks: u64,
}

impl BootParams {
    /// The parameters for booting `meta`'s payload from `slot`.
    pub fn for_payload(meta: &PayloadMetadata, slot: Slot, usr_partuuid: Uuid) -> Self {
        BootParams {
            version: meta.version,
            slot,
            usr_partuuid,
            usr_was: None,
            usr_fstype: meta.usr_fstype.clone(),
            root_hash: meta.verity.root_hash.clone(),
            salt: meta.verity.salt.clone(),
            data_blocks: meta.verity.data_blocks,
        }
    }

    /// dm-verity parameters as the payload describes them.
    pub fn verity(&self) -> VerityParams {
        VerityParams {
            root_hash: self.root_hash.clone(),
            salt: self.salt.clone(),
            data_blocks: self.data_blocks,
            data_block_size: VERITY_BLOCK_SIZE,
            hash_block_size: VERITY_BLOCK_SIZE,
            hash_offset: self.data_blocks * u64::from(VERITY_BLOCK_SIZE),
            hash_algorithm: "sha256".to_owned(),
        }
    }

    /// Parses the `ballast.*` keys out of a whole kernel command line;
    /// other words are ignored.
    pub fn parse(cmdline: &str) -> Result<Self, CmdlineError> {
        let get = |key: &'static str| -> Result<&str, CmdlineError> {
            lookup(cmdline, key).ok_or(CmdlineError::Missing(key))
        };
        let invalid = |key: &'static str, value: &str| CmdlineError::Invalid {
            key,
            value: value.to_owned(),
        };

        let version = get("ballast.version")?;
        let version = version
            .parse()
            .map_err(|_| invalid("ballast.version", version))?;
        let slot = get("ballast.slot")?.parse()?;
        let usr = get("ballast.usr")?;
        let usr_partuuid = usr
            .strip_prefix("PARTUUID=")
            .and_then(|u| Uuid::parse_str(u).ok())
            .ok_or_else(|| invalid("ballast.usr", usr))?;
        let usr_was = match lookup(cmdline, "ballast.usr.was") {
            None => None,
            Some(was) => Some(
                was.strip_prefix("PARTUUID=")
                    .and_then(|u| Uuid::parse_str(u).ok())
                    .filter(|u| *u != usr_partuuid)
                    .ok_or_else(|| invalid("ballast.usr.was", was))?,
            ),
        };
        let usr_fstype = lookup(cmdline, "ballast.usrfs").unwrap_or("erofs");
        if !matches!(usr_fstype, "erofs" | "squashfs") {
            return Err(invalid("ballast.usrfs", usr_fstype));
        }
        let root_hash = get("ballast.verity")?;
        if root_hash.len() != 64 || !is_lower_hex(root_hash) {
            return Err(invalid("ballast.verity", root_hash));
        }
        let salt = get("ballast.verity.salt")?;
        if !is_lower_hex(salt) || salt.len() % 2 != 0 {
            return Err(invalid("ballast.verity.salt", salt));
        }
        let blocks = get("ballast.verity.blocks")?;
        let data_blocks = blocks
            .parse()
            .ok()
            .filter(|b| *b > 0)
            .ok_or_else(|| invalid("ballast.verity.blocks", blocks))?;
        Ok(BootParams {
            version,
            slot,
            usr_partuuid,
            usr_was,
            usr_fstype: usr_fstype.to_owned(),
            root_hash: root_hash.to_owned(),
            salt: salt.to_owned(),
            data_blocks,
        })
    }
}

impl fmt::Display for BootParams {
    /// The `ballast.*` words, space separated, in a fixed order.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ballast.version={} ballast.slot={} ballast.usr=PARTUUID={}",
            self.version,
            self.slot,
            self.usr_partuuid.hyphenated(),
        )?;
        if let Some(was) = self.usr_was {
            write!(f, " ballast.usr.was=PARTUUID={}", was.hyphenated())?;
        }
        write!(
            f,
            " ballast.usrfs={} ballast.verity={} ballast.verity.salt={} ballast.verity.blocks={}",
            self.usr_fstype, self.root_hash, self.salt, self.data_blocks
        )
    }
}

/// The value of the last `key=value` word for `key` (the kernel's rule: later
/// words win).
/// The `ballast.*` keys the boot chain owns ([`BootParams`]); every other
/// `ballast.<key>=` word configures the node (the agent's command-line
/// configuration layer).
pub const BOOT_CHAIN_KEYS: [&str; 8] = [
    "version",
    "slot",
    "usr",
    "usr.was",
    "usrfs",
    "verity",
    "verity.salt",
    "verity.blocks",
];

/// Whether `word` is a `ballast.<key>=<value>` configuration word, not one
/// of the boot chain's.
pub fn is_config_word(word: &str) -> bool {
    word.strip_prefix("ballast.")
        .map(|rest| rest.split_once('=').map_or(rest, |(key, _)| key))
        .is_some_and(|key| !key.is_empty() && !BOOT_CHAIN_KEYS.contains(&key))
}

/// The configuration words of a command line, in order: an update carries
/// them into the new entry, so configuration given on the command line
/// survives it.
pub fn config_words(cmdline: &str) -> Vec<String> {
    cmdline
        .split_ascii_whitespace()
        .filter(|w| is_config_word(w))
        .map(str::to_owned)
        .collect()
}

pub fn lookup<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split_ascii_whitespace()
        .filter_map(|word| word.split_once('='))
        .filter(|(k, _)| *k == key)
        .map(|(_, v)| v)
        .next_back()
}

fn is_lower_hex(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configuration_words_are_the_ones_the_boot_chain_does_not_own() {
        let line = "console=ttyS0 ballast.version=1.0.0 ballast.usr=PARTUUID=x \
                    ballast.usr.was=PARTUUID=y ballast.hostname=n1 ballast.update.channel=beta \
                    ballast.debug ballast. quiet";
        assert_eq!(
            config_words(line),
            [
                "ballast.hostname=n1",
                "ballast.update.channel=beta",
                "ballast.debug"
            ]
        );
    }

    fn sample() -> BootParams {
        BootParams {
            version: "1.2.0".parse().unwrap(),
            slot: Slot::B,
            usr_partuuid: Uuid::from_u128(0x1234),
            usr_was: None,
            usr_fstype: "erofs".into(),
            root_hash: "a".repeat(64),
            salt: "0011".into(),
            data_blocks: 2048,
        }
    }

    #[test]
    fn render_then_parse_round_trips_among_other_words() {
        let p = sample();
        let line = format!("console=ttyS0 {p} quiet\n");
        assert_eq!(BootParams::parse(&line).unwrap(), p);
        assert_eq!(p.verity().hash_start_block(), 2049);
    }

    /// The transitional `ballast.usr.was` word round-trips, is optional,
    /// and may not name the new PARTUUID again or anything but a PARTUUID.
    #[test]
    fn the_previous_partuuid_round_trips_and_is_checked() {
        let p = BootParams {
            usr_was: Some(Uuid::from_u128(0x99)),
            ..sample()
        };
        let line = p.to_string();
        assert!(line.contains(
            "ballast.usr=PARTUUID=00000000-0000-0000-0000-000000001234 \
             ballast.usr.was=PARTUUID=00000000-0000-0000-0000-000000000099 "
        ));
        assert_eq!(BootParams::parse(&line).unwrap(), p);
        assert_eq!(
            BootParams::parse(&sample().to_string()).unwrap().usr_was,
            None
        );
        for bad in [
            "PARTUUID=00000000-0000-0000-0000-000000001234",
            "PARTLABEL=USR-A",
            "PARTUUID=nope",
        ] {
            let line = format!("{} ballast.usr.was={bad}", sample());
            assert!(
                matches!(
                    BootParams::parse(&line),
                    Err(CmdlineError::Invalid {
                        key: "ballast.usr.was",
                        ..
                    })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn each_missing_or_bad_key_is_named() {
        let good = sample().to_string();
        for key in [
            "ballast.version",
            "ballast.slot",
            "ballast.usr",
            "ballast.verity",
            "ballast.verity.salt",
            "ballast.verity.blocks",
        ] {
            let without: Vec<&str> = good
                .split(' ')
                .filter(|w| w.split_once('=').map(|(k, _)| k) != Some(key))
                .collect();
            let err = BootParams::parse(&without.join(" ")).unwrap_err();
            assert_eq!(err, CmdlineError::Missing(key), "{key}");
        }
        for (key, bad) in [
            ("ballast.version", "1.2"),
            ("ballast.slot", "c"),
            ("ballast.usr", "PARTLABEL=USR-A"),
            ("ballast.verity", "ABC"),
            ("ballast.verity.blocks", "0"),
            ("ballast.usrfs", "ext4"),
        ] {
            let line = format!("{good} {key}={bad}");
            assert!(
                matches!(BootParams::parse(&line), Err(CmdlineError::Invalid { key: k, .. }) if k == key),
                "{key}"
            );
        }
    }
}
