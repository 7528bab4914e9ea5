//! A small HTTP/1.1 file server on 127.0.0.1 for an update repository
//! (std `TcpListener` and one thread per connection): GET and HEAD of
//! files under one directory, `Range: bytes=N-` and `bytes=N-M`, 404 for
//! anything else,
//! `/health` answering a status the test sets, and fault injection (one
//! byte of one file flipped as it is served). It counts and logs requests,
//! bounds connections and their time, and stops on drop.
//!
//! Also the request reader and response writer the FleetLock server uses.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Most connections served at once; more are answered 503.
const MAX_CONNECTIONS: usize = 16;
/// Longest silence on a connection before it is dropped.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest request head or body accepted.
const MAX_REQUEST: usize = 64 * 1024;
/// Requests kept in the log.
const MAX_LOG: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("binding a listener on 127.0.0.1")]
    Bind(#[source] std::io::Error),
    #[error("starting the {what} server thread")]
    Thread {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("reading a request")]
    Read(#[source] std::io::Error),
    #[error("malformed request: {0}")]
    Malformed(String),
}

/// One parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// `N` of `Range: bytes=N-`; `Err` for any other range form.
    pub fn range_start(&self) -> Result<Option<u64>, String> {
        Ok(self.range()?.map(|(n, _)| n))
    }

    /// `(N, None)` of `Range: bytes=N-`, `(N, Some(M))` of `bytes=N-M`
    /// (M inclusive, at least N); `Err` for any other range form.
    pub fn range(&self) -> Result<Option<(u64, Option<u64>)>, String> {
        let Some(r) = self.header("range") else {
            return Ok(None);
        };
        let bad = || format!("unsupported range {r:?}");
        let (a, b) = r
            .trim()
            .strip_prefix("bytes=")
            .and_then(|s| s.split_once('-'))
            .ok_or_else(bad)?;
        let start: u64 = a.parse().map_err(|_| bad())?;
        let end = match b {
            "" => None,
            b => Some(
                b.parse::<u64>()
                    .ok()
                    .filter(|&e| e >= start)
                    .ok_or_else(bad)?,
            ),
        };
        Ok(Some((start, end)))
    }
}

/// Reads one request (head and a `Content-Length` body).
pub fn read_request<R: Read>(stream: R) -> Result<Request, ServerError> {
    let mut r = BufReader::new(stream.take(MAX_REQUEST as u64));
    let mut line = String::new();
    r.read_line(&mut line).map_err(ServerError::Read)?;
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(ServerError::Malformed(format!(
            "request line {:?}",
            line.trim_end()
        )));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(ServerError::Malformed(format!("version {version:?}")));
    }
    let (method, path) = (method.to_owned(), target.to_owned());
    let mut headers = Vec::new();
    loop {
        line.clear();
        if r.read_line(&mut line).map_err(ServerError::Read)? == 0 {
            return Err(ServerError::Malformed("head ends early".into()));
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l
            .split_once(':')
            .ok_or_else(|| ServerError::Malformed(format!("header {l:?}")))?;
        headers.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    let mut req = Request {
        method,
        path,
        headers,
        body: Vec::new(),
    };
    let len: usize = match req.header("content-length") {
        Some(v) => v
            .parse()
            .map_err(|_| ServerError::Malformed(format!("content-length {v:?}")))?,
        None => 0,
    };
    if len > MAX_REQUEST {
        return Err(ServerError::Malformed(format!("body of {len} bytes")));
    }
    req.body.resize(len, 0);
    r.read_exact(&mut req.body).map_err(ServerError::Read)?;
    Ok(req)
}

/// Writes a complete response with a small body and closes the exchange.
pub fn respond(stream: &mut TcpStream, status: u16, body: &str) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Length: {}\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n",
        reason(status),
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())?;
    stream.flush()
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        416 => "Range Not Satisfiable",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// A listener thread that hands each connection to `handle` on its own
/// thread, at most [`MAX_CONNECTIONS`] at once, until dropped.
#[derive(Debug)]
pub struct Listener {
    pub port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Listener {
    pub fn start<F>(what: &'static str, handle: F) -> Result<Self, ServerError>
    where
        F: Fn(TcpStream) + Send + Sync + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(ServerError::Bind)?;
        let port = listener.local_addr().map_err(ServerError::Bind)?.port();
        listener.set_nonblocking(true).map_err(ServerError::Bind)?;
        let stop = Arc::new(AtomicBool::new(false));
        let handle = Arc::new(handle);
        let active = Arc::new(AtomicUsize::new(0));
        let s = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name(format!("{what}-server"))
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    let (mut stream, _) = match listener.accept() {
                        Ok(c) => c,
                        Err(_) => {
                            std::thread::sleep(Duration::from_millis(20));
                            continue;
                        }
                    };
                    let _ = stream.set_nonblocking(false);
                    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
                    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
                    if active.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
                        let _ = respond(&mut stream, 503, "{\"error\":\"busy\"}");
                        continue;
                    }
                    active.fetch_add(1, Ordering::SeqCst);
                    let (h, a) = (Arc::clone(&handle), Arc::clone(&active));
                    let spawned = std::thread::Builder::new()
                        .name(format!("{what}-conn"))
                        .spawn(move || {
                            h(stream);
                            a.fetch_sub(1, Ordering::SeqCst);
                        });
                    if spawned.is_err() {
                        active.fetch_sub(1, Ordering::SeqCst);
                    }
                }
            })
            .map_err(|source| ServerError::Thread { what, source })?;
        Ok(Listener {
            port,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One served request, for assertions and the progress log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    pub at: Duration,
    pub method: String,
    pub path: String,
    pub range_start: Option<u64>,
    /// The last byte asked for (`bytes=N-M`).
    pub range_end: Option<u64>,
    pub status: u16,
    /// Body bytes written (may be fewer than sent if the peer went away).
    pub bytes: u64,
    /// Whether a flipped byte went out in this response.
    pub tampered: bool,
}

/// Flip one byte of the file at `path` (URL path) at `offset` as it is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flip {
    pub path: String,
    pub offset: u64,
}

