//! The `update-kubernetes` scenario (issue 14): the reboot strategy
//! `kubernetes` against the agent's in-tree test API server
//! (`ballast::kubernetes::testserver`, through the agent's
//! `test-apiserver` feature), served over HTTPS on 127.0.0.1 with a CA and
//! a certificate for the guest's address made for the run, and reached
//! through guestfwd at [`API_GUEST_ADDR`]. The node boots 1.0.0 from the
//! base image, finds 1.1.0 in the update scenarios' repository
//! ([`crate::update`]), and must: take a reboot Lease in `ballast-system`,
//! cordon its Node, evict the one pod the test seeded on it, reboot into
//! 1.1.0, then uncordon and give the Lease back. Every step is checked in
//! the server's recorded requests and objects, the reboot in the console
//! events.
//!
//! The node runs the k8s-profile image with containerd and, at
//! /usr/bin/kubelet, a placeholder that only sleeps (built by `cargo xtask
//! vm-test` into `build/<arch>/k8s-node/<version>`, 1.0.0 and 1.1.0): a
//! cluster node without a kubelet fails its health gate, so the 1.1.0
//! trial would never commit. The scenario tests the agent's calls to the
//! API server, not a kubelet.
//!
//! The agent's credential is the kubeconfig the agent itself renders for
//! the kubelet's bootstrap (`/etc/kubernetes/bootstrap-kubelet.conf`, from
//! `api_server`, `ca_pem` and `bootstrap_token`): user-data cannot write
//! files, and this is a real kubeconfig with a real CA path and token, the
//! same loader a cluster's service-account kubeconfig goes through.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ballast::kubernetes::testserver::{PodSpec, TestServer};

use crate::image::BuiltImage;
use crate::scenarios::{Context, ScenarioError};
use crate::update::scenarios::{
    ready, seen_or_wait, step, user_data, Setup, INSTALL_TIMEOUT, UNHAPPY,
};
use crate::update::UpdateError;
use crate::vm::GuestFwd;

/// The directory of the images of this scenario (`build/<arch>/k8s-node/
/// <version>`), beside the base image `build/<arch>/1.0.0`.
pub fn image_dir_beside(base: &Path, version: &str) -> PathBuf {
    base.parent()
        .unwrap_or(Path::new("."))
        .join(IMAGE_DIR)
        .join(version)
}

/// The images' directory under `build/<arch>/`.
pub const IMAGE_DIR: &str = "k8s-node";

/// Where the guest reaches the test API server.
pub const API_GUEST_IP: &str = "10.0.2.102";
pub const API_GUEST_ADDR: &str = "10.0.2.102:443";
/// The Node the agent speaks for (`[kubernetes] node_name`).
pub const NODE: &str = "ballast-k8s-1";
/// A bootstrap token (`[a-z0-9]{6}.[a-z0-9]{16}`); the server's bearer token.
const TOKEN: &str = "bllst1.0123456789abcdef";
/// The pod seeded on the node, owned by a ReplicaSet: drain evicts it.
const POD_NAMESPACE: &str = "apps";
const POD: &str = "web-1";
/// The reboot semaphore's namespace and its only Lease (group `default`,
/// slot 0).
const LEASE_NAMESPACE: &str = "ballast-system";
const LEASE: &str = "ballast-reboot-default-0";

fn setup_err(m: impl Into<String>) -> UpdateError {
    UpdateError::Operator(m.into())
}

/// `[kubernetes]` for the node: the test server, its CA, the bootstrap
/// token whose rendered kubeconfig is also the agent's credential.
fn kubernetes_user_data(ca_pem: &str) -> String {
    format!(
        "[kubernetes]\napi_server = \"https://{API_GUEST_ADDR}\"\nca_pem = '''\n{ca}'''\n\
         bootstrap_token = \"{TOKEN}\"\nnode_name = \"{NODE}\"\n\
         [kubernetes.agent]\nkubeconfig = \"{kubeconfig}\"\n\
         [kubernetes.reboot]\ndrain_timeout = \"120s\"\n",
        ca = ca_pem,
        kubeconfig = ballast::kubernetes::render::BOOTSTRAP_KUBECONFIG
    )
}

