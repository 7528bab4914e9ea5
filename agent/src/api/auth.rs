//! Who is asking and what they may do. A TCP client is known by the
//! certificate it presented (already verified against the operator CA by
//! rustls): its subject's CommonName names it in the audit, its
//! Organization gives the role. The Unix socket is root-only and is admin.
//! Which role each path needs is [`required`]; the router asks [`allow`].

use hyper::Method;

/// The Organization of a certificate that may do everything.
pub const ROLE_ADMIN: &str = "ballast:admin";
/// The Organization of a certificate that may only read (GET).
pub const ROLE_READER: &str = "ballast:reader";
/// The audit name of requests over the Unix socket.
pub const LOCAL_CLIENT: &str = "local";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Reader,
    Admin,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Reader => ROLE_READER,
            Role::Admin => ROLE_ADMIN,
        }
    }
}

/// The client of one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Client {
    /// The Unix socket (root only).
    Local,
    /// A verified certificate: its CommonName and its role, if its
    /// Organization names one.
    Certificate { name: String, role: Option<Role> },
    /// TCP without a certificate: only the probes.
    Anonymous,
}

impl Client {
    /// From the verified peer certificate of a TLS connection.
    pub fn from_peer(cert: Option<&[u8]>) -> Client {
        let Some(der) = cert else {
            return Client::Anonymous;
        };
        let subject = subject(der).unwrap_or_default();
        let role = if subject.organizations.iter().any(|o| o == ROLE_ADMIN) {
            Some(Role::Admin)
        } else if subject.organizations.iter().any(|o| o == ROLE_READER) {
            Some(Role::Reader)
        } else {
            None
        };
        Client::Certificate {
            name: subject.common_name.unwrap_or_else(|| "(no CN)".into()),
            role,
        }
    }

    /// The name in the audit log.
    pub fn who(&self) -> String {
        match self {
            Client::Local => LOCAL_CLIENT.into(),
            Client::Certificate { name, .. } => name.clone(),
            Client::Anonymous => "anonymous".into(),
        }
    }

    fn role(&self) -> Option<Role> {
        match self {
            Client::Local => Some(Role::Admin),
            Client::Certificate { role, .. } => *role,
            Client::Anonymous => None,
        }
    }
}

/// What a request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Probes: anyone who reaches the port.
    Nothing,
    Role(Role),
}

/// The role a request needs: probes none, reads a reader, the rest admin.
pub fn required(method: &Method, path: &str) -> Need {
    match (method, path) {
        (&Method::GET, "/healthz" | "/readyz") => Need::Nothing,
        (&Method::GET | &Method::HEAD, _) => Need::Role(Role::Reader),
        _ => Need::Role(Role::Admin),
    }
}

/// Why a request is refused before routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// 401: no client certificate.
    Unauthenticated,
    /// 403: a certificate without the role.
    Forbidden,
}

/// Whether `client` may make a request that needs `need`.
pub fn allow(client: &Client, need: Need) -> Result<(), Refusal> {
    match need {
        Need::Nothing => Ok(()),
        Need::Role(needed) => match (client, client.role()) {
            (Client::Anonymous, _) => Err(Refusal::Unauthenticated),
            (_, Some(role)) if role >= needed => Ok(()),
            _ => Err(Refusal::Forbidden),
        },
    }
}

/// The parts of a certificate subject the API uses.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Subject {
    pub common_name: Option<String>,
    pub organizations: Vec<String>,
}

const OID_COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];
const OID_ORGANIZATION: &[u8] = &[0x55, 0x04, 0x0a];

/// Reads the subject of a DER X.509 certificate: the few fields of the
/// TBSCertificate before it, then its RDNs. `None` when the DER is not
/// shaped like a certificate (never panics on any input).
pub fn subject(cert: &[u8]) -> Option<Subject> {
    let (tag, certificate, _) = tlv(cert)?;
    if tag != 0x30 {
        return None;
    }
    let (tag, tbs, _) = tlv(certificate)?;
    if tag != 0x30 {
        return None;
    }
    let mut rest = tbs;
    // [0] version (optional), serial, signature algorithm, issuer, validity.
    let (tag, _, after) = tlv(rest)?;
    if tag == 0xa0 {
        rest = after;
    }
    for _ in 0..4 {
        rest = tlv(rest)?.2;
    }
    let (tag, name, _) = tlv(rest)?;
    if tag != 0x30 {
        return None;
    }
    let mut subject = Subject::default();
    let mut rdns = name;
    while !rdns.is_empty() {
        let (tag, set, next) = tlv(rdns)?;
        rdns = next;
        if tag != 0x31 {
            return None;
        }
        let mut attributes = set;
        while !attributes.is_empty() {
            let (tag, attribute, next) = tlv(attributes)?;
            attributes = next;
            if tag != 0x30 {
                return None;
            }
            let (tag, oid, value) = tlv(attribute)?;
            if tag != 0x06 {
                return None;
            }
            let (_, text, _) = tlv(value)?;
            // UTF8String, PrintableString or IA5String: bytes are text.
            let text = String::from_utf8_lossy(text).into_owned();
            if oid == OID_COMMON_NAME {
                subject.common_name = Some(text);
            } else if oid == OID_ORGANIZATION {
                subject.organizations.push(text);
            }
        }
    }
    Some(subject)
}

