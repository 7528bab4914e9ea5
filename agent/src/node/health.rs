//! Node health checks: owns the `[health]` configuration, the built-in
//! checks (STATE mounted read-write, network up, services running, clock
//! sane and, when NTP servers are known, synchronised), the user checks (a command's exit code or an HTTP GET answering
//! 2xx, each with a timeout) and the [`HealthReport`] that `/readyz`,
//! `/status`, `/metrics` and the update gate read.
//!
//! The checks run in one task, the [`HealthMonitor`]: at start, then every
//! `[health] interval`, and at once when the update gate asks for a fresh
//! report ([`HealthMonitor::run_now`]). Readers get the last report and its
//! age, so a scrape or a polling load balancer never runs a user's command
//! or HTTP check, and checks never pile up behind slow requests.
//!
//! User check commands are spawned through the supervisor's [`Reaper`] so
//! that PID 1's `waitpid(-1)` never steals their exit statuses.

use std::collections::BTreeSet;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, oneshot, watch};

use crate::node::supervisor::{Reaper, ServiceState, SupervisorHandle};

/// How long a user check may take when its `timeout` is not set.
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the checks run when `[health] interval` is not set.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(15);
/// The shortest `[health] interval`: user checks may spawn processes.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// The clock is "sane" when it is not before this, unless the build says
/// otherwise through `SOURCE_DATE_EPOCH` (2026-01-01T00:00:00Z).
const FALLBACK_BUILD_EPOCH: u64 = 1_767_225_600;
/// How much of a failing command's stderr goes into its message.
const MAX_COMMAND_OUTPUT: u64 = 512;

/// Names of the built-in checks, which user checks may not reuse.
pub const BUILTIN_CHECKS: &[&str] = &["state-writable", "network", "services", "clock"];

#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("health check {check:?}: {detail}")]
    InvalidCheck { check: String, detail: String },
    #[error("health.interval = {value:?}: must be at least {minimum}")]
    IntervalTooShort { value: String, minimum: String },
}

/// The `[health]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Time between two runs of the checks; readers get the last report.
    #[serde(default = "default_interval", with = "crate::duration")]
    pub interval: Duration,
    /// `[[health.checks]]`.
    #[serde(default)]
    pub checks: Vec<CheckSpec>,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            interval: DEFAULT_INTERVAL,
            checks: Vec::new(),
        }
    }
}

fn default_interval() -> Duration {
    DEFAULT_INTERVAL
}

/// One user check: exactly one of `command` and `http`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckSpec {
    pub name: String,
    /// Passes when the program exits 0.
    pub command: Option<Vec<String>>,
    /// `http://HOST[:PORT]/PATH`; passes on a 2xx answer to a GET.
    pub http: Option<String>,
    /// Like `"5s"` or `"500ms"`.
    #[serde(default = "default_timeout", with = "crate::duration")]
    pub timeout: Duration,
}

fn default_timeout() -> Duration {
    DEFAULT_CHECK_TIMEOUT
}

impl HealthConfig {
    /// Checks what TOML types cannot: one kind per check, usable URLs,
    /// unique names.
    pub fn validate(&self) -> Result<(), HealthError> {
        if self.interval < MIN_INTERVAL {
            return Err(HealthError::IntervalTooShort {
                value: humantime::format_duration(self.interval).to_string(),
                minimum: humantime::format_duration(MIN_INTERVAL).to_string(),
            });
        }
        let mut names = BTreeSet::new();
        for check in &self.checks {
            let invalid = |detail: &str| HealthError::InvalidCheck {
                check: check.name.clone(),
                detail: detail.to_owned(),
            };
            if check.name.is_empty() {
                return Err(invalid("name is empty"));
            }
            if BUILTIN_CHECKS.contains(&check.name.as_str()) {
                return Err(invalid("name is taken by a built-in check"));
            }
            if !names.insert(check.name.as_str()) {
                return Err(invalid("name is used twice"));
            }
            if check.timeout.is_zero() {
                return Err(invalid("timeout must be above 0"));
            }
            match (&check.command, &check.http) {
                (Some(command), None) => {
                    if command.first().is_none_or(|p| p.is_empty()) {
                        return Err(invalid("command is empty"));
                    }
                }
                (None, Some(url)) => {
                    parse_http_url(url)
                        .map_err(|detail| invalid(&ballast_updater::fetch::redact_url(&detail)))?;
                }
                _ => return Err(invalid("set exactly one of `command` and `http`")),
            }
        }
        Ok(())
    }
}

/// Where the built-in checks look. Defaults are the node's real paths.
#[derive(Debug, Clone)]
pub struct BuiltinSources {
    /// `/proc/self/mountinfo`.
    pub mountinfo: PathBuf,
    /// The STATE mount point, `/var`.
    pub state_mount: PathBuf,
    /// The clock is not sane before this.
    pub build_time: SystemTime,
    /// The SNTP client's state; `None` when it does not run.
    pub time_sync: Option<watch::Receiver<TimeSync>>,
    /// Results found once at boot by other parts of the agent, shown after
    /// the built-ins in every report (the Kubernetes integration's
    /// `kubelet`: installed or not).
    pub at_boot: Vec<CheckResult>,
}

