//! PID 1 in the slot: finishes the mounts, renders `/etc`, applies the
//! node's configuration, serves the API, reaps zombies, and turns signals
//! and API requests into an orderly shutdown. It never returns.
//!
//! Signals (busybox init's convention): SIGTERM and SIGINT (Ctrl-Alt-Del)
//! reboot, SIGUSR2 powers off, SIGUSR1 halts.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::api;
use crate::boot::bootinfo::{BootInfo, BOOT_INFO_PATH};
use crate::boot::mounts;
use crate::config::update::{Strategy, UpdateConfig};
use crate::config::Config;
use crate::console::{self, Event};
use crate::node::health::{BuiltinSources, HealthChecker, HealthMonitor};
use crate::node::power::Action;
use crate::node::supervisor::{ReapScope, Reaper, Supervisor, SupervisorOptions};
use crate::update::strategy::{self, RebootStrategy};
use crate::update::UpdateContext;

/// Factory defaults copied into the `/etc` tmpfs every boot.
const FACTORY_ETC: &str = "/usr/share/factory/etc";
/// Modules PID 1 loads from the slot, one name per line in load order
/// (written by the image build for the image's profile).
const RUNTIME_MODULES: &str = "/usr/lib/ballast/modules-load";
/// The agent's own files on STATE.
const STATE_DIR: &str = "/var/lib/ballast";
/// Longest wait for a first network address before services start.
const NETWORK_WAIT: Duration = Duration::from_secs(5);
/// How long services get between SIGTERM and SIGKILL at shutdown.
const STOP_GRACE: Duration = Duration::from_secs(5);

pub fn run() -> ! {
    crate::node::power::reboot_on_panic(|reason| Event::Panic { reason }, Duration::from_secs(5));
    // Ctrl-Alt-Del becomes SIGINT to us instead of an immediate reset.
    let _ = nix::sys::reboot::set_cad_enabled(false);

    let action = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(main_loop()),
        Err(e) => {
            console::emit(&Event::BootFailed {
                reason: format!("starting the runtime: {e}"),
            });
            Action::Reboot
        }
    };
    shutdown(action)
}

