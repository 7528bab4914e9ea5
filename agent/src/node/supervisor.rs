//! Service supervision: owns the node's long-running services from their
//! `[services.NAME]` declarations to their last exit. It validates the
//! declarations (names, commands, limits, dependencies), starts services in
//! dependency order, restarts them with exponential backoff, captures their
//! stdout and stderr into size-capped rotating log files, places each in its
//! own cgroup v2 group with its limits, reports per-service status, and stops
//! them in reverse dependency order (SIGTERM to the process group, a grace
//! period, then SIGKILL).
//!
//! # Exit statuses and PID 1's reaper
//!
//! PID 1 must reap every orphan (`waitpid(-1)`), and a `waitpid(-1)` would
//! steal the exit status of any child that something else (tokio::process,
//! std's `Child::wait`) waits for by pid. So this module does not use
//! tokio::process: every child of the agent is spawned through a [`Reaper`],
//! which records the pid, and the reaper is the one place that calls
//! `waitpid`:
//!
//! * [`ReapScope::AllChildren`] (PID 1): on SIGCHLD it calls `waitpid(-1)`,
//!   hands the statuses of its own children to their waiters and logs the
//!   orphans it reaped. PID 1 then must not reap on its own while the
//!   runtime runs (system.rs drops its SIGCHLD arm); other code in PID 1 that
//!   starts processes uses [`Reaper::spawn`] too (the health checks do).
//! * `ReapScope::OwnChildren` (tests only): it calls `waitpid(pid)` for
//!   the pids it spawned only, so it never disturbs anyone else's children.
//!
//! In tests, an external reaper can also hand statuses over with
//! `Reaper::deliver`.
//! Spawning and reaping take the same lock, so a child that exits before its
//! pid is recorded cannot be reaped unseen.
//!
//! Cgroup placement happens right after `fork`/`exec` (writing the pid to
//! `cgroup.procs`): a service that forks within microseconds of starting can
//! leave a child in the agent's group; the process group still reaches it at
//! stop time.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// Where service logs go: `<dir>/<service>.log`, rotated to `.log.1`.
pub const DEFAULT_LOG_DIR: &str = "/var/log/ballast";
/// Parent of the per-service cgroups: `<root>/<service>`.
pub const DEFAULT_CGROUP_ROOT: &str = "/sys/fs/cgroup/ballast";
/// A log file is rotated when a write would take it past this size.
pub const DEFAULT_LOG_CAP: u64 = 1024 * 1024;
/// `PATH` for services that do not set their own.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Longest log line kept whole; longer output is split at this size.
const MAX_LOG_LINE: u64 = 16 * 1024;
/// How long an ended service's output may take to reach its log.
const OUTPUT_DRAIN_WAIT: Duration = Duration::from_millis(500);
/// How long to wait for a SIGKILLed service to be reaped before giving up.
const KILL_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("service {service:?}: a name is 1-64 characters of A-Z a-z 0-9 . _ - and not . or ..")]
    InvalidName { service: String },
    #[error("service {service}: command is empty")]
    EmptyCommand { service: String },
    #[error("service {service}: depends on unknown service {dependency:?} (in `after`)")]
    UnknownDependency { service: String, dependency: String },
    #[error("service {service}: dependency cycle {}", cycle.join(" -> "))]
    DependencyCycle { service: String, cycle: Vec<String> },
    #[error("service {service}: limits.{limit}: {detail}")]
    InvalidLimit {
        service: String,
        limit: &'static str,
        detail: String,
    },
    #[error(transparent)]
    Confine(#[from] crate::node::confine::ConfineError),
    #[error("installing the SIGCHLD handler")]
    SignalHandler(#[source] std::io::Error),
    /// Only the program and the number of arguments: arguments may carry
    /// secrets (`--token=…`) and this error reaches the console and /status.
    #[error("service {service}: starting {program:?} with {args} arguments")]
    Spawn {
        service: String,
        program: String,
        args: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("service {service}: log file {}", path.display())]
    Log {
        service: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cgroup {}", path.display())]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One `[services.NAME]` table. The name is the table's key.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// Program and arguments; the program is looked up in `PATH`.
    pub command: Vec<String>,
    /// Environment besides `PATH` (which this may override).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Services that must be started before this one (and stopped after).
    #[serde(default)]
    pub after: Vec<String>,
    #[serde(default)]
    pub restart: RestartPolicy,
    #[serde(default)]
    pub limits: Limits,
    /// Numeric user id to run as (default root); see `node::confine`.
    #[serde(default)]
    pub user: Option<u32>,
    /// Numeric group id (default: the user's number); supplementary
    /// groups are always dropped when either is set.
    #[serde(default)]
    pub group: Option<u32>,
    /// Capabilities kept (`CAP_NET_ADMIN` or `net_admin`); every other one
    /// leaves the bounding set. Unset: unchanged.
    #[serde(default)]
    pub capabilities: Option<Vec<String>>,
    /// setuid programs and file capabilities grant nothing.
    #[serde(default)]
    pub no_new_privs: bool,
    /// `RLIMIT_NOFILE`, soft and hard.
    #[serde(default)]
    pub nofile: Option<u64>,
    /// The OOM killer's preference, -1000 (never) ..= 1000.
    #[serde(default)]
    pub oom_score_adj: Option<i32>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Restart whenever it exits.
    #[default]
    Always,
    /// Restart when it exits non-zero or by a signal.
    OnFailure,
    /// Run once.
    Never,
}

/// cgroup v2 limits; unset ones are left at the kernel's default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// `memory.max` in bytes.
    pub memory_max: Option<u64>,
    /// `cpu.weight`, 1..=10000 (the kernel's default is 100).
    pub cpu_weight: Option<u64>,
    /// `cpu.max` as a number of CPUs, e.g. 0.5 or 2.
    pub cpu_max: Option<f64>,
    /// `pids.max`.
    pub pids_max: Option<u64>,
}

impl Limits {
    /// The cgroup files and values these limits write.
    pub fn cgroup_files(&self) -> Vec<(&'static str, String)> {
        let mut files = Vec::new();
        if let Some(bytes) = self.memory_max {
            files.push(("memory.max", bytes.to_string()));
        }
        if let Some(weight) = self.cpu_weight {
            files.push(("cpu.weight", weight.to_string()));
        }
        if let Some(cpus) = self.cpu_max {
            let period = 100_000u64;
            // `as` from f64 saturates (NaN becomes 0) and the value is at
            // least 1000 here: no wrap, no sign to lose.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let quota = (cpus * period as f64).round().max(1000.0) as u64;
            files.push(("cpu.max", format!("{quota} {period}")));
        }
        if let Some(pids) = self.pids_max {
            files.push(("pids.max", pids.to_string()));
        }
        files
    }

    fn validate(&self, service: &str) -> Result<(), SupervisorError> {
        let invalid = |limit, detail: &str| SupervisorError::InvalidLimit {
            service: service.to_owned(),
            limit,
            detail: detail.to_owned(),
        };
        if let Some(w) = self.cpu_weight {
            if !(1..=10_000).contains(&w) {
                return Err(invalid("cpu_weight", "must be 1..=10000"));
            }
        }
        if let Some(c) = self.cpu_max {
            if !c.is_finite() || c <= 0.0 || c > 4096.0 {
                return Err(invalid("cpu_max", "must be a number of CPUs above 0"));
            }
        }
        if self.memory_max == Some(0) {
            return Err(invalid("memory_max", "must be above 0 bytes"));
        }
        if self.pids_max == Some(0) {
            return Err(invalid("pids_max", "must be above 0"));
        }
        Ok(())
    }
}

/// Restart delays: `initial`, doubling up to `max`; a run of at least
/// `reset_after` starts over from `initial`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffPolicy {
    pub initial: Duration,
    pub max: Duration,
    pub reset_after: Duration,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        BackoffPolicy {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
            reset_after: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone)]
