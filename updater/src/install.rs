//! `check` and `apply`: fetch and verify the manifest, choose the release,
//! and install it into the inactive slot in the order of design.md §3,
//! each step durable before the next:
//!
//! 1. remove every Ballast entry but the running one (those pointing at the
//!    inactive slot first of all) and unreferenced kernel directories; fsync;
//! 2. stream `usr.img` into the inactive slot, hashing while writing
//!    (reading, hashing and writing overlap in three threads over a small
//!    fixed pool of buffers), resuming with HTTP Range; fsync; read back and
//!    hash again;
//! 3. write kernel and initrd under `ballast/<ver>/`; fsync;
//! 4. write `ballast-<ver>+3.conf` under a temporary name, fsync, rename,
//!    fsync the directory: the commit point.
//!
//! Delta updates (crate::delta): when the repository signs a chunk
//! catalog, step 2 assembles `usr.img` from chunks of the running slot (and
//! of what the inactive slot still holds, when the running slot has less
//! than half) plus the missing chunks, and
//! preflight copies a kernel or initrd identical to the running one from
//! the ESP and assembles a changed initrd from chunks. The whole artifact
//! is still hashed against the manifest; any failure on the delta path
//! falls back to the full download.
//!
//! Every refusal is decided before step 1 and changes nothing. Kernel and
//! initrd are downloaded and checked once, in preflight, and kept (see
//! [`STAGE_IN_MEMORY_MAX`]) until step 3 copies them to the ESP. The
//! lifecycle is the explicit [`InstallPhase`] machine.

use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::SystemTime;

use crate::digest::Sha256;
use serde::Serialize;

use crate::bootentry::{BootEntry, EntryName, ENTRIES_DIR};
use crate::chunks::Catalog;
use crate::cmdline::{BootParams, Slot};
use crate::delta::{self, DeltaError, DeltaStats, LocalChunks, LocalSource};
use crate::esp::{list_entries, running_entry, NodeLayout};
use crate::fetch::{Fetch, FetchError, ResumingReader};
use crate::keys::TrustedKeys;
use crate::manifest::{
    self, ManifestError, NodeFacts, Release, Selection, VerifiedManifest, MANIFEST_FILE,
    MAX_MANIFEST_BYTES, SIGNATURES_FILE,
};
use crate::payload::{Arch, Artifact, PayloadMetadata, Version, INITRD, KERNEL, USR_IMAGE};
use crate::state::{Event, EventKind, StateDir, StateError};
use crate::storage::{Storage, StorageError, WriteTarget};

/// Boots a new version gets before systemd-boot falls back.
pub const INITIAL_TRIES: u32 = 3;
/// Size of each buffer in the copy pipeline.
pub const COPY_BUFFER_BYTES: usize = 1 << 20;
/// Buffers in flight between reader, hasher and writer: the copy's whole
/// memory budget is this times [`COPY_BUFFER_BYTES`].
pub const COPY_BUFFERS: usize = 6;
/// Re-requests in a row without progress before a download fails.
pub const MAX_RESUMES: u32 = 8;
/// Kernel and initrd checked in preflight stay in memory until step 3 when
/// they are at most this big (one copy buffer), else they wait in a spool
/// file under [`STAGING_DIR`] on STATE. Real kernels and initrds are 8-30
/// MB each: holding them would multiply the install's memory (the copy
/// pipeline's [`COPY_BUFFERS`] MiB), while STATE is ext4 with room to spare
/// and, unlike the ESP, is not what the firmware boots from.
pub const STAGE_IN_MEMORY_MAX: u64 = COPY_BUFFER_BYTES as u64;
/// Spool directory for staged artifacts, under the node's state directory.
/// Its files live for one install; a crash leaves at most two, which the
/// next install overwrites.
pub const STAGING_DIR: &str = "staging";

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("the repository at {repo} has no {MANIFEST_FILE}")]
    NoManifest { repo: String },
    #[error("the running version {version} (entry {entry}) is not blessed yet; run `ballast update mark-good` once it is healthy")]
    NotBlessed { version: Version, entry: String },
    #[error("no boot entry on the ESP boots the running version {version} from slot {slot}")]
    RunningEntryMissing { version: Version, slot: Slot },
    #[error(
        "release {version}: usr.img is {size} bytes but slot {slot} ({path}) holds only {capacity}"
    )]
    PayloadTooLarge {
        version: Version,
        slot: Slot,
        path: PathBuf,
        size: u64,
        capacity: u64,
    },
    #[error("release {version}: downloading {artifact}")]
    Download {
        version: Version,
        artifact: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "release {version}: {artifact} is larger than the {expected} bytes the manifest signs"
    )]
    ArtifactTooLarge {
        version: Version,
        artifact: &'static str,
        expected: u64,
    },
    #[error("release {version}: {artifact} has sha256 {actual}, the manifest signs {expected}")]
    ArtifactHash {
        version: Version,
        artifact: &'static str,
        expected: String,
        actual: String,
    },
    #[error("release {version}: {path} read back with sha256 {actual}, {expected} was written")]
    ReadBack {
        version: Version,
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("install phase {from:?} cannot be followed by {to:?}")]
    Phase {
        from: InstallPhase,
        to: InstallPhase,
    },
    #[error("a copy thread panicked while installing {artifact}")]
    CopyThread { artifact: &'static str },
}

