//! Per-node disk identity: on first boot the boot disk and its USR-A,
//! USR-B and STATE partitions get fresh random GUIDs in place of the
//! image's reproducible (UUIDv5) ones, and every Ballast boot entry is
//! rewritten to name the new slot PARTUUIDs, so that a second disk that
//! copies the image can supply neither a slot nor STATE. The ESP keeps its
//! GUID: the firmware's NVRAM boot entries point at it.
//!
//! The GPT and the entries cannot change in one write, so the change is a
//! roll-forward journal on STATE, each step idempotent:
//! 1. plan: the new GUIDs, written atomically to [`JOURNAL_PATH`];
//! 2. every entry naming an old slot PARTUUID gets
//!    `ballast.usr=PARTUUID=NEW ballast.usr.was=PARTUUID=OLD` (atomic
//!    replace on the ESP); early boot looks for NEW and only when no
//!    partition has it for OLD;
//! 3. the GPT is rewritten (backup first, primary header last: a torn write
//!    leaves one valid copy, which the reader falls back to);
//! 4. the `.was` words are dropped from the entries;
//! 5. the journal is marked done.
//!
//! A power cut anywhere leaves entries that name what the disk holds (NEW,
//! or OLD through `.was`), and the next boot's run finishes the job with
//! the journal's GUIDs. [`renew`] is the pure machine over a [`Storage`]
//! (ESP and STATE) and a [`Disk`]; [`renew_boot_disk`] runs it on the node.

use std::fs::File;
use std::path::{Path, PathBuf};

use ballast_updater::bootentry::ENTRIES_DIR;
use ballast_updater::esp::list_entries;
use ballast_updater::storage::{write_atomic, RealStorage, Storage, StorageError};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::boot::gpt::{self, GptError, Table};

/// The journal on STATE (mounted at /var in the running system).
pub const JOURNAL_PATH: &str = "/var/lib/ballast/disk-identity.json";
/// Partitions that get a new GUID; the ESP keeps its own.
pub const RENEWED_LABELS: [&str; 3] = ["USR-A", "USR-B", "STATE"];

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("reading the partition table of {disk}")]
    ReadTable {
        disk: String,
        #[source]
        source: GptError,
    },
    #[error("writing the partition table of {disk}")]
    WriteTable {
        disk: String,
        #[source]
        source: GptError,
    },
    #[error("{disk} has no partition labelled {label}: not a Ballast boot disk")]
    MissingPartition { disk: String, label: &'static str },
    #[error("{disk} does not hold the running slot (PARTUUID {partuuid})")]
    NotBootDisk { disk: String, partuuid: Uuid },
    #[error(
        "partition {number} of {disk} has GUID {found}, neither the journal's old {old} nor new {new}"
    )]
    Unexpected {
        disk: String,
        number: u32,
        found: Uuid,
        old: Uuid,
        new: Uuid,
    },
    #[error("no Ballast boot entry under {esp} names the renewed slots: the partition table is left alone")]
    NoEntries { esp: PathBuf },
    #[error("journal {path} is unreadable")]
    Journal {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("boot entries or journal")]
    Storage(#[from] StorageError),
    #[error("opening {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no randomness for new GUIDs")]
    Random(#[source] getrandom::Error),
}

/// One GUID being replaced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Renewal {
    /// GPT entry number; 0 for the disk GUID.
    pub number: u32,
    pub label: String,
    pub old: Uuid,
    pub new: Uuid,
}

/// The roll-forward journal kept on STATE.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Journal {
    pub disk: Renewal,
    pub partitions: Vec<Renewal>,
    /// Every step finished.
    pub done: bool,
}

impl Journal {
    /// The new PARTUUID for `old`, if the journal renews it.
    pub fn renewed(&self, old: Uuid) -> Option<Uuid> {
        self.partitions.iter().find(|r| r.old == old).map(|r| r.new)
    }

    fn has_new(&self, guid: Uuid) -> bool {
        self.partitions.iter().any(|r| r.new == guid)
    }
}

/// What a run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// An earlier boot finished the job.
    AlreadyDone,
    /// This run finished it (perhaps resuming an interrupted run).
    Renewed(Journal),
}

