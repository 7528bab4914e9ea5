//! The payload of one release: what `cargo xtask image` writes to
//! `payload/metadata.json` and what an update installs.
//!
//! A payload directory holds `metadata.json` plus the artifacts it lists:
//! `usr.img` (read-only filesystem followed by its dm-verity hash tree),
//! `vmlinuz` and `initrd`. The metadata is the single description of those
//! bytes; the signed manifest copies the artifact sizes and hashes from it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// File name of the metadata inside a payload directory.
pub const METADATA_FILE: &str = "metadata.json";
/// Artifact names, fixed so that nothing in a manifest can name another path.
pub const USR_IMAGE: &str = "usr.img";
pub const KERNEL: &str = "vmlinuz";
pub const INITRD: &str = "initrd";

/// Errors reading or checking payload metadata.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error("reading payload metadata {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("payload metadata {path} is malformed")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("invalid version {0:?}: expected MAJOR.MINOR.PATCH with numbers only")]
    Version(String),
    #[error("unknown architecture {0:?}: expected x86_64 or aarch64")]
    Arch(String),
    #[error("payload metadata lacks the artifact {0:?}")]
    MissingArtifact(&'static str),
    #[error("invalid {what} {value:?}: expected lowercase hex")]
    Hex { what: &'static str, value: String },
}

/// A release version. Only `MAJOR.MINOR.PATCH`: it appears in file names on
/// the ESP, so it must never contain a separator, a dot-dot or a `+`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl FromStr for Version {
    type Err = PayloadError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || PayloadError::Version(s.to_owned());
        let mut parts = s.split('.');
        let mut next = || -> Result<u32, PayloadError> {
            let p = parts.next().ok_or_else(err)?;
            // Reject signs, empty parts and leading zeros: one spelling per version.
            if p.is_empty()
                || !p.bytes().all(|b| b.is_ascii_digit())
                || (p.len() > 1 && p.starts_with('0'))
            {
                return Err(err());
            }
            p.parse().map_err(|_| err())
        };
        let v = Version {
            major: next()?,
            minor: next()?,
            patch: next()?,
        };
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(v)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

impl Serialize for Version {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Version {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// CPU architecture of a release, spelled as Rust and Debian's kernel docs do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    X86_64,
    Aarch64,
}

impl Arch {
    pub fn as_str(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        }
    }

    /// The architecture this binary was compiled for.
    pub fn native() -> Self {
        if cfg!(target_arch = "aarch64") {
            Arch::Aarch64
        } else {
            Arch::X86_64
        }
    }

    /// Debian's name for the architecture.
    pub fn debian(self) -> &'static str {
        match self {
            Arch::X86_64 => "amd64",
            Arch::Aarch64 => "arm64",
        }
    }

    /// The kernel console on QEMU's and most servers' first serial port.
    pub fn serial_console(self) -> &'static str {
        match self {
            Arch::X86_64 => "ttyS0",
            Arch::Aarch64 => "ttyAMA0",
        }
    }

    /// Removable-media loader path of the UEFI specification.
    pub fn efi_boot_path(self) -> &'static str {
        match self {
            Arch::X86_64 => "EFI/BOOT/BOOTX64.EFI",
            Arch::Aarch64 => "EFI/BOOT/BOOTAA64.EFI",
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Arch {
    type Err = PayloadError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "x86_64" | "amd64" => Ok(Arch::X86_64),
            "aarch64" | "arm64" => Ok(Arch::Aarch64),
            other => Err(PayloadError::Arch(other.to_owned())),
        }
    }
}

/// One file of a payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Artifact {
    /// One of [`USR_IMAGE`], [`KERNEL`], [`INITRD`].
    pub name: String,
    pub size: u64,
    /// Lowercase hex SHA-256 of the whole file.
    pub sha256: String,
}

/// dm-verity parameters of `usr.img`: the filesystem occupies
/// `data_blocks * data_block_size` bytes from offset 0; the verity superblock
/// sits right after it at `hash_offset`, and the hash tree starts one hash
/// block later (veritysetup's on-disk format).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerityParams {
    pub root_hash: String,
    pub salt: String,
    pub data_blocks: u64,
    pub data_block_size: u32,
    pub hash_block_size: u32,
    pub hash_offset: u64,
    pub hash_algorithm: String,
}

impl VerityParams {
    /// First hash block of the tree, in hash blocks from the device start:
    /// the block after the verity superblock.
    pub fn hash_start_block(&self) -> u64 {
        self.hash_offset / u64::from(self.hash_block_size) + 1
    }

    /// Size of the verified data in 512-byte sectors.
    pub fn data_sectors(&self) -> u64 {
        self.data_blocks * u64::from(self.data_block_size) / 512
    }
}

/// `payload/metadata.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PayloadMetadata {
    pub version: Version,
    pub arch: Arch,
    /// Image profile, e.g. `base` or `k8s`.
    pub variant: String,
    /// `uname -r` of the kernel in this payload.
    pub kernel_release: String,
    /// Filesystem type of the usr image (`erofs` or `squashfs`).
    pub usr_fstype: String,
    pub verity: VerityParams,
    pub artifacts: Vec<Artifact>,
    /// Debian packages the payload was built from: `name=version`.
    #[serde(default)]
    pub packages: Vec<String>,
}

impl PayloadMetadata {
    pub fn load(dir: &Path) -> Result<Self, PayloadError> {
        let path = dir.join(METADATA_FILE);
        let bytes = std::fs::read(&path).map_err(|source| PayloadError::Read {
            path: path.clone(),
            source,
        })?;
        let meta: Self = serde_json::from_slice(&bytes)
            .map_err(|source| PayloadError::Parse { path, source })?;
        meta.validate()?;
        Ok(meta)
    }

    /// Checks what serde cannot: every artifact present, hex fields are hex.
    pub fn validate(&self) -> Result<(), PayloadError> {
        for name in [USR_IMAGE, KERNEL, INITRD] {
            self.artifact(name)
                .ok_or(PayloadError::MissingArtifact(name))?;
        }
        check_hex("root hash", &self.verity.root_hash)?;
        check_hex("salt", &self.verity.salt)?;
        for a in &self.artifacts {
            check_hex("artifact sha256", &a.sha256)?;
        }
        Ok(())
    }

    pub fn artifact(&self, name: &str) -> Option<&Artifact> {
        self.artifacts.iter().find(|a| a.name == name)
    }
}

fn check_hex(what: &'static str, value: &str) -> Result<(), PayloadError> {
    if value.is_empty()
        || !value
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return Err(PayloadError::Hex {
            what,
            value: value.to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_strictly_and_order_numerically() {
        let v: Version = "1.10.0".parse().unwrap();
        assert!(v > "1.9.9".parse().unwrap());
        assert_eq!(v.to_string(), "1.10.0");
        for bad in [
            "", "1", "1.2", "1.2.3.4", "1.2.x", "01.2.3", "+1.2.3", "1.2.3+1", "../1.2.3", "1..2",
        ] {
            assert!(bad.parse::<Version>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn hash_start_skips_the_verity_superblock() {
        let v = VerityParams {
            root_hash: "ab".into(),
            salt: "cd".into(),
            data_blocks: 100,
            data_block_size: 4096,
            hash_block_size: 4096,
            hash_offset: 100 * 4096,
            hash_algorithm: "sha256".into(),
        };
        assert_eq!(v.hash_start_block(), 101);
        assert_eq!(v.data_sectors(), 800);
    }
}
