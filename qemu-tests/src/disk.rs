//! Disk images for VMs: copy-on-write qcow2 overlays over a built
//! `disk.raw` (so a test never changes a built image), sparse copies, the
//! GPT partition table read straight from the image, and byte flips for
//! tamper tests.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use uuid::Uuid;

/// Logical sector size of Ballast images.
pub const SECTOR: u64 = 512;

/// Errors preparing or reading a disk image.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("running {cmd}")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{cmd} failed ({status}): {stderr}")]
    Command {
        cmd: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("{path} has no valid GPT header at LBA 1: {why}")]
    Gpt { path: PathBuf, why: String },
    #[error("{path} has no partition labelled {label:?}")]
    NoPartition { path: PathBuf, label: String },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> DiskError {
    let path = path.to_owned();
    move |source| DiskError::Io { what, path, source }
}

/// Runs `cmd`, turning a spawn failure or a non-zero exit into an error
/// that shows the command line and its stderr.
pub fn run(cmd: &mut Command) -> Result<(), DiskError> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().map_err(|source| DiskError::Spawn {
        cmd: shown.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(DiskError::Command {
            cmd: shown,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

/// Creates `overlay` as a qcow2 image backed by the raw image `base`.
/// With `size`, the overlay is that many bytes (larger than the base: the
/// guest sees a bigger disk, as after a cloud provider resized it).
pub fn create_overlay(base: &Path, overlay: &Path, size: Option<u64>) -> Result<(), DiskError> {
    let base = std::path::absolute(base).map_err(io("resolving", base))?;
    let mut cmd = Command::new("qemu-img");
    cmd.args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&base)
        .arg(overlay);
    if let Some(size) = size {
        cmd.arg(size.to_string());
    }
    run(&mut cmd)
}

/// Copies `src` to `dst` keeping holes (`cp --sparse=always`), so a copy
/// of a mostly empty multi-GiB image costs little.
pub fn sparse_copy(src: &Path, dst: &Path) -> Result<(), DiskError> {
    run(Command::new("cp").arg("--sparse=always").arg(src).arg(dst))
}

/// Size of a file in bytes.
pub fn file_size(path: &Path) -> Result<u64, DiskError> {
    Ok(std::fs::metadata(path)
        .map_err(io("reading metadata of", path))?
        .len())
}

/// One GPT partition entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// 1-based partition number.
    pub number: u32,
    pub label: String,
    pub type_guid: Uuid,
    /// The PARTUUID.
    pub unique_guid: Uuid,
    pub first_lba: u64,
    pub last_lba: u64,
}

impl Partition {
    /// Byte offset of the partition's first sector.
    pub fn offset(&self) -> u64 {
        self.first_lba * SECTOR
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        (self.last_lba + 1 - self.first_lba) * SECTOR
    }
}

/// Reads the primary GPT of a raw image (512-byte sectors).
pub fn read_gpt(path: &Path) -> Result<Vec<Partition>, DiskError> {
    let mut f = File::open(path).map_err(io("opening", path))?;
    let mut header = [0u8; 92];
    f.seek(SeekFrom::Start(SECTOR))
        .and_then(|_| f.read_exact(&mut header))
        .map_err(io("reading GPT header of", path))?;
    let bad = |why: &str| DiskError::Gpt {
        path: path.to_owned(),
        why: why.to_owned(),
    };
    if &header[0..8] != b"EFI PART" {
        return Err(bad("signature is not \"EFI PART\""));
    }
    let u32_at =
        |o: usize| u32::from_le_bytes([header[o], header[o + 1], header[o + 2], header[o + 3]]);
    let u64_at = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&header[o..o + 8]);
        u64::from_le_bytes(b)
    };
    let entries_lba = u64_at(72);
    let count = u32_at(80);
    let entry_size = u32_at(84);
    if !(128..=4096).contains(&entry_size) || count > 1024 {
        return Err(bad("implausible entry size or count"));
    }
    let mut table = vec![0u8; count as usize * entry_size as usize];
    f.seek(SeekFrom::Start(entries_lba * SECTOR))
        .and_then(|_| f.read_exact(&mut table))
        .map_err(io("reading GPT entries of", path))?;
    Ok(parse_entries(&table, entry_size as usize))
}

