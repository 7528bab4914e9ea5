//! `cargo xtask bench delta`: bytes downloaded and time of `ballast update
//! apply` (release build) from a base release to each given release, as a
//! delta update (repository cut into chunks) against the full download of
//! the same release from a `--no-chunks` repository, in the same run.
//!
//! Releases are payload directories from `cargo xtask image`, e.g. the base
//! `--version 1.0.0`, one rebuilt with only the agent changed, one with a
//! new kernel. Bytes are counted by the loopback HTTP server itself (every
//! response body byte: manifest, catalog, indexes, chunks, objects), so the
//! figure is what a CDN would serve. The node runs on plain files: slot A
//! holds the base usr.img, slot B is an empty sparse file the size of a
//! partition, the ESP holds the base kernel and initrd. Prints a table; it
//! does not write BENCHMARKS.md.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};

use super::loopback::{run_cmd, serve_at};
use ballast_updater::payload::PayloadMetadata;

#[derive(Debug, clap::Args)]
pub struct DeltaBenchArgs {
    /// Payload directory of the release the node runs.
    #[arg(long, value_name = "DIR")]
    pub base: PathBuf,
    /// NAME=DIR: a release to update to (e.g. `agent=build/x/1.1.0/payload`);
    /// repeatable.
    #[arg(long = "release", value_name = "NAME=DIR", required = true)]
    pub releases: Vec<String>,
    /// Runs of each kind, interleaved; medians are reported.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// The `ballast` binary to run (default: the static musl build the
    /// image uses, else `cargo build --release -p ballast`).
    #[arg(long)]
    pub ballast: Option<PathBuf>,
    /// Work directory (default: target/bench-delta).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Limit each connection of the server to this many Mbit/s (a link
    /// slower than loopback); default: no limit.
    #[arg(long, value_name = "MBIT")]
    pub link_mbit: Option<u64>,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn ballast_binary(args: &DeltaBenchArgs, root: &Path) -> Result<PathBuf> {
    if let Some(b) = &args.ballast {
        return Ok(b.clone());
    }
    let musl = root.join("target/x86_64-unknown-linux-musl/release/ballast");
    if musl.exists() {
        return Ok(musl);
    }
    eprintln!("building ballast (release)...");
    run_cmd(
        Command::new("cargo")
            .args(["build", "--release", "-p", "ballast"])
            .current_dir(root),
    )?;
    Ok(root.join("target/release/ballast"))
}

/// A repository holding `base` and `to`, cut into chunks or not, signed.
fn make_repo(
    ballast: &Path,
    work: &Path,
    name: &str,
    payloads: &[&Path],
    chunks: bool,
) -> Result<PathBuf> {
    let repo = work.join(name);
    for p in payloads {
        let mut cmd = Command::new(ballast);
        cmd.args(["repo", "add"]).arg(&repo).arg("--payload").arg(p);
        if !chunks {
            cmd.arg("--no-chunks");
        }
        run_cmd(cmd.stdout(std::process::Stdio::null()))?;
    }
    run_cmd(
        Command::new(ballast)
            .args(["repo", "sign"])
            .arg(&repo)
            .arg("--key")
            .arg(work.join("key"))
            .stdout(std::process::Stdio::null()),
    )?;
    Ok(repo)
}

/// One install from a fresh copy of the base node; returns (seconds,
/// bytes served, requests).
fn install(
    ballast: &Path,
    work: &Path,
    base: &Path,
    repo: &Path,
    slot_bytes: u64,
    rate: Option<u64>,
) -> Result<(f64, u64, u64)> {
    let meta = PayloadMetadata::load(base)?;
    let node = work.join("node");
    if node.exists() {
        std::fs::remove_dir_all(&node)?;
    }
    let esp = node.join("esp");
    let v = meta.version.to_string();
    let uuid_a = "aaaaaaaa-0000-4000-8000-00000000000a";
    let uuid_b = "bbbbbbbb-0000-4000-8000-00000000000b";
    let params = ballast_updater::cmdline::BootParams::for_payload(
        &meta,
        ballast_updater::cmdline::Slot::A,
        uuid_a.parse()?,
    );
    let entry = ballast_updater::bootentry::BootEntry {
        params: params.clone(),
        extra_args: ballast_updater::bootentry::BootEntry::default_extra_args(meta.arch),
    };
    std::fs::create_dir_all(esp.join("loader/entries"))?;
    std::fs::create_dir_all(esp.join("ballast").join(&v))?;
    std::fs::create_dir_all(node.join("state"))?;
    std::fs::write(
        esp.join(format!("loader/entries/ballast-{v}.conf")),
        entry.render(),
    )?;
    for f in ["vmlinuz", "initrd"] {
        std::fs::copy(base.join(f), esp.join("ballast").join(&v).join(f))?;
    }
    let slot_a = node.join("slot-a");
    std::fs::copy(base.join("usr.img"), &slot_a)?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&slot_a)?
        .set_len(slot_bytes)?;
    let slot_b = node.join("slot-b");
    std::fs::File::create(&slot_b)?.set_len(slot_bytes)?;
    std::fs::write(node.join("cmdline"), format!("console=ttyS0 {params}\n"))?;
    run_cmd(&mut Command::new("sync"))?;
    // Drop the page cache so both paths read the node's slot from disk.
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3\n");