#[derive(Debug)]
struct Shared {
    root: PathBuf,
    started: Instant,
    health: AtomicU16,
    flip: Mutex<Option<Flip>>,
    log: Mutex<Vec<Served>>,
}

/// The repository server. Guests reach it through guestfwd.
#[derive(Debug)]
pub struct RepoServer {
    shared: Arc<Shared>,
    listener: Listener,
}

impl RepoServer {
    /// Serves the files under `root` on a free port of 127.0.0.1.
    pub fn start(root: &Path) -> Result<Self, ServerError> {
        let shared = Arc::new(Shared {
            root: root.to_owned(),
            started: Instant::now(),
            health: AtomicU16::new(200),
            flip: Mutex::new(None),
            log: Mutex::new(Vec::new()),
        });
        let s = Arc::clone(&shared);
        let listener = Listener::start("repo", move |stream| serve(&s, stream))?;
        Ok(RepoServer { shared, listener })
    }

    pub fn port(&self) -> u16 {
        self.listener.port
    }

    /// The status `/health` answers (200 at first).
    pub fn set_health(&self, status: u16) {
        self.shared.health.store(status, Ordering::SeqCst);
    }

    /// Flips one byte of one file as it is served from now on.
    pub fn set_flip(&self, flip: Option<Flip>) {
        if let Ok(mut f) = self.shared.flip.lock() {
            *f = flip;
        }
    }

    /// Every request so far.
    pub fn log(&self) -> Vec<Served> {
        self.shared
            .log
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default()
    }

    /// How many requests asked for `path` (any method).
    pub fn count(&self, path: &str) -> usize {
        self.log().iter().filter(|s| s.path == path).count()
    }
}

/// A URL path that names a file under the root: `/a/b` with plain
/// components only.
fn resolve(root: &Path, path: &str) -> Option<PathBuf> {
    let path = path.split('?').next()?;
    let rel = path.strip_prefix('/')?;
    let mut out = root.to_owned();
    for c in rel.split('/') {
        let ok = !c.is_empty()
            && !c.starts_with('.')
            && c.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !ok {
            return None;
        }
        out.push(c);
    }
    out.is_file().then_some(out)
}

fn serve(shared: &Shared, mut stream: TcpStream) {
    let req = match read_request(&mut stream) {
        Ok(r) => r,
        Err(e) => {
            let _ = respond(
                &mut stream,
                400,
                &format!("{{\"error\":{:?}}}", e.to_string()),
            );
            return;
        }
    };
    let mut served = Served {
        at: shared.started.elapsed(),
        method: req.method.clone(),
        path: req.path.clone(),
        range_start: None,
        range_end: None,
        status: 200,
        bytes: 0,
        tampered: false,
    };
    // An error here is the peer going away mid-body: `bytes` tells.
    let _ = answer(shared, &req, &mut stream, &mut served);
    if let Ok(mut log) = shared.log.lock() {
        if log.len() < MAX_LOG {
            log.push(served);
        }
    }
}