/// Where the SNTP client stands, for the clock check.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum TimeSync {
    /// No server configured or offered by DHCP: nothing to wait for.
    #[default]
    NoServers,
    /// Servers are known, none has given a usable answer yet.
    Unsynchronised { servers: usize, last_error: String },
    /// The clock was set or slewed from `server`.
    Synchronised { server: String, offset_ms: i64 },
}

impl Default for BuiltinSources {
    fn default() -> Self {
        BuiltinSources {
            mountinfo: "/proc/self/mountinfo".into(),
            state_mount: "/var".into(),
            build_time: build_time_floor(),
            time_sync: None,
            at_boot: Vec::new(),
        }
    }
}

/// `SOURCE_DATE_EPOCH` at build time, else a fixed floor.
pub fn build_time_floor() -> SystemTime {
    let epoch = option_env!("SOURCE_DATE_EPOCH")
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(FALLBACK_BUILD_EPOCH);
    SystemTime::UNIX_EPOCH + Duration::from_secs(epoch)
}

/// The result of every check at one moment.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HealthReport {
    /// All checks passed.
    pub ready: bool,
    pub checks: Vec<CheckResult>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckResult {
    pub name: String,
    pub ok: bool,
    /// What was seen, for people; never secrets (no command output on
    /// success, a bounded excerpt of stderr on failure).
    pub message: String,
    pub duration_ms: u64,
}

/// Runs the checks; cheap to keep and call again.
#[derive(Debug, Clone)]
pub struct HealthChecker {
    checks: Vec<CheckSpec>,
    sources: BuiltinSources,
    supervisor: Option<SupervisorHandle>,
    reaper: Reaper,
}

impl HealthChecker {
    pub fn new(
        config: &HealthConfig,
        sources: BuiltinSources,
        supervisor: Option<SupervisorHandle>,
        reaper: Reaper,
    ) -> Result<Self, HealthError> {
        config.validate()?;
        Ok(HealthChecker {
            checks: config.checks.clone(),
            sources,
            supervisor,
            reaper,
        })
    }

    /// Runs every check (user checks concurrently, each bounded by its
    /// timeout) and reports; built-ins come first.
    pub async fn run(&self) -> HealthReport {
        let mut checks = vec![
            timed("state-writable", || {
                state_writable(&self.sources.mountinfo, &self.sources.state_mount)
            }),
            timed("network", || network_up(&system_interfaces())),
            timed("services", || {
                services_running(self.supervisor.as_ref().map(|s| s.statuses()).as_deref())
            }),
            timed("clock", || {
                clock_check(
                    SystemTime::now(),
                    self.sources.build_time,
                    self.sources.time_sync.as_ref().map(|r| r.borrow().clone()),
                )
            }),
        ];
        checks.extend(self.sources.at_boot.iter().cloned());
        let user = self.checks.iter().map(|check| self.run_user_check(check));
        checks.extend(futures_util::future::join_all(user).await);
        HealthReport {
            ready: checks.iter().all(|c| c.ok),
            checks,
        }
    }

    async fn run_user_check(&self, check: &CheckSpec) -> CheckResult {
        let began = Instant::now();
        let outcome = match (&check.command, &check.http) {
            (Some(command), _) => run_command(&self.reaper, command, check.timeout).await,
            (None, Some(url)) => match tokio::time::timeout(check.timeout, http_get(url)).await {
                // The URL may carry user info; messages reach /status.
                Ok(outcome) => outcome.map_err(|e| ballast_updater::fetch::redact_url(&e)),
                Err(_) => Err(format!(
                    "no answer within {}",
                    humantime::format_duration(check.timeout)
                )),
            },
            (None, None) => Err("neither command nor http is set".to_owned()),
        };
        let result = finish(&check.name, outcome, began);
        if !result.ok {
            tracing::debug!(check = %result.name, message = %result.message, "health check failed");
        }
        result
    }
}

/// A report and when its run began.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HealthSnapshot {
    /// When this run of the checks began (wall clock, RFC 3339).
    #[serde(serialize_with = "rfc3339")]
    pub checked_at: SystemTime,
    /// Milliseconds since then, at the moment the snapshot is shown.
    #[serde(rename = "age_ms", serialize_with = "age_ms")]
    began: Instant,
    #[serde(flatten)]
    pub report: HealthReport,
}

impl HealthSnapshot {
    /// How old the report is (monotonic: clock steps do not change it).
    pub fn age(&self) -> Duration {
        self.began.elapsed()
    }
}

fn rfc3339<S: serde::Serializer>(at: &SystemTime, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(&humantime::format_rfc3339_millis(*at))
}