/// One DER tag-length-value: (tag, contents, the bytes after it).
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    if tag & 0x1f == 0x1f {
        return None; // high tag numbers appear nowhere we look
    }
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let (bytes, after) = rest.split_at(count);
        rest = after;
        bytes.iter().fold(0usize, |n, b| (n << 8) | usize::from(*b))
    };
    if rest.len() < len {
        return None;
    }
    let (contents, after) = rest.split_at(len);
    Some((tag, contents, after))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(cn: &str, orgs: &[&str]) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        for o in orgs {
            params
                .distinguished_name
                .push(rcgen::DnType::OrganizationName, *o);
        }
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn the_subject_gives_name_and_role() {
        let admin = Client::from_peer(Some(&cert("alice", &[ROLE_ADMIN])));
        assert_eq!(
            admin,
            Client::Certificate {
                name: "alice".into(),
                role: Some(Role::Admin)
            }
        );
        let reader = Client::from_peer(Some(&cert("bob", &[ROLE_READER])));
        assert_eq!(reader.who(), "bob");
        assert_eq!(reader.role(), Some(Role::Reader));
        let none = Client::from_peer(Some(&cert("eve", &["ballast:root", "Acme"])));
        assert_eq!(none.role(), None);
        assert_eq!(Client::from_peer(None), Client::Anonymous);
    }

    #[test]
    fn roles_per_path() {
        let admin = Client::Certificate {
            name: "a".into(),
            role: Some(Role::Admin),
        };
        let reader = Client::Certificate {
            name: "r".into(),
            role: Some(Role::Reader),
        };
        let nobody = Client::Certificate {
            name: "n".into(),
            role: None,
        };
        let cases = [
            (Method::GET, "/healthz", [Ok(()), Ok(()), Ok(()), Ok(())]),
            (Method::GET, "/readyz", [Ok(()), Ok(()), Ok(()), Ok(())]),
            (
                Method::GET,
                "/status",
                [
                    Ok(()),
                    Ok(()),
                    Err(Refusal::Forbidden),
                    Err(Refusal::Unauthenticated),
                ],
            ),
            (
                Method::POST,
                "/v1/reboot",
                [
                    Ok(()),
                    Err(Refusal::Forbidden),
                    Err(Refusal::Forbidden),
                    Err(Refusal::Unauthenticated),
                ],
            ),
            (
                Method::PUT,
                "/v1/user-data",
                [
                    Ok(()),
                    Err(Refusal::Forbidden),
                    Err(Refusal::Forbidden),
                    Err(Refusal::Unauthenticated),
                ],
            ),
            // A probe path with another method is not a probe.
            (
                Method::POST,
                "/healthz",
                [
                    Ok(()),
                    Err(Refusal::Forbidden),
                    Err(Refusal::Forbidden),
                    Err(Refusal::Unauthenticated),
                ],
            ),
        ];
        for (method, path, expected) in cases {
            let need = required(&method, path);
            let clients = [&admin, &reader, &nobody, &Client::Anonymous];
            for (client, want) in clients.into_iter().zip(expected) {
                assert_eq!(allow(client, need), want, "{method} {path} {client:?}");
            }
            assert_eq!(allow(&Client::Local, need), Ok(()));
        }
    }

    #[test]
    fn malformed_der_is_no_subject_and_never_panics() {
        let good = cert("alice", &[ROLE_ADMIN]);
        assert!(subject(&good).is_some());
        for len in 0..good.len() {
            let _ = subject(&good[..len]);
        }
        let mut flipped = good.clone();
        for i in 0..flipped.len() {
            flipped[i] ^= 0xff;
            let _ = subject(&flipped);
            flipped[i] ^= 0xff;
        }
        assert_eq!(subject(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
    }
}
