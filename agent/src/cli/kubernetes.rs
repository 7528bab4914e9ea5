//! `ballast kubernetes render --config FILE --out DIR [--node-name N]`:
//! renders the kubelet, containerd and CNI files of a configuration into a
//! directory, without a node, for review and tests.

use std::path::PathBuf;

use anyhow::Context;

use crate::config::Config;
use crate::kubernetes::{render, validate};

#[derive(Debug, clap::Subcommand)]
pub enum KubernetesCommand {
    /// Render the files a node would write for this configuration into DIR
    /// (paths under DIR mirror the node's: DIR/etc/kubernetes/...).
    Render {
        /// A whole node configuration (user-data) with a [kubernetes] table.
        #[arg(long)]
        config: PathBuf,
        /// Where to write; created if missing.
        #[arg(long)]
        out: PathBuf,
        /// The Node's name; default: kubernetes.node_name, else hostname.
        #[arg(long)]
        node_name: Option<String>,
    },
}

pub fn run(cmd: KubernetesCommand) -> anyhow::Result<()> {
    match cmd {
        KubernetesCommand::Render {
            config,
            out,
            node_name,
        } => {
            let text = std::fs::read_to_string(&config)
                .with_context(|| format!("reading {}", config.display()))?;
            let parsed = Config::parse(&text, &config)?;
            let k8s = parsed
                .kubernetes
                .with_context(|| format!("{}: no [kubernetes] table", config.display()))?;
            let name = match node_name {
                Some(name) => {
                    validate::node_name(&name).map_err(|d| anyhow::anyhow!("--node-name: {d}"))?;
                    name
                }
                None => render::node_name(&k8s, parsed.hostname.as_deref())?,
            };
            let rendered =
                render::render(&k8s, &name).with_context(|| format!("{}", config.display()))?;
            let written = render::write(&rendered.files, &out)?;
            // Paths and modes only: the bootstrap kubeconfig holds a token.
            for (file, path) in rendered.files.iter().zip(&written) {
                println!("{:04o} {}", file.mode, path.display());
            }
            println!("node {name}: kubelet {}", rendered.kubelet_argv.join(" "));
            Ok(())
        }
    }
}
