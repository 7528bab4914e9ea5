//! Supervision wiring of containerd and the kubelet: at boot, when the node
//! has a `[kubernetes]` table, renders the files (see [`super::render`]) and
//! returns the two services for the supervisor: `containerd`, and `kubelet`
//! after it. The kubelet is not packaged by Debian; when its binary is
//! missing it is not started and the node says plainly "kubelet not
//! installed" (a log line and [`kubelet_installed`], shaped like a health
//! check result).

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::node::health::CheckResult;
use crate::node::supervisor::{RestartPolicy, ServiceSpec};

use super::render::{self, RenderError, Rendered, CONTAINERD_CONFIG};
use crate::config::kubernetes::KubernetesConfig;
pub use crate::config::kubernetes::{CONTAINERD_SERVICE, KUBELET_SERVICE};

pub const CONTAINERD_PATH: &str = "/usr/bin/containerd";

/// What the boot-time wiring did.
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    /// Services to hand to the supervisor beside the user's.
    pub services: BTreeMap<String, ServiceSpec>,
    /// Files written, on the node.
    pub written: Vec<PathBuf>,
    /// [`kubelet_installed`] at boot.
    pub kubelet: Result<String, String>,
}

/// `Ok` with where the kubelet is, or `Err("kubelet not installed ...")`.
pub fn kubelet_installed(path: &Path) -> Result<String, String> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() && meta.permissions().mode() & 0o111 != 0 => {
            Ok(format!("kubelet installed at {}", path.display()))
        }
        Ok(_) => Err(format!(
            "kubelet not installed: {} is not an executable file",
            path.display()
        )),
        Err(_) => Err(format!("kubelet not installed: no {}", path.display())),
    }
}

/// The `kubelet` entry of the health report (and so of `/status`), found
/// at boot: installed, or not. A node without one passes when standalone
/// (containerd only is a supported setup) and fails as a cluster node,
/// which can never join (so an update that loses the kubelet rolls back).
pub fn kubelet_check(config: &KubernetesConfig) -> CheckResult {
    kubelet_check_at(config, Path::new("/"))
}

fn kubelet_check_at(config: &KubernetesConfig, root: &Path) -> CheckResult {
    let path = config.kubelet_path();
    let (ok, message) = match kubelet_installed(&root.join(path.strip_prefix("/").unwrap_or(&path)))
    {
        Ok(_) => (true, format!("installed at {}", path.display())),
        Err(_) if config.standalone => (
            true,
            format!(
                "kubelet not installed: no {} (standalone: containerd only)",
                path.display()
            ),
        ),
        Err(_) => (
            false,
            format!(
                "kubelet not installed: no {}; this node cannot join the cluster",
                path.display()
            ),
        ),
    };
    CheckResult {
        name: "kubelet".into(),
        ok,
        message,
        duration_ms: 0,
    }
}

/// Descriptors for containerd and the kubelet: every container's files
/// and sockets count against containerd's shims and the kubelet's
/// watches (the kernel's nr_open default, as their systemd units ask).
const RUNTIME_NOFILE: u64 = 1 << 20;
/// Near the agent's -1000: the OOM killer takes pods before the runtime
/// that would restart them (the kubelet's own choice for itself).
const RUNTIME_OOM_SCORE_ADJ: i32 = -999;

/// The supervisor services for rendered files; the kubelet only when
/// installed. `env` (the `[proxy]` settings) is the environment of both.
pub fn service_specs(
    rendered: &Rendered,
    kubelet_installed: bool,
    env: &BTreeMap<String, String>,
) -> BTreeMap<String, ServiceSpec> {
    let mut services = BTreeMap::new();
    services.insert(
        CONTAINERD_SERVICE.to_owned(),
        ServiceSpec {
            command: vec![
                CONTAINERD_PATH.to_owned(),
                "--config".to_owned(),
                CONTAINERD_CONFIG.to_owned(),
            ],
            restart: RestartPolicy::Always,
            nofile: Some(RUNTIME_NOFILE),
            oom_score_adj: Some(RUNTIME_OOM_SCORE_ADJ),
            env: env.clone(),
            ..ServiceSpec::default()
        },
    );
    if kubelet_installed {
        services.insert(
            KUBELET_SERVICE.to_owned(),
            ServiceSpec {
                command: rendered.kubelet_argv.clone(),
                after: vec![CONTAINERD_SERVICE.to_owned()],
                restart: RestartPolicy::Always,
                nofile: Some(RUNTIME_NOFILE),
                oom_score_adj: Some(RUNTIME_OOM_SCORE_ADJ),
                env: env.clone(),
                ..ServiceSpec::default()
            },
        );
    }
    services
}

/// Renders the files under `root` for the Node `node_name` (the node's
/// one identity, [`super::identity::node_name`]) and returns the services,
/// with `env` (the `[proxy]` settings) as their environment.
pub fn prepare(
    config: &KubernetesConfig,
    node_name: &str,
    env: &BTreeMap<String, String>,
    root: &Path,
) -> Result<Prepared, RenderError> {
    let rendered = render::render(config, node_name)?;
    let written = render::write(&rendered.files, root)?;
    let kubelet = kubelet_installed(
        &root.join(
            config
                .kubelet_path()
                .strip_prefix("/")
                .unwrap_or(&config.kubelet_path()),
        ),
    );
    Ok(Prepared {
        services: service_specs(&rendered, kubelet.is_ok(), env),
        written,
        kubelet,
    })
}

