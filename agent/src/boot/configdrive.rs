//! User-data from an OpenStack config drive: a volume labelled `config-2`
//! (vfat or iso9660) holding `openstack/latest/user_data` and
//! `openstack/latest/meta_data.json` (the host name and the instance's
//! uuid). Labels are read from the first sectors without mounting; an
//! accepted volume (config::user_data decides) is mounted read-only only
//! long enough to copy the two files.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount, MsFlags};
use serde::Deserialize;

/// The label OpenStack gives config drives (any case: vfat labels are
/// often upper-case).
pub const LABEL: &str = "config-2";
const MOUNT_POINT: &str = "/run/ballast/config-drive";
const USER_DATA: &str = "openstack/latest/user_data";
const META_DATA: &str = "openstack/latest/meta_data.json";
/// meta_data.json carries keys and files lists; 64 KiB is ample.
const MAX_META_DATA: u64 = 64 * 1024;
/// An ISO 9660 volume's primary volume descriptor is sector 16 (2048-byte
/// sectors); its volume identifier is 32 bytes at offset 40.
const ISO_PVD_OFFSET: u64 = 16 * 2048;

#[derive(Debug, thiserror::Error)]
pub enum ConfigDriveError {
    #[error("config drive {device}: mounting as {fstype}")]
    Mount {
        device: PathBuf,
        fstype: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("config drive {device}: reading {file}")]
    Read {
        device: PathBuf,
        file: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("config drive {device}: {file} is larger than {limit} bytes")]
    TooLarge {
        device: PathBuf,
        file: &'static str,
        limit: u64,
    },
    #[error("config drive {device}: {file} is not valid JSON: {detail}")]
    MetaData {
        device: PathBuf,
        file: &'static str,
        detail: String,
    },
}

/// The filesystem a `config-2` volume was found with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filesystem {
    Vfat,
    Iso9660,
}

impl Filesystem {
    fn mount_type(self) -> &'static str {
        match self {
            Filesystem::Vfat => "vfat",
            Filesystem::Iso9660 => "iso9660",
        }
    }
}

/// The ISO 9660 volume identifier of a primary volume descriptor, trimmed.
pub fn iso9660_label(descriptor: &[u8; 2048]) -> Option<String> {
    // Type 1 (primary), standard identifier "CD001", version 1.
    if descriptor[0] != 1 || &descriptor[1..6] != b"CD001" || descriptor[6] != 1 {
        return None;
    }
    let raw = &descriptor[40..72];
    Some(String::from_utf8_lossy(raw).trim_end().to_owned())
}

/// The filesystem of `device` if its label is `config-2`.
fn probe(device: &Path) -> Option<Filesystem> {
    let file = File::open(device).ok()?;
    let mut sector = [0u8; 512];
    if file.read_exact_at(&mut sector, 0).is_ok()
        && super::cidata::fat_label(&sector).is_some_and(|l| l.eq_ignore_ascii_case(LABEL))
    {
        return Some(Filesystem::Vfat);
    }
    let mut descriptor = [0u8; 2048];
    if file.read_exact_at(&mut descriptor, ISO_PVD_OFFSET).is_ok()
        && iso9660_label(&descriptor).is_some_and(|l| l.eq_ignore_ascii_case(LABEL))
    {
        return Some(Filesystem::Iso9660);
    }
    None
}

/// Block devices labelled `config-2`, in device-name order, with their
/// filesystem. Only labels are read: nothing is mounted here.
pub fn scan() -> Vec<(PathBuf, Filesystem)> {
    super::cidata::block_devices(Path::new("/sys/class/block"), Path::new("/dev"))
        .into_iter()
        .filter_map(|device| probe(&device).map(|fs| (device, fs)))
        .collect()
}

/// What an accepted config drive holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigDrive {
    /// `openstack/latest/user_data`, if the drive has one.
    pub user_data: Option<String>,
    pub meta_data: MetaData,
}

/// The fields of `meta_data.json` the node uses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct MetaData {
    pub hostname: Option<String>,
    pub uuid: Option<String>,
}

/// Reads an accepted config drive (mounted read-only, nosuid, nodev,
/// noexec, unmounted again before returning).
pub fn read(device: &Path, fs: Filesystem) -> Result<ConfigDrive, ConfigDriveError> {
    let mount_point = Path::new(MOUNT_POINT);
    std::fs::create_dir_all(mount_point).map_err(|source| ConfigDriveError::Read {
        device: device.to_owned(),
        file: MOUNT_POINT,
        source,
    })?;
    let flags = MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(
        Some(device),
        mount_point,
        Some(fs.mount_type()),
        flags,
        None::<&str>,
    )
    .map_err(|source| ConfigDriveError::Mount {
        device: device.to_owned(),
        fstype: fs.mount_type(),
        source,
    })?;
    let drive = read_tree(device, mount_point);
    let _ = umount(mount_point);
    drive
}

