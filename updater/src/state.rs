//! The updater's persistent state on the node's STATE partition: the
//! highest manifest sequence number seen (replay protection), the last
//! install, bless or rollback and its reason, the releases that failed on
//! this node, and the node's rollout bucket. Every write is atomic
//! (temporary file, fsync, rename, fsync of the directory).

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::cmdline::Slot;
use crate::payload::Version;
use crate::storage::{write_atomic, Storage, StorageError};

const SEQUENCE_FILE: &str = "highest-sequence";
const LAST_EVENT_FILE: &str = "last-event.json";
const REJECTED_FILE: &str = "rejected.json";
const BUCKET_FILE: &str = "rollout-bucket";
/// The highest release floor any verified manifest has carried.
const FLOOR_FILE: &str = "release-floor";
/// One empty file per version whose fall-back the agent has reported.
const ROLLBACK_REPORTED_PREFIX: &str = "rollback-reported-";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("state file {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

/// The kinds of [`Event`]; on disk as the kebab-case names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// A release was installed into the other slot.
    Install,
    /// The running version passed its trial.
    Bless,
    /// The node was sent back to the other slot.
    Rollback,
    /// A newer version used up its boot tries and systemd-boot fell back.
    RollbackDetected,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Install => "install",
            EventKind::Bless => "bless",
            EventKind::Rollback => "rollback",
            EventKind::RollbackDetected => "rollback-detected",
        }
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happened last, for `ballast update status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub kind: EventKind,
    pub version: Version,
    pub slot: Slot,
    /// RFC 3339.
    pub at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Event {
    pub fn new(
        kind: EventKind,
        version: Version,
        slot: Slot,
        now: SystemTime,
        reason: Option<String>,
    ) -> Self {
        Event {
            kind,
            version,
            slot,
            at: humantime::format_rfc3339_seconds(now).to_string(),
            reason,
        }
    }
}

/// The state directory through a [`Storage`].
#[derive(Clone, Copy)]
pub struct StateDir<'a> {
    storage: &'a dyn Storage,
    dir: &'a Path,
}

impl std::fmt::Debug for StateDir<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateDir").field("dir", &self.dir).finish()
    }
}

impl<'a> StateDir<'a> {
    pub fn new(storage: &'a dyn Storage, dir: &'a Path) -> Self {
        StateDir { storage, dir }
    }

    fn read_opt(&self, name: &str) -> Result<Option<Vec<u8>>, StateError> {
        match self.storage.read(&self.dir.join(name)) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn corrupt(&self, name: &str, reason: impl ToString) -> StateError {
        StateError::Corrupt {
            path: self.dir.join(name),
            reason: reason.to_string(),
        }
    }

    pub fn highest_sequence(&self) -> Result<Option<u64>, StateError> {
        let Some(bytes) = self.read_opt(SEQUENCE_FILE)? else {
            return Ok(None);
        };
        let text = String::from_utf8_lossy(&bytes);
        text.trim()
            .parse()
            .map(Some)
            .map_err(|e| self.corrupt(SEQUENCE_FILE, e))
    }

    /// Records `sequence` if it is higher than what was seen.
    pub fn raise_sequence(&self, sequence: u64) -> Result<(), StateError> {
        if self.highest_sequence()?.is_some_and(|s| s >= sequence) {
            return Ok(());
        }
        self.storage.create_dir_all(self.dir)?;
        write_atomic(
            self.storage,
            &self.dir.join(SEQUENCE_FILE),
            format!("{sequence}\n").as_bytes(),
        )?;
        Ok(())
    }

    /// The highest release floor seen in a verified manifest: kept on the
    /// node so rollbacks honour it after the repository is gone.
    pub fn floor(&self) -> Result<Option<Version>, StateError> {
        let Some(bytes) = self.read_opt(FLOOR_FILE)? else {
            return Ok(None);
        };
        let text = String::from_utf8_lossy(&bytes);
        text.trim()
            .parse()
            .map(Some)
            .map_err(|e| self.corrupt(FLOOR_FILE, e))
    }

    /// Records `floor` if it is higher than the one kept.
    pub fn raise_floor(&self, floor: Version) -> Result<(), StateError> {
        if self.floor()?.is_some_and(|f| f >= floor) {
            return Ok(());
        }
        self.storage.create_dir_all(self.dir)?;
        write_atomic(
            self.storage,
            &self.dir.join(FLOOR_FILE),
            format!("{floor}\n").as_bytes(),
        )?;
        Ok(())
    }

    pub fn last_event(&self) -> Result<Option<Event>, StateError> {
        let Some(bytes) = self.read_opt(LAST_EVENT_FILE)? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| self.corrupt(LAST_EVENT_FILE, e))
    }

    pub fn record(&self, event: &Event) -> Result<(), StateError> {
        self.storage.create_dir_all(self.dir)?;
        let bytes =
            serde_json::to_vec_pretty(event).map_err(|e| self.corrupt(LAST_EVENT_FILE, e))?;
        write_atomic(self.storage, &self.dir.join(LAST_EVENT_FILE), &bytes)?;
        Ok(())
    }

    pub fn rejected(&self) -> Result<Vec<Version>, StateError> {
        let Some(bytes) = self.read_opt(REJECTED_FILE)? else {
            return Ok(Vec::new());
        };
        serde_json::from_slice(&bytes).map_err(|e| self.corrupt(REJECTED_FILE, e))
    }

    pub fn reject(&self, version: Version) -> Result<(), StateError> {
        let mut list = self.rejected()?;
        if list.contains(&version) {
            return Ok(());
        }
        list.push(version);
        list.sort();
        self.storage.create_dir_all(self.dir)?;
        let bytes = serde_json::to_vec(&list).map_err(|e| self.corrupt(REJECTED_FILE, e))?;
        write_atomic(self.storage, &self.dir.join(REJECTED_FILE), &bytes)?;
        Ok(())
    }

    /// Notes that the fall-back from `version` has been reported; true
    /// the first time, so the agent reports each fall-back once, not at
    /// every boot. The marker is written atomically like every state file.
    pub fn note_rollback_reported(&self, version: Version) -> Result<bool, StateError> {
        let name = format!("{ROLLBACK_REPORTED_PREFIX}{version}");
        if self.read_opt(&name)?.is_some() {
            return Ok(false);
        }
        self.storage.create_dir_all(self.dir)?;
        write_atomic(self.storage, &self.dir.join(&name), b"")?;
        Ok(true)
    }

    /// The node's rollout bucket (0..100), drawn once at random and kept.
    pub fn bucket(&self) -> Result<u8, StateError> {
        if let Some(bytes) = self.read_opt(BUCKET_FILE)? {
            let text = String::from_utf8_lossy(&bytes);
            return text
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|b| *b < 100)
                .ok_or_else(|| self.corrupt(BUCKET_FILE, "not a number below 100"));
        }
        let mut raw = [0u8; 2];
        getrandom::getrandom(&mut raw).map_err(|e| self.corrupt(BUCKET_FILE, e))?;
        let bucket = (u16::from_le_bytes(raw) % 100) as u8;
        self.storage.create_dir_all(self.dir)?;
        write_atomic(
            self.storage,
            &self.dir.join(BUCKET_FILE),
            format!("{bucket}\n").as_bytes(),
        )?;
        Ok(bucket)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    #[test]
    fn sequence_only_rises_and_survives() {
        let fs = MemStorage::new();
        let dir = Path::new("/state");
        let st = StateDir::new(&fs, dir);
        assert_eq!(st.highest_sequence().unwrap(), None);
        st.raise_sequence(7).unwrap();
        st.raise_sequence(3).unwrap();
        fs.reboot_after_crash();
        assert_eq!(st.highest_sequence().unwrap(), Some(7));
        let b = st.bucket().unwrap();
        assert_eq!(st.bucket().unwrap(), b);
        st.reject("1.0.0".parse().unwrap()).unwrap();
        assert_eq!(st.rejected().unwrap().len(), 1);
    }

    #[test]
    fn the_floor_only_rises_and_survives() {
        let fs = MemStorage::new();
        let st = StateDir::new(&fs, Path::new("/state"));
        assert_eq!(st.floor().unwrap(), None);
        st.raise_floor("1.2.0".parse().unwrap()).unwrap();
        st.raise_floor("1.1.0".parse().unwrap()).unwrap();
        fs.reboot_after_crash();
        assert_eq!(st.floor().unwrap(), Some("1.2.0".parse().unwrap()));
    }

    #[test]
    fn a_rollback_is_reported_once_even_across_a_crash() {
        let fs = MemStorage::new();
        let dir = Path::new("/state");
        let st = StateDir::new(&fs, dir);
        let v: Version = "1.2.0".parse().unwrap();
        assert!(st.note_rollback_reported(v).unwrap());
        fs.reboot_after_crash();
        assert!(!st.note_rollback_reported(v).unwrap());
        assert!(st.note_rollback_reported("1.3.0".parse().unwrap()).unwrap());
        // The same file name as before the change, so old markers count.
        assert!(fs.read(&dir.join("rollback-reported-1.2.0")).is_ok());
    }

    #[test]
    fn event_kinds_keep_their_on_disk_names() {
        let now = SystemTime::UNIX_EPOCH;
        let v: Version = "1.0.0".parse().unwrap();
        for (kind, name) in [
            (EventKind::Install, "install"),
            (EventKind::Bless, "bless"),
            (EventKind::Rollback, "rollback"),
            (EventKind::RollbackDetected, "rollback-detected"),
        ] {
            let json = serde_json::to_value(Event::new(kind, v, Slot::A, now, None)).unwrap();
            assert_eq!(json["kind"], name);
            assert_eq!(kind.to_string(), name);
            let back: Event = serde_json::from_value(json).unwrap();
            assert_eq!(back.kind, kind);
        }
        let old = r#"{"kind":"rollback-detected","version":"1.0.0","slot":"b","at":"2026-01-01T00:00:00Z"}"#;
        assert_eq!(
            serde_json::from_str::<Event>(old).unwrap().kind,
            EventKind::RollbackDetected
        );
        assert!(
            serde_json::from_str::<Event>(&old.replace("rollback-detected", "explode")).is_err()
        );
    }
}
