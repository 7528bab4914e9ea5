//! What the update scenarios are built from: the test signing key
//! (`build/test-keys/update-test.key`, made on first use, never committed),
//! the release payloads `build/<arch>/<version>/payload` built with that key
//! trusted, and scratch update repositories made from them with
//! `ballast_updater::repo` (the library behind `ballast repo add|sign`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use ballast_updater::keys::{self, KeyError, SecretKey};
use ballast_updater::payload::METADATA_FILE;
use ballast_updater::repo::{self, RepoError};

/// File name of the test key under `build/test-keys/`.
pub const TEST_KEY: &str = "update-test.key";
/// Stamp next to a built image: the trusted public key and the SHA-256 of
/// its `payload/metadata.json`, so a rebuild without the key is noticed.
pub const TRUST_STAMP: &str = "test-trust.stamp";

#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    #[error("the test signing key {path}")]
    Key {
        path: PathBuf,
        #[source]
        source: KeyError,
    },
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("update repository {repo}: {what}")]
    Repo {
        repo: PathBuf,
        what: String,
        #[source]
        source: Box<RepoError>,
    },
    #[error("{0} is missing: run `cargo xtask vm-test` (it builds the release payloads), or `cargo xtask image --version X --trust build/test-keys/update-test.key.pub --out DIR`")]
    MissingRelease(PathBuf),
    #[error("{image} does not trust the test key {key} (stamp {stamp} missing or different): `cargo xtask vm-test` rebuilds it")]
    Untrusted {
        image: PathBuf,
        key: PathBuf,
        stamp: PathBuf,
    },
    #[error("payload metadata {path}: {what}")]
    Metadata { path: PathBuf, what: String },
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> FixtureError {
    let path = path.to_owned();
    move |source| FixtureError::Io { op, path, source }
}

/// `build/test-keys/update-test.key`, generated when missing; returns the
/// path of its public half.
pub fn ensure_test_key(dir: &Path) -> Result<PathBuf, FixtureError> {
    let secret = dir.join(TEST_KEY);
    let public = keys::public_path(&secret);
    if secret.exists() && public.exists() {
        return Ok(public);
    }
    std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
    let key_err = |source| FixtureError::Key {
        path: secret.clone(),
        source,
    };
    SecretKey::generate()
        .and_then(|k| k.write_new(&secret))
        .map_err(key_err)
}

/// The stamp text for an image built trusting `public_key`.
pub fn trust_stamp(image_dir: &Path, public_key: &Path) -> Result<String, FixtureError> {
    let key = std::fs::read_to_string(public_key).map_err(io("reading", public_key))?;
    let meta = image_dir.join("payload").join(METADATA_FILE);
    let (_, sha) = repo::hash_file(&meta).map_err(|source| FixtureError::Repo {
        repo: image_dir.to_owned(),
        what: "hashing the payload metadata".into(),
        source: Box::new(source),
    })?;
    Ok(format!("key {}\nmetadata {sha}\n", key.trim()))
}

/// Whether `image_dir` was built trusting `public_key` (its stamp matches).
pub fn trusts(image_dir: &Path, public_key: &Path) -> bool {
    let stamp = std::fs::read_to_string(image_dir.join(TRUST_STAMP)).ok();
    stamp.is_some() && trust_stamp(image_dir, public_key).ok() == stamp
}

/// The releases next to the image under test (`build/<arch>/<version>`)
/// and the test key under `build/test-keys`.
#[derive(Debug, Clone)]
pub struct Releases {
    arch_dir: PathBuf,
    key: PathBuf,
}

