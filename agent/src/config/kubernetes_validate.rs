//! Checks of the `[kubernetes]` table with the API server's and the
//! kubelet's own rules, so a bad value is refused when the config loads
//! (naming the key) instead of when the kubelet or the API server rejects
//! it on the node.
//!
//! [`validate`] checks each value and the combinations one document can get
//! wrong on its own; it runs for every configuration layer.
//! [`check_complete`] checks that the merged result has what a node needs
//! (an API server and a credential, or `standalone`); it runs on the merged
//! configuration and before rendering.
//!
//! Rules, from Kubernetes' `apimachinery/pkg/util/validation`,
//! `apimachinery/pkg/api/resource` and `kubelet/pkg/apis`: label keys are
//! qualified names, label values are at most 63 characters of the same
//! alphabet, the kubelet may only set labels outside the `kubernetes.io` and
//! `k8s.io` namespaces except a documented few (NodeRestriction; the kubelet
//! itself refuses to start with others), quantities follow
//! `resource.Quantity`'s syntax. No crate implements these: the quantity
//! crates on crates.io either pin an older k8s-openapi or pull a decimal
//! arithmetic library for what is here a syntax check.

use std::net::IpAddr;
use std::path::Path;

use super::kubernetes::{KubernetesConfig, RebootConfig};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KubernetesConfigError {
    /// `key` is the full dotted path, e.g. `kubernetes.taints[0].effect`.
    #[error("{key}: {detail}")]
    Invalid { key: String, detail: String },
}

fn invalid(key: impl Into<String>, detail: impl Into<String>) -> KubernetesConfigError {
    KubernetesConfigError::Invalid {
        key: key.into(),
        detail: detail.into(),
    }
}

/// Labels the kubelet may set on its own Node although they are in the
/// `kubernetes.io` namespace (`kubeletLabels` in `k8s.io/kubelet/pkg/apis`).
const KUBELET_LABELS: &[&str] = &[
    "kubernetes.io/hostname",
    "topology.kubernetes.io/zone",
    "topology.kubernetes.io/region",
    "failure-domain.beta.kubernetes.io/zone",
    "failure-domain.beta.kubernetes.io/region",
    "beta.kubernetes.io/instance-type",
    "node.kubernetes.io/instance-type",
    "kubernetes.io/os",
    "kubernetes.io/arch",
    "beta.kubernetes.io/os",
    "beta.kubernetes.io/arch",
];

/// Label namespaces (and their subdomains) the kubelet may set.
const KUBELET_LABEL_NAMESPACES: &[&str] = &["kubelet.kubernetes.io", "node.kubernetes.io"];

/// Resource names the kubelet reserves capacity for.
const RESERVED_RESOURCES: &[&str] = &["cpu", "memory", "ephemeral-storage", "pid"];

/// The kubelet's eviction signals.
const EVICTION_SIGNALS: &[&str] = &[
    "memory.available",
    "allocatableMemory.available",
    "nodefs.available",
    "nodefs.inodesFree",
    "imagefs.available",
    "imagefs.inodesFree",
    "containerfs.available",
    "containerfs.inodesFree",
    "pid.available",
];

const TAINT_EFFECTS: &[&str] = &["NoSchedule", "PreferNoSchedule", "NoExecute"];

/// Keys of the KubeletConfiguration that `kubelet_extra` may not replace.
const FIXED_KUBELET_KEYS: &[&str] = &["kind", "apiVersion"];

