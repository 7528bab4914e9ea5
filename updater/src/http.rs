//! [`Fetch`] over HTTP(S) with reqwest's blocking client (rustls), kept out
//! of the core so the install logic never sees an async runtime.

use std::io::Read;
use std::time::Duration;

use crate::fetch::{check_relative, redact_url, Fetch, FetchError};
use crate::pace::{Pace, Paced};

/// A repository at an `http://` or `https://` base URL.
#[derive(Debug, Clone)]
pub struct HttpFetch {
    base: String,
    client: reqwest::blocking::Client,
}

impl HttpFetch {
    pub fn new(base: &str) -> Result<Self, FetchError> {
        let client = reqwest::blocking::Client::builder()
            .connect_timeout(Duration::from_secs(15))
            // The blocking client applies this to the request and to each
            // body read, not to the whole download: a stall this long is a
            // dropped connection, and the install resumes with a Range.
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| FetchError::Http {
                url: redact_url(base),
                reason: e.without_url().to_string(),
            })?;
        let base = if base.ends_with('/') {
            base.to_owned()
        } else {
            format!("{base}/")
        };
        Ok(HttpFetch { base, client })
    }

    fn url(&self, path: &str) -> Result<String, FetchError> {
        check_relative(path)?;
        Ok(format!("{}{path}", self.base))
    }

    /// GET `url`, from `offset` on, or only `len` bytes from it.
    fn request(
        &self,
        url: &str,
        offset: u64,
        len: Option<u64>,
    ) -> Result<Option<reqwest::blocking::Response>, FetchError> {
        let mut req = self.client.get(url);
        match len {
            Some(len) if len > 0 => {
                let last = offset + len - 1;
                req = req.header(reqwest::header::RANGE, format!("bytes={offset}-{last}"));
            }
            _ if offset > 0 => {
                req = req.header(reqwest::header::RANGE, format!("bytes={offset}-"));
            }
            _ => {}
        }
        let resp = req.send().map_err(|e| FetchError::Http {
            url: redact_url(url),
            reason: e.without_url().to_string(),
        })?;
        let status = resp.status().as_u16();
        match status {
            404 => Ok(None),
            200 | 206 => Ok(Some(resp)),
            _ => Err(FetchError::Status {
                url: redact_url(url),
                status,
            }),
        }
    }
}

impl Fetch for HttpFetch {
    fn get(&self, path: &str, max: usize) -> Result<Option<Vec<u8>>, FetchError> {
        let url = self.url(path)?;
        let Some(resp) = self.request(&url, 0, None)? else {
            return Ok(None);
        };
        let mut bytes = Vec::new();
        Paced::new(resp, Pace::default())
            .take(max as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| FetchError::Http {
                url: redact_url(&url),
                reason: redact_url(&e.to_string()),
            })?;
        if bytes.len() > max {
            return Err(FetchError::TooLarge {
                url: redact_url(&url),
                max,
            });
        }
        Ok(Some(bytes))
    }

    fn open(&self, path: &str, offset: u64) -> Result<Box<dyn Read + Send>, FetchError> {
        self.open_from(path, offset, None)
    }

    fn open_range(
        &self,
        path: &str,
        offset: u64,
        len: u64,
    ) -> Result<Box<dyn Read + Send>, FetchError> {
        self.open_from(path, offset, Some(len))
    }

    fn describe(&self) -> String {
        redact_url(&self.base)
    }
}

impl HttpFetch {
    fn open_from(
        &self,
        path: &str,
        offset: u64,
        len: Option<u64>,
    ) -> Result<Box<dyn Read + Send>, FetchError> {
        let url = self.url(path)?;
        let resp = self
            .request(&url, offset, len)?
            .ok_or_else(|| FetchError::Status {
                url: redact_url(&url),
                status: 404,
            })?;
        if offset > 0 && resp.status().as_u16() == 200 {
            // The server ignored the range: skip what we already have.
            let mut resp = resp;
            std::io::copy(&mut (&mut resp).take(offset), &mut std::io::sink()).map_err(|e| {
                FetchError::Http {
                    url: redact_url(&url),
                    reason: redact_url(&e.to_string()),
                }
            })?;
            return Ok(Box::new(Paced::new(resp, Pace::default())));
        }
        Ok(Box::new(Paced::new(resp, Pace::default())))
    }
}

/// A [`Fetch`] for a repository location: an http(s) URL, a `file://`
/// URL, or a directory path.
pub fn for_location(location: &str) -> Result<Box<dyn Fetch>, FetchError> {
    if location.starts_with("http://") || location.starts_with("https://") {
        return Ok(Box::new(HttpFetch::new(location)?));
    }
    let path = location.strip_prefix("file://").unwrap_or(location);
    Ok(Box::new(crate::fetch::DirFetch { root: path.into() }))
}
