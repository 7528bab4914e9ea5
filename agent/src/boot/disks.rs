//! Finding partitions without udev: walks `/sys/class/block` for whole
//! disks, reads each disk's GPT with the defensive reader in
//! [`crate::boot::gpt`] (a disk whose table is malformed is skipped with a
//! warning naming it), and maps a partition to its `/dev` node. The boot
//! disk is the one holding the PARTUUID the kernel command line names; a
//! PARTUUID found on two partitions is refused rather than guessed at, and
//! labels are only looked up on that one disk.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::boot::gpt::{self, Table};

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("no partition with {what} appeared within {secs} s (disks seen: {seen})")]
    NotFound {
        what: String,
        secs: u64,
        seen: String,
    },
    #[error("{what} is on more than one partition ({devices}): refusing to guess which is ours")]
    Ambiguous { what: String, devices: String },
}

/// A GPT partition found on a disk.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Partition {
    /// `/dev/vda2`.
    pub device: PathBuf,
    /// `/dev/vda`.
    pub disk: PathBuf,
    pub number: u32,
    pub partuuid: Uuid,
    pub label: String,
    /// Start and length in bytes.
    pub start: u64,
    pub length: u64,
}

/// What to look for.
#[derive(Debug, Clone)]
pub enum Wanted<'a> {
    PartUuid(Uuid),
    /// A label on the given disk (labels are only unique per disk).
    Label {
        disk: &'a Path,
        label: &'a str,
    },
}

impl Wanted<'_> {
    fn matches(&self, p: &Partition) -> bool {
        match self {
            Wanted::PartUuid(u) => p.partuuid == *u,
            Wanted::Label { disk, label } => p.disk == *disk && p.label == *label,
        }
    }

    fn describe(&self) -> String {
        match self {
            Wanted::PartUuid(u) => format!("PARTUUID {u}"),
            Wanted::Label { disk, label } => format!("label {label} on {}", disk.display()),
        }
    }
}

/// Layout of `/sys` and `/dev`, so tests can point at a fake tree.
#[derive(Debug, Clone)]
pub struct Roots {
    pub sys_block: PathBuf,
    pub dev: PathBuf,
}

impl Default for Roots {
    fn default() -> Self {
        Roots {
            sys_block: "/sys/class/block".into(),
            dev: "/dev".into(),
        }
    }
}

