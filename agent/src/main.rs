//! The `ballast` binary. As PID 1 in the initramfs it is `/init` (early
//! boot); as PID 1 in the slot it is the node's init; anywhere else it is
//! the command-line tool.

mod api;
mod bootinfo;
mod cidata;
mod cli;
mod config;
mod console;
mod disks;
mod early_boot;
mod failpoints;
mod health;
mod kubernetes;
mod metrics;
mod modules;
mod mounts;
mod net;
mod power;
mod state_grow;
mod supervisor;
mod sys;
mod system;
mod update_loop;

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

/// Present only in the initramfs (written by the image build).
const INITRD_MARKER: &str = "/etc/ballast/initrd-modules";

#[derive(Debug, Parser)]
#[command(name = "ballast", version, about = "Ballast node agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Update repository tools for operators.
    #[command(subcommand)]
    Repo(cli::repo::RepoCommand),
    /// Check for, install and manage updates on this node.
    #[command(subcommand)]
    Update(cli::update::UpdateCommand),
    /// Show (or follow) a service's log.
    Logs(cli::logs::LogsArgs),
    /// Check or show the node's configuration.
    #[command(subcommand)]
    Config(cli::config::ConfigCommand),
    /// Render the kubelet and containerd files of a configuration.
    #[command(subcommand)]
    Kubernetes(cli::kubernetes::KubernetesCommand),
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

fn main() {
    init_logging();
    if nix::unistd::getpid().as_raw() == 1 {
        if std::path::Path::new(INITRD_MARKER).exists() {
            early_boot::run();
        }
        system::run();
    }
    let cli = Cli::parse();
    if let Err(err) = run(cli) {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Repo(cmd) => cli::repo::run(cmd),
        Command::Update(cmd) => cli::update::run(cmd),
        Command::Logs(args) => cli::logs::run(args),
        Command::Config(cmd) => cli::config::run(cmd),
        Command::Kubernetes(cmd) => cli::kubernetes::run(cmd),
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

fn init_logging() {
    let level = match std::env::var("BALLAST_LOG").as_deref() {
        Ok("debug") => tracing::Level::DEBUG,
        Ok("trace") => tracing::Level::TRACE,
        Ok("warn") => tracing::Level::WARN,
        _ => tracing::Level::INFO,
    };
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal() && nix::unistd::getpid().as_raw() != 1)
        .with_target(false)
        .init();
}

/// Points stdin, stdout and stderr at `/dev/console`: the kernel may have
/// started us without them when the initramfs lacked the node.
pub fn reopen_console() {
    use std::os::fd::AsRawFd;
    let Ok(console) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    else {
        return;
    };
    for fd in 0..3 {
        let _ = nix::unistd::dup2(console.as_raw_fd(), fd);
    }
}

/// `outer: middle: inner`, for one-line reports of an error and its causes.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        out.push_str(": ");
        out.push_str(&e.to_string());
        source = e.source();
    }
    out
}