async fn main_loop() -> Action {
    raise_descriptor_limit();
    if let Err((target, e)) = mounts::mount_system_filesystems() {
        tracing::error!(target, error = %e, "mount failed");
    }
    crate::reopen_console();
    if let Err(e) = crate::node::confine::protect_agent_from_oom() {
        tracing::warn!(error = %crate::error_chain(&e), "the agent may be picked by the OOM killer");
    }
    if let Err(e) =
        crate::node::failpoints::load(Path::new(crate::node::failpoints::FAILPOINTS_FILE))
    {
        tracing::error!(error = %e, "fail points not armed");
    }
    render_etc();
    let info = match BootInfo::read(Path::new(BOOT_INFO_PATH)) {
        Ok(info) => Some(info),
        Err(e) => {
            tracing::error!(error = %e, "no boot information from early boot");
            None
        }
    };
    if let Some(info) = &info {
        mount_esp(info);
        renew_disk_identity(info);
    }
    let dir = crate::boot::modules::running_kernel_dir();
    let wanted = std::fs::read_to_string(RUNTIME_MODULES).unwrap_or_default();
    for m in wanted
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        // One at a time: a driver for absent hardware must not stop the rest.
        if let Err(e) = crate::boot::modules::load(&dir, &[m]) {
            tracing::warn!(module = m, error = %crate::error_chain(&e), "module not loaded");
        }
    }
    // NICs, watchdogs and disks by what the machine has, now and hot-plugged.
    match crate::boot::hotplug::coldplug_and_listen(&dir) {
        Ok(outcome) => {
            tracing::info!(devices = outcome.devices, loaded = ?outcome.loaded, "drivers loaded by hardware")
        }
        Err(e) => tracing::warn!(error = %crate::error_chain(&e), "no drivers loaded by hardware"),
    }

    // User-data (docs/configuration.md, "User-data"). On EC2 it comes
    // from instance metadata, which needs the network: the network comes
    // up with the saved copy (what every later boot starts from), then,
    // after the first lease, the sources are decided once with the
    // metadata service's answer and the configuration is loaded again,
    // before anything but the network and the host name uses it.
    let gathered = crate::config::user_data::gather();
    let ask_imds = crate::net::metadata::imds_wanted(&gathered);
    let local = (!ask_imds).then(|| crate::config::user_data::resolve(gathered.clone(), None));
    let first_layer = match &local {
        Some(p) => p.layer.clone(),
        None => gathered.provisional(),
    };
    let (mut config, mut config_table, mut config_error) = load_config(first_layer, !ask_imds);
    let metadata_name = crate::net::metadata::node_hostname(
        local.as_ref().and_then(|p| p.metadata_hostname.as_deref()),
    );
    // The node's one identity, fixed before the services start: the
    // kubelet's name, the Node, Lease and drain target of the agent and
    // the FleetLock id. Without a configured (or metadata) name every node
    // gets a stable, unique one from its machine id, so Kubernetes node
    // names never collide and never read "(none)".
    let mut identity = node_identity(&config, metadata_name.as_deref());
    let mut node_hostname = set_node_hostname(&config, &identity, None);
    // A DHCP host name may rename a plain node, never a configured,
    // metadata-given or Kubernetes one.
    let pinned_hostname = config
        .hostname
        .clone()
        .or(metadata_name)
        .or_else(|| identity.pinned_hostname().map(str::to_owned));
    let started = crate::net::start(&config.network, pinned_hostname);
    let (network, online, time_sync) = match started.await {
        // Services usually want the network: wait a little for the first
        // address (static ones are there at once, a DHCP lease usually
        // within a second), then go on; DHCP keeps trying behind.
        Ok(mut network) => {
            let time_sync = crate::net::timesync::spawn(&config.time, network.ntp_servers());
            let online = network.wait_online(NETWORK_WAIT).await;
            if !online {
                tracing::warn!(wait = ?NETWORK_WAIT, "no address yet; starting services anyway");
            }
            (Some(network), online, time_sync)
        }
        Err(e) => {
            tracing::error!(error = %crate::error_chain(&e), "network not started");
            let none = tokio::sync::watch::channel(Vec::new()).1;
            (None, false, crate::net::timesync::spawn(&config.time, none))
        }
    };
    if ask_imds {
        let answer = match online {
            true => crate::net::metadata::ask_imds().await,
            false => None,
        };
        let provisioned = crate::config::user_data::resolve(gathered, answer);
        let network_before = config.network.clone();
        (config, config_table, config_error) = load_config(provisioned.layer, true);
        if config.network != network_before {
            tracing::warn!(
                "instance metadata user-data changes [network]: it applies from the next boot"
            );
        }
        let name = crate::net::metadata::node_hostname(provisioned.metadata_hostname.as_deref());
        let chosen = config.hostname.is_some() || name.is_some() || config.kubernetes.is_some();
        identity = node_identity(&config, name.as_deref());
        node_hostname = set_node_hostname(&config, &identity, Some(&node_hostname));
        if let (true, Some(network)) = (chosen, &network) {
            network.keep_hostname(node_hostname.clone()).await;
        }
    }
    tracing::info!(node = %identity.name, source = identity.source.key(), "node name");

    // [kernel] (with a Kubernetes node's defaults): after the network (a
    // user's per-interface sysctl wins over the network's own), before
    // containerd and the kubelet start.
    apply_kernel_settings(&config);
    // [trust]: extra CAs into the node's bundle (the /etc tmpfs was filled
    // from the factory copy above), before anything reads it.
    if let Err(e) = crate::node::trust::append(
        Path::new(crate::node::trust::NODE_BUNDLE),
        &config.trust.bundle(),
    ) {
        tracing::error!(error = %crate::error_chain(&e), "extra CA certificates not trusted");
    }

    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let status = api::Status {
        hostname: nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default(),
        version: info.as_ref().map(|i| i.version.clone()).unwrap_or_default(),
        arch: ballast_updater::payload::Arch::native().to_string(),
        slot: info
            .as_ref()
            .map(|i| i.slot.to_string())
            .unwrap_or_default(),
        boot_id: boot_id.clone(),
        config_error,
        user_data: crate::config::user_data::status().cloned(),
    };

    // Children: one reaper for every process (we are PID 1, orphans land
    // here), handing exit statuses of services to the supervisor.
    let reaper = match Reaper::start(ReapScope::AllChildren) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::error!(error = %crate::error_chain(&e), "no reaper");
            None
        }
    };
    // [kubernetes]: render the containerd and kubelet files (the /etc tmpfs
    // is new every boot), then run both beside the user's services; their
    // names are reserved, so nothing collides.
    let mut services = config.services.clone();
    if let Some(k8s) = &config.kubernetes {
        services.extend(crate::kubernetes::services::boot(
            k8s,
            &identity.name,
            &config.proxy.environment(),
        ));
    }
    let supervisor = match &reaper {
        Some(reaper) => {
            match Supervisor::start(&services, SupervisorOptions::default(), reaper.clone()).await {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::error!(error = %crate::error_chain(&e), "services not started");
                    None
                }
            }
        }
        None => None,
    };
    let checker = reaper.as_ref().and_then(|reaper| {
        HealthChecker::new(
            &config.health,
            BuiltinSources {
                time_sync: Some(time_sync.clone()),
                at_boot: (config.kubernetes.iter())
                    .map(crate::kubernetes::services::kubelet_check)
                    .collect(),
                ..BuiltinSources::default()
            },
            supervisor.as_ref().map(Supervisor::handle),
            reaper.clone(),
        )
        .map_err(|e| tracing::error!(error = %e, "health checks not set up"))
        .ok()
    });
    // One task runs the checks; the API and the update gate read its reports.
    let health = checker
        .as_ref()
        .map(|c| HealthMonitor::start(c.clone(), config.health.interval));

    let update_status = crate::update::new_status();
    let (power_tx, mut power_rx) = mpsc::channel(1);
    // API requests for the update driver (reboot through the strategy,
    // update check/apply/rollback).
    let (api_requests, api_requests_rx) = api::requests::channel();
    let mut shared = api::Shared::new(
        status.clone(),
        power_tx.clone(),
        api_requests,
        update_status.clone(),
    );
    shared.services = supervisor.as_ref().map(Supervisor::handle);
    shared.health = health.clone();
    shared.boots_total = count_boot();
    shared.config = api::redacted_config(&config_table);
    let identity_dir = Path::new(api::identity::IDENTITY_DIR);
    // An API that cannot be served securely is not served on TCP at all;
    // the Unix socket still is.
    let tcp = api::prepare_tcp(&config.api, identity_dir, &node_hostname).unwrap_or_else(|e| {
        let reason = crate::error_chain(&e);
        tracing::error!(error = %reason, "TCP API not served");
        console::emit(&Event::ApiError { reason });
        None
    });
    if let Err(e) = api::serve(shared, tcp).await {
        let reason = crate::error_chain(&e);
        tracing::error!(error = %reason, "API not served");
        console::emit(&Event::ApiError { reason });
    }

    console::emit(&Event::Ready {
        version: status.version.clone(),
        arch: status.arch.to_string(),
        slot: status.slot.clone(),
        boot_id,
        hostname: nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default(),
    });

    // The agent's own calls to the cluster (Node report, reboot strategy
    // `kubernetes`) need [kubernetes.agent]; without it only the kubelet
    // talks to the API server.
    let cluster = config
        .kubernetes
        .as_ref()
        .filter(|k| k.agent.is_some() && !k.standalone)
        .and_then(|k| {
            crate::kubernetes::coordinator::Cluster::from_config(k, &identity.name, &config.outbound())
                .map_err(|e| {
                    tracing::error!(error = %crate::error_chain(&e), "no cluster calls from the agent")
                })
                .ok()
        })
        .map(std::sync::Arc::new);
    if let (Some(cluster), Some(health)) = (&cluster, &health) {
        tokio::spawn(crate::kubernetes::coordinator::report_loop(
            cluster.clone(),
            health.clone(),
            update_status.clone(),
            status.version.clone(),
            status.slot.clone(),
        ));
    }

    let (strategy, holders) =
        reboot_strategy(&config.update, cluster, identity.fleetlock_id().to_owned());
    let wake = Arc::new(tokio::sync::Notify::new());
    // Requests queue in the channel until here (the API answers 503 only
    // when it is full or nobody will ever read it).
    tokio::spawn(answer_api_requests(
        api_requests_rx,
        ApiReboots {
            kind: config.update.strategy,
            strategy: strategy.clone(),
            running: status.version.parse().ok(),
            power: power_tx.clone(),
        },
        ApiUpdates {
            config: config.update.clone(),
            status: update_status.clone(),
            wake: wake.clone(),
        },
    ));
    if let Some(health) = health {
        let ctx = UpdateContext {
            config: config.update.clone(),
            health,
            strategy,
            holders,
            status: update_status,
            power: power_tx,
            wake,
        };
        tokio::spawn(crate::update::run(ctx));
    }

    let action = wait_for_shutdown(&mut power_rx).await;
    console::emit(&Event::Shutdown {
        action: action.to_string(),
    });
    if let Some(supervisor) = supervisor {
        supervisor.stop_all().await;
    }
    action
}