impl Releases {
    /// From the base image's directory `build/<arch>/1.0.0`.
    pub fn beside(image_dir: &Path) -> Result<Self, FixtureError> {
        let arch_dir = image_dir
            .parent()
            .ok_or_else(|| FixtureError::MissingRelease(image_dir.to_owned()))?
            .to_owned();
        // `build/` is the nearest ancestor with the keys: the base image
        // is `build/<arch>/<version>`, a profile's `build/<arch>/<p>/<v>`.
        let build = arch_dir
            .ancestors()
            .skip(1)
            .find(|d| d.join("test-keys").is_dir())
            .unwrap_or(Path::new("."));
        let key = build.join("test-keys").join(TEST_KEY);
        let public = keys::public_path(&key);
        if !key.exists() {
            return Err(FixtureError::MissingRelease(key));
        }
        if !trusts(image_dir, &public) {
            return Err(FixtureError::Untrusted {
                image: image_dir.to_owned(),
                key: public,
                stamp: image_dir.join(TRUST_STAMP),
            });
        }
        Ok(Releases { arch_dir, key })
    }

    /// `build/<arch>/<version>/payload`.
    pub fn payload(&self, version: &str) -> Result<PathBuf, FixtureError> {
        let p = self.arch_dir.join(version).join("payload");
        if p.join(METADATA_FILE).exists() {
            Ok(p)
        } else {
            Err(FixtureError::MissingRelease(p))
        }
    }

    pub fn key(&self) -> Result<SecretKey, FixtureError> {
        SecretKey::load(&self.key).map_err(|source| FixtureError::Key {
            path: self.key.clone(),
            source,
        })
    }
}

/// A scratch update repository (removed on drop).
#[derive(Debug)]
pub struct TestRepo {
    dir: tempfile::TempDir,
    key: SecretKey,
}

impl TestRepo {
    pub fn new(key: SecretKey) -> Result<Self, FixtureError> {
        let dir = tempfile::Builder::new()
            .prefix("ballast-repo-")
            .tempdir()
            .map_err(io("creating a repository in", &std::env::temp_dir()))?;
        Ok(TestRepo { dir, key })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    fn err(&self, what: String) -> impl FnOnce(RepoError) -> FixtureError {
        let repo = self.path().to_owned();
        move |source| FixtureError::Repo {
            repo,
            what,
            source: Box::new(source),
        }
    }

    /// `ballast repo add REPO --payload DIR --no-chunks`: the scenarios
    /// written before delta updates test the whole-artifact path (their
    /// request logs count `objects/` downloads); `add_chunked` cuts chunks.
    pub fn add(&self, payload: &Path) -> Result<(), FixtureError> {
        self.add_with(payload, repo::Chunking::FullOnly)
    }

    /// `ballast repo add REPO --payload DIR`: with chunks for delta updates.
    pub fn add_chunked(&self, payload: &Path) -> Result<(), FixtureError> {
        self.add_with(payload, repo::Chunking::Cut)
    }

    fn add_with(&self, payload: &Path, chunking: repo::Chunking) -> Result<(), FixtureError> {
        repo::add_with(self.path(), payload, Vec::new(), Vec::new(), chunking)
            .map(drop)
            .map_err(self.err(format!("adding {}", payload.display())))
    }

    /// `ballast repo sign REPO --key KEY` (sequence + 1); returns the sequence.
    pub fn sign(&self) -> Result<u64, FixtureError> {
        repo::sign(
            self.path(),
            std::slice::from_ref(&self.key),
            Duration::from_secs(24 * 3600),
            false,
        )
        .map(|m| m.sequence)
        .map_err(self.err("signing".into()))
    }

    /// URL path of the object holding `artifact` of the release in `payload`.
    pub fn object_path(payload: &Path, artifact: &str) -> Result<String, FixtureError> {
        let meta = ballast_updater::payload::PayloadMetadata::load(payload).map_err(|e| {
            FixtureError::Metadata {
                path: payload.join(METADATA_FILE),
                what: e.to_string(),
            }
        })?;
        meta.artifacts
            .iter()
            .find(|a| a.name == artifact)
            .map(|a| format!("/objects/{}", a.sha256))
            .ok_or_else(|| FixtureError::Metadata {
                path: payload.join(METADATA_FILE),
                what: format!("no artifact {artifact}"),
            })
    }
}

/// A copy of the payload in `src` at `dst` whose metadata names a wrong
/// dm-verity root hash (first hex digit changed): it signs and installs,
/// but the slot never verifies at boot. Returns the bad root hash.
pub fn wrong_verity_payload(src: &Path, dst: &Path) -> Result<String, FixtureError> {
    std::fs::create_dir_all(dst).map_err(io("creating", dst))?;
    for entry in std::fs::read_dir(src).map_err(io("listing", src))? {
        let entry = entry.map_err(io("listing", src))?;
        let to = dst.join(entry.file_name());
        std::fs::copy(entry.path(), &to).map_err(io("copying to", &to))?;
    }
    let path = dst.join(METADATA_FILE);
    let bad = |what: &str| FixtureError::Metadata {
        path: path.clone(),
        what: what.to_owned(),
    };
    let text = std::fs::read(&path).map_err(io("reading", &path))?;
    let mut meta: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| bad(&e.to_string()))?;
    let root = meta
        .pointer_mut("/verity/root_hash")
        .ok_or_else(|| bad("no verity.root_hash"))?;
    let old = root.as_str().ok_or_else(|| bad("root_hash is not text"))?;
    let mut chars: Vec<char> = old.chars().collect();
    let first = chars.first_mut().ok_or_else(|| bad("empty root_hash"))?;
    *first = if *first == '0' { '1' } else { '0' };
    let new: String = chars.into_iter().collect();
    *root = serde_json::Value::from(new.clone());
    let mut out = serde_json::to_vec_pretty(&meta).map_err(|e| bad(&e.to_string()))?;
    out.push(b'\n');
    std::fs::write(&path, out).map_err(io("writing", &path))?;
    Ok(new)
}

