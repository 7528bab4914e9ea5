//! The operator's side of an update repository: a directory of static
//! files any HTTP server can serve.
//!
//! ```text
//! REPO/manifest.json        Manifest (see crate::manifest)
//! REPO/manifest.json.sig    [{"key_id": .., "signature": ..}, ..]
//! REPO/objects/<sha256>     payload artifacts and chunk indexes, content addressed
//! REPO/chunks/<sha256>      chunks of usr.img and initrd (delta updates)
//! REPO/delta.json           chunk index of each artifact, by hash (crate::chunks)
//! REPO/delta.json.sig       its signatures, by the manifest's keys
//! ```
//! `add` copies a payload directory's artifacts in (checking them against
//! its metadata) and lists the release; `sign` raises the sequence number,
//! sets the expiry and signs; `verify` checks everything a node would.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::digest::Sha256;

use crate::chunks::{
    self, Catalog, ChunkIndex, IndexRef, CATALOG_FILE, CATALOG_SIGNATURES_FILE, CHUNKS_DIR,
};
use crate::keys::{SecretKey, TrustedKeys};
use crate::manifest::{
    self, Manifest, ManifestError, Release, Signature, Wave, MANIFEST_FILE, OBJECTS_DIR,
    SIGNATURES_FILE,
};
use crate::payload::{PayloadError, PayloadMetadata, Version, INITRD, USR_IMAGE};

/// Default lifetime of a signed manifest.
pub const DEFAULT_EXPIRY: Duration = Duration::from_secs(30 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error(transparent)]
    Payload(#[from] PayloadError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("payload file {path} is {actual_size} bytes with sha256 {actual_sha256}; its metadata says {size} bytes, {sha256}")]
    PayloadMismatch {
        path: PathBuf,
        size: u64,
        sha256: String,
        actual_size: u64,
        actual_sha256: String,
    },
    #[error("release {version} ({arch} {variant}) is already in {repo}")]
    Exists {
        version: Version,
        arch: String,
        variant: String,
        repo: PathBuf,
    },
    #[error(
        "object {path} is missing or does not match the manifest (size {size}, sha256 {sha256})"
    )]
    Object {
        path: PathBuf,
        size: u64,
        sha256: String,
    },
    #[error("no release {version} in {repo}")]
    NoRelease { version: Version, repo: PathBuf },
    #[error("--append needs an existing signed manifest in {repo}")]
    NothingToAppend { repo: PathBuf },
    #[error("no signing keys given")]
    NoKeys,
    #[error(transparent)]
    Chunks(#[from] crate::chunks::ChunkError),
    #[error("{path}: {reason}")]
    Catalog { path: PathBuf, reason: String },
}

/// Whether `add` cuts usr.img and initrd into chunks for delta updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunking {
    /// Full objects plus chunks, chunk indexes and `delta.json`.
    Cut,
    /// Full objects only: nodes download whole artifacts.
    FullOnly,
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> RepoError {
    let path = path.to_owned();
    move |source| RepoError::Io { op, path, source }
}

/// Size and hex SHA-256 of a file.
pub fn hash_file(path: &Path) -> Result<(u64, String), RepoError> {
    let mut file = std::fs::File::open(path).map_err(io_err("opening", path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(io_err("reading", path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, hasher.finish_hex()))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), RepoError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    let mut f = std::fs::File::create(&tmp).map_err(io_err("creating", &tmp))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(io_err("writing", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err("renaming into", path))?;
    Ok(())
}

/// Loads `REPO/manifest.json`, or a fresh empty manifest.
pub fn load(repo: &Path) -> Result<Manifest, RepoError> {
    let path = repo.join(MANIFEST_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => Ok(Manifest::parse(&bytes)?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Ok(Manifest::new(SystemTime::now() + DEFAULT_EXPIRY))
        }
        Err(e) => Err(io_err("reading", &path)(e)),
    }
}

/// Writes an (unsigned) manifest and drops the now stale signatures.
fn store_unsigned(repo: &Path, manifest: &Manifest) -> Result<(), RepoError> {
    manifest.validate()?;
    write_atomic(&repo.join(MANIFEST_FILE), &manifest.to_bytes())?;
    remove_if_present(&repo.join(SIGNATURES_FILE))
}

fn remove_if_present(path: &Path) -> Result<(), RepoError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("removing", path)(e)),
    }
}

