//! Time synchronisation at run time: owns `[time]` and the SNTP client's
//! loop. Servers are `[time] servers` first, then those from DHCP option 42
//! (as the network manager learns them). Each poll asks the servers in
//! order until one gives a reply that passes [`sntp::evaluate`]'s checks;
//! the clock is then stepped (offset over 1 s: clock_settime, then the RTC
//! is written) or slewed (adjtimex), the `time-synced` console event is
//! printed for the first sync and every step, and the clock health check
//! learns the state through a watch channel. The clock sits behind the
//! [`SystemClock`] trait so the loop is tested without touching this
//! machine's time.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, SystemTime};

use tokio::net::UdpSocket;
use tokio::sync::watch;

use super::sntp::{self, Correction, PollInterval, Sample, SntpError};
use crate::config::time::{NtpServer, TimeConfig};
use crate::console::{self, Event};
use crate::node::health::TimeSync;

/// How long one server has to answer.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(2);
/// The real-time clock the kernel's RTC class driver offers.
const RTC_DEVICE: &str = "/dev/rtc0";

#[derive(Debug, thiserror::Error)]
pub enum TimeError {
    #[error("NTP server {server}: resolving")]
    Resolve {
        server: String,
        #[source]
        source: std::io::Error,
    },
    #[error("NTP server {server}: the name has no address")]
    NoAddress { server: String },
    #[error("NTP server {server}: sending the request")]
    Send {
        server: String,
        #[source]
        source: std::io::Error,
    },
    #[error("NTP server {server}: no answer within {timeout:?}")]
    Timeout { server: String, timeout: Duration },
    #[error("NTP server {server}: reply refused")]
    Reply {
        server: String,
        #[source]
        source: SntpError,
    },
    #[error("setting the clock {offset_ms} ms from {server}")]
    Step {
        server: String,
        offset_ms: i64,
        #[source]
        source: std::io::Error,
    },
    #[error("slewing the clock {offset_ms} ms from {server}")]
    Slew {
        server: String,
        offset_ms: i64,
        #[source]
        source: std::io::Error,
    },
    #[error("no NTP server answered usably (last: {last})")]
    NoneAnswered { last: String },
}

/// The clock the client corrects.
pub trait SystemClock: Send + Sync {
    fn now(&self) -> SystemTime;
    fn step(&self, to: SystemTime) -> std::io::Result<()>;
    /// Starts slewing by `offset_us` (positive: forward).
    fn slew(&self, offset_us: i64) -> std::io::Result<()>;
    fn write_rtc(&self, time: SystemTime) -> std::io::Result<()>;
}

/// This machine's clock and RTC.
#[derive(Debug, Default, Clone, Copy)]
pub struct KernelClock;

impl SystemClock for KernelClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }

    fn step(&self, to: SystemTime) -> std::io::Result<()> {
        crate::sys::set_realtime(to)
    }

    fn slew(&self, offset_us: i64) -> std::io::Result<()> {
        crate::sys::slew_realtime(offset_us)
    }

    fn write_rtc(&self, time: SystemTime) -> std::io::Result<()> {
        let secs = time
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_err(|_| std::io::Error::other("time before 1970"))?
            .as_secs();
        let tm = crate::sys::RtcTime::from_unix(secs)
            .ok_or_else(|| std::io::Error::other("time out of the RTC's range"))?;
        let rtc = std::fs::File::open(RTC_DEVICE)?;
        crate::sys::rtc_write(&rtc, &tm)
    }
}

/// The servers to ask, in order: configured ones, then DHCP's, without
/// duplicates.
pub fn server_list(configured: &[NtpServer], dhcp: &[Ipv4Addr]) -> Vec<NtpServer> {
    let mut all: Vec<NtpServer> = configured.to_vec();
    for ip in dhcp {
        let s = NtpServer::ip(IpAddr::V4(*ip));
        if !all.contains(&s) {
            all.push(s);
        }
    }
    all
}

