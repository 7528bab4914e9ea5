//! Node configuration: the TOML schema and where it comes from.
//!
//! Layers, later wins (tables merge key by key, other values replace):
//! `/usr/lib/ballast/config.d/*.toml` (vendor defaults in the image), the
//! kernel command line's `ballast.<key>=<value>` (see [`cmdline_layer`]),
//! the node's user-data, `/run/ballast/config.d/*.toml`,
//! `/etc/ballast/config.d/*.toml`; files in a directory apply in name order.
//! User-data arrives at first boot through QEMU's fw_cfg
//! (`opt/ballast/user-data`) or a FAT volume labelled `CIDATA` holding a
//! `user-data` file, and is kept on STATE so later boots need no
//! source. Every file is validated on its own first, so unknown keys and
//! wrong types are errors naming the file, line and key; a bad config leaves
//! the last good one in force.

pub mod kernel;
pub mod kubernetes;
pub mod kubernetes_registries;
pub mod kubernetes_validate;
pub mod proxy;
#[cfg(test)]
pub mod proxy_testing;
pub mod time;
pub mod trust;
pub mod update;
pub mod user_data;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// fw_cfg entry exposed by the `qemu_fw_cfg` driver.
pub const FW_CFG_USER_DATA: &str = "/sys/firmware/qemu_fw_cfg/by_name/opt/ballast/user-data/raw";
/// Where user-data is kept once seen.
pub const SAVED_USER_DATA: &str = "/var/lib/ballast/user-data.toml";
/// The last configuration that loaded without error.
pub const LAST_GOOD: &str = "/var/lib/ballast/config.last-good.toml";
/// Drop-in directories before and after user-data, in precedence order.
pub const VENDOR_DIR: &str = "/usr/lib/ballast/config.d";
pub const RUNTIME_DIRS: [&str; 2] = ["/run/ballast/config.d", "/etc/ballast/config.d"];
/// The kernel command line, a configuration layer of its own.
pub const CMDLINE: &str = "/proc/cmdline";
/// `ballast.*` keys the boot chain owns; the configuration layer leaves
/// them alone.
use ballast_updater::cmdline::BOOT_CHAIN_KEYS;
/// `ballast.platform` (`ec2` asks instance metadata) is a boot word read
/// by net::imds, not configuration.
const PLATFORM_WORD: &str = "platform";
/// Keys whose values never leave the node in `config show`, logs or the
/// kernel command line: a key whose name contains one of these, in any case
/// (`bootstrap_token`, `api_key`, `privateKey`, `credentials`).
const SECRET_KEY_PARTS: [&str; 6] = [
    "token",
    "password",
    "secret",
    "private",
    "key",
    "credential",
];

/// Whether a key's name says its value is a secret (see [`SECRET_KEY_PARTS`]).
pub fn is_secret_key(key: &str) -> bool {
    let lower = key.to_ascii_lowercase();
    // `auth` alone: a registry's base64 credential (`authentication` and
    // `authorization` tables of kubelet_extra are not secrets).
    lower == "auth" || SECRET_KEY_PARTS.iter().any(|s| lower.contains(s))
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A TOML syntax or schema error, as line, column and the parser's
    /// message only: the parser's own Display quotes the offending source
    /// line, which may hold a secret, so it is never kept (see
    /// [`ConfigError::parse`]).
    #[error("{path}:{}: {message}", match (line, column) {
        (Some(l), Some(c)) => format!("line {l}, column {c}"),
        _ => "unknown position".to_owned(),
    })]
    Parse {
        path: PathBuf,
        line: Option<usize>,
        column: Option<usize>,
        message: String,
    },
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {detail}")]
    Invalid { path: PathBuf, detail: String },
    /// A `ballast.<key>=<value>` on the kernel command line.
    #[error("{CMDLINE}: ballast.{key}={value}: {detail}")]
    Cmdline {
        key: String,
        value: String,
        detail: String,
    },
    /// A secret on the kernel command line, which every container can
    /// read in /proc/cmdline; only the key is named, never the value.
    #[error("{CMDLINE}: ballast.{key}: secrets are not accepted on the kernel command line (every process can read it); put this key in user-data")]
    CmdlineSecret { key: String },
    #[error("{path}: interface {interface}: address {value:?} is not ADDRESS/PREFIX")]
    Address {
        path: PathBuf,
        interface: String,
        value: String,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub hostname: Option<String>,
    #[serde(default)]
    pub api: ApiConfig,
    #[serde(default)]
    pub network: NetworkConfig,
    #[serde(default)]
    pub health: crate::node::health::HealthConfig,
    #[serde(default)]
    pub services: BTreeMap<String, crate::node::supervisor::ServiceSpec>,
    #[serde(default)]
    pub update: update::UpdateConfig,
    /// `[time]`: NTP servers for the SNTP client.
    #[serde(default)]
    pub time: time::TimeConfig,
    /// `[kubernetes]`; its presence turns the integration on.
    #[serde(default)]
    pub kubernetes: Option<crate::config::kubernetes::KubernetesConfig>,
    /// `[kernel]`: sysctls and extra modules.
    #[serde(default)]
    pub kernel: kernel::KernelConfig,
    /// `[proxy]`: the HTTP(S) proxy of containerd and the kubelet.
    #[serde(default)]
    pub proxy: proxy::ProxyConfig,
    /// `[trust]`: extra CA certificates for the whole node.
    #[serde(default)]
    pub trust: trust::TrustConfig,
}