/// The install lifecycle; each phase is durable when it is entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum InstallPhase {
    /// Manifest verified, release chosen, every refusal checked.
    Preflighted,
    /// Step 1 done: only the running entry is left.
    InactiveEntriesRemoved,
    /// Step 2a: usr.img in the slot, hashed while written, fsynced.
    SlotWritten,
    /// Step 2b: the slot read back and hashed again.
    SlotVerified,
    /// Step 3: kernel and initrd under `ballast/<ver>/`, fsynced.
    KernelWritten,
    /// Step 4: the entry renamed into place; the commit point.
    Committed,
}

impl InstallPhase {
    fn next(self) -> Option<InstallPhase> {
        use InstallPhase::*;
        Some(match self {
            Preflighted => InactiveEntriesRemoved,
            InactiveEntriesRemoved => SlotWritten,
            SlotWritten => SlotVerified,
            SlotVerified => KernelWritten,
            KernelWritten => Committed,
            Committed => return None,
        })
    }
}

/// Progress of an install, for a terminal or a log.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub phase: InstallPhase,
    pub artifact: &'static str,
    pub done: u64,
    pub total: u64,
}

/// The node as the install sees it.
pub struct Node<'a> {
    pub storage: &'a dyn Storage,
    pub layout: &'a NodeLayout,
    pub arch: Arch,
    pub variant: String,
    /// The release channel the node follows.
    pub channel: String,
    pub now: SystemTime,
    /// `ballast.<key>=` configuration words of the running command line
    /// ([`crate::cmdline::config_words`]), carried into the new entry.
    pub config_words: Vec<String>,
}

impl std::fmt::Debug for Node<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("layout", &self.layout)
            .field("arch", &self.arch)
            .field("variant", &self.variant)
            .field("channel", &self.channel)
            .finish()
    }
}

/// Where updates come from and whom to believe.
pub struct Source<'a> {
    pub fetch: &'a dyn Fetch,
    pub trust: &'a TrustedKeys,
}

impl std::fmt::Debug for Source<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("repo", &self.fetch.describe())
            .finish()
    }
}

#[derive(Debug, Clone, Default)]
pub struct ApplyOptions {
    /// Install this version instead of the newest applicable one.
    pub version: Option<Version>,
    pub allow_downgrade: bool,
}

/// What `check` found.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub repo: String,
    pub sequence: u64,
    pub expires: String,
    pub signed_by: Vec<String>,
    pub running: Version,
    /// In JSON as `"decision"` (`install`, `up-to-date`, `waiting`) and,
    /// unless up to date, `"version"`, as before it was typed.
    #[serde(flatten)]
    pub decision: Decision,
    pub reason: String,
}

/// What `check` decided for this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "decision", content = "version", rename_all = "kebab-case")]
pub enum Decision {
    /// This release applies and should be installed.
    Install(Version),
    /// Nothing newer than the running version applies.
    UpToDate,
    /// This release exists but the node's rollout wave has not started.
    Waiting(Version),
}

impl Decision {
    pub fn name(&self) -> &'static str {
        match self {
            Decision::Install(_) => "install",
            Decision::UpToDate => "up-to-date",
            Decision::Waiting(_) => "waiting",
        }
    }

    /// The release the decision is about, if any.
    pub fn version(&self) -> Option<Version> {
        match self {
            Decision::Install(v) | Decision::Waiting(v) => Some(*v),
            Decision::UpToDate => None,
        }
    }
}

