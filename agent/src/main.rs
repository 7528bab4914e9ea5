//! The `ballast` binary: initramfs `/init`, PID 1 in the slot, and the CLI.

fn main() {}
