//! The network lab: a real layer-2 network for VM tests inside a network
//! namespace the test creates (`ballast-lab-<pid>-<n>`). It holds a bridge
//! with the lab's server address, a TAP device on the bridge for QEMU
//! (`-netdev tap`, QEMU started inside the namespace), dnsmasq on the
//! bridge (DHCP with options 3, 6, 12, 42, 26 and 121, IPv6 router
//! advertisements) and chronyd as the lab's NTP server, started with `-x`
//! so it never touches any clock (the clock is not namespaced). Nothing
//! leaves the namespace: it has no link to the host's network. Drop kills
//! the processes the lab started (by their pids) and deletes the
//! namespace.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The lab's IPv4 network (inside the namespace only).
pub const SERVER: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
pub const PREFIX: u8 = 24;
pub const DHCP_FIRST: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 50);
pub const DHCP_LAST: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 99);
/// The lab's IPv6 prefix, advertised by dnsmasq's router advertisements.
pub const SERVER_V6: &str = "fd77::1";
/// A network reached through the lab router by a classless static route
/// (option 121), and the MTU the lab gives (option 26).
pub const ROUTED_NET: &str = "10.78.0.0/16";
pub const MTU: u16 = 1400;
/// The guest's MAC (QEMU's OUI) and the host name DHCP gives it (option 12).
pub const GUEST_MAC: &str = "52:54:00:77:00:10";
pub const GUEST_HOSTNAME: &str = "lab-node";
pub const BRIDGE: &str = "br0";
pub const TAP: &str = "tap0";

static LABS: AtomicU32 = AtomicU32::new(0);

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("lab {netns}: `{command}` failed: {detail}")]
    Command {
        netns: String,
        command: String,
        detail: String,
    },
    #[error("lab {netns}: starting {program} (Debian package {package})")]
    Spawn {
        netns: String,
        program: &'static str,
        package: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("lab {netns}: writing {path}")]
    Write {
        netns: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("lab {netns}: {what} exited early: {log}")]
    Exited {
        netns: String,
        what: &'static str,
        log: String,
    },
}

/// A running lab; everything is removed on drop.
#[derive(Debug)]
pub struct NetLab {
    netns: String,
    dir: tempfile::TempDir,
    dnsmasq: Option<Child>,
    chronyd: Option<Child>,
}