fn age_ms<S: serde::Serializer>(began: &Instant, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_u64(u64::try_from(began.elapsed().as_millis()).unwrap_or(u64::MAX))
}

/// The latest snapshot, `None` until the first run ends.
type Latest = Option<Arc<HealthSnapshot>>;

/// Handle on the one task that runs the checks; cheap to clone. The task
/// ends when the last handle is dropped.
#[derive(Debug, Clone)]
pub struct HealthMonitor {
    latest: watch::Receiver<Latest>,
    requests: mpsc::Sender<oneshot::Sender<Arc<HealthSnapshot>>>,
    /// Runs the checks in the caller's task if the monitor's task is gone
    /// (it panicked), so the update gate never waits on nothing.
    checker: HealthChecker,
}

impl HealthMonitor {
    /// Starts the task: it runs the checks at once, then `interval` after
    /// each run ends, and whenever [`run_now`](Self::run_now) asks. Call
    /// inside the tokio runtime.
    pub fn start(checker: HealthChecker, interval: Duration) -> Self {
        let (publish, latest) = watch::channel(None);
        // Requests that arrive during a run wait for the next one: a few
        // slots are plenty, senders beyond them wait their turn.
        let (requests, queue) = mpsc::channel(8);
        tokio::spawn(monitor_loop(checker.clone(), interval, publish, queue));
        HealthMonitor {
            latest,
            requests,
            checker,
        }
    }

    /// The last report, without running anything.
    pub fn latest(&self) -> Option<Arc<HealthSnapshot>> {
        self.latest.borrow().clone()
    }

    /// Runs every check now and returns that report (published to the
    /// readers too). A run already under way when this is called does not
    /// count: the report comes from a run that began after the call.
    pub async fn run_now(&self) -> HealthReport {
        let (reply, answer) = oneshot::channel();
        if self.requests.send(reply).await.is_ok() {
            if let Ok(snapshot) = answer.await {
                return snapshot.report.clone();
            }
        }
        tracing::warn!("health monitor task is gone; running the checks in place");
        self.checker.run().await
    }
}

async fn monitor_loop(
    checker: HealthChecker,
    interval: Duration,
    publish: watch::Sender<Latest>,
    mut queue: mpsc::Receiver<oneshot::Sender<Arc<HealthSnapshot>>>,
) {
    let mut next = tokio::time::Instant::now();
    let mut was_ready = None;
    loop {
        let mut waiting = Vec::new();
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            request = queue.recv() => match request {
                Some(reply) => waiting.push(reply),
                // Every handle is gone: nobody reads reports any more.
                None => return,
            },
        }
        // One run answers every request made before it began.
        while let Ok(reply) = queue.try_recv() {
            waiting.push(reply);
        }
        let checked_at = SystemTime::now();
        let began = Instant::now();
        let report = checker.run().await;
        if was_ready != Some(report.ready) {
            let failing: Vec<&str> = report
                .checks
                .iter()
                .filter(|c| !c.ok)
                .map(|c| c.name.as_str())
                .collect();
            tracing::info!(ready = report.ready, failing = ?failing, "node readiness");
            was_ready = Some(report.ready);
        }
        let snapshot = Arc::new(HealthSnapshot {
            checked_at,
            began,
            report,
        });
        publish.send_replace(Some(snapshot.clone()));
        for reply in waiting {
            let _ = reply.send(snapshot.clone());
        }
        let now = tokio::time::Instant::now();
        // Bounded at load (crate::duration::MAX); checked all the same.
        next = now
            .checked_add(interval)
            .unwrap_or_else(|| now + crate::duration::MAX);
    }
}

fn finish(name: &str, outcome: Result<String, String>, began: Instant) -> CheckResult {
    let (ok, message) = match outcome {
        Ok(m) => (true, m),
        Err(m) => (false, m),
    };
    CheckResult {
        name: name.to_owned(),
        ok,
        message,
        duration_ms: u64::try_from(began.elapsed().as_millis()).unwrap_or(u64::MAX),
    }
}

fn timed(name: &str, check: impl FnOnce() -> Result<String, String>) -> CheckResult {
    let began = Instant::now();
    finish(name, check(), began)
}

/// One line of `/proc/self/mountinfo`, the parts the checks need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_point: PathBuf,
    pub fstype: String,
    pub source: String,
    /// Per-mount options (`rw`, `nosuid`, ...).
    pub options: Vec<String>,
    /// Filesystem (superblock) options.
    pub super_options: Vec<String>,
}

impl MountEntry {
    pub fn read_write(&self) -> bool {
        let ro = |opts: &[String]| opts.iter().any(|o| o == "ro");
        !ro(&self.options) && !ro(&self.super_options)
    }
}