/// PID 1's call at boot: [`prepare`] on `/`, with the outcome logged. An
/// error starts neither service (and says why); it never stops the boot.
pub fn boot(
    config: &KubernetesConfig,
    node_name: &str,
    env: &BTreeMap<String, String>,
) -> BTreeMap<String, ServiceSpec> {
    match prepare(config, node_name, env, Path::new("/")) {
        Ok(prepared) => {
            // Paths only: the bootstrap kubeconfig holds a token.
            tracing::info!(files = prepared.written.len(), "kubernetes files rendered");
            match &prepared.kubelet {
                Ok(message) => tracing::info!(%message, "kubelet"),
                Err(message) => {
                    tracing::warn!(%message, "kubelet not installed; only containerd runs")
                }
            }
            prepared.services
        }
        Err(e) => {
            tracing::error!(error = %crate::error_chain(&e), "kubernetes not started");
            BTreeMap::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn standalone() -> KubernetesConfig {
        KubernetesConfig {
            standalone: true,
            ..KubernetesConfig::default()
        }
    }

    #[test]
    fn kubelet_runs_after_containerd_only_when_installed() {
        let root = tempfile::tempdir().unwrap();
        let prepared = prepare(&standalone(), "node-1", &BTreeMap::new(), root.path()).unwrap();
        assert_eq!(
            prepared.kubelet,
            Err(format!(
                "kubelet not installed: no {}",
                root.path().join("usr/bin/kubelet").display()
            ))
        );
        assert_eq!(prepared.services.keys().collect::<Vec<_>>(), ["containerd"]);
        assert_eq!(
            prepared.services["containerd"].command,
            [
                "/usr/bin/containerd",
                "--config",
                "/etc/containerd/config.toml"
            ]
        );
        assert!(root.path().join("etc/containerd/config.toml").is_file());
        assert!(root
            .path()
            .join("etc/kubernetes/kubelet-config.json")
            .is_file());

        let bin = root.path().join("usr/bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::write(bin.join("kubelet"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(bin.join("kubelet"), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        let prepared = prepare(&standalone(), "node-1", &BTreeMap::new(), root.path()).unwrap();
        assert!(prepared.kubelet.unwrap_err().contains("not an executable"));

        std::fs::set_permissions(bin.join("kubelet"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        let prepared = prepare(&standalone(), "node-1", &BTreeMap::new(), root.path()).unwrap();
        assert!(prepared.kubelet.is_ok());
        let kubelet = &prepared.services["kubelet"];
        assert_eq!(kubelet.after, ["containerd"]);
        assert_eq!(kubelet.command[0], "/usr/bin/kubelet");
        assert!(kubelet
            .command
            .contains(&"--hostname-override=node-1".to_owned()));
        // The supervisor accepts the pair and starts containerd first.
        let order = crate::node::supervisor::start_order(&prepared.services).unwrap();
        assert_eq!(order, ["containerd", "kubelet"]);
    }

    #[test]
    fn proxy_settings_are_the_environment_of_both_services() {
        let root = tempfile::tempdir().unwrap();
        let bin = root.path().join("usr/bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::write(bin.join("kubelet"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(bin.join("kubelet"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        let proxy = crate::config::proxy::ProxyConfig {
            https: Some("http://proxy.example:3128".into()),
            http: None,
            no_proxy: vec![".svc".into()],
        };
        let prepared = prepare(&standalone(), "node-1", &proxy.environment(), root.path()).unwrap();
        for name in ["containerd", "kubelet"] {
            let env = &prepared.services[name].env;
            assert_eq!(env["HTTPS_PROXY"], "http://proxy.example:3128", "{name}");
            assert_eq!(env["NO_PROXY"], "localhost,127.0.0.1,::1,.svc", "{name}");
        }
    }

    #[test]
    fn the_kubelet_check_reports_not_installed_and_fails_only_a_cluster_node() {
        let root = tempfile::tempdir().unwrap();
        let c = kubelet_check_at(&standalone(), root.path());
        assert_eq!(c.name, "kubelet");
        assert!(c.ok, "{c:?}");
        assert_eq!(
            c.message,
            "kubelet not installed: no /usr/bin/kubelet (standalone: containerd only)"
        );
        let cluster = KubernetesConfig {
            api_server: Some("https://k8s.example:6443".into()),
            ..KubernetesConfig::default()
        };
        let c = kubelet_check_at(&cluster, root.path());
        assert!(!c.ok);
        assert!(
            c.message
                .starts_with("kubelet not installed: no /usr/bin/kubelet;"),
            "{c:?}"
        );

        let bin = root.path().join("usr/bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::write(bin.join("kubelet"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(bin.join("kubelet"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        let c = kubelet_check_at(&cluster, root.path());
        assert!(
            c.ok && c.message == "installed at /usr/bin/kubelet",
            "{c:?}"
        );
        // Not a path on the test host's root.
        assert!(!c.message.contains(&root.path().display().to_string()));
    }

    #[test]
    fn a_bad_table_renders_nothing() {
        let root = tempfile::tempdir().unwrap();
        let err = prepare(
            &KubernetesConfig::default(),
            "n",
            &BTreeMap::new(),
            root.path(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("kubernetes.api_server"), "{err}");
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);
    }

    #[test]
    fn service_names_are_reserved() {
        let mut services = BTreeMap::new();
        services.insert("web".to_owned(), ServiceSpec::default());
        assert!(crate::config::kubernetes_validate::check_service_names(&services).is_ok());
        services.insert("kubelet".to_owned(), ServiceSpec::default());
        let err = crate::config::kubernetes_validate::check_service_names(&services)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("services.kubelet:"), "{err}");
    }
}
