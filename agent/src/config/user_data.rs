//! Which user-data a node trusts at boot (docs/configuration.md, "User-data").
//!
//! User-data is full root control of a node, so a source that appears after
//! provisioning must not take it over: a `CIDATA` volume is accepted only
//! while STATE holds no saved user-data yet (first provisioning). After
//! that, changes come only through the hypervisor's fw_cfg (which only the
//! VM's owner controls) or the authenticated API (`PUT /v1/user-data`,
//! which writes the saved copy). A source that is not accepted is reported
//! (console event `user-data-ignored`, and [`status`] for `/status`) and
//! ignored. [`decide`] is the policy, free of I/O; [`find`] is the thin
//! I/O around it.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde::Serialize;

use super::{save_user_data, Layer, FW_CFG_USER_DATA, SAVED_USER_DATA};

/// Where user-data can come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// QEMU's fw_cfg entry `opt/ballast/user-data`.
    FwCfg,
    /// A FAT volume labelled `CIDATA` on this block device.
    Cidata(PathBuf),
    /// The copy kept on STATE from an earlier boot (or the API).
    Saved,
}

impl Source {
    /// The name used in events and `/status`.
    pub fn name(&self) -> &'static str {
        match self {
            Source::FwCfg => "fw_cfg",
            Source::Cidata(_) => "cidata",
            Source::Saved => "saved",
        }
    }

    fn device(&self) -> Option<&Path> {
        match self {
            Source::Cidata(d) => Some(d),
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
    /// Block devices whose FAT label is `CIDATA`, in device-name order.
    pub cidata: Vec<PathBuf>,
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

pub const REASON_PROVISIONED: &str =
    "the node is provisioned (STATE holds user-data); CIDATA is read only at first provisioning";
pub const REASON_FW_CFG_WINS: &str = "fw_cfg user-data takes precedence";
pub const REASON_NOT_FIRST: &str =
    "more than one CIDATA volume; only the first by device name is used";

/// The user-data policy, without I/O (see the module doc):
/// fw_cfg always wins and is saved; else CIDATA only while nothing is
/// saved (then saved); else the saved copy.
pub fn decide(found: &Found) -> Decision {
    let mut ignored = Vec::new();
    let cidata_ignored = |device: &PathBuf, reason| Ignored {
        source: "cidata",
        device: Some(device.clone()),
        reason,
    };
    let (use_source, save) = if found.fw_cfg {
        let reason = if found.saved {
            REASON_PROVISIONED
        } else {
            REASON_FW_CFG_WINS
        };
        ignored.extend(found.cidata.iter().map(|d| cidata_ignored(d, reason)));
        (Some(Source::FwCfg), true)
    } else if found.saved {
        ignored.extend(
            found
                .cidata
                .iter()
                .map(|d| cidata_ignored(d, REASON_PROVISIONED)),
        );
        (Some(Source::Saved), false)
    } else if let Some((first, rest)) = found.cidata.split_first() {
        ignored.extend(rest.iter().map(|d| cidata_ignored(d, REASON_NOT_FIRST)));
        (Some(Source::Cidata(first.clone())), true)
    } else {
        (None, false)
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

/// This boot's user-data status, once [`find`] ran (the API reads it).
pub fn status() -> Option<&'static Status> {
    STATUS.get()
}

/// Finds user-data by the policy above, reports ignored sources and keeps
/// an accepted fresh source on STATE (mode 0600).
pub fn find() -> Option<Layer> {
    let saved_path = Path::new(SAVED_USER_DATA);
    let saved_text = std::fs::read_to_string(saved_path).ok();
    let fw_cfg_text = std::fs::read_to_string(FW_CFG_USER_DATA).ok();
    let found = Found {
        saved: saved_text.is_some(),
        fw_cfg: fw_cfg_text.is_some(),
        // Labels only: an untrusted volume is mounted only once accepted.
        cidata: crate::boot::cidata::scan(),
    };
    let decision = decide(&found);
    let saved_text_now = saved_text.clone();
    for i in &decision.ignored {
        tracing::warn!(source = i.source, device = ?i.device, reason = i.reason, "user-data ignored");
        crate::console::emit(&crate::console::Event::UserDataIgnored {
            source: i.source.to_owned(),
            device: i.device.as_ref().map(|d| d.display().to_string()),
            reason: i.reason.to_owned(),
        });
    }
    let layer = match &decision.use_source {
        None => None,
        Some(Source::Saved) => saved_text.map(|text| Layer {
            source: SAVED_USER_DATA.into(),
            text,
        }),
        Some(Source::FwCfg) => fw_cfg_text.map(|text| Layer {
            source: FW_CFG_USER_DATA.into(),
            text,
        }),
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
    };
    if let (true, Some(layer)) = (decision.save, &layer) {
        // Unchanged text is not rewritten: no needless writes to STATE.
        if saved_text_now.as_ref() != Some(&layer.text) {
            save_user_data(saved_path, &layer.text);
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
    layer
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

    #[test]
    fn every_combination_of_sources_follows_the_policy() {
        // (saved, fw_cfg, cidata devices, source used, saved anew, ignored)
        type Case = (
            bool,
            bool,
            &'static [&'static str],
            Option<Source>,
            bool,
            Vec<Ignored>,
        );
        let cases: Vec<Case> = vec![
            // Nothing at all: defaults.
            (false, false, &[], None, false, vec![]),
            // First provisioning through CIDATA.
            (
                false,
                false,
                &["vdb"],
                Some(Source::Cidata(dev("vdb"))),
                true,
                vec![],
            ),
            // Two CIDATA volumes at first provisioning: the first only.
            (
                false,
                false,
                &["vdb", "vdc"],
                Some(Source::Cidata(dev("vdb"))),
                true,
                vec![ignored("vdc", REASON_NOT_FIRST)],
            ),
            // First provisioning through fw_cfg.
            (false, true, &[], Some(Source::FwCfg), true, vec![]),
            // fw_cfg beats a CIDATA volume at first provisioning.
            (
                false,
                true,
                &["vdb"],
                Some(Source::FwCfg),
                true,
                vec![ignored("vdb", REASON_FW_CFG_WINS)],
            ),
            // Provisioned: later boots need no source.
            (true, false, &[], Some(Source::Saved), false, vec![]),
            // Provisioned: a CIDATA volume attached later cannot take over.
            (
                true,
                false,
                &["vdb"],
                Some(Source::Saved),
                false,
                vec![ignored("vdb", REASON_PROVISIONED)],
            ),
            (
                true,
                false,
                &["sda", "vdb1"],
                Some(Source::Saved),
                false,
                vec![
                    ignored("sda", REASON_PROVISIONED),
                    ignored("vdb1", REASON_PROVISIONED),
                ],
            ),
            // Provisioned: fw_cfg (the VM owner's) still changes user-data.
            (true, true, &[], Some(Source::FwCfg), true, vec![]),
            (
                true,
                true,
                &["vdb"],
                Some(Source::FwCfg),
                true,
                vec![ignored("vdb", REASON_PROVISIONED)],
            ),
        ];
        for (saved, fw_cfg, cidata, source, save, want_ignored) in cases {
            let found = Found {
                saved,
                fw_cfg,
                cidata: cidata.iter().map(|d| dev(d)).collect(),
            };
            let d = decide(&found);
            assert_eq!(d.use_source, source, "{found:?}");
            assert_eq!(d.save, save, "{found:?}");
            assert_eq!(d.ignored, want_ignored, "{found:?}");
        }
    }

    #[test]
    fn a_cidata_volume_never_replaces_saved_user_data() {
        // Whatever else is present, once provisioned CIDATA is never used.
        for fw_cfg in [false, true] {
            let d = decide(&Found {
                saved: true,
                fw_cfg,
                cidata: vec![dev("vdb")],
            });
            assert!(!matches!(d.use_source, Some(Source::Cidata(_))));
            assert_eq!(d.ignored.len(), 1);
        }
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
