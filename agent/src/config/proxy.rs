//! The `[proxy]` table: the HTTP(S) proxy containerd and the kubelet use
//! (their `HTTPS_PROXY`, `HTTP_PROXY` and `NO_PROXY`) and the agent's own
//! clients use (update, Kubernetes, FleetLock; never instance metadata or
//! a link-local address), and its checks.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Always direct, whatever `no_proxy` says: the node itself.
pub const ALWAYS_DIRECT: &[&str] = &["localhost", "127.0.0.1", "::1"];

/// `[proxy]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// The proxy for `https://` requests.
    pub https: Option<String>,
    /// The proxy for `http://` requests.
    pub http: Option<String>,
    /// Hosts, `.domain` suffixes, IP addresses and CIDRs reached directly.
    #[serde(default)]
    pub no_proxy: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProxyConfigError {
    #[error("{key}: {detail}")]
    Invalid { key: String, detail: String },
}

fn invalid(key: impl Into<String>, detail: impl Into<String>) -> ProxyConfigError {
    ProxyConfigError::Invalid {
        key: key.into(),
        detail: detail.into(),
    }
}

impl ProxyConfig {
    pub fn validate(&self) -> Result<(), ProxyConfigError> {
        for (key, url) in [("proxy.https", &self.https), ("proxy.http", &self.http)] {
            if let Some(url) = url {
                proxy_url(url).map_err(|d| invalid(key, d))?;
            }
        }
        for (i, entry) in self.no_proxy.iter().enumerate() {
            if entry.is_empty()
                || !entry.chars().all(|c| {
                    c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '/' | '*')
                })
            {
                return Err(invalid(
                    format!("proxy.no_proxy[{i}]"),
                    format!("{entry:?} is not a host, .domain, IP address or CIDR"),
                ));
            }
        }
        Ok(())
    }

    /// Whether a proxy is configured.
    pub fn is_set(&self) -> bool {
        self.https.is_some() || self.http.is_some()
    }

    /// What the agent's own HTTP clients (update, Kubernetes, FleetLock;
    /// never instance metadata) add: this proxy and `trust`'s CAs.
    pub fn outbound(&self, trust: &super::trust::TrustConfig) -> ballast_updater::http::Outbound {
        ballast_updater::http::Outbound {
            https_proxy: self.https.clone(),
            http_proxy: self.http.clone(),
            no_proxy: self.no_proxy.clone(),
            extra_ca_pem: trust.bundle(),
        }
    }

    /// The environment of a Go program (containerd, the kubelet): upper-
    /// and lower-case spellings, as both are read by different libraries.
    /// Empty when no proxy is set.
    pub fn environment(&self) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        if !self.is_set() {
            return env;
        }
        for (name, value) in [("HTTPS_PROXY", &self.https), ("HTTP_PROXY", &self.http)] {
            if let Some(v) = value {
                env.insert(name.to_owned(), v.clone());
                env.insert(name.to_ascii_lowercase(), v.clone());
            }
        }
        let mut direct: Vec<&str> = ALWAYS_DIRECT.to_vec();
        for entry in &self.no_proxy {
            if !direct.contains(&entry.as_str()) {
                direct.push(entry);
            }
        }
        let direct = direct.join(",");
        env.insert("NO_PROXY".to_owned(), direct.clone());
        env.insert("no_proxy".to_owned(), direct);
        env
    }
}

