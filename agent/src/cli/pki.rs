//! `ballast pki init DIR` and `ballast pki issue`: the operator's
//! certificate authority for the node API and the client certificates it
//! issues, so an operator never needs openssl.
//!
//! The CA is `DIR/ca.crt` (what nodes get as `[api] client_ca`) and
//! `DIR/ca.key` (0600, stays with the operator). A client certificate is
//! `client.crt` and `client.key` (0600) in the output directory, which is
//! then an identity directory for `ballast --node` (it gets a copy of
//! `ca.crt` too, for reference). The role is the subject Organization
//! (`ballast:admin` or `ballast:reader`), the name the Common Name, and the
//! certificate is for client authentication only.
//!
//! The CA's subject is derived from its key (a short hash of the public
//! key), so `issue` rebuilds the issuer from `ca.key` alone and checks that
//! `ca.crt` is the certificate of that key before signing anything.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// File names inside a CA directory and an identity directory.
pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
pub const CLIENT_CERT: &str = "client.crt";
pub const CLIENT_KEY: &str = "client.key";

/// How long a CA is valid by default (10 years), and a client certificate
/// (1 year: the node keeps no revocation list, so expiry is what retires
/// a lost certificate).
const CA_DAYS: u32 = 3650;
const CLIENT_DAYS: u32 = 365;

#[derive(Debug, clap::Subcommand)]
pub enum PkiCommand {
    /// Make an operator CA: DIR/ca.crt (give it to nodes as `[api]
    /// client_ca`) and DIR/ca.key (0600; keep it offline).
    Init {
        dir: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = CA_DAYS)]
        days: u32,
    },
    /// Issue a client certificate: OUT/client.crt and OUT/client.key
    /// (0600), usable as `ballast --identity OUT`.
    Issue {
        /// The CA directory made by `pki init`.
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// admin (every endpoint) or reader (GET only).
        #[arg(long, value_enum)]
        role: Role,
        /// Who holds it (the certificate's Common Name; the node's audit
        /// records name it).
        #[arg(long)]
        name: String,
        /// Output directory (default: ./NAME).
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Validity in days.
        #[arg(long, default_value_t = CLIENT_DAYS)]
        days: u32,
    },
}

/// A client's role, as the node reads it from the subject Organization.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    Admin,
    Reader,
}

