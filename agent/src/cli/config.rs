//! `ballast config check FILE` and `ballast config show [--effective]`.

use std::path::PathBuf;

use anyhow::Context;

use crate::config::{self, Config, Layer};

#[derive(Debug, clap::Subcommand)]
pub enum ConfigCommand {
    /// Validate one configuration file (drop-in or user-data).
    Check { file: PathBuf },
    /// Show the configuration layers of this node, secrets redacted
    /// (with --node: the node's effective configuration).
    Show {
        /// Show the merged result instead of each layer.
        #[arg(long)]
        effective: bool,
        /// With --node: print the API's JSON instead of TOML.
        #[arg(long)]
        json: bool,
    },
}

/// This node's layers as the running agent sees them, user-data from its
/// copy on STATE.
fn node_layers() -> anyhow::Result<Vec<Layer>> {
    let user_data = std::fs::read_to_string(config::SAVED_USER_DATA)
        .ok()
        .map(|text| Layer {
            source: config::SAVED_USER_DATA.into(),
            text,
        });
    Ok(config::node_layers(user_data)?)
}

/// The node's effective configuration, for commands whose defaults come
/// from it (`ballast update`).
pub fn effective() -> anyhow::Result<Config> {
    Ok(config::merge(&node_layers()?)?.0)
}

pub fn run(cmd: ConfigCommand) -> anyhow::Result<()> {
    match cmd {
        ConfigCommand::Check { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            Config::parse(&text, &file)?;
            println!("{}: ok", file.display());
            Ok(())
        }
        ConfigCommand::Show { effective, .. } => {
            let layers = node_layers()?;
            if effective {
                let (_, table) = config::merge(&layers)?;
                print!("{}", toml::to_string(&config::redact(&table))?);
                return Ok(());
            }
            for layer in &layers {
                let table: toml::Table = toml::from_str(&layer.text)
                    .with_context(|| format!("parsing {}", layer.source.display()))?;
                println!(
                    "# {}\n{}",
                    layer.source.display(),
                    toml::to_string(&config::redact(&table))?
                );
            }
            Ok(())
        }
    }
}