fn proxy_url(text: &str) -> Result<(), String> {
    let url = reqwest::Url::parse(text).map_err(|e| format!("{text:?} is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("{text:?} is not an http:// or https:// URL"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("{text:?} has no host"));
    }
    // The URL lands in service environments, which are not secret; a
    // proxy password would leak there.
    if !url.username().is_empty() || url.password().is_some() {
        return Err("proxy credentials in the URL are not supported (they would be readable in the services' environment)".into());
    }
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "{text:?} must be SCHEME://HOST[:PORT] without a path, query or fragment"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct Doc {
        proxy: ProxyConfig,
    }

    fn parse(text: &str) -> Result<ProxyConfig, String> {
        let doc: Doc = toml::from_str(text).map_err(|e| e.to_string())?;
        doc.proxy.validate().map_err(|e| e.to_string())?;
        Ok(doc.proxy)
    }

    #[test]
    fn environment_has_both_spellings_and_the_node_itself_direct() {
        let p = parse(
            "[proxy]\nhttps = \"http://proxy.example:3128\"\nno_proxy = [\".svc\", \"10.0.0.0/8\", \"localhost\"]\n",
        )
        .unwrap();
        let env = p.environment();
        assert_eq!(env["HTTPS_PROXY"], "http://proxy.example:3128");
        assert_eq!(env["https_proxy"], "http://proxy.example:3128");
        assert!(!env.contains_key("HTTP_PROXY"));
        assert_eq!(env["NO_PROXY"], "localhost,127.0.0.1,::1,.svc,10.0.0.0/8");
        assert_eq!(env["no_proxy"], env["NO_PROXY"]);
        assert!(ProxyConfig::default().environment().is_empty());
    }

    #[test]
    fn bad_values_are_refused_naming_the_key() {
        let table: &[(&str, &str)] = &[
            ("https = \"proxy:3128\"", "proxy.https:"),
            ("http = \"socks5://p:1080\"", "proxy.http:"),
            ("https = \"http://user:pw@p:3128\"", "proxy.https:"),
            ("https = \"http://p:3128/path\"", "proxy.https:"),
            ("no_proxy = [\"a\", \"b c\"]", "proxy.no_proxy[1]:"),
            ("no_proxy = [\"\"]", "proxy.no_proxy[0]:"),
            ("no_proxy = [\"a,b\"]", "proxy.no_proxy[0]:"),
        ];
        for (line, key) in table {
            let err = parse(&format!("[proxy]\n{line}\n")).unwrap_err();
            assert!(err.starts_with(key), "{line}: {err}");
            assert!(!err.contains("pw@"), "{err}");
        }
        let err = parse("[proxy]\nhttps_proxy = \"x\"\n").unwrap_err();
        assert!(err.contains("https_proxy"), "{err}");
    }

    #[test]
    fn merge_hands_proxy_and_trust_to_the_update_client() {
        let ca = rcgen::generate_simple_self_signed(vec!["ca.example".into()])
            .unwrap()
            .cert
            .pem();
        let layers = [
            crate::config::Layer {
                source: "vendor.toml".into(),
                text: "[proxy]\nhttps = \"http://proxy.example:3128\"\nno_proxy = [\".corp\"]\n"
                    .into(),
            },
            crate::config::Layer {
                source: "user-data".into(),
                text: format!("[trust]\nca = [{:?}]\n", ca),
            },
        ];
        let (config, _) = crate::config::merge(&layers).unwrap();
        let o = &config.update.outbound;
        assert_eq!(o.https_proxy.as_deref(), Some("http://proxy.example:3128"));
        assert_eq!(o.http_proxy, None);
        assert_eq!(o.no_proxy, [".corp"]);
        assert_eq!(o.extra_ca_pem, format!("{}\n", ca.trim_end()));
        assert_eq!(*o, config.outbound());
    }

    /// The update client as the agent builds it: a repository served with
    /// a certificate from an extra CA, reached through an HTTP CONNECT
    /// proxy on loopback under a name no resolver knows.
    #[test]
    fn the_update_client_goes_through_the_proxy_and_trusts_only_with_trust_ca() {
        use super::super::proxy_testing::{ForwardProxy, TestPki};
        use super::super::trust::TrustConfig;
        let pki = TestPki::new("repo.test");
        let server = pki.serve(b"signed manifest");
        let proxy = ForwardProxy::start(server);
        let config = parse(&format!("[proxy]\nhttps = \"{}\"\n", proxy.url)).unwrap();
        let repo = "https://repo.test:8443/stable/";

        // Without [trust] ca the certificate is refused (and nothing is
        // fetched), though the proxy was asked.
        let fetch = ballast_updater::http::for_location_with(
            repo,
            &config.outbound(&TrustConfig::default()),
        )
        .unwrap();
        let err = fetch.get("manifest.json", 1024).unwrap_err().to_string();
        assert!(err.contains("repo.test"), "{err}");
        assert_eq!(proxy.seen(), ["CONNECT repo.test:8443 HTTP/1.1"]);

        let trust = TrustConfig {
            ca: vec![pki.ca_pem.clone()],
        };
        let fetch =
            ballast_updater::http::for_location_with(repo, &config.outbound(&trust)).unwrap();
        let got = fetch.get("manifest.json", 1024).unwrap().unwrap();
        assert_eq!(got, b"signed manifest");
        assert_eq!(proxy.seen().len(), 2);

        // no_proxy: the name is reached directly (and does not resolve).
        let direct = parse(&format!(
            "[proxy]\nhttps = \"{}\"\nno_proxy = [\".test\"]\n",
            proxy.url
        ))
        .unwrap();
        let fetch =
            ballast_updater::http::for_location_with(repo, &direct.outbound(&trust)).unwrap();
        assert!(fetch.get("manifest.json", 1024).is_err());
        assert_eq!(proxy.seen().len(), 2, "{:?}", proxy.seen());
    }
}
