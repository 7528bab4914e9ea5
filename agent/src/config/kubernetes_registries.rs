//! `[kubernetes.registries."<host>"]`: per-registry mirrors, CA and pull
//! credentials for containerd, and their checks. The table key is a
//! registry host as image references name it (`docker.io`,
//! `registry.example.com:5000`, `10.0.0.5:5000`) or `_default` (every
//! registry without a table of its own). [`crate::kubernetes::registries`]
//! renders them to containerd's `config_path` layout.

use serde::{Deserialize, Serialize};

use super::kubernetes::Secret;
use super::kubernetes_validate::{dns1123_subdomain, KubernetesConfigError};

/// One registry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// `https://` (or `http://`) URLs tried in order before the registry
    /// itself; they may pull and resolve tags.
    #[serde(default)]
    pub mirrors: Vec<String>,
    /// A CA bundle (PEM) trusted for the registry and its mirrors, besides
    /// the node's bundle.
    pub ca: Option<String>,
    /// The same, as a file on the node.
    pub ca_file: Option<std::path::PathBuf>,
    /// Basic credentials for pulls (with `password`).
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// `base64(username:password)`, as in a Docker config's `auth`, instead
    /// of `username`/`password`.
    pub auth: Option<Secret>,
}

impl RegistryConfig {
    /// Whether pull credentials are set.
    pub fn has_credentials(&self) -> bool {
        self.password.is_some() || self.auth.is_some()
    }
}

fn invalid(key: String, detail: impl Into<String>) -> KubernetesConfigError {
    KubernetesConfigError::Invalid {
        key,
        detail: detail.into(),
    }
}

/// Checks one registry table; `host` is its key.
pub fn validate(host: &str, r: &RegistryConfig) -> Result<(), KubernetesConfigError> {
    let at = |field: &str| format!("kubernetes.registries.{host:?}{field}");
    registry_host(host).map_err(|d| invalid(at(""), d))?;
    for (i, mirror) in r.mirrors.iter().enumerate() {
        mirror_url(mirror).map_err(|d| invalid(at(&format!(".mirrors[{i}]")), d))?;
    }
    if r.ca.is_some() && r.ca_file.is_some() {
        return Err(invalid(at(".ca"), "set ca or ca_file, not both"));
    }
    if let Some(pem) = &r.ca {
        if !(pem.contains("-----BEGIN CERTIFICATE-----")
            && pem.contains("-----END CERTIFICATE-----"))
        {
            return Err(invalid(
                at(".ca"),
                "is not a PEM certificate (no BEGIN/END CERTIFICATE lines)",
            ));
        }
    }
    if let Some(path) = &r.ca_file {
        if !path.is_absolute() {
            return Err(invalid(
                at(".ca_file"),
                format!("{:?} is not an absolute path", path.display()),
            ));
        }
    }
    match (&r.username, &r.password, &r.auth) {
        (None, None, None) | (Some(_), Some(_), None) | (None, None, Some(_)) => {}
        (_, _, Some(_)) => {
            return Err(invalid(
                at(".auth"),
                "set auth or username and password, not both",
            ))
        }
        (Some(_), None, None) => return Err(invalid(at(".password"), "username needs a password")),
        (None, Some(_), None) => return Err(invalid(at(".username"), "password needs a username")),
    }
    // Secrets and names go into TOML strings and HTTP headers: no control
    // characters. The messages never repeat a secret.
    if let Some(user) = &r.username {
        if user.is_empty() || user.contains(':') || user.chars().any(char::is_control) {
            return Err(invalid(
                at(".username"),
                "must be non-empty, without ':' or control characters",
            ));
        }
    }
    for (field, secret) in [(".password", &r.password), (".auth", &r.auth)] {
        if let Some(s) = secret {
            if s.expose().is_empty() || s.expose().chars().any(char::is_control) {
                return Err(invalid(
                    at(field),
                    "must be non-empty, without control characters",
                ));
            }
        }
    }
    if let Some(auth) = &r.auth {
        use base64::Engine;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.expose())
            .ok()
            .and_then(|b| String::from_utf8(b).ok());
        let valid = match decoded {
            Some(d) => d.split_once(':').is_some_and(|(user, _)| !user.is_empty()),
            None => false,
        };
        if !valid {
            return Err(invalid(at(".auth"), "is not base64 of USERNAME:PASSWORD"));
        }
    }
    Ok(())
}

/// `_default`, or `HOST[:PORT]` with HOST a lower-case DNS name or an IPv4
/// address: it becomes a directory name under `/etc/containerd/certs.d`.
pub fn registry_host(host: &str) -> Result<(), String> {
    if host == "_default" {
        return Ok(());
    }
    let (name, port) = match host.rsplit_once(':') {
        Some((name, port)) => (name, Some(port)),
        None => (host, None),
    };
    if let Some(port) = port {
        if !port.parse::<u16>().is_ok_and(|p| p > 0) {
            return Err(format!("{host:?}: the port is not 1 to 65535"));
        }
    }
    if name.parse::<std::net::Ipv4Addr>().is_ok() {
        return Ok(());
    }
    dns1123_subdomain(name).map_err(|d| {
        format!("{host:?} is not a registry host (HOST[:PORT], lower case, or _default): {d}")
    })
}

