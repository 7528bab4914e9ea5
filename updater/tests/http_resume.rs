//! A real HTTP server on 127.0.0.1 drops the connection in the middle of
//! usr.img on purpose; the install resumes with a Range request and
//! completes.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use ballast_updater::http::HttpFetch;
use ballast_updater::install::ApplyOptions;
use ballast_updater::payload::Arch;
use common::server::{Cut, Server};
use common::*;

#[test]
fn dropped_connection_resumes_with_range_and_completes() {
    let v1 = payload("1.0.0", Arch::X86_64, "base", 1);
    let v2 = payload("1.1.0", Arch::X86_64, "base", 2);
    // The full path: delta updates resume per chunk (tests/delta.rs).
    let repo = Repo::full_only(&[&v1, &v2]);
    let usr_sha = v2.meta.artifact("usr.img").unwrap().sha256.clone();
    let (server, url) = Server::start(repo.path());
    *server.cut.lock().unwrap() = Some(Cut {
        path: usr_sha,
        at: 300_000,
        times: 2,
    });
    let fetch = HttpFetch::new(&url).unwrap();
    let node = TestNode::new(&v1);
    let report = node
        .apply_with(&fetch, &repo.trust(), &ApplyOptions::default())
        .unwrap();
    let installed = report.installed.unwrap();
    assert_eq!(installed.version, v2.version());
    assert!(installed.resumes >= 1, "{installed:?}");
    assert!(server.range_requests() >= 1, "{:?}", server.requests());
    let slot = ballast_updater::storage::Storage::read(&node.fs, &node.layout.slot_b.path).unwrap();
    assert_eq!(&slot[..v2.usr.len()], &v2.usr[..]);
}

#[test]
fn http_404_manifest_is_a_clear_refusal() {
    let v1 = payload("1.0.0", Arch::X86_64, "base", 1);
    let repo = Repo::new(&[&v1]);
    std::fs::remove_file(repo.path().join("manifest.json")).unwrap();
    let (_server, url) = Server::start(repo.path());
    let fetch = HttpFetch::new(&url).unwrap();
    let node = TestNode::new(&v1);
    let err = node
        .apply_with(&fetch, &repo.trust(), &ApplyOptions::default())
        .unwrap_err();
    assert!(
        matches!(
            err,
            ballast_updater::install::InstallError::NoManifest { .. }
        ),
        "{err}"
    );
}
