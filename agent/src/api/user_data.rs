//! `PUT /v1/user-data`: a new user-data document, validated like any
//! configuration layer (alone, then merged with the node's other layers),
//! kept on STATE with the previous copy beside it (both 0600, written
//! atomically) and applied at the next boot. Error messages never quote
//! the document: it may hold secrets.

use std::path::PathBuf;

use crate::config::{ConfigError, Layer};

#[derive(Debug, thiserror::Error)]
pub enum UserDataError {
    /// 400: the text of the message is safe to show.
    #[error("{0}")]
    Invalid(String),
    /// 500.
    #[error("keeping the user-data")]
    Write(#[source] super::identity::IdentityError),
}

/// Where user-data is kept and how it is checked.
#[derive(Debug, Clone)]
pub struct UserDataStore {
    pub path: PathBuf,
    /// Merge with the node's vendor, command-line and drop-in layers to
    /// check the whole (PID 1); tests check the document alone.
    pub with_node_layers: bool,
}

impl Default for UserDataStore {
    fn default() -> Self {
        UserDataStore {
            path: crate::config::SAVED_USER_DATA.into(),
            with_node_layers: true,
        }
    }
}

/// The name errors give the document.
const SOURCE: &str = "user-data (PUT /v1/user-data)";

impl UserDataStore {
    /// The `.prev` copy beside the kept file.
    pub fn previous(&self) -> PathBuf {
        let mut name = self.path.as_os_str().to_owned();
        name.push(".prev");
        name.into()
    }

    /// Validates and keeps `body`.
    pub fn put(&self, body: &[u8]) -> Result<(), UserDataError> {
        let text = std::str::from_utf8(body)
            .map_err(|e| UserDataError::Invalid(format!("{SOURCE}: not UTF-8 text ({e})")))?;
        let layer = Layer {
            source: SOURCE.into(),
            text: text.to_owned(),
        };
        let layers = if self.with_node_layers {
            crate::config::node_layers(Some(layer)).map_err(|e| invalid(&e))?
        } else {
            vec![layer]
        };
        crate::config::merge(&layers).map_err(|e| invalid(&e))?;
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| {
                UserDataError::Write(super::identity::IdentityError::Write {
                    path: dir.to_owned(),
                    source,
                })
            })?;
        }
        if let Ok(old) = std::fs::read(&self.path) {
            super::identity::write_atomic(&self.previous(), &old, 0o600)
                .map_err(UserDataError::Write)?;
        }
        super::identity::write_atomic(&self.path, body, 0o600).map_err(UserDataError::Write)
    }
}

/// The error without the document's text: TOML errors quote the source
/// line, and serde's quote the bad value.
fn invalid(err: &ConfigError) -> UserDataError {
    // ConfigError::Parse already carries only line, column and message.
    let message = crate::error_chain(err);
    UserDataError::Invalid(format!("user-data rejected: {}", unquote(&message)))
}

/// Replaces every double-quoted string with `"…"`.
fn unquote(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut parts = message.split('"');
    if let Some(first) = parts.next() {
        out.push_str(first);
    }
    let rest: Vec<&str> = parts.collect();
    for (i, part) in rest.iter().enumerate() {
        if i % 2 == 0 {
            // Inside quotes; an unmatched last quote keeps its text hidden too.
            out.push_str("\"…\"");
        } else {
            out.push_str(part);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn good_documents_are_kept_with_the_previous_copy() {
        let dir = tempfile::tempdir().unwrap();
        let store = UserDataStore {
            path: dir.path().join("ballast/user-data.toml"),
            with_node_layers: false,
        };
        store.put(b"hostname = \"one\"\n").unwrap();
        assert!(!store.previous().exists());
        store.put(b"hostname = \"two\"\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(&store.path).unwrap(),
            "hostname = \"two\"\n"
        );
        assert_eq!(
            std::fs::read_to_string(store.previous()).unwrap(),
            "hostname = \"one\"\n"
        );
        for p in [&store.path, &store.previous()] {
            assert_eq!(std::fs::metadata(p).unwrap().mode() & 0o777, 0o600);
        }
    }

    #[test]
    fn bad_documents_change_nothing_and_are_not_echoed() {
        let dir = tempfile::tempdir().unwrap();
        let store = UserDataStore {
            path: dir.path().join("user-data.toml"),
            with_node_layers: false,
        };
        store.put(b"hostname = \"kept\"\n").unwrap();
        let cases: [&[u8]; 4] = [
            b"[kubernetes]\nbootstrap_token = \"s3cr3t-tok\"\nnope = \"s3cr3t-tok\"\n",
            b"hostname = s3cr3t-tok\n",
            b"[api]\nlisten = \"0.0.0.0:9465\"\n",
            b"\xff\xfe",
        ];
        for body in cases {
            let err = store.put(body).unwrap_err();
            let text = err.to_string();
            assert!(matches!(err, UserDataError::Invalid(_)), "{text}");
            assert!(!text.contains("s3cr3t"), "{text}");
            assert!(text.contains("user-data"), "{text}");
        }
        assert_eq!(
            std::fs::read_to_string(&store.path).unwrap(),
            "hostname = \"kept\"\n"
        );
        assert!(!store.previous().exists());
    }

    #[test]
    fn quoted_values_are_hidden() {
        assert_eq!(
            unquote("invalid type: string \"abc\", expected a boolean"),
            "invalid type: string \"…\", expected a boolean"
        );
        assert_eq!(unquote("no quotes"), "no quotes");
        assert_eq!(unquote("open \"secret"), "open \"…\"");
    }
}