/// Loads `[kernel] modules` and writes `[kernel.sysctl]`, with the defaults
/// a Kubernetes node needs when `[kubernetes]` is set. Failures are logged
/// one by one and never stop the boot.
fn apply_kernel_settings(config: &Config) {
    let kubernetes = config.kubernetes.is_some();
    let dir = crate::boot::modules::running_kernel_dir();
    for m in config.kernel.modules(kubernetes) {
        if let Err(e) = crate::boot::modules::load(&dir, &[m.as_str()]) {
            tracing::warn!(module = %m, error = %crate::error_chain(&e), "module not loaded");
        }
    }
    let failed = crate::node::sysctl::apply(
        &crate::node::sysctl::Dir::default(),
        &config.kernel.sysctls(kubernetes),
    );
    if !failed.is_empty() {
        tracing::error!(failed = failed.len(), "sysctls not set (see above)");
    }
}

/// What an operator's reboot through the API goes through: the node's
/// reboot strategy, the same object the update driver asks.
struct ApiReboots {
    kind: Strategy,
    strategy: Arc<dyn RebootStrategy>,
    /// The version a plain reboot comes back as (what FleetLock and the
    /// Lease are asked about).
    running: Option<ballast_updater::payload::Version>,
    power: mpsc::Sender<Action>,
}

