//! The operator's side of the VM tests, as a real operator would work:
//! the host-built `ballast` binary as the client, an operator CA and
//! client identities made with `ballast pki`, user-data giving the node
//! that CA, and the node's certificate pin read from its `api-listening`
//! console event. Scenarios that only need the API over TLS use
//! [`Operator::admin_tls`] with the same identity and pin.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::events::Event;
use crate::scenarios::ScenarioError;
use crate::tls::TlsClient;
use crate::vm::Vm;

/// Overrides the client binary (e.g. a release build); otherwise
/// `cargo build -p ballast` for the host makes it.
pub const CLIENT_ENV: &str = "BALLAST_CLIENT";

/// The host's `ballast` binary, built once per process.
pub fn ballast_binary() -> Result<PathBuf, ScenarioError> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(path) = std::env::var_os(CLIENT_ENV).filter(|p| !p.is_empty()) {
            return Ok(PathBuf::from(path));
        }
        build_client()
    })
    .clone()
    .map_err(ScenarioError::Setup)
}

/// `cargo build -p ballast --bin ballast` for the host; the executable's
/// path from cargo's JSON messages (wherever the target directory is).
fn build_client() -> Result<PathBuf, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or("no workspace root")?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("building the host's ballast client (cargo build -p ballast)...");
    let out = Command::new(cargo)
        .current_dir(root)
        .args([
            "build",
            "-p",
            "ballast",
            "--bin",
            "ballast",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("running cargo build for the client: {e}"))?;
    if !out.status.success() {
        return Err(format!("cargo build -p ballast failed: {}", out.status));
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"]["name"] == "ballast")
        .find_map(|v| v["executable"].as_str().map(PathBuf::from))
        .ok_or_else(|| "cargo built no ballast executable".to_owned())
}

/// An operator: a CA, an admin identity, and the client.
#[derive(Debug)]
pub struct Operator {
    bin: PathBuf,
    dir: tempfile::TempDir,
}

/// The output of one client run.
#[derive(Debug, Clone)]
pub struct Run {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
    pub line: String,
}

impl Run {
    fn from(line: String, out: Output) -> Run {
        Run {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            line,
        }
    }

    /// "`line`: exit ..., stdout ..., stderr ..." for failure messages.
    pub fn describe(&self) -> String {
        format!(
            "`{}`: {}, stdout {:?}, stderr {:?}",
            self.line,
            if self.ok { "succeeded" } else { "failed" },
            self.stdout.trim(),
            self.stderr.trim()
        )
    }
}

impl Operator {
    /// `ballast pki init CA` and an admin identity `admin`.
    pub fn new() -> Result<Operator, ScenarioError> {
        let bin = ballast_binary()?;
        let dir = tempfile::Builder::new()
            .prefix("ballast-operator-")
            .tempdir()
            .map_err(ScenarioError::Scratch)?;
        let op = Operator { bin, dir };
        op.pki(&["init", &op.path("ca")])?;
        op.issue("ca", "admin", "admin")?;
        Ok(op)
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// A directory in the operator's scratch space.
    pub fn dir(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn pki(&self, args: &[&str]) -> Result<(), ScenarioError> {
        let run = self.run_raw(&[&["pki"], args].concat())?;
        if !run.ok {
            return Err(ScenarioError::Setup(run.describe()));
        }
        Ok(())
    }

    /// `ballast pki init DIR` for another CA (not the one nodes trust).
    pub fn init_ca(&self, ca: &str) -> Result<(), ScenarioError> {
        self.pki(&["init", &self.path(ca)])
    }

    /// `ballast pki issue --ca CA --role ROLE --name NAME --out NAME`;
    /// returns the identity directory.
    pub fn issue(&self, ca: &str, role: &str, name: &str) -> Result<PathBuf, ScenarioError> {
        self.pki(&[
            "issue",
            "--ca",
            &self.path(ca),
            "--role",
            role,
            "--name",
            name,
            "--out",
            &self.path(name),
        ])?;
        Ok(self.dir(name))
    }

    /// The `[api]` section nodes get: listen on 9465, trust the CA.
    pub fn api_user_data(&self) -> Result<String, ScenarioError> {
        let pem = std::fs::read_to_string(self.dir("ca").join("ca.crt"))
            .map_err(ScenarioError::Scratch)?;
        Ok(api_section(&pem))
    }

    /// A TLS client with the admin identity, pinned to `pin`.
    pub fn admin_tls(&self, pin: &str) -> Result<TlsClient, ScenarioError> {
        Ok(TlsClient::pinned(pin, Some(&self.dir("admin")))?)
    }

    /// Runs the client with `args` as they are.
    pub fn run_raw(&self, args: &[&str]) -> Result<Run, ScenarioError> {
        let out = Command::new(&self.bin)
            .args(args)
            .env_remove("BALLAST_PIN")
            .env_remove("BALLAST_IDENTITY")
            .output()
            .map_err(|e| ScenarioError::Setup(format!("running {}: {e}", self.bin.display())))?;
        Ok(Run::from(format!("ballast {}", args.join(" ")), out))
    }

    /// `ballast --node 127.0.0.1:PORT --identity ID [--pin PIN] ARGS`.
    pub fn remote(
        &self,
        identity: &str,
        port: u16,
        pin: Option<&str>,
        args: &[&str],
    ) -> Result<Run, ScenarioError> {
        let node = format!("127.0.0.1:{port}");
        let id = self.path(identity);
        let mut all = vec!["--node", node.as_str(), "--identity", id.as_str()];
        if let Some(pin) = pin {
            all.extend(["--pin", pin]);
        }
        all.extend(args);
        self.run_raw(&all)
    }
}

/// `[api]` listening on all addresses with `pem` as the client CA.
pub fn api_section(pem: &str) -> String {
    format!(
        "[api]\nlisten = \"0.0.0.0:9465\"\nclient_ca = '''\n{}\n'''\n",
        pem.trim()
    )
}

/// The node's certificate pin from the newest `api-listening` event after
/// the first `since` events seen, waiting for one if none came yet.
pub fn api_pin(vm: &mut Vm, since: usize) -> Result<String, ScenarioError> {
    let seen = vm
        .events_seen()
        .get(since..)
        .unwrap_or_default()
        .iter()
        .rev()
        .find(|e| e.name == "api-listening")
        .cloned();
    let ev: Event = match seen {
        Some(ev) => ev,
        None => vm.wait_for_event("api-listening", Duration::from_secs(120))?,
    };
    match ev.str_field("cert_sha256") {
        Some(pin) if pin.len() == 64 && pin.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Ok(pin.to_ascii_lowercase())
        }
        _ => Err(vm
            .fail(format!(
                "api-listening has no 64-hex-digit cert_sha256: {}",
                ev.json()
            ))
            .into()),
    }
}

/// Waits up to 60 s for `GET /healthz` over TLS (no client certificate,
/// as a probe has none) to answer 200.
pub fn wait_healthz(vm: &mut Vm, port: u16, pin: &str) -> Result<(), ScenarioError> {
    let probe = TlsClient::pinned(pin, None)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match probe.request(port, "GET", "/healthz", None, Duration::from_secs(10)) {
            Ok(r) if r.status == 200 => return Ok(()),
            Ok(r) if Instant::now() >= deadline => {
                return Err(vm
                    .fail(format!("GET /healthz answered {}: {}", r.status, r.body))
                    .into());
            }
            Err(e) if Instant::now() >= deadline => {
                return Err(vm.fail(format!("GET /healthz never answered: {e}")).into());
            }
            _ => std::thread::sleep(Duration::from_secs(1)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_section_is_toml_holding_the_pem() {
        let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let text = format!(
            "{}[network.interfaces.eth0]\naddresses = []\n",
            api_section(pem)
        );
        let v: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(v["api"]["listen"].as_str(), Some("0.0.0.0:9465"));
        assert_eq!(
            v["api"]["client_ca"].as_str().map(str::trim),
            Some(pem.trim())
        );
    }
}
