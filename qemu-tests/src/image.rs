//! The built image a test boots: `build/<arch>/<version>/` with `disk.raw`
//! and `payload/` (see ARCHITECTURE.md). This module owns finding its
//! parts and deriving what tests compare against: the payload metadata,
//! USR-A's place on the disk and the kernel command line of its boot entry.
//! It also owns the agent stamp: which agent binary a cached test image
//! holds, so a changed agent makes the image stale.

use std::path::{Path, PathBuf};

use ballast_updater::bootentry::BootEntry;
use ballast_updater::cmdline::{BootParams, Slot};
use ballast_updater::payload::{self, PayloadError, PayloadMetadata};

use sha2::{Digest, Sha256};

use crate::disk::{self, DiskError, Partition};

/// File in a built image's directory holding the hex SHA-256 of the agent
/// binary the image was built with.
pub const AGENT_STAMP: &str = "agent.sha256";

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
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Hex SHA-256 of an agent binary.
pub fn agent_digest(agent: &Path) -> Result<String, ImageError> {
    let io = |source| ImageError::Io {
        what: "hashing",
        path: agent.to_owned(),
        source,
    };
    let mut file = std::fs::File::open(agent).map_err(io)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(io)?;
    Ok(hex::encode(hasher.finalize()))
}

/// Whether the image in `dir` is stamped as holding the agent `digest`;
/// an image without a stamp holds an unknown agent, so it does not.
pub fn holds_agent(dir: &Path, digest: &str) -> bool {
    std::fs::read_to_string(dir.join(AGENT_STAMP)).is_ok_and(|s| s.trim() == digest)
}

/// Records that the image in `dir` holds the agent `digest`.
pub fn stamp_agent(dir: &Path, digest: &str) -> Result<(), ImageError> {
    let path = dir.join(AGENT_STAMP);
    std::fs::write(&path, format!("{digest}\n")).map_err(|source| ImageError::Io {
        what: "writing",
        path,
        source,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_stamp_tells_a_changed_agent_apart() {
        let dir = tempfile::tempdir().unwrap();
        let agent = dir.path().join("ballast");
        std::fs::write(&agent, b"agent one").unwrap();
        let one = agent_digest(&agent).unwrap();
        // As `printf 'agent one' | sha256sum` prints it.
        assert_eq!(
            one,
            "a04f560d4d61e9829da24045c7dfb7c67ea53ecadc77f7ded2e722114fd2b9b1"
        );
        assert!(!holds_agent(dir.path(), &one), "no stamp, unknown agent");
        stamp_agent(dir.path(), &one).unwrap();
        assert!(holds_agent(dir.path(), &one));
        std::fs::write(&agent, b"agent two").unwrap();
        let two = agent_digest(&agent).unwrap();
        assert_ne!(one, two);
        assert!(!holds_agent(dir.path(), &two), "a changed agent is stale");
        let err = agent_digest(&dir.path().join("missing")).unwrap_err();
        assert!(err.to_string().starts_with("hashing "), "{err}");
    }
}
