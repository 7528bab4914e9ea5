//! Command-line front ends of the `ballast` binary. Each submodule parses
//! its own subcommands and calls into the libraries. With the global
//! `--node HOST[:PORT]`, the remote-capable commands (`status`, `logs`,
//! `reboot`, `update check|apply|rollback`, `config show`, `user-data put`)
//! go to that node's HTTPS API through [`remote`]; without it they act on
//! this machine as before.

pub mod config;
pub mod kubernetes;
pub mod logs;
pub mod pki;
pub mod remote;
pub mod repo;
pub mod update;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::api;

#[derive(Debug, Parser)]
#[command(name = "ballast", version, about = "Ballast node agent")]
pub struct Cli {
    #[command(flatten)]
    pub remote: remote::RemoteArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Update repository tools for operators.
    #[command(subcommand)]
    Repo(repo::RepoCommand),
    /// Check for, install and manage updates on this node.
    #[command(subcommand)]
    Update(update::UpdateCommand),
    /// Show (or follow) a service's log.
    Logs(logs::LogsArgs),
    /// Check or show the node's configuration.
    #[command(subcommand)]
    Config(config::ConfigCommand),
    /// Render the kubelet and containerd files of a configuration.
    #[command(subcommand)]
    Kubernetes(kubernetes::KubernetesCommand),
    /// Show the node's status from the agent's API.
    Status {
        /// Print the JSON as the API returns it.
        #[arg(long)]
        json: bool,
    },
    /// Reboot the node (here: ask PID 1; with --node: through the node's
    /// reboot strategy).
    Reboot {
        /// With --node: reboot now, skipping the window, FleetLock or
        /// Kubernetes drain (admins only).
        #[arg(long, requires = "node")]
        force: bool,
        /// With --node: print the API's JSON answer.
        #[arg(long)]
        json: bool,
    },
    /// Operator CA and client certificates for the node API.
    #[command(subcommand)]
    Pki(pki::PkiCommand),
    /// Replace a node's user-data (with --node; applied at its next boot).
    #[command(subcommand)]
    UserData(UserDataCommand),
    /// Ask PID 1 to power the node off.
    Poweroff,
}

/// Parses the command line and runs it; the binary's edge, so errors are
/// `anyhow` here.
pub fn main() -> anyhow::Result<()> {
    run(Cli::parse())
}

#[derive(Debug, Subcommand)]
pub enum UserDataCommand {
    /// Send FILE (TOML) as the node's user-data; the node validates it and
    /// keeps the previous copy.
    Put {
        file: PathBuf,
        /// Print the API's JSON answer.
        #[arg(long)]
        json: bool,
    },
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if cli.remote.node.is_some() {
        let action = remote_action(cli.command)?;
        return remote::run(&cli.remote, action);
    }
    match cli.command {
        Command::Repo(cmd) => repo::run(cmd),
        Command::Update(cmd) => update::run(cmd),
        Command::Logs(args) => logs::run(args),
        Command::Config(cmd) => config::run(cmd),
        Command::Kubernetes(cmd) => kubernetes::run(cmd),
        Command::Pki(cmd) => pki::run(cmd),
        Command::Status { json } => status(json),
        Command::Reboot { .. } => signal_init(nix::sys::signal::Signal::SIGTERM),
        Command::Poweroff => signal_init(nix::sys::signal::Signal::SIGUSR2),
        Command::UserData(_) => {
            anyhow::bail!("`user-data put` sends user-data to a node: give it --node HOST")
        }
    }
}

