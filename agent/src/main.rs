//! The `ballast` binary. As PID 1 in the initramfs it is `/init` (early
//! boot); as PID 1 in the slot it is the node's init; anywhere else it is
//! the command-line tool.

#![forbid(unsafe_code)]

use std::io::IsTerminal;

/// Present only in the initramfs (written by the image build).
const INITRD_MARKER: &str = "/etc/ballast/initrd-modules";

fn main() {
    init_logging();
    if nix::unistd::getpid().as_raw() == 1 {
        if std::path::Path::new(INITRD_MARKER).exists() {
            ballast::boot::initramfs::run();
        }
        ballast::init::run();
    }
    if let Err(err) = ballast::cli::main() {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

/// Logging to stderr, `BALLAST_LOG` picking the level.
fn init_logging() {
    let level = match std::env::var("BALLAST_LOG").as_deref() {
        Ok("debug") => tracing::Level::DEBUG,
        Ok("trace") => tracing::Level::TRACE,
        Ok("warn") => tracing::Level::WARN,
        _ => tracing::Level::INFO,
    };
    tracing_subscriber::fmt()
        .with_max_level(level)
        // stderr, and a copy the API serves as `/v1/logs/agent`.
        .with_writer(ballast::api::logs::AgentLogWriter)
        .with_ansi(std::io::stderr().is_terminal() && nix::unistd::getpid().as_raw() != 1)
        .with_target(false)
        .init();
}
