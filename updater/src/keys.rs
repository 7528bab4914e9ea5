//! Ed25519 signing keys for update repositories: generation, the key file
//! formats, key ids, and the node's trusted key set with its threshold.
//!
//! ```text
//! KEY      ballast-ed25519-secret <64 hex: 32-byte seed>\n     (mode 0600)
//! KEY.pub  ballast-ed25519 <64 hex: 32-byte public key>\n
//! ```
//! A key id is the first 8 bytes of SHA-256 over the public key, in hex.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

const SECRET_TAG: &str = "ballast-ed25519-secret";
const PUBLIC_TAG: &str = "ballast-ed25519";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path} already exists; refusing to overwrite a key")]
    Exists { path: PathBuf },
    #[error("writing key file {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading key file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a Ballast {expected} key file")]
    Format {
        path: PathBuf,
        expected: &'static str,
    },
    #[error("the system's random source failed: {0}")]
    Random(String),
    #[error("trust threshold {threshold} cannot be met by {keys} trusted key(s)")]
    Threshold { threshold: usize, keys: usize },
    #[error("no trusted keys in {path}")]
    NoKeys { path: PathBuf },
}

/// Short, stable name of a public key: hex of SHA-256(key)[..8].
pub fn key_id(key: &VerifyingKey) -> String {
    let digest = Sha256::digest(key.as_bytes());
    hex::encode(&digest[..8])
}

/// A key that signs manifests.
#[derive(Debug)]
pub struct SecretKey {
    key: SigningKey,
}

impl SecretKey {
    /// A fresh key from the operating system's random source.
    pub fn generate() -> Result<Self, KeyError> {
        let mut seed = [0u8; 32];
        getrandom::getrandom(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(SecretKey {
            key: SigningKey::from_bytes(&seed),
        })
    }

    pub fn from_seed(seed: [u8; 32]) -> Self {
        SecretKey {
            key: SigningKey::from_bytes(&seed),
        }
    }

    pub fn public(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    pub fn key_id(&self) -> String {
        key_id(&self.public())
    }

    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.key.sign(message).to_bytes()
    }

    /// Writes `path` (mode 0600, never overwriting) and `path.pub`.
    pub fn write_new(&self, path: &Path) -> Result<PathBuf, KeyError> {
        let pub_path = public_path(path);
        for p in [path, pub_path.as_path()] {
            if p.exists() {
                return Err(KeyError::Exists { path: p.to_owned() });
            }
        }
        let write_err = |path: &Path| {
            let path = path.to_owned();
            move |source| KeyError::Write { path, source }
        };
        let mut secret = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| match source.kind() {
                std::io::ErrorKind::AlreadyExists => KeyError::Exists {
                    path: path.to_owned(),
                },
                _ => KeyError::Write {
                    path: path.to_owned(),
                    source,
                },
            })?;
        let line = format!("{SECRET_TAG} {}\n", hex::encode(self.key.to_bytes()));
        secret
            .write_all(line.as_bytes())
            .and_then(|()| secret.sync_all())
            .map_err(write_err(path))?;
        let mut public = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&pub_path)
            .map_err(write_err(&pub_path))?;
        public
            .write_all(format_public(&self.public()).as_bytes())
            .and_then(|()| public.sync_all())
            .map_err(write_err(&pub_path))?;
        Ok(pub_path)
    }

    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: path.to_owned(),
            source,
        })?;
        let seed = parse_tagged(&text, SECRET_TAG).ok_or_else(|| KeyError::Format {
            path: path.to_owned(),
            expected: "secret",
        })?;
        Ok(Self::from_seed(seed))
    }
}

/// `KEY` -> `KEY.pub`.
pub fn public_path(secret: &Path) -> PathBuf {
    let mut name = secret.as_os_str().to_owned();
    name.push(".pub");
    PathBuf::from(name)
}

/// The one-line public key file.
pub fn format_public(key: &VerifyingKey) -> String {
    format!("{PUBLIC_TAG} {}\n", hex::encode(key.as_bytes()))
}

