//! A model of systemd-boot 252's choice among Boot Loader Specification
//! entries and its boot counting, as documented in systemd's "Automatic
//! Boot Assessment" and the Boot Loader Specification:
//!
//! - entries whose counter has no tries left (`+0[-N]`) sort after all
//!   others; among the rest (and among those), entries sort by id (the file
//!   name with the counter stripped) in version order, newest first;
//! - with `timeout 0` and no default set, the first entry boots;
//! - before booting an entry with tries left, the loader renames it to
//!   `+<left-1>-<done+1>`; entries without a counter are never renamed.
//!
//! Ballast only ever writes `ballast-X.Y.Z[...].conf`, so ids compare by
//! [`Version`]. The power-loss tests use [`BootModel::boot_until_good`] to
//! check that a node would come up on a signed, complete version.

use std::path::Path;

use crate::bootentry::{EntryName, ENTRIES_DIR};
use crate::esp::{list_entries, InstalledEntry};
use crate::storage::{Storage, StorageError};

/// systemd-boot's default-entry order: first is what boots.
pub fn boot_order(entries: &[InstalledEntry]) -> Vec<&InstalledEntry> {
    let mut sorted: Vec<&InstalledEntry> = entries.iter().collect();
    sorted.sort_by(|a, b| {
        let (na, nb) = (&a.name, &b.name);
        na.is_exhausted()
            .cmp(&nb.is_exhausted())
            .then_with(|| nb.version.cmp(&na.version))
            // Same id: more tries left first, then fewer done (sd-boot's tie-break).
            .then_with(|| tries_left(nb).cmp(&tries_left(na)))
            .then_with(|| tries_done(na).cmp(&tries_done(nb)))
    });
    sorted
}

fn tries_left(n: &EntryName) -> u32 {
    n.counter.map_or(u32::MAX, |c| c.left)
}

fn tries_done(n: &EntryName) -> u32 {
    n.counter.map_or(0, |c| c.done)
}

/// What one simulated boot did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootAttempt {
    /// The entry file as it was named when chosen.
    pub chosen: String,
    /// Its name after the loader's counter rename.
    pub renamed_to: String,
    pub name: EntryName,
}

/// The loader, acting on an ESP held in a [`Storage`].
pub struct BootModel<'a> {
    pub storage: &'a dyn Storage,
    pub esp: &'a Path,
}

impl std::fmt::Debug for BootModel<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BootModel").field("esp", &self.esp).finish()
    }
}

impl BootModel<'_> {
    /// One power-on: pick the default entry and count the try. `None`
    /// when there is no Ballast entry at all.
    pub fn boot_once(&self) -> Result<Option<BootAttempt>, StorageError> {
        let entries = list_entries(self.storage, self.esp)?;
        let order = boot_order(&entries);
        let Some(first) = order.first() else {
            return Ok(None);
        };
        let mut name = first.name;
        if let Some(c) = name.counter.as_mut() {
            if c.left > 0 {
                c.left -= 1;
                c.done += 1;
            }
        }
        let renamed_to = name.to_string();
        if renamed_to != first.file_name {
            let dir = self.esp.join(ENTRIES_DIR);
            self.storage
                .rename(&dir.join(&first.file_name), &dir.join(&renamed_to))?;
            self.storage.sync_dir(&dir)?;
        }
        Ok(Some(BootAttempt {
            chosen: first.file_name.clone(),
            renamed_to,
            name,
        }))
    }

    /// Boots repeatedly; each boot succeeds only if `boots_fine` says so
    /// for the chosen entry's file. Returns the attempt that came up, or
    /// `None` when after `max_boots` the node never did (a boot loop).
    pub fn boot_until_good(
        &self,
        max_boots: usize,
        mut boots_fine: impl FnMut(&InstalledEntry) -> bool,
    ) -> Result<Option<BootAttempt>, StorageError> {
        for _ in 0..max_boots {
            let entries = list_entries(self.storage, self.esp)?;
            let order = boot_order(&entries);
            let Some(first) = order.first() else {
                return Ok(None);
            };
            let good = boots_fine(first);
            let Some(attempt) = self.boot_once()? else {
                return Ok(None);
            };
            if good {
                return Ok(Some(attempt));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bootentry::BootEntryError;
    use crate::storage::MemStorage;
    use std::path::PathBuf;

    fn entry(file: &str) -> InstalledEntry {
        InstalledEntry {
            file_name: file.into(),
            name: file.parse().unwrap(),
            entry: Err(BootEntryError::MissingKey("options")),
        }
    }

    #[test]
    fn exhausted_last_then_newest_first() {
        let entries = [
            entry("ballast-1.0.0.conf"),
            entry("ballast-1.10.0+0-3.conf"),
            entry("ballast-1.9.0+2-1.conf"),
        ];
        let order: Vec<&str> = boot_order(&entries)
            .iter()
            .map(|e| e.file_name.as_str())
            .collect();
        assert_eq!(
            order,
            [
                "ballast-1.9.0+2-1.conf",
                "ballast-1.0.0.conf",
                "ballast-1.10.0+0-3.conf"
            ]
        );
    }

    #[test]
    fn a_failing_trial_entry_falls_back_after_its_tries() {
        let fs = MemStorage::new();
        let esp = PathBuf::from("/esp");
        let dir = esp.join(ENTRIES_DIR);
        fs.put(&dir.join("ballast-1.0.0.conf"), b"x");
        fs.put(&dir.join("ballast-2.0.0+3.conf"), b"x");
        let model = BootModel {
            storage: &fs,
            esp: &esp,
        };
        let mut tried = Vec::new();
        let up = model
            .boot_until_good(10, |e| {
                tried.push(e.file_name.clone());
                e.name.version.major == 1
            })
            .unwrap()
            .unwrap();
        assert_eq!(up.chosen, "ballast-1.0.0.conf");
        assert_eq!(
            tried,
            [
                "ballast-2.0.0+3.conf",
                "ballast-2.0.0+2-1.conf",
                "ballast-2.0.0+1-2.conf",
                "ballast-1.0.0.conf"
            ]
        );
        assert!(fs.exists(&dir.join("ballast-2.0.0+0-3.conf")));
    }
}