/// Parses mountinfo text (see proc(5)); malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let fields: Vec<&str> = before.split(' ').collect();
            let mount_point = unescape_octal(fields.get(4)?);
            let options = fields.get(5)?.split(',').map(str::to_owned).collect();
            let mut tail = after.split(' ');
            let fstype = tail.next()?.to_owned();
            let source = unescape_octal(tail.next()?);
            let super_options = tail
                .next()
                .unwrap_or("")
                .split(',')
                .map(str::to_owned)
                .collect();
            Some(MountEntry {
                mount_point: PathBuf::from(mount_point),
                fstype,
                source,
                options,
                super_options,
            })
        })
        .collect()
}

/// Mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            let digits = std::str::from_utf8(&bytes[i + 1..i + 4]).unwrap_or("");
            if let Ok(value) = u8::from_str_radix(digits, 8) {
                out.push(value);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The last mount on `mount_point` (the one in effect) is read-write.
pub fn state_writable(mountinfo: &Path, mount_point: &Path) -> Result<String, String> {
    let text =
        std::fs::read_to_string(mountinfo).map_err(|e| format!("{}: {e}", mountinfo.display()))?;
    let entry = parse_mountinfo(&text)
        .into_iter()
        .rev()
        .find(|m| m.mount_point == mount_point)
        .ok_or_else(|| format!("nothing is mounted on {}", mount_point.display()))?;
    let description = format!(
        "{} ({}) on {}",
        entry.source,
        entry.fstype,
        mount_point.display()
    );
    if entry.read_write() {
        Ok(format!("{description} is read-write"))
    } else {
        Err(format!("{description} is read-only"))
    }
}

/// An interface address as the network check sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceAddress {
    pub interface: String,
    pub loopback: bool,
    pub up: bool,
    pub address: std::net::IpAddr,
}

/// Every address on the node's interfaces (getifaddrs, i.e. netlink).
pub fn system_interfaces() -> Vec<InterfaceAddress> {
    use nix::net::if_::InterfaceFlags;
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addrs
        .filter_map(|ifa| {
            let address = ifa.address?;
            let ip = if let Some(v4) = address.as_sockaddr_in() {
                std::net::IpAddr::V4(v4.ip())
            } else {
                std::net::IpAddr::V6(address.as_sockaddr_in6()?.ip())
            };
            Some(InterfaceAddress {
                interface: ifa.interface_name,
                loopback: ifa.flags.contains(InterfaceFlags::IFF_LOOPBACK),
                up: ifa.flags.contains(InterfaceFlags::IFF_UP)
                    && ifa.flags.contains(InterfaceFlags::IFF_RUNNING),
                address: ip,
            })
        })
        .collect()
}

/// Up when a non-loopback interface that is up has a routable address
/// (IPv6 link-local addresses do not count).
pub fn network_up(addresses: &[InterfaceAddress]) -> Result<String, String> {
    let usable: Vec<String> = addresses
        .iter()
        .filter(|a| a.up && !a.loopback && !a.address.is_loopback())
        .filter(|a| match a.address {
            std::net::IpAddr::V4(v4) => !v4.is_link_local() && !v4.is_unspecified(),
            std::net::IpAddr::V6(v6) => {
                (v6.segments()[0] & 0xffc0) != 0xfe80 && !v6.is_unspecified()
            }
        })
        .map(|a| format!("{} {}", a.interface, a.address))
        .collect();
    if usable.is_empty() {
        Err("no interface besides loopback is up with an address".to_owned())
    } else {
        Ok(usable.join(", "))
    }
}

/// Every service is running or finished successfully.
pub fn services_running(
    statuses: Option<&[crate::node::supervisor::ServiceStatus]>,
) -> Result<String, String> {
    let statuses = statuses.unwrap_or_default();
    let bad: Vec<String> = statuses
        .iter()
        .filter(|s| !matches!(s.state, ServiceState::Running | ServiceState::Exited))
        .map(|s| match &s.last_exit {
            Some(exit) => format!("{} is {} ({exit})", s.name, s.state),
            None => format!("{} is {}", s.name, s.state),
        })
        .collect();
    if bad.is_empty() {
        Ok(format!("{} service(s) running or done", statuses.len()))
    } else {
        Err(bad.join("; "))
    }
}

/// The wall clock is not before the build.
pub fn clock_sane(now: SystemTime, build_time: SystemTime) -> Result<String, String> {
    let show = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
    if now >= build_time {
        Ok(format!(
            "{} is after the build ({})",
            show(now),
            show(build_time)
        ))
    } else {
        Err(format!(
            "{} is before the build ({})",
            show(now),
            show(build_time)
        ))
    }
}

/// The clock check: sane (not before the build) and, when NTP servers
/// are known, synchronised with one of them. A node without any server
/// (none configured, none from DHCP) passes on sanity alone.
pub fn clock_check(
    now: SystemTime,
    build_time: SystemTime,
    sync: Option<TimeSync>,
) -> Result<String, String> {
    let sane = clock_sane(now, build_time)?;
    match sync.unwrap_or_default() {
        TimeSync::NoServers => Ok(format!("{sane}; no NTP server known")),
        TimeSync::Synchronised { server, offset_ms } => Ok(format!(
            "{sane}; synchronised with {server} (last offset {offset_ms} ms)"
        )),
        TimeSync::Unsynchronised {
            servers,
            last_error,
        } => Err(format!(
            "{sane}; not synchronised: none of {servers} NTP server(s) answered usably ({last_error})"
        )),
    }
}

