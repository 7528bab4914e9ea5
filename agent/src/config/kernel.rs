//! The `[kernel]` table: sysctls (`[kernel.sysctl]`, name to value) and
//! extra kernel modules (`modules`), with the defaults a Kubernetes node
//! needs when `[kubernetes]` is set. PID 1 loads the modules and writes the
//! sysctls ([`crate::node::sysctl`]) before containerd starts.
//!
//! Names are checked here so a bad one is refused when the config loads,
//! naming the key: a sysctl name is dotted (`net.ipv4.ip_forward`) or
//! slashed (`net/ipv4/conf/eth0.100/rp_filter`, for components that hold
//! dots), each component letters, digits, `_` and `-` (and `.` when
//! slashed), never `.` or `..`, so it always names a file under /proc/sys.
//! Values are strings or integers without newlines.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Sysctls every Kubernetes node needs, applied when `[kubernetes]` is set
/// unless `[kernel.sysctl]` sets the same name: packets between pods and
/// the outside are forwarded, bridged pod traffic passes iptables (kube-proxy
/// and network policies), and the inotify limits fit many containers
/// (the kernel's defaults of 128 instances and 8192 watches run out with a
/// few dozen pods that watch files; the values are the ones kubeadm-based
/// distributions and Bottlerocket use).
pub const KUBERNETES_SYSCTLS: &[(&str, &str)] = &[
    ("net.ipv4.ip_forward", "1"),
    ("net.bridge.bridge-nf-call-iptables", "1"),
    ("net.bridge.bridge-nf-call-ip6tables", "1"),
    ("fs.inotify.max_user_instances", "8192"),
    ("fs.inotify.max_user_watches", "524288"),
];

/// Modules a Kubernetes node needs: `br_netfilter` provides the
/// `net.bridge.bridge-nf-call-*` sysctls, `overlay` containerd's snapshotter.
pub const KUBERNETES_MODULES: &[&str] = &["br_netfilter", "overlay"];

/// The longest sysctl name accepted (a path under /proc/sys).
const MAX_NAME: usize = 255;
/// The longest value accepted (one page minus the newline the kernel reads).
const MAX_VALUE: usize = 4095;
/// The kernel's `MODULE_NAME_LEN` (64) minus the `unsigned long` before it.
const MAX_MODULE_NAME: usize = 55;

/// `[kernel]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelConfig {
    /// Sysctl name to value.
    #[serde(default)]
    pub sysctl: BTreeMap<String, SysctlValue>,
    /// Kernel modules to load besides the image's own list.
    #[serde(default)]
    pub modules: Vec<String>,
}

/// A sysctl value: TOML lets both `1` and `"1"` (and `"4096 87380 6291456"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SysctlValue {
    Integer(i64),
    Text(String),
}

impl SysctlValue {
    /// The text written to the file.
    pub fn text(&self) -> String {
        match self {
            SysctlValue::Integer(n) => n.to_string(),
            SysctlValue::Text(s) => s.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KernelConfigError {
    /// `key` is the full path, e.g. `kernel.sysctl."net..x"`.
    #[error("{key}: {detail}")]
    Invalid { key: String, detail: String },
}

fn invalid(key: String, detail: impl Into<String>) -> KernelConfigError {
    KernelConfigError::Invalid {
        key,
        detail: detail.into(),
    }
}

impl KernelConfig {
    /// Checks every name and value of one document (a layer or the merged
    /// result).
    pub fn validate(&self) -> Result<(), KernelConfigError> {
        for (name, value) in &self.sysctl {
            let key = format!("kernel.sysctl.{name:?}");
            sysctl_name(name).map_err(|d| invalid(key.clone(), d))?;
            sysctl_value(&value.text()).map_err(|d| invalid(key, d))?;
        }
        for (i, module) in self.modules.iter().enumerate() {
            module_name(module).map_err(|d| invalid(format!("kernel.modules[{i}]"), d))?;
        }
        Ok(())
    }

    /// The sysctls to write, in name order: the Kubernetes defaults when
    /// `kubernetes` is set, then the table's own (which win).
    pub fn sysctls(&self, kubernetes: bool) -> Vec<(String, String)> {
        let mut all: BTreeMap<String, String> = BTreeMap::new();
        if kubernetes {
            for (name, value) in KUBERNETES_SYSCTLS {
                all.insert(canonical(name), (*value).to_owned());
            }
        }
        for (name, value) in &self.sysctl {
            all.insert(canonical(name), value.text());
        }
        all.into_iter().collect()
    }

    /// The modules to load: the Kubernetes ones when `kubernetes` is set,
    /// then the table's, each once.
    pub fn modules(&self, kubernetes: bool) -> Vec<String> {
        let defaults = KUBERNETES_MODULES.iter().filter(|_| kubernetes);
        let mut out: Vec<String> = Vec::new();
        for m in defaults
            .map(|m| (*m).to_owned())
            .chain(self.modules.iter().cloned())
        {
            if !out.contains(&m) {
                out.push(m);
            }
        }
        out
    }
}

/// The path under /proc/sys a (valid) name stands for: a dotted name's
/// dots become slashes, a slashed name is taken as is. Two spellings of one
/// sysctl give the same path, so a user's value replaces a default.
pub fn canonical(name: &str) -> String {
    if name.contains('/') {
        name.to_owned()
    } else {
        name.replace('.', "/")
    }
}

/// See the module doc.
pub fn sysctl_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is empty".into());
    }
    if name.len() > MAX_NAME {
        return Err(format!("is longer than {MAX_NAME} characters"));
    }
    let slashed = name.contains('/');
    let separator = if slashed { '/' } else { '.' };
    for part in name.split(separator) {
        if part.is_empty() || part == "." || part == ".." {
            return Err(format!(
                "{name:?} has an empty, '.' or '..' component; write net.ipv4.ip_forward or net/ipv4/ip_forward"
            ));
        }
        if !part
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || (slashed && c == '.'))
        {
            return Err(format!(
                "{name:?} is not a sysctl name (letters, digits, '_' and '-', separated by '.' or '/')"
            ));
        }
    }
    Ok(())
}

