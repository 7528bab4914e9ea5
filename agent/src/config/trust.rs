//! The `[trust]` table: extra CA certificates the whole node trusts
//! (appended to the node's bundle for containerd and the kubelet, and
//! trusted by the agent's update, FleetLock and Kubernetes clients), and
//! their checks.

use serde::{Deserialize, Serialize};

/// `[trust]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustConfig {
    /// PEM texts, each one or more certificates.
    #[serde(default)]
    pub ca: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TrustConfigError {
    #[error("trust.ca[{index}]: {detail}")]
    Invalid { index: usize, detail: String },
}

impl TrustConfig {
    pub fn validate(&self) -> Result<(), TrustConfigError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::CertificateDer;
        for (index, pem) in self.ca.iter().enumerate() {
            let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem.as_bytes()).collect();
            match certs {
                Ok(certs) if !certs.is_empty() => {}
                _ => {
                    return Err(TrustConfigError::Invalid {
                        index,
                        detail: "no PEM certificate (BEGIN CERTIFICATE)".into(),
                    })
                }
            }
        }
        Ok(())
    }

    /// The certificates as one PEM bundle (each ending in a newline), empty
    /// when none.
    pub fn bundle(&self) -> String {
        let mut out = String::new();
        for pem in &self.ca {
            out.push_str(pem.trim_end());
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert() -> String {
        rcgen::generate_simple_self_signed(vec!["ca.example".into()])
            .unwrap()
            .cert
            .pem()
    }

    #[test]
    fn certificates_pass_and_join_into_a_bundle() {
        let (a, b) = (cert(), cert());
        let t = TrustConfig {
            ca: vec![a.clone(), b.trim_end().to_owned()],
        };
        t.validate().unwrap();
        assert_eq!(t.bundle(), format!("{}\n{}\n", a.trim_end(), b.trim_end()));
        assert_eq!(TrustConfig::default().bundle(), "");
    }

    #[test]
    fn a_non_certificate_is_refused_naming_its_index() {
        let t = TrustConfig {
            ca: vec![cert(), "hello".into()],
        };
        assert_eq!(
            t.validate().unwrap_err().to_string(),
            "trust.ca[1]: no PEM certificate (BEGIN CERTIFICATE)"
        );
        let broken = "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n";
        let t = TrustConfig {
            ca: vec![broken.into()],
        };
        assert!(t.validate().is_err());
    }
}
