//! The node's boot state as files: where the ESP, the two slots and the
//! state directory are ([`NodeLayout`]), and the Ballast boot entries on
//! the ESP with their counters ([`list_entries`]).

use std::path::{Path, PathBuf};

use uuid::Uuid;

use crate::bootentry::{
    version_dir, BootEntry, BootEntryError, EntryName, ENTRIES_DIR, ENTRY_PREFIX,
};
use crate::cmdline::{BootParams, Slot};
use crate::payload::{Version, INITRD, KERNEL};
use crate::storage::{Storage, StorageError};

/// One update slot: a partition (or a plain file standing in for one) and
/// the PARTUUID boot entries name it by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotDevice {
    pub slot: Slot,
    pub path: PathBuf,
    pub partuuid: Uuid,
}

/// Everything the node-side commands touch.
#[derive(Debug, Clone)]
pub struct NodeLayout {
    /// Root of the mounted ESP (`/efi` on a node).
    pub esp: PathBuf,
    pub slot_a: SlotDevice,
    pub slot_b: SlotDevice,
    /// Persistent updater state (`/var/lib/ballast/update` on a node).
    pub state_dir: PathBuf,
    /// What the running kernel was booted with.
    pub running: BootParams,
}

impl NodeLayout {
    pub fn slot(&self, slot: Slot) -> &SlotDevice {
        match slot {
            Slot::A => &self.slot_a,
            Slot::B => &self.slot_b,
        }
    }

    pub fn entries_dir(&self) -> PathBuf {
        self.esp.join(ENTRIES_DIR)
    }

    pub fn version_dir(&self, version: Version) -> PathBuf {
        self.esp.join(version_dir(version))
    }

    pub fn kernel_path(&self, version: Version) -> PathBuf {
        self.version_dir(version).join(KERNEL)
    }

    pub fn initrd_path(&self, version: Version) -> PathBuf {
        self.version_dir(version).join(INITRD)
    }
}

/// A Ballast entry file found on the ESP.
#[derive(Debug, Clone)]
pub struct InstalledEntry {
    pub file_name: String,
    pub name: EntryName,
    /// The parsed contents, or why they do not parse.
    pub entry: Result<BootEntry, BootEntryError>,
}

impl InstalledEntry {
    /// The slot the entry boots, when its contents parse.
    pub fn slot(&self) -> Option<Slot> {
        self.entry.as_ref().ok().map(|e| e.params.slot)
    }
}

/// Ballast's entries under `loader/entries/`, in file-name order. Other
/// files (another OS's entries, our temporary files) are left out.
pub fn list_entries(
    storage: &dyn Storage,
    esp: &Path,
) -> Result<Vec<InstalledEntry>, StorageError> {
    let dir = esp.join(ENTRIES_DIR);
    let mut out = Vec::new();
    for file_name in storage.list_dir(&dir)? {
        if !file_name.starts_with(ENTRY_PREFIX) {
            continue;
        }
        let Ok(name) = file_name.parse::<EntryName>() else {
            continue;
        };
        let entry = match storage.read(&dir.join(&file_name)) {
            Ok(bytes) => match String::from_utf8(bytes) {
                Ok(text) => BootEntry::parse(&text),
                Err(_) => Err(BootEntryError::Invalid {
                    key: "encoding",
                    value: "not UTF-8".into(),
                }),
            },
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(e),
        };
        out.push(InstalledEntry {
            file_name,
            name,
            entry,
        });
    }
    Ok(out)
}

/// The entry the running system booted from: same version and slot.
pub fn running_entry<'a>(
    entries: &'a [InstalledEntry],
    running: &BootParams,
) -> Option<&'a InstalledEntry> {
    entries.iter().find(|e| {
        e.name.version == running.version
            && e.entry.as_ref().is_ok_and(|b| {
                b.params.slot == running.slot && b.params.root_hash == running.root_hash
            })
    })
}
