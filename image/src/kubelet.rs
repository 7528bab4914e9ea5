//! A kubelet fetched at build time (`--kubelet-url` with `--kubelet-sha256`):
//! streamed over HTTP(S) into a scratch file in the cache while its SHA-256
//! is computed, and moved into place only when the digest matches, so a
//! wrong or truncated download leaves nothing behind. The kubelet's version
//! cannot be asked of a binary of another architecture (`kubelet --version`
//! does not run cross-arch), so it is taken from the URL's `vX.Y.Z` path
//! segment (dl.k8s.io's layout, `.../release/v1.31.2/bin/linux/amd64/kubelet`)
//! or given by the caller.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum KubeletFetchError {
    #[error("--kubelet-sha256 {0:?} is not 64 hexadecimal digits")]
    BadDigest(String),
    #[error("--kubelet-url {url}: not an http:// or https:// URL ending in a file name")]
    BadUrl { url: String },
    #[error("--kubelet-url {url}")]
    Fetch {
        url: String,
        #[source]
        source: ballast_updater::fetch::FetchError,
    },
    #[error("--kubelet-url {url}: reading the download")]
    Read {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("--kubelet-url {url}: SHA-256 is {actual}, expected {expected} (--kubelet-sha256); nothing was kept")]
    Mismatch {
        url: String,
        expected: String,
        actual: String,
    },
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> KubeletFetchError + '_ {
    move |source| KubeletFetchError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The `vX.Y.Z[-suffix]` segment of a URL's path, if any.
pub fn version_from_url(url: &str) -> Option<String> {
    let path = url.split_once("://").map_or(url, |(_, rest)| rest);
    path.split(['/', '?', '#']).find_map(|seg| {
        let rest = seg.strip_prefix('v')?;
        let core = rest.split(['-', '+']).next()?;
        let parts: Vec<&str> = core.split('.').collect();
        (parts.len() == 3
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())))
        .then(|| seg.to_owned())
    })
}

/// Checks `hex` and returns it in lower case.
pub fn parse_digest(hex: &str) -> Result<String, KubeletFetchError> {
    let h = hex.trim().to_ascii_lowercase();
    if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(h)
    } else {
        Err(KubeletFetchError::BadDigest(hex.to_owned()))
    }
}

/// The kubelet at `url` with SHA-256 `sha256`, in `cache/<sha256>/kubelet`:
/// reused when already there with that digest, else downloaded. `progress`
/// gets the bytes read so far (every 8 MiB and at the end).
pub fn fetch(
    url: &str,
    sha256: &str,
    cache: &Path,
    progress: &mut dyn FnMut(u64),
) -> Result<PathBuf, KubeletFetchError> {
    let expected = parse_digest(sha256)?;
    let bad_url = || KubeletFetchError::BadUrl {
        url: ballast_updater::fetch::redact_url(url),
    };
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(bad_url());
    }
    let (base, name) = url.rsplit_once('/').ok_or_else(bad_url)?;
    if name.is_empty() || base.ends_with(':') || base.ends_with('/') {
        return Err(bad_url());
    }
    let dir = cache.join(&expected);
    let dst = dir.join("kubelet");
    if dst.is_file() && sha256_file(&dst)? == expected {
        return Ok(dst);
    }
    let shown = ballast_updater::fetch::redact_url(url);
    let fetch_err = |source| KubeletFetchError::Fetch {
        url: shown.clone(),
        source,
    };
    let http = ballast_updater::http::HttpFetch::new(base).map_err(fetch_err)?;
    let mut body = ballast_updater::fetch::Fetch::open(&http, name, 0).map_err(fetch_err)?;
    fs::create_dir_all(&dir).map_err(io(&dir))?;
    let tmp = dir.join(".download");
    let result = (|| {
        let mut file = fs::File::create(&tmp).map_err(io(&tmp))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut done = 0u64;
        let mut shown_at = 0u64;
        loop {
            let n = body
                .read(&mut buf)
                .map_err(|source| KubeletFetchError::Read {
                    url: shown.clone(),
                    source,
                })?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            file.write_all(&buf[..n]).map_err(io(&tmp))?;
            done += n as u64;
            if done - shown_at >= 8 << 20 {
                progress(done);
                shown_at = done;
            }
        }
        progress(done);
        file.sync_all().map_err(io(&tmp))?;
        let actual = hex::encode(hasher.finalize());
        if actual != expected {
            return Err(KubeletFetchError::Mismatch {
                url: shown.clone(),
                expected: expected.clone(),
                actual,
            });
        }
        fs::rename(&tmp, &dst).map_err(io(&dst))
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        // The digest's directory was made for this download only.
        let _ = fs::remove_dir(&dir);
        return Err(e);
    }
    Ok(dst)
}

