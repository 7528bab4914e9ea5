//! A real HTTP server on 127.0.0.1 drops the connection in the middle of
//! usr.img on purpose; the install resumes with a Range request and
//! completes.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use ballast_updater::http::HttpFetch;
use ballast_updater::install::ApplyOptions;
use ballast_updater::payload::Arch;
use common::*;

struct Server {
    root: PathBuf,
    /// Full-body responses for this object are cut after `cut_at` bytes,
    /// `cuts` times.
    object: String,
    cut_at: u64,
    cuts_left: AtomicUsize,
    range_requests: AtomicUsize,
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
            let lower = h.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("range: bytes=") {
                range_start = v.trim().trim_end_matches('-').parse().unwrap_or(0);
                server.range_requests.fetch_add(1, Ordering::SeqCst);
            }
        }
        let rel = path.trim_start_matches('/');
        let file = server.root.join(rel);
        let Ok(mut f) = std::fs::File::open(&file) else {
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
        let cut = rel.ends_with(&server.object)
            && server
                .cuts_left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
        if cut {
            let mut part = (&mut f).take(server.cut_at.saturating_sub(range_start));
            std::io::copy(&mut part, &mut out)?;
            out.flush()?;
            // Drop the connection mid-body.
            return Ok(());
        }
        std::io::copy(&mut f, &mut out)?;
    }
}

fn serve(server: Arc<Server>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let server = Arc::clone(&server);
            std::thread::spawn(move || {
                let _ = handle(&server, stream);
            });
        }
    });
    format!("http://{addr}/")
}

#[test]
fn dropped_connection_resumes_with_range_and_completes() {
    let v1 = payload("1.0.0", Arch::X86_64, "base", 1);
    let v2 = payload("1.1.0", Arch::X86_64, "base", 2);
    // The full path: delta updates resume per chunk (tests/delta.rs).
    let repo = Repo::full_only(&[&v1, &v2]);
    let usr_sha = v2.meta.artifact("usr.img").unwrap().sha256.clone();
    let server = Arc::new(Server {
        root: repo.path(),
        object: usr_sha,
        cut_at: 300_000,
        cuts_left: AtomicUsize::new(2),
        range_requests: AtomicUsize::new(0),
    });
    let url = serve(Arc::clone(&server));
    let fetch = HttpFetch::new(&url).unwrap();
    let node = TestNode::new(&v1);
    let report = node
        .apply_with(&fetch, &repo.trust(), &ApplyOptions::default())
        .unwrap();
    let installed = report.installed.unwrap();
    assert_eq!(installed.version, v2.version());
    assert!(installed.resumes >= 1, "{installed:?}");
    assert!(server.range_requests.load(Ordering::SeqCst) >= 1);
    let slot = ballast_updater::storage::Storage::read(&node.fs, &node.layout.slot_b.path).unwrap();
    assert_eq!(&slot[..v2.usr.len()], &v2.usr[..]);
}

#[test]
fn http_404_manifest_is_a_clear_refusal() {
    let v1 = payload("1.0.0", Arch::X86_64, "base", 1);
    let repo = Repo::new(&[&v1]);
    std::fs::remove_file(repo.path().join("manifest.json")).unwrap();
    let server = Arc::new(Server {
        root: repo.path(),
        object: "none".into(),
        cut_at: 0,
        cuts_left: AtomicUsize::new(0),
        range_requests: AtomicUsize::new(0),
    });
    let url = serve(server);
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