/// One SNTP exchange with `server`: resolve, send, wait up to `timeout`
/// for the reply from that address, check it.
pub async fn query(
    server: &NtpServer,
    clock: &dyn SystemClock,
    timeout: Duration,
) -> Result<(SocketAddr, Sample), TimeError> {
    let name = server.to_string();
    let addr = tokio::net::lookup_host((server.host.as_str(), server.port))
        .await
        .map_err(|source| TimeError::Resolve {
            server: name.clone(),
            source,
        })?
        .next()
        .ok_or_else(|| TimeError::NoAddress {
            server: name.clone(),
        })?;
    let send_err = |source| TimeError::Send {
        server: name.clone(),
        source,
    };
    let local: SocketAddr = if addr.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(local).await.map_err(send_err)?;
    socket.connect(addr).await.map_err(send_err)?;
    let t1 = clock.now();
    let sent = sntp::Timestamp::from_system(t1);
    socket.send(&sntp::request(sent)).await.map_err(send_err)?;
    let mut buf = [0u8; 512];
    // A connected UDP socket only receives from `addr`.
    let len = match tokio::time::timeout(timeout, socket.recv(&mut buf)).await {
        Ok(Ok(len)) => len,
        Ok(Err(source)) => return Err(send_err(source)),
        Err(_) => {
            return Err(TimeError::Timeout {
                server: name,
                timeout,
            })
        }
    };
    let t4 = clock.now();
    let sample = sntp::evaluate(&buf[..len], sent, t1, t4).map_err(|source| TimeError::Reply {
        server: name.clone(),
        source,
    })?;
    Ok((addr, sample))
}

/// The result of one successful poll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Synced {
    pub server: String,
    pub sample: Sample,
    pub correction: Correction,
}

/// The client's state between polls.
#[derive(Debug)]
pub struct TimeSyncer<C> {
    clock: C,
    timeout: Duration,
    synced_once: bool,
}

impl<C: SystemClock> TimeSyncer<C> {
    pub fn new(clock: C, timeout: Duration) -> Self {
        TimeSyncer {
            clock,
            timeout,
            synced_once: false,
        }
    }

    pub fn clock(&self) -> &C {
        &self.clock
    }

    /// Asks `servers` in order; the first usable answer corrects the clock.
    pub async fn poll(&mut self, servers: &[NtpServer]) -> Result<Synced, TimeError> {
        let mut last = "no server".to_owned();
        for server in servers {
            match query(server, &self.clock, self.timeout).await {
                Ok((_, sample)) => return self.correct(server.to_string(), sample),
                Err(e) => {
                    tracing::debug!(error = %crate::error_chain(&e), "NTP query failed");
                    last = crate::error_chain(&e);
                }
            }
        }
        Err(TimeError::NoneAnswered { last })
    }

    fn correct(&mut self, server: String, sample: Sample) -> Result<Synced, TimeError> {
        let offset_ms = sample.offset_ms();
        let correction = sntp::correction(&sample);
        match correction {
            Correction::Step { offset_ns } => {
                let now = self.clock.now();
                let magnitude = Duration::from_nanos(
                    u64::try_from(offset_ns.unsigned_abs()).unwrap_or(u64::MAX),
                );
                let to = if offset_ns >= 0 {
                    now.checked_add(magnitude)
                } else {
                    now.checked_sub(magnitude)
                }
                .unwrap_or(now);
                self.clock.step(to).map_err(|source| TimeError::Step {
                    server: server.clone(),
                    offset_ms,
                    source,
                })?;
                tracing::info!(%server, offset_ms, "clock stepped");
                if let Err(e) = self.clock.write_rtc(self.clock.now()) {
                    tracing::warn!(error = %e, device = RTC_DEVICE, "RTC not written");
                }
            }
            Correction::Slew { offset_ns } => {
                let offset_us = i64::try_from(offset_ns / 1000).unwrap_or(0);
                self.clock
                    .slew(offset_us)
                    .map_err(|source| TimeError::Slew {
                        server: server.clone(),
                        offset_ms,
                        source,
                    })?;
                tracing::debug!(%server, offset_ms, "clock slewing");
            }
        }
        if !self.synced_once || matches!(correction, Correction::Step { .. }) {
            console::emit(&Event::TimeSynced {
                server: server.clone(),
                offset_ms,
            });
        }
        self.synced_once = true;
        Ok(Synced {
            server,
            sample,
            correction,
        })
    }
}