/// What the API's update requests reach: the `[update]` table, the
/// lifecycle's state (requests are refused while it is busy) and its poll.
struct ApiUpdates {
    config: UpdateConfig,
    status: crate::update::SharedUpdateStatus,
    wake: Arc<tokio::sync::Notify>,
}

impl ApiUpdates {
    fn state(&self) -> crate::update::UpdateState {
        self.status
            .lock()
            .map(|s| s.state.clone())
            .unwrap_or(crate::update::UpdateState::Disabled)
    }
}

/// How long the API's answer waits for the strategy before saying the
/// reboot is under way (a drain can take minutes).
const API_REBOOT_ANSWER_WAIT: Duration = Duration::from_secs(15);

/// Answers the API's requests for the update driver. A reboot goes through
/// the strategy (`off` means an operator decides, so the operator's request
/// is the permit); a strategy that blocks with a retry is asked again until
/// it allows, one reboot at a time. Update check, apply and rollback are
/// read-only (check), or wake the lifecycle (apply: it checks, installs
/// and reboots through the strategy as on any poll), or make the previous
/// version the default and reboot through the strategy (rollback); apply
/// and rollback are refused (409) while the lifecycle is busy.
async fn answer_api_requests(
    mut requests: mpsc::Receiver<api::requests::ApiRequest>,
    reboots: ApiReboots,
    updates: ApiUpdates,
) {
    use crate::update::UpdateState;
    use api::requests::{ApiRequest, RebootAccepted, Refused};
    let reboots = Arc::new(reboots);
    let pending = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let via = serde_json::to_value(reboots.kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let unavailable = |what: &str| Refused {
        status: 503,
        message: format!("{what} is not available: PID 1 is shutting down"),
    };
    let no_repository = || Refused {
        status: 409,
        message: "updates are off on this node: [update] has no repository".into(),
    };
    let busy_with = |state: &UpdateState| Refused {
        status: 409,
        message: format!("the update lifecycle is busy ({})", state.name()),
    };
    while let Some(request) = requests.recv().await {
        match request {
            ApiRequest::Reboot { request, reply } => {
                if pending.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    let _ = reply.send(Err(Refused {
                        status: 409,
                        message: "a reboot is already waiting for the strategy".into(),
                    }));
                    continue;
                }
                tracing::info!(who = request.who, via, "reboot asked through the API");
                let (done_tx, done_rx) = tokio::sync::oneshot::channel();
                let task_reboots = reboots.clone();
                let task_pending = pending.clone();
                tokio::spawn(async move {
                    let outcome = reboot_through_strategy(&task_reboots).await;
                    if outcome.is_err() {
                        task_pending.store(false, std::sync::atomic::Ordering::SeqCst);
                    }
                    let _ = done_tx.send(outcome);
                });
                let answer = match tokio::time::timeout(API_REBOOT_ANSWER_WAIT, done_rx).await {
                    Ok(Ok(Ok(()))) | Err(_) => Ok(RebootAccepted { via: via.clone() }),
                    Ok(Ok(Err(reason))) => Err(Refused {
                        status: 409,
                        message: format!("strategy {via}: {reason}"),
                    }),
                    Ok(Err(_)) => Err(unavailable("a reboot")),
                };
                let _ = reply.send(answer);
            }
            ApiRequest::UpdateCheck { reply, who } => {
                let answer = if updates.config.repository.is_none() {
                    Err(no_repository())
                } else {
                    tracing::info!(who, "update check asked through the API");
                    crate::update::check_now(updates.config.clone())
                        .await
                        .map_err(|e| Refused {
                            status: 502,
                            message: crate::error_chain(&e),
                        })
                };
                let _ = reply.send(answer);
            }
            ApiRequest::UpdateApply { reply, who } => {
                let answer = match updates.state() {
                    _ if updates.config.repository.is_none() => Err(no_repository()),
                    UpdateState::Idle => {
                        tracing::info!(who, "update apply asked through the API");
                        updates.wake.notify_one();
                        Ok(serde_json::json!({
                            "started": true,
                            "detail": "checking now; a release that applies is installed \
                                       and rebooted into through the strategy",
                        }))
                    }
                    busy => Err(busy_with(&busy)),
                };
                let _ = reply.send(answer);
            }
            ApiRequest::UpdateRollback { reply, who } => {
                let answer = match updates.state() {
                    UpdateState::Idle | UpdateState::Disabled => {
                        match crate::update::rollback_now(format!("asked by {who} through the API"))
                            .await
                        {
                            Ok(to) => {
                                tracing::info!(who, %to, "rollback asked through the API");
                                let pending = pending.clone();
                                if pending.swap(true, std::sync::atomic::Ordering::SeqCst) {
                                    Ok(serde_json::json!({
                                        "rolled_back_to": to.to_string(),
                                        "reboot": "already waiting for the strategy",
                                    }))
                                } else {
                                    let task_reboots = reboots.clone();
                                    tokio::spawn(async move {
                                        if let Err(reason) =
                                            reboot_through_strategy(&task_reboots).await
                                        {
                                            pending
                                                .store(false, std::sync::atomic::Ordering::SeqCst);
                                            tracing::warn!(
                                                reason,
                                                "rollback reboot refused by the strategy"
                                            );
                                        }
                                    });
                                    Ok(serde_json::json!({
                                        "rolled_back_to": to.to_string(),
                                        "reboot": format!("through strategy {via}"),
                                    }))
                                }
                            }
                            Err(e) => Err(Refused {
                                status: 422,
                                message: crate::error_chain(&e),
                            }),
                        }
                    }
                    busy => Err(busy_with(&busy)),
                };
                let _ = reply.send(answer);
            }
        }
    }
}