/// `[api]`: the HTTPS API on TCP (the Unix socket is always on).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// TCP address for the HTTPS API besides the Unix socket; off when
    /// unset. Needs a client CA: there is no unauthenticated remote API.
    pub listen: Option<SocketAddr>,
    /// The operator CA that issues client certificates (PEM text).
    pub client_ca: Option<String>,
    /// The same, as a file on the node.
    pub client_ca_file: Option<PathBuf>,
    /// The node's own certificate chain (PEM); made on first boot when unset.
    pub server_cert: Option<String>,
    pub server_cert_file: Option<PathBuf>,
    /// The key of `server_cert` (PEM); never shown (see [`redact`]).
    pub server_key: Option<String>,
    pub server_key_file: Option<PathBuf>,
}

impl ApiConfig {
    /// What one layer may not say: a value given twice (text and file),
    /// or PEM text that holds no certificate or key. The key text never
    /// appears in the message.
    fn validate(&self) -> Result<(), String> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let pairs = [
            (
                "client_ca",
                self.client_ca.is_some(),
                self.client_ca_file.is_some(),
            ),
            (
                "server_cert",
                self.server_cert.is_some(),
                self.server_cert_file.is_some(),
            ),
            (
                "server_key",
                self.server_key.is_some(),
                self.server_key_file.is_some(),
            ),
        ];
        for (name, text, file) in pairs {
            if text && file {
                return Err(format!("api: give {name} or {name}_file, not both"));
            }
        }
        for (name, pem) in [
            ("client_ca", &self.client_ca),
            ("server_cert", &self.server_cert),
        ] {
            if let Some(pem) = pem {
                let certs: Result<Vec<_>, _> =
                    CertificateDer::pem_slice_iter(pem.as_bytes()).collect();
                if !certs.is_ok_and(|c| !c.is_empty()) {
                    return Err(format!(
                        "api.{name}: no PEM certificate (BEGIN CERTIFICATE)"
                    ));
                }
            }
        }
        if let Some(key) = &self.server_key {
            if PrivateKeyDer::from_pem_slice(key.as_bytes()).is_err() {
                return Err("api.server_key: no PEM private key".into());
            }
        }
        Ok(())
    }

    /// What the merged configuration must say: `listen` only with a client
    /// CA, and a server certificate only with its key.
    pub fn check_complete(&self) -> Result<(), String> {
        let has_ca = self.client_ca.is_some() || self.client_ca_file.is_some();
        if let Some(listen) = self.listen {
            if !has_ca {
                return Err(format!(
                    "api.listen = \"{listen}\" needs api.client_ca or api.client_ca_file: \
                     the TCP API only serves clients with a certificate from the operator CA"
                ));
            }
        }
        let cert = self.server_cert.is_some() || self.server_cert_file.is_some();
        let key = self.server_key.is_some() || self.server_key_file.is_some();
        if cert != key {
            return Err("api: server_cert and server_key go together".into());
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    #[serde(default)]
    pub interfaces: BTreeMap<String, InterfaceConfig>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterfaceConfig {
    /// `ADDRESS/PREFIX`, IPv4 or IPv6.
    #[serde(default)]
    pub addresses: Vec<String>,
    pub gateway: Option<IpAddr>,
    #[serde(default)]
    pub dns: Vec<IpAddr>,
    /// DHCPv4; when unset, on exactly when there are no static addresses.
    pub dhcp: Option<bool>,
    /// IPv6 autoconfiguration; `ra` when unset.
    pub ipv6: Option<Ipv6Mode>,
}

impl InterfaceConfig {
    /// Whether this interface runs a DHCPv4 client.
    pub fn dhcp_enabled(&self) -> bool {
        self.dhcp.unwrap_or(self.addresses.is_empty())
    }

    pub fn ipv6_mode(&self) -> Ipv6Mode {
        self.ipv6.unwrap_or(Ipv6Mode::Ra)
    }
}

/// `network.interfaces.<name>.ipv6`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ipv6Mode {
    /// SLAAC from router advertisements, also when forwarding is on
    /// (`accept_ra=2`, `autoconf=1`), and RDNSS/DNSSL into resolv.conf.
    Ra,
    /// No router advertisements, no autoconfigured addresses; static IPv6
    /// addresses still apply.
    Off,
}

/// An address with its prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

pub fn parse_cidr(s: &str) -> Option<Cidr> {
    let (addr, prefix) = s.split_once('/')?;
    let addr: IpAddr = addr.parse().ok()?;
    let prefix: u8 = prefix.parse().ok()?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    (prefix <= max).then_some(Cidr { addr, prefix })
}

/// A parser or serde message with every double-quoted part (a value, as in
/// `invalid type: string "…", expected u64`) replaced: values may be
/// secrets, keys are named with backticks.
fn without_quoted_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut parts = message.split('"');
    if let Some(first) = parts.next() {
        out.push_str(first);
    }
    let mut quoted = true;
    for part in parts {
        if quoted {
            out.push_str("\"<value>\"");
        } else {
            out.push_str(part);
        }
        quoted = !quoted;
    }
    out
}

