//! Content-defined chunks of payload artifacts, for delta updates: the
//! chunker both the repository and the node use, the per-artifact chunk
//! index (`objects/<sha256>`), and the signed catalog (`delta.json`) that
//! names each artifact's index by hash.
//!
//! Why a separate signed catalog and not a field in `manifest.json`: every
//! manifest struct refuses unknown fields and nodes refuse any schema but
//! theirs, so no field can be added that nodes already in the field would
//! accept. `delta.json` is a second document signed by the same keys with
//! the same threshold; nodes that only know full payloads never fetch it,
//! and the manifest's schema stays 1. It needs no expiry or sequence: each
//! entry says "the artifact with SHA-256 X is cut into the chunks of the
//! index with SHA-256 Y", a fact about content that never goes stale; a
//! replayed older catalog only lacks entries, which means a full download.
//! Whatever the catalog says, the node still hashes every chunk and the
//! whole assembled artifact against the manifest's signed SHA-256.
//!
//! Chunk sizes (min 16 KiB, average 64 KiB, max 256 KiB, FastCDC 2020,
//! normalisation level 1): a changed file in an erofs image dirties about
//! one chunk of context on each side, so smaller chunks mean fewer bytes
//! downloaded per change; but each missing chunk is one HTTP request and
//! each index entry ~110 bytes of JSON. 64 KiB keeps the index of a
//! 110 MiB image near 200 KB and the request count in the hundreds.

use std::collections::BTreeSet;
use std::io::Read;

use serde::{Deserialize, Serialize};

use crate::digest::sha256_hex;
use crate::manifest::OBJECTS_DIR;

/// Repository directory of chunks, each named by the SHA-256 of its bytes.
pub const CHUNKS_DIR: &str = "chunks";
/// The signed catalog of chunk indexes and its detached signatures.
pub const CATALOG_FILE: &str = "delta.json";
pub const CATALOG_SIGNATURES_FILE: &str = "delta.json.sig";
/// Format version of [`ChunkIndex`] and [`Catalog`].
pub const SCHEMA: u32 = 1;
pub const MIN_CHUNK: u32 = 16 << 10;
pub const AVG_CHUNK: u32 = 64 << 10;
pub const MAX_CHUNK: u32 = 256 << 10;
/// Names the chunker and its parameters: a node only reuses its own chunks
/// when the repository cut with exactly the same.
pub const CHUNKER: &str = "fastcdc2020-16k-64k-256k";
/// Indexes and catalogs larger than this are refused unread (an index of
/// a 4 GiB artifact at the average chunk size is about 8 MiB).
pub const MAX_INDEX_BYTES: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error("the chunk index is {size} bytes, more than the {max}-byte limit")]
    TooLarge { size: usize, max: usize },
    #[error("the chunk index or catalog is malformed")]
    Parse(#[source] serde_json::Error),
    #[error("chunk index or catalog schema {0} is not supported (expected {SCHEMA})")]
    Schema(u32),
    #[error("the chunk index was cut by {found:?}; this node cuts with {CHUNKER:?}")]
    Chunker { found: String },
    #[error("invalid {what} {value:?}: expected 64 lowercase hex digits")]
    Hex { what: &'static str, value: String },
    #[error(
        "chunk {index} starts at {offset}, expected {expected} (chunks must tile the artifact)"
    )]
    Gap {
        index: usize,
        offset: u64,
        expected: u64,
    },
    #[error("chunk {index} is {length} bytes; chunks are 1..={MAX_CHUNK}")]
    Length { index: usize, length: u32 },
    #[error("the chunks cover {covered} bytes, the artifact is {size}")]
    Coverage { covered: u64, size: u64 },
    #[error("the catalog lists artifact {artifact} twice")]
    Duplicate { artifact: String },
    #[error("reading {what} to cut it into chunks")]
    Read {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// One chunk of an artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkRef {
    pub offset: u64,
    pub length: u32,
    /// SHA-256 of the chunk's bytes; the chunk is `chunks/<sha256>`.
    pub sha256: String,
}

impl ChunkRef {
    /// Repository-relative path of the chunk, derived from a checked hash.
    pub fn path(&self) -> String {
        format!("{CHUNKS_DIR}/{}", self.sha256)
    }
}

/// How one artifact is cut: stored as `objects/<sha256 of these bytes>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkIndex {
    pub schema: u32,
    pub chunker: String,
    /// Size and SHA-256 of the whole artifact.
    pub size: u64,
    pub sha256: String,
    pub chunks: Vec<ChunkRef>,
}