/// Runs a check command; Ok when it exits 0 within `timeout`.
async fn run_command(
    reaper: &Reaper,
    argv: &[String],
    timeout: Duration,
) -> Result<String, String> {
    let mut command = std::process::Command::new(&argv[0]);
    command
        .args(&argv[1..])
        .env_clear()
        .env("PATH", crate::node::supervisor::DEFAULT_PATH)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0);
    let (mut child, mut exit) = reaper
        .spawn(&mut command)
        .map_err(|e| format!("starting {:?}: {e}", argv[0]))?;
    let pid = child.id();
    let stderr = child.stderr.take().map(std::os::fd::OwnedFd::from);
    let excerpt = tokio::spawn(async move {
        let mut text = Vec::new();
        if let Some(fd) = stderr {
            if let Ok(pipe) = tokio::net::unix::pipe::Receiver::from_owned_fd(fd) {
                let _ = pipe.take(MAX_COMMAND_OUTPUT).read_to_end(&mut text).await;
            }
        }
        String::from_utf8_lossy(&text).trim().to_owned()
    });
    let status = match tokio::time::timeout(timeout, &mut exit).await {
        Ok(status) => status.map_err(|_| "exit status lost".to_owned())?,
        Err(_) => {
            // A pid that does not fit would wrap to a negative "group";
            // never send that.
            if let Ok(pid) = i32::try_from(pid) {
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), exit).await;
            excerpt.abort();
            return Err(format!(
                "timed out after {}",
                humantime::format_duration(timeout)
            ));
        }
    };
    // The output usually ends with the process; do not wait on anything it
    // left running with the pipe open.
    let stderr_text = match tokio::time::timeout(Duration::from_millis(100), excerpt).await {
        Ok(Ok(text)) => text,
        _ => String::new(),
    };
    if status.success() {
        Ok(status.to_string())
    } else if stderr_text.is_empty() {
        Err(status.to_string())
    } else {
        Err(format!("{status}: {stderr_text}"))
    }
}

/// `(host, port, path-and-query)` of an `http://` URL.
fn parse_http_url(url: &str) -> Result<(String, u16, String), String> {
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!("{url:?}: only http:// URLs are supported"));
    }
    let host = uri
        .host()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| format!("{url:?} has no host"))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let path = uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_owned();
    Ok((host, uri.port_u16().unwrap_or(80), path))
}

/// One GET; Ok on 2xx.
async fn http_get(url: &str) -> Result<String, String> {
    let (host, port, path) = parse_http_url(url)?;
    let stream = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| format!("connecting to {host}:{port}: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake with {host}:{port}: {e}"))?;
    let driver = tokio::spawn(connection);
    let authority = if port == 80 {
        host.clone()
    } else {
        format!("{host}:{port}")
    };
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, authority)
        .header(hyper::header::USER_AGENT, "ballast-health")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = sender.send_request(request).await;
    driver.abort();
    let status = response.map_err(|e| format!("GET {url}: {e}"))?.status();
    if status.is_success() {
        Ok(format!("HTTP {status}"))
    } else {
        Err(format!("HTTP {status}"))
    }
}

