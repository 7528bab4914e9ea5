//! Crash-safe file replacement for the agent's files on STATE (machine id,
//! boot counter, last-good configuration, saved user-data): a power cut
//! leaves either the old file or the new one, never a truncated mix.
//! Bottom layer: only `std` and `nix`, so every layer may use it.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Mode for files that may hold secrets (user-data, configuration).
pub const PRIVATE: u32 = 0o600;
/// Mode for files anyone on the node may read (machine id, counters).
pub const PUBLIC: u32 = 0o644;

#[derive(Debug, thiserror::Error)]
pub enum AtomicError {
    #[error("{path} has no parent directory")]
    NoParent { path: PathBuf },
    #[error("{step} {path}")]
    Io {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Replaces `path` with `bytes`: creates the parent directory, writes a
/// temporary file beside it with `mode` (set at creation, so the content is
/// never readable with a wider mode), fsyncs it, renames it over `path` and
/// fsyncs the directory so the rename itself is durable. On any error the
/// old file is left as it was and the temporary one is removed.
pub fn write(path: &Path, bytes: &[u8], mode: u32) -> Result<(), AtomicError> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .ok_or_else(|| AtomicError::NoParent { path: path.into() })?;
    let io = |step: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| AtomicError::Io { step, path, source }
    };
    std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp.{}", std::process::id()));
    let tmp = dir.join(name);
    let result = (|| {
        let _ = std::fs::remove_file(&tmp);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io("creating", &tmp))?;
        // The umask may have narrowed the mode, never widened it; set it
        // exactly so a 0644 file is readable as intended.
        file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))
            .map_err(io("setting the mode of", &tmp))?;
        file.write_all(bytes).map_err(io("writing", &tmp))?;
        file.sync_all().map_err(io("syncing", &tmp))?;
        std::fs::rename(&tmp, path).map_err(io("renaming into place", path))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io("syncing", dir))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_content_with_the_given_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/user-data.toml");
        write(&path, b"first", PUBLIC).unwrap();
        write(&path, b"second", PRIVATE).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        write(&path, b"third", PUBLIC).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
        // Nothing but the file itself is left in the directory.
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["user-data.toml"]);
    }

    #[test]
    fn a_failed_write_leaves_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("machine-id");
        write(&path, b"old\n", PUBLIC).unwrap();
        // The temporary name is taken by a directory that cannot be
        // removed, so creating the temporary file fails.
        let tmp = dir
            .path()
            .join(format!("machine-id.tmp.{}", std::process::id()));
        std::fs::create_dir(&tmp).unwrap();
        std::fs::write(tmp.join("keep"), b"x").unwrap();
        let err = write(&path, b"new\n", PUBLIC).unwrap_err();
        assert!(err.to_string().contains("creating"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"old\n");
        // A path whose parent is a file fails too, and changes nothing.
        assert!(write(&path.join("x"), b"y", PUBLIC).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"old\n");
        assert!(write(Path::new("relative"), b"y", PUBLIC).is_err());
    }
}
