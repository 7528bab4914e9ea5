//! The agent's own kubeconfig (`[kubernetes.agent] kubeconfig`): the
//! current context's cluster (server, CA) and user (a token, a token file
//! or a client certificate), read with serde-saphyr (pure Rust, panic-free
//! parsing). Plugins (`exec`, `auth-provider`) and basic auth are refused
//! with an error naming the field: the agent runs no helper programs.
//! Relative paths in the file are relative to the file, as in kubectl.

use std::path::{Path, PathBuf};

use base64::Engine;
use serde::Deserialize;

use super::client::Auth;

#[derive(Debug, thiserror::Error)]
pub enum KubeconfigError {
    #[error("reading kubeconfig {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The parser's message only: it may quote the document, which holds
    /// credentials.
    #[error("kubeconfig {}: not a kubeconfig (YAML): {reason}", path.display())]
    Parse { path: PathBuf, reason: String },
    #[error("kubeconfig {}: {field}: {detail}", path.display())]
    Invalid {
        path: PathBuf,
        field: String,
        detail: String,
    },
}

/// What the agent takes from a kubeconfig.
#[derive(Debug)]
pub struct AgentKubeconfig {
    pub server: String,
    /// The cluster CA (PEM), when the file names one.
    pub ca_pem: Option<Vec<u8>>,
    pub auth: Auth,
}

#[derive(Deserialize)]
struct File {
    #[serde(default)]
    clusters: Vec<Named<Cluster>>,
    #[serde(default)]
    users: Vec<Named<User>>,
    #[serde(default)]
    contexts: Vec<Named<Context>>,
    #[serde(rename = "current-context")]
    current_context: Option<String>,
}

#[derive(Deserialize)]
struct Named<T> {
    name: String,
    #[serde(alias = "cluster", alias = "user", alias = "context")]
    item: T,
}

#[derive(Deserialize)]
struct Cluster {
    server: Option<String>,
    #[serde(rename = "certificate-authority")]
    certificate_authority: Option<PathBuf>,
    #[serde(rename = "certificate-authority-data")]
    certificate_authority_data: Option<String>,
    #[serde(rename = "insecure-skip-tls-verify", default)]
    insecure_skip_tls_verify: bool,
}

#[derive(Deserialize, Default)]
struct User {
    token: Option<String>,
    #[serde(rename = "tokenFile")]
    token_file: Option<PathBuf>,
    #[serde(rename = "client-certificate")]
    client_certificate: Option<PathBuf>,
    #[serde(rename = "client-certificate-data")]
    client_certificate_data: Option<String>,
    #[serde(rename = "client-key")]
    client_key: Option<PathBuf>,
    #[serde(rename = "client-key-data")]
    client_key_data: Option<String>,
    exec: Option<serde::de::IgnoredAny>,
    #[serde(rename = "auth-provider")]
    auth_provider: Option<serde::de::IgnoredAny>,
    username: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
struct Context {
    cluster: String,
    user: String,
}

/// Reads the kubeconfig at `path`.
pub fn load(path: &Path) -> Result<AgentKubeconfig, KubeconfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| KubeconfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text, path)
}

