//! containerd's registry configuration from `[kubernetes.registries]`:
//! one `hosts.toml` per registry under [`CERTS_DIR`] (containerd's
//! `config_path` layout: mirrors tried in order before the registry, its
//! CA), the CA as a file beside it, and pull credentials as CRI
//! `registry.configs."<host>".auth` entries appended to containerd's
//! config.toml, which is then 0600 (hosts.toml has no credential field).

use std::collections::BTreeMap;

use crate::config::kubernetes_registries::RegistryConfig;

/// containerd's `config_path`.
pub const CERTS_DIR: &str = "/etc/containerd/certs.d";

/// A TOML string literal (quoted and escaped).
fn quoted(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// `(path, mode, contents)` of each registry's files, in host order.
pub fn host_files(registries: &BTreeMap<String, RegistryConfig>) -> Vec<(String, u32, Vec<u8>)> {
    let mut files = Vec::new();
    for (host, r) in registries {
        let dir = format!("{CERTS_DIR}/{host}");
        let ca = match (&r.ca, &r.ca_file) {
            (Some(pem), _) => {
                let mut pem = pem.clone();
                if !pem.ends_with('\n') {
                    pem.push('\n');
                }
                let path = format!("{dir}/ca.crt");
                files.push((path.clone(), 0o644, pem.into_bytes()));
                Some(path)
            }
            (None, Some(path)) => Some(path.display().to_string()),
            (None, None) => None,
        };
        if r.mirrors.is_empty() && ca.is_none() {
            continue;
        }
        let mut text = format!(
            "# Rendered by ballast from [kubernetes.registries.{}]; edits are lost.\n",
            quoted(host)
        );
        // No `server`: containerd then uses the registry itself (docker.io
        // resolves to registry-1.docker.io), after the mirrors.
        if let Some(ca) = &ca {
            text.push_str(&format!("ca = {}\n", quoted(ca)));
        }
        for mirror in &r.mirrors {
            let mirror = mirror.trim_end_matches('/');
            text.push_str(&format!("\n[host.{}]\n", quoted(mirror)));
            text.push_str("  capabilities = [\"pull\", \"resolve\"]\n");
            if let Some(ca) = &ca {
                text.push_str(&format!("  ca = {}\n", quoted(ca)));
            }
        }
        files.push((format!("{dir}/hosts.toml"), 0o644, text.into_bytes()));
    }
    files
}

/// The CRI registry section for containerd's config.toml: `config_path`
/// always, then each registry's credentials. The second value says whether
/// credentials are in it (the file must then be 0600).
pub fn containerd_section(registries: &BTreeMap<String, RegistryConfig>) -> (String, bool) {
    let mut text = format!(
        "\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = {}\n",
        quoted(CERTS_DIR)
    );
    let mut secret = false;
    for (host, r) in registries {
        if !r.has_credentials() {
            continue;
        }
        secret = true;
        text.push_str(&format!(
            "\n[plugins.\"io.containerd.grpc.v1.cri\".registry.configs.{}.auth]\n",
            quoted(host)
        ));
        if let (Some(user), Some(password)) = (&r.username, &r.password) {
            text.push_str(&format!("  username = {}\n", quoted(user)));
            text.push_str(&format!("  password = {}\n", quoted(password.expose())));
        }
        if let Some(auth) = &r.auth {
            text.push_str(&format!("  auth = {}\n", quoted(auth.expose())));
        }
    }
    (text, secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registries(text: &str) -> BTreeMap<String, RegistryConfig> {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn hosts_toml_parses_with_mirrors_in_order_and_the_ca() {
        let r = registries(
            "[\"docker.io\"]\nmirrors = [\"https://m1.example/\", \"http://10.0.0.5:5000\"]\n\
             ca = \"-----BEGIN CERTIFICATE-----\\nX\\n-----END CERTIFICATE-----\"\n\
             [\"quay.io\"]\nusername = \"u\"\npassword = \"p\"\n",
        );
        let files = host_files(&r);
        let paths: Vec<&str> = files.iter().map(|f| f.0.as_str()).collect();
        assert_eq!(
            paths,
            [
                "/etc/containerd/certs.d/docker.io/ca.crt",
                "/etc/containerd/certs.d/docker.io/hosts.toml"
            ]
        );
        let hosts: toml::Table = toml::from_str(std::str::from_utf8(&files[1].2).unwrap()).unwrap();
        assert_eq!(
            hosts["ca"].as_str(),
            Some("/etc/containerd/certs.d/docker.io/ca.crt")
        );
        assert!(hosts.get("server").is_none());
        let host = hosts["host"].as_table().unwrap();
        let keys: Vec<&String> = host.keys().collect();
        // toml tables are sorted; the order containerd tries is the file's.
        assert_eq!(keys.len(), 2);
        let text = String::from_utf8(files[1].2.clone()).unwrap();
        assert!(
            text.find("https://m1.example").unwrap() < text.find("http://10.0.0.5:5000").unwrap()
        );
        assert_eq!(
            host["https://m1.example"]["capabilities"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    fn credentials_go_only_into_the_containerd_section() {
        let r = registries(
            "[\"quay.io\"]\nusername = \"u\"\npassword = \"p\\\"w\"\n[\"reg.example:5000\"]\nauth = \"dTpw\"\n[\"docker.io\"]\nmirrors = [\"https://m\"]\n",
        );
        let (text, secret) = containerd_section(&r);
        assert!(secret);
        let t: toml::Table = toml::from_str(&text).unwrap();
        let reg = &t["plugins"]["io.containerd.grpc.v1.cri"]["registry"];
        assert_eq!(reg["config_path"].as_str(), Some(CERTS_DIR));
        assert_eq!(
            reg["configs"]["quay.io"]["auth"]["password"].as_str(),
            Some("p\"w")
        );
        assert_eq!(
            reg["configs"]["reg.example:5000"]["auth"]["auth"].as_str(),
            Some("dTpw")
        );
        assert!(reg["configs"].get("docker.io").is_none());
        for (_, _, contents) in host_files(&r) {
            let s = String::from_utf8(contents).unwrap();
            assert!(!s.contains("dTpw") && !s.contains("p\\\"w"), "{s}");
        }
        let (_, secret) =
            containerd_section(&registries("[\"docker.io\"]\nmirrors = [\"https://m\"]\n"));
        assert!(!secret);
    }
}