/// Adds the release in payload directory `payload` to `repo`, cut into
/// chunks for delta updates too.
pub fn add(
    repo: &Path,
    payload: &Path,
    waves: Vec<Wave>,
    channels: Vec<String>,
) -> Result<Release, RepoError> {
    add_with(repo, payload, waves, channels, Chunking::Cut)
}

/// [`add`], choosing whether to cut chunks.
pub fn add_with(
    repo: &Path,
    payload: &Path,
    waves: Vec<Wave>,
    channels: Vec<String>,
    chunking: Chunking,
) -> Result<Release, RepoError> {
    let meta = PayloadMetadata::load(payload)?;
    let mut manifest = load(repo)?;
    if manifest.releases.iter().any(|r| {
        r.version() == meta.version
            && r.payload.arch == meta.arch
            && r.payload.variant == meta.variant
    }) {
        return Err(RepoError::Exists {
            version: meta.version,
            arch: meta.arch.to_string(),
            variant: meta.variant.clone(),
            repo: repo.to_owned(),
        });
    }
    let objects = repo.join(OBJECTS_DIR);
    std::fs::create_dir_all(&objects).map_err(io_err("creating", &objects))?;
    for art in &meta.artifacts {
        // Artifact names are checked by validate(); only fixed names reach here.
        let src = payload.join(&art.name);
        let (size, sha256) = hash_file(&src)?;
        if size != art.size || sha256 != art.sha256 {
            return Err(RepoError::PayloadMismatch {
                path: src,
                size: art.size,
                sha256: art.sha256.clone(),
                actual_size: size,
                actual_sha256: sha256,
            });
        }
        let dst = objects.join(&art.sha256);
        if dst.exists() && hash_file(&dst)? == (size, sha256) {
            continue;
        }
        let tmp = objects.join(format!(".{}.tmp", art.sha256));
        std::fs::copy(&src, &tmp).map_err(io_err("copying to", &tmp))?;
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(io_err("fsync of", &tmp))?;
        std::fs::rename(&tmp, &dst).map_err(io_err("renaming into", &dst))?;
    }
    if chunking == Chunking::Cut {
        let mut catalog = load_catalog(repo)?;
        for name in CHUNKED_ARTIFACTS {
            let Some(art) = meta.artifact(name) else {
                continue;
            };
            if catalog.find(&art.sha256).is_some() {
                continue;
            }
            let entry = cut_artifact(repo, &payload.join(name), &art.sha256, art.size)?;
            catalog.indexes.push(entry);
        }
        write_atomic(&repo.join(CATALOG_FILE), &catalog.to_bytes())?;
        remove_if_present(&repo.join(CATALOG_SIGNATURES_FILE))?;
    }
    let release = Release {
        payload: meta,
        waves,
        channels: if channels.is_empty() {
            crate::manifest::default_channels()
        } else {
            channels
        },
    };
    manifest.releases.push(release.clone());
    manifest.releases.sort_by(|a, b| {
        (a.version(), a.payload.arch.as_str()).cmp(&(b.version(), b.payload.arch.as_str()))
    });
    store_unsigned(repo, &manifest)?;
    Ok(release)
}

/// Puts every release of `version` (all arches and variants) in exactly
/// `channels`: how a release is promoted, e.g. from `beta` to
/// `beta` + `stable`. Returns how many releases changed.
pub fn set_channels(
    repo: &Path,
    version: Version,
    channels: Vec<String>,
) -> Result<usize, RepoError> {
    let mut manifest = load(repo)?;
    let mut matched = 0;
    for r in manifest
        .releases
        .iter_mut()
        .filter(|r| r.version() == version)
    {
        r.channels = channels.clone();
        matched += 1;
    }
    if matched == 0 {
        return Err(RepoError::NoRelease {
            version,
            repo: repo.to_owned(),
        });
    }
    store_unsigned(repo, &manifest)?;
    Ok(matched)
}

/// Artifacts cut into chunks: the kernel is either unchanged (the node
/// copies it from its ESP) or new as a whole.
pub const CHUNKED_ARTIFACTS: [&str; 2] = [USR_IMAGE, INITRD];