struct Backoff {
    policy: BackoffPolicy,
    next: Duration,
}

impl Backoff {
    fn new(policy: BackoffPolicy) -> Self {
        Backoff {
            policy,
            next: policy.initial,
        }
    }

    /// The delay before the next start, after a run that lasted `ran_for`.
    fn delay_after(&mut self, ran_for: Duration) -> Duration {
        if ran_for >= self.policy.reset_after {
            self.next = self.policy.initial;
        }
        let delay = self.next;
        self.next = (self.next * 2).min(self.policy.max);
        delay
    }
}

/// Which children the [`Reaper`] waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReapScope {
    /// `waitpid(-1)`: every child of the process, orphans included (PID 1).
    AllChildren,
    /// `waitpid(pid)` for the children spawned through the reaper only.
    /// Tests only: PID 1 reaps everything.
    #[cfg(test)]
    OwnChildren,
}

/// How a process ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExitInfo {
    /// Exit code, when it exited.
    pub code: Option<i32>,
    /// Signal name (`SIGKILL`), when a signal ended it.
    pub signal: Option<String>,
}

impl ExitInfo {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    fn from_wait_status(status: WaitStatus) -> Option<(Pid, ExitInfo)> {
        match status {
            WaitStatus::Exited(pid, code) => Some((
                pid,
                ExitInfo {
                    code: Some(code),
                    signal: None,
                },
            )),
            WaitStatus::Signaled(pid, signal, _) => Some((
                pid,
                ExitInfo {
                    code: None,
                    signal: Some(signal.as_str().to_owned()),
                },
            )),
            _ => None,
        }
    }
}

impl fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.code, &self.signal) {
            (Some(code), _) => write!(f, "exited with code {code}"),
            (None, Some(signal)) => write!(f, "killed by {signal}"),
            (None, None) => f.write_str("ended for an unknown reason"),
        }
    }
}

/// The single place the agent waits for its children; see the module doc.
#[derive(Debug, Clone)]
pub struct Reaper {
    inner: Arc<ReaperInner>,
}

#[derive(Debug)]
struct ReaperInner {
    scope: ReapScope,
    waiters: Mutex<HashMap<i32, oneshot::Sender<ExitInfo>>>,
}

/// Resolves when the child exits; an error means the reaper went away.
pub type ExitReceiver = oneshot::Receiver<ExitInfo>;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Reaper {
    /// Starts reaping on SIGCHLD. Call inside the tokio runtime; the task
    /// ends at the first SIGCHLD after the last handle is dropped.
    ///
    /// SIGCHLD alone is enough, with no timer: the handler is installed
    /// before the first sweep below, so a child that ended earlier is
    /// collected by that sweep and any later exit raises a signal; tokio
    /// merges signals that arrive together but never drops the last one, and
    /// each sweep loops `waitpid(WNOHANG)` until nothing is left, so merged
    /// exits are all collected. An idle node thus never wakes the agent.
    pub fn start(scope: ReapScope) -> Result<Reaper, SupervisorError> {
        let mut sigchld = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())
            .map_err(SupervisorError::SignalHandler)?;
        let reaper = Reaper {
            inner: Arc::new(ReaperInner {
                scope,
                waiters: Mutex::new(HashMap::new()),
            }),
        };
        let weak: Weak<ReaperInner> = Arc::downgrade(&reaper.inner);
        tokio::spawn(async move {
            loop {
                let Some(inner) = weak.upgrade() else { return };
                Reaper { inner }.reap();
                if sigchld.recv().await.is_none() {
                    // The runtime's signal driver is gone: so is the runtime.
                    return;
                }
            }
        });
        Ok(reaper)
    }

    /// Spawns `command` and records its pid; never call `wait` on the
    /// returned child, await the receiver instead.
    pub fn spawn(
        &self,
        command: &mut std::process::Command,
    ) -> std::io::Result<(std::process::Child, ExitReceiver)> {
        let mut waiters = lock(&self.inner.waiters);
        let child = command.spawn()?;
        let (tx, rx) = oneshot::channel();
        // Linux pids stop at PID_MAX_LIMIT (2^22): they fit in i32.
        #[allow(clippy::cast_possible_wrap)]
        let pid = child.id() as i32;
        waiters.insert(pid, tx);
        Ok((child, rx))
    }

    /// Hands over a status reaped elsewhere; true when the pid was spawned
    /// through this reaper.
    #[cfg(test)]
    pub fn deliver(&self, status: WaitStatus) -> bool {
        Self::deliver_locked(&mut lock(&self.inner.waiters), status)
    }

    fn deliver_locked(
        waiters: &mut HashMap<i32, oneshot::Sender<ExitInfo>>,
        status: WaitStatus,
    ) -> bool {
        let Some((pid, exit)) = ExitInfo::from_wait_status(status) else {
            return false;
        };
        match waiters.remove(&pid.as_raw()) {
            Some(tx) => {
                let _ = tx.send(exit);
                true
            }
            None => false,
        }
    }

    /// Collects every exit that is ready now.
    pub fn reap(&self) {
        let mut waiters = lock(&self.inner.waiters);
        match self.inner.scope {
            ReapScope::AllChildren => loop {
                match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) | Err(_) => return,
                    Ok(status) => {
                        if !Self::deliver_locked(&mut waiters, status) {
                            tracing::debug!(?status, "reaped an orphan");
                        }
                    }
                }
            },
            #[cfg(test)]
            ReapScope::OwnChildren => {
                let pids: Vec<i32> = waiters.keys().copied().collect();
                for pid in pids {
                    match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
                        Ok(WaitStatus::StillAlive) => {}
                        Ok(status) => {
                            Self::deliver_locked(&mut waiters, status);
                        }
                        Err(nix::errno::Errno::ECHILD) => {
                            // Someone else reaped it: report an unknown end.
                            if let Some(tx) = waiters.remove(&pid) {
                                let _ = tx.send(ExitInfo {
                                    code: None,
                                    signal: None,
                                });
                            }
                        }
                        Err(_) => {}
                    }
                }
            }
        }
    }
}

