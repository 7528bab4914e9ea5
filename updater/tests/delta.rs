//! Delta updates over real HTTP on 127.0.0.1: the server's request log
//! shows that only missing chunks are fetched (one range per run of
//! them), a dropped range resumes, and any failure on the delta path falls back to the full
//! download.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::collections::BTreeSet;

use ballast_updater::chunks::{Catalog, ChunkIndex};
use ballast_updater::http::HttpFetch;
use ballast_updater::install::{ApplyOptions, Installed};
use ballast_updater::payload::Arch;
use ballast_updater::storage::Storage;
use common::server::{Cut, Request, Server};
use common::*;

fn serve(root: std::path::PathBuf) -> (std::sync::Arc<Server>, String) {
    Server::start(root)
}

/// The closed byte ranges of the runs of consecutive chunks of `new` that
/// `old` does not hold: what a node holding `old` must ask for.
/// Applies `repo`'s newest release to `node` over HTTP from `url`; what
/// was installed (the test fails if nothing was).
fn install_from(node: &TestNode, repo: &Repo, url: &str) -> Installed {
    node.apply_with(
        &HttpFetch::new(url).unwrap(),
        &repo.trust(),
        &ApplyOptions::default(),
    )
    .unwrap()
    .installed
    .unwrap()
}

fn missing_runs(old: &ChunkIndex, new: &ChunkIndex) -> Vec<(u64, u64)> {
    let have: BTreeSet<&str> = old.chunks.iter().map(|c| c.sha256.as_str()).collect();
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for c in &new.chunks {
        if have.contains(c.sha256.as_str()) {
            continue;
        }
        let end = c.offset + u64::from(c.length) - 1;
        match runs.last_mut() {
            Some(r) if r.1 + 1 == c.offset => r.1 = end,
            _ => runs.push((c.offset, end)),
        }
    }
    runs
}

/// The ranges asked of `objects/<sha>`; a whole-file request is `None`.
fn ranges_of(log: &[Request], sha: &str) -> Vec<Option<(u64, Option<u64>)>> {
    let path = format!("objects/{sha}");
    log.iter()
        .filter(|r| r.path == path)
        .map(|r| r.range)
        .collect()
}

fn index_of(repo: &Repo, artifact_sha: &str) -> ChunkIndex {
    let catalog = Catalog::parse(&std::fs::read(repo.path().join("delta.json")).unwrap()).unwrap();
    let r = catalog.find(artifact_sha).unwrap();
    ChunkIndex::parse(&std::fs::read(repo.object(&r.index)).unwrap()).unwrap()
}

#[test]
fn only_missing_chunks_are_fetched_and_unchanged_kernel_and_initrd_are_copied() {
    let v1 = payload("1.0.0", Arch::X86_64, "base", 1);
    let v2 = derived(&v1, "1.1.0", 700_000, 2000, 2, false);
    let repo = Repo::new(&[&v1, &v2]);
    let (server, url) = serve(repo.path());
    let node = TestNode::new(&v1);
    let installed = install_from(&node, &repo, &url);
    assert!(installed.delta, "{installed:?}");
    let slot = node.fs.read(&node.layout.slot_b.path).unwrap();
    assert_eq!(&slot[..v2.usr.len()], &v2.usr[..]);

    // Exactly the chunks of v2's usr.img that v1's does not have, one
    // ranged request per run of them, from the whole object.
    let usr_sha = &v2.meta.artifact("usr.img").unwrap().sha256;
    let old = index_of(&repo, &v1.meta.artifact("usr.img").unwrap().sha256);
    let new = index_of(&repo, usr_sha);
    let runs = missing_runs(&old, &new);
    assert!(!runs.is_empty() && runs.len() <= 3, "{runs:?}");
    let log = server.requests();
    let asked = ranges_of(&log, usr_sha);
    let want: Vec<_> = runs.iter().map(|&(a, b)| Some((a, Some(b)))).collect();
    assert_eq!(asked, want, "log: {log:?}");
    // No chunk file and no whole artifact was downloaded.
    assert!(
        !log.iter().any(|r| r.path.starts_with("chunks/")),
        "{log:?}"
    );
    for a in &v2.meta.artifacts {
        assert!(
            !ranges_of(&log, &a.sha256).contains(&None),
            "{} fetched whole: {log:?}",
            a.name
        );
    }
    let missing_bytes: u64 = runs.iter().map(|(a, b)| b + 1 - a).sum();
    assert_eq!(installed.downloaded_bytes, missing_bytes);
    assert_eq!(
        installed.reused_bytes + installed.downloaded_bytes,
        v2.meta.artifacts.iter().map(|a| a.size).sum::<u64>()
    );
}