impl NetLab {
    /// Creates the namespace, bridge and TAP device, and starts dnsmasq
    /// and chronyd in it.
    pub fn start() -> Result<NetLab, LabError> {
        let n = LABS.fetch_add(1, Ordering::SeqCst);
        let netns = format!("ballast-lab-{}-{n}", std::process::id());
        let dir = tempfile::Builder::new()
            .prefix("ballast-lab-")
            .tempdir()
            .map_err(|source| LabError::Write {
                netns: netns.clone(),
                path: std::env::temp_dir(),
                source,
            })?;
        run(&netns, &["ip", "netns", "add", &netns])?;
        // From here on, drop removes the namespace.
        let mut lab = NetLab {
            netns,
            dir,
            dnsmasq: None,
            chronyd: None,
        };
        let ns = lab.netns.clone();
        let server = format!("{SERVER}/{PREFIX}");
        let server_v6 = format!("{SERVER_V6}/64");
        for args in [
            &["link", "set", "lo", "up"][..],
            &["link", "add", BRIDGE, "type", "bridge"],
            &["tuntap", "add", "dev", TAP, "mode", "tap"],
            &["link", "set", TAP, "master", BRIDGE],
            &["addr", "add", &server, "dev", BRIDGE],
            &["addr", "add", &server_v6, "dev", BRIDGE, "nodad"],
            &["link", "set", BRIDGE, "up"],
            &["link", "set", TAP, "up"],
        ] {
            let mut argv = vec!["ip", "-n", ns.as_str()];
            argv.extend_from_slice(args);
            run(&ns, &argv)?;
        }
        lab.chronyd = Some(lab.start_chronyd()?);
        lab.dnsmasq = Some(lab.start_dnsmasq()?);
        lab.wait_listening()?;
        Ok(lab)
    }

    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// dnsmasq's log (every DHCP exchange, `--log-dhcp`).
    pub fn dnsmasq_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dnsmasq.log")).unwrap_or_default()
    }

    fn write(&self, name: &str, text: &str) -> Result<PathBuf, LabError> {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).map_err(|source| LabError::Write {
            netns: self.netns.clone(),
            path: path.clone(),
            source,
        })?;
        Ok(path)
    }

    fn spawn_in(
        &self,
        program: &'static str,
        package: &'static str,
        args: &[String],
        log: &Path,
    ) -> Result<Child, LabError> {
        let spawn_err = |source| LabError::Spawn {
            netns: self.netns.clone(),
            program,
            package,
            source,
        };
        let out = std::fs::File::create(log).map_err(spawn_err)?;
        let err = out.try_clone().map_err(spawn_err)?;
        // `ip netns exec` execs the program: the child's pid is its pid.
        Command::new("ip")
            .args(["netns", "exec", &self.netns, program])
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(spawn_err)
    }

    fn start_chronyd(&self) -> Result<Child, LabError> {
        let d = self.dir.path().display();
        let conf = self.write(
            "chrony.conf",
            &format!(
                "port 123\nlocal stratum 8\nallow {SERVER}/{PREFIX}\nbindaddress {SERVER}\n\
                 cmdport 0\npidfile {d}/chronyd.pid\ndriftfile {d}/chrony.drift\n"
            ),
        )?;
        // -x: never set or slew any clock; -d: stay a child of ours.
        let args = ["-x", "-d", "-u", "root", "-f"]
            .iter()
            .map(|s| (*s).to_owned())
            .chain([conf.display().to_string()])
            .collect::<Vec<_>>();
        self.spawn_in(
            "chronyd",
            "chrony",
            &args,
            &self.dir.path().join("chronyd.log"),
        )
    }

    fn start_dnsmasq(&self) -> Result<Child, LabError> {
        let d = self.dir.path().display();
        let args: Vec<String> = [
            "--keep-in-foreground".to_owned(),
            "--conf-file=/dev/null".into(),
            "--no-resolv".into(),
            "--no-hosts".into(),
            "--user=root".into(),
            format!("--interface={BRIDGE}"),
            "--bind-interfaces".into(),
            format!("--dhcp-range={DHCP_FIRST},{DHCP_LAST},255.255.255.0,1h"),
            format!("--dhcp-host={GUEST_MAC},{GUEST_HOSTNAME}"),
            format!("--dhcp-option=option:router,{SERVER}"),
            format!("--dhcp-option=option:dns-server,{SERVER}"),
            format!("--dhcp-option=option:ntp-server,{SERVER}"),
            format!("--dhcp-option=option:mtu,{MTU}"),
            format!(
                "--dhcp-option=option:classless-static-route,{ROUTED_NET},{SERVER},0.0.0.0/0,{SERVER}"
            ),
            "--enable-ra".into(),
            format!("--dhcp-range=::,constructor:{BRIDGE},ra-only"),
            format!("--dhcp-leasefile={d}/dnsmasq.leases"),
            "--pid-file=".into(),
            format!("--log-facility={d}/dnsmasq.log"),
            "--log-dhcp".into(),
        ]
        .into();
        self.spawn_in(
            "dnsmasq",
            "dnsmasq-base",
            &args,
            &self.dir.path().join("dnsmasq.out"),
        )
    }

    /// Waits until dnsmasq (DHCP, port 67) and chronyd (NTP, port 123)
    /// listen in the namespace, failing at once if either has exited.
    fn wait_listening(&mut self) -> Result<(), LabError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            for (what, child, log) in [
                ("chronyd", &mut self.chronyd, "chronyd.log"),
                ("dnsmasq", &mut self.dnsmasq, "dnsmasq.out"),
            ] {
                if let Some(c) = child {
                    if c.try_wait().ok().flatten().is_some() {
                        return Err(LabError::Exited {
                            netns: self.netns.clone(),
                            what,
                            log: std::fs::read_to_string(self.dir.path().join(log))
                                .unwrap_or_default(),
                        });
                    }
                }
            }
            let out = Command::new("ip")
                .args(["netns", "exec", &self.netns, "ss", "-lnu"])
                .output();
            let text = out
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            if text.contains(&format!("{SERVER}:123")) && text.contains(":67 ") {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(LabError::Command {
                    netns: self.netns.clone(),
                    command: "ss -lnu".into(),
                    detail: format!("NTP and DHCP not listening after 10 s: {text}"),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Asks the lab's NTP server from inside the namespace with chronyd's
    /// query-only mode (`-Q`: prints the offset, sets nothing).
    pub fn query_ntp(&self) -> Result<String, LabError> {
        let server = format!("server {SERVER} iburst maxsamples 1");
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.netns,
                "chronyd",
                "-Q",
                "-f",
                "/dev/null",
            ])
            .args(["-t", "10", &server])
            .output()
            .map_err(|source| LabError::Spawn {
                netns: self.netns.clone(),
                program: "chronyd",
                package: "chrony",
                source,
            })?;
        Ok(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

impl Drop for NetLab {
    fn drop(&mut self) {
        for child in [self.dnsmasq.take(), self.chronyd.take()]
            .into_iter()
            .flatten()
        {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn run(netns: &str, argv: &[&str]) -> Result<(), LabError> {
    let failed = |detail: String| LabError::Command {
        netns: netns.to_owned(),
        command: argv.join(" "),
        detail,
    };
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .map_err(|e| failed(e.to_string()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(failed(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn netns_exists(name: &str) -> bool {
        Path::new("/run/netns").join(name).exists()
    }

    /// The real lab: dnsmasq and chronyd listen in the namespace, the NTP
    /// server answers a query from inside it, and drop removes it all.
    #[test]
    #[ignore = "needs root, iproute2, dnsmasq-base and chrony (cargo xtask deps); run with --ignored"]
    fn the_lab_serves_ntp_and_dhcp_and_goes_away_on_drop() {
        let lab = NetLab::start().unwrap();
        let name = lab.netns().to_owned();
        assert!(netns_exists(&name));
        let answer = lab.query_ntp().unwrap();
        assert!(answer.contains("System clock wrong by"), "{answer}");
        // The namespace has no way out: only the bridge and loopback.
        let routes = Command::new("ip")
            .args(["-n", &name, "route", "show"])
            .output()
            .unwrap();
        let routes = String::from_utf8_lossy(&routes.stdout).into_owned();
        assert!(!routes.contains("default"), "{routes}");
        let log = lab.dnsmasq_log();
        assert!(log.contains("router advertisement on br0"), "{log}");
        drop(lab);
        assert!(!netns_exists(&name));
    }
}
