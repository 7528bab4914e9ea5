//! [`Fetch`] over HTTP(S) with reqwest's blocking client (rustls), kept out
//! of the core so the install logic never sees an async runtime.

use std::io::Read;
use std::time::Duration;

use crate::fetch::{check_relative, redact_url, Fetch, FetchError};
use crate::pace::{Pace, Paced};

/// What the caller adds to an HTTP client: a proxy (with the hosts
/// reached directly) and extra trusted CA certificates. The agent builds
/// it from `[proxy]` and `[trust]`; the updater only applies it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outbound {
    /// The proxy for `https://` URLs (`http://host:port`).
    pub https_proxy: Option<String>,
    /// The proxy for `http://` URLs.
    pub http_proxy: Option<String>,
    /// Hosts, `.domain` suffixes, IP addresses and CIDRs reached directly
    /// (besides [`ALWAYS_DIRECT`]).
    pub no_proxy: Vec<String>,
    /// Extra trusted CA certificates (PEM), beside the built-in roots.
    pub extra_ca_pem: String,
}

/// Never through a proxy, whatever `no_proxy` says: the node itself and
/// link-local addresses (instance metadata, which must not leave the host).
pub const ALWAYS_DIRECT: &[&str] = &[
    "localhost",
    "127.0.0.0/8",
    "::1",
    "169.254.0.0/16",
    "fe80::/10",
];

impl Outbound {
    /// Whether a proxy is set.
    pub fn has_proxy(&self) -> bool {
        self.https_proxy.is_some() || self.http_proxy.is_some()
    }

    /// The comma-separated direct list reqwest's `NoProxy` reads.
    pub fn direct_list(&self) -> String {
        let mut direct: Vec<&str> = ALWAYS_DIRECT.to_vec();
        for entry in &self.no_proxy {
            if !direct.contains(&entry.as_str()) {
                direct.push(entry);
            }
        }
        direct.join(",")
    }

    /// The proxies to add to a reqwest client builder (async or blocking).
    pub fn proxies(&self) -> Result<Vec<reqwest::Proxy>, String> {
        let mut out = Vec::new();
        let direct = self.direct_list();
        for (url, https) in [(&self.https_proxy, true), (&self.http_proxy, false)] {
            let Some(url) = url else { continue };
            let proxy = if https {
                reqwest::Proxy::https(url)
            } else {
                reqwest::Proxy::http(url)
            }
            .map_err(|e| format!("proxy {}: {e}", crate::fetch::redact_url(url)))?;
            out.push(proxy.no_proxy(reqwest::NoProxy::from_string(&direct)));
        }
        Ok(out)
    }

    /// The extra roots to add to a reqwest client builder.
    pub fn roots(&self) -> Result<Vec<reqwest::Certificate>, String> {
        if self.extra_ca_pem.trim().is_empty() {
            return Ok(Vec::new());
        }
        reqwest::Certificate::from_pem_bundle(self.extra_ca_pem.as_bytes())
            .map_err(|e| format!("extra CA certificates: {e}"))
    }
}

/// A repository at an `http://` or `https://` base URL.
#[derive(Debug, Clone)]
pub struct HttpFetch {
    base: String,
    client: reqwest::blocking::Client,
}

impl HttpFetch {
    pub fn new(base: &str) -> Result<Self, FetchError> {
        Self::with_outbound(base, &Outbound::default())
    }

    /// Like [`HttpFetch::new`], through `outbound`'s proxy and trusting
    /// its extra CA certificates.
    pub fn with_outbound(base: &str, outbound: &Outbound) -> Result<Self, FetchError> {
        let setup = |reason: String| FetchError::Http {
            url: redact_url(base),
            reason,
        };
        let mut builder = reqwest::blocking::Client::builder();
        if outbound.has_proxy() {
            // The configured proxy replaces the environment's.
            builder = builder.no_proxy();
        }
        for proxy in outbound.proxies().map_err(setup)? {
            builder = builder.proxy(proxy);
        }
        for root in outbound.roots().map_err(setup)? {
            builder = builder.add_root_certificate(root);
        }
        let client = builder
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
    for_location_with(location, &Outbound::default())
}

/// [`for_location`] with a proxy and extra CA certificates for http(s).
pub fn for_location_with(
    location: &str,
    outbound: &Outbound,
) -> Result<Box<dyn Fetch>, FetchError> {
    if location.starts_with("http://") || location.starts_with("https://") {
        return Ok(Box::new(HttpFetch::with_outbound(location, outbound)?));
    }
    let path = location.strip_prefix("file://").unwrap_or(location);
    Ok(Box::new(crate::fetch::DirFetch { root: path.into() }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_direct_list_always_holds_the_node_and_link_local() {
        let o = Outbound {
            https_proxy: Some("http://proxy.example:3128".into()),
            no_proxy: vec![".svc".into(), "localhost".into()],
            ..Outbound::default()
        };
        assert_eq!(
            o.direct_list(),
            "localhost,127.0.0.0/8,::1,169.254.0.0/16,fe80::/10,.svc"
        );
        assert_eq!(o.proxies().unwrap().len(), 1);
        assert!(Outbound::default().proxies().unwrap().is_empty());
        assert!(Outbound::default().roots().unwrap().is_empty());
    }

    #[test]
    fn a_bad_bundle_is_an_error() {
        let o = Outbound {
            extra_ca_pem: "-----BEGIN CERTIFICATE-----\n!!\n-----END CERTIFICATE-----\n".into(),
            ..Outbound::default()
        };
        assert!(o.roots().is_err());
        assert!(HttpFetch::with_outbound("https://repo.example/", &o).is_err());
    }
}