/// The Ballast entries in `loader/entries` of the ESP of raw disk `disk`,
/// read with mtools (`mdir`), sorted.
pub fn esp_entries(disk: &Path) -> Result<Vec<String>, FixtureError> {
    let esp = crate::disk::find_partition(disk, "ESP").map_err(|e| FixtureError::Metadata {
        path: disk.to_owned(),
        what: format!("no ESP: {e}"),
    })?;
    let image = format!("{}@@{}", disk.display(), esp.offset());
    let out = std::process::Command::new("mdir")
        .args(["-b", "-i", &image, "::/loader/entries"])
        .env("MTOOLS_SKIP_CHECK", "1")
        .output()
        .map_err(io("running mdir on", disk))?;
    if !out.status.success() {
        return Err(FixtureError::Metadata {
            path: disk.to_owned(),
            what: format!(
                "mdir failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().rsplit('/').next().map(str::to_owned))
        .filter(|n| n.starts_with("ballast-"))
        .collect();
    names.sort();
    Ok(names)
}

/// Converts the qcow2 overlay `overlay` to a raw file `raw` (`qemu-img`).
pub fn overlay_to_raw(overlay: &Path, raw: &Path) -> Result<(), FixtureError> {
    let out = std::process::Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(overlay)
        .arg(raw)
        .output()
        .map_err(io("running qemu-img convert on", overlay))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(FixtureError::Metadata {
            path: overlay.to_owned(),
            what: format!(
                "qemu-img convert failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_test_key_is_made_once() {
        let dir = tempfile::tempdir().unwrap();
        let public = ensure_test_key(dir.path()).unwrap();
        let first = std::fs::read(&public).unwrap();
        assert_eq!(ensure_test_key(dir.path()).unwrap(), public);
        assert_eq!(std::fs::read(&public).unwrap(), first);
        assert!(keys::load_public(&public).is_ok());
    }

    #[test]
    fn wrong_verity_changes_only_the_root_hash() {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        let meta = serde_json::json!({"version":"1.1.0","verity":{"root_hash":"ab12","salt":"00"}});
        std::fs::write(src.path().join(METADATA_FILE), meta.to_string()).unwrap();
        std::fs::write(src.path().join("usr.img"), b"data").unwrap();
        let bad = wrong_verity_payload(src.path(), dst.path()).unwrap();
        assert_eq!(bad, "0b12");
        let out: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dst.path().join(METADATA_FILE)).unwrap())
                .unwrap();
        assert_eq!(out["verity"]["root_hash"], "0b12");
        assert_eq!(out["verity"]["salt"], "00");
        assert_eq!(std::fs::read(dst.path().join("usr.img")).unwrap(), b"data");
    }
}