impl ConfigError {
    /// A TOML error of `text` as path, line, column and message, without
    /// the source line the parser's Display would quote.
    pub fn parse(path: &Path, text: &str, err: &toml::de::Error) -> Self {
        let raw = err.message().trim_end();
        // Quoted values stay out unless the line is one plain value of a
        // key that is not a secret (`start = "24:00"` may be shown).
        let mut message = without_quoted_values(raw);
        let (line, column) = match err.span() {
            Some(span) => {
                let start = floor_char_boundary(text, span.start);
                let before = &text[..start];
                let line = before.matches('\n').count() + 1;
                let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
                // The key of the offending line names what is wrong; keys
                // are names, never secrets, unlike the value after `=`.
                let source_line = text[start - (column_bytes(before))..]
                    .lines()
                    .next()
                    .unwrap_or("");
                // Inside a multi-line string a line is value, not key.
                let in_string = before.matches("\"\"\"").count() % 2 == 1
                    || before.matches("\'\'\'").count() % 2 == 1;
                let key = line_key(source_line).filter(|_| !in_string);
                let plain_value = source_line
                    .split_once('=')
                    .is_some_and(|(_, v)| !v.contains(['{', '[']));
                if key.is_some_and(|k| plain_value && !k.split('.').any(is_secret_key)) {
                    message = raw.to_owned();
                }
                if let Some(key) = key {
                    if !message.contains(key) {
                        message = format!("key `{key}`: {message}");
                    }
                }
                (Some(line), Some(column))
            }
            None => (None, None),
        };
        ConfigError::Parse {
            path: path.to_owned(),
            line,
            column,
            message,
        }
    }
}

/// The largest char boundary of `text` at or before `i`.
fn floor_char_boundary(text: &str, i: usize) -> usize {
    let mut i = i.min(text.len());
    while !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Bytes from the start of the last line of `before` to its end.
fn column_bytes(before: &str) -> usize {
    before.rsplit('\n').next().unwrap_or("").len()
}

/// The key of a `key = value` line (bare or dotted, as written), if the
/// part before `=` looks like one; a quoted or odd key is not shown.
fn line_key(line: &str) -> Option<&str> {
    let (key, _) = line.split_once('=')?;
    let key = key.trim();
    let ok = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b' '));
    ok.then_some(key)
}

impl Config {
    /// `[proxy]` and `[trust] ca` as the agent's own HTTP clients use them
    /// (update, Kubernetes, FleetLock; never instance metadata).
    pub fn outbound(&self) -> ballast_updater::http::Outbound {
        self.proxy.outbound(&self.trust)
    }

    /// Parses and validates one TOML document; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Config =
            toml::from_str(text).map_err(|e| ConfigError::parse(path, text, &e))?;
        let invalid = |detail: String| ConfigError::Invalid {
            path: path.to_owned(),
            detail,
        };
        config.api.validate().map_err(&invalid)?;
        config
            .health
            .validate()
            .map_err(|e| invalid(e.to_string()))?;
        crate::node::supervisor::start_order(&config.services)
            .map_err(|e| invalid(e.to_string()))?;
        config
            .kernel
            .validate()
            .map_err(|e| invalid(e.to_string()))?;
        config
            .proxy
            .validate()
            .map_err(|e| invalid(e.to_string()))?;
        config
            .trust
            .validate()
            .map_err(|e| invalid(e.to_string()))?;
        if let Some(k8s) = &config.kubernetes {
            crate::config::kubernetes_validate::validate(k8s)
                .map_err(|e| invalid(e.to_string()))?;
            crate::config::kubernetes_validate::check_service_names(&config.services)
                .map_err(|e| invalid(e.to_string()))?;
        }
        for (name, iface) in &config.network.interfaces {
            for a in &iface.addresses {
                if parse_cidr(a).is_none() {
                    return Err(ConfigError::Address {
                        path: path.to_owned(),
                        interface: name.clone(),
                        value: a.clone(),
                    });
                }
            }
        }
        Ok(config)
    }
}

/// One configuration document and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Layer {
    pub source: PathBuf,
    pub text: String,
}

/// The `*.toml` files of `dir` in name order; a missing directory is empty.
pub fn dropins(dir: &Path) -> Result<Vec<Layer>, ConfigError> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(Vec::new());
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|path| match std::fs::read_to_string(&path) {
            Ok(text) => Ok(Layer { source: path, text }),
            Err(source) => Err(ConfigError::Read { path, source }),
        })
        .collect()
}

/// All layers of a node in precedence order (see the module doc).
pub fn node_layers(user_data: Option<Layer>) -> Result<Vec<Layer>, ConfigError> {
    let mut layers = dropins(Path::new(VENDOR_DIR))?;
    // Without /proc (a CLI run in a container) there is no such layer.
    if let Ok(cmdline) = std::fs::read_to_string(CMDLINE) {
        layers.extend(cmdline_layer(&cmdline)?);
    }
    layers.extend(user_data);
    for dir in RUNTIME_DIRS {
        layers.extend(dropins(Path::new(dir))?);
    }
    Ok(layers)
}

/// Validates each layer, then merges them into the effective config and
/// its TOML form.
pub fn merge(layers: &[Layer]) -> Result<(Config, toml::Table), ConfigError> {
    let mut merged = toml::Table::new();
    for layer in layers {
        Config::parse(&layer.text, &layer.source)?;
        let table: toml::Table = toml::from_str(&layer.text)
            .map_err(|e| ConfigError::parse(&layer.source, &layer.text, &e))?;
        merge_tables(&mut merged, table);
    }
    let text = toml::to_string(&merged).unwrap_or_default();
    let mut config = Config::parse(&text, Path::new("merged configuration"))?;
    config.update.outbound = config.outbound();
    let strategy_set = merged
        .get("update")
        .and_then(toml::Value::as_table)
        .is_some_and(|u| u.contains_key("strategy"));
    if !strategy_set {
        let (strategy, warning) = update::default_strategy(config.kubernetes.as_ref());
        config.update.strategy = strategy;
        if let Some(warning) = warning {
            tracing::warn!(warning);
        }
    }
    // A layer may set the strategy and another its table (vendor default
    // and user-data); only the whole must be complete.
    config
        .update
        .validate()
        .map_err(|detail| ConfigError::Invalid {
            path: "merged configuration".into(),
            detail,
        })?;
    // A layer may hold part of [api] (the kernel command line `listen`,
    // user-data the CA); only the whole must be complete.
    config
        .api
        .check_complete()
        .map_err(|detail| ConfigError::Invalid {
            path: "merged configuration".into(),
            detail,
        })?;
    // A layer may hold part of [kubernetes]; only the whole must be complete.
    if let Some(k8s) = &config.kubernetes {
        crate::config::kubernetes_validate::check_complete(k8s).map_err(|e| {
            ConfigError::Invalid {
                path: "merged configuration".into(),
                detail: e.to_string(),
            }
        })?;
    }
    Ok((config, merged))
}

