//! The node's TLS identity: the operator's certificate and key when
//! `[api]` gives them, otherwise a key made on first boot and a
//! self-signed certificate naming the host name and addresses, both kept
//! on STATE (`/var/lib/ballast/api`, 0600, written atomically) so the
//! fingerprint clients pin stays the same across boots.

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::ApiConfig;

/// Where a generated identity is kept.
pub const IDENTITY_DIR: &str = "/var/lib/ballast/api";
pub const KEY_FILE: &str = "server.key";
pub const CERT_FILE: &str = "server.crt";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("reading {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The text is never part of the message: it may be a key.
    #[error("{what}: no PEM {kind} found")]
    Pem { what: String, kind: &'static str },
    #[error("making the server certificate")]
    Generate(#[source] rcgen::Error),
    #[error(transparent)]
    Atomic(crate::atomic::AtomicError),
}

/// A certificate chain (leaf first) and its key.
#[derive(Debug)]
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    /// SHA-256 of the leaf certificate, as clients pin it.
    pub fn fingerprint(&self) -> String {
        self.chain
            .first()
            .map(|c| cert_sha256(c))
            .unwrap_or_default()
    }
}

/// Lowercase hex SHA-256 of a DER certificate: the form `api-listening`,
/// `/status` and the client's pin use.
pub fn cert_sha256(der: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, der))
}

/// Text given inline or as a file.
fn text_or_file(
    text: &Option<String>,
    file: &Option<PathBuf>,
) -> Result<Option<(String, String)>, IdentityError> {
    match (text, file) {
        (Some(t), _) => Ok(Some((t.clone(), "inline".into()))),
        (None, Some(path)) => std::fs::read_to_string(path)
            .map(|t| Some((t, path.display().to_string())))
            .map_err(|source| IdentityError::Read {
                path: path.clone(),
                source,
            }),
        (None, None) => Ok(None),
    }
}

pub fn parse_certs(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(IdentityError::Pem {
            what: what.into(),
            kind: "certificate",
        });
    }
    Ok(certs)
}

fn parse_key(pem: &str, what: &str) -> Result<PrivateKeyDer<'static>, IdentityError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|_| IdentityError::Pem {
        what: what.into(),
        kind: "private key",
    })
}

/// The operator CA's certificates from `client_ca` or `client_ca_file`.
pub fn client_ca(config: &ApiConfig) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    match text_or_file(&config.client_ca, &config.client_ca_file)? {
        Some((pem, what)) => parse_certs(&pem, &format!("api.client_ca ({what})")),
        None => Err(IdentityError::Pem {
            what: "api.client_ca".into(),
            kind: "certificate",
        }),
    }
}

/// The operator's identity if configured, else the one kept in `dir`
/// (made now if missing or unreadable) for `hostname` and `addresses`.
pub fn load_or_create(
    config: &ApiConfig,
    dir: &Path,
    hostname: &str,
    addresses: &[IpAddr],
) -> Result<Identity, IdentityError> {
    let cert = text_or_file(&config.server_cert, &config.server_cert_file)?;
    let key = text_or_file(&config.server_key, &config.server_key_file)?;
    if let (Some((cert, cert_from)), Some((key, key_from))) = (cert, key) {
        return Ok(Identity {
            chain: parse_certs(&cert, &format!("api.server_cert ({cert_from})"))?,
            key: parse_key(&key, &format!("api.server_key ({key_from})"))?,
        });
    }
    let key_path = dir.join(KEY_FILE);
    let cert_path = dir.join(CERT_FILE);
    let kept = std::fs::read_to_string(&key_path)
        .ok()
        .zip(std::fs::read_to_string(&cert_path).ok());
    if let Some((key, cert)) = kept {
        match (
            parse_key(&key, &key_path.display().to_string()),
            parse_certs(&cert, &cert_path.display().to_string()),
        ) {
            (Ok(key), Ok(chain)) => return Ok(Identity { chain, key }),
            _ => {
                tracing::warn!(dir = %dir.display(), "kept API identity unreadable; making a new one")
            }
        }
    }
    let (key_pem, cert_pem) = generate(hostname, addresses).map_err(IdentityError::Generate)?;
    std::fs::create_dir_all(dir).map_err(|source| IdentityError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    // The key first: a certificate without its key is useless.
    write_atomic(&key_path, key_pem.as_bytes(), 0o600)?;
    write_atomic(&cert_path, cert_pem.as_bytes(), 0o600)?;
    tracing::info!(dir = %dir.display(), "made the API server identity");
    Ok(Identity {
        chain: parse_certs(&cert_pem, "generated certificate")?,
        key: parse_key(&key_pem, "generated key")?,
    })
}

/// A P-256 key and a self-signed certificate naming the host and its
/// addresses; (key PEM, certificate PEM). Clients pin the fingerprint, so
/// the names are for humans and tools that check them.
fn generate(hostname: &str, addresses: &[IpAddr]) -> Result<(String, String), rcgen::Error> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let cert = server_params(hostname, addresses)?.self_signed(&key)?;
    Ok((key.serialize_pem(), cert.pem()))
}