fn sysctl_value(value: &str) -> Result<(), String> {
    if value.contains(['\n', '\r', '\0']) {
        return Err("the value must not hold a newline or NUL".into());
    }
    if value.len() > MAX_VALUE {
        return Err(format!("the value is longer than {MAX_VALUE} bytes"));
    }
    Ok(())
}

fn module_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > MAX_MODULE_NAME
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(format!(
            "{name:?} is not a module name (1 to {MAX_MODULE_NAME} letters, digits, '_' and '-')"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct Doc {
        kernel: KernelConfig,
    }

    fn parse(text: &str) -> Result<KernelConfig, String> {
        let doc: Doc = toml::from_str(text).map_err(|e| e.to_string())?;
        doc.kernel.validate().map_err(|e| e.to_string())?;
        Ok(doc.kernel)
    }

    #[test]
    fn values_are_integers_or_strings() {
        let k = parse(
            "[kernel]\nmodules = [\"nf_conntrack\"]\n[kernel.sysctl]\n\"vm.max_map_count\" = 262144\n\
             \"net.ipv4.tcp_rmem\" = \"4096 87380 6291456\"\n\"net/ipv4/conf/eth0.100/rp_filter\" = 2\n",
        )
        .unwrap();
        assert_eq!(
            k.sysctls(false),
            [
                (
                    "net/ipv4/conf/eth0.100/rp_filter".to_owned(),
                    "2".to_owned()
                ),
                ("net/ipv4/tcp_rmem".into(), "4096 87380 6291456".into()),
                ("vm/max_map_count".into(), "262144".into()),
            ]
        );
        assert_eq!(k.modules(false), ["nf_conntrack"]);
    }

    #[test]
    fn bad_names_and_values_are_refused_naming_the_key() {
        let table: &[(&str, &str)] = &[
            ("\"net..ipv4\" = 1", "kernel.sysctl.\"net..ipv4\""),
            (
                "\"../../etc/passwd\" = 1",
                "kernel.sysctl.\"../../etc/passwd\"",
            ),
            ("\"net/../x\" = 1", "kernel.sysctl.\"net/../x\""),
            ("\"/net/ipv4\" = 1", "kernel.sysctl.\"/net/ipv4\""),
            ("\"net.ipv4 x\" = 1", "kernel.sysctl.\"net.ipv4 x\""),
            ("\"\" = 1", "kernel.sysctl.\"\""),
            ("\"a.b\" = \"1\\n2\"", "kernel.sysctl.\"a.b\""),
            ("\"a.b\" = \"1\\u0000\"", "kernel.sysctl.\"a.b\""),
        ];
        for (line, key) in table {
            let err = parse(&format!("[kernel.sysctl]\n{line}\n")).unwrap_err();
            assert!(err.starts_with(key), "{line}: {err}");
        }
        let long = "a".repeat(256);
        let err = parse(&format!("[kernel.sysctl]\n\"{long}\" = 1\n")).unwrap_err();
        assert!(err.contains("longer than 255"), "{err}");
        for bad in ["", "a b", "../x", &"m".repeat(56)] {
            let err = parse(&format!("[kernel]\nmodules = [\"ok\", {bad:?}]\n")).unwrap_err();
            assert!(err.starts_with("kernel.modules[1]:"), "{bad}: {err}");
        }
        // Types and unknown keys fail in the parser, naming the key.
        let err = parse("[kernel.sysctl]\n\"a.b\" = true\n").unwrap_err();
        assert!(err.contains("a.b"), "{err}");
        let err = parse("[kernel]\nmodule = []\n").unwrap_err();
        assert!(err.contains("module"), "{err}");
    }

    #[test]
    fn kubernetes_defaults_apply_and_the_table_wins() {
        let k = parse(
            "[kernel]\nmodules = [\"overlay\", \"ip_vs\"]\n[kernel.sysctl]\n\"fs/inotify/max_user_watches\" = 1048576\n",
        )
        .unwrap();
        let sysctls = k.sysctls(true);
        assert_eq!(
            sysctls,
            [
                (
                    "fs/inotify/max_user_instances".to_owned(),
                    "8192".to_owned()
                ),
                ("fs/inotify/max_user_watches".into(), "1048576".into()),
                ("net/bridge/bridge-nf-call-ip6tables".into(), "1".into()),
                ("net/bridge/bridge-nf-call-iptables".into(), "1".into()),
                ("net/ipv4/ip_forward".into(), "1".into()),
            ]
        );
        assert_eq!(k.modules(true), ["br_netfilter", "overlay", "ip_vs"]);
        assert!(KernelConfig::default().sysctls(false).is_empty());
        assert!(KernelConfig::default().modules(false).is_empty());
        for (name, value) in KUBERNETES_SYSCTLS {
            assert!(sysctl_name(name).is_ok() && sysctl_value(value).is_ok());
        }
    }
}