/// Checks every value of one document (a layer or the merged result).
pub fn validate(c: &KubernetesConfig) -> Result<(), KubernetesConfigError> {
    if let Some(url) = &c.api_server {
        https_url(url).map_err(|d| invalid("kubernetes.api_server", d))?;
    }
    if c.ca_file.is_some() && c.ca_pem.is_some() {
        return Err(invalid(
            "kubernetes.ca_pem",
            "set ca_file or ca_pem, not both",
        ));
    }
    if let Some(path) = &c.ca_file {
        absolute(path).map_err(|d| invalid("kubernetes.ca_file", d))?;
    }
    if let Some(pem) = &c.ca_pem {
        if !(pem.contains("-----BEGIN CERTIFICATE-----")
            && pem.contains("-----END CERTIFICATE-----"))
        {
            return Err(invalid(
                "kubernetes.ca_pem",
                "is not a PEM certificate (no BEGIN/END CERTIFICATE lines)",
            ));
        }
    }
    if c.bootstrap_token.is_some() && c.kubeconfig.is_some() {
        return Err(invalid(
            "kubernetes.kubeconfig",
            "set bootstrap_token or kubeconfig, not both",
        ));
    }
    if let Some(token) = &c.bootstrap_token {
        // The token is a secret: the message never repeats it.
        if !bootstrap_token(token.expose()) {
            return Err(invalid(
                "kubernetes.bootstrap_token",
                "is not a bootstrap token: 6 and 16 characters of a-z 0-9 joined by '.'",
            ));
        }
    }
    if let Some(path) = &c.kubeconfig {
        absolute(path).map_err(|d| invalid("kubernetes.kubeconfig", d))?;
    }
    if let Some(name) = &c.node_name {
        node_name(name).map_err(|d| invalid("kubernetes.node_name", d))?;
    }
    if let Some(ip) = &c.node_ip {
        ip.parse::<IpAddr>()
            .map_err(|_| invalid("kubernetes.node_ip", format!("{ip:?} is not an IP address")))?;
    }
    for (key, value) in &c.labels {
        let at = format!("kubernetes.labels.{key:?}");
        qualified_name(key).map_err(|d| invalid(&at, d))?;
        kubelet_may_set_label(key).map_err(|d| invalid(&at, d))?;
        label_value(value).map_err(|d| invalid(&at, d))?;
    }
    for (i, taint) in c.taints.iter().enumerate() {
        let at = |field: &str| format!("kubernetes.taints[{i}].{field}");
        qualified_name(&taint.key).map_err(|d| invalid(at("key"), d))?;
        label_value(&taint.value).map_err(|d| invalid(at("value"), d))?;
        if !TAINT_EFFECTS.contains(&taint.effect.as_str()) {
            return Err(invalid(
                at("effect"),
                format!(
                    "{:?} is not one of {}",
                    taint.effect,
                    TAINT_EFFECTS.join(", ")
                ),
            ));
        }
    }
    for (i, dns) in c.cluster_dns.iter().enumerate() {
        dns.parse::<IpAddr>().map_err(|_| {
            invalid(
                format!("kubernetes.cluster_dns[{i}]"),
                format!("{dns:?} is not an IP address"),
            )
        })?;
    }
    if let Some(domain) = &c.cluster_domain {
        dns1123_subdomain(domain).map_err(|d| invalid("kubernetes.cluster_domain", d))?;
    }
    if c.max_pods == Some(0) {
        return Err(invalid("kubernetes.max_pods", "must be at least 1"));
    }
    for (table, map) in [
        ("kube_reserved", &c.kube_reserved),
        ("system_reserved", &c.system_reserved),
    ] {
        for (resource, amount) in map {
            let at = format!("kubernetes.{table}.{resource:?}");
            if !RESERVED_RESOURCES.contains(&resource.as_str()) {
                return Err(invalid(
                    at,
                    format!("is not one of {}", RESERVED_RESOURCES.join(", ")),
                ));
            }
            non_negative_quantity(amount).map_err(|d| invalid(at, d))?;
        }
    }
    for (signal, threshold) in &c.eviction_hard {
        let at = format!("kubernetes.eviction_hard.{signal:?}");
        if !EVICTION_SIGNALS.contains(&signal.as_str()) {
            return Err(invalid(
                at,
                format!(
                    "is not an eviction signal ({})",
                    EVICTION_SIGNALS.join(", ")
                ),
            ));
        }
        eviction_threshold(threshold).map_err(|d| invalid(at, d))?;
    }
    for gate in c.feature_gates.keys() {
        let mut chars = gate.chars();
        if !(chars.next().is_some_and(|c| c.is_ascii_alphabetic())
            && chars.all(|c| c.is_ascii_alphanumeric()))
        {
            return Err(invalid(
                format!("kubernetes.feature_gates.{gate:?}"),
                "is not a feature gate name (letters and digits, starting with a letter)",
            ));
        }
    }
    for key in FIXED_KUBELET_KEYS {
        if c.kubelet_extra.contains_key(*key) {
            return Err(invalid(
                format!("kubernetes.kubelet_extra.{key}"),
                "is fixed by the agent (kubelet.config.k8s.io/v1beta1 KubeletConfiguration)",
            ));
        }
    }
    toml_to_json(&toml::Value::Table(c.kubelet_extra.clone()))
        .map_err(|(path, d)| invalid(format!("kubernetes.kubelet_extra{path}"), d))?;
    if let Some(path) = &c.kubelet_path {
        absolute(path).map_err(|d| invalid("kubernetes.kubelet_path", d))?;
    }
    if let Some(cidr) = &c.pod_cidr {
        if crate::config::parse_cidr(cidr).is_none() {
            return Err(invalid(
                "kubernetes.pod_cidr",
                format!("{cidr:?} is not ADDRESS/PREFIX"),
            ));
        }
    }
    for name in c.static_pods.keys() {
        dns1123_label(name).map_err(|d| invalid(format!("kubernetes.static_pods.{name:?}"), d))?;
    }
    for (host, registry) in &c.registries {
        super::kubernetes_registries::validate(host, registry)?;
    }
    if let Some(agent) = &c.agent {
        match (&agent.token_file, &agent.kubeconfig) {
            (Some(path), None) => {
                absolute(path).map_err(|d| invalid("kubernetes.agent.token_file", d))?
            }
            (None, Some(path)) => {
                absolute(path).map_err(|d| invalid("kubernetes.agent.kubeconfig", d))?
            }
            _ => {
                return Err(invalid(
                    "kubernetes.agent",
                    "set exactly one of token_file and kubeconfig",
                ))
            }
        }
    }
    reboot(&c.reboot)
}

