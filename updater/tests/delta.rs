//! Delta updates over real HTTP on 127.0.0.1: the server's request log
//! shows that only missing chunks are fetched, a dropped chunk download
//! resumes, and any failure on the delta path falls back to the full
//! download.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use ballast_updater::chunks::{Catalog, ChunkIndex};
use ballast_updater::http::HttpFetch;
use ballast_updater::install::ApplyOptions;
use ballast_updater::payload::Arch;
use ballast_updater::storage::Storage;
use common::*;

/// A static file server that logs every request path and can drop the
/// connection once, after `cut_at` bytes of the body of `cut_path`.
struct Server {
    root: PathBuf,
    log: Mutex<Vec<String>>,
    cut: Mutex<Option<(String, u64)>>,
}

fn handle(server: &Server, stream: TcpStream) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
        let mut range_start = 0u64;
        loop {
            let mut h = String::new();
            reader.read_line(&mut h)?;
            if h.trim().is_empty() {
                break;
            }
            if let Some(v) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
                range_start = v.trim().trim_end_matches('-').parse().unwrap_or(0);
            }
        }
        let rel = path.trim_start_matches('/').to_owned();
        server.log.lock().unwrap().push(rel.clone());
        let Ok(mut f) = std::fs::File::open(server.root.join(&rel)) else {
            out.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")?;
            continue;
        };
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(range_start))?;
        let status = if range_start > 0 {
            "206 Partial Content"
        } else {
            "200 OK"
        };
        write!(
            out,
            "HTTP/1.1 {status}\r\ncontent-length: {}\r\ncontent-range: bytes {range_start}-{}/{len}\r\n\r\n",
            len - range_start,
            len.saturating_sub(1)
        )?;
        let cut = {
            let mut c = server.cut.lock().unwrap();
            match c.as_ref() {
                Some((p, at)) if *p == rel => {
                    let at = *at;
                    *c = None;
                    Some(at)
                }
                _ => None,
            }
        };
        if let Some(at) = cut {
            std::io::copy(&mut (&mut f).take(at), &mut out)?;
            out.flush()?;
            return Ok(());
        }
        std::io::copy(&mut f, &mut out)?;
    }
}

fn serve(root: PathBuf) -> (Arc<Server>, String) {
    let server = Arc::new(Server {
        root,
        log: Mutex::new(Vec::new()),
        cut: Mutex::new(None),
    });
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let s = Arc::clone(&server);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let s = Arc::clone(&s);
            std::thread::spawn(move || {
                let _ = handle(&s, stream);
            });
        }
    });
    (server, format!("http://{addr}/"))
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
    let installed = node
        .apply_with(
            &HttpFetch::new(&url).unwrap(),
            &repo.trust(),
            &ApplyOptions::default(),
        )
        .unwrap()
        .installed
        .unwrap();
    assert!(installed.delta, "{installed:?}");
    let slot = node.fs.read(&node.layout.slot_b.path).unwrap();
    assert_eq!(&slot[..v2.usr.len()], &v2.usr[..]);

    // Exactly the chunks of v2's usr.img that v1's does not have.
    let old: BTreeSet<String> = index_of(&repo, &v1.meta.artifact("usr.img").unwrap().sha256)
        .chunks
        .into_iter()
        .map(|c| c.path())
        .collect();
    let new = index_of(&repo, &v2.meta.artifact("usr.img").unwrap().sha256);
    let missing: BTreeSet<String> = new
        .chunks
        .iter()
        .map(|c| c.path())
        .filter(|p| !old.contains(p))
        .collect();
    assert!(!missing.is_empty() && missing.len() <= 3, "{missing:?}");
    let log = server.log.lock().unwrap().clone();
    let fetched: BTreeSet<String> = log
        .iter()
        .filter(|p| p.starts_with("chunks/"))
        .cloned()
        .collect();
    assert_eq!(fetched, missing, "log: {log:?}");
    // No whole artifact was downloaded: only the index (an object) was.
    for a in &v2.meta.artifacts {
        assert!(
            !log.contains(&format!("objects/{}", a.sha256)),
            "{} fetched whole: {log:?}",
            a.name
        );
    }
    let missing_bytes: u64 = new
        .chunks
        .iter()
        .filter(|c| missing.contains(&c.path()))
        .map(|c| u64::from(c.length))
        .sum();
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
    let old: BTreeSet<String> = index_of(&repo, &v1.meta.artifact("usr.img").unwrap().sha256)
        .chunks
        .into_iter()
        .map(|c| c.path())
        .collect();
    let first_missing = index_of(&repo, &v2.meta.artifact("usr.img").unwrap().sha256)
        .chunks
        .into_iter()
        .map(|c| c.path())
        .find(|p| !old.contains(p))
        .unwrap();
    let (server, url) = serve(repo.path());
    *server.cut.lock().unwrap() = Some((first_missing.clone(), 5000));
    let node = TestNode::new(&v1);
    let installed = node
        .apply_with(
            &HttpFetch::new(&url).unwrap(),
            &repo.trust(),
            &ApplyOptions::default(),
        )
        .unwrap()
        .installed
        .unwrap();
    assert!(installed.delta);
    assert!(installed.resumes >= 1, "{installed:?}");
    let log = server.log.lock().unwrap().clone();
    assert_eq!(log.iter().filter(|p| **p == first_missing).count(), 2);
    // The new kernel is downloaded whole; the unchanged initrd is not.
    assert!(log.contains(&format!(
        "objects/{}",
        v2.meta.artifact("vmlinuz").unwrap().sha256
    )));
    assert!(!log.contains(&format!(
        "objects/{}",
        v2.meta.artifact("initrd").unwrap().sha256
    )));
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
        ("a corrupt chunk", |repo, v2| {
            let idx = index_of(repo, &v2.meta.artifact("usr.img").unwrap().sha256);
            let c = &idx.chunks[0];
            std::fs::write(repo.path().join(c.path()), vec![0u8; c.length as usize]).unwrap();
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
        // The start of slot A is damaged, so the first chunk (the one
        // broken above) must be downloaded; the rest is reused.
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
        let log = server.log.lock().unwrap().clone();
        assert!(
            log.contains(&format!(
                "objects/{}",
                v2.meta.artifact("usr.img").unwrap().sha256
            )),
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
