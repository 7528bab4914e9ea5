//! Which user-data a node trusts at boot (docs/configuration.md, "User-data").
//!
//! User-data is full root control of a node, so a source that appears after
//! provisioning must not take it over. Volumes (`CIDATA`, an OpenStack
//! `config-2` drive) are accepted only while STATE holds no saved user-data
//! yet (first provisioning). Hypervisor-side sources, which only the VM's
//! owner controls, are accepted at every boot: QEMU's fw_cfg, then EC2-style
//! instance metadata (IMDS, fetched by `net::imds` after the first lease).
//! Besides those, user-data changes only through the authenticated API
//! (`PUT /v1/user-data`, which writes the saved copy). A source that is not
//! accepted is reported (console event `user-data-ignored`, and [`status`]
//! for `/status`) and ignored. [`decide`] is the policy, free of I/O;
//! [`gather`] and [`resolve`] are the thin I/O around it.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde::Serialize;

use super::{save_user_data, Layer, FW_CFG_USER_DATA, SAVED_USER_DATA};
use crate::boot::configdrive::{self, Filesystem};

/// How an instance-metadata layer is named in errors and `config show`.
pub const IMDS_USER_DATA: &str = "http://169.254.169.254/latest/user-data";

/// Where user-data can come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// QEMU's fw_cfg entry `opt/ballast/user-data`.
    FwCfg,
    /// EC2-style instance metadata (IMDSv2).
    Imds,
    /// A FAT volume labelled `CIDATA` on this block device.
    Cidata(PathBuf),
    /// An OpenStack config drive (label `config-2`) on this block device.
    ConfigDrive(PathBuf),
    /// The copy kept on STATE from an earlier boot (or the API).
    Saved,
}

impl Source {
    /// The name used in events and `/status`.
    pub fn name(&self) -> &'static str {
        match self {
            Source::FwCfg => "fw_cfg",
            Source::Imds => "imds",
            Source::Cidata(_) => "cidata",
            Source::ConfigDrive(_) => "config-2",
            Source::Saved => "saved",
        }
    }

    fn device(&self) -> Option<&Path> {
        match self {
            Source::Cidata(d) | Source::ConfigDrive(d) => Some(d),
            _ => None,
        }
    }
}

/// What was found at boot, before anything untrusted is mounted or read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Found {
    /// STATE holds saved user-data (the node was provisioned).
    pub saved: bool,
    /// fw_cfg carries user-data.
    pub fw_cfg: bool,
    /// The instance metadata service answered with user-data.
    pub imds: bool,
    /// Block devices whose FAT label is `CIDATA`, in device-name order.
    pub cidata: Vec<PathBuf>,
    /// Block devices labelled `config-2`, in device-name order.
    pub config_drive: Vec<PathBuf>,
}

/// A source that was present but not accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ignored {
    pub source: &'static str,
    pub device: Option<PathBuf>,
    pub reason: &'static str,
}

/// The policy's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The source to read, if any.
    pub use_source: Option<Source>,
    /// Whether the text read from `use_source` replaces the saved copy.
    pub save: bool,
    pub ignored: Vec<Ignored>,
}

pub const REASON_PROVISIONED: &str = "the node is provisioned (STATE holds user-data); \
     user-data volumes (CIDATA, config-2) are read only at first provisioning";
pub const REASON_FW_CFG_WINS: &str = "fw_cfg user-data takes precedence";
pub const REASON_IMDS_WINS: &str = "instance metadata user-data takes precedence";
pub const REASON_NOT_FIRST: &str = "more than one user-data volume; only the first is used \
     (CIDATA volumes before config-2 drives, each by device name)";