fn reboot(r: &RebootConfig) -> Result<(), KubernetesConfigError> {
    if r.max_concurrent == 0 {
        return Err(invalid(
            "kubernetes.reboot.max_concurrent",
            "must be at least 1",
        ));
    }
    // The group and namespace become parts of Lease names and paths.
    dns1123_label(&r.group).map_err(|d| invalid("kubernetes.reboot.group", d))?;
    dns1123_label(&r.lease_namespace)
        .map_err(|d| invalid("kubernetes.reboot.lease_namespace", d))?;
    if r.lease_ttl.is_zero() {
        return Err(invalid("kubernetes.reboot.lease_ttl", "must be above 0"));
    }
    if r.drain_timeout.is_zero() {
        return Err(invalid(
            "kubernetes.reboot.drain_timeout",
            "must be above 0",
        ));
    }
    Ok(())
}

/// Checks that the (merged) table is enough to run a node.
pub fn check_complete(c: &KubernetesConfig) -> Result<(), KubernetesConfigError> {
    validate(c)?;
    if c.standalone {
        for (key, set) in [
            ("api_server", c.api_server.is_some()),
            ("bootstrap_token", c.bootstrap_token.is_some()),
            ("kubeconfig", c.kubeconfig.is_some()),
        ] {
            if set {
                return Err(invalid(
                    format!("kubernetes.{key}"),
                    "standalone = true runs without an API server; remove it",
                ));
            }
        }
        // The standalone kubelet authorizes everyone who authenticates
        // (AlwaysAllow): a client CA would hand the whole kubelet API (exec
        // into every pod) to anyone holding a certificate from it.
        for (key, set) in [
            ("ca_pem", c.ca_pem.is_some()),
            ("ca_file", c.ca_file.is_some()),
        ] {
            if set {
                return Err(invalid(
                    format!("kubernetes.{key}"),
                    "standalone = true authorizes every authenticated client (AlwaysAllow); a client CA would open the kubelet's API to its certificates: remove it",
                ));
            }
        }
        let extra_client_ca = c
            .kubelet_extra
            .get("authentication")
            .and_then(|a| a.get("x509"))
            .and_then(|x| x.get("clientCAFile"))
            .is_some();
        if extra_client_ca {
            return Err(invalid(
                "kubernetes.kubelet_extra.authentication.x509.clientCAFile",
                "standalone = true authorizes every authenticated client (AlwaysAllow); a client CA would open the kubelet's API to its certificates: remove it",
            ));
        }
        for (key, set) in [
            ("labels", !c.labels.is_empty()),
            ("taints", !c.taints.is_empty()),
        ] {
            if set {
                return Err(invalid(
                    format!("kubernetes.{key}"),
                    "standalone = true registers no Node to carry it; remove it",
                ));
            }
        }
        return Ok(());
    }
    if c.api_server.is_none() {
        return Err(invalid(
            "kubernetes.api_server",
            "is required unless standalone = true",
        ));
    }
    if c.bootstrap_token.is_none() && c.kubeconfig.is_none() {
        return Err(invalid(
            "kubernetes.bootstrap_token",
            "set bootstrap_token or kubeconfig (the kubelet's credential)",
        ));
    }
    if c.bootstrap_token.is_some() && c.ca_file.is_none() && c.ca_pem.is_none() {
        return Err(invalid(
            "kubernetes.ca_pem",
            "a bootstrap token needs the cluster CA: set ca_pem or ca_file",
        ));
    }
    if c.pod_cidr.is_some() {
        return Err(invalid(
            "kubernetes.pod_cidr",
            "only used with standalone = true (a cluster's CNI plugin owns pod networking)",
        ));
    }
    if !c.static_pods.is_empty() {
        return Err(invalid(
            "kubernetes.static_pods",
            "only used with standalone = true",
        ));
    }
    Ok(())
}

