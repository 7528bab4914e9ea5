//! Boot control on the running node: `mark-good` (bless the running entry
//! by dropping its counter), `rollback` (make the other slot's entry boot
//! next without ever leaving zero bootable entries), and `status`.

use std::time::SystemTime;

use serde::Serialize;

use crate::bootentry::{BootCounter, EntryName};
use crate::bootmodel::boot_order;
use crate::cmdline::Slot;
use crate::esp::{list_entries, running_entry, InstalledEntry, NodeLayout};
use crate::payload::Version;
use crate::state::{Event, EventKind, StateDir, StateError};
use crate::storage::{Storage, StorageError};

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("no boot entry on the ESP boots the running version {version} from slot {slot}")]
    RunningEntryMissing { version: Version, slot: Slot },
    #[error("nothing to roll back to: no bootable entry for slot {slot} (entries: {entries:?})")]
    NoRollbackTarget { slot: Slot, entries: Vec<String> },
    #[error("refusing to roll back to {target}: it is below the release floor {floor} the repository set")]
    BelowFloor { target: Version, floor: Version },
}

/// What `mark-good` did.
#[derive(Debug, Clone, Serialize)]
pub struct BlessReport {
    pub version: Version,
    pub entry: String,
    pub was_blessed: bool,
    /// Newer versions whose tries ran out: this boot is a fallback from them.
    pub rolled_back_from: Vec<Version>,
}

fn rename_entry(
    storage: &dyn Storage,
    layout: &NodeLayout,
    from: &str,
    to: &EntryName,
) -> Result<String, StorageError> {
    let dir = layout.entries_dir();
    let to = to.to_string();
    if to != from {
        storage.rename(&dir.join(from), &dir.join(&to))?;
    }
    Ok(to)
}

/// Blesses the running entry, and records any newer version that failed
/// (its counter ran out and systemd-boot fell back to us) as rejected.
pub fn mark_good(
    storage: &dyn Storage,
    layout: &NodeLayout,
    now: SystemTime,
) -> Result<BlessReport, ControlError> {
    let running = &layout.running;
    let entries = list_entries(storage, &layout.esp)?;
    let current = running_entry(&entries, running).ok_or(ControlError::RunningEntryMissing {
        version: running.version,
        slot: running.slot,
    })?;
    let was_blessed = current.name.counter.is_none();
    let blessed = EntryName::blessed(running.version);
    let entry = rename_entry(storage, layout, &current.file_name, &blessed)?;
    if !was_blessed {
        storage.sync_dir(&layout.entries_dir())?;
    }
    let state = StateDir::new(storage, &layout.state_dir);
    let failed: Vec<Version> = entries
        .iter()
        .filter(|e| e.name.is_exhausted() && e.name.version > running.version)
        .map(|e| e.name.version)
        .collect();
    for v in &failed {
        if !state.rejected()?.contains(v) {
            state.reject(*v)?;
            state.record(&Event::new(
                EventKind::RollbackDetected,
                *v,
                running.slot.other(),
                now,
                Some(format!(
                    "{v} used up its boot tries; systemd-boot fell back to {}",
                    running.version
                )),
            ))?;
        }
    }
    if !was_blessed {
        state.record(&Event::new(
            EventKind::Bless,
            running.version,
            running.slot,
            now,
            Some("health gate passed".into()),
        ))?;
    }
    Ok(BlessReport {
        version: running.version,
        entry,
        was_blessed,
        rolled_back_from: failed,
    })
}

/// What `rollback` did.
#[derive(Debug, Clone, Serialize)]
pub struct RollbackReport {
    pub from: Version,
    pub to: Version,
    pub slot: Slot,
    pub renamed: Vec<(String, String)>,
}

fn bootable(storage: &dyn Storage, layout: &NodeLayout, e: &InstalledEntry) -> bool {
    e.entry.is_ok()
        && storage.exists(&layout.kernel_path(e.name.version))
        && storage.exists(&layout.initrd_path(e.name.version))
}

