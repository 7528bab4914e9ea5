//! The node's side of delta updates: fetch and verify the signed chunk
//! catalog (`delta.json`) and an artifact's chunk index, index what the
//! node already holds (the running slot, the inactive slot's leftovers,
//! the running initrd) with the same chunker, and assemble the artifact
//! from local chunks and downloaded missing ones.
//!
//! Every chunk, local or downloaded, is hashed before it is written, and
//! the assembled artifact as a whole is hashed against the index (the
//! caller then checks it against the manifest's signed SHA-256). Memory is
//! one [`MAX_CHUNK`] buffer plus a map of the wanted chunks the node has.
//! The caller falls back to the full download on any [`DeltaError`].

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::chunks::{
    self, Catalog, ChunkError, ChunkIndex, CATALOG_FILE, CATALOG_SIGNATURES_FILE, MAX_CHUNK,
    MAX_INDEX_BYTES,
};
use crate::digest::{sha256_hex, Sha256};
use crate::fetch::{Fetch, FetchError, ResumingReader};
use crate::keys::TrustedKeys;
use crate::manifest::{self, ManifestError};
use crate::payload::Artifact;
use crate::storage::{Storage, StorageError, WriteTarget};

/// Re-requests of one chunk in a row without progress before it fails.
pub const CHUNK_MAX_RESUMES: u32 = 8;

#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    #[error("the repository at {repo} has no {CATALOG_FILE}")]
    NoCatalog { repo: String },
    #[error("{CATALOG_FILE}: {0}")]
    CatalogSignature(#[source] ManifestError),
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error(transparent)]
    Chunks(#[from] ChunkError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("{CATALOG_FILE} has no chunk index for artifact {artifact}")]
    NotInCatalog { artifact: String },
    #[error("chunk index {path} is missing")]
    NoIndex { path: String },
    #[error("chunk index {path} has sha256 {actual}, {CATALOG_FILE} signs {expected}")]
    IndexHash {
        path: String,
        expected: String,
        actual: String,
    },
    #[error("chunk index {path} describes {size} bytes with sha256 {sha256}, not the artifact")]
    IndexMismatch {
        path: String,
        size: u64,
        sha256: String,
    },
    #[error("downloading chunk {path}")]
    Download {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("chunk {path} has sha256 {actual}")]
    ChunkHash { path: String, actual: String },
    #[error(
        "none of the {chunks} chunks is on the node: one whole download beats {chunks} requests"
    )]
    NothingToReuse { chunks: usize },
    #[error("the assembled artifact has sha256 {actual}, its index says {expected}")]
    Assembled { expected: String, actual: String },
}

/// Fetches `delta.json` and checks its signatures with the manifest's keys
/// and threshold.
pub fn fetch_catalog(fetch: &dyn Fetch, trust: &TrustedKeys) -> Result<Catalog, DeltaError> {
    let bytes = fetch
        .get(CATALOG_FILE, MAX_INDEX_BYTES)?
        .ok_or_else(|| DeltaError::NoCatalog {
            repo: fetch.describe(),
        })?;
    let sigs = fetch.get(CATALOG_SIGNATURES_FILE, manifest::MAX_MANIFEST_BYTES)?;
    manifest::verify_signatures(&bytes, sigs.as_deref(), trust)
        .map_err(DeltaError::CatalogSignature)?;
    Ok(Catalog::parse(&bytes)?)
}

