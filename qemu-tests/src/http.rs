//! A tiny HTTP/1.1 client over `std::net::TcpStream` for talking to the
//! agent's API through QEMU's `hostfwd` on 127.0.0.1. One request per
//! connection (`Connection: close`); enough for tests, nothing more. The
//! node's API is HTTPS ([`crate::tls`] speaks it with the same request
//! and parser); plain HTTP is left for the test's own servers and for
//! checking that the node does not answer it.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

/// Errors talking to the guest's API.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{method} http://127.0.0.1:{port}{path}")]
    Io {
        method: String,
        port: u16,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("{method} http://127.0.0.1:{port}{path}: malformed response {head:?}")]
    Malformed {
        method: String,
        port: u16,
        path: String,
        head: String,
    },
}

/// A response: status code and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

/// Sends one request to `127.0.0.1:port` and reads the whole response.
pub fn request(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> Result<Response, HttpError> {
    let mut stream = connect(port, method, path, timeout)?;
    exchange(&mut stream, port, method, path, body)
}

/// A TCP connection to `127.0.0.1:port` with read and write timeouts.
pub(crate) fn connect(
    port: u16,
    method: &str,
    path: &str,
    timeout: Duration,
) -> Result<TcpStream, HttpError> {
    let err = io_error(port, method, path);
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let stream = TcpStream::connect_timeout(&addr, timeout).map_err(err)?;
    stream.set_read_timeout(Some(timeout)).map_err(err)?;
    stream.set_write_timeout(Some(timeout)).map_err(err)?;
    Ok(stream)
}

/// Writes one request on `stream` (plain or TLS) and reads the response
/// to the end.
pub(crate) fn exchange(
    stream: &mut (impl Read + Write),
    port: u16,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<Response, HttpError> {
    let err = io_error(port, method, path);
    stream
        .write_all(request_bytes(port, method, path, body).as_bytes())
        .map_err(err)?;
    let mut raw = Vec::new();
    match stream.read_to_end(&mut raw) {
        Ok(_) => {}
        // A TLS peer that closes without close_notify after a whole
        // response: the parse below decides whether it was whole.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Err(e) => return Err(err(e)),
    }
    parse_response(&raw).ok_or_else(|| HttpError::Malformed {
        method: method.to_owned(),
        port,
        path: path.to_owned(),
        head: String::from_utf8_lossy(&raw[..raw.len().min(200)]).into_owned(),
    })
}

fn io_error<'a>(
    port: u16,
    method: &'a str,
    path: &'a str,
) -> impl Fn(std::io::Error) -> HttpError + Copy + 'a {
    move |source| HttpError::Io {
        method: method.to_owned(),
        port,
        path: path.to_owned(),
        source,
    }
}

/// The bytes of one `Connection: close` request.
pub fn request_bytes(port: u16, method: &str, path: &str, body: Option<&str>) -> String {
    let body = body.unwrap_or("");
    format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// Parses status line and body (plain or chunked) of a complete response.
pub fn parse_response(raw: &[u8]) -> Option<Response> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..split]).ok()?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let mut parts = status_line.splitn(3, ' ');
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let status = parts.next()?.parse().ok()?;
    let chunked = lines.any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("transfer-encoding")
                && v.trim().eq_ignore_ascii_case("chunked")
        })
    });
    let rest = &raw[split + 4..];
    let body = if chunked {
        dechunk(rest)?
    } else {
        rest.to_vec()
    };
    Some(Response {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = data.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&data[..eol]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_chunked_bodies_parse() {
        let r = parse_response(b"HTTP/1.1 202 Accepted\r\ncontent-length: 2\r\n\r\n{}").unwrap();
        assert_eq!(r.status, 202);
        assert_eq!(r.body, "{}");
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body, "{\"a\":1}");
        assert!(parse_response(b"garbage").is_none());
        assert!(parse_response(b"SSH-2.0\r\n\r\n").is_none());
    }

    #[test]
    fn request_round_trip_against_a_local_server() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut buf = [0u8; 1024];
            let n = c.read(&mut buf).unwrap();
            let req = String::from_utf8_lossy(&buf[..n]).into_owned();
            c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .unwrap();
            req
        });
        let r = request(port, "GET", "/healthz", None, Duration::from_secs(5)).unwrap();
        assert_eq!(
            r,
            Response {
                status: 200,
                body: "ok".into()
            }
        );
        assert!(server
            .join()
            .unwrap()
            .starts_with("GET /healthz HTTP/1.1\r\n"));
    }
}