/// Makes the other slot's entry the one systemd-boot picks next. Entries
/// are only ever renamed, never removed, so the running version stays
/// bootable as the last resort.
pub fn rollback(
    storage: &dyn Storage,
    layout: &NodeLayout,
    reason: &str,
    now: SystemTime,
) -> Result<RollbackReport, ControlError> {
    let running = &layout.running;
    let other_slot = running.slot.other();
    let entries = list_entries(storage, &layout.esp)?;
    let current = running_entry(&entries, running).ok_or(ControlError::RunningEntryMissing {
        version: running.version,
        slot: running.slot,
    })?;
    let other = entries
        .iter()
        .filter(|e| e.slot() == Some(other_slot) && bootable(storage, layout, e))
        .max_by_key(|e| e.name.version)
        .ok_or_else(|| ControlError::NoRollbackTarget {
            slot: other_slot,
            entries: entries.iter().map(|e| e.file_name.clone()).collect(),
        })?;
    let state = StateDir::new(storage, &layout.state_dir);
    if let Some(floor) = state.floor()? {
        if other.name.version < floor {
            return Err(ControlError::BelowFloor {
                target: other.name.version,
                floor,
            });
        }
    }
    let mut renamed = Vec::new();
    let dir = layout.entries_dir();
    // First make the target eligible, then demote the running entry: a
    // cut between the two still boots the running version.
    if other.name.is_exhausted() {
        let done = other.name.counter.map_or(0, |c| c.done);
        let to = EntryName {
            version: other.name.version,
            counter: Some(BootCounter { left: 1, done }),
        };
        let new = rename_entry(storage, layout, &other.file_name, &to)?;
        storage.sync_dir(&dir)?;
        renamed.push((other.file_name.clone(), new));
    }
    if other.name.version <= running.version {
        let done = current.name.counter.map_or(0, |c| c.done) + 1;
        let to = EntryName {
            version: running.version,
            counter: Some(BootCounter { left: 0, done }),
        };
        let new = rename_entry(storage, layout, &current.file_name, &to)?;
        storage.sync_dir(&dir)?;
        renamed.push((current.file_name.clone(), new));
    }
    if running.version > other.name.version {
        state.reject(running.version)?;
    }
    state.record(&Event::new(
        EventKind::Rollback,
        other.name.version,
        other_slot,
        now,
        Some(reason.to_owned()),
    ))?;
    Ok(RollbackReport {
        from: running.version,
        to: other.name.version,
        slot: other_slot,
        renamed,
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct EntryStatus {
    pub file: String,
    pub version: Version,
    pub slot: Option<Slot>,
    /// `None`: blessed (no counter).
    pub tries_left: Option<u32>,
    pub tries_done: Option<u32>,
    pub bootable: bool,
    pub boots_next: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SlotStatus {
    pub slot: Slot,
    pub path: String,
    pub partuuid: String,
    pub running: bool,
    /// Versions whose entries boot this slot.
    pub versions: Vec<Version>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    pub running_version: Version,
    pub running_slot: Slot,
    pub running_entry: Option<String>,
    pub blessed: bool,
    pub slots: Vec<SlotStatus>,
    pub entries: Vec<EntryStatus>,
    pub last_event: Option<Event>,
    pub rejected: Vec<Version>,
    pub highest_sequence: Option<u64>,
}

pub fn status(storage: &dyn Storage, layout: &NodeLayout) -> Result<StatusReport, ControlError> {
    let running = &layout.running;
    let entries = list_entries(storage, &layout.esp)?;
    let current = running_entry(&entries, running);
    let next = boot_order(&entries).first().map(|e| e.file_name.clone());
    let entry_status = entries
        .iter()
        .map(|e| EntryStatus {
            file: e.file_name.clone(),
            version: e.name.version,
            slot: e.slot(),
            tries_left: e.name.counter.map(|c| c.left),
            tries_done: e.name.counter.map(|c| c.done),
            bootable: bootable(storage, layout, e),
            boots_next: next.as_deref() == Some(e.file_name.as_str()),
            error: e.entry.as_ref().err().map(|err| err.to_string()),
        })
        .collect();
    let slots = [Slot::A, Slot::B]
        .into_iter()
        .map(|s| {
            let dev = layout.slot(s);
            SlotStatus {
                slot: s,
                path: dev.path.display().to_string(),
                partuuid: dev.partuuid.hyphenated().to_string(),
                running: s == running.slot,
                versions: entries
                    .iter()
                    .filter(|e| e.slot() == Some(s))
                    .map(|e| e.name.version)
                    .collect(),
            }
        })
        .collect();
    let state = StateDir::new(storage, &layout.state_dir);
    Ok(StatusReport {
        running_version: running.version,
        running_slot: running.slot,
        running_entry: current.map(|e| e.file_name.clone()),
        blessed: current.is_some_and(|e| e.name.counter.is_none()),
        slots,
        entries: entry_status,
        last_event: state.last_event()?,
        rejected: state.rejected()?,
        highest_sequence: state.highest_sequence()?,
    })
}
