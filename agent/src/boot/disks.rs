//! Finding partitions without udev: walks `/sys/class/block` for whole
//! disks, reads each disk's GPT, and maps a partition (by PARTUUID or by
//! label) to its `/dev` node.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("no partition with {what} appeared within {secs} s (disks seen: {seen})")]
    NotFound {
        what: String,
        secs: u64,
        seen: String,
    },
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

    /// Every GPT partition on every disk that has a readable GPT.
    pub fn partitions(&self) -> Vec<Partition> {
        let mut found = Vec::new();
        for disk in self.disks() {
            let disk_dev = self.dev.join(&disk);
            let Ok(gpt) = gpt::GptConfig::new().writable(false).open(&disk_dev) else {
                continue;
            };
            let block = u64::from(*gpt.logical_block_size());
            for (number, p) in gpt.partitions() {
                let Some(name) = self.partition_name(&disk, *number) else {
                    continue;
                };
                found.push(Partition {
                    device: self.dev.join(name),
                    disk: disk_dev.clone(),
                    number: *number,
                    partuuid: Uuid::from_bytes(*p.part_guid.as_bytes()),
                    label: p.name.clone(),
                    start: p.first_lba * block,
                    length: (p.last_lba + 1 - p.first_lba) * block,
                });
            }
        }
        found
    }

    /// Waits up to `timeout` for the wanted partition: disks appear some
    /// time after their driver loads.
    pub fn wait_for(&self, wanted: &Wanted<'_>, timeout: Duration) -> Result<Partition, DiskError> {
        let start = Instant::now();
        loop {
            let parts = self.partitions();
            if let Some(p) = parts.iter().find(|p| wanted.matches(p)) {
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
