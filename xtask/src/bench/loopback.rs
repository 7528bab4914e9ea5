//! A static file server on loopback for the benches (`bench install`,
//! `bench delta`): keep-alive GET with `Range: bytes=A-` and `bytes=A-B`
//! (resumes, delta runs), `..` refused, and
//! counters of the requests and body bytes it sent (what a CDN would
//! serve). Plain blocking I/O, a thread per connection: nothing here is
//! what is measured.

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context as _, Result};

/// Response body bytes and requests the server sent.
#[derive(Debug, Default)]
pub struct Served {
    pub bytes: AtomicU64,
    pub requests: AtomicU64,
}

/// Copies `len` bytes of `from` to `to`, at most `rate` bytes per second
/// (per connection) when given: a link slower than loopback.
fn send(
    from: &mut impl std::io::Read,
    to: &mut impl Write,
    len: u64,
    rate: Option<u64>,
) -> std::io::Result<u64> {
    let Some(rate) = rate.filter(|r| *r > 0) else {
        return std::io::copy(&mut from.take(len), to);
    };
    let start = std::time::Instant::now();
    let mut buf = vec![0u8; 64 * 1024];
    let mut sent = 0u64;
    while sent < len {
        let want = usize::try_from(len - sent)
            .unwrap_or(buf.len())
            .min(buf.len());
        let n = from.read(&mut buf[..want])?;
        if n == 0 {
            break;
        }
        to.write_all(&buf[..n])?;
        sent += n as u64;
        let due = std::time::Duration::from_secs_f64(sent as f64 / rate as f64);
        if let Some(wait) = due.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    Ok(sent)
}

fn handle(
    root: &Path,
    served: &Served,
    stream: TcpStream,
    rate: Option<u64>,
) -> std::io::Result<()> {
    // As web servers do for keep-alive: otherwise the head and the body
    // wait on the client's delayed ACK (40 ms per request on loopback).
    stream.set_nodelay(true)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
        let mut range: Option<(u64, Option<u64>)> = None;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 {
                return Ok(());
            }
            if h.trim().is_empty() {
                break;
            }
            if let Some(v) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
                let (a, b) = v.trim().split_once('-').unwrap_or((v.trim(), ""));
                range = Some((a.parse().unwrap_or(0), b.parse().ok()));
            }
        }
        served.requests.fetch_add(1, Ordering::Relaxed);
        let rel = path.trim_start_matches('/');
        if rel.split('/').any(|s| s == "..") {
            out.write_all(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n")?;
            continue;
        }
        let Ok(mut file) = std::fs::File::open(root.join(rel)) else {
            out.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")?;
            continue;
        };
        let len = file.metadata()?.len();
        let (start, last) = match range {
            Some((a, b)) => (a.min(len), b.unwrap_or(u64::MAX).min(len.saturating_sub(1))),
            None => (0, len.saturating_sub(1)),
        };
        let body = (last + 1).saturating_sub(start);
        file.seek(SeekFrom::Start(start))?;
        let status = if range.is_some() {
            "206 Partial Content"
        } else {
            "200 OK"
        };
        write!(
            out,
            "HTTP/1.1 {status}\r\ncontent-length: {body}\r\ncontent-range: bytes {start}-{last}/{len}\r\n\r\n",
        )?;
        let sent = send(&mut file, &mut out, body, rate)?;
        served.bytes.fetch_add(sent, Ordering::Relaxed);
    }
}

/// Serves `root` on 127.0.0.1 until the process exits; returns its URL
/// and the counters.
pub fn serve(root: PathBuf) -> Result<(String, Arc<Served>)> {
    serve_at(root, None)
}

/// [`serve`], each connection sending at most `rate` bytes per second.
pub fn serve_at(root: PathBuf, rate: Option<u64>) -> Result<(String, Arc<Served>)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let served = Arc::new(Served::default());
    let counter = Arc::clone(&served);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let root = root.clone();
            let counter = Arc::clone(&counter);
            std::thread::spawn(move || {
                let _ = handle(&root, &counter, stream, rate);
            });
        }
    });
    Ok((format!("http://{addr}/"), served))
}

/// Runs `cmd`, failing on a non-zero exit.
pub fn run_cmd(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}
