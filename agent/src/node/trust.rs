//! The node's CA bundle (`/etc/ssl/certs/ca-certificates.crt`, Debian's,
//! copied from the factory /etc at every boot): [`append`] adds the
//! configured extra certificates, so containerd, the kubelet and anything
//! else reading the system bundle trusts them. /etc is a tmpfs filled anew
//! at every boot, so appending once per boot never duplicates.

use std::io::Write;
use std::path::{Path, PathBuf};

pub const NODE_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("appending extra CA certificates to {}", path.display())]
    Append {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Appends `pem` (whole certificates, ending in a newline) to the bundle at
/// `path`, creating it (0644) when missing. Nothing happens for an empty
/// `pem`.
pub fn append(path: &Path, pem: &str) -> Result<(), TrustError> {
    if pem.is_empty() {
        return Ok(());
    }
    let err = |source| TrustError::Append {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let existing = std::fs::read(path).unwrap_or_default();
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .map_err(err)?;
    // A bundle whose last line lacks its newline would glue END and BEGIN.
    let mut text = String::new();
    if existing.last().is_some_and(|b| *b != b'\n') {
        text.push('\n');
    }
    text.push_str(pem);
    file.write_all(text.as_bytes()).map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_after_the_factory_bundle() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("etc/ssl/certs/ca-certificates.crt");
        std::fs::create_dir_all(bundle.parent().unwrap()).unwrap();
        std::fs::write(&bundle, "-----END CERTIFICATE-----").unwrap();
        append(&bundle, "EXTRA\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(&bundle).unwrap(),
            "-----END CERTIFICATE-----\nEXTRA\n"
        );
        append(&bundle, "").unwrap();
        let fresh = dir.path().join("new/bundle.crt");
        append(&fresh, "ONLY\n").unwrap();
        assert_eq!(std::fs::read_to_string(&fresh).unwrap(), "ONLY\n");
    }

    #[test]
    fn an_unwritable_bundle_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the file should be.
        let bundle = dir.path().join("bundle.crt");
        std::fs::create_dir(&bundle).unwrap();
        let err = append(&bundle, "X\n").unwrap_err().to_string();
        assert!(err.contains("bundle.crt"), "{err}");
    }
}