impl std::fmt::Display for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What `apply` did.
#[derive(Debug, Clone, Serialize)]
pub struct ApplyReport {
    pub check: CheckReport,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub installed: Option<Installed>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Installed {
    pub version: Version,
    pub slot: Slot,
    pub entry: String,
    pub bytes: u64,
    pub resumes: u32,
    /// Bytes of usr.img, kernel and initrd fetched from the repository,
    /// whole or as chunks.
    pub downloaded_bytes: u64,
    /// Bytes taken from what the node already held.
    pub reused_bytes: u64,
    /// True when usr.img was assembled from chunks.
    pub delta: bool,
}

/// Fetches `manifest.json` and its signatures and verifies them.
pub fn fetch_manifest(
    node: &Node<'_>,
    source: &Source<'_>,
) -> Result<VerifiedManifest, InstallError> {
    let bytes = source
        .fetch
        .get(MANIFEST_FILE, MAX_MANIFEST_BYTES)?
        .ok_or_else(|| InstallError::NoManifest {
            repo: source.fetch.describe(),
        })?;
    let sigs = source.fetch.get(SIGNATURES_FILE, MAX_MANIFEST_BYTES)?;
    let state = StateDir::new(node.storage, &node.layout.state_dir);
    Ok(manifest::verify(
        &bytes,
        sigs.as_deref(),
        source.trust,
        node.now,
        state.highest_sequence()?,
    )?)
}

fn decide(
    node: &Node<'_>,
    source: &Source<'_>,
    options: &ApplyOptions,
) -> Result<(VerifiedManifest, CheckReport, Option<Release>), InstallError> {
    let verified = fetch_manifest(node, source)?;
    let state = StateDir::new(node.storage, &node.layout.state_dir);
    let running = node.layout.running.version;
    let has_waves = verified
        .manifest
        .releases
        .iter()
        .any(|r| !r.waves.is_empty());
    let facts = NodeFacts {
        arch: node.arch,
        variant: node.variant.clone(),
        channel: node.channel.clone(),
        running,
        bucket: if has_waves { state.bucket()? } else { 0 },
        rejected: state.rejected()?,
    };
    let selection = manifest::select(
        &verified.manifest,
        &facts,
        options.version,
        options.allow_downgrade,
        node.now,
    )?;
    let m = &verified.manifest;
    let mut report = CheckReport {
        repo: source.fetch.describe(),
        sequence: m.sequence,
        expires: m.expires.clone(),
        signed_by: verified.signed_by.clone(),
        running,
        decision: Decision::UpToDate,
        reason: String::new(),
    };
    let release = match selection {
        Selection::Install(r) => {
            report.decision = Decision::Install(r.version());
            report.reason = format!(
                "release {} for {} {} is the newest applicable (running {running})",
                r.version(),
                node.arch,
                node.variant
            );
            Some(*r)
        }
        Selection::UpToDate { running } => {
            report.reason = format!("no release newer than the running {running} applies");
            if !facts.rejected.is_empty() {
                let rejected: Vec<String> =
                    facts.rejected.iter().map(ToString::to_string).collect();
                report.reason += &format!(
                    " (not retrying releases that failed here: {})",
                    rejected.join(", ")
                );
            }
            None
        }
        Selection::Waiting { version } => {
            report.decision = Decision::Waiting(version);
            report.reason = format!(
                "release {version} exists but this node's rollout wave (bucket {}) has not started",
                facts.bucket
            );
            None
        }
    };
    Ok((verified, report, release))
}

/// `ballast update check`: verify and decide, recording the manifest's
/// sequence number as seen.
pub fn check(
    node: &Node<'_>,
    source: &Source<'_>,
    options: &ApplyOptions,
) -> Result<CheckReport, InstallError> {
    let (verified, report, _) = decide(node, source, options)?;
    remember(node, &verified.manifest)?;
    Ok(report)
}

/// Keeps what a verified manifest tells the node for good: its sequence
/// (replay protection) and its release floor (honoured by rollbacks).
fn remember(node: &Node<'_>, manifest: &crate::manifest::Manifest) -> Result<(), InstallError> {
    let state = StateDir::new(node.storage, &node.layout.state_dir);
    state.raise_sequence(manifest.sequence)?;
    if let Some(floor) = manifest.floor {
        state.raise_floor(floor)?;
    }
    Ok(())
}

/// `ballast update apply`: check, then install the chosen release.
pub fn apply(
    node: &Node<'_>,
    source: &Source<'_>,
    options: &ApplyOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<ApplyReport, InstallError> {
    let (verified, check, release) = decide(node, source, options)?;
    let Some(release) = release else {
        remember(node, &verified.manifest)?;
        return Ok(ApplyReport {
            check,
            installed: None,
        });
    };
    let mut install = Install::preflight(node, source, &release)?;
    remember(node, &verified.manifest)?;
    let installed = install.run(progress)?;
    Ok(ApplyReport {
        check,
        installed: Some(installed),
    })
}

/// One install in progress.
pub struct Install<'a> {
    node: &'a Node<'a>,
    source: &'a Source<'a>,
    meta: &'a PayloadMetadata,
    target: Slot,
    phase: InstallPhase,
    resumes: std::cell::Cell<u32>,
    /// Kernel and initrd as preflight checked them.
    staged: Vec<(&'static str, Staged)>,
    /// The repository's verified chunk catalog; None: full downloads only.
    catalog: Option<Catalog>,
    /// Bytes fetched as whole artifacts.
    full_bytes: std::cell::Cell<u64>,
    /// What the delta path fetched and reused.
    delta_stats: std::cell::Cell<DeltaStats>,
    usr_from_chunks: bool,
}

/// An artifact whose bytes preflight checked, kept for step 3.
#[derive(Debug)]
enum Staged {
    Memory(Vec<u8>),
    /// Not fsynced: only this install reads it, from the page cache, and
    /// re-hashes what it reads.
    Spool(PathBuf),
}

/// Collects a small artifact in memory; [`Install::stage`] bounds it by
/// the signed size.
struct MemoryTarget(Vec<u8>);

impl WriteTarget for MemoryTarget {
    fn write_all(&mut self, buf: &[u8]) -> Result<(), StorageError> {
        self.0.extend_from_slice(buf);
        Ok(())
    }
    fn sync(&mut self) -> Result<(), StorageError> {
        Ok(())
    }
}

impl Drop for Install<'_> {
    /// Spool files never outlive their install, whatever ended it.
    fn drop(&mut self) {
        self.discard_staged();
    }
}

impl std::fmt::Debug for Install<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Install")
            .field("version", &self.meta.version)
            .field("target", &self.target)
            .field("phase", &self.phase)
            .finish()
    }
}

fn artifact<'m>(
    meta: &'m PayloadMetadata,
    name: &'static str,
) -> Result<&'m Artifact, InstallError> {
    meta.artifact(name)
        .ok_or(InstallError::Manifest(ManifestError::Release {
            version: meta.version,
            source: crate::payload::PayloadError::MissingArtifact(name),
        }))
}