/// The boot disk's partition table.
pub trait Disk {
    /// The device, for messages (`/dev/vda`).
    fn name(&self) -> String;
    fn read_table(&self) -> Result<Table, GptError>;
    /// Writes both copies of `table` (see [`Table::write`]).
    fn write_table(&self, table: &Table) -> Result<(), GptError>;
}

/// A block device (or image file).
#[derive(Debug)]
pub struct BlockDisk {
    pub path: PathBuf,
    pub disk: gpt::DiskFile,
}

impl BlockDisk {
    pub fn open(path: &Path) -> Result<Self, IdentityError> {
        let open = |source| IdentityError::Open {
            path: path.to_owned(),
            source,
        };
        let file = File::options()
            .read(true)
            .write(true)
            .open(path)
            .map_err(open)?;
        Ok(BlockDisk {
            path: path.to_owned(),
            disk: gpt::DiskFile::new(file).map_err(open)?,
        })
    }
}

impl Disk for BlockDisk {
    fn name(&self) -> String {
        self.path.display().to_string()
    }
    fn read_table(&self) -> Result<Table, GptError> {
        Table::read(&self.disk)
    }
    fn write_table(&self, table: &Table) -> Result<(), GptError> {
        table.write(&self.disk.file, self.disk.size)
    }
}

/// A random (version 4) GUID from the kernel's generator.
pub fn random_guid() -> Result<Uuid, IdentityError> {
    let mut bytes = [0u8; 16];
    getrandom::getrandom(&mut bytes).map_err(IdentityError::Random)?;
    Ok(uuid::Builder::from_random_bytes(bytes).into_uuid())
}

/// Reads the journal; `None` when there is none yet.
pub fn read_journal(storage: &dyn Storage, path: &Path) -> Result<Option<Journal>, IdentityError> {
    match storage.read(path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| IdentityError::Journal {
                    path: path.to_owned(),
                    source,
                })
        }
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn write_journal(storage: &dyn Storage, path: &Path, j: &Journal) -> Result<(), IdentityError> {
    // Serialising plain structs of strings and numbers cannot fail.
    let bytes = serde_json::to_vec_pretty(j).unwrap_or_default();
    write_atomic(storage, path, &bytes)?;
    Ok(())
}

/// Runs (or resumes) the renewal of `disk`, whose running slot has
/// PARTUUID `running_usr` (the command line's, or its `.was` one), with
/// the entries under `esp` and the journal at `journal_path`.
pub fn renew(
    storage: &dyn Storage,
    esp: &Path,
    journal_path: &Path,
    disk: &dyn Disk,
    running_usr: &[Uuid],
    fresh_guid: &mut dyn FnMut() -> Result<Uuid, IdentityError>,
) -> Result<Outcome, IdentityError> {
    let name = disk.name();
    let read_err = |source| IdentityError::ReadTable {
        disk: name.clone(),
        source,
    };
    let journal = match read_journal(storage, journal_path)? {
        Some(j) if j.done => return Ok(Outcome::AlreadyDone),
        Some(j) => j,
        None => {
            // 1. The plan. Nothing has changed yet, so the disk must still
            // hold the running slot under the GUID the command line names.
            let table = disk.read_table().map_err(read_err)?;
            if !table.entries.iter().any(|e| running_usr.contains(&e.guid)) {
                return Err(IdentityError::NotBootDisk {
                    disk: name,
                    partuuid: running_usr.first().copied().unwrap_or_default(),
                });
            }
            let mut partitions = Vec::new();
            for label in RENEWED_LABELS {
                let e = table
                    .entries
                    .iter()
                    .find(|e| e.name == label)
                    .ok_or_else(|| IdentityError::MissingPartition {
                        disk: name.clone(),
                        label,
                    })?;
                partitions.push(Renewal {
                    number: e.number,
                    label: label.to_owned(),
                    old: e.guid,
                    new: fresh_guid()?,
                });
            }
            let j = Journal {
                disk: Renewal {
                    number: 0,
                    label: "disk".into(),
                    old: table.disk_guid,
                    new: fresh_guid()?,
                },
                partitions,
                done: false,
            };
            write_journal(storage, journal_path, &j)?;
            j
        }
    };

    // 2. Entries name NEW, and OLD as a fallback.
    rewrite_entries(storage, esp, |p| {
        journal
            .renewed(p.usr_partuuid)
            .map(|new| (new, Some(p.usr_partuuid)))
    })?;
    // Never change the disk under entries that do not follow it (an ESP
    // that failed to mount shows none).
    let follow = list_entries(storage, esp)?
        .into_iter()
        .filter_map(|e| e.entry.ok())
        .filter(|e| journal.has_new(e.params.usr_partuuid))
        .count();
    if follow == 0 {
        return Err(IdentityError::NoEntries {
            esp: esp.to_owned(),
        });
    }
    // Test images can stop here (a `panic` action: PID 1 reboots).
    fail::fail_point!("disk-identity-entries-written");

    // 3. The partition table.
    let mut table = disk.read_table().map_err(read_err)?;
    let mut changed = false;
    for r in &journal.partitions {
        let found = table
            .entries
            .iter()
            .find(|e| e.number == r.number)
            .map(|e| e.guid)
            .unwrap_or_default();
        if found == r.old {
            table.set_guid(r.number, r.new).map_err(read_err)?;
            changed = true;
        } else if found != r.new {
            return Err(IdentityError::Unexpected {
                disk: name,
                number: r.number,
                found,
                old: r.old,
                new: r.new,
            });
        }
    }
    if table.disk_guid != journal.disk.new {
        table.set_disk_guid(journal.disk.new);
        changed = true;
    }
    if changed || !table.warnings.is_empty() {
        // A table read from its backup is rewritten too, so both copies
        // agree before the entries stop naming OLD.
        disk.write_table(&table)
            .map_err(|source| IdentityError::WriteTable {
                disk: name.clone(),
                source,
            })?;
    }
    fail::fail_point!("disk-identity-table-written");

    // 4. Entries name only NEW.
    rewrite_entries(storage, esp, |p| {
        (p.usr_was.is_some() && journal.has_new(p.usr_partuuid)).then_some((p.usr_partuuid, None))
    })?;

    // 5. Done.
    let done = Journal {
        done: true,
        ..journal
    };
    write_journal(storage, journal_path, &done)?;
    Ok(Outcome::Renewed(done))
}

