//! `ballast kubernetes render --config FILE --out DIR [--node-name N]`:
//! renders the kubelet, containerd and CNI files of a configuration into a
//! directory, without a node, for review and tests.

use std::path::PathBuf;

use anyhow::Context;

use crate::config::kubernetes_validate as validate;
use crate::config::Config;
use crate::kubernetes::render;

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

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(case: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/kubernetes")
            .join(case)
            .join("config.toml")
    }

    #[test]
    fn renders_a_fixture_into_a_directory_with_a_node_name_override() {
        let out = tempfile::tempdir().unwrap();
        run(KubernetesCommand::Render {
            config: fixture("cluster"),
            out: out.path().join("new"),
            node_name: Some("node-9".into()),
        })
        .unwrap();
        let args =
            std::fs::read_to_string(out.path().join("new/etc/kubernetes/kubelet.args")).unwrap();
        assert!(args.ends_with("--hostname-override=node-9\n"), "{args}");
        assert!(out.path().join("new/etc/containerd/config.toml").is_file());
    }

    #[test]
    fn refuses_bad_input_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let err = run(KubernetesCommand::Render {
            config: fixture("cluster"),
            out: out.clone(),
            node_name: Some("Node_9".into()),
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("--node-name"), "{err:#}");
        let no_table = dir.path().join("plain.toml");
        std::fs::write(&no_table, "hostname = \"n\"\n").unwrap();
        let err = run(KubernetesCommand::Render {
            config: no_table,
            out: out.clone(),
            node_name: None,
        })
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("no [kubernetes] table"),
            "{err:#}"
        );
        assert!(!out.exists());
    }
}