impl<'a> Install<'a> {
    /// Every refusal that does not need the payload's bytes in place;
    /// changes nothing.
    pub fn preflight(
        node: &'a Node<'a>,
        source: &'a Source<'a>,
        release: &'a Release,
    ) -> Result<Self, InstallError> {
        let layout = node.layout;
        let meta = &release.payload;
        let running = &layout.running;
        let entries = list_entries(node.storage, &layout.esp)?;
        let current =
            running_entry(&entries, running).ok_or(InstallError::RunningEntryMissing {
                version: running.version,
                slot: running.slot,
            })?;
        if current.name.counter.is_some() {
            return Err(InstallError::NotBlessed {
                version: running.version,
                entry: current.file_name.clone(),
            });
        }
        let target = running.slot.other();
        let slot = layout.slot(target);
        let usr = artifact(meta, USR_IMAGE)?;
        let capacity = node.storage.size(&slot.path)?;
        if usr.size > capacity {
            return Err(InstallError::PayloadTooLarge {
                version: meta.version,
                slot: target,
                path: slot.path.clone(),
                size: usr.size,
                capacity,
            });
        }
        let mut install = Install {
            node,
            source,
            meta,
            target,
            phase: InstallPhase::Preflighted,
            resumes: std::cell::Cell::new(0),
            staged: Vec::new(),
            catalog: None,
            full_bytes: std::cell::Cell::new(0),
            delta_stats: std::cell::Cell::new(DeltaStats::default()),
            usr_from_chunks: false,
        };
        install.catalog = match delta::fetch_catalog(source.fetch, source.trust) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::info!(error = %e, "no usable chunk catalog; downloading whole artifacts");
                None
            }
        };
        // Kernel and initrd are small: check their bytes before touching
        // anything, so a corrupt object is refused with nothing changed,
        // and keep them for step 3 so each is downloaded once. On an error
        // the install is dropped, which removes what was spooled.
        for name in [KERNEL, INITRD] {
            let staged = install.stage(name, STAGE_IN_MEMORY_MAX)?;
            install.staged.push((name, staged));
        }
        Ok(install)
    }

    /// Frees what preflight kept. A spool file that cannot be removed is
    /// left for the next install to overwrite: not worth failing over.
    fn discard_staged(&mut self) {
        for (_, staged) in self.staged.drain(..) {
            if let Staged::Spool(path) = staged {
                if let Err(e) = self.node.storage.remove_file(&path) {
                    tracing::debug!(path = %path.display(), error = %e, "staged artifact not removed");
                }
            }
        }
    }

    /// Downloads and checks `name`, keeping it in memory when at most
    /// `in_memory_max` bytes, else in a spool file on STATE.
    fn stage(&self, name: &'static str, in_memory_max: u64) -> Result<Staged, InstallError> {
        let size = artifact(self.meta, name)?.size;
        if size <= in_memory_max {
            // At most in_memory_max bytes; a capacity hint only.
            let capacity = usize::try_from(size).unwrap_or(0);
            let mut bytes = MemoryTarget(Vec::with_capacity(capacity));
            if self.fetch_small_locally(name, &mut bytes).is_some() {
                return Ok(Staged::Memory(bytes.0));
            }
            let mut bytes = MemoryTarget(Vec::with_capacity(capacity));
            self.download(name, &mut bytes, &mut |_| {})?;
            return Ok(Staged::Memory(bytes.0));
        }
        let storage = self.node.storage;
        let dir = self.node.layout.state_dir.join(STAGING_DIR);
        storage.create_dir_all(&dir)?;
        let path = dir.join(name);
        let mut file = storage.create(&path)?;
        let local = self.fetch_small_locally(name, file.as_mut());
        drop(file);
        if local.is_some() {
            return Ok(Staged::Spool(path));
        }
        let mut file = storage.create(&path)?;
        let downloaded = self.download(name, file.as_mut(), &mut |_| {});
        drop(file);
        match downloaded {
            Ok(_) => Ok(Staged::Spool(path)),
            Err(e) => {
                if let Err(rm) = storage.remove_file(&path) {
                    tracing::debug!(path = %path.display(), error = %rm, "staged artifact not removed");
                }
                Err(e)
            }
        }
    }

    /// Kernel or initrd without the full download: copied from the running
    /// version's file on the ESP when it is identical, else (initrd) put
    /// together from its chunks. None: download it whole (the target may
    /// hold a partial write and must be recreated).
    fn fetch_small_locally(&self, name: &'static str, target: &mut dyn WriteTarget) -> Option<()> {
        let art = artifact(self.meta, name).ok()?;
        let layout = self.node.layout;
        let storage = self.node.storage;
        let running = layout.running.version;
        let local = if name == KERNEL {
            layout.kernel_path(running)
        } else {
            layout.initrd_path(running)
        };
        let local_size = storage.size(&local).ok();
        if local_size == Some(art.size)
            && hash_prefix(storage, &local, art.size).ok().as_ref() == Some(&art.sha256)
        {
            let copied = storage
                .open_read(&local)
                .map_err(|e| e.to_string())
                .and_then(|mut r| {
                    pipeline_copy(&mut r, target, art.size, &mut |_| {})
                        .map_err(|e| format!("{e:?}"))
                });
            match copied {
                Ok(digest) if digest == art.sha256 => {
                    tracing::info!(artifact = name, from = %local.display(), "identical to the running version's; copied, not downloaded");
                    self.add_delta(&DeltaStats {
                        reused_bytes: art.size,
                        ..DeltaStats::default()
                    });
                    return Some(());
                }
                other => {
                    tracing::info!(artifact = name, result = ?other.err(), "copy from the ESP failed; downloading");
                    return None;
                }
            }
        }
        if name != INITRD {
            return None;
        }
        let sources = local_size
            .map(|len| LocalSource { path: local, len })
            .into_iter()
            .collect::<Vec<_>>();
        match self.assemble(name, &sources, &[], target, &mut |_| {}) {
            Ok(()) => Some(()),
            Err(e) => {
                tracing::info!(artifact = name, error = %e, "delta path failed; downloading the whole artifact");
                None
            }
        }
    }

    /// Assembles artifact `name` from the chunks in `sources` and missing
    /// chunks from the repository, checked against the manifest's hash.
    /// `fallback` sources are indexed too (before `sources`) only when
    /// `sources` hold less than half of the artifact: scanning costs as
    /// much as hashing the bytes, and what the inactive slot holds beyond
    /// the running one is rarely worth it.
    fn assemble(
        &self,
        name: &'static str,
        sources: &[LocalSource],
        fallback: &[LocalSource],
        target: &mut dyn WriteTarget,
        progress: &mut dyn FnMut(u64),
    ) -> Result<(), DeltaError> {
        let art = artifact(self.meta, name).map_err(|_| DeltaError::NotInCatalog {
            artifact: name.to_owned(),
        })?;
        let catalog = self.catalog.as_ref().ok_or_else(|| DeltaError::NoCatalog {
            repo: self.source.fetch.describe(),
        })?;
        let index = delta::fetch_index(self.source.fetch, catalog, art)?;
        let storage = self.node.storage;
        let mut local = LocalChunks::scan(storage, sources, &index);
        if !fallback.is_empty() && local.coverage(&index).1 * 2 < index.size {
            let all: Vec<LocalSource> = fallback.iter().chain(sources).cloned().collect();
            local = LocalChunks::scan(storage, &all, &index);
        }
        let (have, have_bytes) = local.coverage(&index);
        tracing::info!(
            artifact = name,
            chunks = index.chunks.len(),
            local_chunks = have,
            local_bytes = have_bytes,
            scanned = local.scanned,
            "assembling from chunks"
        );
        if have == 0 {
            return Err(DeltaError::NothingToReuse {
                chunks: index.chunks.len(),
            });
        }
        let (digest, stats) =
            delta::assemble(storage, self.source.fetch, &index, &local, target, progress)?;
        // assemble() checked the index's hash, fetch_index() that it is
        // the manifest's; checked again here so the signed hash decides.
        if digest != art.sha256 {
            return Err(DeltaError::Assembled {
                expected: art.sha256.clone(),
                actual: digest,
            });
        }
        self.resumes.set(self.resumes.get() + stats.resumes);
        self.add_delta(&stats);
        tracing::info!(
            artifact = name,
            reused_bytes = stats.reused_bytes,
            downloaded_bytes = stats.downloaded_bytes,
            downloaded_chunks = stats.downloaded_chunks,
            "assembled from chunks"
        );
        Ok(())
    }

    fn add_delta(&self, stats: &DeltaStats) {
        let mut all = self.delta_stats.get();
        all.add(stats);
        self.delta_stats.set(all);
    }

    /// Step 2a: usr.img into the slot, from chunks when the repository has
    /// them, else (or when that fails) downloaded whole.
    fn write_usr(
        &mut self,
        slot_path: &Path,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<(Box<dyn WriteTarget>, String), InstallError> {
        let usr = artifact(self.meta, USR_IMAGE)?;
        let phase = self.phase;
        let total = usr.size;
        let mut report = |done| {
            progress(Progress {
                phase,
                artifact: USR_IMAGE,
                done,
                total,
            })
        };
        let storage = self.node.storage;
        if self.catalog.is_some() {
            let layout = self.node.layout;
            let running_slot = layout.slot(layout.running.slot).path.clone();
            let sources = [LocalSource {
                len: running_image_bound(layout, storage, &running_slot),
                path: running_slot,
            }];
            // What the inactive slot still holds; it is being
            // overwritten, so its chunks are re-hashed when used.
            let fallback = [LocalSource {
                path: slot_path.to_owned(),
                len: usr.size,
            }];
            let mut slot = storage.open_in_place(slot_path)?;
            let before = self.delta_stats.get();
            match self.assemble(USR_IMAGE, &sources, &fallback, slot.as_mut(), &mut report) {
                Ok(()) => {
                    self.usr_from_chunks = true;
                    return Ok((slot, usr.sha256.clone()));
                }
                Err(e) => {
                    self.delta_stats.set(before);
                    tracing::warn!(error = %e, "delta path failed; downloading the whole usr.img");
                }
            }
        }
        let mut slot = storage.open_in_place(slot_path)?;
        let written = self.download(USR_IMAGE, slot.as_mut(), &mut report)?;
        Ok((slot, written))
    }

    pub fn phase(&self) -> InstallPhase {
        self.phase
    }

    fn advance(&mut self, to: InstallPhase) -> Result<(), InstallError> {
        if self.phase.next() != Some(to) {
            return Err(InstallError::Phase {
                from: self.phase,
                to,
            });
        }
        tracing::info!(version = %self.meta.version, slot = %self.target, phase = ?to, "install phase reached");
        self.phase = to;
        Ok(())
    }

    /// Steps 1-4.
    pub fn run(&mut self, progress: &mut dyn FnMut(Progress)) -> Result<Installed, InstallError> {
        self.remove_inactive_entries()?;
        self.advance(InstallPhase::InactiveEntriesRemoved)?;
        let usr = artifact(self.meta, USR_IMAGE)?;
        let slot_path = self.node.layout.slot(self.target).path.clone();
        let started = std::time::Instant::now();
        let (mut slot, written) = self.write_usr(&slot_path, progress)?;
        // fsync and the read-back hash overlap: both must succeed before
        // step 3, and the read comes from the same (page-cached) bytes.
        let streamed = started.elapsed();
        let (synced, read_back) = std::thread::scope(|s| {
            let sync = s.spawn(move || slot.sync());
            let read_back = hash_prefix(self.node.storage, &slot_path, usr.size);
            (sync.join(), read_back)
        });
        tracing::info!(
            bytes = usr.size,
            streamed_ms = u64::try_from(streamed.as_millis()).unwrap_or(u64::MAX),
            synced_and_verified_ms =
                u64::try_from((started.elapsed() - streamed).as_millis()).unwrap_or(u64::MAX),
            "usr.img written"
        );
        synced.map_err(|_| InstallError::CopyThread {
            artifact: USR_IMAGE,
        })??;
        self.advance(InstallPhase::SlotWritten)?;
        let read_back = read_back?;
        if read_back != written {
            return Err(InstallError::ReadBack {
                version: self.meta.version,
                path: slot_path,
                expected: written,
                actual: read_back,
            });
        }
        self.advance(InstallPhase::SlotVerified)?;
        self.write_kernel()?;
        self.discard_staged();
        self.advance(InstallPhase::KernelWritten)?;
        let entry = self.commit_entry()?;
        self.advance(InstallPhase::Committed)?;
        let state = StateDir::new(self.node.storage, &self.node.layout.state_dir);
        state.record(&Event::new(
            EventKind::Install,
            self.meta.version,
            self.target,
            self.node.now,
            Some(format!("installed; boots next with {INITIAL_TRIES} tries")),
        ))?;
        Ok(Installed {
            version: self.meta.version,
            slot: self.target,
            entry,
            bytes: usr.size,
            resumes: self.resumes.get(),
            downloaded_bytes: self.full_bytes.get() + self.delta_stats.get().downloaded_bytes,
            reused_bytes: self.delta_stats.get().reused_bytes,
            delta: self.usr_from_chunks,
        })
    }

    /// Step 1: keep only the running entry, and only its kernel directory.
    fn remove_inactive_entries(&mut self) -> Result<(), InstallError> {
        let storage = self.node.storage;
        let layout = self.node.layout;
        let entries = list_entries(storage, &layout.esp)?;
        let keep = running_entry(&entries, &layout.running).map(|e| e.file_name.clone());
        let dir = layout.entries_dir();
        let mut removed = false;
        for e in &entries {
            if Some(&e.file_name) != keep.as_ref() {
                tracing::info!(entry = %e.file_name, slot = ?e.slot(), "removing boot entry before overwriting the inactive slot");
                storage.remove_file(&dir.join(&e.file_name))?;
                removed = true;
            }
        }
        if removed {
            storage.sync_dir(&dir)?;
        }
        let versions_dir = layout.esp.join("ballast");
        let running_dir = layout.running.version.to_string();
        let mut removed_dirs = false;
        for name in storage.list_dir(&versions_dir)? {
            if name != running_dir {
                storage.remove_dir_all(&versions_dir.join(&name))?;
                removed_dirs = true;
            }
        }
        if removed_dirs {
            storage.sync_dir(&versions_dir)?;
        }
        Ok(())
    }

    /// Step 3.
    fn write_kernel(&mut self) -> Result<(), InstallError> {
        let storage = self.node.storage;
        let layout = self.node.layout;
        let version = self.meta.version;
        let dir = layout.version_dir(version);
        storage.create_dir_all(&dir)?;
        for (name, path) in [
            (KERNEL, layout.kernel_path(version)),
            (INITRD, layout.initrd_path(version)),
        ] {
            let mut file = storage.create(&path)?;
            let written = self.write_staged(name, file.as_mut())?;
            file.sync()?;
            drop(file);
            let read_back = hash_prefix(storage, &path, artifact(self.meta, name)?.size)?;
            if read_back != written {
                return Err(InstallError::ReadBack {
                    version,
                    path,
                    expected: written,
                    actual: read_back,
                });
            }
        }
        storage.sync_dir(&dir)?;
        // The new directory's own name must be durable too.
        storage.sync_dir(crate::storage::parent(&dir))?;
        Ok(())
    }

    /// Step 4: the commit point.
    fn commit_entry(&mut self) -> Result<String, InstallError> {
        let storage = self.node.storage;
        let layout = self.node.layout;
        let slot = layout.slot(self.target);
        let mut extra_args = BootEntry::default_extra_args(self.meta.arch);
        for word in &self.node.config_words {
            extra_args.push(' ');
            extra_args.push_str(word);
        }
        let entry = BootEntry {
            params: BootParams::for_payload(self.meta, self.target, slot.partuuid),
            extra_args,
        };
        let name = EntryName::on_trial(self.meta.version, INITIAL_TRIES).to_string();
        let dir = layout.esp.join(ENTRIES_DIR);
        storage.create_dir_all(&dir)?;
        // Not *.conf: systemd-boot must never see a half-written entry.
        let tmp = dir.join(format!(".{}.tmp", EntryName::blessed(self.meta.version)));
        let mut file = storage.create(&tmp)?;
        file.write_all(entry.render().as_bytes())?;
        file.sync()?;
        drop(file);
        storage.rename(&tmp, &dir.join(&name))?;
        storage.sync_dir(&dir)?;
        Ok(name)
    }

    /// Copies what preflight staged for `name` into `target`, hashing it
    /// again; returns the hex SHA-256 of what was written.
    fn write_staged(
        &self,
        name: &'static str,
        target: &mut dyn WriteTarget,
    ) -> Result<String, InstallError> {
        let size = artifact(self.meta, name)?.size;
        let staged = self.staged.iter().find(|(n, _)| *n == name).map(|(_, s)| s);
        let digest = match staged {
            Some(Staged::Memory(bytes)) => {
                let mut reader = bytes.as_slice();
                pipeline_copy(&mut reader, target, size, &mut |_| {})
                    .map_err(|e| self.copy_error(name, e))?
            }
            Some(Staged::Spool(path)) => {
                let mut reader = self.node.storage.open_read(path)?;
                pipeline_copy(&mut reader, target, size, &mut |_| {}).map_err(|e| match e {
                    CopyError::Read(source) => {
                        InstallError::Storage(StorageError::io("reading", path, source))
                    }
                    other => self.copy_error(name, other),
                })?
            }
            // Every install is preflighted; should that change, fetch it.
            None => return self.download(name, target, &mut |_| {}),
        };
        self.check_digest(name, digest)
    }

    /// Streams one artifact from the repository into `target`, checking
    /// size and hash; returns the hex SHA-256 of what was written.
    fn download(
        &self,
        name: &'static str,
        target: &mut dyn WriteTarget,
        progress: &mut dyn FnMut(u64),
    ) -> Result<String, InstallError> {
        let art = artifact(self.meta, name)?;
        let path = Release::object_path(&art.sha256);
        let mut reader = ResumingReader::new(self.source.fetch, &path, art.size, MAX_RESUMES);
        let digest = pipeline_copy(&mut reader, target, art.size, progress)
            .map_err(|e| self.copy_error(name, e))?;
        self.resumes.set(self.resumes.get() + reader.resumes);
        self.full_bytes.set(self.full_bytes.get() + art.size);
        if reader.has_trailing_bytes() {
            return Err(InstallError::ArtifactTooLarge {
                version: self.meta.version,
                artifact: name,
                expected: art.size,
            });
        }
        self.check_digest(name, digest)
    }

    fn copy_error(&self, name: &'static str, e: CopyError) -> InstallError {
        match e {
            CopyError::Read(source) => InstallError::Download {
                version: self.meta.version,
                artifact: name,
                source,
            },
            CopyError::Write(e) => InstallError::Storage(e),
            CopyError::Thread => InstallError::CopyThread { artifact: name },
        }
    }

    /// The digest the manifest signs for `name`, or the refusal.
    fn check_digest(&self, name: &'static str, digest: String) -> Result<String, InstallError> {
        let expected = &artifact(self.meta, name)?.sha256;
        if &digest != expected {
            return Err(InstallError::ArtifactHash {
                version: self.meta.version,
                artifact: name,
                expected: expected.clone(),
                actual: digest,
            });
        }
        Ok(digest)
    }
}