/// The user-data policy, without I/O (see the module doc): fw_cfg, else
/// instance metadata, always wins and is saved; else a volume (the first
/// `CIDATA`, else the first `config-2`) only while nothing is saved (then
/// saved); else the saved copy.
pub fn decide(found: &Found) -> Decision {
    let mut ignored = Vec::new();
    let volumes: Vec<Source> = found
        .cidata
        .iter()
        .cloned()
        .map(Source::Cidata)
        .chain(found.config_drive.iter().cloned().map(Source::ConfigDrive))
        .collect();
    let ignore = |source: &Source, reason| Ignored {
        source: source.name(),
        device: source.device().map(Path::to_owned),
        reason,
    };
    let hypervisor = if found.fw_cfg {
        if found.imds {
            ignored.push(ignore(&Source::Imds, REASON_FW_CFG_WINS));
        }
        Some(Source::FwCfg)
    } else if found.imds {
        Some(Source::Imds)
    } else {
        None
    };
    let (use_source, save) = match hypervisor {
        Some(source) => {
            let reason = match (&source, found.saved) {
                (_, true) => REASON_PROVISIONED,
                (Source::FwCfg, false) => REASON_FW_CFG_WINS,
                _ => REASON_IMDS_WINS,
            };
            ignored.extend(volumes.iter().map(|v| ignore(v, reason)));
            (Some(source), true)
        }
        None if found.saved => {
            ignored.extend(volumes.iter().map(|v| ignore(v, REASON_PROVISIONED)));
            (Some(Source::Saved), false)
        }
        None => match volumes.split_first() {
            Some((first, rest)) => {
                ignored.extend(rest.iter().map(|v| ignore(v, REASON_NOT_FIRST)));
                (Some(first.clone()), true)
            }
            None => (None, false),
        },
    };
    Decision {
        use_source,
        save,
        ignored,
    }
}

/// What `/status` shows about user-data: the source in force and the
/// sources that were ignored this boot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Status {
    pub source: Option<&'static str>,
    pub device: Option<PathBuf>,
    pub ignored: Vec<Ignored>,
}

static STATUS: OnceLock<Status> = OnceLock::new();

/// This boot's user-data status, once [`resolve`] ran (the API reads it).
pub fn status() -> Option<&'static Status> {
    STATUS.get()
}

/// The sources present at boot that need no network: texts of the saved
/// copy and fw_cfg, and the labels of volumes (nothing is mounted).
#[derive(Debug, Clone, Default)]
pub struct Gathered {
    saved_text: Option<String>,
    fw_cfg_text: Option<String>,
    cidata: Vec<PathBuf>,
    config_drive: Vec<(PathBuf, Filesystem)>,
}

/// Looks for every local source (see [`Gathered`]).
pub fn gather() -> Gathered {
    Gathered {
        saved_text: std::fs::read_to_string(SAVED_USER_DATA).ok(),
        fw_cfg_text: std::fs::read_to_string(FW_CFG_USER_DATA).ok(),
        // Labels only: an untrusted volume is mounted only once accepted.
        cidata: crate::boot::cidata::scan(),
        config_drive: configdrive::scan(),
    }
}

impl Gathered {
    /// fw_cfg carries user-data (then instance metadata is not asked).
    pub fn has_fw_cfg(&self) -> bool {
        self.fw_cfg_text.is_some()
    }

    /// The user-data layer to bring the network up with while instance
    /// metadata is still to be asked: the saved copy, which every later
    /// boot of a provisioned node starts from. Nothing is reported, read
    /// from volumes or saved: [`resolve`] decides once the answer is in.
    pub fn provisional(&self) -> Option<Layer> {
        self.saved_text.clone().map(|text| Layer {
            source: SAVED_USER_DATA.into(),
            text,
        })
    }
}

/// What the instance metadata service answered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImdsAnswer {
    pub user_data: Option<String>,
    pub hostname: Option<String>,
}

/// The user-data this boot uses, and the host name its source gives
/// (instance metadata, or the accepted config drive's meta_data.json;
/// unchecked: the caller validates it).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Provisioned {
    pub layer: Option<Layer>,
    pub metadata_hostname: Option<String>,
}

