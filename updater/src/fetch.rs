//! How the node reads an update repository: the [`Fetch`] trait (whole
//! small files, and byte streams from an offset), a directory-backed
//! implementation for offline servicing and tests, and [`ResumingReader`],
//! which turns a dropped connection into a ranged re-request at the byte
//! where it stopped. The HTTP implementation lives in [`crate::http`].

use std::io::{self, Read};
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{url}: {reason}")]
    Http { url: String, reason: String },
    #[error("{url}: HTTP status {status}")]
    Status { url: String, status: u16 },
    #[error("{url} is larger than the {max}-byte limit")]
    TooLarge { url: String, max: usize },
    #[error("reading {path}")]
    File {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{name:?} is not a repository-relative path")]
    BadPath { name: String },
}

/// Read access to a repository's files by repository-relative path.
pub trait Fetch: Send + Sync {
    /// A whole file of at most `max` bytes; `None` when it does not exist.
    fn get(&self, path: &str, max: usize) -> Result<Option<Vec<u8>>, FetchError>;
    /// The file's bytes from `offset` on (HTTP Range).
    fn open(&self, path: &str, offset: u64) -> Result<Box<dyn Read + Send>, FetchError>;
    /// The file's `len` bytes from `offset` (HTTP `Range: bytes=A-B`). The
    /// reader may go on past them; callers read only `len`. The default
    /// opens from `offset` on, which a local file serves as cheaply.
    fn open_range(
        &self,
        path: &str,
        offset: u64,
        len: u64,
    ) -> Result<Box<dyn Read + Send>, FetchError> {
        let _ = len;
        self.open(path, offset)
    }
    /// Where the repository is, for messages.
    fn describe(&self) -> String;
}

/// `text` with the user info of every URL in it replaced:
/// `https://user:pass@host/x` becomes `https://***@host/x`. reqwest sends
/// user info as Basic auth, so repository, FleetLock and health check URLs
/// may carry credentials; every message that shows a URL goes through this.
pub fn redact_url(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        // The authority ends where the path, query or fragment starts, or
        // where the URL ends inside a longer message.
        let end = tail
            .find(|c: char| {
                matches!(c, '/' | '?' | '#' | '"' | '\'' | ')' | '>' | ',') || c.is_whitespace()
            })
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(at) => {
                out.push_str("***");
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// Repository paths are ours (`manifest.json`, `objects/<hex>`); anything
/// else is refused before it reaches a URL or a file name.
pub fn check_relative(path: &str) -> Result<(), FetchError> {
    let ok = !path.is_empty()
        && !path.starts_with('/')
        && path
            .split('/')
            .all(|seg| !seg.is_empty() && seg != "." && seg != "..")
        && path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'));
    if ok {
        Ok(())
    } else {
        Err(FetchError::BadPath {
            name: path.to_owned(),
        })
    }
}

/// A repository in a local directory.
#[derive(Debug, Clone)]
pub struct DirFetch {
    pub root: PathBuf,
}

impl Fetch for DirFetch {
    fn get(&self, path: &str, max: usize) -> Result<Option<Vec<u8>>, FetchError> {
        check_relative(path)?;
        let full = self.root.join(path);
        let file = match std::fs::File::open(&full) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(FetchError::File { path: full, source }),
        };
        let mut bytes = Vec::new();
        file.take(max as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(|source| FetchError::File {
                path: full.clone(),
                source,
            })?;
        if bytes.len() > max {
            return Err(FetchError::TooLarge {
                url: full.display().to_string(),
                max,
            });
        }
        Ok(Some(bytes))
    }

    fn open(&self, path: &str, offset: u64) -> Result<Box<dyn Read + Send>, FetchError> {
        use std::io::{Seek, SeekFrom};
        check_relative(path)?;
        let full = self.root.join(path);
        let err = |source| FetchError::File {
            path: full.clone(),
            source,
        };
        let mut file = std::fs::File::open(&full).map_err(err)?;
        file.seek(SeekFrom::Start(offset)).map_err(err)?;
        Ok(Box::new(file))
    }

    fn describe(&self) -> String {
        self.root.display().to_string()
    }
}

/// Reads exactly `size` bytes of a repository file (from its start, or
/// from `start` with [`ResumingReader::range`]), re-requesting from the
/// current offset when the stream fails or ends early, at most
/// `max_resumes` times in a row without progress.
pub struct ResumingReader<'a> {
    fetch: &'a dyn Fetch,
    path: String,
    /// Where in the file byte 0 of this reader is.
    start: u64,
    /// Some: ask for a closed range ending at `start + size`.
    ranged: bool,
    size: u64,
    offset: u64,
    inner: Option<Box<dyn Read + Send>>,
    max_resumes: u32,
    resumes_without_progress: u32,
    /// Total re-requests made, for reports and tests.
    pub resumes: u32,
}

impl std::fmt::Debug for ResumingReader<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResumingReader")
            .field("path", &self.path)
            .field("offset", &self.offset)
            .field("size", &self.size)
            .finish()
    }
}