/// The two files under `root` (a mounted drive, or a directory in tests).
fn read_tree(device: &Path, root: &Path) -> Result<ConfigDrive, ConfigDriveError> {
    let user_data = read_optional(device, root, USER_DATA, super::cidata::MAX_USER_DATA)?;
    let meta_data = match read_optional(device, root, META_DATA, MAX_META_DATA)? {
        None => MetaData::default(),
        Some(text) => serde_json::from_str(&text).map_err(|e| ConfigDriveError::MetaData {
            device: device.to_owned(),
            file: META_DATA,
            detail: e.to_string(),
        })?,
    };
    Ok(ConfigDrive {
        user_data,
        meta_data,
    })
}

fn read_optional(
    device: &Path,
    root: &Path,
    file: &'static str,
    limit: u64,
) -> Result<Option<String>, ConfigDriveError> {
    use std::io::Read;
    let err = |source| ConfigDriveError::Read {
        device: device.to_owned(),
        file,
        source,
    };
    let f = match File::open(root.join(file)) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(err(e)),
    };
    let mut text = String::new();
    f.take(limit + 1).read_to_string(&mut text).map_err(err)?;
    if text.len() as u64 > limit {
        return Err(ConfigDriveError::TooLarge {
            device: device.to_owned(),
            file,
            limit,
        });
    }
    Ok(Some(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pvd(label: &[u8]) -> [u8; 2048] {
        let mut d = [0u8; 2048];
        d[0] = 1;
        d[1..6].copy_from_slice(b"CD001");
        d[6] = 1;
        d[40..72].fill(b' ');
        d[40..40 + label.len()].copy_from_slice(label);
        d
    }

    #[test]
    fn iso9660_volume_ids_are_read_from_the_primary_descriptor() {
        assert_eq!(
            iso9660_label(&pvd(b"config-2")).as_deref(),
            Some("config-2")
        );
        let mut supplementary = pvd(b"config-2");
        supplementary[0] = 2;
        assert_eq!(iso9660_label(&supplementary), None);
        let mut not_iso = pvd(b"config-2");
        not_iso[1..6].copy_from_slice(b"BEA01");
        assert_eq!(iso9660_label(&not_iso), None);
    }

    #[test]
    fn both_filesystems_are_probed_by_label() {
        let dir = tempfile::tempdir().unwrap();
        let iso = dir.path().join("iso");
        let mut image = vec![0u8; 18 * 2048];
        image[16 * 2048..17 * 2048].copy_from_slice(&pvd(b"CONFIG-2"));
        std::fs::write(&iso, &image).unwrap();
        assert_eq!(probe(&iso), Some(Filesystem::Iso9660));

        let other = dir.path().join("other");
        image[16 * 2048..17 * 2048].copy_from_slice(&pvd(b"cidata"));
        std::fs::write(&other, &image).unwrap();
        assert_eq!(probe(&other), None);

        let mut fat = vec![0u8; 512];
        fat[510] = 0x55;
        fat[511] = 0xaa;
        fat[0x26] = 0x29;
        fat[0x2b..0x36].copy_from_slice(b"CONFIG-2   ");
        let vfat = dir.path().join("vfat");
        std::fs::write(&vfat, &fat).unwrap();
        assert_eq!(probe(&vfat), Some(Filesystem::Vfat));
    }

    #[test]
    fn the_drive_tree_gives_user_data_and_meta_data() {
        let dir = tempfile::tempdir().unwrap();
        let dev = Path::new("/dev/vdb");
        let latest = dir.path().join("openstack/latest");
        std::fs::create_dir_all(&latest).unwrap();
        // Nothing on the drive: nothing to use, no error.
        assert_eq!(read_tree(dev, dir.path()).unwrap(), ConfigDrive::default());

        std::fs::write(latest.join("user_data"), "hostname = \"x\"\n").unwrap();
        std::fs::write(
            latest.join("meta_data.json"),
            r#"{"uuid": "83679162-1378-4288-a2d4-70e13ec132aa", "hostname": "web-1.novalocal",
                "name": "web-1", "public_keys": {"k": "ssh-ed25519 AAAA"}}"#,
        )
        .unwrap();
        let drive = read_tree(dev, dir.path()).unwrap();
        assert_eq!(drive.user_data.as_deref(), Some("hostname = \"x\"\n"));
        assert_eq!(drive.meta_data.hostname.as_deref(), Some("web-1.novalocal"));
        assert_eq!(
            drive.meta_data.uuid.as_deref(),
            Some("83679162-1378-4288-a2d4-70e13ec132aa")
        );

        std::fs::write(latest.join("meta_data.json"), "{not json").unwrap();
        let err = read_tree(dev, dir.path()).unwrap_err();
        assert!(err.to_string().contains("meta_data.json"), "{err}");

        std::fs::write(latest.join("meta_data.json"), "{}").unwrap();
        std::fs::write(
            latest.join("user_data"),
            vec![b'#'; usize::try_from(super::super::cidata::MAX_USER_DATA).unwrap() + 1],
        )
        .unwrap();
        assert!(matches!(
            read_tree(dev, dir.path()).unwrap_err(),
            ConfigDriveError::TooLarge { .. }
        ));
    }
}