/// Decides by the policy above, reports ignored sources, reads the accepted
/// one and keeps fresh user-data on STATE (mode 0600). `imds` is the
/// metadata service's answer, when it was asked and answered.
pub fn resolve(gathered: Gathered, imds: Option<ImdsAnswer>) -> Provisioned {
    let Gathered {
        saved_text,
        fw_cfg_text,
        cidata,
        config_drive,
    } = gathered;
    let imds_user_data = imds.as_ref().and_then(|a| a.user_data.clone());
    let found = Found {
        saved: saved_text.is_some(),
        fw_cfg: fw_cfg_text.is_some(),
        imds: imds_user_data.is_some(),
        cidata,
        config_drive: config_drive.iter().map(|(d, _)| d.clone()).collect(),
    };
    let decision = decide(&found);
    for i in &decision.ignored {
        tracing::warn!(source = i.source, device = ?i.device, reason = i.reason, "user-data ignored");
        crate::console::emit(&crate::console::Event::UserDataIgnored {
            source: i.source.to_owned(),
            device: i.device.as_ref().map(|d| d.display().to_string()),
            reason: i.reason.to_owned(),
        });
    }
    // Instance metadata names the node whenever the service answered
    // (it is the VM owner's); a config drive only when it was accepted.
    let mut metadata_hostname = imds.and_then(|a| a.hostname);
    let text = |text: Option<String>, source: &str| {
        text.map(|text| Layer {
            source: source.into(),
            text,
        })
    };
    let layer = match &decision.use_source {
        None => None,
        Some(Source::Saved) => text(saved_text.clone(), SAVED_USER_DATA),
        Some(Source::FwCfg) => text(fw_cfg_text, FW_CFG_USER_DATA),
        Some(Source::Imds) => text(imds_user_data, IMDS_USER_DATA),
        Some(Source::Cidata(device)) => match crate::boot::cidata::read(device) {
            Ok(text) => Some(Layer {
                source: device.clone(),
                text,
            }),
            Err(e) => {
                tracing::warn!(device = %device.display(), error = %e, "CIDATA volume unreadable");
                None
            }
        },
        Some(Source::ConfigDrive(device)) => {
            let fs = config_drive
                .iter()
                .find(|(d, _)| d == device)
                .map_or(Filesystem::Vfat, |(_, fs)| *fs);
            match configdrive::read(device, fs) {
                Ok(drive) => {
                    tracing::info!(device = %device.display(), uuid = ?drive.meta_data.uuid, "config drive read");
                    metadata_hostname = metadata_hostname.or(drive.meta_data.hostname);
                    text(drive.user_data, &device.display().to_string())
                }
                Err(e) => {
                    tracing::warn!(error = %crate::error_chain(&e), "config drive unreadable");
                    None
                }
            }
        }
    };
    if let (true, Some(layer)) = (decision.save, &layer) {
        // Unchanged text is not rewritten: no needless writes to STATE.
        if saved_text.as_ref() != Some(&layer.text) {
            save_user_data(Path::new(SAVED_USER_DATA), &layer.text);
        }
    }
    let _ = STATUS.set(Status {
        source: layer
            .as_ref()
            .and(decision.use_source.as_ref())
            .map(Source::name),
        device: layer
            .as_ref()
            .and(decision.use_source.as_ref())
            .and_then(|s| s.device().map(Path::to_owned)),
        ignored: decision.ignored,
    });
    Provisioned {
        layer,
        metadata_hostname,
    }
}