fn mirror_url(text: &str) -> Result<(), String> {
    let url = reqwest::Url::parse(text).map_err(|e| format!("{text:?} is not a URL: {e}"))?;
    if !matches!(url.scheme(), "https" | "http") {
        return Err(format!("{text:?} is not an https:// or http:// URL"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("{text:?} has no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!(
            "{text:?} must not carry credentials (use username/password)"
        ));
    }
    if url.query().is_some() || url.fragment().is_some() || url.path() != "/" {
        return Err(format!(
            "{text:?} must be SCHEME://HOST[:PORT] without a path, query or fragment"
        ));
    }
    if text.contains(['"', '\\']) {
        return Err(format!("{text:?} holds a quote or backslash"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[derive(Debug, Deserialize)]
    struct Doc {
        #[serde(rename = "registries")]
        r: BTreeMap<String, RegistryConfig>,
    }

    fn check(text: &str) -> Result<(), String> {
        let doc: Doc = toml::from_str(text).map_err(|e| e.to_string())?;
        for (host, r) in &doc.r {
            validate(host, r).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    #[test]
    fn good_tables_pass() {
        check(
            "[registries.\"docker.io\"]\nmirrors = [\"https://mirror.example.com\", \"http://10.0.0.5:5000/\"]\n\
             username = \"u\"\npassword = \"p\"\n\
             [registries.\"registry.example.com:5000\"]\nca_file = \"/etc/reg-ca.pem\"\nauth = \"dTpw\"\n\
             [registries._default]\nmirrors = [\"https://all.example.com\"]\n\
             [registries.\"10.0.0.9:443\"]\nca = \"-----BEGIN CERTIFICATE-----\\nMIIB\\n-----END CERTIFICATE-----\\n\"\n",
        )
        .unwrap();
    }

    #[test]
    fn each_bad_value_is_refused_naming_the_key() {
        let table: &[(&str, &str)] = &[
            (
                "[registries.\"Docker.io\"]",
                "kubernetes.registries.\"Docker.io\":",
            ),
            (
                "[registries.\"../etc\"]",
                "kubernetes.registries.\"../etc\":",
            ),
            (
                "[registries.\"a.io:0\"]",
                "kubernetes.registries.\"a.io:0\":",
            ),
            (
                "[registries.\"a.io:99999\"]",
                "kubernetes.registries.\"a.io:99999\":",
            ),
            (
                "[registries.\"a.io\"]\nmirrors = [\"ftp://m\"]",
                "kubernetes.registries.\"a.io\".mirrors[0]:",
            ),
            (
                "[registries.\"a.io\"]\nmirrors = [\"https://m\", \"https://u:p@m\"]",
                "kubernetes.registries.\"a.io\".mirrors[1]:",
            ),
            (
                "[registries.\"a.io\"]\nmirrors = [\"https://m/v2/x\"]",
                "kubernetes.registries.\"a.io\".mirrors[0]:",
            ),
            (
                "[registries.\"a.io\"]\nca = \"x\"",
                "kubernetes.registries.\"a.io\".ca:",
            ),
            (
                "[registries.\"a.io\"]\nca_file = \"rel.pem\"",
                "kubernetes.registries.\"a.io\".ca_file:",
            ),
            (
                "[registries.\"a.io\"]\nusername = \"u\"",
                "kubernetes.registries.\"a.io\".password:",
            ),
            (
                "[registries.\"a.io\"]\npassword = \"hunter2\"",
                "kubernetes.registries.\"a.io\".username:",
            ),
            (
                "[registries.\"a.io\"]\nauth = \"dTpw\"\nusername = \"u\"\npassword = \"p\"",
                "kubernetes.registries.\"a.io\".auth:",
            ),
            (
                "[registries.\"a.io\"]\nauth = \"not base64!\"",
                "kubernetes.registries.\"a.io\".auth:",
            ),
            (
                "[registries.\"a.io\"]\nusername = \"u\"\npassword = \"a\\nb\"",
                "kubernetes.registries.\"a.io\".password:",
            ),
            (
                "[registries.\"a.io\"]\nusername = \"u:x\"\npassword = \"p\"",
                "kubernetes.registries.\"a.io\".username:",
            ),
        ];
        for (text, key) in table {
            let err = check(text).unwrap_err();
            assert!(err.starts_with(key), "{text}: {err}");
            assert!(!err.contains("hunter2"), "{err}");
        }
        let err = check("[registries.\"a.io\"]\nmirror = []").unwrap_err();
        assert!(err.contains("mirror"), "{err}");
    }
}