fn parse_entries(table: &[u8], entry_size: usize) -> Vec<Partition> {
    let guid = |b: &[u8]| {
        let mut a = [0u8; 16];
        a.copy_from_slice(&b[..16]);
        Uuid::from_bytes_le(a)
    };
    let le64 = |b: &[u8]| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[..8]);
        u64::from_le_bytes(a)
    };
    table
        .chunks_exact(entry_size)
        .enumerate()
        .filter_map(|(i, e)| {
            let type_guid = guid(&e[0..16]);
            if type_guid.is_nil() {
                return None;
            }
            let name: Vec<u16> = e[56..128]
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .take_while(|c| *c != 0)
                .collect();
            Some(Partition {
                number: u32::try_from(i + 1).unwrap_or(u32::MAX),
                label: String::from_utf16_lossy(&name),
                type_guid,
                unique_guid: guid(&e[16..32]),
                first_lba: le64(&e[32..40]),
                last_lba: le64(&e[40..48]),
            })
        })
        .collect()
}

/// The partition labelled `label`.
pub fn find_partition(path: &Path, label: &str) -> Result<Partition, DiskError> {
    read_gpt(path)?
        .into_iter()
        .find(|p| p.label == label)
        .ok_or_else(|| DiskError::NoPartition {
            path: path.to_owned(),
            label: label.to_owned(),
        })
}

/// Inverts every bit of the byte at `offset`; returns (old, new).
pub fn flip_byte(path: &Path, offset: u64) -> Result<(u8, u8), DiskError> {
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io("opening", path))?;
    let mut b = [0u8; 1];
    f.seek(SeekFrom::Start(offset))
        .and_then(|_| f.read_exact(&mut b))
        .map_err(io("reading", path))?;
    let old = b[0];
    b[0] = !old;
    f.seek(SeekFrom::Start(offset))
        .and_then(|_| f.write_all(&b))
        .and_then(|_| f.sync_all())
        .map_err(io("writing", path))?;
    Ok((old, b[0]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(type_guid: Uuid, unique: Uuid, first: u64, last: u64, name: &str) -> [u8; 128] {
        let mut e = [0u8; 128];
        e[0..16].copy_from_slice(&type_guid.to_bytes_le());
        e[16..32].copy_from_slice(&unique.to_bytes_le());
        e[32..40].copy_from_slice(&first.to_le_bytes());
        e[40..48].copy_from_slice(&last.to_le_bytes());
        for (i, c) in name.encode_utf16().enumerate() {
            e[56 + 2 * i..58 + 2 * i].copy_from_slice(&c.to_le_bytes());
        }
        e
    }

    #[test]
    fn gpt_of_a_file_is_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        let usr_type = Uuid::parse_str("8484680c-9521-48c6-9c11-b0720656f69e").unwrap();
        let part = Uuid::from_u128(0x1234_5678_9abc_def0_1122_3344_5566_7788);
        let mut img = vec![0u8; 2048 * 512];
        let mut hdr = [0u8; 92];
        hdr[0..8].copy_from_slice(b"EFI PART");
        hdr[72..80].copy_from_slice(&2u64.to_le_bytes());
        hdr[80..84].copy_from_slice(&128u32.to_le_bytes());
        hdr[84..88].copy_from_slice(&128u32.to_le_bytes());
        img[512..604].copy_from_slice(&hdr);
        let e1 = entry(Uuid::from_u128(1), Uuid::from_u128(2), 34, 99, "ESP");
        let e2 = entry(usr_type, part, 100, 1099, "USR-A");
        img[1024..1152].copy_from_slice(&e1);
        img[1152..1280].copy_from_slice(&e2);
        std::fs::write(&path, &img).unwrap();

        let parts = read_gpt(&path).unwrap();
        assert_eq!(parts.len(), 2);
        let usr = find_partition(&path, "USR-A").unwrap();
        assert_eq!(usr.number, 2);
        assert_eq!(usr.unique_guid, part);
        assert_eq!(usr.type_guid, usr_type);
        assert_eq!(usr.offset(), 100 * 512);
        assert_eq!(usr.size(), 1000 * 512);
        assert!(matches!(
            find_partition(&path, "USR-B"),
            Err(DiskError::NoPartition { .. })
        ));

        let (old, new) = flip_byte(&path, 5000).unwrap();
        assert_eq!((old, new), (0, 0xff));
        assert_eq!(std::fs::read(&path).unwrap()[5000], 0xff);
    }

    #[test]
    fn a_disk_without_gpt_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blank");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        assert!(matches!(read_gpt(&path), Err(DiskError::Gpt { .. })));
    }
}
