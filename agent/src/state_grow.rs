//! Grows STATE to the end of its disk on first boot (or after the disk was
//! enlarged): extends the GPT entry, moves the backup GPT to the new end,
//! tells the kernel with BLKPG, then grows the mounted ext4 online. Each step
//! leaves a consistent disk: the partition only grows after the table says
//! so, and the filesystem only after the partition did.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::disks::Partition;
use crate::sys;

/// Partitions end on 1 MiB boundaries, as the image build lays them out.
const ALIGN_BYTES: u64 = 1 << 20;
/// Growth below this is not worth a table rewrite.
const MIN_GROWTH_BYTES: u64 = 16 << 20;
/// LBAs taken at the disk's end by the backup table (128 entries) and header.
const BACKUP_GPT_SECTORS: u64 = 33;

#[derive(Debug, thiserror::Error)]
pub enum GrowError {
    #[error("opening {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("rewriting the partition table of {disk}")]
    Gpt {
        disk: PathBuf,
        #[source]
        source: gpt::GptError,
    },
    #[error("STATE ({device}) is not the last partition of {disk}")]
    NotLast { device: PathBuf, disk: PathBuf },
    #[error("telling the kernel that {device} grew")]
    Blkpg {
        device: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("growing the filesystem on {device}")]
    Resize {
        device: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The new end (exclusive, bytes) for a partition that should fill a disk of
/// `disk_bytes`, or `None` if it would not grow by at least the minimum.
pub fn target_end(disk_bytes: u64, start: u64, current_len: u64, sector: u64) -> Option<u64> {
    let last_usable_end = disk_bytes.checked_sub(BACKUP_GPT_SECTORS * sector)?;
    let end = last_usable_end / ALIGN_BYTES * ALIGN_BYTES;
    (end >= start + current_len + MIN_GROWTH_BYTES).then_some(end)
}

/// Grows `state` (mounted at `mountpoint`) to the end of its disk. Returns
/// the new size in bytes, or `None` when there was nothing to do.
pub fn grow_to_disk_end(state: &Partition, mountpoint: &Path) -> Result<Option<u64>, GrowError> {
    let open_err = |path: &Path| {
        let path = path.to_owned();
        move |source| GrowError::Open { path, source }
    };
    let disk_file = File::options()
        .read(true)
        .write(true)
        .open(&state.disk)
        .map_err(open_err(&state.disk))?;
    let disk_bytes = sys::block_device_size(&disk_file).map_err(open_err(&state.disk))?;
    let gpt_err = |source| GrowError::Gpt {
        disk: state.disk.clone(),
        source,
    };
    let mut gpt = gpt::GptConfig::new()
        .writable(true)
        .open_from_device(disk_file)
        .map_err(gpt_err)?;
    let sector = u64::from(*gpt.logical_block_size());
    let Some(end) = target_end(disk_bytes, state.start, state.length, sector) else {
        return Ok(None);
    };

    let mut parts = gpt.partitions().clone();
    if parts
        .values()
        .any(|p| p.is_used() && p.first_lba * sector > state.start)
    {
        return Err(GrowError::NotLast {
            device: state.device.clone(),
            disk: state.disk.clone(),
        });
    }
    let Some(entry) = parts.get_mut(&state.number) else {
        return Err(GrowError::NotLast {
            device: state.device.clone(),
            disk: state.disk.clone(),
        });
    };
    entry.last_lba = end / sector - 1;
    gpt.update_partitions(parts).map_err(gpt_err)?;
    let disk_file = gpt.write().map_err(gpt_err)?;
    disk_file.sync_all().map_err(open_err(&state.disk))?;

    let new_len = end - state.start;
    sys::resize_partition(&disk_file, state.number, state.start, new_len).map_err(|source| {
        GrowError::Blkpg {
            device: state.device.clone(),
            source,
        }
    })?;

    let dir = File::open(mountpoint).map_err(open_err(mountpoint))?;
    let block = nix::sys::statfs::fstatfs(&dir)
        .map(|s| s.block_size() as u64)
        .map_err(|e| GrowError::Resize {
            device: state.device.clone(),
            source: e.into(),
        })?;
    sys::ext4_resize(&dir, new_len / block).map_err(|source| GrowError::Resize {
        device: state.device.clone(),
        source,
    })?;
    tracing::info!(device = %state.device.display(), bytes = new_len, "STATE grown");
    Ok(Some(new_len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_last_aligned_mebibyte_before_the_backup_table() {
        let mib = 1u64 << 20;
        // 4 GiB disk, STATE from 2 GiB, 256 MiB long.
        let end = target_end(4096 * mib, 2048 * mib, 256 * mib, 512).unwrap();
        assert_eq!(end, 4095 * mib);
        assert!(end <= 4096 * mib - 33 * 512);
    }

    #[test]
    fn small_or_no_growth_is_left_alone() {
        let mib = 1u64 << 20;
        assert_eq!(target_end(2305 * mib, 2048 * mib, 256 * mib, 512), None);
        assert_eq!(
            target_end(2048 * mib + 256 * mib + 8 * mib, 2048 * mib, 256 * mib, 512),
            None
        );
        assert_eq!(target_end(0, 0, 0, 512), None);
    }
}