/// Tests: a user check that appends a line to `runs` each time it runs.
#[cfg(test)]
pub fn counting_check(runs: &Path) -> CheckSpec {
    CheckSpec {
        name: "count".into(),
        command: Some(vec![
            "sh".into(),
            "-c".into(),
            format!("echo run >> {}", runs.display()),
        ]),
        http: None,
        timeout: Duration::from_secs(5),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::supervisor::{ExitInfo, ReapScope, ServiceStatus};

    const MOUNTINFO: &str = "\
22 1 0:21 / / ro,relatime shared:1 - erofs /dev/mapper/usr ro
25 22 0:23 / /proc rw,nosuid,nodev,noexec,relatime shared:5 - proc proc rw
30 22 8:4 / /var rw,relatime shared:9 - ext4 /dev/vda4 rw
31 22 8:1 / /my\\040disk rw,relatime - vfat /dev/vda1 rw,fmask=0077
";

    fn write_mountinfo(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("mountinfo");
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn mountinfo_decides_whether_state_is_writable() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_mountinfo(dir.path(), MOUNTINFO);
        let ok = state_writable(&path, Path::new("/var")).unwrap();
        assert!(ok.contains("/dev/vda4 (ext4)"), "{ok}");
        assert!(state_writable(&path, Path::new("/"))
            .unwrap_err()
            .contains("read-only"));
        assert!(state_writable(&path, Path::new("/my disk")).is_ok());
        assert!(state_writable(&path, Path::new("/srv"))
            .unwrap_err()
            .contains("nothing is mounted"));
        // A later read-only remount of /var hides the first one.
        let remounted = format!("{MOUNTINFO}40 30 8:4 / /var ro,relatime - ext4 /dev/vda4 rw\n");
        let path = write_mountinfo(dir.path(), &remounted);
        assert!(state_writable(&path, Path::new("/var")).is_err());
        // ext4 that remounted itself read-only after errors.
        let errors = "30 22 8:4 / /var rw - ext4 /dev/vda4 ro,errors=remount-ro\n";
        let path = write_mountinfo(dir.path(), errors);
        assert!(state_writable(&path, Path::new("/var")).is_err());
        assert!(state_writable(&dir.path().join("missing"), Path::new("/var")).is_err());
        // The real one parses.
        assert!(
            !parse_mountinfo(&std::fs::read_to_string("/proc/self/mountinfo").unwrap()).is_empty()
        );
    }

    #[test]
    fn network_needs_a_routable_address_off_loopback() {
        let addr = |interface: &str, loopback, up, ip: &str| InterfaceAddress {
            interface: interface.into(),
            loopback,
            up,
            address: ip.parse().unwrap(),
        };
        assert!(network_up(&[]).is_err());
        let lo = addr("lo", true, true, "127.0.0.1");
        let link_local = addr("eth0", false, true, "fe80::1");
        let down = addr("eth1", false, false, "10.0.2.15");
        assert!(network_up(&[lo.clone(), link_local.clone(), down]).is_err());
        let up = addr("eth0", false, true, "10.0.2.15");
        assert_eq!(network_up(&[lo, link_local, up]).unwrap(), "eth0 10.0.2.15");
        assert!(network_up(&[addr("eth0", false, true, "2001:db8::5")]).is_ok());
    }

    #[test]
    fn services_and_clock_checks() {
        let status = |name: &str, state, last_exit| ServiceStatus {
            name: name.into(),
            state,
            pid: None,
            restarts: 0,
            last_exit,
            last_error: None,
            since: 0,
        };
        assert!(services_running(None).is_ok());
        let good = [
            status("a", ServiceState::Running, None),
            status(
                "b",
                ServiceState::Exited,
                Some(ExitInfo {
                    code: Some(0),
                    signal: None,
                }),
            ),
        ];
        assert!(services_running(Some(&good)).is_ok());
        let bad = [
            status("a", ServiceState::Running, None),
            status(
                "web",
                ServiceState::Backoff,
                Some(ExitInfo {
                    code: Some(2),
                    signal: None,
                }),
            ),
        ];
        assert_eq!(
            services_running(Some(&bad)).unwrap_err(),
            "web is backoff (exited with code 2)"
        );

        let build = SystemTime::UNIX_EPOCH + Duration::from_secs(FALLBACK_BUILD_EPOCH);
        assert!(clock_sane(build + Duration::from_secs(1), build).is_ok());
        let err = clock_sane(SystemTime::UNIX_EPOCH, build).unwrap_err();
        assert!(err.starts_with("1970-01-01T00:00:00Z is before"), "{err}");
        let later = build + Duration::from_secs(1);
        assert!(clock_check(later, build, None)
            .unwrap()
            .ends_with("no NTP server known"));
        let synced = TimeSync::Synchronised {
            server: "10.0.0.1".into(),
            offset_ms: -3,
        };
        assert!(clock_check(later, build, Some(synced.clone()))
            .unwrap()
            .ends_with("synchronised with 10.0.0.1 (last offset -3 ms)"));
        assert!(clock_check(SystemTime::UNIX_EPOCH, build, Some(synced)).is_err());
        let waiting = TimeSync::Unsynchronised {
            servers: 2,
            last_error: "no answer".into(),
        };
        let err = clock_check(later, build, Some(waiting)).unwrap_err();
        assert!(err.contains("not synchronised"), "{err}");
        assert!(build_time_floor() <= SystemTime::now());
    }

    #[test]
    fn user_checks_are_validated() {
        let parse = |text: &str| -> Result<HealthConfig, String> {
            #[derive(Deserialize)]
            struct Config {
                health: HealthConfig,
            }
            let c: Config = toml::from_str(text).map_err(|e| e.to_string())?;
            c.health.validate().map_err(|e| e.to_string())?;
            Ok(c.health)
        };
        let c = parse(
            "[[health.checks]]\nname = \"web\"\nhttp = \"http://127.0.0.1:8080/ready\"\ntimeout = \"2s\"\n\
             [[health.checks]]\nname = \"disk\"\ncommand = [\"test\", \"-d\", \"/var/lib\"]\n",
        )
        .unwrap();
        assert_eq!(c.checks[0].timeout, Duration::from_secs(2));
        assert_eq!(c.checks[1].timeout, DEFAULT_CHECK_TIMEOUT);
        let cases = [
            ("name = \"x\"\ncommand = [\"true\"]\ntimeout = \"soon\"\n", "soon"),
            ("name = \"x\"\ncommand = [\"true\"]\nfrequency = 1\n", "frequency"),
            ("name = \"x\"\n", "exactly one"),
            ("name = \"x\"\ncommand = [\"true\"]\nhttp = \"http://a/\"\n", "exactly one"),
            ("name = \"x\"\ncommand = []\n", "command is empty"),
            ("name = \"x\"\nhttp = \"https://a/\"\n", "only http://"),
            ("name = \"x\"\nhttp = \"/path\"\n", "only http://"),
            ("name = \"x\"\nhttp = \"http:// bad\"\n", "not a URL"),
            ("name = \"clock\"\ncommand = [\"true\"]\n", "built-in"),
            ("name = \"x\"\ncommand = [\"true\"]\ntimeout = \"0s\"\n", "above 0"),
            ("name = \"x\"\ncommand = [\"true\"]\n[[health.checks]]\nname = \"x\"\ncommand = [\"true\"]\n", "twice"),
        ];
        for (body, expected) in cases {
            let err = parse(&format!("[[health.checks]]\n{body}")).unwrap_err();
            assert!(err.contains(expected), "{body}: {err}");
            if !expected.contains("soon") && !expected.contains("frequency") {
                assert!(err.contains("\"x\"") || err.contains("\"clock\""), "{err}");
            }
        }
    }

    #[test]
    fn the_interval_has_a_default_and_a_floor() {
        let parse = |text: &str| -> Result<HealthConfig, String> {
            let c: HealthConfig = toml::from_str(text).map_err(|e| e.to_string())?;
            c.validate().map_err(|e| e.to_string())?;
            Ok(c)
        };
        assert_eq!(parse("").unwrap().interval, DEFAULT_INTERVAL);
        assert_eq!(HealthConfig::default().interval, DEFAULT_INTERVAL);
        assert_eq!(
            parse("interval = \"1m 30s\"").unwrap().interval,
            Duration::from_secs(90)
        );
        assert_eq!(
            parse("interval = \"500ms\"").unwrap_err(),
            "health.interval = \"500ms\": must be at least 1s"
        );
        assert!(parse("interval = \"0s\"").unwrap_err().contains("at least"));
        assert!(parse("interval = \"often\"").unwrap_err().contains("often"));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_monitor_runs_the_checks_and_readers_share_its_report() {
        let dir = tempfile::tempdir().unwrap();
        let runs = dir.path().join("runs");
        // Below the configurable floor, to keep the test short.
        let interval = Duration::from_millis(400);
        let config = HealthConfig {
            interval: DEFAULT_INTERVAL,
            checks: vec![counting_check(&runs)],
        };
        let sources = BuiltinSources {
            mountinfo: write_mountinfo(dir.path(), MOUNTINFO),
            ..BuiltinSources::default()
        };
        let reaper = Reaper::start(ReapScope::OwnChildren).unwrap();
        let checker = HealthChecker::new(&config, sources, None, reaper).unwrap();
        let count = || {
            std::fs::read_to_string(&runs)
                .map(|t| t.lines().count())
                .unwrap_or(0)
        };
        let monitor = HealthMonitor::start(checker, interval);

        // The first run starts at once.
        monitor
            .latest
            .clone()
            .wait_for(Option::is_some)
            .await
            .unwrap();
        let first = monitor.latest().unwrap();
        assert_eq!(count(), 1);
        assert!(first
            .report
            .checks
            .iter()
            .any(|c| c.name == "count" && c.ok));
        // Readers run nothing and all see the same report.
        for _ in 0..20 {
            assert!(Arc::ptr_eq(&monitor.latest().unwrap(), &first));
        }
        assert_eq!(count(), 1);

        // run_now runs the checks again, after the call, and publishes.
        let asked = Instant::now();
        let report = monitor.run_now().await;
        assert_eq!(count(), 2);
        let second = monitor.latest().unwrap();
        assert!(second.began >= asked && second.checked_at >= first.checked_at);
        assert_eq!(second.report, report);
        // Requests made together share one run.
        let (a, b) = tokio::join!(monitor.run_now(), monitor.run_now());
        assert_eq!(count(), 3);
        assert_eq!(a, b);

        // No run before the interval, one after it.
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(count(), 3);
        let deadline = Instant::now() + Duration::from_secs(5);
        while count() < 4 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(count(), 4, "no periodic run");
        let latest = monitor.latest().unwrap();
        assert!(latest.age() < Duration::from_secs(5));

        // What /status and /readyz show: the report, when, and how old.
        let json = serde_json::to_value(&*latest).unwrap();
        let at = json["checked_at"].as_str().unwrap();
        assert!(humantime::parse_rfc3339(at).is_ok(), "{json}");
        assert!(json["age_ms"].as_u64().is_some(), "{json}");
        assert_eq!(json["ready"], latest.report.ready);
        assert_eq!(json["checks"][4]["name"], "count");

        // The task ends with its last handle: no more runs.
        drop(monitor);
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert_eq!(count(), 4);
    }

    /// A loopback HTTP server: `/ok` 200, `/fail` 503, `/slow` never answers.
    async fn serve_http() -> std::net::SocketAddr {
        use hyper::{Response, StatusCode};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        |req: hyper::Request<hyper::body::Incoming>| async move {
                            let code = match req.uri().path() {
                                "/ok" => StatusCode::OK,
                                "/slow" => {
                                    tokio::time::sleep(Duration::from_secs(30)).await;
                                    StatusCode::OK
                                }
                                _ => StatusCode::SERVICE_UNAVAILABLE,
                            };
                            let mut r =
                                Response::new(http_body_util::Full::new(Bytes::from_static(b"x")));
                            *r.status_mut() = code;
                            Ok::<_, std::convert::Infallible>(r)
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        addr
    }

    #[tokio::test(flavor = "current_thread")]
    async fn user_checks_run_real_commands_and_http_requests() {
        let addr = serve_http().await;
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let check =
            |name: &str, command: Option<&[&str]>, http: Option<String>, ms: u64| CheckSpec {
                name: name.into(),
                command: command.map(|c| c.iter().map(|s| s.to_string()).collect()),
                http,
                timeout: Duration::from_millis(ms),
            };
        let config = HealthConfig {
            interval: DEFAULT_INTERVAL,
            checks: vec![
                check("cmd-ok", Some(&["true"]), None, 5000),
                check(
                    "cmd-fail",
                    Some(&["sh", "-c", "echo disk is full >&2; exit 4"]),
                    None,
                    5000,
                ),
                check("cmd-slow", Some(&["sleep", "10"]), None, 300),
                check("cmd-missing", Some(&["/nonexistent/check"]), None, 5000),
                check("http-ok", None, Some(format!("http://{addr}/ok")), 5000),
                check("http-fail", None, Some(format!("http://{addr}/fail")), 5000),
                check("http-slow", None, Some(format!("http://{addr}/slow")), 300),
                check(
                    "http-refused",
                    None,
                    Some(format!("http://{closed}/ok")),
                    5000,
                ),
            ],
        };
        let dir = tempfile::tempdir().unwrap();
        let sources = BuiltinSources {
            mountinfo: write_mountinfo(dir.path(), MOUNTINFO),
            at_boot: vec![CheckResult {
                name: "kubelet".into(),
                ok: true,
                message: "kubelet not installed: no /usr/bin/kubelet (standalone: containerd only)"
                    .into(),
                duration_ms: 0,
            }],
            ..BuiltinSources::default()
        };
        let reaper = Reaper::start(ReapScope::OwnChildren).unwrap();
        let checker = HealthChecker::new(&config, sources, None, reaper).unwrap();
        let began = Instant::now();
        let report = checker.run().await;
        assert!(
            began.elapsed() < Duration::from_secs(3),
            "checks did not run concurrently"
        );
        let get = |name: &str| {
            report
                .checks
                .iter()
                .find(|c| c.name == name)
                .unwrap()
                .clone()
        };
        let names: Vec<&str> = report.checks.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(&names[..4], BUILTIN_CHECKS);
        assert_eq!(names[4], "kubelet");
        assert!(get("kubelet").message.starts_with("kubelet not installed"));
        assert!(get("state-writable").ok && get("clock").ok && get("services").ok);
        assert!(get("cmd-ok").ok);
        assert_eq!(get("cmd-fail").message, "exited with code 4: disk is full");
        let slow = get("cmd-slow");
        assert!(
            !slow.ok && slow.message == "timed out after 300ms",
            "{slow:?}"
        );
        assert!(
            slow.duration_ms >= 300 && slow.duration_ms < 2000,
            "{slow:?}"
        );
        assert!(get("cmd-missing").message.contains("starting"));
        assert_eq!(
            (get("http-ok").ok, get("http-ok").message.as_str()),
            (true, "HTTP 200 OK")
        );
        assert_eq!(get("http-fail").message, "HTTP 503 Service Unavailable");
        assert_eq!(get("http-slow").message, "no answer within 300ms");
        assert!(get("http-refused")
            .message
            .contains("connecting to 127.0.0.1"));
        assert!(!report.ready);
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["checks"][5]["name"], "cmd-ok");

        let passing = HealthConfig {
            interval: DEFAULT_INTERVAL,
            checks: vec![check(
                "http-ok",
                None,
                Some(format!("http://{addr}/ok")),
                5000,
            )],
        };
        let checker = HealthChecker::new(
            &passing,
            BuiltinSources {
                mountinfo: write_mountinfo(dir.path(), MOUNTINFO),
                ..BuiltinSources::default()
            },
            None,
            Reaper::start(ReapScope::OwnChildren).unwrap(),
        )
        .unwrap();
        let report = checker.run().await;
        let network_ok = report.checks[1].ok;
        assert_eq!(report.ready, network_ok, "{report:?}");
    }
}