/// Where the supervisor keeps logs and cgroups, and how it paces restarts.
#[derive(Debug, Clone)]
pub struct SupervisorOptions {
    pub log_dir: PathBuf,
    pub log_cap: u64,
    pub cgroup_root: PathBuf,
    pub backoff: BackoffPolicy,
    /// Between SIGTERM and SIGKILL when stopping.
    pub stop_grace: Duration,
}

impl Default for SupervisorOptions {
    fn default() -> Self {
        SupervisorOptions {
            log_dir: DEFAULT_LOG_DIR.into(),
            log_cap: DEFAULT_LOG_CAP,
            cgroup_root: DEFAULT_CGROUP_ROOT.into(),
            backoff: BackoffPolicy::default(),
            stop_grace: Duration::from_secs(10),
        }
    }
}

/// `<dir>/<service>.log`.
pub fn log_path(dir: &Path, service: &str) -> PathBuf {
    dir.join(format!("{service}.log"))
}

/// `<dir>/<service>.log.1`, the previous log after a rotation.
pub fn rotated_log_path(dir: &Path, service: &str) -> PathBuf {
    dir.join(format!("{service}.log.1"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServiceState {
    /// Not started yet.
    Pending,
    Running,
    /// Waiting to be restarted.
    Backoff,
    Stopping,
    /// Stopped by the supervisor.
    Stopped,
    /// Ended successfully and is not restarted.
    Exited,
    /// Ended unsuccessfully (or could not start) and is not restarted.
    Failed,
}

impl fmt::Display for ServiceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ServiceState::Pending => "pending",
            ServiceState::Running => "running",
            ServiceState::Backoff => "backoff",
            ServiceState::Stopping => "stopping",
            ServiceState::Stopped => "stopped",
            ServiceState::Exited => "exited",
            ServiceState::Failed => "failed",
        })
    }
}

/// One service as `/status` and `/metrics` show it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServiceStatus {
    pub name: String,
    pub state: ServiceState,
    pub pid: Option<u32>,
    /// Starts after the first one.
    pub restarts: u64,
    pub last_exit: Option<ExitInfo>,
    /// Why the last start failed, if it did.
    pub last_error: Option<String>,
    /// When the service entered `state`, in seconds since the Unix epoch.
    pub since: u64,
}

/// 1-64 characters of `A-Z a-z 0-9 . _ -`, not `.` or `..`: names become
/// file and cgroup names.
pub fn valid_service_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Checks the declarations and returns the start order (dependencies first,
/// otherwise by name).
pub fn start_order(
    services: &BTreeMap<String, ServiceSpec>,
) -> Result<Vec<String>, SupervisorError> {
    for (name, spec) in services {
        if !valid_service_name(name) {
            return Err(SupervisorError::InvalidName {
                service: name.clone(),
            });
        }
        if spec
            .command
            .first()
            .is_none_or(|program| program.is_empty())
        {
            return Err(SupervisorError::EmptyCommand {
                service: name.clone(),
            });
        }
        spec.limits.validate(name)?;
        crate::node::confine::confinement(name, spec)?;
        for dependency in &spec.after {
            if !services.contains_key(dependency) {
                return Err(SupervisorError::UnknownDependency {
                    service: name.clone(),
                    dependency: dependency.clone(),
                });
            }
        }
    }
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Visiting,
        Done,
    }
    fn visit(
        name: &str,
        services: &BTreeMap<String, ServiceSpec>,
        marks: &mut HashMap<String, Mark>,
        path: &mut Vec<String>,
        order: &mut Vec<String>,
    ) -> Result<(), SupervisorError> {
        match marks.get(name) {
            Some(Mark::Done) => return Ok(()),
            Some(Mark::Visiting) => {
                let start = path.iter().position(|p| p == name).unwrap_or(0);
                let mut cycle = path[start..].to_vec();
                cycle.push(name.to_owned());
                return Err(SupervisorError::DependencyCycle {
                    service: name.to_owned(),
                    cycle,
                });
            }
            None => {}
        }
        marks.insert(name.to_owned(), Mark::Visiting);
        path.push(name.to_owned());
        if let Some(spec) = services.get(name) {
            for dependency in &spec.after {
                visit(dependency, services, marks, path, order)?;
            }
        }
        path.pop();
        marks.insert(name.to_owned(), Mark::Done);
        order.push(name.to_owned());
        Ok(())
    }
    let mut marks = HashMap::new();
    let mut order = Vec::with_capacity(services.len());
    for name in services.keys() {
        visit(name, services, &mut marks, &mut Vec::new(), &mut order)?;
    }
    Ok(order)
}

/// A log file that moves to `.1` when a write would take it past its cap.
#[derive(Debug)]
pub(crate) struct RotatingLog {
    path: PathBuf,
    rotated: PathBuf,
    cap: u64,
    file: std::fs::File,
    size: u64,
}

impl RotatingLog {
    pub(crate) fn open(dir: &Path, service: &str, cap: u64) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = log_path(dir, service);
        let file = Self::open_append(&path)?;
        let size = file.metadata()?.len();
        Ok(RotatingLog {
            rotated: rotated_log_path(dir, service),
            path,
            cap,
            file,
            size,
        })
    }

    fn open_append(path: &Path) -> std::io::Result<std::fs::File> {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    }

    pub(crate) fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if self.size > 0 && self.size + bytes.len() as u64 > self.cap {
            std::fs::rename(&self.path, &self.rotated)?;
            self.file = Self::open_append(&self.path)?;
            self.size = 0;
        }
        // A single write larger than the cap is cut to the cap.
        let keep = bytes
            .len()
            .min(usize::try_from(self.cap).unwrap_or(usize::MAX));
        self.file.write_all(&bytes[..keep])?;
        self.size += keep as u64;
        Ok(())
    }
}

type SharedLog = Arc<Mutex<Option<RotatingLog>>>;

fn write_log(log: &SharedLog, service: &str, bytes: &[u8]) {
    let mut guard = lock(log);
    if let Some(file) = guard.as_mut() {
        if let Err(e) = file.write(bytes) {
            tracing::warn!(service, path = %file.path.display(), error = %e, "service log not written; dropping further output");
            *guard = None;
        }
    }
}

