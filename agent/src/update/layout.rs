//! Where the running node's update pieces are: the running version from
//! the kernel command line, slots A and B by GPT label (`USR-A`, `USR-B`)
//! on the disk that holds the running slot, the ESP at `/efi`, the updater
//! state on STATE, the built-in trust directory and the image variant.
//! PID 1's update driver and `ballast update` both find the node here, so
//! they agree on it; the CLI's overrides make it work on plain files.

use std::path::{Path, PathBuf};

use ballast_updater::cmdline::{BootParams, Slot};
use ballast_updater::esp::{list_entries, NodeLayout, SlotDevice};
use ballast_updater::storage::{RealStorage, Storage};
use uuid::Uuid;

pub const DEFAULT_ESP: &str = "/efi";
pub const DEFAULT_STATE: &str = "/var/lib/ballast/update";
pub const DEFAULT_CMDLINE: &str = "/proc/cmdline";
/// Trusted keys built into the image.
pub const DEFAULT_TRUST: &str = "/usr/lib/ballast/trust";
pub const OS_RELEASE: &str = "/usr/lib/os-release";

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} does not name a Ballast version")]
    NotBallast {
        path: PathBuf,
        #[source]
        source: ballast_updater::cmdline::CmdlineError,
    },
    #[error("no PARTUUID known for slot {slot}: pass --slot-{slot} {path}=PARTUUID")]
    NoPartuuid { slot: Slot, path: PathBuf },
    #[error(
        "the running slot's partition (PARTUUID {partuuid}) is on no disk; pass --slot-a/--slot-b"
    )]
    RunningSlotNotFound { partuuid: Uuid },
    #[error("no partition labelled {label} found")]
    NoSlotPartition { label: &'static str },
    /// The running slot's PARTUUID on two partitions: a copy of our disk
    /// must not be able to stand in for it.
    #[error(transparent)]
    Disk(#[from] crate::boot::disks::DiskError),
    /// Every Ballast image writes VARIANT_ID; without it the node cannot
    /// tell which releases are its own, and guessing could install
    /// another profile (a base image onto a Kubernetes node).
    #[error("{path} has no VARIANT_ID")]
    NoVariant { path: PathBuf },
}

/// One slot given by hand: a device or file, and its PARTUUID if known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotOverride {
    pub path: PathBuf,
    pub partuuid: Option<Uuid>,
}

impl SlotOverride {
    /// `PATH[=PARTUUID]`.
    pub fn parse(arg: &str) -> Self {
        match arg.rsplit_once('=') {
            Some((path, uuid)) if Uuid::parse_str(uuid).is_ok() => SlotOverride {
                path: PathBuf::from(path),
                partuuid: Uuid::parse_str(uuid).ok(),
            },
            _ => SlotOverride {
                path: PathBuf::from(arg),
                partuuid: None,
            },
        }
    }
}

/// Where to look; [`Overrides::default`] is a running node.
#[derive(Debug, Clone)]
pub struct Overrides {
    pub esp: PathBuf,
    pub slot_a: Option<SlotOverride>,
    pub slot_b: Option<SlotOverride>,
    pub cmdline: PathBuf,
    pub state: PathBuf,
}

impl Default for Overrides {
    fn default() -> Self {
        Overrides {
            esp: DEFAULT_ESP.into(),
            slot_a: None,
            slot_b: None,
            cmdline: DEFAULT_CMDLINE.into(),
            state: DEFAULT_STATE.into(),
        }
    }
}

/// The running node's layout, found without overrides.
pub fn node_layout() -> Result<NodeLayout, LayoutError> {
    discover(&Overrides::default())
}