/// Starts the client: it runs for the node's life, polling as
/// [`PollInterval`] says and at once when DHCP offers new servers while
/// unsynchronised. The returned receiver feeds the clock health check.
pub fn spawn(
    config: &TimeConfig,
    mut dhcp: watch::Receiver<Vec<Ipv4Addr>>,
) -> watch::Receiver<TimeSync> {
    let configured = config.servers.clone();
    let (status_tx, status) = watch::channel(TimeSync::NoServers);
    tokio::spawn(async move {
        let mut syncer = TimeSyncer::new(KernelClock, QUERY_TIMEOUT);
        let mut interval = PollInterval::default();
        let mut dhcp_open = true;
        loop {
            let servers = server_list(&configured, &dhcp.borrow_and_update());
            let wait = if servers.is_empty() {
                status_tx.send_replace(TimeSync::NoServers);
                None
            } else {
                match syncer.poll(&servers).await {
                    Ok(s) => {
                        status_tx.send_replace(TimeSync::Synchronised {
                            server: s.server,
                            offset_ms: s.sample.offset_ms(),
                        });
                        Some(interval.on_sample(&s.sample))
                    }
                    Err(e) => {
                        let error = crate::error_chain(&e);
                        tracing::warn!(%error, "time not synchronised");
                        // A node that was synchronised stays so through a
                        // failed poll: its clock is still good.
                        if !syncer.synced_once {
                            status_tx.send_replace(TimeSync::Unsynchronised {
                                servers: servers.len(),
                                last_error: error,
                            });
                        }
                        Some(interval.on_failure())
                    }
                }
            };
            tokio::select! {
                _ = sleep_for(wait) => {}
                changed = dhcp.changed(), if dhcp_open => {
                    // The network manager stopped: only the configured
                    // servers remain, on the usual schedule.
                    if changed.is_err() {
                        dhcp_open = false;
                        sleep_for(wait).await;
                    }
                }
            }
        }
    });
    status
}

/// Longest wait for a usable clock before TLS clients and update checks go
/// ahead anyway (and most likely fail on a certificate "not yet valid").
pub const CLOCK_WAIT: Duration = Duration::from_secs(90);

/// Whether TLS may trust this clock: it is not before the image's build
/// (no certificate check can be right before then), or the SNTP client
/// synchronised it this boot.
pub fn clock_usable(now: SystemTime, build_time: SystemTime, status: &TimeSync) -> bool {
    now >= build_time || matches!(status, TimeSync::Synchronised { .. })
}

