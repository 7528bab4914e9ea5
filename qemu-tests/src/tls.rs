//! A blocking TLS client for the agent's HTTPS API in tests: it trusts the
//! node's certificate only by the SHA-256 pin the node announced (as
//! `ballast --node` does) and presents a client certificate when given
//! one. The handshake signature is still verified with ring, so only the
//! holder of the pinned certificate's key gets through.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ballast::api::identity::Identity;
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName};
use rustls::ClientConfig;

use crate::http::{self, HttpError, Response};

/// TLS settings for one node: its pin and maybe a client identity.
#[derive(Debug, Clone)]
pub struct TlsClient {
    config: Arc<ClientConfig>,
}

impl TlsClient {
    /// Trusts the certificate whose SHA-256 is `pin_hex`; presents
    /// `identity_dir`'s client.crt and client.key when given.
    pub fn pinned(pin_hex: &str, identity_dir: Option<&Path>) -> Result<TlsClient, HttpError> {
        let setup = |m: String| HttpError::Tls(m);
        let mut sha256 = [0u8; 32];
        hex::decode_to_slice(pin_hex.trim(), &mut sha256)
            .map_err(|_| setup(format!("{pin_hex:?} is not a SHA-256 pin")))?;
        let identity = match identity_dir {
            None => None,
            Some(dir) => {
                let cert = dir.join("client.crt");
                let key = dir.join("client.key");
                let chain = CertificateDer::pem_file_iter(&cert)
                    .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| setup(format!("{}: {e}", cert.display())))?;
                let key = PrivateKeyDer::from_pem_file(&key)
                    .map_err(|e| setup(format!("{}: {e}", key.display())))?;
                Some(Identity { chain, key })
            }
        };
        // The agent's own pinned client configuration (one verifier).
        let config = ballast::api::tls::client_config(pin_hex, identity)
            .map_err(|e| setup(ballast::error_chain(&e)))?;
        Ok(TlsClient { config })
    }

    /// One request over TLS to `127.0.0.1:port`, read to the end.
    pub fn request(
        &self,
        port: u16,
        method: &str,
        path: &str,
        body: Option<&str>,
        timeout: Duration,
    ) -> Result<Response, HttpError> {
        let sock = http::connect(port, method, path, timeout)?;
        let name =
            ServerName::try_from("ballast-node").map_err(|e| HttpError::Tls(e.to_string()))?;
        let conn = rustls::ClientConnection::new(self.config.clone(), name)
            .map_err(|e| HttpError::Tls(e.to_string()))?;
        let mut tls = rustls::StreamOwned::new(conn, sock);
        http::exchange(&mut tls, port, method, path, body)
    }
}