/// The layout, with the given overrides.
pub fn discover(args: &Overrides) -> Result<NodeLayout, LayoutError> {
    let cmdline = std::fs::read_to_string(&args.cmdline).map_err(|source| LayoutError::Read {
        path: args.cmdline.clone(),
        source,
    })?;
    let mut running = BootParams::parse(&cmdline).map_err(|source| LayoutError::NotBallast {
        path: args.cmdline.clone(),
        source,
    })?;
    // After this boot renewed the disk's GUIDs the command line still names
    // the old PARTUUID; the disk (and every entry) hold the new one.
    running.usr_partuuid = crate::boot::disk_identity::current_usr_partuuid(
        &RealStorage,
        Path::new(crate::boot::disk_identity::JOURNAL_PATH),
        running.usr_partuuid,
    );
    let discovered = if args.slot_a.is_none() || args.slot_b.is_none() {
        Some(discover_slots(&running)?)
    } else {
        None
    };
    let device = |slot: Slot, arg: &Option<SlotOverride>| -> Result<SlotDevice, LayoutError> {
        match arg {
            Some(o) => {
                let partuuid =
                    match o.partuuid {
                        Some(u) => u,
                        None => partuuid_for(&RealStorage, &args.esp, &running, slot).ok_or_else(
                            || LayoutError::NoPartuuid {
                                slot,
                                path: o.path.clone(),
                            },
                        )?,
                    };
                Ok(SlotDevice {
                    slot,
                    path: o.path.clone(),
                    partuuid,
                })
            }
            None => discovered
                .as_ref()
                .and_then(|d| d.iter().find(|s| s.slot == slot).cloned())
                .ok_or(LayoutError::NoSlotPartition {
                    label: slot.partition_label(),
                }),
        }
    };
    Ok(NodeLayout {
        esp: args.esp.clone(),
        slot_a: device(Slot::A, &args.slot_a)?,
        slot_b: device(Slot::B, &args.slot_b)?,
        state_dir: args.state.clone(),
        running,
    })
}

/// A slot's PARTUUID when the override gave none: the running slot's is on
/// the command line; the other's is in an entry that boots it.
fn partuuid_for(
    storage: &dyn Storage,
    esp: &Path,
    running: &BootParams,
    slot: Slot,
) -> Option<Uuid> {
    if slot == running.slot {
        return Some(running.usr_partuuid);
    }
    list_entries(storage, esp)
        .ok()?
        .into_iter()
        .filter_map(|e| e.entry.ok())
        .find(|e| e.params.slot == slot)
        .map(|e| e.params.usr_partuuid)
}

/// USR-A and USR-B on the disk that holds the running slot.
fn discover_slots(running: &BootParams) -> Result<Vec<SlotDevice>, LayoutError> {
    use crate::boot::disks::{unique, Roots, Wanted};
    let parts = Roots::default().partitions();
    // A boot during an interrupted renewal may find the slot only under
    // its previous PARTUUID, as early boot did.
    let current = match unique(&parts, &Wanted::PartUuid(running.usr_partuuid))? {
        Some(p) => Some(p),
        None => match running.usr_was {
            Some(was) => unique(&parts, &Wanted::PartUuid(was))?,
            None => None,
        },
    }
    .ok_or(LayoutError::RunningSlotNotFound {
        partuuid: running.usr_partuuid,
    })?;
    Ok([Slot::A, Slot::B]
        .into_iter()
        .filter_map(|slot| {
            parts
                .iter()
                .find(|p| p.disk == current.disk && p.label == slot.partition_label())
                .map(|p| SlotDevice {
                    slot,
                    path: p.device.clone(),
                    partuuid: p.partuuid,
                })
        })
        .collect())
}

/// The image variant (`VARIANT_ID` of os-release): a node installs only
/// releases of its own variant. A missing os-release or VARIANT_ID is an
/// error for the CLI and the agent alike, never a guess.
pub fn variant() -> Result<String, LayoutError> {
    variant_from(Path::new(OS_RELEASE))
}