impl<'a> ResumingReader<'a> {
    pub fn new(fetch: &'a dyn Fetch, path: &str, size: u64, max_resumes: u32) -> Self {
        ResumingReader {
            fetch,
            path: path.to_owned(),
            start: 0,
            ranged: false,
            size,
            offset: 0,
            inner: None,
            max_resumes,
            resumes_without_progress: 0,
            resumes: 0,
        }
    }

    /// The `size` bytes of the file at `path` from byte `start`, asked
    /// for as one closed range (and resumed as one).
    pub fn range(
        fetch: &'a dyn Fetch,
        path: &str,
        start: u64,
        size: u64,
        max_resumes: u32,
    ) -> Self {
        ResumingReader {
            start,
            ranged: true,
            ..ResumingReader::new(fetch, path, size, max_resumes)
        }
    }

    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// After all `size` bytes: true when the server has more (the artifact
    /// is larger than the manifest says).
    pub fn has_trailing_bytes(&mut self) -> bool {
        let mut probe = [0u8; 1];
        match self.inner.as_mut() {
            Some(r) => matches!(r.read(&mut probe), Ok(n) if n > 0),
            None => false,
        }
    }

    fn fail_or_retry(&mut self, err: io::Error) -> io::Result<()> {
        self.inner = None;
        self.resumes_without_progress += 1;
        if self.resumes_without_progress > self.max_resumes {
            return Err(err);
        }
        self.resumes += 1;
        tracing::warn!(path = %self.path, offset = self.offset, error = %err, "stream interrupted; resuming with a range request");
        Ok(())
    }
}

impl Read for ResumingReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let remaining = self.size - self.offset;
        if remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(remaining).unwrap_or(usize::MAX));
        loop {
            if self.inner.is_none() {
                let at = self.start + self.offset;
                let opened = if self.ranged {
                    self.fetch
                        .open_range(&self.path, at, self.size - self.offset)
                } else {
                    self.fetch.open(&self.path, at)
                };
                match opened {
                    Ok(r) => self.inner = Some(r),
                    Err(e) => {
                        self.fail_or_retry(io::Error::other(e))?;
                        continue;
                    }
                }
            }
            let Some(inner) = self.inner.as_mut() else {
                continue;
            };
            match inner.read(&mut buf[..want]) {
                Ok(0) => {
                    let early = io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "{} ended at byte {} of {}",
                            self.path, self.offset, self.size
                        ),
                    );
                    self.fail_or_retry(early)?;
                }
                Ok(n) => {
                    self.offset += n as u64;
                    self.resumes_without_progress = 0;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => self.fail_or_retry(e)?,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn url_user_info_is_redacted_wherever_it_appears() {
        let cases = [
            ("https://user:pass@host/x", "https://***@host/x"),
            ("http://tok@host:8080", "http://***@host:8080"),
            ("https://host/a@b", "https://host/a@b"),
            ("file:///srv/repo", "file:///srv/repo"),
            (
                "error sending request for url (https://u:p%40w@h/m.json): refused",
                "error sending request for url (https://***@h/m.json): refused",
            ),
            (
                "a https://a:b@x and http://c:d@y?q=1",
                "a https://***@x and http://***@y?q=1",
            ),
            ("no url here", "no url here"),
            ("", ""),
        ];
        for (input, want) in cases {
            assert_eq!(redact_url(input), want, "{input}");
        }
    }

    use super::*;

    /// Serves a buffer but breaks every stream after `chunk` bytes.
    struct Flaky {
        data: Vec<u8>,
        chunk: usize,
    }

    impl Fetch for Flaky {
        fn get(&self, _: &str, _: usize) -> Result<Option<Vec<u8>>, FetchError> {
            Ok(Some(self.data.clone()))
        }
        fn open(&self, _: &str, offset: u64) -> Result<Box<dyn Read + Send>, FetchError> {
            let start = usize::try_from(offset).unwrap();
            let end = (start + self.chunk).min(self.data.len());
            Ok(Box::new(io::Cursor::new(self.data[start..end].to_vec())))
        }
        fn describe(&self) -> String {
            "flaky".into()
        }
    }

    #[test]
    fn resumes_until_complete() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let flaky = Flaky {
            data: data.clone(),
            chunk: 3000,
        };
        let mut r = ResumingReader::new(&flaky, "objects/x", data.len() as u64, 2);
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        assert_eq!(out, data);
        assert_eq!(r.resumes, 3);
    }

    #[test]
    fn a_range_starts_where_asked_and_resumes_inside_it() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let flaky = Flaky {
            data: data.clone(),
            chunk: 700,
        };
        let mut r = ResumingReader::range(&flaky, "objects/x", 2_000, 3_000, 2);
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        assert_eq!(out, &data[2_000..5_000]);
        assert_eq!(r.resumes, 4);
    }

    #[test]
    fn gives_up_without_progress() {
        let flaky = Flaky {
            data: vec![1; 10],
            chunk: 10,
        };
        let mut r = ResumingReader::new(&flaky, "objects/x", 20, 2);
        let mut out = Vec::new();
        assert!(r.read_to_end(&mut out).is_err());
    }

    #[test]
    fn relative_paths_only() {
        for bad in ["", "/etc/passwd", "../x", "objects/../../x", "a//b", "a b"] {
            assert!(check_relative(bad).is_err(), "{bad}");
        }
        assert!(check_relative("objects/abc").is_ok());
    }
}