impl Roots {
    /// Whole disks: entries of /sys/class/block without a `partition` file,
    /// leaving out RAM disks, loops and device-mapper devices.
    fn disks(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.sys_block) else {
            return Vec::new();
        };
        let mut disks: Vec<String> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with("ram") && !n.starts_with("loop") && !n.starts_with("dm-"))
            .filter(|n| !self.sys_block.join(n).join("partition").exists())
            .collect();
        disks.sort();
        disks
    }

    /// Device node name of partition `number` of `disk` (`vda2`, `nvme0n1p2`).
    fn partition_name(&self, disk: &str, number: u32) -> Option<String> {
        let entries = std::fs::read_dir(self.sys_block.join(disk)).ok()?;
        entries.filter_map(|e| e.ok()).find_map(|e| {
            let n = std::fs::read_to_string(e.path().join("partition")).ok()?;
            (n.trim().parse::<u32>().ok()? == number)
                .then(|| e.file_name().to_string_lossy().into_owned())
        })
    }

    /// Every GPT partition on every disk with a valid GPT, and one line per
    /// disk or entry that was skipped (naming the device).
    pub fn scan(&self) -> Scan {
        let mut scan = Scan::default();
        for disk in self.disks() {
            let disk_dev = self.dev.join(&disk);
            let file = match std::fs::File::open(&disk_dev).and_then(gpt::DiskFile::new) {
                Ok(f) => f,
                // Drives without media (an empty CD-ROM) cannot be opened.
                Err(e) => {
                    tracing::debug!(disk = %disk_dev.display(), error = %e, "disk not readable");
                    continue;
                }
            };
            let table = match Table::read(&file) {
                Ok(t) => t,
                // Disks without any GPT (raw volumes, MBR disks) are normal.
                Err(gpt::GptError::NoTable) => continue,
                Err(e) => {
                    scan.skipped.push(format!(
                        "{}: partition table skipped: {e}",
                        disk_dev.display()
                    ));
                    continue;
                }
            };
            scan.skipped.extend(
                table
                    .warnings
                    .iter()
                    .map(|w| format!("{}: {w}", disk_dev.display())),
            );
            scan.partitions
                .extend(to_partitions(&table, &disk_dev, |n| {
                    self.partition_name(&disk, n)
                        .map(|name| self.dev.join(name))
                }));
        }
        scan
    }

    /// Every GPT partition on every disk that has a valid GPT; skipped
    /// disks are logged.
    pub fn partitions(&self) -> Vec<Partition> {
        let scan = self.scan();
        for s in &scan.skipped {
            tracing::warn!("{s}");
        }
        scan.partitions
    }

    /// Waits up to `timeout` for the wanted partition: disks appear some
    /// time after their driver loads. Two partitions that both match are an
    /// error: a copy of our disk must not be able to stand in for it.
    pub fn wait_for(&self, wanted: &Wanted<'_>, timeout: Duration) -> Result<Partition, DiskError> {
        let start = Instant::now();
        let mut warned = BTreeSet::new();
        loop {
            let scan = self.scan();
            for s in scan.skipped {
                if warned.insert(s.clone()) {
                    tracing::warn!("{s}");
                }
            }
            if let Some(p) = unique(&scan.partitions, wanted)? {
                if p.device.exists() {
                    return Ok(p.clone());
                }
            }
            if start.elapsed() >= timeout {
                return Err(DiskError::NotFound {
                    what: wanted.describe(),
                    secs: timeout.as_secs(),
                    seen: self.disks().join(","),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The one partition of `parts` that `wanted` names, if any. Two are an
/// error: a copy of our disk must not be able to stand in for it.
pub fn unique<'p>(
    parts: &'p [Partition],
    wanted: &Wanted<'_>,
) -> Result<Option<&'p Partition>, DiskError> {
    let matching: Vec<&Partition> = parts.iter().filter(|p| wanted.matches(p)).collect();
    if matching.len() > 1 {
        return Err(DiskError::Ambiguous {
            what: wanted.describe(),
            devices: matching
                .iter()
                .map(|p| p.device.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    Ok(matching.first().copied())
}

/// What a scan of every disk found.
#[derive(Debug, Default)]
pub struct Scan {
    pub partitions: Vec<Partition>,
    /// Disks and entries skipped, one line each, naming the device.
    pub skipped: Vec<String>,
}

/// The table's entries as partitions of `disk`; `device` names the node of
/// entry `n` (entries the kernel shows no node for are left out). Byte
/// offsets that would overflow are left out too.
pub fn to_partitions(
    table: &Table,
    disk: &Path,
    device: impl Fn(u32) -> Option<PathBuf>,
) -> Vec<Partition> {
    table
        .entries
        .iter()
        .filter_map(|e| {
            let start = e.first_lba.checked_mul(table.sector)?;
            let length = e
                .last_lba
                .checked_sub(e.first_lba)?
                .checked_add(1)?
                .checked_mul(table.sector)?;
            Some(Partition {
                device: device(e.number)?,
                disk: disk.to_owned(),
                number: e.number,
                partuuid: e.guid,
                label: e.name.clone(),
                start,
                length,
            })
        })
        .collect()
}

/// The disk scanner on an image in memory: what the fuzz target drives.
pub fn scan_image(bytes: &[u8]) -> Result<Vec<Partition>, gpt::GptError> {
    let table = Table::read(bytes)?;
    Ok(to_partitions(&table, Path::new("/dev/image"), |n| {
        Some(PathBuf::from(format!("/dev/image{n}")))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::gpt::tests::image;

    const MIB: u64 = 1 << 20;

    /// A fake /sys/class/block and /dev holding `disks` (name, image).
    fn roots(dir: &Path, disks: &[(&str, Vec<u8>)]) -> Roots {
        let roots = Roots {
            sys_block: dir.join("sys"),
            dev: dir.join("dev"),
        };
        std::fs::create_dir_all(&roots.dev).unwrap();
        for (name, bytes) in disks {
            std::fs::write(roots.dev.join(name), bytes).unwrap();
            for n in 1..=2u32 {
                let part = format!("{name}{n}");
                let sys = roots.sys_block.join(name).join(&part);
                std::fs::create_dir_all(&sys).unwrap();
                std::fs::write(sys.join("partition"), format!("{n}\n")).unwrap();
                std::fs::write(roots.dev.join(&part), b"").unwrap();
            }
        }
        roots
    }

    fn ours() -> Vec<u8> {
        image(
            512,
            128,
            128,
            &[("USR-A", 2048, 4095), ("STATE", 4096, 8191)],
            8 * MIB,
        )
    }

    /// A spec-legal table with 256-byte entries and one with a CRC-valid
    /// header but an absurd entry count sit next to the boot disk: the
    /// scan skips nothing of ours, names the bad disk, and does not panic.
    #[test]
    fn foreign_tables_never_stop_the_scan() {
        let dir = tempfile::tempdir().unwrap();
        let wide = image(512, 256, 64, &[("DATA", 2048, 4095)], 4 * MIB);
        let mut absurd = image(512, 128, 128, &[("X", 2048, 4095)], 4 * MIB);
        for off in [512, absurd.len() - 512] {
            absurd[off + 80..off + 84].copy_from_slice(&u32::MAX.to_le_bytes());
            absurd[off + 16..off + 20].fill(0);
            let crc = gpt::crc32(&absurd[off..off + 92]);
            absurd[off + 16..off + 20].copy_from_slice(&crc.to_le_bytes());
        }
        let r = roots(
            dir.path(),
            &[
                ("sda", absurd),
                ("vda", ours()),
                ("vdb", wide),
                ("vdc", vec![0; 4096]),
            ],
        );
        let scan = r.scan();
        let labels: Vec<_> = scan.partitions.iter().map(|p| p.label.as_str()).collect();
        assert_eq!(labels, ["USR-A", "STATE", "DATA"]);
        assert_eq!(scan.skipped.len(), 1, "{:?}", scan.skipped);
        assert!(scan.skipped[0].contains("sda"), "{:?}", scan.skipped);
        let state = &scan.partitions[1];
        assert_eq!((state.start, state.length), (4096 * 512, 4096 * 512));
    }

    /// A second disk carrying our PARTUUID is refused, not first-matched.
    #[test]
    fn a_copied_partuuid_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let r = roots(dir.path(), &[("sda", ours()), ("vda", ours())]);
        let usr = Uuid::from_u128(0x1000);
        let err = r
            .wait_for(&Wanted::PartUuid(usr), Duration::from_millis(10))
            .unwrap_err();
        assert!(matches!(err, DiskError::Ambiguous { .. }), "{err}");

        let r = roots(dir.path().join("one").as_path(), &[("vda", ours())]);
        let p = r
            .wait_for(&Wanted::PartUuid(usr), Duration::from_millis(10))
            .unwrap();
        assert_eq!(p.device, dir.path().join("one/dev/vda1"));
        let state = r
            .wait_for(
                &Wanted::Label {
                    disk: &p.disk,
                    label: "STATE",
                },
                Duration::from_millis(10),
            )
            .unwrap();
        assert_eq!(state.number, 2);
    }

    #[test]
    fn scan_image_reports_byte_ranges() {
        let parts = scan_image(&ours()).unwrap();
        assert_eq!(parts[0].start, 2048 * 512);
        assert!(scan_image(&[0u8; 100]).is_err());
    }
}
