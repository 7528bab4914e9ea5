//! The TCP API's TLS: rustls with the ring provider, the node's identity,
//! and client certificates verified against the operator CA. Clients
//! without a certificate complete the handshake (the probes need no
//! certificate); the router refuses them everything else. A certificate
//! that does not chain to the CA fails the handshake.

use std::sync::{Arc, Mutex};

use rustls::pki_types::CertificateDer;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

use super::identity::Identity;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("api.client_ca: certificate {index} is not a usable CA")]
    CaCertificate {
        index: usize,
        #[source]
        source: rustls::Error,
    },
    #[error("api.client_ca: building the client verifier")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    /// The key never appears: rustls only says what is wrong with it.
    #[error("api: the server certificate and key do not make a TLS identity")]
    Identity(#[source] rustls::Error),
}

/// The rustls server configuration of the TCP API.
pub fn server_config(
    identity: Identity,
    client_ca: Vec<CertificateDer<'static>>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for (index, ca) in client_ca.into_iter().enumerate() {
        roots
            .add(ca)
            .map_err(|source| TlsError::CaCertificate { index, source })?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(TlsError::Verifier)?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Identity)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain, identity.key)
        .map_err(TlsError::Identity)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Client side: trusts exactly the server certificate whose SHA-256
/// (lowercase hex of the DER) is `pin`, the value `api-listening` and
/// `/status` announce. Host names are not checked: the pin is the identity.
/// It remembers the fingerprint the server presented, so a client can say
/// which certificate it refused. The one pinned verifier of the tree: the
/// CLI (`ballast --node`), the API's tests and the VM tests all use it.
#[derive(Debug)]
pub struct PinnedServer {
    pin: String,
    presented: Mutex<Option<String>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl PinnedServer {
    pub fn new(pin: &str) -> Self {
        PinnedServer {
            pin: pin.trim().to_ascii_lowercase(),
            presented: Mutex::new(None),
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        }
    }

    /// The SHA-256 (lowercase hex) of the last certificate a server
    /// presented to this verifier, if any.
    pub fn presented(&self) -> Option<String> {
        self.presented.lock().ok().and_then(|p| p.clone())
    }
}

impl rustls::client::danger::ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let presented = super::identity::cert_sha256(end_entity);
        let matches = presented == self.pin;
        if let Ok(mut p) = self.presented.lock() {
            *p = Some(presented);
        }
        if matches {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "the node's certificate does not match the pinned fingerprint".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A client configuration that pins the node's certificate and presents
/// `identity` (chain and key) when given.
pub fn client_config(
    pin: &str,
    identity: Option<Identity>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    pinned_client_config(Arc::new(PinnedServer::new(pin)), identity)
}

/// [`client_config`] with a verifier the caller keeps, to ask it
/// afterwards what the server presented.
pub fn pinned_client_config(
    verifier: Arc<PinnedServer>,
    identity: Option<Identity>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Identity)?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match identity {
        Some(id) => builder
            .with_client_auth_cert(id.chain, id.key)
            .map_err(TlsError::Identity)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