fn https_url(text: &str) -> Result<(), String> {
    let url = reqwest::Url::parse(text).map_err(|e| format!("{text:?} is not a URL: {e}"))?;
    if url.scheme() != "https" {
        return Err(format!("{text:?} is not an https:// URL"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("{text:?} has no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!("{text:?} must not carry credentials"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("{text:?} must not have a query or fragment"));
    }
    Ok(())
}

fn absolute(path: &Path) -> Result<(), String> {
    if path.is_absolute() {
        Ok(())
    } else {
        Err(format!("{:?} is not an absolute path", path.display()))
    }
}

/// `[a-z0-9]{6}\.[a-z0-9]{16}` (bootstrap token id and secret).
pub fn bootstrap_token(token: &str) -> bool {
    let ok = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    };
    token
        .split_once('.')
        .is_some_and(|(id, secret)| ok(id, 6) && ok(secret, 16))
}

/// A Node name: a DNS-1123 subdomain.
pub fn node_name(name: &str) -> Result<(), String> {
    dns1123_subdomain(name)
}

/// `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63 characters.
pub fn dns1123_label(s: &str) -> Result<(), String> {
    if s.len() > 63 {
        return Err(format!("{s:?} is longer than 63 characters"));
    }
    let bytes = s.as_bytes();
    let edge = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if bytes.first().is_some_and(edge)
        && bytes.last().is_some_and(edge)
        && bytes.iter().all(|b| edge(b) || *b == b'-')
    {
        Ok(())
    } else {
        Err(format!(
            "{s:?} is not a DNS-1123 label (a-z 0-9 '-', starting and ending with a-z 0-9)"
        ))
    }
}

/// DNS-1123 labels joined by '.', at most 253 characters.
pub fn dns1123_subdomain(s: &str) -> Result<(), String> {
    if s.len() > 253 {
        return Err(format!("{s:?} is longer than 253 characters"));
    }
    let bytes = s.as_bytes();
    let edge = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let ok = !s.is_empty()
        && s.split('.').all(|part| {
            let p = part.as_bytes();
            p.first().is_some_and(edge)
                && p.last().is_some_and(edge)
                && p.iter().all(|b| edge(b) || *b == b'-')
        });
    if ok && !bytes.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{s:?} is not a DNS-1123 subdomain (a-z 0-9 '-' '.', each part starting and ending with a-z 0-9)"
        ))
    }
}

/// `([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]`: the name part of a
/// qualified name and a non-empty label value.
fn name_part(s: &str) -> bool {
    let b = s.as_bytes();
    b.first().is_some_and(u8::is_ascii_alphanumeric)
        && b.last().is_some_and(u8::is_ascii_alphanumeric)
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// `[prefix/]name`: prefix a DNS-1123 subdomain, name at most 63
/// characters of `[-A-Za-z0-9_.]` starting and ending alphanumeric.
pub fn qualified_name(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split('/').collect::<Vec<_>>()[..] {
        [name] => (None, name),
        [prefix, name] => (Some(prefix), name),
        _ => return Err(format!("{key:?} has more than one '/'")),
    };
    if let Some(prefix) = prefix {
        dns1123_subdomain(prefix).map_err(|d| format!("prefix of {key:?}: {d}"))?;
    }
    if name.len() > 63 {
        return Err(format!("name part of {key:?} is longer than 63 characters"));
    }
    if !name_part(name) {
        return Err(format!(
            "name part of {key:?} must be A-Z a-z 0-9 '-' '_' '.', starting and ending with A-Z a-z 0-9"
        ));
    }
    Ok(())
}

/// Empty, or at most 63 characters like a name part.
pub fn label_value(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Ok(());
    }
    if value.len() > 63 {
        return Err(format!("value {value:?} is longer than 63 characters"));
    }
    if !name_part(value) {
        return Err(format!(
            "value {value:?} must be A-Z a-z 0-9 '-' '_' '.', starting and ending with A-Z a-z 0-9"
        ));
    }
    Ok(())
}

/// NodeRestriction: outside `kubernetes.io` and `k8s.io` (and their
/// subdomains) anything goes; inside, only [`KUBELET_LABELS`] and the
/// [`KUBELET_LABEL_NAMESPACES`].
pub fn kubelet_may_set_label(key: &str) -> Result<(), String> {
    let namespace = key.split_once('/').map(|(ns, _)| ns).unwrap_or("");
    let within = |ns: &str, domain: &str| ns == domain || ns.ends_with(&format!(".{domain}"));
    let reserved = within(namespace, "kubernetes.io") || within(namespace, "k8s.io");
    if !reserved
        || KUBELET_LABELS.contains(&key)
        || KUBELET_LABEL_NAMESPACES
            .iter()
            .any(|allowed| within(namespace, allowed))
    {
        return Ok(());
    }
    Err(format!(
        "{key:?} is in the kubernetes.io/k8s.io namespace, which a kubelet may not set on its own Node \
         (NodeRestriction); allowed there: {}, and the {} prefixes. Set it with a cluster-admin \
         credential (kubectl label node) instead",
        KUBELET_LABELS.join(", "),
        KUBELET_LABEL_NAMESPACES.join("/, ") + "/"
    ))
}

