//! What early boot found, handed to PID 1 in `/run` (which survives
//! `switch_root`): the running version, its slot and the partitions.

use std::path::{Path, PathBuf};

use ballast_updater::cmdline::Slot;
use serde::{Deserialize, Serialize};

use crate::boot::disks::Partition;

pub const BOOT_INFO_PATH: &str = "/run/ballast/boot.json";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BootInfo {
    pub version: String,
    pub slot: Slot,
    pub cmdline: String,
    pub usr: Partition,
    pub usr_verity_device: PathBuf,
    pub state: Partition,
    pub esp: Partition,
}

impl BootInfo {
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(
            path,
            serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?,
        )
    }

    pub fn read(path: &Path) -> std::io::Result<Self> {
        serde_json::from_slice(&std::fs::read(path)?).map_err(std::io::Error::other)
    }
}