/// Parses kubeconfig `text`; `path` names it in errors and anchors its
/// relative paths.
pub fn parse(text: &str, path: &Path) -> Result<AgentKubeconfig, KubeconfigError> {
    let invalid = |field: &str, detail: &str| KubeconfigError::Invalid {
        path: path.to_owned(),
        field: field.to_owned(),
        detail: detail.to_owned(),
    };
    let file: File = serde_saphyr::from_str(text).map_err(|e| KubeconfigError::Parse {
        path: path.to_owned(),
        // The first line: the error kind and position, not the snippet.
        reason: e.to_string().lines().next().unwrap_or_default().to_owned(),
    })?;
    let current = file
        .current_context
        .as_deref()
        .ok_or_else(|| invalid("current-context", "is not set"))?;
    let context = &file
        .contexts
        .iter()
        .find(|c| c.name == current)
        .ok_or_else(|| invalid("current-context", &format!("no context named {current:?}")))?
        .item;
    let cluster = &file
        .clusters
        .iter()
        .find(|c| c.name == context.cluster)
        .ok_or_else(|| {
            invalid(
                &format!("contexts[{current}].cluster"),
                &format!("no cluster named {:?}", context.cluster),
            )
        })?
        .item;
    let user = &file
        .users
        .iter()
        .find(|u| u.name == context.user)
        .ok_or_else(|| {
            invalid(
                &format!("contexts[{current}].user"),
                &format!("no user named {:?}", context.user),
            )
        })?
        .item;
    let base = path.parent().unwrap_or(Path::new("/"));
    let anchored = |p: &Path| base.join(p);
    let read = |field: &str, p: &Path| {
        std::fs::read(anchored(p))
            .map_err(|e| invalid(field, &format!("reading {}: {e}", anchored(p).display())))
    };
    let decode = |field: &str, data: &str| {
        base64::engine::general_purpose::STANDARD
            .decode(data.trim())
            .map_err(|_| invalid(field, "is not base64"))
    };

    let server = cluster
        .server
        .clone()
        .ok_or_else(|| invalid("clusters.cluster.server", "is not set"))?;
    if !server.starts_with("https://") {
        return Err(invalid("clusters.cluster.server", "is not an https:// URL"));
    }
    if cluster.insecure_skip_tls_verify {
        return Err(invalid(
            "clusters.cluster.insecure-skip-tls-verify",
            "is refused: the agent always verifies the API server",
        ));
    }
    let ca_pem = match (
        &cluster.certificate_authority_data,
        &cluster.certificate_authority,
    ) {
        (Some(data), _) => Some(decode("clusters.cluster.certificate-authority-data", data)?),
        (None, Some(p)) => Some(read("clusters.cluster.certificate-authority", p)?),
        (None, None) => None,
    };

    for (field, set) in [
        ("exec", user.exec.is_some()),
        ("auth-provider", user.auth_provider.is_some()),
        ("username", user.username.is_some()),
    ] {
        if set {
            return Err(invalid(
                &format!("users.user.{field}"),
                "is not supported: use a token, tokenFile or a client certificate",
            ));
        }
    }
    let cert = match (&user.client_certificate_data, &user.client_certificate) {
        (Some(d), _) => Some(decode("users.user.client-certificate-data", d)?),
        (None, Some(p)) => Some(read("users.user.client-certificate", p)?),
        (None, None) => None,
    };
    let key = match (&user.client_key_data, &user.client_key) {
        (Some(d), _) => Some(decode("users.user.client-key-data", d)?),
        (None, Some(p)) => Some(read("users.user.client-key", p)?),
        (None, None) => None,
    };
    let auth = match (&user.token, &user.token_file, cert, key) {
        (Some(token), None, None, None) => Auth::Token(token.clone()),
        (None, Some(file), None, None) => Auth::TokenFile(anchored(file)),
        (None, None, Some(cert_pem), Some(key_pem)) => Auth::ClientCert { cert_pem, key_pem },
        (None, None, Some(_), None) => {
            return Err(invalid(
                "users.user.client-key",
                "a client certificate needs its key",
            ))
        }
        (None, None, None, Some(_)) => {
            return Err(invalid(
                "users.user.client-certificate",
                "a client key needs its certificate",
            ))
        }
        (None, None, None, None) => {
            return Err(invalid(
                "users.user",
                "has no credential: set token, tokenFile or a client certificate and key",
            ))
        }
        _ => {
            return Err(invalid(
                "users.user",
                "set one credential: token, tokenFile, or a client certificate and key",
            ))
        }
    };
    Ok(AgentKubeconfig {
        server,
        ca_pem,
        auth,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(user: &str, cluster_extra: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: agent\n\
             clusters:\n- name: c\n  cluster:\n    server: https://10.0.0.1:6443\n{cluster_extra}\
             users:\n- name: u\n  user:\n{user}\
             contexts:\n- name: agent\n  context:\n    cluster: c\n    user: u\n"
        )
    }

    #[test]
    fn tokens_files_and_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.conf");
        let k = parse(
            &doc(
                "    token: s3cr3t\n",
                "    certificate-authority-data: LS0tLS1CRUdJTg==\n",
            ),
            &path,
        )
        .unwrap();
        assert_eq!(k.server, "https://10.0.0.1:6443");
        assert_eq!(k.ca_pem.as_deref(), Some(&b"-----BEGIN"[..]));
        assert!(matches!(&k.auth, Auth::Token(t) if t == "s3cr3t"));
        assert!(!format!("{k:?}").contains("s3cr3t"));

        let k = parse(&doc("    tokenFile: token\n", ""), &path).unwrap();
        assert!(matches!(&k.auth, Auth::TokenFile(p) if p == &dir.path().join("token")));
        assert!(k.ca_pem.is_none());

        std::fs::write(dir.path().join("ca.crt"), "CA").unwrap();
        std::fs::write(dir.path().join("kubelet.pem"), "CERT+KEY").unwrap();
        let k = parse(
            &doc(
                "    client-certificate: kubelet.pem\n    client-key: /nonexistent/key\n",
                "    certificate-authority: ca.crt\n",
            ),
            &path,
        )
        .unwrap_err();
        assert!(k.to_string().contains("users.user.client-key"), "{k}");
        let k = parse(
            &doc(
                "    client-certificate: kubelet.pem\n    client-key: kubelet.pem\n",
                "    certificate-authority: ca.crt\n",
            ),
            &path,
        )
        .unwrap();
        assert_eq!(k.ca_pem.as_deref(), Some(&b"CA"[..]));
        assert!(matches!(&k.auth, Auth::ClientCert { cert_pem, key_pem }
            if cert_pem == b"CERT+KEY" && key_pem == b"CERT+KEY"));
    }

    #[test]
    fn each_problem_is_an_error_naming_the_field() {
        let path = Path::new("/etc/agent.conf");
        let cases: &[(&str, &str)] = &[
            ("    exec:\n      command: aws\n", "users.user.exec"),
            (
                "    auth-provider:\n      name: gcp\n",
                "users.user.auth-provider",
            ),
            ("    username: a\n    password: b\n", "users.user.username"),
            ("    token: a\n    tokenFile: /t\n", "users.user"),
            (
                "    client-certificate-data: QQ==\n",
                "users.user.client-key",
            ),
            (
                "    client-key-data: QQ==\n",
                "users.user.client-certificate",
            ),
            (
                "    client-certificate-data: '!!'\n    client-key-data: QQ==\n",
                "client-certificate-data",
            ),
            ("    {}\n", "users.user"),
        ];
        for (user, field) in cases {
            let err = parse(&doc(user, ""), path).unwrap_err().to_string();
            assert!(err.contains(field), "{user}: {err}");
            assert!(err.starts_with("kubeconfig /etc/agent.conf:"), "{err}");
        }
        let err = parse(
            &doc("    token: t\n", "    insecure-skip-tls-verify: true\n"),
            path,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("insecure-skip-tls-verify"), "{err}");
        let text = doc("    token: t\n", "").replace("server: https://", "server: http://");
        assert!(parse(&text, path)
            .unwrap_err()
            .to_string()
            .contains("server"));
        let text =
            doc("    token: t\n", "").replace("current-context: agent", "current-context: other");
        assert!(parse(&text, path)
            .unwrap_err()
            .to_string()
            .contains("other"));
        let text = doc("    token: t\n", "").replace("user: u\n", "user: nobody\n");
        assert!(parse(&text, path)
            .unwrap_err()
            .to_string()
            .contains("nobody"));
        // Not YAML at all, or the wrong shape: a parse error, quoting nothing.
        for bad in ["token: [unclosed s3cr3t", "- 1\n- 2\n", ""] {
            let err = parse(bad, path).unwrap_err().to_string();
            assert!(!err.contains("s3cr3t"), "{err}");
        }
    }
}
