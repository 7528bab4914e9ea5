//! The `update-delta` scenario: 1.0.0 updates to a 1.1.0 whose only
//! change is the agent ([`AGENT_RELEASE`], built by `vm-test` with a
//! differing agent binary), from a repository cut into chunks. The
//! repository server's request log is checked against the chunk indexes
//! of both releases: every byte the node asked for belongs to a chunk
//! 1.0.0 does not have, every such chunk (but all-zero ones, which the
//! node may find in its empty slot) was asked for, nothing was downloaded
//! whole, and the unchanged kernel was not downloaded at all.

use std::collections::BTreeSet;
use std::path::Path;

use ballast_updater::chunks::{Catalog, ChunkIndex, CATALOG_FILE};
use ballast_updater::digest::sha256_hex;
use ballast_updater::payload::PayloadMetadata;

use crate::scenarios::{Context, ScenarioError};

use super::fixture::{Releases, TestRepo};
use super::scenarios::{ready, update_cycle, user_data, vm_with_repo, UNHAPPY};
use super::server::{RepoServer, Served};
use super::UpdateError;

/// The release of the delta scenario, beside the test image: 1.1.0 with
/// an agent binary that differs from 1.0.0's (xtask vm-test builds it).
pub const AGENT_RELEASE: &str = "agent-delta/1.1.0";

fn setup_err(what: String) -> UpdateError {
    UpdateError::Delta(what)
}

fn meta(payload: &Path) -> Result<PayloadMetadata, UpdateError> {
    PayloadMetadata::load(payload)
        .map_err(|e| setup_err(format!("reading {}: {e}", payload.display())))
}

/// The chunk index the repository's catalog lists for `sha256`.
fn index(repo: &Path, catalog: &Catalog, sha256: &str) -> Result<ChunkIndex, UpdateError> {
    let entry = catalog
        .find(sha256)
        .ok_or_else(|| setup_err(format!("{CATALOG_FILE} has no index for {sha256}")))?;
    let path = repo.join(ChunkIndex::object_path(&entry.index));
    let bytes =
        std::fs::read(&path).map_err(|e| setup_err(format!("reading {}: {e}", path.display())))?;
    ChunkIndex::parse(&bytes).map_err(|e| setup_err(format!("{}: {e}", path.display())))
}

/// What the log shows of one artifact: the indexes (into `new`) of the
/// chunks the ranged requests covered, and whether it was fetched whole.
fn fetched(log: &[Served], new: &ChunkIndex) -> (BTreeSet<usize>, bool) {
    let path = format!("/{}", ChunkIndex::object_path(&new.sha256));
    let mut chunks = BTreeSet::new();
    let mut whole = false;
    for s in log.iter().filter(|s| s.path == path && s.method == "GET") {
        let Some(a) = s.range_start else {
            whole = true;
            continue;
        };
        let b = s.range_end.unwrap_or(u64::MAX);
        for (i, c) in new.chunks.iter().enumerate() {
            let end = c.offset + u64::from(c.length) - 1;
            if c.offset <= b && end >= a {
                chunks.insert(i);
            }
        }
    }
    (chunks, whole)
}