/// Copies one pipe into the log, line by line.
async fn pump_output(fd: OwnedFd, log: SharedLog, service: String) {
    let pipe = match tokio::net::unix::pipe::Receiver::from_owned_fd(fd) {
        Ok(pipe) => pipe,
        Err(e) => {
            tracing::warn!(service, error = %e, "service output not captured");
            return;
        }
    };
    let mut reader = BufReader::new(pipe);
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut reader)
            .take(MAX_LOG_LINE)
            .read_until(b'\n', &mut line)
            .await
        {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                if line.last() != Some(&b'\n') {
                    line.push(b'\n');
                }
                write_log(&log, &service, &line);
            }
        }
    }
}

/// cgroup v2 placement. Disabled (with one warning) when `root`'s parent is
/// not a writable cgroup2 mount.
#[derive(Debug, Clone)]
struct Cgroups {
    root: Option<PathBuf>,
}

impl Cgroups {
    fn prepare(root: &Path) -> Self {
        match Self::try_prepare(root) {
            Ok(()) => Cgroups {
                root: Some(root.to_owned()),
            },
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(&e), "cgroups not used; service limits not applied");
                Cgroups { root: None }
            }
        }
    }

    fn try_prepare(root: &Path) -> Result<(), SupervisorError> {
        let parent = root.parent().unwrap_or(Path::new("/"));
        let cgroup_err = |path: &Path| {
            let path = path.to_owned();
            move |source| SupervisorError::Cgroup { path, source }
        };
        let fs = nix::sys::statfs::statfs(parent)
            .map_err(std::io::Error::from)
            .map_err(cgroup_err(parent))?;
        if fs.filesystem_type() != nix::sys::statfs::CGROUP2_SUPER_MAGIC {
            return Err(SupervisorError::Cgroup {
                path: parent.to_owned(),
                source: std::io::Error::other("not a cgroup2 mount"),
            });
        }
        std::fs::create_dir_all(root).map_err(cgroup_err(root))?;
        for dir in [parent, root] {
            enable_controllers(dir);
        }
        Ok(())
    }

    /// Creates the service's group and writes its limits.
    fn create_group(&self, service: &str, limits: &Limits) -> Option<PathBuf> {
        let root = self.root.as_ref()?;
        match write_group(root, service, limits) {
            Ok(group) => Some(group),
            Err(e) => {
                tracing::warn!(service, error = %crate::error_chain(&e), "service runs outside its cgroup");
                None
            }
        }
    }
}

/// Asks for the controllers the limits need, one by one so a missing one
/// does not hide the others.
fn enable_controllers(dir: &Path) {
    let control = dir.join("cgroup.subtree_control");
    for controller in ["+cpu", "+memory", "+pids"] {
        if let Err(e) = std::fs::write(&control, controller) {
            tracing::debug!(path = %control.display(), controller, error = %e, "controller not enabled");
        }
    }
}

/// `<root>/<service>` with its limit files written.
fn write_group(root: &Path, service: &str, limits: &Limits) -> Result<PathBuf, SupervisorError> {
    let group = root.join(service);
    std::fs::create_dir_all(&group).map_err(|source| SupervisorError::Cgroup {
        path: group.clone(),
        source,
    })?;
    for (file, value) in limits.cgroup_files() {
        let path = group.join(file);
        std::fs::write(&path, &value).map_err(|source| SupervisorError::Cgroup { path, source })?;
    }
    Ok(group)
}