    let (url, served) = serve_at(repo.to_owned(), rate)?;
    let t = Instant::now();
    let log = work.join("apply.log");
    run_cmd(
        Command::new(ballast)
            .env("BALLAST_LOG", "info")
            .stderr(std::fs::File::create(&log)?)
            .args(["update", "apply", "--json", "--esp"])
            .arg(&esp)
            .arg("--slot-a")
            .arg(format!("{}={uuid_a}", slot_a.display()))
            .arg("--slot-b")
            .arg(format!("{}={uuid_b}", slot_b.display()))
            .arg("--cmdline")
            .arg(node.join("cmdline"))
            .arg("--state")
            .arg(node.join("state"))
            .args(["--repo", &url, "--variant", &meta.variant, "--trust"])
            .arg(work.join("key.pub"))
            .stdout(std::process::Stdio::null()),
    )?;
    let secs = t.elapsed().as_secs_f64();
    // What the delta path did per artifact, from the install's own log.
    for line in std::fs::read_to_string(&log)?.lines() {
        if line.contains("assembled from chunks")
            || line.contains("assembling from chunks")
            || line.contains("copied, not downloaded")
            || line.contains("delta path failed")
        {
            eprintln!("  {line}");
        }
    }
    // The server thread may still be counting the last response.
    std::thread::sleep(Duration::from_millis(50));
    Ok((
        secs,
        served.bytes.load(Ordering::Relaxed),
        served.requests.load(Ordering::Relaxed),
    ))
}

pub fn run(args: DeltaBenchArgs) -> Result<()> {
    let root = crate::workspace_root();
    let work = args
        .dir
        .clone()
        .unwrap_or_else(|| root.join("target").join("bench-delta"));
    if work.exists() {
        std::fs::remove_dir_all(&work)?;
    }
    std::fs::create_dir_all(&work)?;
    let ballast = ballast_binary(&args, &root)?;
    run_cmd(
        Command::new(&ballast)
            .args(["repo", "keygen", "--out"])
            .arg(work.join("key"))
            .stdout(std::process::Stdio::null()),
    )?;
    let base_meta = PayloadMetadata::load(&args.base)?;
    let rate = args.link_mbit.map(|m| m * 1_000_000 / 8);
    let mut rows = Vec::new();
    for spec in &args.releases {
        let (name, dir) = spec
            .split_once('=')
            .with_context(|| format!("--release {spec:?}: expected NAME=DIR"))?;
        let dir = PathBuf::from(dir);
        let meta = PayloadMetadata::load(&dir)?;
        let full_bytes: u64 = meta.artifacts.iter().map(|a| a.size).sum();
        let slot_bytes = (meta.artifact("usr.img").map_or(0, |a| a.size) + (64 << 20))
            .max(base_meta.artifact("usr.img").map_or(0, |a| a.size) + (64 << 20));
        let full_repo = make_repo(
            &ballast,
            &work,
            &format!("{name}-full"),
            &[&args.base, &dir],
            false,
        )?;
        let delta_repo = make_repo(
            &ballast,
            &work,
            &format!("{name}-delta"),
            &[&args.base, &dir],
            true,
        )?;
        let (mut full_t, mut delta_t) = (Vec::new(), Vec::new());
        let (mut full_b, mut delta_b, mut delta_req) = (0, 0, 0);
        for i in 0..args.runs {
            eprintln!("{name}: run {}/{}", i + 1, args.runs);
            let (t, b, _) = install(&ballast, &work, &args.base, &full_repo, slot_bytes, rate)?;
            full_t.push(t);
            full_b = b;
            let (t, b, r) = install(&ballast, &work, &args.base, &delta_repo, slot_bytes, rate)?;
            delta_t.push(t);
            delta_b = b;
            delta_req = r;
        }
        rows.push((
            name.to_owned(),
            meta.version.to_string(),
            full_bytes,
            full_b,
            median(&mut full_t),
            delta_b,
            delta_req,
            median(&mut delta_t),
        ));
    }
    println!(
        "Delta updates from {} ({}), {} run(s) each, median times; bytes are what the loopback server sent{}.\n",
        base_meta.version,
        base_meta.variant,
        args.runs,
        args.link_mbit
            .map(|m| format!(", at most {m} Mbit/s per connection"))
            .unwrap_or_default()
    );
    println!("| release | payload | full: bytes served | full: s | delta: bytes served | requests | delta: s | bytes vs full | time vs full |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for (name, version, payload, fb, ft, db, dr, dt) in rows {
        let mib = |b: u64| b as f64 / f64::from(1 << 20);
        println!(
            "| {name} ({version}) | {:.1} MiB | {fb} B ({:.1} MiB) | {ft:.2} | {db} B ({:.2} MiB) | {dr} | {dt:.2} | {:.2} % | {:.2}x |",
            mib(payload),
            mib(fb),
            mib(db),
            100.0 * db as f64 / fb.max(1) as f64,
            dt / ft.max(1e-9),
        );
    }
    Ok(())
}