impl Role {
    pub fn organization(self) -> &'static str {
        match self {
            Role::Admin => "ballast:admin",
            Role::Reader => "ballast:reader",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{} already exists; not overwriting a CA or key", path.display())]
    Exists { path: PathBuf },
    #[error("writing {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a CA key made by `ballast pki init`", path.display())]
    BadKey {
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    #[error("{} is not the certificate of {} (not from the same `pki init`)", cert.display(), key.display())]
    Mismatch { cert: PathBuf, key: PathBuf },
    #[error(
        "{name:?} is not a usable name: 1 to 64 characters, letters, digits, '.', '_', '@' or '-'"
    )]
    BadName { name: String },
    #[error("validity must be 1 to 36500 days, not {days}")]
    BadDays { days: u32 },
    #[error("making the certificate")]
    Generate(#[source] rcgen::Error),
}

pub fn run(cmd: PkiCommand) -> anyhow::Result<()> {
    match cmd {
        PkiCommand::Init { dir, days } => {
            let fingerprint = init(&dir, days)?;
            println!(
                "CA written: {} (give it to nodes as [api] client_ca_file or client_ca)\n\
                 key: {} (0600; keep it offline)\nCA sha256: {fingerprint}",
                dir.join(CA_CERT).display(),
                dir.join(CA_KEY).display()
            );
            Ok(())
        }
        PkiCommand::Issue {
            ca,
            role,
            name,
            out,
            days,
        } => {
            let out = out.unwrap_or_else(|| PathBuf::from(&name));
            issue(&ca, role, &name, &out, days)?;
            println!(
                "{} certificate for {name:?} written to {} (client.crt, client.key 0600)\n\
                 use it with: ballast --node HOST --identity {} --pin SHA256 status",
                match role {
                    Role::Admin => "admin",
                    Role::Reader => "reader",
                },
                out.display(),
                out.display()
            );
            Ok(())
        }
    }
}

/// Makes the CA in `dir` (created if missing); refuses to overwrite one.
/// Returns the CA certificate's SHA-256 fingerprint.
pub fn init(dir: &Path, days: u32) -> Result<String, PkiError> {
    check_days(days)?;
    let (cert_path, key_path) = (dir.join(CA_CERT), dir.join(CA_KEY));
    for path in [&cert_path, &key_path] {
        if path.exists() {
            return Err(PkiError::Exists { path: path.clone() });
        }
    }
    std::fs::create_dir_all(dir).map_err(|source| PkiError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let key = KeyPair::generate().map_err(PkiError::Generate)?;
    let cert = ca_params(&key, days)?
        .self_signed(&key)
        .map_err(PkiError::Generate)?;
    // The key first: a CA certificate without its key is useless, the
    // reverse is harmless to retry.
    write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok(hex::encode(sha256(cert.der())))
}

/// Issues a client certificate for `name` with `role`, signed by the CA in
/// `ca_dir`, into `out` (created if missing; existing files are refused).
pub fn issue(ca_dir: &Path, role: Role, name: &str, out: &Path, days: u32) -> Result<(), PkiError> {
    check_days(days)?;
    if !valid_name(name) {
        return Err(PkiError::BadName {
            name: name.to_owned(),
        });
    }
    let (ca_cert_path, ca_key_path) = (ca_dir.join(CA_CERT), ca_dir.join(CA_KEY));
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|source| PkiError::Read {
            path: path.to_owned(),
            source,
        })
    };
    let ca_key_pem = read(&ca_key_path)?;
    let ca_cert_pem = read(&ca_cert_path)?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|source| PkiError::BadKey {
        path: ca_key_path.clone(),
        source,
    })?;
    // The issuer as `init` made it: same subject, same key. Its own
    // signature is thrown away; only its name and key id are used.
    let issuer = ca_params(&ca_key, CA_DAYS)?
        .self_signed(&ca_key)
        .map_err(PkiError::Generate)?;
    if !ca_cert_matches(&ca_cert_pem, &ca_key) {
        return Err(PkiError::Mismatch {
            cert: ca_cert_path,
            key: ca_key_path,
        });
    }

    let (cert_path, key_path) = (out.join(CLIENT_CERT), out.join(CLIENT_KEY));
    for path in [&cert_path, &key_path] {
        if path.exists() {
            return Err(PkiError::Exists { path: path.clone() });
        }
    }
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(PkiError::Generate)?;
    params
        .distinguished_name
        .push(DnType::OrganizationName, role.organization());
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, days);
    let key = KeyPair::generate().map_err(PkiError::Generate)?;
    let cert = params
        .signed_by(&key, &issuer, &ca_key)
        .map_err(PkiError::Generate)?;

    std::fs::create_dir_all(out).map_err(|source| PkiError::Write {
        path: out.to_owned(),
        source,
    })?;
    write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&cert_path, cert.pem().as_bytes(), 0o644)?;
    // A copy of the CA beside it, for reference; overwriting one is fine.
    let ca_copy = out.join(CA_CERT);
    if ca_copy != ca_cert_path {
        std::fs::write(&ca_copy, &ca_cert_pem).map_err(|source| PkiError::Write {
            path: ca_copy,
            source,
        })?;
    }
    Ok(())
}

/// The CA's parameters, all derived from its key so `issue` can rebuild
/// the issuer: CN names the key's hash, so two operators' CAs differ.
fn ca_params(key: &KeyPair, days: u32) -> Result<CertificateParams, PkiError> {
    let id = hex::encode(&sha256(&key.public_key_der())[..8]);
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(PkiError::Generate)?;
    params
        .distinguished_name
        .push(DnType::OrganizationName, "ballast");
    params
        .distinguished_name
        .push(DnType::CommonName, format!("ballast operator CA {id}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params, days);
    Ok(params)
}

/// Whether the PEM certificate carries `key`'s public key and the subject
/// `ca_params` gives it.
fn ca_cert_matches(cert_pem: &str, key: &KeyPair) -> bool {
    use tokio_rustls::rustls::pki_types::{pem::PemObject, CertificateDer};
    let Ok(der) = CertificateDer::from_pem_slice(cert_pem.as_bytes()) else {
        return false;
    };
    let id = hex::encode(&sha256(&key.public_key_der())[..8]);
    let cn = format!("ballast operator CA {id}");
    contains(&der, &key.public_key_der()) && contains(&der, cn.as_bytes())
}

/// SHA-256 of `data` (ring, as the node hashes its certificate).
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, data).as_ref());
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// Valid from yesterday (clock skew between the operator and nodes) for
/// `days` days.
fn set_validity(params: &mut CertificateParams, days: u32) {
    let today = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|d| i64::try_from(d.as_secs() / 86_400).ok())
        .unwrap_or(0);
    let (y, m, d) = civil_from_days(today - 1);
    params.not_before = rcgen::date_time_ymd(y, m, d);
    let (y, m, d) = civil_from_days(today + i64::from(days));
    params.not_after = rcgen::date_time_ymd(y, m, d);
}

/// Year, month, day of a count of days since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(z: i64) -> (i32, u8, u8) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    // Month and day are in range by construction; the year for any date
    // a certificate can name.
    (
        i32::try_from(y).unwrap_or(i32::MAX),
        u8::try_from(m).unwrap_or(1),
        u8::try_from(d).unwrap_or(1),
    )
}