/// `REPO/delta.json`, or an empty catalog.
pub fn load_catalog(repo: &Path) -> Result<Catalog, RepoError> {
    let path = repo.join(CATALOG_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => Catalog::parse(&bytes).map_err(|e| RepoError::Catalog {
            path,
            reason: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Catalog::default()),
        Err(e) => Err(io_err("reading", &path)(e)),
    }
}

/// Cuts the artifact at `src` into `REPO/chunks/`, writes its index to
/// `REPO/objects/` and returns the catalog entry. Chunks already present
/// (shared with other releases) are not written again. Chunks are stored
/// uncompressed: see docs/update-repository.md.
fn cut_artifact(repo: &Path, src: &Path, sha256: &str, size: u64) -> Result<IndexRef, RepoError> {
    let dir = repo.join(CHUNKS_DIR);
    std::fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
    let file = std::fs::File::open(src).map_err(io_err("opening", src))?;
    let reader = std::io::BufReader::with_capacity(1 << 20, file);
    let what = src.display().to_string();
    let index = chunks::index::<RepoError>(reader, &what, size, sha256, |c, bytes| {
        let dst = dir.join(&c.sha256);
        if dst.exists() {
            return Ok(());
        }
        // Not fsynced one by one (thousands of files): `repo verify`
        // re-hashes every chunk, and a torn chunk only costs a node a full
        // download, since nodes hash every chunk they fetch.
        let tmp = dir.join(format!(".{}.tmp", c.sha256));
        std::fs::write(&tmp, bytes).map_err(io_err("writing", &tmp))?;
        std::fs::rename(&tmp, &dst).map_err(io_err("renaming into", &dst))
    })?;
    if index.sha256 != sha256 {
        return Err(RepoError::PayloadMismatch {
            path: src.to_owned(),
            size,
            sha256: sha256.to_owned(),
            actual_size: index.size,
            actual_sha256: index.sha256,
        });
    }
    let bytes = index.to_bytes();
    let index_sha = crate::digest::sha256_hex(&bytes);
    write_atomic(&repo.join(ChunkIndex::object_path(&index_sha)), &bytes)?;
    Ok(IndexRef {
        artifact: sha256.to_owned(),
        index: index_sha,
        index_size: bytes.len() as u64,
    })
}

/// Sets the release floor (anti-rollback).
pub fn set_floor(repo: &Path, floor: Option<Version>) -> Result<(), RepoError> {
    let mut manifest = load(repo)?;
    manifest.floor = floor;
    store_unsigned(repo, &manifest)
}

/// Signs the manifest with `keys`. Without `append`: raises the sequence
/// number, sets `expires` to now + `expires_in` and replaces all
/// signatures. With `append`: adds signatures to the existing ones over
/// the unchanged bytes (for keys held by different people).
pub fn sign(
    repo: &Path,
    keys: &[SecretKey],
    expires_in: Duration,
    append: bool,
) -> Result<Manifest, RepoError> {
    if keys.is_empty() {
        return Err(RepoError::NoKeys);
    }
    let mpath = repo.join(MANIFEST_FILE);
    let spath = repo.join(SIGNATURES_FILE);
    let (bytes, mut sigs, manifest) = if append {
        let bytes = std::fs::read(&mpath).map_err(|_| RepoError::NothingToAppend {
            repo: repo.to_owned(),
        })?;
        let sigs = match std::fs::read(&spath) {
            Ok(b) => manifest::parse_signatures(&b)?,
            Err(_) => Vec::new(),
        };
        let manifest = Manifest::parse(&bytes)?;
        (bytes, sigs, manifest)
    } else {
        let mut manifest = load(repo)?;
        manifest.sequence += 1;
        manifest.expires =
            humantime::format_rfc3339_seconds(SystemTime::now() + expires_in).to_string();
        let bytes = manifest.to_bytes();
        write_atomic(&mpath, &bytes)?;
        (bytes, Vec::new(), manifest)
    };
    for key in keys {
        let key_id = key.key_id();
        sigs.retain(|s| s.key_id != key_id);
        sigs.push(Signature {
            key_id,
            signature: hex::encode(key.sign(&bytes)),
        });
    }
    write_signatures(&spath, &sigs)?;
    sign_catalog(repo, keys, append)?;
    Ok(manifest)
}

fn write_signatures(path: &Path, sigs: &[Signature]) -> Result<(), RepoError> {
    let mut out = serde_json::to_vec_pretty(sigs).unwrap_or_default();
    out.push(b'\n');
    write_atomic(path, &out)
}

/// Signs `delta.json`, when the repository has one, with the same keys as
/// the manifest (see crate::chunks for why it is a separate document).
fn sign_catalog(repo: &Path, keys: &[SecretKey], append: bool) -> Result<(), RepoError> {
    let path = repo.join(CATALOG_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("reading", &path)(e)),
    };
    Catalog::parse(&bytes).map_err(|e| RepoError::Catalog {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let spath = repo.join(CATALOG_SIGNATURES_FILE);
    let mut sigs = match std::fs::read(&spath) {
        Ok(b) if append => manifest::parse_signatures(&b)?,
        _ => Vec::new(),
    };
    for key in keys {
        let key_id = key.key_id();
        sigs.retain(|s| s.key_id != key_id);
        sigs.push(Signature {
            key_id,
            signature: hex::encode(key.sign(&bytes)),
        });
    }
    write_signatures(&spath, &sigs)
}

/// What `verify` checked.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VerifyReport {
    pub sequence: u64,
    pub expires: String,
    pub signed_by: Vec<String>,
    pub releases: Vec<String>,
    pub objects_checked: usize,
    pub indexes_checked: usize,
    pub chunks_checked: usize,
}

/// `delta.json`'s signatures, every index it names and every chunk those
/// name. A repository without `delta.json` serves full payloads only.
fn verify_catalog(repo: &Path, trust: &TrustedKeys) -> Result<(usize, usize), RepoError> {
    let path = repo.join(CATALOG_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((0, 0)),
        Err(e) => return Err(io_err("reading", &path)(e)),
    };
    let sigs = std::fs::read(repo.join(CATALOG_SIGNATURES_FILE)).ok();
    manifest::verify_signatures(&bytes, sigs.as_deref(), trust)?;
    let catalog = Catalog::parse(&bytes)?;
    let mut chunks_checked = 0;
    let mut seen = std::collections::BTreeSet::new();
    for r in &catalog.indexes {
        let ipath = repo.join(ChunkIndex::object_path(&r.index));
        let ibytes = std::fs::read(&ipath).map_err(io_err("reading", &ipath))?;
        if crate::digest::sha256_hex(&ibytes) != r.index {
            return Err(RepoError::Object {
                path: ipath,
                size: r.index_size,
                sha256: r.index.clone(),
            });
        }
        let index = ChunkIndex::parse(&ibytes)?;
        for c in &index.chunks {
            if !seen.insert(c.sha256.clone()) {
                continue;
            }
            let cpath = repo.join(c.path());
            match hash_file(&cpath) {
                Ok((size, sha)) if size == u64::from(c.length) && sha == c.sha256 => {
                    chunks_checked += 1;
                }
                _ => {
                    return Err(RepoError::Object {
                        path: cpath,
                        size: u64::from(c.length),
                        sha256: c.sha256.clone(),
                    })
                }
            }
        }
    }
    Ok((catalog.indexes.len(), chunks_checked))
}

/// Everything a node would check, plus every object's size and hash.
pub fn verify(
    repo: &Path,
    trust: &TrustedKeys,
    now: SystemTime,
) -> Result<VerifyReport, RepoError> {
    let mpath = repo.join(MANIFEST_FILE);
    let bytes = std::fs::read(&mpath).map_err(io_err("reading", &mpath))?;
    let sigs = std::fs::read(repo.join(SIGNATURES_FILE)).ok();
    let verified = manifest::verify(&bytes, sigs.as_deref(), trust, now, None)?;
    let mut objects_checked = 0;
    for r in &verified.manifest.releases {
        for a in &r.payload.artifacts {
            let path = repo.join(Release::object_path(&a.sha256));
            match hash_file(&path) {
                Ok((size, sha)) if size == a.size && sha == a.sha256 => objects_checked += 1,
                _ => {
                    return Err(RepoError::Object {
                        path,
                        size: a.size,
                        sha256: a.sha256.clone(),
                    })
                }
            }
        }
    }
    let (indexes_checked, chunks_checked) = verify_catalog(repo, trust)?;
    let m = verified.manifest;
    Ok(VerifyReport {
        indexes_checked,
        chunks_checked,
        sequence: m.sequence,
        expires: m.expires,
        signed_by: verified.signed_by,
        releases: m
            .releases
            .iter()
            .map(|r| format!("{} {} {}", r.version(), r.payload.arch, r.payload.variant))
            .collect(),
        objects_checked,
    })
}
