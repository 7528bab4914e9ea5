//! Grows STATE to the end of its disk on first boot (or after the disk was
//! enlarged): extends the GPT entry, moves the backup GPT to the new end,
//! tells the kernel with BLKPG, then grows the mounted ext4 online. Each step
//! leaves a consistent disk: the partition only grows after the table says
//! so, and the filesystem only after the partition did.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::boot::disks::Partition;
use crate::boot::gpt;
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
        source: crate::boot::gpt::GptError,
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
    let wanted = start
        .checked_add(current_len)?
        .checked_add(MIN_GROWTH_BYTES)?;
    (end >= wanted).then_some(end)
}

/// Grows `state` (mounted at `mountpoint`) to the end of its disk. Each
/// step checks whether it is still needed, so a boot interrupted between
/// steps finishes the job next time. Returns the partition's size in bytes
/// when anything was grown.
pub fn grow_to_disk_end(state: &Partition, mountpoint: &Path) -> Result<Option<u64>, GrowError> {
    let open_err = |path: &Path| {
        let path = path.to_owned();
        move |source| GrowError::Open { path, source }
    };
    let mut grew = false;
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
    let disk = gpt::DiskFile {
        file: disk_file,
        size: disk_bytes,
    };
    let mut table = gpt::Table::read(&disk).map_err(gpt_err)?;
    let sector = table.sector;

    // 1. The partition table.
    let mut length = state.length;
    if let Some(end) = target_end(disk_bytes, state.start, state.length, sector) {
        let later = |e: &&gpt::Entry| e.first_lba.saturating_mul(sector) > state.start;
        if table.entries.iter().any(|e| later(&e))
            || !table.entries.iter().any(|e| e.number == state.number)
        {
            return Err(GrowError::NotLast {
                device: state.device.clone(),
                disk: state.disk.clone(),
            });
        }
        table
            .set_last_lba(state.number, end / sector - 1)
            .map_err(gpt_err)?;
        table.write(&disk.file, disk_bytes).map_err(gpt_err)?;
        length = end - state.start;
        grew = true;
    }
    let disk_file = disk.file;

    // 2. The kernel's idea of the partition.
    let part_file = File::open(&state.device).map_err(open_err(&state.device))?;
    let kernel_len = sys::block_device_size(&part_file).map_err(open_err(&state.device))?;
    if kernel_len < length {
        sys::resize_partition(&disk_file, state.number, state.start, length).map_err(|source| {
            GrowError::Blkpg {
                device: state.device.clone(),
                source,
            }
        })?;
        grew = true;
    }

    // 3. The filesystem.
    let resize_err = |source: std::io::Error| GrowError::Resize {
        device: state.device.clone(),
        source,
    };
    let (fs_blocks, block) = ext4_size(&state.device).map_err(resize_err)?;
    if fs_blocks < length / block {
        let dir = File::open(mountpoint).map_err(open_err(mountpoint))?;
        sys::ext4_resize(&dir, length / block).map_err(resize_err)?;
        grew = true;
    }
    if grew {
        tracing::info!(device = %state.device.display(), bytes = length, "STATE grown");
        return Ok(Some(length));
    }
    Ok(None)
}

/// Block count and block size from the ext4 superblock on `device`.
fn ext4_size(device: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::FileExt;
    let mut sb = [0u8; 1024];
    File::open(device)?.read_exact_at(&mut sb, 1024)?;
    parse_ext4_size(&sb).ok_or_else(|| std::io::Error::other("not an ext4 superblock"))
}

/// Reads `s_blocks_count` (lo and, with the 64bit feature, hi) and the
/// block size from a 1024-byte ext4 superblock.
fn parse_ext4_size(sb: &[u8; 1024]) -> Option<(u64, u64)> {
    let u32_at = |off: usize| u32::from_le_bytes([sb[off], sb[off + 1], sb[off + 2], sb[off + 3]]);
    if u16::from_le_bytes([sb[0x38], sb[0x39]]) != 0xef53 {
        return None;
    }
    let incompat_64bit = u32_at(0x60) & 0x80 != 0;
    let hi = if incompat_64bit {
        u64::from(u32_at(0x150))
    } else {
        0
    };
    let blocks = hi << 32 | u64::from(u32_at(0x4));
    let block_size = 1024u64.checked_shl(u32_at(0x18))?;
    Some((blocks, block_size))
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
    fn ext4_superblock_sizes_are_read() {
        let mut sb = [0u8; 1024];
        assert_eq!(parse_ext4_size(&sb), None);
        sb[0x38..0x3a].copy_from_slice(&0xef53u16.to_le_bytes());
        sb[0x4..0x8].copy_from_slice(&65536u32.to_le_bytes());
        sb[0x18..0x1c].copy_from_slice(&2u32.to_le_bytes());
        assert_eq!(parse_ext4_size(&sb), Some((65536, 4096)));
        sb[0x60..0x64].copy_from_slice(&0x80u32.to_le_bytes());
        sb[0x150..0x154].copy_from_slice(&1u32.to_le_bytes());
        assert_eq!(parse_ext4_size(&sb), Some(((1 << 32) + 65536, 4096)));
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
