//! Command-line front ends of the `ballast` binary. Each submodule parses
//! its own subcommands and calls into the libraries.

pub mod config;
pub mod kubernetes;
pub mod logs;
pub mod repo;
pub mod update;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::api;

#[derive(Debug, Parser)]
#[command(name = "ballast", version, about = "Ballast node agent")]
pub struct Cli {
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
    /// Ask PID 1 to reboot the node.
    Reboot,
    /// Ask PID 1 to power the node off.
    Poweroff,
}

/// Parses the command line and runs it; the binary's edge, so errors are
/// `anyhow` here.
pub fn main() -> anyhow::Result<()> {
    run(Cli::parse())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Repo(cmd) => repo::run(cmd),
        Command::Update(cmd) => update::run(cmd),
        Command::Logs(args) => logs::run(args),
        Command::Config(cmd) => config::run(cmd),
        Command::Kubernetes(cmd) => kubernetes::run(cmd),
        Command::Status { json } => status(json),
        Command::Reboot => signal_init(nix::sys::signal::Signal::SIGTERM),
        Command::Poweroff => signal_init(nix::sys::signal::Signal::SIGUSR2),
    }
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
    for key in ["version", "arch", "slot", "boot_id", "config_error"] {
        if let Some(value) = v.get(key).filter(|v| !v.is_null()) {
            println!(
                "{key:>13}: {}",
                value
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| value.to_string())
            );
        }
    }
    Ok(())
}

fn signal_init(sig: nix::sys::signal::Signal) -> anyhow::Result<()> {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(1), sig)
        .with_context(|| format!("sending {sig} to PID 1"))
}