/// Asks the strategy until it allows (or refuses for good), then reboots.
async fn reboot_through_strategy(reboots: &ApiReboots) -> Result<(), String> {
    if reboots.kind != Strategy::Off {
        let running = reboots
            .running
            .ok_or("the running version is unknown, so the strategy cannot be asked")?;
        loop {
            match reboots.strategy.permit(running).await {
                Ok(_) => break,
                Err(blocked) => match blocked.retry_after {
                    Some(after) => {
                        tracing::info!(
                            reason = blocked.reason,
                            "API reboot waits for the strategy"
                        );
                        tokio::time::sleep(after).await;
                    }
                    None => return Err(blocked.reason),
                },
            }
        }
    }
    reboots
        .power
        .send(Action::Reboot)
        .await
        .map_err(|_| "PID 1 is already shutting down".to_owned())
}

/// PID 1's descriptor limit: the kernel's default (1024) is too few for
/// the API, services and checks together (services inherit it).
fn raise_descriptor_limit() {
    use nix::sys::resource::{setrlimit, Resource};
    let limit = api::limits::NOFILE_LIMIT;
    if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, limit, limit) {
        tracing::warn!(error = %e, limit, "descriptor limit not raised");
    }
}

/// Counts this boot on STATE; returns the total including this one.
fn count_boot() -> u64 {
    let path = Path::new(STATE_DIR).join("boots");
    let boots = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok())
        .unwrap_or(0)
        + 1;
    if let Err(e) = crate::atomic::write(
        &path,
        format!("{boots}\n").as_bytes(),
        crate::atomic::PUBLIC,
    ) {
        tracing::warn!(error = %crate::error_chain(&e), "boot not counted");
    }
    boots
}

