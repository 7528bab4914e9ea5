//! The Ballast agent as a library: early boot (`boot`), the node's PID 1
//! runtime (`node`, `init`), networking (`net`), the local and remote API
//! (`api`), the update lifecycle (`update`), the Kubernetes node
//! (`kubernetes`), configuration (`config`) and the command-line tool
//! (`cli`). `main.rs` only picks one of the three entry points.
//!
//! Layers only look down (checked by xtask's tidy test): `sys` and
//! `console` at the bottom, then `node` and `boot`, then `config` (which
//! composes their tables), then `net`, then `update` and `kubernetes`, then
//! `api`, then `init` (PID 1's wiring) and `cli`. Nothing but `main.rs`
//! imports `cli`.

#![deny(unsafe_code)]

pub mod api;
pub mod atomic;
pub mod boot;
pub mod cli;
pub mod config;
pub mod console;
pub mod duration;
pub mod init;
pub mod kubernetes;
pub mod net;
pub mod node;
// The one module allowed to hold unsafe code (syscalls, ioctls).
#[allow(unsafe_code)]
pub mod sys;
pub mod update;

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
