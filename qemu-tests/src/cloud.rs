//! The cloud user-data scenarios, one boot each:
//!
//! - `cloud-imds`: an EC2-like VM (SMBIOS manufacturer `Amazon EC2`, QEMU
//!   user network on 169.254.0.0/16, `169.254.169.254:80` forwarded to a
//!   metadata server on the host's loopback that enforces IMDSv2: a GET
//!   without the session token is 401). The node must take the token first,
//!   apply the user-data (the operator's `[api]` section: the API answering
//!   over pinned HTTPS proves it) and take its host name from
//!   `local-hostname`.
//! - `cloud-config-drive`: an iso9660 volume labelled `config-2` (what
//!   OpenStack's Nova writes by default, made with xorriso) holding
//!   `openstack/latest/user_data` and `meta_data.json`; the same checks,
//!   the host name from `meta_data.json`. A vfat `config-2` volume is
//!   attached after it in the same boot: its label must be found, and it
//!   must be reported ignored as the second user-data volume (vfat
//!   mounting itself is the `runtime` scenario's CIDATA path).

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::disk;
use crate::operator::{self, Operator};
use crate::scenarios::{Context, ScenarioError};
use crate::update::server::{read_request, respond, Listener};
use crate::vm::{GuestFwd, Vm};

/// The session token the metadata server hands out.
const TOKEN: &str = "AQAEAballast-test-session-token==";
/// The host name the metadata server gives.
pub const IMDS_HOSTNAME: &str = "ip-10-1-2-3.ec2.internal";
/// The host name the config drive's meta_data.json gives.
pub const DRIVE_HOSTNAME: &str = "web-1.novalocal";

/// One request the metadata server answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Asked {
    pub method: String,
    pub path: String,
    pub status: u16,
}

/// An IMDSv2 server on 127.0.0.1 (the update scenarios' listener): PUT
/// `/latest/api/token` with a TTL header gives [`TOKEN`]; GETs need it.
#[derive(Debug)]
pub struct ImdsServer {
    log: Arc<Mutex<Vec<Asked>>>,
    listener: Listener,
}

impl ImdsServer {
    pub fn start(user_data: String) -> Result<Self, ScenarioError> {
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = log.clone();
        let listener = Listener::start("imds", move |stream| serve(&user_data, &l, stream))
            .map_err(|e| ScenarioError::Setup(format!("metadata server: {e}")))?;
        Ok(ImdsServer { log, listener })
    }

    pub fn port(&self) -> u16 {
        self.listener.port
    }