fn variant_from(path: &Path) -> Result<String, LayoutError> {
    let text = std::fs::read_to_string(path).map_err(|source| LayoutError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_variant(&text).ok_or_else(|| LayoutError::NoVariant {
        path: path.to_owned(),
    })
}

/// `VARIANT_ID=` of an os-release text, quotes removed; an empty value
/// counts as none.
fn parse_variant(os_release: &str) -> Option<String> {
    os_release
        .lines()
        .find_map(|l| l.strip_prefix("VARIANT_ID="))
        .map(|v| v.trim().trim_matches('"').trim_matches('\'').to_owned())
        .filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_variant_comes_from_os_release_or_is_an_error() {
        let text = "NAME=\"Ballast\"\nID=ballast\nVARIANT_ID=k8s\n";
        assert_eq!(parse_variant(text).as_deref(), Some("k8s"));
        assert_eq!(
            parse_variant("VARIANT_ID=\"base\"\n").as_deref(),
            Some("base")
        );
        assert_eq!(parse_variant("ID=ballast\n"), None);
        assert_eq!(parse_variant("VARIANT_ID=\n"), None);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("os-release");
        std::fs::write(&path, "ID=ballast\n").unwrap();
        let err = variant_from(&path).unwrap_err().to_string();
        assert!(err.contains("no VARIANT_ID"), "{err}");
        assert!(matches!(
            variant_from(&dir.path().join("missing")),
            Err(LayoutError::Read { .. })
        ));
    }

    #[test]
    fn slot_overrides_may_carry_a_partuuid() {
        let u = "0b4e1fd2-38c5-4b1e-9f3a-8a1c2d3e4f50";
        let o = SlotOverride::parse(&format!("/dev/vdb2={u}"));
        assert_eq!(o.path, Path::new("/dev/vdb2"));
        assert_eq!(o.partuuid, Some(Uuid::parse_str(u).unwrap()));
        let plain = SlotOverride::parse("/tmp/a=b.img");
        assert_eq!(plain.path, Path::new("/tmp/a=b.img"));
        assert_eq!(plain.partuuid, None);
    }

    #[test]
    fn overridden_slots_and_a_bad_cmdline() {
        let dir = tempfile::tempdir().unwrap();
        let o = Overrides {
            esp: dir.path().join("esp"),
            cmdline: dir.path().join("cmdline"),
            state: dir.path().join("state"),
            ..Overrides::default()
        };
        assert!(matches!(discover(&o), Err(LayoutError::Read { .. })));
        std::fs::write(&o.cmdline, "console=ttyS0\n").unwrap();
        assert!(matches!(discover(&o), Err(LayoutError::NotBallast { .. })));
        let running = "0b4e1fd2-38c5-4b1e-9f3a-8a1c2d3e4f50";
        std::fs::write(
            &o.cmdline,
            format!(
                "console=ttyS0 ballast.version=1.2.0 ballast.slot=b ballast.usr=PARTUUID={running} \
                 ballast.usrfs=erofs ballast.verity={} ballast.verity.salt={} ballast.verity.blocks=10\n",
                "ab".repeat(32),
                "cd".repeat(32)
            ),
        )
        .unwrap();
        // Slot b runs: its PARTUUID is the command line's. Slot a has no
        // entry on the (empty) ESP to name its PARTUUID.
        let err = discover(&Overrides {
            slot_a: Some(SlotOverride::parse("/dev/vda2")),
            slot_b: Some(SlotOverride::parse("/dev/vda3")),
            ..o.clone()
        })
        .unwrap_err();
        assert!(err.to_string().contains("slot a"), "{err}");
        let other = "1b4e1fd2-38c5-4b1e-9f3a-8a1c2d3e4f50";
        let layout = discover(&Overrides {
            slot_a: Some(SlotOverride::parse(&format!("/dev/vda2={other}"))),
            slot_b: Some(SlotOverride::parse("/dev/vda3")),
            ..o
        })
        .unwrap();
        assert_eq!(layout.running.version.to_string(), "1.2.0");
        assert_eq!(layout.slot_b.partuuid.to_string(), running);
        assert_eq!(layout.slot_a.partuuid.to_string(), other);
        assert_eq!(layout.slot_a.path, Path::new("/dev/vda2"));
    }
}