#[test]
fn a_dropped_chunk_download_resumes_with_range() {
    let v1 = payload("1.0.0", Arch::X86_64, "base", 1);
    let v2 = derived(&v1, "1.1.0", 300_000, 2000, 3, true);
    let repo = Repo::new(&[&v1, &v2]);
    let usr_sha = v2.meta.artifact("usr.img").unwrap().sha256.clone();
    let old = index_of(&repo, &v1.meta.artifact("usr.img").unwrap().sha256);
    let first_run = missing_runs(&old, &index_of(&repo, &usr_sha))[0];
    let (server, url) = serve(repo.path());
    *server.cut.lock().unwrap() = Some(Cut {
        path: usr_sha.clone(),
        at: first_run.0 + 5000,
        times: 1,
    });
    let node = TestNode::new(&v1);
    let installed = install_from(&node, &repo, &url);
    assert!(installed.delta);
    assert!(installed.resumes >= 1, "{installed:?}");
    // The run was asked for, cut, and asked for again from where it broke.
    let log = server.requests();
    let asked = ranges_of(&log, &usr_sha);
    assert_eq!(asked[0], Some((first_run.0, Some(first_run.1))), "{log:?}");
    assert_eq!(
        asked[1],
        Some((first_run.0 + 5000, Some(first_run.1))),
        "{log:?}"
    );
    // The new kernel is downloaded whole; the unchanged initrd is not.
    assert_eq!(
        ranges_of(&log, &v2.meta.artifact("vmlinuz").unwrap().sha256),
        [None]
    );
    assert!(ranges_of(&log, &v2.meta.artifact("initrd").unwrap().sha256).is_empty());
    assert_eq!(
        node.fs
            .read(&node.layout.kernel_path(v2.version()))
            .unwrap(),
        v2.kernel
    );
}

#[test]
fn any_failure_on_the_delta_path_falls_back_to_the_full_download() {
    let v1 = payload("1.0.0", Arch::X86_64, "base", 1);
    let v2 = derived(&v1, "1.1.0", 700_000, 2000, 2, false);
    type Break = fn(&Repo, &Payload);
    let breakages: [(&str, Break); 4] = [
        ("a missing chunk index", |repo, v2| {
            let catalog =
                Catalog::parse(&std::fs::read(repo.path().join("delta.json")).unwrap()).unwrap();
            let r = catalog
                .find(&v2.meta.artifact("usr.img").unwrap().sha256)
                .unwrap();
            std::fs::remove_file(repo.object(&r.index)).unwrap();
        }),
        ("an unsigned catalog", |repo, _| {
            std::fs::remove_file(repo.path().join("delta.json.sig")).unwrap();
        }),
        ("a catalog signed by another key", |repo, _| {
            let other = ballast_updater::keys::SecretKey::from_seed([9; 32]);
            let bytes = std::fs::read(repo.path().join("delta.json")).unwrap();
            let sig = serde_json::json!([{
                "key_id": other.key_id(),
                "signature": hex::encode(other.sign(&bytes)),
            }]);
            std::fs::write(repo.path().join("delta.json.sig"), sig.to_string()).unwrap();
        }),
        ("a tampered index", |repo, v2| {
            let catalog =
                Catalog::parse(&std::fs::read(repo.path().join("delta.json")).unwrap()).unwrap();
            let r = catalog
                .find(&v2.meta.artifact("usr.img").unwrap().sha256)
                .unwrap();
            let path = repo.object(&r.index);
            let mut bytes = std::fs::read(&path).unwrap();
            let at = bytes.len() / 2;
            bytes[at] ^= 1;
            std::fs::write(path, bytes).unwrap();
        }),
    ];
    for (what, break_it) in breakages {
        let repo = Repo::new(&[&v1, &v2]);
        break_it(&repo, &v2);
        // The start of slot A is damaged too, so the first chunk must be
        // downloaded; the rest could be reused.
        let node = TestNode::new(&v1);
        let mut slot_a = node.fs.read(&node.layout.slot_a.path).unwrap();
        for b in &mut slot_a[..4096] {
            *b = !*b;
        }
        node.fs.put(&node.layout.slot_a.path, &slot_a);
        let (server, url) = serve(repo.path());
        let installed = node
            .apply_with(
                &HttpFetch::new(&url).unwrap(),
                &repo.trust(),
                &ApplyOptions::default(),
            )
            .unwrap_or_else(|e| panic!("{what}: {e}"))
            .installed
            .unwrap();
        assert!(!installed.delta, "{what}: {installed:?}");
        let slot = node.fs.read(&node.layout.slot_b.path).unwrap();
        assert_eq!(&slot[..v2.usr.len()], &v2.usr[..], "{what}");
        let log = server.requests();
        assert!(
            ranges_of(&log, &v2.meta.artifact("usr.img").unwrap().sha256).contains(&None),
            "{what}: {log:?}"
        );
    }
}