impl ChunkIndex {
    pub fn parse(bytes: &[u8]) -> Result<Self, ChunkError> {
        if bytes.len() > MAX_INDEX_BYTES {
            return Err(ChunkError::TooLarge {
                size: bytes.len(),
                max: MAX_INDEX_BYTES,
            });
        }
        let index: ChunkIndex = serde_json::from_slice(bytes).map_err(ChunkError::Parse)?;
        index.validate()?;
        Ok(index)
    }

    /// The chunks tile `0..size` in order, each 1..=MAX_CHUNK bytes.
    pub fn validate(&self) -> Result<(), ChunkError> {
        if self.schema != SCHEMA {
            return Err(ChunkError::Schema(self.schema));
        }
        if self.chunker != CHUNKER {
            return Err(ChunkError::Chunker {
                found: self.chunker.clone(),
            });
        }
        check_sha("artifact sha256", &self.sha256)?;
        let mut expected = 0u64;
        for (index, c) in self.chunks.iter().enumerate() {
            if c.offset != expected {
                return Err(ChunkError::Gap {
                    index,
                    offset: c.offset,
                    expected,
                });
            }
            if c.length == 0 || c.length > MAX_CHUNK {
                return Err(ChunkError::Length {
                    index,
                    length: c.length,
                });
            }
            check_sha("chunk sha256", &c.sha256)?;
            expected += u64::from(c.length);
        }
        if expected != self.size {
            return Err(ChunkError::Coverage {
                covered: expected,
                size: self.size,
            });
        }
        Ok(())
    }

    /// Canonical bytes (compact: an index has thousands of entries).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec(self).unwrap_or_default();
        out.push(b'\n');
        out
    }

    /// Repository-relative path of an index with SHA-256 `sha256`.
    pub fn object_path(sha256: &str) -> String {
        format!("{OBJECTS_DIR}/{sha256}")
    }
}

/// One catalog entry: the index of the artifact with SHA-256 `artifact`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexRef {
    pub artifact: String,
    pub index: String,
    pub index_size: u64,
}

/// `delta.json`: every chunk index in the repository, by artifact hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    pub schema: u32,
    pub indexes: Vec<IndexRef>,
}

impl Default for Catalog {
    fn default() -> Self {
        Catalog {
            schema: SCHEMA,
            indexes: Vec::new(),
        }
    }
}

impl Catalog {
    pub fn parse(bytes: &[u8]) -> Result<Self, ChunkError> {
        if bytes.len() > MAX_INDEX_BYTES {
            return Err(ChunkError::TooLarge {
                size: bytes.len(),
                max: MAX_INDEX_BYTES,
            });
        }
        let catalog: Catalog = serde_json::from_slice(bytes).map_err(ChunkError::Parse)?;
        if catalog.schema != SCHEMA {
            return Err(ChunkError::Schema(catalog.schema));
        }
        let mut seen = BTreeSet::new();
        for r in &catalog.indexes {
            check_sha("artifact sha256", &r.artifact)?;
            check_sha("index sha256", &r.index)?;
            if !seen.insert(r.artifact.as_str()) {
                return Err(ChunkError::Duplicate {
                    artifact: r.artifact.clone(),
                });
            }
        }
        Ok(catalog)
    }

    pub fn find(&self, artifact_sha256: &str) -> Option<&IndexRef> {
        self.indexes.iter().find(|r| r.artifact == artifact_sha256)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(self).unwrap_or_default();
        out.push(b'\n');
        out
    }
}

fn check_sha(what: &'static str, value: &str) -> Result<(), ChunkError> {
    if value.len() != 64
        || !value
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return Err(ChunkError::Hex {
            what,
            value: value.chars().take(80).collect(),
        });
    }
    Ok(())
}

/// Cuts `reader` into chunks with [`CHUNKER`], calling `each` with every
/// chunk's reference and bytes in order. Memory: one [`MAX_CHUNK`] buffer
/// plus the chunk handed to `each`.
pub fn cut<E>(
    reader: impl Read,
    what: &str,
    mut each: impl FnMut(ChunkRef, &[u8]) -> Result<(), E>,
) -> Result<(), E>
where
    E: From<ChunkError>,
{
    let cdc = fastcdc::v2020::StreamCDC::new(
        reader,
        MIN_CHUNK as usize,
        AVG_CHUNK as usize,
        MAX_CHUNK as usize,
    );
    for chunk in cdc {
        let chunk = chunk.map_err(|e| ChunkError::Read {
            what: what.to_owned(),
            source: std::io::Error::other(e.to_string()),
        })?;
        // Bounded by MAX_CHUNK, which fits u32.
        let length = u32::try_from(chunk.length).unwrap_or(u32::MAX);
        let r = ChunkRef {
            offset: chunk.offset,
            length,
            sha256: sha256_hex(&chunk.data),
        };
        each(r, &chunk.data)?;
    }
    Ok(())
}