/// Makes TLS clients and update checks wait, bounded, for a usable clock
/// ([`clock_usable`]). After one wait ran out the gate stays open: a node
/// without time sync keeps trying on its usual schedule, not 90 s later.
#[derive(Debug, Clone)]
pub struct ClockGate {
    status: watch::Receiver<TimeSync>,
    build_time: SystemTime,
    max: Duration,
    gave_up: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl ClockGate {
    pub fn new(status: watch::Receiver<TimeSync>, build_time: SystemTime, max: Duration) -> Self {
        ClockGate {
            status,
            build_time,
            max,
            gave_up: Default::default(),
        }
    }

    /// Waits until the clock is usable, at most the gate's bound; `false`
    /// when it gave up, after printing `clock-unsynced` (`purpose` says
    /// what waited: `update-check`).
    pub async fn wait(&self, purpose: &str) -> bool {
        use std::sync::atomic::Ordering;
        let usable = |s: &TimeSync| clock_usable(SystemTime::now(), self.build_time, s);
        let mut status = self.status.clone();
        if usable(&status.borrow_and_update()) {
            return true;
        }
        if self.gave_up.load(Ordering::Relaxed) {
            return false;
        }
        tracing::info!(
            purpose,
            "clock before the image's build: waiting for time sync"
        );
        let started = std::time::Instant::now();
        // A step changes the status too (time-synced), so waiting on the
        // channel sees it; the periodic look covers an RTC set by hand.
        let waited = tokio::time::timeout(self.max, async {
            loop {
                if usable(&status.borrow_and_update()) {
                    return;
                }
                tokio::select! {
                    r = status.changed() => if r.is_err() {
                        std::future::pending::<()>().await;
                    },
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
            }
        })
        .await;
        match waited {
            Ok(()) => {
                tracing::info!(
                    purpose,
                    waited_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                    "clock usable"
                );
                true
            }
            Err(_) => {
                self.gave_up.store(true, Ordering::Relaxed);
                console::emit(&Event::ClockUnsynced {
                    purpose: purpose.to_owned(),
                    waited_s: self.max.as_secs(),
                });
                false
            }
        }
    }
}

async fn sleep_for(wait: Option<Duration>) {
    match wait {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A clock that is `offset` away from the real one and records what
    /// the client does to it.
    #[derive(Debug, Default)]
    pub(crate) struct FakeClock {
        pub offset: Mutex<Duration>,
        pub behind: bool,
        pub calls: Mutex<Vec<String>>,
    }

    impl SystemClock for FakeClock {
        fn now(&self) -> SystemTime {
            let off = *self.offset.lock().unwrap();
            if self.behind {
                SystemTime::now() - off
            } else {
                SystemTime::now() + off
            }
        }
        fn step(&self, to: SystemTime) -> std::io::Result<()> {
            let real = SystemTime::now();
            let (behind, off) = match real.duration_since(to) {
                Ok(d) => (true, d),
                Err(e) => (false, e.duration()),
            };
            *self.offset.lock().unwrap() = off;
            self.calls
                .lock()
                .unwrap()
                .push(format!("step behind={behind} off_ms={}", off.as_millis()));
            Ok(())
        }
        fn slew(&self, offset_us: i64) -> std::io::Result<()> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("slew {}ms", offset_us / 1000));
            Ok(())
        }
        fn write_rtc(&self, _time: SystemTime) -> std::io::Result<()> {
            self.calls.lock().unwrap().push("rtc".into());
            Ok(())
        }
    }

    #[test]
    fn configured_servers_come_first_and_dhcp_duplicates_are_dropped() {
        let configured = [
            NtpServer::parse("time.example.org").unwrap(),
            NtpServer::parse("10.0.0.1").unwrap(),
        ];
        let list = server_list(
            &configured,
            &[Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2)],
        );
        let shown: Vec<String> = list.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["time.example.org", "10.0.0.1", "10.0.0.2"]);
        assert!(server_list(&[], &[]).is_empty());
    }

    /// A loopback UDP "server" that answers with a bad reply: the client
    /// refuses it, touches no clock, and names the reason.
    #[tokio::test]
    async fn an_unsynchronised_server_is_refused_and_the_clock_left_alone() {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let port = server.local_addr().unwrap().port();
        tokio::spawn(async move {
            let mut buf = [0u8; 48];
            let (_, from) = server.recv_from(&mut buf).await.unwrap();
            let mut reply = [0u8; 48];
            reply[0] = (3 << 6) | (4 << 3) | 4; // leap 3, v4, server
            reply[1] = 2;
            reply[24..32].copy_from_slice(&buf[40..48]);
            reply[40..48].copy_from_slice(&buf[40..48]);
            server.send_to(&reply, from).await.unwrap();
        });
        let mut syncer = TimeSyncer::new(FakeClock::default(), Duration::from_secs(2));
        let servers = [NtpServer::parse(&format!("127.0.0.1:{port}")).unwrap()];
        let err = syncer.poll(&servers).await.unwrap_err();
        assert!(err.to_string().contains("leap indicator 3"), "{err}");
        assert!(syncer.clock().calls.lock().unwrap().is_empty());
    }

    /// chronyd serving NTP on loopback: `-x` (it never sets any clock),
    /// `-d` (a child of the test, killed on drop), local stratum 8.
    struct Chronyd {
        child: std::process::Child,
        port: u16,
        _dir: tempfile::TempDir,
    }

    impl Chronyd {
        fn start() -> Chronyd {
            let dir = tempfile::tempdir().unwrap();
            // A free port: bind, note it, release it for chronyd.
            let port = std::net::UdpSocket::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let d = dir.path().display();
            let conf = dir.path().join("chrony.conf");
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nlocal stratum 8\nallow 127.0.0.1\nbindaddress 127.0.0.1\n\
                     cmdport 0\npidfile {d}/chronyd.pid\ndriftfile {d}/drift\n"
                ),
            )
            .unwrap();
            let child = std::process::Command::new("chronyd")
                .args(["-x", "-d", "-u", "root", "-f"])
                .arg(&conf)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("chronyd (Debian package chrony; `cargo xtask deps` installs it)");
            Chronyd {
                child,
                port,
                _dir: dir,
            }
        }
    }

    impl Drop for Chronyd {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// Against a real chronyd: a clock an hour behind is stepped (and the
    /// RTC written), the next poll finds it right and only slews.
    #[tokio::test]
    async fn a_real_chronyd_steps_a_clock_an_hour_behind_then_slews() {
        let chronyd = Chronyd::start();
        let servers = [NtpServer::parse(&format!("127.0.0.1:{}", chronyd.port)).unwrap()];
        let clock = FakeClock {
            offset: Mutex::new(Duration::from_secs(3600)),
            behind: true,
            ..FakeClock::default()
        };
        let mut syncer = TimeSyncer::new(clock, Duration::from_millis(500));
        // chronyd answers within a moment of starting; allow it a few tries.
        let mut first = None;
        for _ in 0..20 {
            match syncer.poll(&servers).await {
                Ok(s) => {
                    first = Some(s);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        let first = first.expect("chronyd never answered");
        assert_eq!(first.sample.stratum, 8, "chronyd's local stratum");
        assert!(matches!(first.correction, Correction::Step { .. }));
        let off = first.sample.offset_ms();
        assert!((3_599_000..=3_601_000).contains(&off), "{off}");
        {
            let calls = syncer.clock().calls.lock().unwrap();
            assert_eq!(calls.len(), 2, "{calls:?}");
            assert!(calls[0].starts_with("step"), "{calls:?}");
            assert_eq!(calls[1], "rtc");
        }
        // The fake clock is now within a few ms of chronyd's (this host's).
        assert!(*syncer.clock().offset.lock().unwrap() < Duration::from_millis(200));
        let second = syncer.poll(&servers).await.unwrap();
        assert!(matches!(second.correction, Correction::Slew { .. }));
        assert!(second.sample.offset_ms().abs() < 200);
        assert!(second.sample.delay_ns >= 0);
        let calls = syncer.clock().calls.lock().unwrap();
        assert!(calls[2].starts_with("slew"), "{calls:?}");
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        // Bound but never answering.
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let port = silent.local_addr().unwrap().port();
        let mut syncer = TimeSyncer::new(FakeClock::default(), Duration::from_millis(200));
        let servers = [NtpServer::parse(&format!("127.0.0.1:{port}")).unwrap()];
        let err = syncer.poll(&servers).await.unwrap_err();
        assert!(err.to_string().contains("no answer within"), "{err}");
        drop(silent);
    }

    #[test]
    fn a_clock_before_the_build_is_usable_only_once_synchronised() {
        let build = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let before = build - Duration::from_secs(86_400 * 365 * 9);
        let synced = TimeSync::Synchronised {
            server: "10.0.2.2".into(),
            offset_ms: 1,
        };
        let unsynced = TimeSync::Unsynchronised {
            servers: 1,
            last_error: "timeout".into(),
        };
        assert!(clock_usable(build, build, &TimeSync::NoServers));
        assert!(clock_usable(
            build + Duration::from_secs(1),
            build,
            &unsynced
        ));
        assert!(!clock_usable(before, build, &unsynced));
        assert!(!clock_usable(before, build, &TimeSync::NoServers));
        assert!(clock_usable(before, build, &synced));
    }

    #[tokio::test]
    async fn the_gate_opens_on_sync_and_gives_up_once() {
        // A build date in the future: this machine's clock is "before" it.
        let build = SystemTime::now() + Duration::from_secs(86_400);
        let (tx, rx) = watch::channel(TimeSync::NoServers);
        let gate = ClockGate::new(rx, build, Duration::from_millis(200));
        let waiter = tokio::spawn({
            let gate = gate.clone();
            async move { gate.wait("update-check").await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        tx.send_replace(TimeSync::Synchronised {
            server: "s".into(),
            offset_ms: 5,
        });
        assert!(waiter.await.unwrap());
        assert!(gate.wait("update-check").await, "open while synchronised");

        let (_tx, rx) = watch::channel(TimeSync::Unsynchronised {
            servers: 1,
            last_error: "timeout".into(),
        });
        let gate = ClockGate::new(rx, build, Duration::from_millis(50));
        let t = std::time::Instant::now();
        assert!(!gate.wait("update-check").await);
        assert!(t.elapsed() >= Duration::from_millis(50));
        let t = std::time::Instant::now();
        assert!(!gate.wait("update-check").await);
        assert!(
            t.elapsed() < Duration::from_millis(50),
            "a second wait is not made"
        );
    }
}