/// Fetches the chunk index of `artifact`, checked against the catalog's
/// hash and against the artifact's signed size and hash.
pub fn fetch_index(
    fetch: &dyn Fetch,
    catalog: &Catalog,
    artifact: &Artifact,
) -> Result<ChunkIndex, DeltaError> {
    let entry = catalog
        .find(&artifact.sha256)
        .ok_or_else(|| DeltaError::NotInCatalog {
            artifact: artifact.sha256.clone(),
        })?;
    let path = ChunkIndex::object_path(&entry.index);
    let bytes = fetch
        .get(&path, MAX_INDEX_BYTES)?
        .ok_or_else(|| DeltaError::NoIndex { path: path.clone() })?;
    let actual = sha256_hex(&bytes);
    if actual != entry.index {
        return Err(DeltaError::IndexHash {
            path,
            expected: entry.index.clone(),
            actual,
        });
    }
    let index = ChunkIndex::parse(&bytes)?;
    if index.size != artifact.size || index.sha256 != artifact.sha256 {
        return Err(DeltaError::IndexMismatch {
            path,
            size: index.size,
            sha256: index.sha256,
        });
    }
    Ok(index)
}

/// A file or device the node may reuse chunks from: its first `len` bytes.
#[derive(Debug, Clone)]
pub struct LocalSource {
    pub path: PathBuf,
    pub len: u64,
}

/// Where the node holds each chunk it wants.
#[derive(Debug, Default)]
pub struct LocalChunks {
    sources: Vec<PathBuf>,
    by_hash: HashMap<String, (usize, u64, u32)>,
    /// Bytes read while indexing.
    pub scanned: u64,
}

impl LocalChunks {
    /// Cuts each source with the repository's chunker and remembers the
    /// chunks `wanted` lists. A source that cannot be read is skipped: it
    /// only means more downloading. Later sources win for a hash present
    /// in several, so list the most stable last.
    pub fn scan(storage: &dyn Storage, sources: &[LocalSource], wanted: &ChunkIndex) -> Self {
        let wanted_index = wanted;
        let wanted: HashSet<&str> = wanted.chunks.iter().map(|c| c.sha256.as_str()).collect();
        let mut local = LocalChunks::default();
        for (i, source) in sources.iter().enumerate() {
            let reader = match storage.open_read(&source.path) {
                Ok(r) => r,
                Err(e) => {
                    tracing::info!(path = %source.path.display(), error = %e, "not reusing chunks from an unreadable source");
                    continue;
                }
            };
            local.sources.push(source.path.clone());
            let slot = local.sources.len() - 1;
            let what = source.path.display().to_string();
            let by_hash = &mut local.by_hash;
            let mut scanned = 0u64;
            let result = chunks::cut::<ChunkError>(reader.take(source.len), &what, |c, _| {
                scanned += u64::from(c.length);
                if wanted.contains(c.sha256.as_str()) {
                    by_hash.insert(c.sha256, (slot, c.offset, c.length));
                }
                Ok(())
            });
            local.scanned += scanned;
            if let Err(e) = result {
                tracing::info!(source = i, path = %source.path.display(), error = %e, "stopped indexing a source early");
            }
        }
        local.probe_last_chunk(storage, sources, wanted_index);
        local
    }

    /// The artifact's last chunk ends at its end of file, but a slot goes
    /// on past the image, so the chunker cuts it differently there: look
    /// for it at the same offset instead (images of equal size).
    fn probe_last_chunk(
        &mut self,
        storage: &dyn Storage,
        sources: &[LocalSource],
        index: &ChunkIndex,
    ) {
        let Some(last) = index.chunks.last() else {
            return;
        };
        if self.by_hash.contains_key(&last.sha256) {
            return;
        }
        let mut buf = vec![0u8; usize::try_from(last.length).unwrap_or(0)];
        for (i, path) in self.sources.iter().enumerate() {
            let fits = sources
                .iter()
                .any(|s| s.path == *path && s.len >= last.offset + u64::from(last.length));
            if fits
                && storage.read_at(path, last.offset, &mut buf).is_ok()
                && sha256_hex(&buf) == last.sha256
            {
                self.by_hash
                    .insert(last.sha256.clone(), (i, last.offset, last.length));
                return;
            }
        }
    }

    /// Chunks of `index` the node holds, and their bytes.
    pub fn coverage(&self, index: &ChunkIndex) -> (usize, u64) {
        index
            .chunks
            .iter()
            .filter(|c| self.by_hash.contains_key(&c.sha256))
            .fold((0, 0), |(n, b), c| (n + 1, b + u64::from(c.length)))
    }