/// This boot's user-data from the local sources only (no instance
/// metadata): [`gather`], then [`resolve`].
pub fn find() -> Option<Layer> {
    resolve(gather(), None).layer
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(n: &str) -> PathBuf {
        PathBuf::from(format!("/dev/{n}"))
    }

    fn ignored(device: &str, reason: &'static str) -> Ignored {
        Ignored {
            source: "cidata",
            device: Some(dev(device)),
            reason,
        }
    }

    fn ignored_drive(device: &str, reason: &'static str) -> Ignored {
        Ignored {
            source: "config-2",
            device: Some(dev(device)),
            reason,
        }
    }

    /// (saved, fw_cfg, imds, CIDATA devices, config-2 devices)
    type Present = (
        bool,
        bool,
        bool,
        &'static [&'static str],
        &'static [&'static str],
    );

    fn found((saved, fw_cfg, imds, cidata, config_drive): Present) -> Found {
        Found {
            saved,
            fw_cfg,
            imds,
            cidata: cidata.iter().map(|d| dev(d)).collect(),
            config_drive: config_drive.iter().map(|d| dev(d)).collect(),
        }
    }

    #[test]
    fn every_combination_of_sources_follows_the_policy() {
        // (present, source used, saved anew, ignored)
        type Case = (Present, Option<Source>, bool, Vec<Ignored>);
        let none: &[&str] = &[];
        let cases: Vec<Case> = vec![
            // Nothing at all: defaults.
            ((false, false, false, none, none), None, false, vec![]),
            // First provisioning through CIDATA.
            (
                (false, false, false, &["vdb"], none),
                Some(Source::Cidata(dev("vdb"))),
                true,
                vec![],
            ),
            // Two CIDATA volumes at first provisioning: the first only.
            (
                (false, false, false, &["vdb", "vdc"], none),
                Some(Source::Cidata(dev("vdb"))),
                true,
                vec![ignored("vdc", REASON_NOT_FIRST)],
            ),
            // First provisioning through a config drive.
            (
                (false, false, false, none, &["sr0"]),
                Some(Source::ConfigDrive(dev("sr0"))),
                true,
                vec![],
            ),
            // CIDATA before config-2, whatever the device names.
            (
                (false, false, false, &["vdc"], &["vdb"]),
                Some(Source::Cidata(dev("vdc"))),
                true,
                vec![ignored_drive("vdb", REASON_NOT_FIRST)],
            ),
            // First provisioning through fw_cfg.
            (
                (false, true, false, none, none),
                Some(Source::FwCfg),
                true,
                vec![],
            ),
            // fw_cfg beats volumes at first provisioning.
            (
                (false, true, false, &["vdb"], &["vdc"]),
                Some(Source::FwCfg),
                true,
                vec![
                    ignored("vdb", REASON_FW_CFG_WINS),
                    ignored_drive("vdc", REASON_FW_CFG_WINS),
                ],
            ),
            // First provisioning through instance metadata.
            (
                (false, false, true, none, none),
                Some(Source::Imds),
                true,
                vec![],
            ),
            // Instance metadata beats volumes.
            (
                (false, false, true, &["vdb"], &["vdc"]),
                Some(Source::Imds),
                true,
                vec![
                    ignored("vdb", REASON_IMDS_WINS),
                    ignored_drive("vdc", REASON_IMDS_WINS),
                ],
            ),
            // fw_cfg beats instance metadata.
            (
                (false, true, true, none, none),
                Some(Source::FwCfg),
                true,
                vec![Ignored {
                    source: "imds",
                    device: None,
                    reason: REASON_FW_CFG_WINS,
                }],
            ),
            // Provisioned: later boots need no source.
            (
                (true, false, false, none, none),
                Some(Source::Saved),
                false,
                vec![],
            ),
            // Provisioned: a volume attached later cannot take over.
            (
                (true, false, false, &["vdb"], none),
                Some(Source::Saved),
                false,
                vec![ignored("vdb", REASON_PROVISIONED)],
            ),
            (
                (true, false, false, &["sda", "vdb1"], &["sr0"]),
                Some(Source::Saved),
                false,
                vec![
                    ignored("sda", REASON_PROVISIONED),
                    ignored("vdb1", REASON_PROVISIONED),
                    ignored_drive("sr0", REASON_PROVISIONED),
                ],
            ),
            // Provisioned: fw_cfg (the VM owner's) still changes user-data.
            (
                (true, true, false, none, none),
                Some(Source::FwCfg),
                true,
                vec![],
            ),
            (
                (true, true, false, &["vdb"], none),
                Some(Source::FwCfg),
                true,
                vec![ignored("vdb", REASON_PROVISIONED)],
            ),
            // Provisioned: so does instance metadata (the VM owner's too).
            (
                (true, false, true, none, &["vdb"]),
                Some(Source::Imds),
                true,
                vec![ignored_drive("vdb", REASON_PROVISIONED)],
            ),
        ];
        for (present, source, save, want_ignored) in cases {
            let found = found(present);
            let d = decide(&found);
            assert_eq!(d.use_source, source, "{found:?}");
            assert_eq!(d.save, save, "{found:?}");
            assert_eq!(d.ignored, want_ignored, "{found:?}");
        }
    }

    #[test]
    fn a_volume_never_replaces_saved_user_data() {
        // Whatever else is present, once provisioned no volume is used.
        for fw_cfg in [false, true] {
            for imds in [false, true] {
                let d = decide(&found((true, fw_cfg, imds, &["vdb"], &["vdc"])));
                assert!(!matches!(
                    d.use_source,
                    Some(Source::Cidata(_) | Source::ConfigDrive(_))
                ));
                let volumes = d.ignored.iter().filter(|i| i.device.is_some()).count();
                assert_eq!(volumes, 2);
            }
        }
    }

    #[test]
    fn the_provisional_layer_is_the_saved_copy_only() {
        let g = Gathered {
            saved_text: Some("a = 1\n".into()),
            fw_cfg_text: None,
            cidata: vec![dev("vdb")],
            config_drive: vec![(dev("vdc"), Filesystem::Vfat)],
        };
        let layer = g.provisional().unwrap();
        assert_eq!(layer.text, "a = 1\n");
        assert_eq!(layer.source, Path::new(SAVED_USER_DATA));
        assert_eq!(Gathered::default().provisional(), None);
    }

    #[test]
    fn the_status_serializes_for_the_api() {
        let s = Status {
            source: Some("saved"),
            device: None,
            ignored: vec![ignored("vdb", REASON_PROVISIONED)],
        };
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["source"], "saved");
        assert_eq!(v["ignored"][0]["source"], "cidata");
        assert_eq!(v["ignored"][0]["device"], "/dev/vdb");
        assert!(v["ignored"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("provisioned"));
    }
}