/// Parses a public key file's text.
pub fn parse_public(text: &str) -> Option<VerifyingKey> {
    let bytes = parse_tagged(text, PUBLIC_TAG)?;
    VerifyingKey::from_bytes(&bytes).ok()
}

fn parse_tagged(text: &str, tag: &str) -> Option<[u8; 32]> {
    let mut words = text.split_ascii_whitespace();
    if words.next()? != tag {
        return None;
    }
    let hex_key = words.next()?;
    if words.next().is_some() {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_key, &mut out).ok()?;
    Some(out)
}

/// The keys a node trusts and how many of them must sign a manifest.
#[derive(Debug, Clone)]
pub struct TrustedKeys {
    keys: BTreeMap<String, VerifyingKey>,
    threshold: usize,
}

impl TrustedKeys {
    pub fn new(
        keys: impl IntoIterator<Item = VerifyingKey>,
        threshold: usize,
    ) -> Result<Self, KeyError> {
        let keys: BTreeMap<String, VerifyingKey> =
            keys.into_iter().map(|k| (key_id(&k), k)).collect();
        if threshold == 0 || threshold > keys.len() {
            return Err(KeyError::Threshold {
                threshold,
                keys: keys.len(),
            });
        }
        Ok(TrustedKeys { keys, threshold })
    }

    /// Loads public key files; a directory contributes every `*.pub` in it
    /// and may hold a `threshold` file (one number) that `threshold`
    /// overrides when given.
    pub fn load(paths: &[PathBuf], threshold: Option<usize>) -> Result<Self, KeyError> {
        let mut keys = Vec::new();
        let mut dir_threshold = None;
        for path in paths {
            if path.is_dir() {
                let read_err = |source| KeyError::Read {
                    path: path.clone(),
                    source,
                };
                let mut files: Vec<PathBuf> = std::fs::read_dir(path)
                    .map_err(read_err)?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "pub"))
                    .collect();
                files.sort();
                if files.is_empty() {
                    return Err(KeyError::NoKeys { path: path.clone() });
                }
                for f in files {
                    keys.push(load_public(&f)?);
                }
                let tpath = path.join("threshold");
                if let Ok(text) = std::fs::read_to_string(&tpath) {
                    dir_threshold = Some(text.trim().parse().map_err(|_| KeyError::Format {
                        path: tpath.clone(),
                        expected: "threshold",
                    })?);
                }
            } else {
                keys.push(load_public(path)?);
            }
        }
        Self::new(keys, threshold.or(dir_threshold).unwrap_or(1))
    }

    pub fn threshold(&self) -> usize {
        self.threshold
    }

    pub fn get(&self, key_id: &str) -> Option<&VerifyingKey> {
        self.keys.get(key_id)
    }

    pub fn key_ids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }
}

pub fn load_public(path: &Path) -> Result<VerifyingKey, KeyError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_public(&text).ok_or_else(|| KeyError::Format {
        path: path.to_owned(),
        expected: "public",
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn keygen_writes_private_secret_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let key = SecretKey::generate().unwrap();
        let pub_path = key.write_new(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let loaded = SecretKey::load(&path).unwrap();
        assert_eq!(loaded.key_id(), key.key_id());
        assert_eq!(load_public(&pub_path).unwrap(), key.public());
        assert!(matches!(
            SecretKey::generate().unwrap().write_new(&path),
            Err(KeyError::Exists { .. })
        ));
        assert_eq!(key.key_id().len(), 16);
    }

    #[test]
    fn threshold_must_be_reachable() {
        let k = SecretKey::from_seed([1; 32]).public();
        assert!(TrustedKeys::new([k], 1).is_ok());
        assert!(matches!(
            TrustedKeys::new([k], 2),
            Err(KeyError::Threshold { .. })
        ));
        assert!(TrustedKeys::new([k], 0).is_err());
    }
}
