//! User-data from a volume labelled `CIDATA` (cloud-init's NoCloud
//! convention): a FAT filesystem, on a whole disk or a partition, holding a
//! `user-data` file. Without udev or blkid, the label is read from the FAT
//! boot sector itself; the volume is mounted read-only only long enough to
//! copy the file.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount, MsFlags};

/// The label NoCloud data sources carry.
pub const LABEL: &str = "CIDATA";
const MOUNT_POINT: &str = "/run/ballast/cidata";

/// The volume label of a FAT boot sector (FAT32 or FAT12/16), trimmed.
pub fn fat_label(boot_sector: &[u8; 512]) -> Option<String> {
    if boot_sector[510..512] != [0x55, 0xaa] {
        return None;
    }
    // FAT32 keeps the extended boot record at 0x40, FAT12/16 at 0x24; 0x29
    // marks that the label field is present.
    let (signature, label) = if &boot_sector[0x52..0x57] == b"FAT32" {
        (0x42, 0x47)
    } else {
        (0x26, 0x2b)
    };
    if boot_sector[signature] != 0x29 {
        return None;
    }
    let raw = &boot_sector[label..label + 11];
    Some(String::from_utf8_lossy(raw).trim_end().to_owned())
}

/// Block devices (disks and partitions) in `/sys/class/block`.
fn block_devices(sys_block: &Path, dev: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(sys_block) else {
        return Vec::new();
    };
    let mut devices: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with("ram") && !n.starts_with("loop") && !n.starts_with("dm-"))
        .map(|n| dev.join(n))
        .collect();
    devices.sort();
    devices
}

/// Finds a `CIDATA` volume and returns its `user-data` text and the device.
pub fn find() -> Option<(String, PathBuf)> {
    for device in block_devices(Path::new("/sys/class/block"), Path::new("/dev")) {
        let mut sector = [0u8; 512];
        let Ok(file) = File::open(&device) else {
            continue;
        };
        if file.read_exact_at(&mut sector, 0).is_err()
            || fat_label(&sector).as_deref() != Some(LABEL)
        {
            continue;
        }
        match read_user_data(&device) {
            Ok(text) => return Some((text, device)),
            Err(e) => {
                tracing::warn!(device = %device.display(), error = %e, "CIDATA volume unreadable")
            }
        }
    }
    None
}

fn read_user_data(device: &Path) -> std::io::Result<String> {
    std::fs::create_dir_all(MOUNT_POINT)?;
    let flags = MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(Some(device), MOUNT_POINT, Some("vfat"), flags, None::<&str>)
        .map_err(std::io::Error::from)?;
    let text = std::fs::read_to_string(Path::new(MOUNT_POINT).join("user-data"));
    let _ = umount(MOUNT_POINT);
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_of_both_fat_layouts_are_read() {
        let mut fat32 = [0u8; 512];
        fat32[510] = 0x55;
        fat32[511] = 0xaa;
        fat32[0x52..0x57].copy_from_slice(b"FAT32");
        fat32[0x42] = 0x29;
        fat32[0x47..0x52].copy_from_slice(b"CIDATA     ");
        assert_eq!(fat_label(&fat32).as_deref(), Some("CIDATA"));

        let mut fat16 = [0u8; 512];
        fat16[510] = 0x55;
        fat16[511] = 0xaa;
        fat16[0x26] = 0x29;
        fat16[0x2b..0x36].copy_from_slice(b"cidata     ");
        assert_eq!(fat_label(&fat16).as_deref(), Some("cidata"));

        let mut no_signature = fat16;
        no_signature[510] = 0;
        assert_eq!(fat_label(&no_signature), None);
    }

    #[test]
    fn a_real_mkfs_vfat_label_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("cidata.img");
        let made = std::process::Command::new("mkfs.vfat")
            .args(["-C", "-n", "CIDATA"])
            .arg(&img)
            .arg("2048")
            .output();
        let Ok(out) = made else {
            eprintln!("mkfs.vfat not installed; the byte-level test above covers the parser");
            return;
        };
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut sector = [0u8; 512];
        File::open(&img)
            .unwrap()
            .read_exact_at(&mut sector, 0)
            .unwrap();
        assert_eq!(fat_label(&sector).as_deref(), Some(LABEL));
    }
}