/// The self-signed certificate's contents. Its validity is fixed, 1975 to
/// 4096 (rcgen's defaults), never derived from the clock: the identity is
/// made on the first boot, often before the first NTP answer (a server's
/// RTC in 2015, a VM without one), and is kept; a validity from that clock
/// would start years in the past, and one regenerated after the step would
/// change the fingerprint clients pinned from `api-listening`.
fn server_params(
    hostname: &str,
    addresses: &[IpAddr],
) -> Result<rcgen::CertificateParams, rcgen::Error> {
    let mut names = vec!["localhost".to_owned()];
    if !hostname.is_empty() && hostname != "localhost" {
        names.insert(0, hostname.to_owned());
    }
    let mut params = rcgen::CertificateParams::new(names)?;
    for ip in addresses {
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress(*ip));
    }
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, hostname);
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "ballast node");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let fixed = rcgen::CertificateParams::default();
    params.not_before = fixed.not_before;
    params.not_after = fixed.not_after;
    Ok(params)
}

/// Write to a temporary file, fsync, rename over `path`, fsync the
/// directory: a crash leaves the old file or the new one, never half.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), IdentityError> {
    crate::atomic::write(path, bytes, mode).map_err(IdentityError::Atomic)
}

/// The node's addresses for the certificate: every non-loopback address
/// of every interface, as the kernel lists them.
pub fn node_addresses() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut out: Vec<IpAddr> = addrs
        .filter_map(|a| a.address)
        .filter_map(|a| {
            a.as_sockaddr_in()
                .map(|s| IpAddr::V4(s.ip()))
                .or_else(|| a.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())))
        })
        .filter(|ip| !ip.is_loopback())
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_generated_identity_is_kept_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let kept = dir.path().join("api");
        let config = ApiConfig::default();
        let ip: IpAddr = "10.0.2.15".parse().unwrap();
        let first = load_or_create(&config, &kept, "node-1", &[ip]).unwrap();
        for f in [KEY_FILE, CERT_FILE] {
            let meta = std::fs::metadata(kept.join(f)).unwrap();
            assert_eq!(meta.mode() & 0o777, 0o600, "{f}");
        }
        let second = load_or_create(&config, &kept, "node-1", &[ip]).unwrap();
        assert_eq!(first.fingerprint(), second.fingerprint());
        assert_eq!(first.fingerprint().len(), 64);
        let subject = crate::api::auth::subject(&first.chain[0]).unwrap();
        assert_eq!(subject.common_name.as_deref(), Some("node-1"));
        // The SAN holds the address bytes.
        let der: &[u8] = &first.chain[0];
        assert!(der.windows(4).any(|w| w == [10, 0, 2, 15]));
        // A damaged key is replaced, not served.
        std::fs::write(kept.join(KEY_FILE), "garbage").unwrap();
        let third = load_or_create(&config, &kept, "node-1", &[ip]).unwrap();
        assert_ne!(third.fingerprint(), first.fingerprint());
    }

    #[test]
    fn operator_identity_wins_and_bad_keys_are_not_echoed() {
        let dir = tempfile::tempdir().unwrap();
        let (key, cert) = generate("given", &[]).unwrap();
        let config = ApiConfig {
            server_cert: Some(cert.clone()),
            server_key: Some(key),
            ..ApiConfig::default()
        };
        let id = load_or_create(&config, dir.path(), "node-1", &[]).unwrap();
        assert_eq!(
            id.fingerprint(),
            cert_sha256(&parse_certs(&cert, "t").unwrap()[0])
        );
        assert!(!dir.path().join(KEY_FILE).exists());
        let bad = ApiConfig {
            server_cert: Some(cert),
            server_key: Some("-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n".into()),
            ..ApiConfig::default()
        };
        let err = load_or_create(&bad, dir.path(), "n", &[]).unwrap_err();
        let text = crate::error_chain(&err);
        assert!(
            text.contains("server_key") && !text.contains("c2VjcmV0"),
            "{text}"
        );
    }

    #[test]
    fn fingerprints_are_lowercase_hex_sha256() {
        assert_eq!(
            cert_sha256(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn atomic_writes_replace_whole_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        write_atomic(&path, b"one", 0o600).unwrap();
        write_atomic(&path, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn the_validity_does_not_come_from_the_clock() {
        let p = server_params("node-1", &["10.0.2.15".parse().unwrap()]).unwrap();
        assert_eq!(p.not_before.year(), 1975);
        assert_eq!(p.not_after.year(), 4096);
    }
}