fn sha256_file(path: &Path) -> Result<String, KubeletFetchError> {
    let mut file = fs::File::open(path).map_err(io(path))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(io(path))?;
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// Serves `body` for every request on loopback; counts the requests.
    fn serve(body: Vec<u8>) -> (String, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let count = Arc::new(AtomicUsize::new(0));
        let seen = count.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                seen.fetch_add(1, Ordering::SeqCst);
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if conn.read(&mut byte).unwrap_or(0) == 0 {
                        break;
                    }
                    head.push(byte[0]);
                }
                let _ = write!(
                    conn,
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = conn.write_all(&body);
            }
        });
        (url, count)
    }

    fn digest(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    #[test]
    fn a_download_with_the_right_digest_is_kept_and_reused() {
        let body = b"\x7fELF not really a kubelet".repeat(1000);
        let (server, count) = serve(body.clone());
        let cache = tempfile::tempdir().unwrap();
        let url = format!("{server}/release/v1.31.2/bin/linux/amd64/kubelet");
        let mut reported = Vec::new();
        let path = fetch(&url, &digest(&body), cache.path(), &mut |n| {
            reported.push(n)
        })
        .unwrap();
        assert_eq!(fs::read(&path).unwrap(), body);
        assert_eq!(reported.last(), Some(&(body.len() as u64)));
        // Upper-case digests are accepted, and the cached copy is reused.
        let again = fetch(
            &url,
            &digest(&body).to_ascii_uppercase(),
            cache.path(),
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(again, path);
        assert_eq!(count.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_wrong_digest_is_a_clear_error_and_writes_nothing() {
        let (server, _) = serve(b"tampered".to_vec());
        let cache = tempfile::tempdir().unwrap();
        let expected = digest(b"the real kubelet");
        let err = fetch(
            &format!("{server}/kubelet"),
            &expected,
            cache.path(),
            &mut |_| {},
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains(&format!("expected {expected}")) && err.contains(&digest(b"tampered")),
            "{err}"
        );
        assert_eq!(fs::read_dir(cache.path()).unwrap().count(), 0);
    }

    #[test]
    fn bad_arguments_are_refused_before_any_download() {
        let cache = tempfile::tempdir().unwrap();
        let good = digest(b"x");
        for (url, sha, want) in [
            ("http://127.0.0.1:9/kubelet", "abc", "--kubelet-sha256"),
            ("ftp://example/kubelet", good.as_str(), "--kubelet-url"),
            ("http://example/", good.as_str(), "--kubelet-url"),
        ] {
            let err = fetch(url, sha, cache.path(), &mut |_| {})
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(want), "{url}: {err}");
        }
        assert_eq!(fs::read_dir(cache.path()).unwrap().count(), 0);
    }

    #[test]
    fn the_version_comes_from_the_url() {
        assert_eq!(
            version_from_url("https://dl.k8s.io/release/v1.31.2/bin/linux/amd64/kubelet")
                .as_deref(),
            Some("v1.31.2")
        );
        assert_eq!(
            version_from_url("https://mirror/k8s/v1.32.0-rc.1/kubelet").as_deref(),
            Some("v1.32.0-rc.1")
        );
        assert_eq!(version_from_url("https://mirror/v8/kubelet"), None);
        assert_eq!(version_from_url("https://host.v1.2.3/kubelet"), None);
    }
}
