//! The built image a test boots: `build/<arch>/<version>/` with `disk.raw`
//! and `payload/` (see ARCHITECTURE.md). This module owns finding its
//! parts and deriving what tests compare against: the payload metadata,
//! USR-A's place on the disk and the kernel command line of its boot entry.

use std::path::{Path, PathBuf};

use ballast_updater::bootentry::BootEntry;
use ballast_updater::cmdline::{BootParams, Slot};
use ballast_updater::payload::{self, PayloadError, PayloadMetadata};

use crate::disk::{self, DiskError, Partition};

/// Errors loading a built image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{0} is missing: build the image first (cargo xtask image)")]
    Missing(PathBuf),
    #[error("reading the payload metadata of {dir}")]
    Payload {
        dir: PathBuf,
        #[source]
        source: PayloadError,
    },
    #[error("reading the partition table of {disk}")]
    Disk {
        disk: PathBuf,
        #[source]
        source: DiskError,
    },
}

/// A built image and what it claims to hold.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    pub dir: PathBuf,
    pub disk: PathBuf,
    pub payload_dir: PathBuf,
    pub meta: PayloadMetadata,
    pub usr_a: Partition,
}

impl BuiltImage {
    /// Loads `dir` (`build/<arch>/<version>`).
    pub fn load(dir: &Path) -> Result<Self, ImageError> {
        let disk_path = dir.join("disk.raw");
        let payload_dir = dir.join("payload");
        for p in [&disk_path, &payload_dir] {
            if !p.exists() {
                return Err(ImageError::Missing(p.clone()));
            }
        }
        let meta = PayloadMetadata::load(&payload_dir).map_err(|source| ImageError::Payload {
            dir: payload_dir.clone(),
            source,
        })?;
        let usr_a =
            disk::find_partition(&disk_path, Slot::A.partition_label()).map_err(|source| {
                ImageError::Disk {
                    disk: disk_path.clone(),
                    source,
                }
            })?;
        Ok(BuiltImage {
            dir: dir.to_owned(),
            disk: disk_path,
            payload_dir,
            meta,
            usr_a,
        })
    }

    pub fn kernel(&self) -> PathBuf {
        self.payload_dir.join(payload::KERNEL)
    }

    pub fn initrd(&self) -> PathBuf {
        self.payload_dir.join(payload::INITRD)
    }

    /// The kernel command line of USR-A's boot entry, as
    /// `BootEntry::render` writes it on the ESP.
    pub fn entry_cmdline(&self) -> String {
        let entry = BootEntry {
            params: BootParams::for_payload(&self.meta, Slot::A, self.usr_a.unique_guid),
            extra_args: BootEntry::default_extra_args(self.meta.arch),
        };
        format!("{} {}", entry.extra_args, entry.params)
    }
}