/// Replaces each parseable Ballast entry for which `change` gives a new
/// (`usr`, `usr.was`) pair, atomically, leaving every other byte alone.
fn rewrite_entries(
    storage: &dyn Storage,
    esp: &Path,
    change: impl Fn(&ballast_updater::cmdline::BootParams) -> Option<(Uuid, Option<Uuid>)>,
) -> Result<(), IdentityError> {
    let dir = esp.join(ENTRIES_DIR);
    if !storage.exists(&dir) {
        return Ok(());
    }
    for installed in list_entries(storage, esp)? {
        let Ok(entry) = &installed.entry else {
            continue;
        };
        let Some((usr, was)) = change(&entry.params) else {
            continue;
        };
        let path = dir.join(&installed.file_name);
        let text = String::from_utf8_lossy(&storage.read(&path)?).into_owned();
        write_atomic(storage, &path, replace_usr(&text, usr, was).as_bytes())?;
        tracing::info!(entry = %installed.file_name, usr = %usr, "boot entry renamed its slot");
    }
    Ok(())
}

/// `text` with the `ballast.usr` word of its `options` line naming `usr`,
/// followed by `ballast.usr.was` when `was` is given; every other word and
/// line is kept as it was, in order (words other helpers or the operator
/// put there survive).
fn replace_usr(text: &str, usr: Uuid, was: Option<Uuid>) -> String {
    let mut out = String::with_capacity(text.len() + 64);
    for line in text.split_inclusive('\n') {
        let body = line.trim_end_matches('\n');
        let Some(rest) = body
            .trim_start()
            .strip_prefix("options")
            .filter(|r| r.starts_with(char::is_whitespace))
        else {
            out.push_str(line);
            continue;
        };
        let mut words = Vec::new();
        for word in rest.split_ascii_whitespace() {
            match word.split_once('=').map(|(k, _)| k) {
                Some("ballast.usr") => {
                    words.push(format!("ballast.usr=PARTUUID={}", usr.hyphenated()));
                    if let Some(was) = was {
                        words.push(format!("ballast.usr.was=PARTUUID={}", was.hyphenated()));
                    }
                }
                Some("ballast.usr.was") => {}
                _ => words.push(word.to_owned()),
            }
        }
        out.push_str("options ");
        out.push_str(&words.join(" "));
        out.push_str(&line[body.len()..]);
    }
    out
}

