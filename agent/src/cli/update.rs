//! `ballast update ...`: the node side of updates. Owned by the updater work.

#[derive(Debug, clap::Subcommand)]
pub enum UpdateCommand {}

pub fn run(cmd: UpdateCommand) -> anyhow::Result<()> {
    match cmd {}
}