/// What `command` means against a remote node; commands that only make
/// sense here are refused rather than silently run locally.
fn remote_action(command: Command) -> anyhow::Result<remote::Action> {
    use remote::Action;
    Ok(match command {
        Command::Status { json } => Action::Status { json },
        Command::Logs(args) => Action::Logs {
            source: args.service,
            tail: args.lines,
            follow: args.follow,
        },
        Command::Reboot { force, json } => Action::Reboot { force, json },
        Command::Update(update::UpdateCommand::Check { node, .. }) => {
            Action::UpdateCheck { json: node.json }
        }
        Command::Update(update::UpdateCommand::Apply { node, .. }) => {
            Action::UpdateApply { json: node.json }
        }
        // The node records who asked (the certificate's CN) as the reason.
        Command::Update(update::UpdateCommand::Rollback { node, .. }) => {
            Action::UpdateRollback { json: node.json }
        }
        Command::Config(config::ConfigCommand::Show { json, .. }) => Action::ConfigShow { json },
        Command::UserData(UserDataCommand::Put { file, json }) => {
            Action::UserDataPut { file, json }
        }
        other => anyhow::bail!(
            "{} does not run against a remote node; drop --node (remote: status, logs, reboot, \
             update check|apply|rollback, config show, user-data put)",
            command_name(&other)
        ),
    })
}

fn command_name(command: &Command) -> &'static str {
    match command {
        Command::Repo(_) => "`repo`",
        Command::Update(_) => "this `update` subcommand",
        Command::Logs(_) => "`logs`",
        Command::Config(_) => "`config check`",
        Command::Kubernetes(_) => "`kubernetes`",
        Command::Status { .. } => "`status`",
        Command::Reboot { .. } => "`reboot`",
        Command::Pki(_) => "`pki`",
        Command::UserData(_) => "`user-data`",
        Command::Poweroff => "`poweroff`",
    }
}

/// `/status` for people: the node's identity, its API, update state,
/// health and services. Accepts the fields flat too (older agents).
pub fn render_status(v: &serde_json::Value) -> String {
    let mut out = String::new();
    let node = v.get("node").unwrap_or(v);
    let show = |value: &serde_json::Value| {
        value
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| value.to_string())
    };
    for key in [
        "hostname",
        "version",
        "arch",
        "slot",
        "boot_id",
        "config_error",
    ] {
        if let Some(value) = node.get(key).filter(|v| !v.is_null()) {
            out.push_str(&format!("{key:>13}: {}\n", show(value)));
        }
    }
    if let Some(api) = v.get("api").filter(|a| a.is_object()) {
        for (key, label) in [("listen", "api"), ("cert_sha256", "api cert")] {
            if let Some(value) = api.get(key).filter(|v| !v.is_null()) {
                out.push_str(&format!("{label:>13}: {}\n", show(value)));
            }
        }
    }
    if let Some(state) = v.pointer("/update/state").filter(|s| !s.is_null()) {
        let state = state
            .get("state")
            .or_else(|| state.get("name"))
            .unwrap_or(state);
        out.push_str(&format!("{:>13}: {}\n", "update", show(state)));
    }
    let ready = v
        .pointer("/health/report/ready")
        .or_else(|| v.pointer("/health/ready"));
    if let Some(ready) = ready.and_then(|r| r.as_bool()) {
        let word = if ready { "ready" } else { "NOT ready" };
        out.push_str(&format!("{:>13}: {word}\n", "health"));
    }
    if let Some(services) = v.get("services").and_then(|s| s.as_array()) {
        for s in services {
            let name = s.get("name").map(show).unwrap_or_default();
            let state = s.get("state").map(show).unwrap_or_default();
            out.push_str(&format!("{:>13}: {name} {state}\n", "service"));
        }
    }
    out
}

fn status(json: bool) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (code, body) = rt
        .block_on(api::request(
            PathBuf::from(api::SOCKET_PATH),
            hyper::Method::GET,
            "/status",
        ))
        .map_err(anyhow::Error::msg)
        .context("asking the agent for its status")?;
    anyhow::ensure!(code.is_success(), "agent answered {code}: {body}");
    if json {
        println!("{body}");
        return Ok(());
    }
    let v: serde_json::Value = serde_json::from_str(&body)?;
    print!("{}", render_status(&v));
    Ok(())
}

fn signal_init(sig: nix::sys::signal::Signal) -> anyhow::Result<()> {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(1), sig)
        .with_context(|| format!("sending {sig} to PID 1"))
}
