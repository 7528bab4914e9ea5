//! `ballast repo ...`: the operator's update-repository tools (keygen, add,
//! sign, verify, floor). The repository format is in
//! docs/update-repository.md; the logic is `ballast_updater::repo`.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use ballast_updater::keys::{SecretKey, TrustedKeys};
use ballast_updater::manifest::Wave;
use ballast_updater::payload::Version;
use ballast_updater::repo;

#[derive(Debug, clap::Subcommand)]
pub enum RepoCommand {
    /// Generate an ed25519 signing key: KEY (mode 0600) and KEY.pub.
    Keygen {
        #[arg(long, value_name = "KEY")]
        out: PathBuf,
    },
    /// Add the release in a payload directory (from `cargo xtask image`).
    Add {
        repo: PathBuf,
        #[arg(long, value_name = "DIR")]
        payload: PathBuf,
        /// Rollout wave AFTER=PERCENT: AFTER from now (e.g. `0s=10`,
        /// `24h=100`); repeat for several waves. None: everyone at once.
        #[arg(long = "wave", value_name = "AFTER=PERCENT")]
        waves: Vec<String>,
        /// Channel offering the release; repeatable. None: `stable`.
        #[arg(long = "channel", value_name = "NAME")]
        channels: Vec<String>,
        /// Store whole artifacts only, no chunks for delta updates.
        #[arg(long)]
        no_chunks: bool,
    },
    /// Put every release of VERSION in exactly the given channels
    /// (promotion, e.g. `--channel beta --channel stable`).
    Channel {
        repo: PathBuf,
        version: Version,
        #[arg(long = "channel", value_name = "NAME", required = true)]
        channels: Vec<String>,
    },
    /// Sign the manifest: raises the sequence number and sets the expiry.
    Sign {
        repo: PathBuf,
        /// Secret key file; repeat to sign with several keys.
        #[arg(long = "key", value_name = "KEY", required = true)]
        keys: Vec<PathBuf>,
        /// Lifetime of the signed manifest (humantime, e.g. `30d`, `12h`).
        #[arg(long, default_value = "30d")]
        expires: humantime::Duration,
        /// Add signatures over the existing bytes instead of re-signing.
        #[arg(long)]
        append: bool,
    },
    /// Verify signatures, expiry and every object as a node would.
    Verify {
        repo: PathBuf,
        /// Public key file or directory of *.pub; repeatable.
        #[arg(long = "trust", value_name = "KEY.pub", required = true)]
        trust: Vec<PathBuf>,
        #[arg(long)]
        threshold: Option<usize>,
        #[arg(long)]
        json: bool,
    },
    /// Set (or with --none clear) the release floor (anti-rollback).
    Floor {
        repo: PathBuf,
        version: Option<Version>,
        #[arg(long, conflicts_with = "version")]
        none: bool,
    },
}

fn parse_wave(spec: &str, now: SystemTime) -> anyhow::Result<Wave> {
    let (after, percent) = spec
        .split_once('=')
        .with_context(|| format!("wave {spec:?}: expected AFTER=PERCENT"))?;
    let after: Duration = humantime::parse_duration(after)
        .with_context(|| format!("wave {spec:?}: bad duration {after:?}"))?;
    let percent: u8 = percent
        .parse()
        .ok()
        .filter(|p| (1..=100).contains(p))
        .with_context(|| format!("wave {spec:?}: percent must be 1..=100"))?;
    Ok(Wave {
        start: humantime::format_rfc3339_seconds(now + after).to_string(),
        percent,
    })
}

pub fn run(cmd: RepoCommand) -> anyhow::Result<()> {
    match cmd {
        RepoCommand::Keygen { out } => {
            let key = SecretKey::generate()?;
            let public = key.write_new(&out)?;
            println!(
                "key {} written to {} (public: {})",
                key.key_id(),
                out.display(),
                public.display()
            );
        }
        RepoCommand::Add {
            repo: dir,
            payload,
            waves,
            channels,
            no_chunks,
        } => {
            let now = SystemTime::now();
            let waves = waves
                .iter()
                .map(|w| parse_wave(w, now))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let chunking = if no_chunks {
                repo::Chunking::FullOnly
            } else {
                repo::Chunking::Cut
            };
            let release = repo::add_with(&dir, &payload, waves, channels, chunking)
                .with_context(|| format!("adding {} to {}", payload.display(), dir.display()))?;
            let p = &release.payload;
            println!(
                "added {} {} {} to {} (unsigned: run `ballast repo sign`)",
                p.version,
                p.arch,
                p.variant,
                dir.display()
            );
        }
        RepoCommand::Sign {
            repo: dir,
            keys,
            expires,
            append,
        } => {
            let keys = keys
                .iter()
                .map(|k| SecretKey::load(k))
                .collect::<Result<Vec<_>, _>>()?;
            let m = repo::sign(&dir, &keys, expires.into(), append)
                .with_context(|| format!("signing {}", dir.display()))?;
            let ids: Vec<String> = keys.iter().map(SecretKey::key_id).collect();
            println!(
                "signed {} sequence {} expires {} by {}",
                dir.display(),
                m.sequence,
                m.expires,
                ids.join(",")
            );
        }
        RepoCommand::Verify {
            repo: dir,
            trust,
            threshold,
            json,
        } => {
            let trust = TrustedKeys::load(&trust, threshold)?;
            let report = repo::verify(&dir, &trust, SystemTime::now())
                .with_context(|| format!("verifying {}", dir.display()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "{}: sequence {}, expires {}, signed by {}; {} objects checked",
                    dir.display(),
                    report.sequence,
                    report.expires,
                    report.signed_by.join(","),
                    report.objects_checked
                );
                for r in &report.releases {
                    println!("  {r}");
                }
            }
        }
        RepoCommand::Channel {
            repo: dir,
            version,
            channels,
        } => {
            let n = repo::set_channels(&dir, version, channels.clone())?;
            println!(
                "{n} release(s) of {version} now in {} (unsigned: run `ballast repo sign`)",
                channels.join(", ")
            );
        }
        RepoCommand::Floor {
            repo: dir,
            version,
            none,
        } => {
            if version.is_none() && !none {
                bail!("give a VERSION or --none");
            }
            repo::set_floor(&dir, version)?;
            println!("floor set to {version:?} (unsigned: run `ballast repo sign`)");
        }
    }
    Ok(())
}
