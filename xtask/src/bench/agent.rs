//! `cargo xtask bench agent`: the agent's footprint. Boots the image, waits
//! for `ready`, lets the node settle, then samples the agent's own RSS and
//! CPU time from `/status` twice, a fixed interval apart, inside the VM.
//! Ratios are against the goals (6 MiB RSS) and, for the binary size,
//! against a static musl "hello world" built in the same run.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use ballast_updater::payload::Arch;
use qemu_tests::vm::VmBuilder;

use crate::vm_test::{ensure_image, log_dir};

const SECTION: &str = "## Agent footprint";
const GOAL_RSS_KIB: u64 = 6 * 1024;
/// The network part of the user-data; the `[api]` part (HTTPS, the
/// operator's CA) is made per run, as the idle figure includes TLS.
const NETWORK_USER_DATA: &str =
    "[network.interfaces.eth0]\naddresses = [\"10.0.2.15/24\"]\ngateway = \"10.0.2.2\"\n";

#[derive(Debug, clap::Args)]
pub struct AgentBenchArgs {
    #[arg(long, value_parser = crate::parse_arch, default_value = "x86_64")]
    pub arch: Arch,
    /// Use this built image directory instead of `build/<arch>/1.0.0`.
    #[arg(long)]
    pub image: Option<std::path::PathBuf>,
    /// Seconds between the two samples.
    #[arg(long, default_value_t = 60)]
    pub idle_seconds: u64,
}

fn usage(admin: &qemu_tests::tls::TlsClient, port: u16) -> Result<(u64, u64)> {
    let resp = admin.request(port, "GET", "/status", None, Duration::from_secs(20))?;
    ensure!(resp.status == 200, "/status answered {}", resp.status);
    let v: serde_json::Value = serde_json::from_str(&resp.body).context("parsing /status")?;
    let rss = v["agent"]["rss_kib"]
        .as_u64()
        .context("/status lacks agent.rss_kib")?;
    let cpu = v["agent"]["cpu_ms"]
        .as_u64()
        .context("/status lacks agent.cpu_ms")?;
    Ok((rss, cpu))
}

/// Size of a stripped static musl hello world for `arch`, built now.
fn hello_world_size(arch: Arch, dir: &Path) -> Result<u64> {
    let src = dir.join("hello.rs");
    std::fs::write(&src, "fn main() { println!(\"hello\"); }\n")?;
    let target = format!("{}-unknown-linux-musl", arch.as_str());
    let out = dir.join("hello");
    let mut cmd = Command::new("rustc");
    cmd.args([
        "--edition",
        "2021",
        "-C",
        "opt-level=s",
        "-C",
        "strip=symbols",
        "-C",
        "panic=abort",
        "--target",
        &target,
    ])
    .arg("-o")
    .arg(&out)
    .arg(&src);
    if arch == Arch::Aarch64 {
        cmd.args(["-C", "linker=rust-lld"]);
    }
    ensure!(
        cmd.status()?.success(),
        "building the hello world baseline failed"
    );
    Ok(std::fs::metadata(&out)?.len())
}

pub fn run(args: AgentBenchArgs) -> Result<()> {
    let image = match &args.image {
        Some(dir) => dir.clone(),
        None => ensure_image(args.arch)?,
    };
    let agent_bin = crate::workspace_root()
        .join("target")
        .join(format!("{}-unknown-linux-musl", args.arch.as_str()))
        .join("release")
        .join("ballast");
    let binary = std::fs::metadata(&agent_bin)
        .with_context(|| format!("{}", agent_bin.display()))?
        .len();
    let scratch = tempfile::tempdir()?;
    let hello = hello_world_size(args.arch, scratch.path())?;

    println!("bench agent: booting {} and waiting for ready", args.arch);
    let operator = qemu_tests::operator::Operator::new()?;
    let user_data = format!("{}{NETWORK_USER_DATA}", operator.api_user_data()?);
    let mut vm = VmBuilder::new("bench-agent", args.arch)
        .disk(&image.join("disk.raw"))
        .forward_api()
        .user_data(user_data.as_bytes())
        .log_dir(&log_dir())
        .spawn()?;
    vm.wait_for_event("ready", Duration::from_secs(300))?;
    let port = vm.api_port().context("no API port forwarded")?;
    let pin = qemu_tests::operator::api_pin(&mut vm, 0)?;
    let admin = operator.admin_tls(&pin)?;
    // Let first-boot work (STATE growth, the first checks) finish.
    std::thread::sleep(Duration::from_secs(15));
    let (rss0, cpu0) = usage(&admin, port)?;
    println!("bench agent: idle for {} s", args.idle_seconds);
    std::thread::sleep(Duration::from_secs(args.idle_seconds));
    let (rss1, cpu1) = usage(&admin, port)?;
    vm.kill();

    // Each /status sample itself costs a little CPU: included, so an upper bound.
    let cpu_percent =
        (cpu1.saturating_sub(cpu0)) as f64 / (args.idle_seconds as f64 * 1000.0) * 100.0;
    let rss = rss0.max(rss1);
    let body = format!(
        "Command: `cargo xtask bench agent --arch {arch} --idle-seconds {idle}` — the agent as PID 1 in \
         a QEMU TCG guest (1 GiB), API on TCP, no services, built-in health checks only (run \
         every 15 s, the default `[health] interval`); sampled from its own `/status` \
         (`/proc/self`), the second sample {idle} s after the first; the CPU figure includes \
         serving the second `/status`.\n\n\
         | measure | value | baseline | ratio |\n|---|---|---|---|\n\
         | idle RSS | {rss} KiB | goal 6144 KiB | {rr:.2}× |\n\
         | idle CPU | {cpu_percent:.3} % ({dcpu} ms in {idle} s) | goal ≈ 0 % | — |\n\
         | stripped static binary | {binary} B | static musl hello world {hello} B | {br:.1}× |\n",
        arch = args.arch,
        idle = args.idle_seconds,
        rr = rss as f64 / GOAL_RSS_KIB as f64,
        dcpu = cpu1.saturating_sub(cpu0),
        br = binary as f64 / hello as f64,
    );
    println!("{body}");
    super::write_arch_section(SECTION, None, args.arch, &body)?;
    Ok(())
}