impl Install<'_> {
    /// Re-requests made while streaming usr.img.
    pub fn resumes(&self) -> u32 {
        self.resumes.get()
    }
}

/// How much of the running slot to index: its verity data plus a generous
/// bound on the hash tree (under 1/127 of the data for SHA-256 in 4 KiB
/// blocks) and superblock, never past the device.
fn running_image_bound(layout: &NodeLayout, storage: &dyn Storage, path: &Path) -> u64 {
    let verity = layout.running.verity();
    let data = verity
        .data_blocks
        .saturating_mul(u64::from(verity.data_block_size));
    let bound = data.saturating_add(data / 64).saturating_add(1 << 20);
    storage.size(path).map_or(bound, |size| size.min(bound))
}

/// SHA-256 of the first `len` bytes of a file or device.
pub fn hash_prefix(storage: &dyn Storage, path: &Path, len: u64) -> Result<String, StorageError> {
    let reader = storage.open_read(path)?;
    let mut reader = reader.take(len);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; COPY_BUFFER_BYTES];
    let mut total = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(StorageError::io("reading back", path, e)),
        };
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    if total < len {
        return Err(StorageError::io(
            "reading back",
            path,
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("only {total} of {len} bytes"),
            ),
        ));
    }
    Ok(hasher.finish_hex())
}