/// The running slot's PARTUUID as the disk now holds it: the command
/// line's, translated through a finished (or interrupted) renewal's
/// journal when this boot's command line still names the old one.
pub fn current_usr_partuuid(storage: &dyn Storage, journal_path: &Path, cmdline_usr: Uuid) -> Uuid {
    match read_journal(storage, journal_path) {
        Ok(Some(j)) => j.renewed(cmdline_usr).unwrap_or(cmdline_usr),
        _ => cmdline_usr,
    }
}

/// Runs the renewal on the node: the disk holding the running slot, the
/// ESP at `esp`, the journal on STATE. Returns the event to print when this
/// boot renewed anything.
pub fn renew_boot_disk(
    disk: &Path,
    esp: &Path,
    running_usr: &[Uuid],
) -> Result<Option<crate::console::Event>, IdentityError> {
    let storage = RealStorage;
    let journal_path = Path::new(JOURNAL_PATH);
    if matches!(read_journal(&storage, journal_path)?, Some(j) if j.done) {
        return Ok(None);
    }
    let block = BlockDisk::open(disk)?;
    match renew(
        &storage,
        esp,
        journal_path,
        &block,
        running_usr,
        &mut random_guid,
    )? {
        Outcome::AlreadyDone => Ok(None),
        Outcome::Renewed(j) => {
            tracing::info!(disk = %disk.display(), old = %j.disk.old, new = %j.disk.new, "disk identity renewed");
            Ok(Some(crate::console::Event::DiskIdentityRenewed {
                disk: disk.display().to_string(),
                partitions: j.partitions.iter().map(|r| r.label.clone()).collect(),
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::{Cell, RefCell};
    use std::io;

    use ballast_updater::bootentry::BootEntry;
    use ballast_updater::cmdline::{BootParams, Slot};
    use ballast_updater::storage::MemStorage;

    use super::*;
    use crate::boot::disks::{to_partitions, unique, Wanted};
    use crate::boot::gpt::tests::image;

    const MIB: u64 = 1 << 20;
    const ESP: &str = "/efi";
    const JOURNAL: &str = "/var/lib/ballast/disk-identity.json";
    /// The image's (shared) GUIDs: `image` numbers entry i as 0x1000 + i.
    const OLD_A: Uuid = Uuid::from_u128(0x1001);
    const OLD_B: Uuid = Uuid::from_u128(0x1002);
    const OLD_STATE: Uuid = Uuid::from_u128(0x1003);
    const ESP_GUID: Uuid = Uuid::from_u128(0x1000);

    /// The power for a storage and a disk together: cuts it before the
    /// `cut_at`th durable operation of either.
    struct Power {
        mem: MemStorage,
        cut_at: Option<u64>,
        disk_ops: Cell<u64>,
        cut: Cell<bool>,
    }

    impl Power {
        fn new(mem: &MemStorage, cut_at: Option<u64>) -> Self {
            if let Some(n) = cut_at {
                mem.cut_power_after(n);
            }
            Power {
                mem: mem.clone(),
                cut_at,
                disk_ops: Cell::new(0),
                cut: Cell::new(false),
            }
        }

        fn ops(&self) -> u64 {
            self.mem.ops_done() + self.disk_ops.get()
        }

        /// One durable disk operation: allowed, or the power goes now.
        fn disk_op(&self) -> io::Result<()> {
            if self.cut.get() || self.mem.power_was_cut() {
                self.cut.set(true);
                return Err(io::Error::other("power cut"));
            }
            if let Some(n) = self.cut_at {
                if self.ops() >= n {
                    self.cut.set(true);
                    self.mem.cut_power_after(0);
                    return Err(io::Error::other("power cut"));
                }
                self.disk_ops.set(self.disk_ops.get() + 1);
                self.mem.cut_power_after(n - self.ops());
            } else {
                self.disk_ops.set(self.disk_ops.get() + 1);
            }
            Ok(())
        }
    }

    /// A disk whose writes survive a power cut only once synced, or (with
    /// `keep_unsynced`) as far as they got.
    struct MemDisk<'p> {
        live: RefCell<Vec<u8>>,
        durable: RefCell<Vec<u8>>,
        power: &'p Power,
    }

    impl<'p> MemDisk<'p> {
        /// A disk whose live and durable contents are both `bytes`.
        fn holding(bytes: Vec<u8>, power: &'p Power) -> Self {
            Self {
                live: RefCell::new(bytes.clone()),
                durable: RefCell::new(bytes),
                power,
            }
        }

        fn crash(&self, keep_unsynced: bool) -> Vec<u8> {
            if keep_unsynced {
                self.live.borrow().clone()
            } else {
                self.durable.borrow().clone()
            }
        }
    }

    impl gpt::Sink for MemDisk<'_> {
        fn write_at(&self, bytes: &[u8], offset: u64) -> io::Result<()> {
            self.power.disk_op()?;
            let start = usize::try_from(offset).map_err(io::Error::other)?;
            self.live.borrow_mut()[start..start + bytes.len()].copy_from_slice(bytes);
            Ok(())
        }
        fn sync(&self) -> io::Result<()> {
            self.power.disk_op()?;
            *self.durable.borrow_mut() = self.live.borrow().clone();
            Ok(())
        }
    }

    impl Disk for MemDisk<'_> {
        fn name(&self) -> String {
            "/dev/vda".into()
        }
        fn read_table(&self) -> Result<Table, GptError> {
            Table::read(self.live.borrow().as_slice())
        }
        fn write_table(&self, table: &Table) -> Result<(), GptError> {
            let size = self.live.borrow().len() as u64;
            table.write(self, size)
        }
    }

    fn disk_image() -> Vec<u8> {
        image(
            512,
            128,
            128,
            &[
                ("ESP", 2048, 4095),
                ("USR-A", 4096, 6143),
                ("USR-B", 6144, 8191),
                ("STATE", 8192, 12287),
            ],
            8 * MIB,
        )
    }

    fn entry(version: &str, slot: Slot, usr: Uuid) -> String {
        BootEntry {
            params: BootParams {
                version: version.parse().unwrap(),
                slot,
                usr_partuuid: usr,
                usr_was: None,
                usr_fstype: "erofs".into(),
                root_hash: "ab".repeat(32),
                salt: "cd".repeat(32),
                data_blocks: 10,
            },
            extra_args: "console=ttyS0 panic=10 loglevel=4".into(),
        }
        .render()
    }

    const ENTRY_A: &str = "/efi/loader/entries/ballast-1.0.0.conf";
    const ENTRY_B: &str = "/efi/loader/entries/ballast-1.1.0+2-1.conf";

    fn esp_and_state() -> MemStorage {
        let mem = MemStorage::new();
        mem.put(
            Path::new(ENTRY_A),
            entry("1.0.0", Slot::A, OLD_A).as_bytes(),
        );
        mem.put(
            Path::new(ENTRY_B),
            entry("1.1.0", Slot::B, OLD_B).as_bytes(),
        );
        mem.put(Path::new("/efi/loader/loader.conf"), b"timeout 0\n");
        mem.put(Path::new("/var/lib/ballast/machine-id"), b"x\n");
        mem
    }

    /// Counts up from 0x5000 so runs are reproducible; a rerun gets other
    /// GUIDs, so it can only finish with the journal's.
    fn guids(start: u128) -> impl FnMut() -> Result<Uuid, IdentityError> {
        let mut next = start;
        move || {
            next += 1;
            Ok(Uuid::from_u128(next))
        }
    }

    /// What early boot would do with each entry on this ESP and disk: find
    /// the slot (NEW, else `.was`, never two), then STATE by label on that
    /// disk. Panics with the reason when an entry cannot boot.
    fn every_entry_boots(mem: &MemStorage, disk: &[u8]) {
        let table = Table::read(disk).expect("a readable partition table");
        let parts = to_partitions(&table, Path::new("/dev/vda"), |n| {
            Some(PathBuf::from(format!("/dev/vda{n}")))
        });
        let entries = list_entries(mem, Path::new(ESP)).unwrap();
        assert_eq!(entries.len(), 2, "both entries are still there");
        for e in entries {
            let params = e.entry.expect("an entry that parses").params;
            let usr = match unique(&parts, &Wanted::PartUuid(params.usr_partuuid)).unwrap() {
                Some(p) => p,
                None => {
                    let was = params.usr_was.unwrap_or_else(|| {
                        panic!("{}: no partition has {}", e.file_name, params.usr_partuuid)
                    });
                    unique(&parts, &Wanted::PartUuid(was))
                        .unwrap()
                        .unwrap_or_else(|| panic!("{}: neither NEW nor OLD", e.file_name))
                }
            };
            assert_eq!(usr.label, params.slot.partition_label(), "{}", e.file_name);
            let state = Wanted::Label {
                disk: &usr.disk,
                label: "STATE",
            };
            assert!(unique(&parts, &state).unwrap().is_some());
        }
    }

    fn run(mem: &MemStorage, disk: &MemDisk<'_>, start: u128) -> Result<Outcome, IdentityError> {
        renew(
            mem,
            Path::new(ESP),
            Path::new(JOURNAL),
            disk,
            &[OLD_A],
            &mut guids(start),
        )
    }

    /// The finished state: new GUIDs everywhere but the ESP, entries with
    /// only NEW, the journal done.
    fn assert_finished(mem: &MemStorage, disk: &[u8]) -> Journal {
        let j = read_journal(mem, Path::new(JOURNAL)).unwrap().unwrap();
        assert!(j.done);
        let t = Table::read(disk).unwrap();
        assert!(t.warnings.is_empty(), "{:?}", t.warnings);
        assert_eq!(t.disk_guid, j.disk.new);
        assert_eq!(t.entries[0].guid, ESP_GUID, "the ESP keeps its GUID");
        for r in &j.partitions {
            assert_eq!(t.entries[r.number as usize - 1].guid, r.new, "{}", r.label);
        }
        for old in [OLD_A, OLD_B, OLD_STATE] {
            assert!(t.entries.iter().all(|e| e.guid != old));
        }
        for e in list_entries(mem, Path::new(ESP)).unwrap() {
            let p = e.entry.unwrap().params;
            assert_eq!(p.usr_was, None, "{}", e.file_name);
            assert!(j.has_new(p.usr_partuuid), "{}", e.file_name);
        }
        every_entry_boots(mem, disk);
        j
    }

    #[test]
    fn a_first_run_renews_everything_and_a_second_does_nothing() {
        let mem = esp_and_state();
        let power = Power::new(&mem, None);
        let bytes = disk_image();
        let disk = MemDisk::holding(bytes.clone(), &power);
        let Outcome::Renewed(j) = run(&mem, &disk, 0x5000).unwrap() else {
            panic!("nothing renewed");
        };
        let labels: Vec<_> = j.partitions.iter().map(|r| r.label.as_str()).collect();
        assert_eq!(labels, RENEWED_LABELS);
        assert_eq!(j.renewed(OLD_A), Some(Uuid::from_u128(0x5001)));
        assert_finished(&mem, &disk.live.borrow());
        // Other lines and words of an entry are kept.
        let text = String::from_utf8(mem.read(Path::new(ENTRY_B)).unwrap()).unwrap();
        assert!(text.starts_with("title Ballast 1.1.0\n"), "{text}");
        assert!(
            text.contains("options console=ttyS0 panic=10 loglevel=4 ballast.version=1.1.0 ballast.slot=b ballast.usr=PARTUUID=00000000-0000-0000-0000-000000005002 ballast.usrfs"),
            "{text}"
        );
        let before = (mem.snapshot(), disk.live.borrow().clone());
        let with_word = replace_usr(
            "title x\noptions a ballast.usr=PARTUUID=x ballast.config.k=v b\n",
            OLD_B,
            Some(OLD_A),
        );
        assert_eq!(
            with_word,
            "title x\noptions a ballast.usr=PARTUUID=00000000-0000-0000-0000-000000001002 \
             ballast.usr.was=PARTUUID=00000000-0000-0000-0000-000000001001 ballast.config.k=v b\n"
        );
        assert_eq!(run(&mem, &disk, 0x6000).unwrap(), Outcome::AlreadyDone);
        assert_eq!((mem.snapshot(), disk.live.borrow().clone()), before);
    }

    /// A power cut before every durable write of the ESP, STATE or the
    /// disk (unsynced writes lost, or kept as far as they got): the node
    /// still boots every entry, and the next boot's run finishes the job
    /// with the GUIDs the first run chose.
    #[test]
    fn a_power_cut_anywhere_leaves_a_node_that_boots_and_finishes() {
        let total = {
            let mem = esp_and_state();
            let power = Power::new(&mem, None);
            let bytes = disk_image();
            let disk = MemDisk::holding(bytes.clone(), &power);
            run(&mem, &disk, 0x5000).unwrap();
            power.ops()
        };
        assert!(total > 20, "{total} durable operations");
        for keep_unsynced in [false, true] {
            for cut in 0..total {
                let mem = esp_and_state();
                let power = Power::new(&mem, Some(cut));
                let bytes = disk_image();
                let disk = MemDisk::holding(bytes.clone(), &power);
                assert!(
                    run(&mem, &disk, 0x5000).is_err(),
                    "cut {cut}: finished anyway"
                );
                mem.reboot_after_crash();
                let after = disk.crash(keep_unsynced);
                every_entry_boots(&mem, &after);

                let power = Power::new(&mem, None);
                let disk = MemDisk::holding(after.clone(), &power);
                let planned = read_journal(&mem, Path::new(JOURNAL)).unwrap();
                let outcome = run(&mem, &disk, 0x9000).unwrap();
                assert!(matches!(outcome, Outcome::Renewed(_)), "cut {cut}");
                let j = assert_finished(&mem, &disk.live.borrow());
                if let Some(planned) = planned {
                    assert_eq!(
                        j.partitions, planned.partitions,
                        "cut {cut}: the plan is kept"
                    );
                }
            }
        }
    }

    /// A disk that does not hold the running slot, or lacks a slot, is
    /// left untouched.
    #[test]
    fn a_foreign_disk_is_refused_and_unchanged() {
        let mem = esp_and_state();
        let power = Power::new(&mem, None);
        let bytes = disk_image();
        let disk = MemDisk::holding(bytes.clone(), &power);
        let before = mem.snapshot();
        let err = renew(
            &mem,
            Path::new(ESP),
            Path::new(JOURNAL),
            &disk,
            &[Uuid::from_u128(0xdead)],
            &mut guids(0x5000),
        )
        .unwrap_err();
        assert!(matches!(err, IdentityError::NotBootDisk { .. }), "{err}");
        let no_b = image(
            512,
            128,
            128,
            &[("ESP", 2048, 4095), ("USR-A", 4096, 6143)],
            8 * MIB,
        );
        let disk = MemDisk::holding(no_b.clone(), &power);
        let err = run(&mem, &disk, 0x5000).unwrap_err();
        assert!(err.to_string().contains("USR-B"), "{err}");
        assert_eq!(mem.snapshot(), before);
        assert_eq!(*disk.live.borrow(), no_b);
    }

    /// An ESP that did not mount (no entries) never lets the table change
    /// under entries that still name the old GUIDs.
    #[test]
    fn no_entries_no_new_table() {
        let mem = MemStorage::new();
        mem.put(Path::new("/var/lib/ballast/machine-id"), b"x\n");
        let power = Power::new(&mem, None);
        let bytes = disk_image();
        let disk = MemDisk::holding(bytes.clone(), &power);
        let err = run(&mem, &disk, 0x5000).unwrap_err();
        assert!(matches!(err, IdentityError::NoEntries { .. }), "{err}");
        assert_eq!(*disk.live.borrow(), bytes);
        // The ESP comes back: the next boot finishes with the same plan.
        let planned = read_journal(&mem, Path::new(JOURNAL)).unwrap().unwrap();
        mem.put(
            Path::new(ENTRY_A),
            entry("1.0.0", Slot::A, OLD_A).as_bytes(),
        );
        mem.put(
            Path::new(ENTRY_B),
            entry("1.1.0", Slot::B, OLD_B).as_bytes(),
        );
        run(&mem, &disk, 0x9000).unwrap();
        let j = assert_finished(&mem, &disk.live.borrow());
        assert_eq!(j.partitions, planned.partitions);
    }

    #[test]
    fn the_running_partuuid_is_translated_through_the_journal() {
        let mem = esp_and_state();
        assert_eq!(current_usr_partuuid(&mem, Path::new(JOURNAL), OLD_A), OLD_A);
        let power = Power::new(&mem, None);
        let bytes = disk_image();
        let disk = MemDisk::holding(bytes.clone(), &power);
        run(&mem, &disk, 0x5000).unwrap();
        let new_a = Uuid::from_u128(0x5001);
        assert_eq!(current_usr_partuuid(&mem, Path::new(JOURNAL), OLD_A), new_a);
        assert_eq!(current_usr_partuuid(&mem, Path::new(JOURNAL), new_a), new_a);
    }
}
