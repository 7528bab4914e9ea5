//! One static file server on 127.0.0.1 for the HTTP tests (delta,
//! http_resume): keep-alive, `Range: bytes=A-` and `bytes=A-B`, 404 for a
//! missing file, a log of every request (path and range), and a fault
//! switch that drops the connection in the middle of a body.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// One request the server answered: the repository-relative path and the
/// byte range asked for (`None`: the whole file; `(a, None)`: from `a`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub path: String,
    pub range: Option<(u64, Option<u64>)>,
}

/// Cut the connection after the body reaches file offset `at` in a file
/// whose path ends with `path`, `times` times.
#[derive(Debug, Clone)]
pub struct Cut {
    pub path: String,
    pub at: u64,
    pub times: usize,
}

#[derive(Debug)]
pub struct Server {
    root: PathBuf,
    pub log: Mutex<Vec<Request>>,
    pub cut: Mutex<Option<Cut>>,
}

impl Server {
    /// Serves `root` until the test process exits; returns its base URL.
    pub fn start(root: PathBuf) -> (Arc<Server>, String) {
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
                    let _ = s.handle(stream);
                });
            }
        });
        (server, format!("http://{addr}/"))
    }

    pub fn requests(&self) -> Vec<Request> {
        self.log.lock().unwrap().clone()
    }

    /// The paths requested, in order.
    pub fn paths(&self) -> Vec<String> {
        self.requests().into_iter().map(|r| r.path).collect()
    }

    /// Requests that carried a Range header.
    pub fn range_requests(&self) -> usize {
        self.requests().iter().filter(|r| r.range.is_some()).count()
    }

    /// Whether to cut this response, and where (a file offset).
    fn take_cut(&self, rel: &str) -> Option<u64> {
        let mut cut = self.cut.lock().unwrap();
        let c = cut.as_mut()?;
        if !rel.ends_with(&c.path) || c.times == 0 {
            return None;
        }
        c.times -= 1;
        Some(c.at)
    }

    fn handle(&self, stream: TcpStream) -> std::io::Result<()> {
        stream.set_nodelay(true)?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut out = stream;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            let path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
            let mut range = None;
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
            let rel = path.trim_start_matches('/').to_owned();
            self.log.lock().unwrap().push(Request {
                path: rel.clone(),
                range,
            });
            let Ok(mut f) = std::fs::File::open(self.root.join(&rel)) else {
                out.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")?;
                continue;
            };
            let len = f.metadata()?.len();
            let (start, last) = match range {
                Some((a, b)) => (a.min(len), b.unwrap_or(u64::MAX).min(len.saturating_sub(1))),
                None => (0, len.saturating_sub(1)),
            };
            let body = (last + 1).saturating_sub(start);
            f.seek(SeekFrom::Start(start))?;
            let status = if range.is_some() {
                "206 Partial Content"
            } else {
                "200 OK"
            };
            write!(
                out,
                "HTTP/1.1 {status}\r\ncontent-length: {body}\r\ncontent-range: bytes {start}-{last}/{len}\r\n\r\n",
            )?;
            if let Some(at) = self.take_cut(&rel) {
                let part = at.saturating_sub(start).min(body);
                std::io::copy(&mut (&mut f).take(part), &mut out)?;
                out.flush()?;
                // Drop the connection mid-body.
                return Ok(());
            }
            std::io::copy(&mut (&mut f).take(body), &mut out)?;
        }
    }
}