/// Checks `resource.Quantity` syntax: `[+-]` digits with an optional
/// fraction, then a binary suffix (`Ki Mi Gi Ti Pi Ei`), a decimal one
/// (`n u m k M G T P E`, or none) or an exponent (`e3`, `E-2`). Returns
/// whether it is negative.
pub fn quantity(text: &str) -> Result<bool, String> {
    let bad =
        |why: &str| format!("{text:?} is not a quantity like \"500m\", \"2Gi\" or \"1e3\": {why}");
    let (negative, rest) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        Some(_) => (false, text),
        None => return Err(bad("empty")),
    };
    let number_end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    let (number, suffix) = rest.split_at(number_end);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() {
        return Err(bad("no digits"));
    }
    if fraction.contains('.') {
        return Err(bad("more than one '.'"));
    }
    const SUFFIXES: &[&str] = &[
        "", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei", "n", "u", "m", "k", "M", "G", "T", "P", "E",
    ];
    if SUFFIXES.contains(&suffix) {
        return Ok(negative);
    }
    if let Some(exponent) = suffix.strip_prefix(['e', 'E']) {
        let digits = exponent.strip_prefix(['+', '-']).unwrap_or(exponent);
        if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
            return Ok(negative);
        }
    }
    Err(bad(&format!("unknown suffix {suffix:?}")))
}

fn non_negative_quantity(text: &str) -> Result<(), String> {
    if quantity(text)? {
        return Err(format!("{text:?} is negative"));
    }
    Ok(())
}

/// A quantity, or a percentage from 0% to 100%.
fn eviction_threshold(text: &str) -> Result<(), String> {
    if let Some(number) = text.strip_suffix('%') {
        let value: f64 = number
            .parse()
            .ok()
            .filter(|_| number.bytes().all(|b| b.is_ascii_digit() || b == b'.'))
            .ok_or_else(|| format!("{text:?} is not a percentage like \"10%\""))?;
        if !(0.0..=100.0).contains(&value) {
            return Err(format!("{text:?} is not between 0% and 100%"));
        }
        return Ok(());
    }
    non_negative_quantity(text)
}

/// TOML to JSON; a date or a non-finite float has no JSON form and is an
/// error with its dotted path (`.a.b[2]`).
pub fn toml_to_json(value: &toml::Value) -> Result<serde_json::Value, (String, String)> {
    use serde_json::Value;
    fn convert(value: &toml::Value, path: &mut String) -> Result<Value, (String, String)> {
        Ok(match value {
            toml::Value::String(s) => Value::String(s.clone()),
            toml::Value::Integer(i) => Value::from(*i),
            toml::Value::Boolean(b) => Value::Bool(*b),
            toml::Value::Float(f) => serde_json::Number::from_f64(*f)
                .map(Value::Number)
                .ok_or_else(|| (path.clone(), format!("{f} is not a finite number")))?,
            toml::Value::Datetime(_) => {
                return Err((
                    path.clone(),
                    "a TOML date has no JSON form; write it as a string".into(),
                ))
            }
            toml::Value::Array(items) => {
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    let len = path.len();
                    path.push_str(&format!("[{i}]"));
                    out.push(convert(item, path)?);
                    path.truncate(len);
                }
                Value::Array(out)
            }
            toml::Value::Table(table) => {
                let mut out = serde_json::Map::new();
                for (key, item) in table {
                    let len = path.len();
                    path.push('.');
                    path.push_str(key);
                    out.insert(key.clone(), convert(item, path)?);
                    path.truncate(len);
                }
                Value::Object(out)
            }
        })
    }
    convert(value, &mut String::new())
}