fn add_to_group(group: &Path, pid: u32, service: &str) {
    let procs = group.join("cgroup.procs");
    if let Err(e) = std::fs::write(&procs, pid.to_string()) {
        tracing::warn!(service, pid, path = %procs.display(), error = %e, "process not moved into its cgroup");
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[derive(Debug, Default)]
struct Shared {
    services: Mutex<BTreeMap<String, ServiceStatus>>,
}

impl Shared {
    fn update(&self, service: &str, change: impl FnOnce(&mut ServiceStatus)) {
        if let Some(status) = lock(&self.services).get_mut(service) {
            let before = status.state;
            change(status);
            if status.state != before {
                status.since = unix_now();
            }
        }
    }
}

/// A cheap, cloneable view of the services' status for the API, metrics
/// and health checks.
#[derive(Debug, Clone)]
pub struct SupervisorHandle {
    shared: Arc<Shared>,
}

impl SupervisorHandle {
    /// Every service, by name.
    pub fn statuses(&self) -> Vec<ServiceStatus> {
        lock(&self.shared.services).values().cloned().collect()
    }

    /// One service's status (tests; the API reads [`Self::statuses`]).
    #[cfg(test)]
    pub fn status(&self, service: &str) -> Option<ServiceStatus> {
        lock(&self.shared.services).get(service).cloned()
    }
}

#[derive(Debug)]
struct ServiceTask {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// Runs the declared services until [`Supervisor::stop_all`].
#[derive(Debug)]
pub struct Supervisor {
    shared: Arc<Shared>,
    order: Vec<String>,
    tasks: BTreeMap<String, ServiceTask>,
}

/// What a service task needs.
#[derive(Debug, Clone)]
struct ServiceContext {
    name: String,
    spec: ServiceSpec,
    options: SupervisorOptions,
    reaper: Reaper,
    shared: Arc<Shared>,
    group: Option<PathBuf>,
    log: SharedLog,
}

impl Supervisor {
    /// Validates `services` and starts them in dependency order: each
    /// service's first process is spawned before its dependents'. Errors
    /// are only declaration errors; a service that cannot start is retried
    /// and shown as such in its status.
    pub async fn start(
        services: &BTreeMap<String, ServiceSpec>,
        options: SupervisorOptions,
        reaper: Reaper,
    ) -> Result<Supervisor, SupervisorError> {
        let order = start_order(services)?;
        let shared = Arc::new(Shared::default());
        {
            let mut statuses = lock(&shared.services);
            for name in &order {
                statuses.insert(
                    name.clone(),
                    ServiceStatus {
                        name: name.clone(),
                        state: ServiceState::Pending,
                        pid: None,
                        restarts: 0,
                        last_exit: None,
                        last_error: None,
                        since: unix_now(),
                    },
                );
            }
        }
        let cgroups = if services.is_empty() {
            Cgroups { root: None }
        } else {
            Cgroups::prepare(&options.cgroup_root)
        };
        let mut tasks = BTreeMap::new();
        for name in &order {
            let Some(spec) = services.get(name) else {
                continue;
            };
            let log = match RotatingLog::open(&options.log_dir, name, options.log_cap) {
                Ok(log) => Some(log),
                Err(source) => {
                    let e = SupervisorError::Log {
                        service: name.clone(),
                        path: log_path(&options.log_dir, name),
                        source,
                    };
                    tracing::warn!(service = %name, error = %crate::error_chain(&e), "service output will be discarded");
                    None
                }
            };
            let context = ServiceContext {
                name: name.clone(),
                spec: spec.clone(),
                group: cgroups.create_group(name, &spec.limits),
                options: options.clone(),
                reaper: reaper.clone(),
                shared: shared.clone(),
                log: Arc::new(Mutex::new(log)),
            };
            let (stop_tx, stop_rx) = watch::channel(false);
            let (started_tx, started_rx) = oneshot::channel();
            let task = tokio::spawn(run_service(context, stop_rx, started_tx));
            // Dependents start only once this one has been spawned.
            let _ = started_rx.await;
            tasks.insert(
                name.clone(),
                ServiceTask {
                    stop: stop_tx,
                    task,
                },
            );
        }
        Ok(Supervisor {
            shared,
            order,
            tasks,
        })
    }

    pub fn handle(&self) -> SupervisorHandle {
        SupervisorHandle {
            shared: self.shared.clone(),
        }
    }

    /// Stops every service, dependents first, each with SIGTERM, the grace
    /// period, then SIGKILL.
    pub async fn stop_all(mut self) {
        for name in self.order.iter().rev() {
            if let Some(service) = self.tasks.remove(name) {
                let _ = service.stop.send(true);
                if let Err(e) = service.task.await {
                    tracing::error!(service = %name, error = %e, "service task failed");
                }
            }
        }
    }
}

/// A started process of a service.
#[derive(Debug)]
struct Running {
    pid: u32,
    exit: ExitReceiver,
    started: Instant,
    /// The tasks copying stdout and stderr into the log.
    pumps: Vec<JoinHandle<()>>,
}

impl Running {
    /// Lets the output written before the exit reach the log before the
    /// supervisor's own line about the exit. Bounded: something the
    /// service left running may hold the pipes open.
    async fn drain_output(&mut self) {
        let pumps = futures_util::future::join_all(self.pumps.iter_mut());
        let _ = tokio::time::timeout(OUTPUT_DRAIN_WAIT, pumps).await;
    }
}

fn spawn_process(context: &ServiceContext) -> Result<Running, SupervisorError> {
    let ServiceContext { name, spec, .. } = context;
    let mut command = std::process::Command::new(&spec.command[0]);
    command
        .args(&spec.command[1..])
        .env_clear()
        .env("PATH", DEFAULT_PATH)
        .envs(&spec.env)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    // Checked when the services were loaded; derived again here (cheap)
    // rather than stored beside the spec.
    let confinement = crate::node::confine::confinement(name, spec)?;
    crate::sys::confine(&mut command, confinement);
    let (mut child, exit) =
        context
            .reaper
            .spawn(&mut command)
            .map_err(|source| SupervisorError::Spawn {
                service: name.clone(),
                program: spec.command[0].clone(),
                args: spec.command.len() - 1,
                source,
            })?;
    let pid = child.id();
    if let Some(group) = &context.group {
        add_to_group(group, pid, name);
    }
    let pipes = [
        child.stdout.take().map(OwnedFd::from),
        child.stderr.take().map(OwnedFd::from),
    ];
    let pumps = pipes
        .into_iter()
        .flatten()
        .map(|fd| tokio::spawn(pump_output(fd, context.log.clone(), name.clone())))
        .collect();
    Ok(Running {
        pid,
        exit,
        started: Instant::now(),
        pumps,
    })
}

/// Signals the service's process group (the service and what it forked).
fn signal_group(pid: u32, signal: Signal, service: &str) {
    // A pid that does not fit would wrap to a negative "group"; never send that.
    let Ok(raw) = i32::try_from(pid) else {
        tracing::warn!(service, pid, %signal, "pid out of range; signal not sent");
        return;
    };
    if let Err(e) = killpg(Pid::from_raw(raw), signal) {
        if e != nix::errno::Errno::ESRCH {
            tracing::warn!(service, pid, %signal, error = %e, "signal not sent");
        }
    }
}

async fn stop_process(context: &ServiceContext, running: &mut Running) -> Option<ExitInfo> {
    let name = context.name.as_str();
    tracing::info!(service = name, pid = running.pid, "stopping");
    signal_group(running.pid, Signal::SIGTERM, name);
    if let Ok(exit) = tokio::time::timeout(context.options.stop_grace, &mut running.exit).await {
        signal_group(running.pid, Signal::SIGKILL, name);
        return exit.ok();
    }
    tracing::warn!(service = name, pid = running.pid, grace = ?context.options.stop_grace, "did not stop in time; killing");
    signal_group(running.pid, Signal::SIGKILL, name);
    if let Some(group) = &context.group {
        let _ = std::fs::write(group.join("cgroup.kill"), "1");
    }
    tokio::time::timeout(KILL_WAIT, &mut running.exit)
        .await
        .ok()
        .and_then(Result::ok)
}

async fn run_service(
    context: ServiceContext,
    mut stop: watch::Receiver<bool>,
    started: oneshot::Sender<()>,
) {
    let name = context.name.clone();
    let shared = context.shared.clone();
    let mut backoff = Backoff::new(context.options.backoff);
    let mut started = Some(started);
    let mut first = true;
    loop {
        if !first {
            shared.update(&name, |s| s.restarts += 1);
        }
        first = false;
        let outcome = spawn_process(&context);
        if let Some(tx) = started.take() {
            let _ = tx.send(());
        }
        let (exit, ran_for) = match outcome {
            Ok(mut running) => {
                tracing::info!(service = %name, pid = running.pid, "started");
                write_log(
                    &context.log,
                    &name,
                    format!("-- ballast: started, pid {} --\n", running.pid).as_bytes(),
                );
                shared.update(&name, |s| {
                    s.state = ServiceState::Running;
                    s.pid = Some(running.pid);
                    s.last_error = None;
                });
                tokio::select! {
                    exit = &mut running.exit => {
                        let exit = exit.unwrap_or(ExitInfo { code: None, signal: None });
                        running.drain_output().await;
                        (Ok(exit), running.started.elapsed())
                    }
                    _ = stop.changed() => {
                        shared.update(&name, |s| s.state = ServiceState::Stopping);
                        let exit = stop_process(&context, &mut running).await;
                        running.drain_output().await;
                        if let Some(exit) = &exit {
                            write_log(&context.log, &name, format!("-- ballast: stopped, {exit} --\n").as_bytes());
                        }
                        shared.update(&name, |s| {
                            s.state = ServiceState::Stopped;
                            s.pid = None;
                            s.last_exit = exit.or(s.last_exit.take());
                        });
                        tracing::info!(service = %name, "stopped");
                        remove_group(&context);
                        return;
                    }
                }
            }
            Err(e) => {
                let message = crate::error_chain(&e);
                tracing::error!(service = %name, error = %message, "not started");
                (Err(message), Duration::ZERO)
            }
        };
        let success = matches!(&exit, Ok(exit) if exit.success());
        match &exit {
            Ok(exit) => {
                tracing::warn!(service = %name, %exit, ran_for = ?ran_for, "service ended");
                write_log(
                    &context.log,
                    &name,
                    format!("-- ballast: {exit} --\n").as_bytes(),
                );
            }
            Err(message) => write_log(
                &context.log,
                &name,
                format!("-- ballast: not started: {message} --\n").as_bytes(),
            ),
        }
        let restart = match context.spec.restart {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => !success,
            RestartPolicy::Never => false,
        };
        shared.update(&name, |s| {
            s.pid = None;
            match exit {
                Ok(exit) => s.last_exit = Some(exit),
                Err(message) => s.last_error = Some(message),
            }
            s.state = match (restart, success) {
                (true, _) => ServiceState::Backoff,
                (false, true) => ServiceState::Exited,
                (false, false) => ServiceState::Failed,
            };
        });
        if !restart {
            return;
        }
        let delay = backoff.delay_after(ran_for);
        tracing::info!(service = %name, delay = ?delay, "restarting after a delay");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.changed() => {
                shared.update(&name, |s| s.state = ServiceState::Stopped);
                remove_group(&context);
                return;
            }
        }
    }
}

fn remove_group(context: &ServiceContext) {
    if let Some(group) = &context.group {
        if let Err(e) = std::fs::remove_dir(group) {
            tracing::debug!(service = %context.name, path = %group.display(), error = %e, "cgroup not removed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(command: &[&str]) -> ServiceSpec {
        ServiceSpec {
            command: command.iter().map(|s| s.to_string()).collect(),
            ..ServiceSpec::default()
        }
    }

    fn options(dir: &Path) -> SupervisorOptions {
        SupervisorOptions {
            log_dir: dir.join("log"),
            log_cap: DEFAULT_LOG_CAP,
            // Not a cgroup2 mount: placement is skipped with a warning.
            cgroup_root: dir.join("cgroup/ballast"),
            backoff: BackoffPolicy {
                initial: Duration::from_millis(100),
                max: Duration::from_millis(400),
                reset_after: Duration::from_millis(300),
            },
            stop_grace: Duration::from_secs(2),
        }
    }

    async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[test]
    fn declarations_parse_from_toml() {
        #[derive(Deserialize)]
        struct Config {
            services: BTreeMap<String, ServiceSpec>,
        }
        let text = r#"
[services.web]
command = ["/usr/bin/web", "--port", "80"]
env = { RUST_LOG = "info" }
after = ["db"]
restart = "on-failure"
limits = { memory_max = 268435456, cpu_weight = 200, cpu_max = 0.5, pids_max = 64 }
[services.db]
command = ["db"]
"#;
        let config: Config = toml::from_str(text).unwrap();
        let web = &config.services["web"];
        assert_eq!(web.restart, RestartPolicy::OnFailure);
        assert_eq!(config.services["db"].restart, RestartPolicy::Always);
        assert_eq!(
            web.limits.cgroup_files(),
            vec![
                ("memory.max", "268435456".to_owned()),
                ("cpu.weight", "200".to_owned()),
                ("cpu.max", "50000 100000".to_owned()),
                ("pids.max", "64".to_owned()),
            ]
        );
        let err =
            toml::from_str::<Config>("[services.a]\ncommand = [\"x\"]\nrestrat = \"never\"\n")
                .err()
                .unwrap()
                .to_string();
        assert!(err.contains("restrat"), "{err}");
        let err =
            toml::from_str::<Config>("[services.a]\ncommand = [\"x\"]\nrestart = \"sometimes\"\n")
                .err()
                .unwrap()
                .to_string();
        assert!(err.contains("sometimes"), "{err}");
    }

    #[test]
    fn start_order_puts_dependencies_first_and_names_bad_declarations() {
        let mut services = BTreeMap::new();
        services.insert(
            "app".to_owned(),
            ServiceSpec {
                after: vec!["db".into(), "cache".into()],
                ..spec(&["app"])
            },
        );
        services.insert(
            "db".to_owned(),
            ServiceSpec {
                after: vec!["disk".into()],
                ..spec(&["db"])
            },
        );
        services.insert("disk".to_owned(), spec(&["disk"]));
        services.insert("cache".to_owned(), spec(&["cache"]));
        services.insert("alone".to_owned(), spec(&["alone"]));
        let order = start_order(&services).unwrap();
        let pos = |n: &str| order.iter().position(|o| o == n).unwrap();
        assert!(pos("disk") < pos("db") && pos("db") < pos("app") && pos("cache") < pos("app"));
        assert_eq!(order.len(), 5);

        let mut unknown = services.clone();
        unknown.insert(
            "x".into(),
            ServiceSpec {
                after: vec!["nope".into()],
                ..spec(&["x"])
            },
        );
        let err = start_order(&unknown).unwrap_err().to_string();
        assert!(err.contains("x") && err.contains("nope"), "{err}");

        let mut cycle = services.clone();
        cycle.insert(
            "disk".into(),
            ServiceSpec {
                after: vec!["app".into()],
                ..spec(&["disk"])
            },
        );
        let err = start_order(&cycle).unwrap_err();
        assert!(
            matches!(err, SupervisorError::DependencyCycle { .. }),
            "{err}"
        );
        let text = err.to_string();
        assert!(text.contains("app -> ") && text.contains("disk"), "{text}");

        let mut selfloop = BTreeMap::new();
        selfloop.insert(
            "me".to_owned(),
            ServiceSpec {
                after: vec!["me".into()],
                ..spec(&["me"])
            },
        );
        assert!(start_order(&selfloop)
            .unwrap_err()
            .to_string()
            .contains("me -> me"));

        for bad in ["", "..", "a/b", "a b"] {
            let mut s = BTreeMap::new();
            s.insert(bad.to_owned(), spec(&["x"]));
            assert!(
                matches!(start_order(&s), Err(SupervisorError::InvalidName { .. })),
                "{bad:?}"
            );
        }
        let mut empty = BTreeMap::new();
        empty.insert("e".to_owned(), spec(&[]));
        assert!(start_order(&empty)
            .unwrap_err()
            .to_string()
            .contains("service e: command is empty"));
        let mut limit = BTreeMap::new();
        limit.insert(
            "l".to_owned(),
            ServiceSpec {
                limits: Limits {
                    cpu_weight: Some(0),
                    ..Limits::default()
                },
                ..spec(&["x"])
            },
        );
        let err = start_order(&limit).unwrap_err().to_string();
        assert!(err.contains("service l: limits.cpu_weight"), "{err}");
    }

    #[test]
    fn backoff_doubles_to_the_cap_and_resets_after_a_long_run() {
        let mut b = Backoff::new(BackoffPolicy::default());
        let short = Duration::from_secs(1);
        let delays: Vec<u64> = (0..8).map(|_| b.delay_after(short).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(b.delay_after(Duration::from_secs(30)).as_secs(), 1);
        assert_eq!(b.delay_after(short).as_secs(), 2);
    }

    #[test]
    fn cgroup_groups_get_their_limit_files() {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits {
            memory_max: Some(1 << 20),
            pids_max: Some(10),
            cpu_max: Some(2.0),
            cpu_weight: None,
        };
        let group = write_group(dir.path(), "svc", &limits).unwrap();
        let read = |f: &str| std::fs::read_to_string(group.join(f)).unwrap();
        assert_eq!(read("memory.max"), "1048576");
        assert_eq!(read("pids.max"), "10");
        assert_eq!(read("cpu.max"), "200000 100000");
        assert!(!group.join("cpu.weight").exists());
        add_to_group(&group, 42, "svc");
        assert_eq!(read("cgroup.procs"), "42");
        // A plain directory is not cgroup2: the supervisor runs without.
        assert!(Cgroups::prepare(&dir.path().join("ballast")).root.is_none());
    }

    #[test]
    fn logs_rotate_at_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = RotatingLog::open(dir.path(), "svc", 100).unwrap();
        for i in 0..30 {
            log.write(format!("line {i:04}\n").as_bytes()).unwrap();
        }
        let current = std::fs::read_to_string(log_path(dir.path(), "svc")).unwrap();
        let previous = std::fs::read_to_string(rotated_log_path(dir.path(), "svc")).unwrap();
        assert!(current.len() <= 100 && previous.len() <= 100);
        assert!(current.ends_with("line 0029\n"), "{current}");
        assert!(previous.ends_with(&format!("line {:04}\n", 29 - current.lines().count())));
        // Reopening continues the same file and counts its size.
        let mut log = RotatingLog::open(dir.path(), "svc", 100).unwrap();
        assert_eq!(log.size, current.len() as u64);
        log.write(&[b'x'; 500]).unwrap();
        assert_eq!(
            std::fs::metadata(log_path(dir.path(), "svc"))
                .unwrap()
                .len(),
            100
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn failing_service_restarts_with_backoff() {
        let dir = tempfile::tempdir().unwrap();
        let reaper = Reaper::start(ReapScope::OwnChildren).unwrap();
        let mut services = BTreeMap::new();
        services.insert(
            "fail".to_owned(),
            spec(&["sh", "-c", "echo out; echo err >&2; exit 3"]),
        );
        let supervisor = Supervisor::start(&services, options(dir.path()), reaper)
            .await
            .unwrap();
        let handle = supervisor.handle();
        let began = Instant::now();
        // Delays 100, 200, 400, 400 ms: the 4th restart comes after ~1.1 s.
        wait_until("four restarts", || {
            handle.status("fail").unwrap().restarts >= 4
        })
        .await;
        let elapsed = began.elapsed();
        assert!(
            elapsed >= Duration::from_millis(1000),
            "restarted too fast: {elapsed:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        let status = handle.status("fail").unwrap();
        assert!(status.restarts <= 5, "{status:?}");
        assert_eq!(
            status.last_exit,
            Some(ExitInfo {
                code: Some(3),
                signal: None
            })
        );
        supervisor.stop_all().await;
        assert_eq!(handle.status("fail").unwrap().state, ServiceState::Stopped);
        let log = std::fs::read_to_string(log_path(&dir.path().join("log"), "fail")).unwrap();
        assert!(log.contains("out\n") && log.contains("err\n"), "{log}");
        assert!(log.contains("-- ballast: exited with code 3 --"), "{log}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn backoff_resets_after_a_long_enough_run() {
        let dir = tempfile::tempdir().unwrap();
        let reaper = Reaper::start(ReapScope::OwnChildren).unwrap();
        let mut services = BTreeMap::new();
        // Runs 0.4 s (past reset_after = 0.3 s) then fails: every delay is
        // 0.1 s instead of doubling up to 1.6 s.
        services.insert("slow".to_owned(), spec(&["sh", "-c", "sleep 0.4; exit 1"]));
        let mut opts = options(dir.path());
        opts.backoff.max = Duration::from_secs(5);
        let supervisor = Supervisor::start(&services, opts, reaper).await.unwrap();
        let handle = supervisor.handle();
        let began = Instant::now();
        wait_until("four restarts", || {
            handle.status("slow").unwrap().restarts >= 4
        })
        .await;
        // With the reset: 4 * (0.4 + 0.1) = 2.0 s; without it
        // 4 * 0.4 + 0.1 + 0.2 + 0.4 + 0.8 = 3.1 s.
        let elapsed = began.elapsed();
        assert!(
            elapsed < Duration::from_millis(2600),
            "backoff did not reset: {elapsed:?}"
        );
        supervisor.stop_all().await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn restart_policies_decide_after_an_exit() {
        let dir = tempfile::tempdir().unwrap();
        let reaper = Reaper::start(ReapScope::OwnChildren).unwrap();
        let mut services = BTreeMap::new();
        services.insert(
            "ok-once".to_owned(),
            ServiceSpec {
                restart: RestartPolicy::OnFailure,
                ..spec(&["true"])
            },
        );
        services.insert(
            "fail-once".to_owned(),
            ServiceSpec {
                restart: RestartPolicy::Never,
                ..spec(&["false"])
            },
        );
        services.insert(
            "missing".to_owned(),
            ServiceSpec {
                restart: RestartPolicy::Never,
                ..spec(&["/nonexistent/program", "--token=hunter2"])
            },
        );
        let supervisor = Supervisor::start(&services, options(dir.path()), reaper)
            .await
            .unwrap();
        let handle = supervisor.handle();
        let settled = |name: &str, state| handle.status(name).unwrap().state == state;
        wait_until("ok-once to exit", || {
            settled("ok-once", ServiceState::Exited)
        })
        .await;
        wait_until("fail-once to fail", || {
            settled("fail-once", ServiceState::Failed)
        })
        .await;
        wait_until("missing to fail", || {
            settled("missing", ServiceState::Failed)
        })
        .await;
        let missing = handle.status("missing").unwrap().last_error.unwrap();
        assert!(
            missing.contains("service missing: starting \"/nonexistent/program\" with 1 arguments"),
            "{missing}"
        );
        // Arguments may be secrets and /status is readable without them.
        assert!(!missing.contains("hunter2"), "{missing}");
        assert_eq!(handle.status("ok-once").unwrap().restarts, 0);
        assert_eq!(
            handle.status("fail-once").unwrap().last_exit.unwrap().code,
            Some(1)
        );
        supervisor.stop_all().await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn services_start_in_dependency_order_and_stop_in_reverse() {
        let dir = tempfile::tempdir().unwrap();
        let trace = dir.path().join("trace");
        let reaper = Reaper::start(ReapScope::OwnChildren).unwrap();
        let script = |name: &str| {
            format!(
                "echo start {name} >> {t}; trap 'echo stop {name} >> {t}; exit 0' TERM; while :; do sleep 0.05; done",
                t = trace.display()
            )
        };
        let mut services = BTreeMap::new();
        for (name, after) in [("c", vec!["b"]), ("b", vec!["a"]), ("a", vec![])] {
            services.insert(
                name.to_owned(),
                ServiceSpec {
                    after: after.into_iter().map(String::from).collect(),
                    ..spec(&["sh", "-c", &script(name)])
                },
            );
        }
        let supervisor = Supervisor::start(&services, options(dir.path()), reaper)
            .await
            .unwrap();
        let handle = supervisor.handle();
        wait_until("three starts", || {
            std::fs::read_to_string(&trace)
                .unwrap_or_default()
                .lines()
                .count()
                == 3
        })
        .await;
        assert!(handle
            .statuses()
            .iter()
            .all(|s| s.state == ServiceState::Running && s.pid.is_some()));
        supervisor.stop_all().await;
        let lines: Vec<String> = std::fs::read_to_string(&trace)
            .unwrap()
            .lines()
            .map(String::from)
            .collect();
        // Each start is spawned before the next, but the shells may write
        // their lines in any order; the stops are strictly sequential.
        let mut starts = lines[..3].to_vec();
        starts.sort();
        assert_eq!(starts, ["start a", "start b", "start c"]);
        assert_eq!(lines[3..], ["stop c", "stop b", "stop a"]);
        for s in handle.statuses() {
            assert_eq!((s.state, s.pid), (ServiceState::Stopped, None), "{s:?}");
            assert_eq!(s.last_exit.as_ref().and_then(|e| e.code), Some(0), "{s:?}");
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_service_ignoring_sigterm_is_killed_after_the_grace() {
        let dir = tempfile::tempdir().unwrap();
        let reaper = Reaper::start(ReapScope::OwnChildren).unwrap();
        let mut services = BTreeMap::new();
        services.insert(
            "stubborn".to_owned(),
            spec(&[
                "sh",
                "-c",
                "trap '' TERM; echo ready; while :; do sleep 0.05; done",
            ]),
        );
        let mut opts = options(dir.path());
        opts.stop_grace = Duration::from_millis(300);
        let log = log_path(&opts.log_dir, "stubborn");
        let supervisor = Supervisor::start(&services, opts, reaper).await.unwrap();
        let handle = supervisor.handle();
        wait_until("the trap", || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("ready")
        })
        .await;
        let pid = handle.status("stubborn").unwrap().pid.unwrap();
        let began = Instant::now();
        supervisor.stop_all().await;
        assert!(began.elapsed() >= Duration::from_millis(300));
        let status = handle.status("stubborn").unwrap();
        assert_eq!(status.last_exit.unwrap().signal.as_deref(), Some("SIGKILL"));
        // The rest of the process group is gone too (or a zombie waiting
        // for whoever adopted it).
        wait_until("the group to die", || live_group_members(pid) == 0).await;
    }

    fn live_group_members(pgid: u32) -> usize {
        let mut live = 0;
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            let Some((_, rest)) = stat.rsplit_once(") ") else {
                continue;
            };
            let fields: Vec<&str> = rest.split_whitespace().collect();
            if fields.get(2) == Some(&pgid.to_string().as_str()) && fields[0] != "Z" {
                live += 1;
            }
        }
        live
    }

    #[tokio::test(flavor = "current_thread")]
    async fn service_output_is_capped_and_rotated() {
        let dir = tempfile::tempdir().unwrap();
        let reaper = Reaper::start(ReapScope::OwnChildren).unwrap();
        let mut services = BTreeMap::new();
        services.insert(
            "chatty".to_owned(),
            ServiceSpec {
                restart: RestartPolicy::Never,
                ..spec(&[
                    "sh",
                    "-c",
                    "i=0; while [ $i -lt 500 ]; do echo \"line $i of chatter\"; i=$((i+1)); done",
                ])
            },
        );
        let mut opts = options(dir.path());
        opts.log_cap = 2048;
        let log_dir = opts.log_dir.clone();
        let supervisor = Supervisor::start(&services, opts, reaper).await.unwrap();
        let handle = supervisor.handle();
        wait_until("the end", || {
            handle.status("chatty").unwrap().state == ServiceState::Exited
        })
        .await;
        wait_until("the last line", || {
            std::fs::read_to_string(log_path(&log_dir, "chatty"))
                .unwrap_or_default()
                .contains("exited with code 0")
        })
        .await;
        let current = std::fs::read_to_string(log_path(&log_dir, "chatty")).unwrap();
        let previous = std::fs::read_to_string(rotated_log_path(&log_dir, "chatty")).unwrap();
        assert!(current.len() <= 2048 && previous.len() <= 2048);
        assert!(current.contains("line 499 of chatter\n"), "{current}");
        assert!(
            !previous.contains("line 0 of chatter\n"),
            "oldest output should be gone"
        );
        supervisor.stop_all().await;
    }

    /// No timer backs SIGCHLD up: exits that happen before the reaper's
    /// task first runs, and many at once (their signals merge), are all
    /// collected well within the old 2 s fallback poll.
    #[tokio::test(flavor = "current_thread")]
    async fn sigchld_alone_collects_every_exit() {
        let reaper = Reaper::start(ReapScope::OwnChildren).unwrap();
        let exits: Vec<ExitReceiver> = (0..20)
            .map(|i| {
                let mut command = std::process::Command::new("sh");
                command
                    .args(["-c", &format!("exit {}", i % 3)])
                    .stdin(Stdio::null());
                reaper.spawn(&mut command).unwrap().1
            })
            .collect();
        let all = futures_util::future::join_all(exits);
        let ended = tokio::time::timeout(Duration::from_millis(1500), all)
            .await
            .expect("an exit was missed");
        for (i, exit) in ended.into_iter().enumerate() {
            assert_eq!(exit.unwrap().code, Some(i32::try_from(i % 3).unwrap()));
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn reaper_hands_over_statuses_reaped_elsewhere() {
        let reaper = Reaper::start(ReapScope::OwnChildren).unwrap();
        let (child, exit) = reaper
            .spawn(std::process::Command::new("true").stdin(Stdio::null()))
            .unwrap();
        let pid = Pid::from_raw(i32::try_from(child.id()).unwrap());
        // Reap it the way PID 1 would, before the reaper's own task runs.
        let status = waitpid(pid, None).unwrap();
        assert!(reaper.deliver(status));
        assert!(!reaper.deliver(WaitStatus::Exited(Pid::from_raw(1), 0)));
        assert_eq!(
            exit.await.unwrap(),
            ExitInfo {
                code: Some(0),
                signal: None
            }
        );
    }
}