#[test]
fn the_manifest_of_a_chunked_repository_is_what_old_nodes_read() {
    let v1 = payload("1.0.0", Arch::X86_64, "base", 1);
    let full = Repo::full_only(&[&v1]);
    let cut = Repo::new(&[&v1]);
    let read = |r: &Repo| {
        let m = ballast_updater::manifest::Manifest::parse(
            &std::fs::read(r.path().join("manifest.json")).unwrap(),
        )
        .unwrap();
        (m.schema, m.releases)
    };
    // Same schema, same releases: chunking adds files, never fields.
    assert_eq!(read(&full), read(&cut));
    assert_eq!(read(&cut).0, 1);
    assert!(!full.path().join("delta.json").exists());
    let report =
        ballast_updater::repo::verify(&cut.path(), &cut.trust(), std::time::SystemTime::now())
            .unwrap();
    assert_eq!(report.indexes_checked, 2);
    assert!(report.chunks_checked > 5, "{report:?}");
}

#[test]
fn the_inactive_slot_is_indexed_only_when_the_running_one_holds_too_little() {
    let v1 = payload("1.0.0", Arch::X86_64, "base", 1);
    let v2 = derived(&v1, "1.1.0", 700_000, 2000, 2, false);
    let repo = Repo::new(&[&v1, &v2]);
    let usr_sha = v2.meta.artifact("usr.img").unwrap().sha256.clone();
    let apply = |node: &TestNode| {
        let (server, url) = serve(repo.path());
        let installed = install_from(node, &repo, &url);
        let asked: u64 = ranges_of(&server.requests(), &usr_sha)
            .into_iter()
            .map(|r| {
                let (a, b) = r.unwrap();
                b.unwrap() + 1 - a
            })
            .sum();
        (installed, asked)
    };

    // Slot A (running) mostly overwritten, slot B still holding v1: the
    // node falls back to indexing slot B and downloads only the change.
    let node = TestNode::new(&v1);
    let mut slot_a = node.fs.read(&node.layout.slot_a.path).unwrap();
    for b in &mut slot_a[..v1.usr.len() * 3 / 4] {
        *b = !*b;
    }
    node.fs.put(&node.layout.slot_a.path, &slot_a);
    let mut slot_b = node.fs.read(&node.layout.slot_b.path).unwrap();
    slot_b[..v1.usr.len()].copy_from_slice(&v1.usr);
    node.fs.put(&node.layout.slot_b.path, &slot_b);
    let (installed, asked) = apply(&node);
    assert!(installed.delta, "{installed:?}");
    // Without slot B it would be at least the three damaged quarters.
    assert!(asked < v2.usr.len() as u64 / 2, "asked for {asked} bytes");
    let slot = node.fs.read(&node.layout.slot_b.path).unwrap();
    assert_eq!(&slot[..v2.usr.len()], &v2.usr[..]);
}