/// Refuses `[services.containerd]` and `[services.kubelet]` next to a
/// `[kubernetes]` table: the integration runs those.
pub fn check_service_names(
    services: &std::collections::BTreeMap<String, crate::node::supervisor::ServiceSpec>,
) -> Result<(), KubernetesConfigError> {
    for name in [
        super::kubernetes::CONTAINERD_SERVICE,
        super::kubernetes::KUBELET_SERVICE,
    ] {
        if services.contains_key(name) {
            return Err(KubernetesConfigError::Invalid {
                key: format!("services.{name}"),
                detail: "is run by the [kubernetes] integration; remove this service".into(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_follow_apimachinery() {
        let good = [
            ("0", false),
            ("1", false),
            ("100m", false),
            ("0.5", false),
            (".5", false),
            ("5.", false),
            ("+1Gi", false),
            ("-1Gi", true),
            ("1Ki", false),
            ("2Mi", false),
            ("3Ti", false),
            ("4Pi", false),
            ("5Ei", false),
            ("1n", false),
            ("1u", false),
            ("1k", false),
            ("1M", false),
            ("1G", false),
            ("1T", false),
            ("1P", false),
            ("1E", false),
            ("1e3", false),
            ("1E3", false),
            ("1e-3", false),
            ("1.5e+2", false),
            ("-0.25", true),
        ];
        for (text, negative) in good {
            assert_eq!(quantity(text), Ok(negative), "{text}");
        }
        let bad = [
            "", "+", "-", ".", "Gi", "1K", "1gi", "1KiB", "1 Gi", " 1", "1e", "1e+", "1e1.5",
            "1..2", "1.2.3", "0x10", "1Gi ", "--1", "1mm",
        ];
        for text in bad {
            let err = quantity(text).unwrap_err();
            assert!(err.contains(&format!("{text:?}")), "{text}: {err}");
        }
    }

    #[test]
    fn names_and_values() {
        for key in [
            "a",
            "example.com/role",
            "A.b-c_d",
            "x/y",
            &"a".repeat(63),
            &format!("{}/{}", "a".repeat(253), "b".repeat(63)),
        ] {
            assert!(qualified_name(key).is_ok(), "{key}");
        }
        for key in [
            "",
            "/a",
            "a/",
            "a/b/c",
            "-a",
            "a-",
            "Example.com/a",
            "ex_ample.com/a",
            &"a".repeat(64),
            &format!("{}/b", "a".repeat(254)),
            "a b",
        ] {
            assert!(qualified_name(key).is_err(), "{key}");
        }
        assert!(label_value("").is_ok());
        assert!(label_value("v1.2_3-x").is_ok());
        assert!(label_value("-v").is_err());
        assert!(label_value("a,b").is_err());
        assert!(label_value(&"v".repeat(64)).is_err());
        assert!(dns1123_label("kube-system").is_ok());
        assert!(dns1123_label("Kube").is_err());
        assert!(dns1123_label("a.b").is_err());
        assert!(dns1123_subdomain("node-1.example.com").is_ok());
        assert!(dns1123_subdomain("node..x").is_err());
        assert!(dns1123_subdomain("").is_err());
    }

    #[test]
    fn node_restriction_labels() {
        for key in [
            "role",
            "example.com/role",
            "kubernetes.io/hostname",
            "kubernetes.io/arch",
            "topology.kubernetes.io/zone",
            "node.kubernetes.io/pool",
            "x.node.kubernetes.io/pool",
            "kubelet.kubernetes.io/anything",
            "notkubernetes.io/x",
        ] {
            assert!(kubelet_may_set_label(key).is_ok(), "{key}");
        }
        for key in [
            "node-role.kubernetes.io/worker",
            "kubernetes.io/role",
            "k8s.io/x",
            "sub.k8s.io/x",
            "node-restriction.kubernetes.io/pool",
            "topology.kubernetes.io/rack",
        ] {
            let err = kubelet_may_set_label(key).unwrap_err();
            assert!(err.contains("NodeRestriction"), "{key}: {err}");
        }
    }

    #[test]
    fn bootstrap_tokens() {
        assert!(bootstrap_token("abcdef.0123456789abcdef"));
        for t in [
            "abcdef0123456789abcdef",
            "ABCDEF.0123456789abcdef",
            "abcde.0123456789abcdef",
            "abcdef.0123456789abcde",
            "abcdef.0123456789abcdef.x",
            "abcdef_0123456789abcdef",
        ] {
            assert!(!bootstrap_token(t), "{t}");
        }
    }

    const VALID: &str = r#"
api_server = "https://10.0.0.1:6443"
ca_pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
bootstrap_token = "abcdef.0123456789abcdef"
"#;

    fn parse(extra: &str) -> KubernetesConfig {
        #[derive(serde::Deserialize)]
        struct Doc {
            kubernetes: KubernetesConfig,
        }
        let text = format!("[kubernetes]\n{extra}");
        toml::from_str::<Doc>(&text)
            .unwrap_or_else(|e| panic!("{text}: {e}"))
            .kubernetes
    }

    /// Every error `validate` and `check_complete` give, each with the key it
    /// names and a part of its message.
    #[test]
    fn every_error_names_its_key() {
        let cases: &[(&str, &str, &str)] = &[
            ("api_server = \"http://10.0.0.1:6443\"", "kubernetes.api_server", "https://"),
            ("api_server = \"not a url\"", "kubernetes.api_server", "not a URL"),
            ("api_server = \"https://u:p@h:6443\"", "kubernetes.api_server", "credentials"),
            ("api_server = \"https://h:6443/?x=1\"", "kubernetes.api_server", "query"),
            ("ca_file = \"/a\"\nca_pem = \"x\"", "kubernetes.ca_pem", "not both"),
            ("ca_file = \"ca.crt\"", "kubernetes.ca_file", "absolute"),
            ("ca_pem = \"hello\"", "kubernetes.ca_pem", "PEM"),
            (
                "bootstrap_token = \"abcdef.0123456789abcdef\"\nkubeconfig = \"/k\"",
                "kubernetes.kubeconfig",
                "not both",
            ),
            ("bootstrap_token = \"abcdef.0123456789ABCDEF\"", "kubernetes.bootstrap_token", "bootstrap token"),
            ("kubeconfig = \"k.conf\"", "kubernetes.kubeconfig", "absolute"),
            ("node_name = \"Node_1\"", "kubernetes.node_name", "DNS-1123"),
            ("node_ip = \"10.0.0.300\"", "kubernetes.node_ip", "not an IP"),
            ("labels = { \"a/b/c\" = \"x\" }", "kubernetes.labels.\"a/b/c\"", "more than one '/'"),
            ("labels = { \"-role\" = \"x\" }", "kubernetes.labels.\"-role\"", "name part"),
            (
                "labels = { \"node-role.kubernetes.io/worker\" = \"\" }",
                "kubernetes.labels.\"node-role.kubernetes.io/worker\"",
                "NodeRestriction",
            ),
            ("labels = { role = \"a b\" }", "kubernetes.labels.\"role\"", "value \"a b\""),
            (
                "[[kubernetes.taints]]\nkey = \"a/b/c\"\neffect = \"NoSchedule\"",
                "kubernetes.taints[0].key",
                "more than one '/'",
            ),
            (
                "[[kubernetes.taints]]\nkey = \"dedicated\"\nvalue = \"-x\"\neffect = \"NoSchedule\"",
                "kubernetes.taints[0].value",
                "value \"-x\"",
            ),
            (
                "[[kubernetes.taints]]\nkey = \"dedicated\"\neffect = \"NoSchedul\"",
                "kubernetes.taints[0].effect",
                "NoSchedule, PreferNoSchedule, NoExecute",
            ),
            ("cluster_dns = [\"10.96.0.10\", \"dns\"]", "kubernetes.cluster_dns[1]", "not an IP"),
            ("cluster_domain = \"Cluster.Local\"", "kubernetes.cluster_domain", "DNS-1123"),
            ("max_pods = 0", "kubernetes.max_pods", "at least 1"),
            ("kube_reserved = { gpu = \"1\" }", "kubernetes.kube_reserved.\"gpu\"", "cpu, memory"),
            ("kube_reserved = { memory = \"1GB\" }", "kubernetes.kube_reserved.\"memory\"", "unknown suffix \"GB\""),
            ("system_reserved = { cpu = \"-100m\" }", "kubernetes.system_reserved.\"cpu\"", "negative"),
            ("eviction_hard = { \"memory.free\" = \"1Gi\" }", "kubernetes.eviction_hard.\"memory.free\"", "eviction signal"),
            ("eviction_hard = { \"nodefs.available\" = \"120%\" }", "kubernetes.eviction_hard.\"nodefs.available\"", "between 0% and 100%"),
            ("eviction_hard = { \"nodefs.available\" = \"ten%\" }", "kubernetes.eviction_hard.\"nodefs.available\"", "percentage"),
            ("eviction_hard = { \"memory.available\" = \"100MB\" }", "kubernetes.eviction_hard.\"memory.available\"", "quantity"),
            ("feature_gates = { \"Bad-Gate\" = true }", "kubernetes.feature_gates.\"Bad-Gate\"", "feature gate"),
            ("kubelet_extra = { kind = \"Pod\" }", "kubernetes.kubelet_extra.kind", "fixed"),
            ("kubelet_extra = { apiVersion = \"v1\" }", "kubernetes.kubelet_extra.apiVersion", "fixed"),
            (
                "kubelet_extra = { logging = { since = 2026-01-01T00:00:00Z } }",
                "kubernetes.kubelet_extra.logging.since",
                "date",
            ),
            ("kubelet_path = \"kubelet\"", "kubernetes.kubelet_path", "absolute"),
            ("pod_cidr = \"10.88.0.0\"", "kubernetes.pod_cidr", "ADDRESS/PREFIX"),
            ("static_pods = { \"web.yaml\" = \"x\" }", "kubernetes.static_pods.\"web.yaml\"", "DNS-1123 label"),
            ("[kubernetes.agent]", "kubernetes.agent", "exactly one"),
            (
                "[kubernetes.agent]\ntoken_file = \"/t\"\nkubeconfig = \"/k\"",
                "kubernetes.agent",
                "exactly one",
            ),
            ("[kubernetes.agent]\ntoken_file = \"token\"", "kubernetes.agent.token_file", "absolute"),
            ("[kubernetes.agent]\nkubeconfig = \"k.conf\"", "kubernetes.agent.kubeconfig", "absolute"),
            ("[kubernetes.reboot]\nmax_concurrent = 0", "kubernetes.reboot.max_concurrent", "at least 1"),
            ("[kubernetes.reboot]\ngroup = \"Workers\"", "kubernetes.reboot.group", "DNS-1123 label"),
            ("[kubernetes.reboot]\nlease_namespace = \"a.b\"", "kubernetes.reboot.lease_namespace", "DNS-1123 label"),
            ("[kubernetes.reboot]\nlease_ttl = \"0s\"", "kubernetes.reboot.lease_ttl", "above 0"),
            ("[kubernetes.reboot]\ndrain_timeout = \"0s\"", "kubernetes.reboot.drain_timeout", "above 0"),
        ];
        for (toml_text, key, detail) in cases {
            let err = validate(&parse(toml_text))
                .err()
                .unwrap_or_else(|| panic!("accepted: {toml_text}"));
            let KubernetesConfigError::Invalid { key: k, detail: d } = &err;
            assert_eq!(k, key, "{toml_text}: {err}");
            assert!(d.contains(detail), "{toml_text}: {err}");
        }
        // Whole-node checks, on documents whose values are each fine.
        let complete: &[(&str, &str, &str)] = &[
            (
                "standalone = true\napi_server = \"https://h\"",
                "kubernetes.api_server",
                "standalone",
            ),
            (
                "standalone = true\nbootstrap_token = \"abcdef.0123456789abcdef\"",
                "kubernetes.bootstrap_token",
                "standalone",
            ),
            (
                "standalone = true\nkubeconfig = \"/k\"",
                "kubernetes.kubeconfig",
                "standalone",
            ),
            (
                "standalone = true\nlabels = { a = \"b\" }",
                "kubernetes.labels",
                "no Node",
            ),
            (
                "standalone = true\n[[kubernetes.taints]]\nkey = \"a\"\neffect = \"NoExecute\"",
                "kubernetes.taints",
                "no Node",
            ),
            (
                "standalone = true\nca_file = \"/etc/ca.pem\"",
                "kubernetes.ca_file",
                "AlwaysAllow",
            ),
            (
                "standalone = true\nca_pem = \"-----BEGIN CERTIFICATE-----\\nX\\n-----END CERTIFICATE-----\"",
                "kubernetes.ca_pem",
                "AlwaysAllow",
            ),
            (
                "standalone = true\n[kubernetes.kubelet_extra.authentication.x509]\nclientCAFile = \"/ca.pem\"",
                "kubernetes.kubelet_extra.authentication.x509.clientCAFile",
                "AlwaysAllow",
            ),
            (
                "bootstrap_token = \"abcdef.0123456789abcdef\"",
                "kubernetes.api_server",
                "required",
            ),
            (
                "api_server = \"https://h\"",
                "kubernetes.bootstrap_token",
                "credential",
            ),
            (
                "api_server = \"https://h\"\nbootstrap_token = \"abcdef.0123456789abcdef\"",
                "kubernetes.ca_pem",
                "cluster CA",
            ),
            (
                &format!("{VALID}pod_cidr = \"10.1.0.0/16\""),
                "kubernetes.pod_cidr",
                "standalone",
            ),
            (
                &format!("{VALID}static_pods = {{ web = \"x\" }}"),
                "kubernetes.static_pods",
                "standalone",
            ),
        ];
        for (toml_text, key, detail) in complete {
            let config = parse(toml_text);
            validate(&config).unwrap_or_else(|e| panic!("{toml_text}: {e}"));
            let err = check_complete(&config)
                .err()
                .unwrap_or_else(|| panic!("accepted: {toml_text}"));
            let KubernetesConfigError::Invalid { key: k, detail: d } = &err;
            assert_eq!(k, key, "{toml_text}: {err}");
            assert!(d.contains(detail), "{toml_text}: {err}");
        }
        check_complete(&parse(VALID)).unwrap();
        check_complete(&parse("standalone = true")).unwrap();
        check_complete(&parse(
            "api_server = \"https://h\"\nkubeconfig = \"/var/lib/k.conf\"",
        ))
        .unwrap();
    }

    #[test]
    fn config_loading_names_the_file_and_key_and_checks_the_merged_whole() {
        use crate::config::{merge, Config, Layer};
        let err = Config::parse(
            "[kubernetes]\nnode_ip = \"x\"\n",
            Path::new("/etc/ballast/config.d/50-k8s.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("/etc/ballast/config.d/50-k8s.toml: kubernetes.node_ip:"),
            "{err}"
        );
        let layer = |source: &str, text: &str| Layer {
            source: source.into(),
            text: text.into(),
        };
        let vendor = layer(
            "/usr/lib/ballast/config.d/10-k8s.toml",
            "[kubernetes.reboot]\nmax_concurrent = 2\n",
        );
        // A partial table is fine in a layer; the merged whole must be complete.
        let err = merge(std::slice::from_ref(&vendor))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("merged configuration: kubernetes.api_server:"),
            "{err}"
        );
        let user = layer("user-data", &format!("[kubernetes]\n{VALID}"));
        let (config, _) = merge(&[vendor, user.clone()]).unwrap();
        let k8s = config.kubernetes.unwrap();
        assert_eq!(k8s.reboot.max_concurrent, 2);
        assert_eq!(k8s.api_server.as_deref(), Some("https://10.0.0.1:6443"));
        // The integration's service names are taken, in any layer.
        let services = layer(
            "/etc/ballast/config.d/60.toml",
            "[services.kubelet]\ncommand = [\"/opt/kubelet\"]\n",
        );
        let err = merge(&[user, services]).unwrap_err().to_string();
        assert!(
            err.starts_with("merged configuration: services.kubelet:"),
            "{err}"
        );
    }

    #[test]
    fn the_token_is_never_in_an_error() {
        let err = validate(&parse("bootstrap_token = \"abcdef.0123456789abcdeX\""))
            .unwrap_err()
            .to_string();
        assert!(!err.contains("0123456789"), "{err}");
    }
}
