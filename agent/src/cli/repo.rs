//! `ballast repo ...`: the operator's update-repository tools. Owned by the
//! updater work.

#[derive(Debug, clap::Subcommand)]
pub enum RepoCommand {}

pub fn run(cmd: RepoCommand) -> anyhow::Result<()> {
    match cmd {}
}