/// The configured reboot strategy, and everything that may hold a reboot
/// lock of this node (released after a healthy boot whatever the strategy).
fn reboot_strategy(
    config: &UpdateConfig,
    cluster: Option<std::sync::Arc<crate::kubernetes::coordinator::Cluster>>,
    node_id: String,
) -> (Arc<dyn RebootStrategy>, Vec<Arc<dyn RebootStrategy>>) {
    let outbound = config.outbound.clone();
    let fleetlock = config.fleetlock.clone().map(|config| {
        Arc::new(strategy::FleetLock {
            config,
            node_id,
            outbound,
        }) as Arc<dyn RebootStrategy>
    });
    let cluster = cluster.map(|c| c as Arc<dyn RebootStrategy>);
    // Config::merge rejects window and fleetlock without their tables, so
    // `Unavailable` there is only a guard.
    let unavailable = |reason: &str| -> Arc<dyn RebootStrategy> {
        tracing::error!(reason, "the update strategy cannot work; not rebooting");
        Arc::new(strategy::Unavailable {
            reason: reason.to_owned(),
        })
    };
    let chosen = match config.strategy {
        Strategy::Immediate => Arc::new(strategy::Immediate) as Arc<dyn RebootStrategy>,
        Strategy::Off => Arc::new(strategy::Off),
        Strategy::Window => match &config.window {
            Some(w) => Arc::new(strategy::Window(w.clone())),
            None => unavailable("strategy window without [update.window]"),
        },
        Strategy::Fleetlock => fleetlock
            .clone()
            .unwrap_or_else(|| unavailable("strategy fleetlock without [update.fleetlock]")),
        Strategy::Kubernetes => cluster
            .clone()
            .unwrap_or_else(|| unavailable("no Kubernetes credential for the agent")),
    };
    (chosen, fleetlock.into_iter().chain(cluster).collect())
}

/// A random id made at first boot and kept on STATE (the last source of
/// the node's name, and FleetLock's node id without Kubernetes).
fn machine_id() -> String {
    let path = Path::new(STATE_DIR).join("machine-id");
    if let Ok(id) = std::fs::read_to_string(&path) {
        let id = id.trim();
        if id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return id.to_owned();
        }
    }
    let mut bytes = [0u8; 16];
    let _ = getrandom::getrandom(&mut bytes);
    let id = hex::encode(bytes);
    // Atomic: a torn machine id would give the node a new name and
    // FleetLock id at the next boot, orphaning a lock held under the old.
    if let Err(e) = crate::atomic::write(&path, format!("{id}\n").as_bytes(), crate::atomic::PUBLIC)
    {
        tracing::warn!(error = %crate::error_chain(&e), "machine id not kept on STATE");
    }
    id
}

/// Waits until a signal or the API asks for a shutdown.
async fn wait_for_shutdown(power: &mut mpsc::Receiver<Action>) -> Action {
    let (Ok(mut term), Ok(mut int), Ok(mut usr1), Ok(mut usr2)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::user_defined1()),
        signal(SignalKind::user_defined2()),
    ) else {
        tracing::error!("cannot install signal handlers; rebooting");
        return Action::Reboot;
    };
    tokio::select! {
        _ = term.recv() => Action::Reboot,
        _ = int.recv() => Action::Reboot,
        _ = usr1.recv() => Action::Halt,
        _ = usr2.recv() => Action::Poweroff,
        Some(action) = power.recv() => action,
    }
}

fn reap_zombies() {
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(status) => tracing::debug!(?status, "reaped"),
        }
    }
}

/// Stops everything, syncs, unmounts and resets. Never returns.
fn shutdown(action: Action) -> ! {
    // PID 1 is exempt from kill(-1): this reaches every other process.
    let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
    let deadline = std::time::Instant::now() + STOP_GRACE;
    while std::time::Instant::now() < deadline {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Err(nix::errno::Errno::ECHILD) => break,
            Ok(WaitStatus::StillAlive) => std::thread::sleep(Duration::from_millis(50)),
            _ => {}
        }
    }
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    reap_zombies();
    nix::unistd::sync();
    mounts::unmount_for_shutdown();
    crate::node::power::reboot_now(action)
}