/// Checks one artifact's requests against both indexes; returns a line
/// for the progress log.
fn check(name: &str, log: &[Served], old: &ChunkIndex, new: &ChunkIndex) -> Result<String, String> {
    let have: BTreeSet<&str> = old.chunks.iter().map(|c| c.sha256.as_str()).collect();
    let missing: BTreeSet<usize> = (0..new.chunks.len())
        .filter(|&i| !have.contains(new.chunks[i].sha256.as_str()))
        .collect();
    let (got, whole) = fetched(log, new);
    if whole {
        return Err(format!("{name} was downloaded whole"));
    }
    // The last chunk ends at the image's end, where a slot goes on: the
    // node may not find it by cutting the slot (it probes the same offset
    // only), so fetching it is allowed even when 1.0.0 has it elsewhere.
    let last = new.chunks.len().saturating_sub(1);
    if let Some(extra) = got.difference(&missing).find(|&&i| i != last) {
        let c = &new.chunks[*extra];
        return Err(format!(
            "{name}: chunk {extra} (bytes {}+{}) was fetched although 1.0.0 has it",
            c.offset, c.length
        ));
    }
    let zero = |i: &usize| {
        let c = &new.chunks[*i];
        sha256_hex(&vec![0u8; c.length as usize]) == c.sha256
    };
    if let Some(lost) = missing.difference(&got).find(|i| !zero(i)) {
        return Err(format!(
            "{name}: chunk {lost} is new in 1.1.0 but was never fetched"
        ));
    }
    let bytes: u64 = got.iter().map(|&i| u64::from(new.chunks[i].length)).sum();
    let requests = log
        .iter()
        .filter(|s| s.path == format!("/{}", ChunkIndex::object_path(&new.sha256)))
        .count();
    Ok(format!(
        "{name}: {} of {} chunks fetched ({bytes} of {} bytes) in {requests} ranged request(s)",
        got.len(),
        new.chunks.len(),
        new.size
    ))
}

/// Scenario `update-delta`.
pub fn delta(ctx: &Context) -> Result<(), ScenarioError> {
    let run = || -> Result<(), UpdateError> {
        let releases = Releases::beside(&ctx.image.dir)?;
        let base = releases.payload("1.0.0")?;
        let next = releases.payload(AGENT_RELEASE)?;
        let (m0, m1) = (meta(&base)?, meta(&next)?);
        let changed: Vec<&str> = m1
            .artifacts
            .iter()
            .filter(|a| m0.artifact(&a.name).map(|b| &b.sha256) != Some(&a.sha256))
            .map(|a| a.name.as_str())
            .collect();
        let repo = TestRepo::new(releases.key()?)?;
        repo.add_chunked(&base)?;
        repo.add_chunked(&next)?;
        let seq = repo.sign()?;
        let server = RepoServer::start(repo.path())?;
        eprintln!(
            "  [{}] chunked repository {} (sequence {seq}) on 127.0.0.1:{}; changed artifacts: {changed:?}",
            ctx.arch,
            repo.path().display(),
            server.port()
        );
        let ud = user_data("immediate", "60s", "")?;
        let mut vm = vm_with_repo(ctx, &server, "update-delta", &ud).spawn()?;
        ready(&mut vm, ctx, "1.0.0", "a")?;
        update_cycle(&mut vm, ctx, "1.1.0", "b", UNHAPPY)?;

        let catalog_path = repo.path().join(CATALOG_FILE);
        let catalog = std::fs::read(&catalog_path)
            .map_err(|e| setup_err(e.to_string()))
            .and_then(|b| Catalog::parse(&b).map_err(|e| setup_err(e.to_string())))?;
        let log = server.log();
        if log.iter().any(|s| s.path.starts_with("/chunks/")) {
            return Err(vm
                .fail("the node fetched chunk files, not ranges of the objects")
                .into());
        }
        for name in ["usr.img", "initrd", "vmlinuz"] {
            let (Some(a0), Some(a1)) = (m0.artifact(name), m1.artifact(name)) else {
                return Err(vm.fail(format!("a release has no {name}")).into());
            };
            if a0.sha256 == a1.sha256 {
                // Unchanged: copied from the node, never requested.
                let path = format!("/{}", ChunkIndex::object_path(&a1.sha256));
                if server.count(&path) > 0 {
                    return Err(vm
                        .fail(format!("{name} is unchanged but was downloaded"))
                        .into());
                }
                vm.progress(&format!("{name}: unchanged, not requested"));
                continue;
            }
            let old = index(repo.path(), &catalog, &a0.sha256)?;
            let new = index(repo.path(), &catalog, &a1.sha256)?;
            let line = check(name, &log, &old, &new).map_err(|e| vm.fail(e))?;
            vm.progress(&line);
        }
        Ok(())
    };
    run().map_err(ScenarioError::from)
}