    pub fn log(&self) -> Vec<Asked> {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

/// The status and body AWS's IMDSv2 gives for one request.
fn imds_answer(
    user_data: &str,
    method: &str,
    path: &str,
    ttl: Option<&str>,
    token: Option<&str>,
) -> (u16, String) {
    if path == "/latest/api/token" {
        return match (method, ttl.and_then(|t| t.parse::<u32>().ok())) {
            ("PUT", Some(1..=21600)) => (200, TOKEN.to_owned()),
            ("PUT", _) => (400, String::new()),
            _ => (405, String::new()),
        };
    }
    if method != "GET" {
        return (405, String::new());
    }
    if token != Some(TOKEN) {
        return (401, String::new());
    }
    match path {
        "/latest/user-data" => (200, user_data.to_owned()),
        "/latest/meta-data/instance-id" => (200, "i-0b1a2c3d4e5f60718".to_owned()),
        "/latest/meta-data/local-hostname" => (200, IMDS_HOSTNAME.to_owned()),
        _ => (404, String::new()),
    }
}

fn serve(user_data: &str, log: &Mutex<Vec<Asked>>, mut stream: TcpStream) {
    let Ok(req) = read_request(&mut stream) else {
        let _ = respond(&mut stream, 400, "");
        return;
    };
    let (status, body) = imds_answer(
        user_data,
        &req.method,
        &req.path,
        req.header("x-aws-ec2-metadata-token-ttl-seconds"),
        req.header("x-aws-ec2-metadata-token"),
    );
    if let Ok(mut l) = log.lock() {
        l.push(Asked {
            method: req.method.clone(),
            path: req.path.clone(),
            status,
        });
    }
    let _ = respond(&mut stream, status, &body);
}

/// What the log must show: the token PUT first, every GET after it with
/// the token (no 401), user-data and local-hostname read.
pub fn check_imds_log(log: &[Asked]) -> Result<(), String> {
    let first = log.first().ok_or("the metadata server was never asked")?;
    if (first.method.as_str(), first.path.as_str(), first.status)
        != ("PUT", "/latest/api/token", 200)
    {
        return Err(format!("the first request was not the token PUT: {log:?}"));
    }
    if let Some(refused) = log.iter().find(|a| a.status == 401 || a.status == 400) {
        return Err(format!(
            "a request lacked the token: {refused:?} in {log:?}"
        ));
    }
    for path in ["/latest/user-data", "/latest/meta-data/local-hostname"] {
        if !log
            .iter()
            .any(|a| a.method == "GET" && a.path == path && a.status == 200)
        {
            return Err(format!("{path} was never read: {log:?}"));
        }
    }
    Ok(())
}

/// The OpenStack layout's two files, in `dir`: (user_data, meta_data.json).
fn write_drive_files(dir: &Path, user_data: &str) -> Result<(PathBuf, PathBuf), ScenarioError> {
    std::fs::create_dir_all(dir).map_err(ScenarioError::Scratch)?;
    let ud = dir.join("user_data");
    let md = dir.join("meta_data.json");
    std::fs::write(&ud, user_data).map_err(ScenarioError::Scratch)?;
    let meta = serde_json::json!({
        "uuid": "83679162-1378-4288-a2d4-70e13ec132aa",
        "hostname": DRIVE_HOSTNAME,
        "name": "web-1",
    });
    std::fs::write(&md, meta.to_string()).map_err(ScenarioError::Scratch)?;
    Ok((ud, md))
}

/// An iso9660 image labelled `config-2` holding the OpenStack layout, as
/// Nova makes it (`-V config-2`, Rock Ridge and Joliet names).
fn make_iso_config_drive(dir: &Path, user_data: &str) -> Result<PathBuf, ScenarioError> {
    let tree = dir.join("iso-tree");
    write_drive_files(&tree.join("openstack/latest"), user_data)?;
    let img = dir.join("config-drive.iso");
    disk::run(
        Command::new("xorriso")
            .args([
                "-as", "mkisofs", "-quiet", "-V", "config-2", "-r", "-J", "-o",
            ])
            .arg(&img)
            .arg(&tree),
    )?;
    Ok(img)
}

/// A vfat image labelled `config-2` holding the OpenStack layout.
fn make_config_drive(dir: &Path, user_data: &str) -> Result<PathBuf, ScenarioError> {
    let img = dir.join("config-drive.img");
    let (ud, md) = write_drive_files(&dir.join("vfat-files"), user_data)?;
    // vfat labels are upper case; the agent matches `config-2` in any case.
    disk::run(
        Command::new("mkfs.vfat")
            .args(["-C", "-n", "CONFIG-2"])
            .arg(&img)
            .arg("2048"),
    )?;
    disk::run(
        Command::new("mmd")
            .arg("-i")
            .arg(&img)
            .args(["::openstack", "::openstack/latest"]),
    )?;
    for (file, name) in [(&ud, "user_data"), (&md, "meta_data.json")] {
        disk::run(
            Command::new("mcopy")
                .arg("-i")
                .arg(&img)
                .arg(file)
                .arg(format!("::openstack/latest/{name}")),
        )?;
    }
    Ok(img)
}

/// Ready, the API up with the operator's CA from user-data, and `/status`
/// naming the node `hostname` without a configuration error.
/// `ignored` lists the block devices whose user-data must be reported
/// ignored; any other `user-data-ignored` fails.
fn check_node(
    vm: &mut Vm,
    ctx: &Context,
    op: &Operator,
    hostname: &str,
    ignored: &[&str],
) -> Result<(), ScenarioError> {
    let ev = vm.wait_for_any(&["ready", "boot-failed", "config-error"], ctx.boot_timeout)?;
    if ev.name != "ready" {
        return Err(vm.fail(format!("expected ready, got {}", ev.json())).into());
    }
    let seen: Vec<_> = vm
        .events_seen()
        .iter()
        .filter(|e| e.name == "user-data-ignored")
        .cloned()
        .collect();
    let devices: Vec<&str> = seen.iter().filter_map(|e| e.str_field("device")).collect();
    if devices != ignored || seen.len() != ignored.len() {
        let all: Vec<String> = seen.iter().map(|e| e.json()).collect();
        return Err(vm
            .fail(format!(
                "expected user-data-ignored for exactly {ignored:?}, saw {all:?}"
            ))
            .into());
    }
    let port = vm
        .api_port()
        .ok_or_else(|| ScenarioError::Setup("no API port forwarded".into()))?;
    let pin = operator::api_pin(vm, 0)?;
    operator::wait_healthz(vm, port, &pin)?;
    let admin = op.admin_tls(&pin)?;
    let status = admin.request(port, "GET", "/status", None, Duration::from_secs(20))?;
    let v: serde_json::Value = serde_json::from_str(&status.body)
        .map_err(|e| ScenarioError::Setup(format!("/status: {e}: {}", status.body)))?;
    if v["node"]["hostname"] != hostname || !v["node"]["config_error"].is_null() {
        return Err(vm
            .fail(format!(
                "expected host name {hostname:?} and no config error: {}",
                status.body
            ))
            .into());
    }
    vm.progress(&format!(
        "user-data applied (API over pinned HTTPS), host name {hostname}"
    ));
    Ok(())
}

/// `cloud-imds`: user-data and host name from an IMDSv2 metadata server.
pub fn cloud_imds(ctx: &Context) -> Result<(), ScenarioError> {
    let op = Operator::new()?;
    // No host name in the user-data: the metadata's must be taken.
    let server = ImdsServer::start(op.api_user_data()?)?;
    let mut vm = ctx
        .vm("cloud-imds")
        .forward_api()
        .user_net("169.254.0.0/16", "169.254.0.2")
        .smbios_system("manufacturer=Amazon EC2,product=m7i.large")
        .guestfwd(GuestFwd {
            guest_addr: "169.254.169.254:80".into(),
            host_port: server.port(),
        })
        .spawn()?;
    check_node(&mut vm, ctx, &op, IMDS_HOSTNAME, &[])?;
    let log = server.log();
    check_imds_log(&log).map_err(|m| vm.fail(m))?;
    vm.progress(&format!(
        "metadata server: token PUT first, then {} GETs with the token",
        log.len() - 1
    ));
    Ok(())
}

/// `cloud-config-drive`: user-data and host name from an iso9660 config-2
/// volume; a second, vfat, config-2 volume is found and ignored.
pub fn cloud_config_drive(ctx: &Context) -> Result<(), ScenarioError> {
    let scratch = tempfile::tempdir().map_err(ScenarioError::Scratch)?;
    let op = Operator::new()?;
    let iso = make_iso_config_drive(scratch.path(), &op.api_user_data()?)?;
    // Nothing a node could use: if it were taken, the API check fails.
    let vfat = make_config_drive(scratch.path(), "hostname = \"not-this-one\"\n")?;
    // Attached in this order: /dev/vdb, then /dev/vdc.
    let mut vm = ctx
        .vm("cloud-config-drive")
        .forward_api()
        .extra_drive(&iso)
        .extra_drive(&vfat)
        .spawn()?;
    check_node(&mut vm, ctx, &op, DRIVE_HOSTNAME, &["/dev/vdc"])?;
    vm.progress("iso9660 config-2 (/dev/vdb) taken; the vfat config-2 (/dev/vdc) reported ignored");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn ask(port: u16, head: &str) -> (u16, String) {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(s, "{head}Host: 169.254.169.254\r\n\r\n").unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).unwrap();
        let status = raw[9..12].parse().unwrap();
        let body = raw.split_once("\r\n\r\n").unwrap().1.to_owned();
        (status, body)
    }

    #[test]
    fn the_server_enforces_imdsv2() {
        let server = ImdsServer::start("a = 1\n".into()).unwrap();
        let p = server.port();
        // IMDSv1 (no token) is refused, as on AWS with tokens required.
        assert_eq!(ask(p, "GET /latest/user-data HTTP/1.1\r\n").0, 401);
        assert_eq!(ask(p, "PUT /latest/api/token HTTP/1.1\r\n").0, 400);
        let (status, token) = ask(
            p,
            "PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 21600\r\n",
        );
        assert_eq!((status, token.as_str()), (200, TOKEN));
        let with = format!("X-aws-ec2-metadata-token: {TOKEN}\r\n");
        assert_eq!(
            ask(p, &format!("GET /latest/user-data HTTP/1.1\r\n{with}")),
            (200, "a = 1\n".into())
        );
        assert_eq!(
            ask(
                p,
                &format!("GET /latest/meta-data/local-hostname HTTP/1.1\r\n{with}")
            ),
            (200, IMDS_HOSTNAME.into())
        );
        assert_eq!(ask(p, &format!("GET /nope HTTP/1.1\r\n{with}")).0, 404);
        // This session's log fails the scenario's check (GETs without a
        // token before the PUT); a well-behaved one passes.
        assert!(check_imds_log(&server.log()).is_err());
        let good = [
            ("PUT", "/latest/api/token"),
            ("GET", "/latest/user-data"),
            ("GET", "/latest/meta-data/instance-id"),
            ("GET", "/latest/meta-data/local-hostname"),
        ]
        .map(|(m, p)| Asked {
            method: m.into(),
            path: p.into(),
            status: 200,
        });
        check_imds_log(&good).unwrap();
    }

    #[test]
    fn the_iso_config_drive_has_its_label_and_layout() {
        let dir = tempfile::tempdir().unwrap();
        if Command::new("xorriso").arg("-version").output().is_err() {
            panic!("xorriso is needed; cargo xtask deps installs it");
        }
        let img = make_iso_config_drive(dir.path(), "a = 1\n").unwrap();
        let bytes = std::fs::read(&img).unwrap();
        // The primary volume descriptor (sector 16): type 1, "CD001", and
        // the volume identifier the agent probes at offset 40.
        let pvd = &bytes[16 * 2048..17 * 2048];
        assert_eq!(&pvd[..6], b"\x01CD001");
        assert_eq!(&pvd[40..48], b"config-2");
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            text.contains(DRIVE_HOSTNAME),
            "meta_data.json is in the image"
        );
    }

    #[test]
    fn the_config_drive_has_the_openstack_layout() {
        let dir = tempfile::tempdir().unwrap();
        if Command::new("mkfs.vfat").arg("--help").output().is_err() {
            panic!("mkfs.vfat (dosfstools) is needed; cargo xtask deps installs it");
        }
        let img = make_config_drive(dir.path(), "a = 1\n").unwrap();
        let out = Command::new("mtype")
            .arg("-i")
            .arg(&img)
            .arg("::openstack/latest/meta_data.json")
            .output()
            .unwrap();
        let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(meta["hostname"], DRIVE_HOSTNAME);
        let mut boot = [0u8; 512];
        std::fs::File::open(&img)
            .unwrap()
            .read_exact(&mut boot)
            .unwrap();
        // The label the agent probes (FAT12/16 extended boot record).
        assert_eq!(&boot[0x2b..0x33], b"CONFIG-2");
    }
}
