//! `ballast update ...`: the node side of updates (check, apply, status,
//! mark-good, rollback). On a node everything is found by itself: the
//! running version from /proc/cmdline, the slots by GPT label (`USR-A`,
//! `USR-B`) on the disk that holds the running slot, the ESP at /efi, the
//! state in /var/lib/ballast/update. Overrides make it run on plain files.
//! Discovery is `crate::update::layout` (PID 1's update driver uses the
//! same); the logic is `ballast_updater::{install, control}`.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Instant, SystemTime};

use anyhow::{bail, Context};
use ballast_updater::control;
use ballast_updater::esp::NodeLayout;
use ballast_updater::install::{self, ApplyOptions, Node, Progress, Source};
use ballast_updater::keys::TrustedKeys;
use ballast_updater::payload::{Arch, Version};
use ballast_updater::storage::RealStorage;

use crate::update::layout;

/// One line: the repository URL, when neither `--repo` nor `[update]
/// repository` gives one.
const DEFAULT_REPO_FILE: &str = "/etc/ballast/update-repo";

/// Where the node's pieces are; each defaults to discovery on a node.
#[derive(Debug, Clone, clap::Args)]
pub struct NodeArgs {
    /// Root of the mounted ESP.
    #[arg(long, value_name = "DIR")]
    esp: Option<PathBuf>,
    /// Slot A device or file, optionally `=PARTUUID`.
    #[arg(long, value_name = "PATH[=PARTUUID]")]
    slot_a: Option<String>,
    /// Slot B device or file, optionally `=PARTUUID`.
    #[arg(long, value_name = "PATH[=PARTUUID]")]
    slot_b: Option<String>,
    /// Kernel command line of the running system.
    #[arg(long, value_name = "FILE", default_value = layout::DEFAULT_CMDLINE)]
    cmdline: PathBuf,
    /// Updater state directory.
    #[arg(long, value_name = "DIR", default_value = layout::DEFAULT_STATE)]
    state: PathBuf,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// Where updates come from.
#[derive(Debug, Clone, clap::Args)]
pub struct SourceArgs {
    /// Repository: http(s) URL, file:// URL or directory.
    #[arg(long, value_name = "URL")]
    repo: Option<String>,
    /// Trusted public key file or directory of *.pub; repeatable.
    #[arg(long, value_name = "FILE")]
    trust: Vec<PathBuf>,
    /// Signatures required (default: the trust directory's `threshold`
    /// file, else 1).
    #[arg(long)]
    threshold: Option<usize>,
    /// Release channel (default: `[update] channel` of the node's
    /// configuration, else `stable`).
    #[arg(long)]
    channel: Option<String>,
    /// Image variant of this node (default: VARIANT_ID in os-release).
    #[arg(long)]
    variant: Option<String>,
    /// Architecture of this node (default: the binary's).
    #[arg(long, value_parser = parse_arch)]
    arch: Option<Arch>,
    /// Install this version rather than the newest applicable one.
    #[arg(long)]
    version: Option<Version>,
    /// Allow installing a version older than the running one (never
    /// below the manifest's floor).
    #[arg(long)]
    allow_downgrade: bool,
}

fn parse_arch(s: &str) -> Result<Arch, String> {
    s.parse()
        .map_err(|e: ballast_updater::payload::PayloadError| e.to_string())
}

#[derive(Debug, clap::Subcommand)]
pub enum UpdateCommand {
    /// Fetch and verify the manifest; say which release applies and why.
    Check {
        #[command(flatten)]
        node: NodeArgs,
        #[command(flatten)]
        source: SourceArgs,
    },
    /// Install the applicable release into the inactive slot.
    Apply {
        #[command(flatten)]
        node: NodeArgs,
        #[command(flatten)]
        source: SourceArgs,
        /// Reboot into it when installed (asks PID 1 with SIGTERM).
        #[arg(long)]
        reboot: bool,
    },
    /// Running version and slot, slots, entries and tries, last event.
    Status {
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Bless the running version: drop its boot counter.
    MarkGood {
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Make the other slot's version boot next.
    Rollback {
        #[command(flatten)]
        node: NodeArgs,
        /// Recorded in the state and shown by `status`.
        #[arg(long, default_value = "requested by operator")]
        reason: String,
    },
}

fn layout(args: &NodeArgs) -> anyhow::Result<NodeLayout> {
    Ok(layout::discover(&layout::Overrides {
        esp: args
            .esp
            .clone()
            .unwrap_or_else(|| layout::DEFAULT_ESP.into()),
        slot_a: args.slot_a.as_deref().map(layout::SlotOverride::parse),
        slot_b: args.slot_b.as_deref().map(layout::SlotOverride::parse),
        cmdline: args.cmdline.clone(),
        state: args.state.clone(),
    })?)
}

fn variant(source: &SourceArgs) -> anyhow::Result<String> {
    if let Some(v) = &source.variant {
        return Ok(v.clone());
    }
    layout::variant().context("pass --variant")
}

fn trust(source: &SourceArgs) -> anyhow::Result<TrustedKeys> {
    let paths = if source.trust.is_empty() {
        vec![PathBuf::from(layout::DEFAULT_TRUST)]
    } else {
        source.trust.clone()
    };
    Ok(TrustedKeys::load(&paths, source.threshold)?)
}

/// The node's `[update]` settings; an unreadable configuration only
/// means no defaults from it (flags still work off the node).
fn configured() -> crate::config::update::UpdateConfig {
    match super::config::effective() {
        Ok(c) => c.update,
        Err(e) => {
            tracing::debug!(error = %e, "no node configuration for update defaults");
            crate::config::update::UpdateConfig::default()
        }
    }
}

fn channel(source: &SourceArgs) -> String {
    source
        .channel
        .clone()
        .unwrap_or_else(|| configured().channel)
}

fn repo_location(source: &SourceArgs) -> anyhow::Result<String> {
    if let Some(r) = &source.repo {
        return Ok(r.clone());
    }
    if let Some(r) = configured().repository {
        return Ok(r);
    }
    let text = std::fs::read_to_string(DEFAULT_REPO_FILE)
        .with_context(|| format!("no --repo given and {DEFAULT_REPO_FILE} unreadable"))?;
    let url = text.trim();
    if url.is_empty() {
        bail!("{DEFAULT_REPO_FILE} is empty; pass --repo");
    }
    Ok(url.to_owned())
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// A progress line on a terminal, nothing otherwise.
fn progress_printer() -> impl FnMut(Progress) {
    let tty = std::io::stderr().is_terminal();
    let start = Instant::now();
    let mut last = Instant::now();
    move |p: Progress| {
        if !tty || (last.elapsed().as_millis() < 200 && p.done < p.total) {
            return;
        }
        last = Instant::now();
        let mib = |b: u64| b as f64 / f64::from(1 << 20);
        let rate = mib(p.done) / start.elapsed().as_secs_f64().max(1e-3);
        eprint!(
            "\r{} {:.0}/{:.0} MiB ({rate:.0} MiB/s)   ",
            p.artifact,
            mib(p.done),
            mib(p.total)
        );
        if p.done >= p.total {
            eprintln!();
        }
        let _ = std::io::stderr().flush();
    }
}

fn with_source<T>(
    node: &NodeArgs,
    source: &SourceArgs,
    f: impl FnOnce(&Node<'_>, &Source<'_>, &ApplyOptions) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let layout = layout(node)?;
    let trust = trust(source)?;
    let location = repo_location(source)?;
    let fetch = ballast_updater::http::for_location_with(&location, &configured().outbound)?;
    let node = Node {
        storage: &RealStorage,
        layout: &layout,
        arch: source.arch.unwrap_or_else(Arch::native),
        variant: variant(source)?,
        channel: channel(source),
        now: SystemTime::now(),
        config_words: crate::update::running_config_words(),
    };
    let src = Source {
        fetch: fetch.as_ref(),
        trust: &trust,
    };
    let opts = ApplyOptions {
        version: source.version,
        allow_downgrade: source.allow_downgrade,
    };
    f(&node, &src, &opts)
}

pub fn run(cmd: UpdateCommand) -> anyhow::Result<()> {
    match cmd {
        UpdateCommand::Check { node, source } => {
            let report = with_source(&node, &source, |n, s, o| Ok(install::check(n, s, o)?))?;
            if node.json {
                return print_json(&report);
            }
            println!("{}: {}", report.decision, report.reason);
            println!(
                "manifest sequence {} expires {} signed by {}",
                report.sequence,
                report.expires,
                report.signed_by.join(",")
            );
        }
        UpdateCommand::Apply {
            node,
            source,
            reboot,
        } => {
            let mut progress = progress_printer();
            let report = with_source(&node, &source, |n, s, o| {
                Ok(install::apply(n, s, o, &mut progress)?)
            })?;
            if node.json {
                print_json(&report)?;
            } else if let Some(i) = &report.installed {
                println!(
                    "installed {} into slot {} ({} bytes, {} resumes); entry {} boots next",
                    i.version, i.slot, i.bytes, i.resumes, i.entry
                );
            } else {
                println!("{}: {}", report.check.decision, report.check.reason);
            }
            if reboot && report.installed.is_some() {
                // PID 1 reboots cleanly on SIGTERM (stops services, syncs).
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(1), nix::sys::signal::SIGTERM)
                    .context("asking PID 1 to reboot")?;
            }
        }
        UpdateCommand::Status { node } => {
            let layout = layout(&node)?;
            let report = control::status(&RealStorage, &layout)?;
            if node.json {
                return print_json(&report);
            }
            println!(
                "running {} from slot {} ({})",
                report.running_version,
                report.running_slot,
                if report.blessed {
                    "blessed"
                } else {
                    "on trial"
                }
            );
            for s in &report.slots {
                println!(
                    "slot {}: {} PARTUUID={} versions {:?}{}",
                    s.slot,
                    s.path,
                    s.partuuid,
                    s.versions
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>(),
                    if s.running { " (running)" } else { "" }
                );
            }
            for e in &report.entries {
                let tries = match (e.tries_left, e.tries_done) {
                    (Some(l), Some(d)) => format!("{l} tries left, {d} done"),
                    _ => "blessed".into(),
                };
                println!(
                    "entry {}: slot {:?}, {tries}{}{}",
                    e.file,
                    e.slot,
                    if e.bootable { "" } else { ", NOT bootable" },
                    if e.boots_next { ", boots next" } else { "" }
                );
            }
            if let Some(ev) = &report.last_event {
                println!(
                    "last {}: {} slot {} at {}{}",
                    ev.kind,
                    ev.version,
                    ev.slot,
                    ev.at,
                    ev.reason
                        .as_deref()
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default()
                );
            }
        }
        UpdateCommand::MarkGood { node } => {
            let layout = layout(&node)?;
            let report = control::mark_good(&RealStorage, &layout, SystemTime::now())?;
            if node.json {
                return print_json(&report);
            }
            if report.was_blessed {
                println!("{} was already blessed ({})", report.version, report.entry);
            } else {
                println!("blessed {} ({})", report.version, report.entry);
            }
            for v in &report.rolled_back_from {
                println!("note: {v} failed its boot tries; it will not be retried");
            }
        }
        UpdateCommand::Rollback { node, reason } => {
            let layout = layout(&node)?;
            let report = control::rollback(&RealStorage, &layout, &reason, SystemTime::now())?;
            if node.json {
                return print_json(&report);
            }
            println!(
                "{} on slot {} boots next (was running {})",
                report.to, report.slot, report.from
            );
        }
    }
    Ok(())
}