/// The kernel command line's `ballast.<key>=<value>` words as a layer.
///
/// Keys are dotted paths into the TOML tables (`ballast.api.listen=`,
/// `ballast.network.interfaces.eth0.dhcp=false`); a value is read as a
/// TOML value (`false`, `3`, `["10.0.0.2/24"]`, `"quoted"`) and otherwise
/// taken as a string (`0.0.0.0:9465`). A key without `=` is `true`. The
/// boot chain's own keys are skipped. Each word is validated alone, so an
/// error names `/proc/cmdline` and the word. `None` when there are no keys.
pub fn cmdline_layer(cmdline: &str) -> Result<Option<Layer>, ConfigError> {
    let mut table = toml::Table::new();
    for word in cmdline_words(cmdline) {
        let Some(rest) = word.strip_prefix("ballast.") else {
            continue;
        };
        let (key, raw) = match rest.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (rest, None),
        };
        if BOOT_CHAIN_KEYS.contains(&key) || key == PLATFORM_WORD {
            continue;
        }
        if key.split('.').any(is_secret_key) {
            return Err(ConfigError::CmdlineSecret {
                key: key.to_owned(),
            });
        }
        let err = |detail: String| ConfigError::Cmdline {
            key: key.to_owned(),
            value: raw.unwrap_or_default().to_owned(),
            detail,
        };
        let path: Vec<&str> = key.split('.').collect();
        if path.iter().any(|p| p.is_empty()) {
            return Err(err("the key has an empty part".into()));
        }
        let value = match raw {
            None => toml::Value::Boolean(true),
            Some(raw) => toml::from_str::<toml::Table>(&format!("v = {raw}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| toml::Value::String(raw.to_owned())),
        };
        insert_path(&mut table, &path, value.clone()).map_err(&err)?;
        let mut one = toml::Table::new();
        insert_path(&mut one, &path, value).map_err(&err)?;
        let text = toml::to_string(&one).map_err(|e| err(e.to_string()))?;
        // Validated alone so the message names this word, not a line of
        // a document the user never wrote.
        if let Err(e) = Config::parse(&text, Path::new(CMDLINE)) {
            let detail = match e {
                ConfigError::Parse { message, .. } => message,
                other => other.to_string(),
            };
            return Err(err(detail));
        }
    }
    if table.is_empty() {
        return Ok(None);
    }
    let text = toml::to_string(&table).map_err(|e| ConfigError::Invalid {
        path: CMDLINE.into(),
        detail: e.to_string(),
    })?;
    Ok(Some(Layer {
        source: CMDLINE.into(),
        text,
    }))
}

/// Sets `path` in `table`, making tables on the way; a later word for the
/// same key replaces the earlier one, as the kernel's own parameters do.
fn insert_path(table: &mut toml::Table, path: &[&str], value: toml::Value) -> Result<(), String> {
    let Some((last, parents)) = path.split_last() else {
        return Err("the key is empty".into());
    };
    let mut at = table;
    for (i, part) in parents.iter().enumerate() {
        let entry = at
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        at = match entry {
            toml::Value::Table(t) => t,
            _ => {
                return Err(format!(
                    "ballast.{} is already a value, not a table",
                    path[..=i].join(".")
                ))
            }
        };
    }
    if matches!(at.get(*last), Some(toml::Value::Table(_))) && !value.is_table() {
        return Err(format!(
            "ballast.{} is already a table, not a value",
            path.join(".")
        ));
    }
    at.insert(last.to_string(), value);
    Ok(())
}

/// Splits a kernel command line into words as the kernel does: on
/// whitespace outside double quotes. Quotes around a whole word go; quotes
/// in a value stay, so `ballast.hostname="a b"` is the TOML string `"a b"`
/// and `[\"10.0.0.2/24\"]` an array.
fn cmdline_words(cmdline: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    for c in cmdline.chars() {
        if c == '"' {
            quoted = !quoted;
        }
        if c.is_whitespace() && !quoted {
            if !word.is_empty() {
                words.push(std::mem::take(&mut word));
            }
        } else {
            word.push(c);
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
        .into_iter()
        .map(
            |w| match w.strip_prefix('"').and_then(|w| w.strip_suffix('"')) {
                Some(inner) => inner.to_owned(),
                None => w,
            },
        )
        .collect()
}

fn merge_tables(into: &mut toml::Table, from: toml::Table) {
    for (key, value) in from {
        match (into.get_mut(&key), value) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge_tables(a, b),
            (_, value) => {
                into.insert(key, value);
            }
        }
    }
}

/// A copy of `table` with the values of secret-looking keys (see
/// [`is_secret_key`]) replaced, at any depth: tables, arrays and arrays of
/// tables; URLs with user info lose it.
pub fn redact(table: &toml::Table) -> toml::Table {
    table
        .iter()
        .map(|(k, v)| {
            let v = if is_secret_key(k) {
                toml::Value::String("<redacted>".into())
            } else {
                redact_value(v)
            };
            (k.clone(), v)
        })
        .collect()
}

fn redact_value(v: &toml::Value) -> toml::Value {
    match v {
        toml::Value::Table(t) => toml::Value::Table(redact(t)),
        toml::Value::Array(a) => toml::Value::Array(a.iter().map(redact_value).collect()),
        toml::Value::String(s) => toml::Value::String(ballast_updater::fetch::redact_url(s)),
        other => other.clone(),
    }
}

/// Finds this boot's user-data from the local sources by the trust policy
/// in [`user_data`]: fw_cfg, a `CIDATA` or `config-2` volume only at first
/// provisioning, else the copy on STATE. Ignored sources are reported
/// there. (PID 1 on EC2 adds instance metadata: `user_data::resolve`.)
pub fn find_user_data() -> Option<Layer> {
    user_data::find()
}

/// Keeps user-data on STATE: atomically (a torn copy would be a config
/// error at the next boot) and 0600 (it may hold tokens).
pub fn save_user_data(path: &Path, text: &str) {
    if let Err(e) = crate::atomic::write(path, text.as_bytes(), crate::atomic::PRIVATE) {
        tracing::warn!(error = %crate::error_chain(&e), "user-data not kept on STATE");
    }
}

/// Keeps the merged configuration that last loaded, the same way as
/// user-data (it holds the same secrets).
pub fn save_last_good(path: &Path, text: &str) {
    if let Err(e) = crate::atomic::write(path, text.as_bytes(), crate::atomic::PRIVATE) {
        tracing::warn!(error = %crate::error_chain(&e), "last good configuration not saved");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absurd_durations_are_config_errors() {
        for text in [
            "[update]\nhealth_deadline = \"1000000d\"\n",
            "[update]\ninterval = \"1000000d\"\n",
            "[health]\ninterval = \"1000000d\"\n",
            "[kubernetes.reboot]\ndrain_timeout = \"1000000d\"\n",
            "[kubernetes.reboot]\nlease_ttl = \"1000000d\"\n",
        ] {
            let err = Config::parse(text, std::path::Path::new("t.toml")).expect_err(text);
            let chain = crate::error_chain(&err);
            assert!(chain.contains("largest allowed"), "{text}: {chain}");
        }
    }

    #[test]
    fn saved_copies_are_private_and_replace_the_old_one() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let user_data = dir.path().join("lib/ballast/user-data.toml");
        let last_good = dir.path().join("lib/ballast/last-good.toml");
        std::fs::create_dir_all(user_data.parent().unwrap()).unwrap();
        // Copies from before were world-readable.
        std::fs::write(&user_data, "old").unwrap();
        std::fs::set_permissions(&user_data, std::fs::Permissions::from_mode(0o644)).unwrap();
        save_user_data(&user_data, "bootstrap_token = \"a.b\"\n");
        save_last_good(&last_good, "hostname = \"n\"\n");
        for (path, text) in [
            (&user_data, "bootstrap_token = \"a.b\"\n"),
            (&last_good, "hostname = \"n\"\n"),
        ] {
            assert_eq!(std::fs::read_to_string(path).unwrap(), text);
            let mode = std::fs::metadata(path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", path.display());
        }
    }

    #[test]
    fn the_documented_example_parses() {
        let text = r#"
hostname = "node-1"
[api]
listen = "0.0.0.0:9465"
[network.interfaces.eth0]
addresses = ["10.0.2.15/24"]
gateway = "10.0.2.2"
dns = ["10.0.2.3"]
"#;
        let c = Config::parse(text, Path::new("user-data")).unwrap();
        assert_eq!(c.hostname.as_deref(), Some("node-1"));
        assert_eq!(c.api.listen.unwrap().port(), 9465);
        let eth0 = &c.network.interfaces["eth0"];
        assert_eq!(parse_cidr(&eth0.addresses[0]).unwrap().prefix, 24);
    }

    #[test]
    fn errors_name_the_source_and_key() {
        let err = Config::parse("hostnme = \"x\"\n", Path::new("/etc/x.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/etc/x.toml") && err.contains("hostnme"),
            "{err}"
        );
        let err = Config::parse("[api]\nlisten = 5\n", Path::new("u"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("listen"), "{err}");
        let err = Config::parse(
            "[network.interfaces.eth0]\naddresses = [\"10.0.0.1\"]\n",
            Path::new("u"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("eth0") && err.contains("10.0.0.1"), "{err}");
        assert!(parse_cidr("10.0.0.1/33").is_none());
    }

    fn layer(name: &str, text: &str) -> Layer {
        Layer {
            source: name.into(),
            text: text.into(),
        }
    }

    #[test]
    fn later_layers_win_and_tables_merge() {
        let layers = [
            layer(
                "/usr/lib/ballast/config.d/10-vendor.toml",
                "hostname = \"vendor\"\n[network.interfaces.eth0]\naddresses = [\"10.0.0.2/24\"]\n",
            ),
            layer(
                "user-data",
                "hostname = \"node-1\"\n[api]\nlisten = \"127.0.0.1:9465\"\nclient_ca_file = \"/ca.pem\"\n",
            ),
            layer(
                "/etc/ballast/config.d/50.toml",
                "[network.interfaces.eth0]\ngateway = \"10.0.0.1\"\n",
            ),
        ];
        let (config, _) = merge(&layers).unwrap();
        assert_eq!(config.hostname.as_deref(), Some("node-1"));
        assert!(config.api.listen.is_some());
        let eth0 = &config.network.interfaces["eth0"];
        assert_eq!(eth0.addresses, ["10.0.0.2/24"]);
        assert_eq!(eth0.gateway, Some("10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn a_bad_layer_is_named_with_its_line() {
        let layers = [
            layer("a.toml", "hostname = \"x\"\n"),
            layer("b.toml", "\n\n[api]\nlistn = 1\n"),
        ];
        let err = merge(&layers).unwrap_err().to_string();
        assert!(
            err.contains("b.toml") && err.contains("line 4") && err.contains("listn"),
            "{err}"
        );
    }

    #[test]
    fn an_update_strategy_needs_its_table_in_the_merged_config() {
        let vendor = layer("10-vendor.toml", "[update]\nstrategy = \"window\"\n");
        let err = merge(std::slice::from_ref(&vendor))
            .unwrap_err()
            .to_string();
        assert!(err.contains("[update.window]"), "{err}");
        let err = merge(&[layer("u", "[update]\nstrategy = \"fleetlock\"\n")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("[update.fleetlock]"), "{err}");
        // The table may come from another layer.
        let user = layer(
            "user-data",
            "[update.window]\nstart = \"02:00\"\nlength = \"1h\"\n",
        );
        let (config, _) = merge(&[vendor, user]).unwrap();
        assert!(config.update.window.is_some());
        // A bad time of day is an error naming the file and key.
        let err = merge(&[layer(
            "bad.toml",
            "[update.window]\nstart = \"24:00\"\nlength = \"1h\"\n",
        )])
        .unwrap_err()
        .to_string();
        assert!(err.contains("bad.toml") && err.contains("24:00"), "{err}");
    }

    #[test]
    fn the_documented_example_loads() {
        let doc = include_str!("../../../docs/configuration.md");
        let example = doc
            .split("## Example\n\n```toml\n")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .expect("docs/configuration.md has an example");
        let (config, _) = merge(&[layer("docs/configuration.md", example)]).unwrap();
        assert_eq!(
            config.update.strategy,
            crate::config::update::Strategy::Fleetlock
        );
    }

    #[test]
    fn the_default_strategy_follows_kubernetes_and_its_agent_credential() {
        use crate::config::update::Strategy;
        const CLUSTER: &str =
            "[kubernetes]\napi_server = \"https://h\"\nkubeconfig = \"/k.conf\"\n";
        const AGENT: &str = "[kubernetes.agent]\ntoken_file = \"/t\"\n";
        let cases: &[(&[&str], Strategy)] = &[
            (&[""], Strategy::Immediate),
            (&[CLUSTER], Strategy::Immediate),
            (&[CLUSTER, AGENT], Strategy::Kubernetes),
            (&["[kubernetes]\nstandalone = true\n"], Strategy::Immediate),
            // An explicit strategy in any layer wins.
            (
                &["[update]\nstrategy = \"immediate\"\n", CLUSTER, AGENT],
                Strategy::Immediate,
            ),
            (
                &[CLUSTER, AGENT, "[update]\nstrategy = \"off\"\n"],
                Strategy::Off,
            ),
        ];
        for (texts, want) in cases {
            let layers: Vec<Layer> = texts
                .iter()
                .enumerate()
                .map(|(i, t)| layer(&format!("{i}.toml"), t))
                .collect();
            let (config, table) = merge(&layers).unwrap();
            assert_eq!(config.update.strategy, *want, "{texts:?}");
            // The shown configuration says only what the layers said.
            let said = table
                .get("update")
                .and_then(|u| u.get("strategy"))
                .is_some();
            assert_eq!(said, texts.iter().any(|t| t.contains("strategy")));
        }
    }

    #[test]
    fn secrets_are_redacted_at_any_depth() {
        let t: toml::Table = toml::from_str("a = 1\n[k]\nbootstrap_token = \"abc.def\"\n").unwrap();
        let shown = toml::to_string(&redact(&t)).unwrap();
        assert!(
            !shown.contains("abc.def") && shown.contains("<redacted>"),
            "{shown}"
        );
    }

    #[test]
    fn toml_errors_never_quote_the_source_line() {
        // (document, what the error must name) for a syntax error, an
        // unknown key and a type error; each line holds a secret.
        let cases: &[(&str, &[&str])] = &[
            (
                "[kubernetes]\nbootstrap_token = abcdef.0123456789abcdef\n",
                &["user-data", "line 2"],
            ),
            (
                "hostname = \"a\"\nbootstrap_tokn = \"abcdef.0123456789abcdef\"\n",
                &["line 2", "bootstrap_tokn"],
            ),
            (
                "[services.db]\ncommand = [\"db\"]\nenv = { DB_PASSWORD = \"abcdef.0123456789abcdef\", PORT = 80 }\n",
                &["line 3"],
            ),
            // A type error inside an inline table names the line, not the
            // value serde quotes.
            (
                "[services.db]\ncommand = [\"db\"]\nlimits = { memory_max = \"abcdef.0123456789abcdef\" }\n",
                &["line 3", "<value>"],
            ),
            // An error inside a multi-line string shows no part of it.
            (
                "hostname = \"\"\"\nabcdef0123456789abcdef=x\\q\n\"\"\"\n",
                &["line 2"],
            ),
        ];
        for (text, words) in cases {
            let err = Config::parse(text, Path::new("user-data")).unwrap_err();
            let shown = err.to_string();
            assert!(!shown.contains("0123456789abcdef"), "{shown}");
            for w in *words {
                assert!(shown.contains(w), "{shown:?} lacks {w:?}");
            }
            let ConfigError::Parse { line, column, .. } = err else {
                panic!("not a parse error: {shown}");
            };
            assert!(line.is_some() && column.is_some(), "{shown}");
            // The merge path reports the same way.
            let shown = merge(&[layer("user-data", text)]).unwrap_err().to_string();
            assert!(!shown.contains("0123456789abcdef"), "{shown}");
        }
    }

    #[test]
    fn secrets_are_redacted_in_arrays_and_arrays_of_tables() {
        let t: toml::Table = toml::from_str(
            r#"
api_key = "k1"
[a]
privateKey = "k2"
list = [{ credentials = "k3" }, "plain"]
nested = [[{ Password = "k4" }]]
url = "https://user:k5@repo.example/x"
[[b]]
SECRET_thing = "k6"
name = "shown"
[[b]]
inner = { token = "k7" }
"#,
        )
        .unwrap();
        let shown = toml::to_string(&redact(&t)).unwrap();
        for secret in ["k1", "k2", "k3", "k4", "k5", "k6", "k7"] {
            assert!(
                !shown.contains(&format!("\"{secret}")),
                "{secret} in {shown}"
            );
            assert!(
                !shown.contains(&format!(":{secret}@")),
                "{secret} in {shown}"
            );
        }
        assert!(
            shown.contains("plain") && shown.contains("shown"),
            "{shown}"
        );
        assert!(shown.contains("https://***@repo.example/x"), "{shown}");
        for key in [
            "bootstrap_token",
            "api_key",
            "privateKey",
            "CREDENTIALS",
            "db_password",
            "auth",
            "password",
        ] {
            assert!(is_secret_key(key), "{key}");
        }
        for key in [
            "hostname",
            "listen",
            "url",
            "command",
            "authentication",
            "authorization",
            "username",
        ] {
            assert!(!is_secret_key(key), "{key}");
        }
    }

    #[test]
    fn secrets_are_refused_on_the_kernel_command_line() {
        for line in [
            "ballast.kubernetes.bootstrap_token=abcdef.0123456789abcdef",
            "ballast.services.db.env.DB_PASSWORD=hunter2",
            "ballast.update.api_key",
            "ballast.hostname=x ballast.something.privateKey=hunter2",
        ] {
            let err = cmdline_layer(line).unwrap_err();
            assert!(matches!(err, ConfigError::CmdlineSecret { .. }), "{line}");
            let shown = err.to_string();
            assert!(shown.contains("secrets are not accepted"), "{shown}");
            assert!(
                !shown.contains("hunter2") && !shown.contains("0123456789abcdef"),
                "{shown}"
            );
        }
    }

    #[test]
    fn private_files_are_0600_even_when_they_existed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("user-data.toml");
        save_user_data(&path, "a = 1\n");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        save_user_data(&path, "b = 2\n");
        assert_eq!(mode(&path), 0o600);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "b = 2\n");
    }

    #[test]
    fn kernel_command_line_keys_become_a_layer() {
        // (command line, expected TOML of the layer; None: no layer)
        let cases: &[(&str, Option<&str>)] = &[
            ("console=ttyS0 panic=10", None),
            (
                "ballast.version=1.0.0 ballast.slot=a ballast.usr=PARTUUID=x ballast.usrfs=erofs \
                 ballast.verity=ab ballast.verity.salt=cd ballast.verity.blocks=9",
                None,
            ),
            // The platform word is read by net::imds, not configuration.
            ("ballast.platform=ec2", None),
            ("ballast.hostname=node-7", Some("hostname = \"node-7\"\n")),
            (
                "ballast.api.listen=0.0.0.0:9465",
                Some("[api]\nlisten = \"0.0.0.0:9465\"\n"),
            ),
            (
                "ballast.network.interfaces.eth0.dhcp=false",
                Some("[network.interfaces.eth0]\ndhcp = false\n"),
            ),
            (
                "quiet ballast.network.interfaces.eth0.addresses=[\"10.0.0.2/24\"] \
                 ballast.network.interfaces.eth0.gateway=10.0.0.1",
                Some("[network.interfaces.eth0]\naddresses = [\"10.0.0.2/24\"]\ngateway = \"10.0.0.1\"\n"),
            ),
            (
                "ballast.hostname=\"two words\" ballast.hostname=last",
                Some("hostname = \"last\"\n"),
            ),
            (
                "ballast.hostname=\"two words\"",
                Some("hostname = \"two words\"\n"),
            ),
            (
                "\"ballast.hostname=quoted whole\" ballast.network.interfaces.eth0.dhcp",
                Some("hostname = \"quoted whole\"\n\n[network.interfaces.eth0]\ndhcp = true\n"),
            ),
            (
                "ballast.network.interfaces.eth0.ipv6=off",
                Some("[network.interfaces.eth0]\nipv6 = \"off\"\n"),
            ),
        ];
        for (line, want) in cases {
            let layer = cmdline_layer(line).unwrap_or_else(|e| panic!("{line}: {e}"));
            assert_eq!(layer.as_ref().map(|l| l.text.as_str()), *want, "{line}");
            if let Some(l) = layer {
                assert_eq!(l.source, Path::new(CMDLINE));
                Config::parse(&l.text, &l.source).unwrap();
            }
        }
    }

    #[test]
    fn bad_kernel_command_line_keys_name_the_file_and_word() {
        // (command line, words the error must contain)
        let cases: &[(&str, &[&str])] = &[
            (
                "ballast.hostnme=x",
                &["/proc/cmdline", "ballast.hostnme=x", "hostnme"],
            ),
            (
                "ballast.api.listen=nowhere",
                &["ballast.api.listen=nowhere", "listen"],
            ),
            (
                "ballast.network.interfaces.eth0.dhcp=maybe",
                &["ballast.network.interfaces.eth0.dhcp=maybe", "bool"],
            ),
            ("ballast.network..x=1", &["ballast.network..x=1", "empty"]),
            (
                "ballast.hostname=a ballast.hostname.x=1",
                &["ballast.hostname.x=1", "already a value"],
            ),
            (
                "ballast.network.interfaces.eth0.addresses=[\"10.0.0.2\"]",
                &["/proc/cmdline", "eth0", "10.0.0.2"],
            ),
        ];
        for (line, words) in cases {
            let err = cmdline_layer(line).unwrap_err().to_string();
            for w in *words {
                assert!(err.contains(w), "{line}: {err:?} lacks {w:?}");
            }
        }
    }

    #[test]
    fn the_command_line_sits_between_vendor_and_user_data() {
        let cmdline = cmdline_layer("ballast.hostname=from-cmdline ballast.api.listen=0.0.0.0:1")
            .unwrap()
            .unwrap();
        let layers = [
            layer(
                "/usr/lib/ballast/config.d/10.toml",
                "hostname = \"vendor\"\n",
            ),
            cmdline,
            layer(
                "user-data",
                "[api]\nlisten = \"127.0.0.1:2\"\nclient_ca_file = \"/ca.pem\"\n",
            ),
        ];
        let (config, _) = merge(&layers).unwrap();
        assert_eq!(config.hostname.as_deref(), Some("from-cmdline"));
        assert_eq!(config.api.listen.unwrap().port(), 2);
    }

    #[test]
    fn a_tcp_api_without_a_client_ca_is_a_configuration_error() {
        // A layer alone may say only `listen` (the CA may come from another).
        let cmdline = cmdline_layer("ballast.api.listen=0.0.0.0:9465")
            .unwrap()
            .unwrap();
        let err = merge(std::slice::from_ref(&cmdline))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("api.listen") && err.contains("client_ca"),
            "{err}"
        );
        let ca = layer("user-data", "[api]\nclient_ca_file = \"/ca.pem\"\n");
        let (config, _) = merge(&[cmdline, ca]).unwrap();
        assert_eq!(config.api.listen.unwrap().port(), 9465);
        // Without `listen` no CA is needed.
        assert!(merge(&[layer("u", "hostname = \"a\"\n")]).is_ok());
    }

    #[test]
    fn api_pem_values_are_checked_without_echoing_keys() {
        let both = "[api]\nclient_ca = \"x\"\nclient_ca_file = \"/ca\"\n";
        let err = Config::parse(both, Path::new("u")).unwrap_err().to_string();
        assert!(err.contains("not both"), "{err}");
        let bad_ca = "[api]\nclient_ca = \"not pem\"\n";
        let err = Config::parse(bad_ca, Path::new("u"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("api.client_ca"), "{err}");
        let bad_key = "[api]\nserver_key = \"-----BEGIN NOTHING-----\\nc2VjcmV0\\n-----END NOTHING-----\\n\"\n";
        let err = Config::parse(bad_key, Path::new("u"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("server_key") && !err.contains("c2VjcmV0"),
            "{err}"
        );
        let lonely = layer("u", "[api]\nserver_cert_file = \"/c.pem\"\n");
        let err = merge(&[lonely]).unwrap_err().to_string();
        assert!(err.contains("go together"), "{err}");
        let table: toml::Table = toml::from_str("[api]\nserver_key = \"k\"\n").unwrap();
        assert_eq!(
            redact(&table)["api"]["server_key"].as_str(),
            Some("<redacted>")
        );
    }

    #[test]
    fn dhcp_defaults_to_on_without_static_addresses() {
        let c = Config::parse(
            "[network.interfaces.eth0]\n[network.interfaces.eth1]\naddresses = [\"10.0.0.2/24\"]\n\
             [network.interfaces.eth2]\naddresses = [\"10.0.0.2/24\"]\ndhcp = true\nipv6 = \"off\"\n",
            Path::new("u"),
        )
        .unwrap();
        let i = &c.network.interfaces;
        assert!(i["eth0"].dhcp_enabled());
        assert!(!i["eth1"].dhcp_enabled());
        assert!(i["eth2"].dhcp_enabled());
        assert_eq!(i["eth0"].ipv6_mode(), Ipv6Mode::Ra);
        assert_eq!(i["eth2"].ipv6_mode(), Ipv6Mode::Off);
    }

    #[test]
    fn dropins_apply_in_name_order_and_skip_other_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("20-b.toml"), "hostname = \"b\"\n").unwrap();
        std::fs::write(dir.path().join("10-a.toml"), "hostname = \"a\"\n").unwrap();
        std::fs::write(dir.path().join("README"), "not toml").unwrap();
        let layers = dropins(dir.path()).unwrap();
        assert_eq!(layers.len(), 2);
        assert_eq!(merge(&layers).unwrap().0.hostname.as_deref(), Some("b"));
        assert!(dropins(&dir.path().join("missing")).unwrap().is_empty());
    }
}