    fn find(&self, sha256: &str) -> Option<(&Path, u64, u32)> {
        self.by_hash
            .get(sha256)
            .and_then(|&(i, off, len)| self.sources.get(i).map(|p| (p.as_path(), off, len)))
    }
}

/// What assembling one artifact took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DeltaStats {
    pub chunks: u64,
    pub reused_chunks: u64,
    pub reused_bytes: u64,
    pub downloaded_chunks: u64,
    pub downloaded_bytes: u64,
    /// Ranged requests for the downloaded chunks (one per run of them).
    pub requests: u64,
    pub resumes: u32,
}

impl DeltaStats {
    pub fn add(&mut self, other: &DeltaStats) {
        self.chunks += other.chunks;
        self.reused_chunks += other.reused_chunks;
        self.reused_bytes += other.reused_bytes;
        self.downloaded_chunks += other.downloaded_chunks;
        self.downloaded_bytes += other.downloaded_bytes;
        self.requests += other.requests;
        self.resumes += other.resumes;
    }
}

/// Writes the artifact `index` describes to `target` in order, each chunk
/// from `local` when the bytes there still hash right (the inactive slot
/// may already be overwritten where it is also the target), else from the
/// repository. Each run of consecutive chunks the node lacks is one ranged
/// request on the artifact's whole object (`objects/<sha256>`, which every
/// repository holds for nodes without delta support), so the request count
/// is the number of changed regions, not of chunks, and one connection is
/// kept alive for all of them. Every chunk is still hashed on its own.
/// Returns the SHA-256 of everything written.
pub fn assemble(
    storage: &dyn Storage,
    fetch: &dyn Fetch,
    index: &ChunkIndex,
    local: &LocalChunks,
    target: &mut dyn WriteTarget,
    progress: &mut dyn FnMut(u64),
) -> Result<(String, DeltaStats), DeltaError> {
    let mut buf = vec![0u8; MAX_CHUNK as usize];
    let mut whole = Sha256::new();
    let mut stats = DeltaStats::default();
    let mut done = 0u64;
    let object = ChunkIndex::object_path(&index.sha256);
    let chunks = &index.chunks;
    let mut i = 0;
    while i < chunks.len() {
        let c = &chunks[i];
        // validate() bounds every length by MAX_CHUNK.
        let len = usize::try_from(c.length)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let bytes = &mut buf[..len];
        let reused = match local.find(&c.sha256) {
            Some((path, offset, _)) => {
                storage.read_at(path, offset, bytes).is_ok() && sha256_hex(bytes) == c.sha256
            }
            None => false,
        };
        if reused {
            stats.chunks += 1;
            stats.reused_chunks += 1;
            stats.reused_bytes += u64::from(c.length);
            whole.update(bytes);
            target.write_all(bytes)?;
            done += u64::from(c.length);
            progress(done);
            i += 1;
            continue;
        }
        // This chunk and every following one the node lacks: one range.
        let run_end = chunks[i + 1..]
            .iter()
            .position(|c| local.find(&c.sha256).is_some())
            .map_or(chunks.len(), |p| i + 1 + p);
        let run = &chunks[i..run_end];
        let run_len: u64 = run.iter().map(|c| u64::from(c.length)).sum();
        let mut reader =
            ResumingReader::range(fetch, &object, c.offset, run_len, CHUNK_MAX_RESUMES);
        for c in run {
            let len = usize::try_from(c.length)
                .unwrap_or(usize::MAX)
                .min(buf.len());
            let bytes = &mut buf[..len];
            let what = || format!("{object} bytes {}+{}", c.offset, c.length);
            reader
                .read_exact(bytes)
                .map_err(|source| DeltaError::Download {
                    path: what(),
                    source,
                })?;
            let actual = sha256_hex(bytes);
            if actual != c.sha256 {
                return Err(DeltaError::ChunkHash {
                    path: what(),
                    actual,
                });
            }
            stats.chunks += 1;
            stats.downloaded_chunks += 1;
            stats.downloaded_bytes += u64::from(c.length);
            whole.update(bytes);
            target.write_all(bytes)?;
            done += u64::from(c.length);
            progress(done);
        }
        stats.resumes += reader.resumes;
        stats.requests += 1;
        i = run_end;
    }
    let actual = whole.finish_hex();
    if actual != index.sha256 {
        return Err(DeltaError::Assembled {
            expected: index.sha256.clone(),
            actual,
        });
    }
    Ok((actual, stats))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunks::tests::data;
    use crate::fetch::DirFetch;
    use crate::storage::MemStorage;

    /// A repository holding `bytes` as a whole object and as chunks, and
    /// its index.
    fn chunk_repo(bytes: &[u8]) -> (tempfile::TempDir, ChunkIndex) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("chunks")).unwrap();
        std::fs::create_dir_all(dir.path().join("objects")).unwrap();
        std::fs::write(
            dir.path().join(ChunkIndex::object_path(&sha256_hex(bytes))),
            bytes,
        )
        .unwrap();
        let index = chunks::index::<ChunkError>(
            bytes,
            "new",
            bytes.len() as u64,
            &sha256_hex(bytes),
            |c, b| {
                std::fs::write(dir.path().join(c.path()), b).unwrap();
                Ok(())
            },
        )
        .unwrap();
        (dir, index)
    }

    #[test]
    fn assembles_from_local_chunks_and_downloads_only_the_rest() {
        let old = data(1, 3 << 20);
        let mut new = old.clone();
        new[1_500_000..1_500_100].copy_from_slice(&data(9, 100));
        let (repo, index) = chunk_repo(&new);
        let fs = MemStorage::new();
        fs.put(Path::new("/dev/old"), &old);
        fs.put(Path::new("/out"), &[]);
        let local = LocalChunks::scan(
            &fs,
            &[LocalSource {
                path: "/dev/old".into(),
                len: old.len() as u64,
            }],
            &index,
        );
        let fetch = DirFetch {
            root: repo.path().to_owned(),
        };
        let mut out = fs.create(Path::new("/out")).unwrap();
        let (digest, stats) =
            assemble(&fs, &fetch, &index, &local, out.as_mut(), &mut |_| {}).unwrap();
        drop(out);
        assert_eq!(digest, sha256_hex(&new));
        assert_eq!(fs.read(Path::new("/out")).unwrap(), new);
        assert!(
            stats.downloaded_chunks >= 1 && stats.downloaded_chunks <= 3,
            "{stats:?}"
        );
        assert!(
            stats.downloaded_bytes <= 3 * u64::from(MAX_CHUNK),
            "{stats:?}"
        );
        assert_eq!(
            stats.reused_bytes + stats.downloaded_bytes,
            new.len() as u64
        );
        // One changed region: its chunks come in one ranged request.
        assert_eq!(stats.requests, 1, "{stats:?}");

        // A local chunk that no longer hashes right is downloaded instead.
        let mut damaged = old.clone();
        damaged[10] ^= 1;
        fs.put(Path::new("/dev/old"), &damaged);
        let mut out = fs.create(Path::new("/out")).unwrap();
        let (_, again) = assemble(&fs, &fetch, &index, &local, out.as_mut(), &mut |_| {}).unwrap();
        assert_eq!(again.downloaded_chunks, stats.downloaded_chunks + 1);

        assert_eq!(again.requests, 2, "{again:?}");

        // A corrupt object in the repository is refused chunk by chunk.
        std::fs::write(
            repo.path().join(ChunkIndex::object_path(&index.sha256)),
            vec![0u8; new.len()],
        )
        .unwrap();
        let mut out = fs.create(Path::new("/out")).unwrap();
        assert!(matches!(
            assemble(&fs, &fetch, &index, &local, out.as_mut(), &mut |_| {}),
            Err(DeltaError::ChunkHash { .. })
        ));
    }
}