/// Copies the factory `/etc` into the tmpfs so every boot starts the same.
fn render_etc() {
    if let Err(e) = copy_tree(Path::new(FACTORY_ETC), Path::new("/etc")) {
        tracing::warn!(error = %e, "factory /etc not copied");
    }
}

fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        let kind = entry.file_type()?;
        if kind.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else if kind.is_symlink() {
            let _ = std::fs::remove_file(&target);
            std::os::unix::fs::symlink(std::fs::read_link(entry.path())?, &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// First boot: fresh GUIDs for the boot disk (boot::disk_identity). A
/// failure leaves a node that boots as before; the next boot tries again.
fn renew_disk_identity(info: &BootInfo) {
    // The slot's PARTUUID as early boot found it on the disk.
    let running = [info.usr.partuuid];
    match crate::boot::disk_identity::renew_boot_disk(&info.usr.disk, Path::new("/efi"), &running) {
        Ok(Some(event)) => console::emit(&event),
        Ok(None) => {}
        Err(e) => {
            tracing::error!(disk = %info.usr.disk.display(), error = %crate::error_chain(&e), "disk identity not renewed")
        }
    }
}

fn mount_esp(info: &BootInfo) {
    use nix::mount::{mount, MsFlags};
    let _ = std::fs::create_dir_all("/efi");
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    if let Err(e) = mount(
        Some(&info.esp.device),
        "/efi",
        Some("vfat"),
        flags,
        Some("umask=0077,shortname=mixed"),
    ) {
        tracing::error!(device = %info.esp.device.display(), error = %e, "ESP not mounted");
    }
}

/// Sets the node's host name: the configured one, else the metadata one,
/// else one from the machine id. Returns it; writes nothing when it equals
/// `current`.
/// The node's one name ([`crate::kubernetes::identity`]) from the
/// configuration and a metadata name.
fn node_identity(
    config: &Config,
    metadata: Option<&str>,
) -> crate::kubernetes::identity::NodeIdentity {
    crate::kubernetes::identity::node_name(
        config.kubernetes.as_ref(),
        config.hostname.as_deref(),
        metadata,
        &machine_id(),
    )
}

/// Sets the kernel's host name (and /etc/hostname) to the configured one,
/// else the node's identity; nothing when it is `current` already.
fn set_node_hostname(
    config: &Config,
    identity: &crate::kubernetes::identity::NodeIdentity,
    current: Option<&str>,
) -> String {
    let name = config
        .hostname
        .clone()
        .unwrap_or_else(|| identity.name.clone());
    if current == Some(name.as_str()) {
        return name;
    }
    if let Err(e) = nix::unistd::sethostname(&name) {
        tracing::warn!(error = %e, "hostname not set");
    }
    let _ = std::fs::write("/etc/hostname", format!("{name}\n"));
    name
}

/// The node's configuration from these user-data and the other layers and,
/// if it was bad, why the last good one (or the defaults) is in force
/// instead. `report`: print a `config-error` and keep the last good
/// configuration (false for the provisional load before instance metadata
/// is asked, which is loaded again).
fn load_config(
    user_data: Option<crate::config::Layer>,
    report: bool,
) -> (Config, toml::Table, Option<String>) {
    use crate::config::{merge, node_layers, LAST_GOOD};
    let loaded = node_layers(user_data).and_then(|layers| merge(&layers));
    match loaded {
        Ok((config, table)) => {
            if let (true, Ok(text)) = (report, toml::to_string(&table)) {
                crate::config::save_last_good(Path::new(LAST_GOOD), &text);
            }
            (config, table, None)
        }
        Err(e) => {
            let reason = crate::error_chain(&e);
            if report {
                console::emit(&Event::ConfigError {
                    reason: reason.clone(),
                });
            }
            let last_good = std::fs::read_to_string(LAST_GOOD).ok().and_then(|text| {
                let config = Config::parse(&text, std::path::Path::new(LAST_GOOD)).ok()?;
                Some((config, toml::from_str::<toml::Table>(&text).ok()?))
            });
            let (config, table) = last_good.unwrap_or_default();
            (config, table, Some(reason))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks `blocks` times (retrying after 1 ms), then permits; counts asks.
    #[derive(Debug)]
    struct Scripted {
        blocks: usize,
        retry: bool,
        asked: std::sync::atomic::AtomicUsize,
    }

    impl RebootStrategy for Scripted {
        fn permit(
            &self,
            _version: ballast_updater::payload::Version,
        ) -> futures_util::future::BoxFuture<'_, Result<strategy::Permit, strategy::Blocked>>
        {
            let n = self.asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Box::pin(async move {
                if n < self.blocks {
                    Err(strategy::Blocked {
                        reason: format!("held {n}"),
                        retry_after: self.retry.then(|| Duration::from_millis(1)),
                        notice: strategy::Notice::Quiet,
                    })
                } else {
                    Ok(strategy::Permit)
                }
            })
        }
    }

    fn reboots(
        kind: Strategy,
        blocks: usize,
        retry: bool,
    ) -> (ApiReboots, Arc<Scripted>, mpsc::Receiver<Action>) {
        let scripted = Arc::new(Scripted {
            blocks,
            retry,
            asked: std::sync::atomic::AtomicUsize::new(0),
        });
        let (power, rx) = mpsc::channel(1);
        let r = ApiReboots {
            kind,
            strategy: scripted.clone(),
            running: "1.0.0".parse().ok(),
            power,
        };
        (r, scripted, rx)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn api_reboots_wait_for_the_strategy_then_reboot() {
        let (r, scripted, mut power) = reboots(Strategy::Fleetlock, 2, true);
        reboot_through_strategy(&r).await.unwrap();
        assert_eq!(scripted.asked.load(std::sync::atomic::Ordering::SeqCst), 3);
        assert_eq!(power.recv().await, Some(Action::Reboot));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_strategy_that_refuses_for_good_never_reboots() {
        let (r, _, mut power) = reboots(Strategy::Window, 1, false);
        let err = reboot_through_strategy(&r).await.unwrap_err();
        assert_eq!(err, "held 0");
        assert!(power.try_recv().is_err());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn under_strategy_off_the_operator_is_the_permit() {
        let (r, scripted, mut power) = reboots(Strategy::Off, 5, false);
        reboot_through_strategy(&r).await.unwrap();
        assert_eq!(scripted.asked.load(std::sync::atomic::Ordering::SeqCst), 0);
        assert_eq!(power.recv().await, Some(Action::Reboot));
    }

    /// The API's update requests against a lifecycle in `state`, with or
    /// without a repository: returns the answer and whether the poll woke.
    async fn ask_apply(
        state: crate::update::UpdateState,
        repository: bool,
    ) -> (Result<serde_json::Value, api::requests::Refused>, bool) {
        let (r, _, _power) = reboots(Strategy::Immediate, 0, false);
        let status = crate::update::new_status();
        status.lock().unwrap().state = state;
        let wake = Arc::new(tokio::sync::Notify::new());
        let config = UpdateConfig {
            repository: repository.then(|| "http://127.0.0.1:9/".to_owned()),
            ..UpdateConfig::default()
        };
        let (tx, rx) = api::requests::channel();
        tokio::spawn(answer_api_requests(
            rx,
            r,
            ApiUpdates {
                config,
                status,
                wake: wake.clone(),
            },
        ));
        let answer = api::requests::ask(&tx, |reply| api::requests::ApiRequest::UpdateApply {
            who: "alice".into(),
            reply,
        })
        .await;
        let woke = tokio::time::timeout(Duration::from_millis(50), wake.notified())
            .await
            .is_ok();
        (answer, woke)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn apply_wakes_an_idle_lifecycle_and_refuses_a_busy_or_disabled_one() {
        use crate::update::UpdateState;
        let (answer, woke) = ask_apply(UpdateState::Idle, true).await;
        assert_eq!(answer.unwrap()["started"], true);
        assert!(woke);
        let version = "1.1.0".parse().unwrap();
        let (answer, woke) = ask_apply(UpdateState::Installing { version }, true).await;
        let refused = answer.unwrap_err();
        assert_eq!(refused.status, 409);
        assert!(
            refused.message.contains("installing"),
            "{}",
            refused.message
        );
        assert!(!woke);
        let (answer, woke) = ask_apply(UpdateState::Idle, false).await;
        assert!(answer.unwrap_err().message.contains("no repository"));
        assert!(!woke);
    }
}