fn answer(
    shared: &Shared,
    req: &Request,
    stream: &mut TcpStream,
    served: &mut Served,
) -> std::io::Result<()> {
    let head_only = match req.method.as_str() {
        "GET" => false,
        "HEAD" => true,
        _ => {
            served.status = 405;
            return respond(stream, 405, "{\"error\":\"method\"}");
        }
    };
    if req.path == "/health" {
        served.status = shared.health.load(Ordering::SeqCst);
        return respond(stream, served.status, "{\"health\":\"set by the test\"}\n");
    }
    let Some(file) = resolve(&shared.root, &req.path) else {
        served.status = 404;
        return respond(stream, 404, "{\"error\":\"not found\"}\n");
    };
    let range = match req.range() {
        Ok(s) => s,
        Err(e) => {
            served.status = 416;
            return respond(stream, 416, &format!("{{\"error\":{e:?}}}"));
        }
    };
    let start = range.map(|(n, _)| n);
    served.range_start = start;
    served.range_end = range.and_then(|(_, m)| m);
    let mut f = std::fs::File::open(&file)?;
    let size = f.metadata()?.len();
    let from = start.unwrap_or(0);
    if from > size {
        served.status = 416;
        return respond(stream, 416, "{\"error\":\"range\"}");
    }
    // One past the last byte sent.
    let until = served
        .range_end
        .map_or(size, |m| m.saturating_add(1).min(size));
    served.status = if start.is_some() { 206 } else { 200 };
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nAccept-Ranges: bytes\r\nConnection: close\r\n",
        served.status,
        reason(served.status),
        until.saturating_sub(from)
    );
    if start.is_some() {
        head.push_str(&format!(
            "Content-Range: bytes {from}-{}/{size}\r\n",
            until.saturating_sub(1)
        ));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    if head_only {
        return stream.flush();
    }
    let flip = shared
        .flip
        .lock()
        .ok()
        .and_then(|f| f.clone())
        .filter(|f| f.path == req.path);
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(from))?;
    let mut f = f.take(until.saturating_sub(from));
    let mut buf = vec![0u8; 64 * 1024];
    let mut pos = from;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if let Some(flip) = &flip {
            if flip.offset >= pos && flip.offset < pos + n as u64 {
                // Less than n (checked above), so it fits.
                let i = usize::try_from(flip.offset - pos).unwrap_or(0);
                buf[i] ^= 0xff;
                served.tampered = true;
            }
        }
        stream.write_all(&buf[..n])?;
        pos += n as u64;
        served.bytes += n as u64;
    }
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http;

    fn get(port: u16, path: &str, range: Option<u64>) -> (u16, Vec<u8>) {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let range = range
            .map(|n| format!("Range: bytes={n}-\r\n"))
            .unwrap_or_default();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n{range}\r\n").unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).unwrap();
        let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let status = std::str::from_utf8(&raw[9..12]).unwrap().parse().unwrap();
        (status, raw[split + 4..].to_vec())
    }

    #[test]
    fn serves_files_ranges_flips_and_404() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("objects")).unwrap();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(dir.path().join("objects/abc"), &data).unwrap();
        let srv = RepoServer::start(dir.path()).unwrap();
        let port = srv.port();

        assert_eq!(get(port, "/objects/abc", None), (200, data.clone()));
        assert_eq!(
            get(port, "/objects/abc", Some(150_000)),
            (206, data[150_000..].to_vec())
        );
        assert_eq!(get(port, "/objects/../objects/abc", None).0, 404);
        assert_eq!(get(port, "/nope", None).0, 404);

        srv.set_flip(Some(Flip {
            path: "/objects/abc".into(),
            offset: 100_001,
        }));
        let (_, body) = get(port, "/objects/abc", None);
        assert_eq!(body.len(), data.len());
        let diff: Vec<usize> = (0..data.len()).filter(|&i| body[i] != data[i]).collect();
        assert_eq!(diff, vec![100_001]);
        let (_, tail) = get(port, "/objects/abc", Some(100_000));
        assert_ne!(tail[1], data[100_001]);
        let (_, after) = get(port, "/objects/abc", Some(100_002));
        assert_eq!(after, data[100_002..].to_vec());

        srv.set_health(503);
        let r = http::request(port, "GET", "/health", None, Duration::from_secs(5)).unwrap();
        assert_eq!(r.status, 503);
        let r = http::request(port, "HEAD", "/objects/abc", None, Duration::from_secs(5)).unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(srv.count("/objects/abc"), 6);
        assert_eq!(srv.log().iter().filter(|s| s.tampered).count(), 2);
    }

    #[test]
    fn requests_parse_with_headers_and_body() {
        let raw = b"POST /v1/pre-reboot HTTP/1.1\r\nfleet-lock-protocol: true\r\nContent-Length: 2\r\n\r\n{}";
        let r = read_request(&raw[..]).unwrap();
        assert_eq!(r.method, "POST");
        assert_eq!(r.header("Fleet-Lock-Protocol"), Some("true"));
        assert_eq!(r.body, b"{}");
        assert!(read_request(&b"nonsense\r\n\r\n"[..]).is_err());
        let r = read_request(&b"GET / HTTP/1.1\r\nRange: bytes=5-\r\n\r\n"[..]).unwrap();
        assert_eq!(r.range_start(), Ok(Some(5)));
        let r = read_request(&b"GET / HTTP/1.1\r\nRange: bytes=5-9\r\n\r\n"[..]).unwrap();
        assert_eq!(r.range(), Ok(Some((5, Some(9)))));
        let r = read_request(&b"GET / HTTP/1.1\r\nRange: bytes=9-5\r\n\r\n"[..]).unwrap();
        assert!(r.range().is_err());
        let r = read_request(&b"GET / HTTP/1.1\r\nRange: bytes=-9\r\n\r\n"[..]).unwrap();
        assert!(r.range_start().is_err());
    }
}