/// Cuts `reader` (an artifact of `size` bytes with SHA-256 `sha256`) and
/// returns its index; `each` sees every chunk's bytes.
pub fn index<E>(
    reader: impl Read,
    what: &str,
    size: u64,
    sha256: &str,
    mut each: impl FnMut(&ChunkRef, &[u8]) -> Result<(), E>,
) -> Result<ChunkIndex, E>
where
    E: From<ChunkError>,
{
    let mut chunks = Vec::new();
    cut::<E>(reader, what, |r, bytes| {
        each(&r, bytes)?;
        chunks.push(r);
        Ok(())
    })?;
    let index = ChunkIndex {
        schema: SCHEMA,
        chunker: CHUNKER.to_owned(),
        size,
        sha256: sha256.to_owned(),
        chunks,
    };
    index.validate()?;
    Ok(index)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Pseudo-random bytes (xorshift), the same for the same seed.
    pub(crate) fn data(seed: u32, len: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(2_654_435_761) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x.to_le_bytes()[0]
            })
            .collect()
    }

    fn index_of(bytes: &[u8]) -> ChunkIndex {
        index::<ChunkError>(
            bytes,
            "test",
            bytes.len() as u64,
            &sha256_hex(bytes),
            |_, _| Ok(()),
        )
        .unwrap()
    }

    #[test]
    fn an_insertion_changes_only_nearby_chunks() {
        let old = data(1, 4 << 20);
        let mut new = old.clone();
        new.splice(2_000_000..2_000_000, data(2, 1000));
        let (a, b) = (index_of(&old), index_of(&new));
        let old_set: BTreeSet<&str> = a.chunks.iter().map(|c| c.sha256.as_str()).collect();
        let missing: u64 = b
            .chunks
            .iter()
            .filter(|c| !old_set.contains(c.sha256.as_str()))
            .map(|c| u64::from(c.length))
            .sum();
        assert!(b.chunks.len() > 30, "{} chunks", b.chunks.len());
        assert!(
            missing <= 3 * u64::from(MAX_CHUNK),
            "{missing} bytes differ"
        );
        assert!(missing > 0);
    }

    #[test]
    fn index_round_trips_and_bad_indexes_are_refused() {
        let bytes = data(3, 300_000);
        let idx = index_of(&bytes);
        assert_eq!(ChunkIndex::parse(&idx.to_bytes()).unwrap(), idx);
        let text = String::from_utf8(idx.to_bytes()).unwrap();
        let cases: Vec<(String, &str)> = vec![
            (text.replacen("\"schema\":1", "\"schema\":2", 1), "schema"),
            (text.replacen("fastcdc2020", "fastcdc2016", 1), "cut by"),
            (
                text.replacen("\"offset\":0", "\"offset\":1", 1),
                "starts at",
            ),
            (
                text.replacen("{\"schema\"", "{\"extra\":1,\"schema\"", 1),
                "malformed",
            ),
            (
                text.replacen(&format!("\"size\":{}", bytes.len()), "\"size\":1", 1),
                "cover",
            ),
            (text.replacen(&idx.chunks[0].sha256, "ab", 1), "hex"),
        ];
        for (bad, want) in cases {
            let err = ChunkIndex::parse(bad.as_bytes()).unwrap_err().to_string();
            assert!(err.contains(want), "{want}: {err}");
        }
    }

    #[test]
    fn catalog_refuses_duplicates_and_bad_hashes() {
        let r = IndexRef {
            artifact: "a".repeat(64),
            index: "b".repeat(64),
            index_size: 10,
        };
        let mut c = Catalog::default();
        c.indexes.push(r.clone());
        assert_eq!(Catalog::parse(&c.to_bytes()).unwrap(), c);
        c.indexes.push(r);
        assert!(matches!(
            Catalog::parse(&c.to_bytes()),
            Err(ChunkError::Duplicate { .. })
        ));
        c.indexes.truncate(1);
        c.indexes[0].index = "B".repeat(64);
        assert!(matches!(
            Catalog::parse(&c.to_bytes()),
            Err(ChunkError::Hex { .. })
        ));
    }
}