fn check_days(days: u32) -> Result<(), PkiError> {
    if (1..=36_500).contains(&days) {
        Ok(())
    } else {
        Err(PkiError::BadDays { days })
    }
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '@' | '-'))
}

/// Creates `path` with `mode` from the start (never briefly readable by
/// others); refuses to replace an existing file.
fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<(), PkiError> {
    let err = |source| PkiError::Write {
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(err)?;
    f.write_all(data).and_then(|()| f.sync_all()).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Arc;
    use tokio_rustls::rustls::pki_types::{pem::PemObject, CertificateDer, UnixTime};
    use tokio_rustls::rustls::server::WebPkiClientVerifier;
    use tokio_rustls::rustls::RootCertStore;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn cert_der(path: &Path) -> CertificateDer<'static> {
        CertificateDer::from_pem_file(path).unwrap()
    }

    /// Whether `cert` is accepted by the verifier a node builds from `ca`.
    fn accepted_by(ca: &Path, cert: &Path) -> bool {
        let mut roots = RootCertStore::empty();
        roots.add(cert_der(ca)).unwrap();
        let verifier = WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(tokio_rustls::rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        verifier
            .verify_client_cert(&cert_der(cert), &[], UnixTime::now())
            .is_ok()
    }

    /// The DER of an Organization attribute holding `value` (OID 2.5.4.10,
    /// UTF8String).
    fn organization_der(value: &str) -> Vec<u8> {
        let mut v = vec![
            0x06,
            0x03,
            0x55,
            0x04,
            0x0a,
            0x0c,
            u8::try_from(value.len()).unwrap(),
        ];
        v.extend_from_slice(value.as_bytes());
        v
    }

    #[test]
    fn issued_certificates_chain_to_their_ca_and_carry_the_role() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        let fp = init(&ca, 30).unwrap();
        assert_eq!(fp.len(), 64);
        assert_eq!(mode(&ca.join(CA_KEY)), 0o600);

        let admin = dir.path().join("alice");
        issue(&ca, Role::Admin, "alice", &admin, 7).unwrap();
        let reader = dir.path().join("bob");
        issue(&ca, Role::Reader, "bob", &reader, 7).unwrap();
        assert_eq!(mode(&admin.join(CLIENT_KEY)), 0o600);
        assert_eq!(mode(&reader.join(CLIENT_KEY)), 0o600);
        assert!(admin.join(CA_CERT).exists());

        assert!(accepted_by(&ca.join(CA_CERT), &admin.join(CLIENT_CERT)));
        assert!(accepted_by(&ca.join(CA_CERT), &reader.join(CLIENT_CERT)));
        let admin_der = cert_der(&admin.join(CLIENT_CERT));
        let reader_der = cert_der(&reader.join(CLIENT_CERT));
        assert!(contains(&admin_der, &organization_der("ballast:admin")));
        assert!(!contains(&admin_der, &organization_der("ballast:reader")));
        assert!(contains(&reader_der, &organization_der("ballast:reader")));
        assert!(contains(&admin_der, b"alice"));

        // Another operator's CA does not accept them.
        let other = dir.path().join("other");
        init(&other, 30).unwrap();
        assert!(!accepted_by(&other.join(CA_CERT), &admin.join(CLIENT_CERT)));
    }

    #[test]
    fn bad_inputs_are_refused_and_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        init(&ca, 30).unwrap();
        let before = std::fs::read(ca.join(CA_KEY)).unwrap();
        assert!(matches!(init(&ca, 30), Err(PkiError::Exists { .. })));
        assert_eq!(std::fs::read(ca.join(CA_KEY)).unwrap(), before);
        assert!(matches!(
            init(&dir.path().join("x"), 0),
            Err(PkiError::BadDays { days: 0 })
        ));

        let out = dir.path().join("out");
        for name in ["", "a b", "../x", &"n".repeat(65)] {
            assert!(matches!(
                issue(&ca, Role::Admin, name, &out, 7),
                Err(PkiError::BadName { .. })
            ));
        }
        assert!(!out.exists());
        issue(&ca, Role::Admin, "alice", &out, 7).unwrap();
        let err = issue(&ca, Role::Admin, "alice", &out, 7).unwrap_err();
        assert!(matches!(err, PkiError::Exists { .. }), "{err}");

        // A CA certificate from another `init` beside this key is refused.
        let other = dir.path().join("other");
        init(&other, 30).unwrap();
        std::fs::copy(other.join(CA_CERT), ca.join(CA_CERT)).unwrap();
        let err = issue(&ca, Role::Reader, "bob", &dir.path().join("bob"), 7).unwrap_err();
        assert!(matches!(err, PkiError::Mismatch { .. }), "{err}");
        assert!(!dir.path().join("bob").exists());
    }

    #[test]
    fn civil_dates_are_right() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }
}