/// Index of the first request matching `pred` at or after `from`.
fn find(
    requests: &[(String, String)],
    from: usize,
    pred: impl Fn(&str, &str) -> bool,
) -> Option<usize> {
    requests
        .iter()
        .enumerate()
        .skip(from)
        .find(|(_, (m, p))| pred(m, p))
        .map(|(i, _)| i)
}

/// Scenario `update-kubernetes`.
pub fn update_kubernetes(ctx: &Context) -> Result<(), ScenarioError> {
    run(ctx).map_err(ScenarioError::from)
}

fn run(ctx: &Context) -> Result<(), UpdateError> {
    let dir = image_dir_beside(&ctx.image.dir, &ctx.image.meta.version.to_string());
    let image = BuiltImage::load(&dir).map_err(|e| {
        setup_err(format!(
            "the k8s-node image {}: {e} (cargo xtask vm-test builds it)",
            dir.display()
        ))
    })?;
    let ctx = &Context {
        image,
        ..ctx.clone()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| setup_err(format!("tokio runtime: {e}")))?;
    let (api, ca_pem) = rt.block_on(TestServer::start_tls_for(API_GUEST_IP, TOKEN));
    api.add_node(NODE);
    api.add_pod(POD_NAMESPACE, POD, NODE, PodSpec::default());
    eprintln!(
        "  [{}] test API server on {} (guest: https://{API_GUEST_ADDR})",
        ctx.arch,
        api.url()
    );
    let setup = Setup::new(ctx, &["1.1.0"])?;
    let ud = user_data("kubernetes", "120s", &kubernetes_user_data(&ca_pem))?;
    let mut vm = setup
        .vm(ctx, "update-kubernetes", &ud)
        .guestfwd(GuestFwd {
            guest_addr: API_GUEST_ADDR.into(),
            host_port: api.addr().port(),
        })
        .spawn()?;
    ready(&mut vm, ctx, "1.0.0", "a")?;
    step(
        &mut vm,
        "update-found",
        Some("1.1.0"),
        UNHAPPY,
        INSTALL_TIMEOUT,
    )?;
    step(
        &mut vm,
        "installed",
        Some("1.1.0"),
        UNHAPPY,
        INSTALL_TIMEOUT,
    )?;
    step(
        &mut vm,
        "rebooting",
        Some("1.1.0"),
        UNHAPPY,
        Duration::from_secs(300),
    )?;
    // Before the reboot: the Lease is ours, the Node cordoned, the pod gone.
    let lease = api.lease(LEASE_NAMESPACE, LEASE);
    let holder = lease
        .as_ref()
        .and_then(|l| l.spec.as_ref())
        .and_then(|s| s.holder_identity.clone());
    if holder.as_deref() != Some(NODE) {
        return Err(vm
            .fail(format!(
                "at the reboot, Lease {LEASE_NAMESPACE}/{LEASE} is held by {holder:?}, expected {NODE}"
            ))
            .into());
    }
    let cordoned = api
        .node(NODE)
        .spec
        .and_then(|s| s.unschedulable)
        .unwrap_or(false);
    if !cordoned {
        return Err(vm.fail("at the reboot, the Node is not cordoned").into());
    }
    if api.pod_exists(POD_NAMESPACE, POD) {
        return Err(vm
            .fail(format!(
                "at the reboot, pod {POD_NAMESPACE}/{POD} is still on the node"
            ))
            .into());
    }
    vm.progress("before the reboot: Lease held, Node cordoned, pod evicted");
    let mark = vm.events_seen().len();
    ready(&mut vm, ctx, "1.1.0", "b")?;
    seen_or_wait(
        &mut vm,
        mark,
        "committed",
        UNHAPPY,
        Duration::from_secs(180),
    )?;
    // Back in service: uncordon and release follow the first passing
    // health report after the commit.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let uncordoned = !api
            .node(NODE)
            .spec
            .and_then(|s| s.unschedulable)
            .unwrap_or(false);
        let released = api
            .lease(LEASE_NAMESPACE, LEASE)
            .and_then(|l| l.spec)
            .and_then(|s| s.holder_identity)
            .is_none();
        if uncordoned && released {
            break;
        }
        if Instant::now() > deadline {
            return Err(vm
                .fail(format!(
                    "after the commit: uncordoned {uncordoned}, Lease released {released}"
                ))
                .into());
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    // The order, from the server's log: Lease taken, Node cordoned (a
    // PATCH), the pod evicted, then after the reboot the Node patched
    // again (uncordon) and the Lease written (release).
    let requests = api.requests();
    let lease_path = format!("/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases");
    let node_path = format!("/api/v1/nodes/{NODE}");
    let eviction = format!("/api/v1/namespaces/{POD_NAMESPACE}/pods/{POD}/eviction");
    let take = find(&requests, 0, |m, p| {
        (m == "POST" || m == "PUT") && p.starts_with(&lease_path)
    });
    let cordon = take.and_then(|i| find(&requests, i, |m, p| m == "PATCH" && p == node_path));
    let evict = cordon.and_then(|i| find(&requests, i, |m, p| m == "POST" && p == eviction));
    let uncordon = evict.and_then(|i| find(&requests, i, |m, p| m == "PATCH" && p == node_path));
    let release = uncordon.and_then(|i| {
        find(&requests, i, |m, p| {
            m == "PUT" && p == format!("{lease_path}/{LEASE}")
        })
    });
    let Some(release) = release else {
        return Err(vm
            .fail(format!(
                "requests out of order: lease {take:?}, cordon {cordon:?}, eviction {evict:?}, \
                 uncordon {uncordon:?}, release {release:?}; log: {requests:?}"
            ))
            .into());
    };
    vm.progress(&format!(
        "API server saw {} requests: Lease taken #{}, cordon #{}, eviction #{}, uncordon #{}, release #{release}",
        requests.len(),
        take.unwrap_or_default(),
        cordon.unwrap_or_default(),
        evict.unwrap_or_default(),
        uncordon.unwrap_or_default()
    ));
    drop(api);
    drop(rt);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kubernetes_table_is_valid_config_with_the_strategy_and_credential() {
        let ca = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let text = format!(
            "[update]\nrepository = \"http://10.0.2.100/\"\nstrategy = \"kubernetes\"\n{}",
            kubernetes_user_data(ca)
        );
        let config = ballast::config::Config::parse(&text, Path::new("user-data"))
            .unwrap_or_else(|e| panic!("{e}: {text}"));
        let k = config.kubernetes.expect("[kubernetes]");
        assert_eq!(k.api_server.as_deref(), Some("https://10.0.2.102:443"));
        assert_eq!(k.ca_pem.as_deref(), Some(ca));
        assert_eq!(k.node_name.as_deref(), Some(NODE));
        assert!(!k.standalone);
        let agent = k.agent.expect("[kubernetes.agent]");
        assert_eq!(
            agent.kubeconfig.as_deref(),
            Some(Path::new(ballast::kubernetes::render::BOOTSTRAP_KUBECONFIG))
        );
        assert_eq!(k.reboot.lease_namespace, LEASE_NAMESPACE);
        assert_eq!(k.reboot.group, "default");
    }

    #[test]
    fn the_images_live_beside_the_base_image() {
        assert_eq!(
            image_dir_beside(Path::new("build/x86_64/1.0.0"), "1.1.0"),
            Path::new("build/x86_64/k8s-node/1.1.0")
        );
    }
}
