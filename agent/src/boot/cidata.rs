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
pub(crate) fn block_devices(sys_block: &Path, dev: &Path) -> Vec<PathBuf> {
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

/// Block devices whose FAT label is `CIDATA`, in device-name order. Only
/// the first sector is read: nothing is mounted until the user-data policy
/// (config::user_data) accepts a volume.
pub fn scan() -> Vec<PathBuf> {
    block_devices(Path::new("/sys/class/block"), Path::new("/dev"))
        .into_iter()
        .filter(|device| {
            let mut sector = [0u8; 512];
            File::open(device)
                .and_then(|f| f.read_exact_at(&mut sector, 0))
                .is_ok()
                && fat_label(&sector).as_deref() == Some(LABEL)
        })
        .collect()
}

/// The `user-data` file of an accepted `CIDATA` volume.
pub fn read(device: &Path) -> std::io::Result<String> {
    read_user_data(device)
}

fn read_user_data(device: &Path) -> std::io::Result<String> {
    std::fs::create_dir_all(MOUNT_POINT)?;
    let flags = MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(Some(device), MOUNT_POINT, Some("vfat"), flags, None::<&str>)
        .map_err(std::io::Error::from)?;
    let text = read_bounded(&Path::new(MOUNT_POINT).join("user-data"));
    let _ = umount(MOUNT_POINT);
    text
}

/// User-data is a small TOML document; a larger file is refused rather
/// than read into PID 1's memory.
pub const MAX_USER_DATA: u64 = 1 << 20;

fn read_bounded(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    File::open(path)?
        .take(MAX_USER_DATA + 1)
        .read_to_string(&mut text)?;
    if text.len() as u64 > MAX_USER_DATA {
        return Err(std::io::Error::other(format!(
            "{} is larger than {MAX_USER_DATA} bytes",
            path.display()
        )));
    }
    Ok(text)
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
    fn oversized_user_data_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let small = dir.path().join("small");
        std::fs::write(&small, "hostname = \"a\"\n").unwrap();
        assert_eq!(read_bounded(&small).unwrap(), "hostname = \"a\"\n");
        let big = dir.path().join("big");
        std::fs::write(
            &big,
            vec![b'#'; usize::try_from(MAX_USER_DATA).unwrap() + 1],
        )
        .unwrap();
        assert!(read_bounded(&big).is_err());
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
        let out = made.expect("mkfs.vfat (dosfstools, installed by `cargo xtask deps`)");
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
