//! Command-line front ends of the `ballast` binary. Each submodule parses
//! its own subcommands and calls into the libraries.

pub mod config;
pub mod kubernetes;
pub mod logs;
pub mod repo;
pub mod update;