#[derive(Debug)]
pub enum CopyError {
    Read(io::Error),
    Write(StorageError),
    Thread,
}

/// Copies exactly `len` bytes from `reader` to `target` and returns their
/// SHA-256. Reading (this thread), hashing and writing (one thread each)
/// overlap; buffers circulate reader -> hasher -> writer -> reader, so
/// memory stays at [`COPY_BUFFERS`] x [`COPY_BUFFER_BYTES`] and no byte is
/// copied twice.
pub fn pipeline_copy(
    reader: &mut dyn Read,
    target: &mut dyn WriteTarget,
    len: u64,
    progress: &mut dyn FnMut(u64),
) -> Result<String, CopyError> {
    let (to_hasher, hasher_rx) = mpsc::sync_channel::<(Vec<u8>, usize)>(COPY_BUFFERS);
    let (to_writer, writer_rx) = mpsc::sync_channel::<(Vec<u8>, usize)>(COPY_BUFFERS);
    let (to_reader, free_rx) = mpsc::sync_channel::<Vec<u8>>(COPY_BUFFERS);
    for _ in 0..COPY_BUFFERS {
        // Cannot fail: the channel holds exactly COPY_BUFFERS and is empty.
        let _ = to_reader.send(vec![0u8; COPY_BUFFER_BYTES]);
    }
    std::thread::scope(|s| {
        let hasher = s.spawn(move || {
            let mut hasher = Sha256::new();
            for (buf, n) in hasher_rx {
                hasher.update(&buf[..n]);
                if to_writer.send((buf, n)).is_err() {
                    break;
                }
            }
            hasher.finish_hex()
        });
        let writer = s.spawn(move || -> Result<(), StorageError> {
            for (buf, n) in writer_rx {
                target.write_all(&buf[..n])?;
                // The reader may have finished; a closed return path is fine.
                let _ = to_reader.send(buf);
            }
            Ok(())
        });
        let mut done = 0u64;
        let mut read_result = Ok(());
        while done < len {
            let Ok(mut buf) = free_rx.recv() else {
                break; // the writer stopped: its error is reported below
            };
            let want = usize::try_from(len - done)
                .unwrap_or(usize::MAX)
                .min(COPY_BUFFER_BYTES);
            let mut filled = 0;
            while filled < want {
                match reader.read(&mut buf[filled..want]) {
                    Ok(0) => {
                        read_result = Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("stream ended at byte {} of {len}", done + filled as u64),
                        ));
                        break;
                    }
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        read_result = Err(e);
                        break;
                    }
                }
            }
            if read_result.is_err() {
                break;
            }
            done += filled as u64;
            if to_hasher.send((buf, filled)).is_err() {
                break;
            }
            progress(done);
        }
        drop(to_hasher);
        let digest = hasher.join().map_err(|_| CopyError::Thread)?;
        writer
            .join()
            .map_err(|_| CopyError::Thread)?
            .map_err(CopyError::Write)?;
        read_result.map_err(CopyError::Read)?;
        Ok(digest)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    #[test]
    fn pipeline_copy_hashes_and_writes_everything() {
        let data: Vec<u8> = (0..(3 * COPY_BUFFER_BYTES + 17))
            .map(|i| u8::try_from(i % 253).unwrap())
            .collect();
        let fs = MemStorage::new();
        fs.create_dir_all(Path::new("/x")).unwrap();
        let mut w = fs.create(Path::new("/x/f")).unwrap();
        let mut calls = 0;
        let digest = pipeline_copy(&mut &data[..], w.as_mut(), data.len() as u64, &mut |_| {
            calls += 1
        })
        .unwrap();
        assert_eq!(digest, crate::digest::sha256_hex(&data));
        assert_eq!(fs.read(Path::new("/x/f")).unwrap(), data);
        assert_eq!(calls, 4);
    }

    #[test]
    fn pipeline_copy_reports_a_short_stream() {
        let data = [1u8; 100];
        let fs = MemStorage::new();
        fs.create_dir_all(Path::new("/x")).unwrap();
        let mut w = fs.create(Path::new("/x/f")).unwrap();
        assert!(matches!(
            pipeline_copy(&mut &data[..], w.as_mut(), 200, &mut |_| {}),
            Err(CopyError::Read(_))
        ));
    }

    #[test]
    fn phases_only_move_forward_one_at_a_time() {
        assert_eq!(
            InstallPhase::Preflighted.next(),
            Some(InstallPhase::InactiveEntriesRemoved)
        );
        assert_eq!(InstallPhase::Committed.next(), None);
    }

    #[test]
    fn a_check_report_keeps_its_json_shape() {
        let v: Version = "1.2.0".parse().unwrap();
        let report = |decision| CheckReport {
            repo: "r".into(),
            sequence: 1,
            expires: "e".into(),
            signed_by: vec![],
            running: "1.1.0".parse().unwrap(),
            decision,
            reason: "why".into(),
        };
        let json = serde_json::to_value(report(Decision::Install(v))).unwrap();
        assert_eq!(json["decision"], "install");
        assert_eq!(json["version"], "1.2.0");
        let json = serde_json::to_value(report(Decision::Waiting(v))).unwrap();
        assert_eq!(json["decision"], "waiting");
        assert_eq!(json["version"], "1.2.0");
        let json = serde_json::to_value(report(Decision::UpToDate)).unwrap();
        assert_eq!(json["decision"], "up-to-date");
        assert!(json.get("version").is_none(), "{json}");
        assert_eq!(Decision::UpToDate.to_string(), "up-to-date");
    }
}
