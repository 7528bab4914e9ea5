//! The `k8s` scenario: the k8s-profile image boots with `[kubernetes]
//! standalone = true`, the agent renders the containerd, kubelet and CNI
//! files and supervises containerd, and a container runs from an OCI image
//! the test builds on the host (Debian's static busybox in one layer;
//! index, manifest and config written here with their SHA-256 digests; no
//! registry, no network). The archive reaches the guest as a read-only raw
//! drive that `ctr images import` reads like a file; the container's
//! command writes a console event (`k8s-test-container`: its PID inside its
//! PID namespace, its `uname -m`, and which rendered files it sees in the
//! node's `/etc`), and `/status` shows containerd running, the import and
//! container services ended successfully, and no kubelet (the image has
//! none).
//!
//! The k8s image lives beside the base one (`build/<arch>/k8s/<version>`,
//! built by `cargo xtask vm-test` when this scenario is selected); an image
//! passed with `--image` that is itself a k8s image is used directly.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ballast_updater::payload::Arch;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::disk;
use crate::image::BuiltImage;
use crate::operator::{self, Operator};
use crate::scenarios::{Context, ScenarioError};

/// The profile name the image's payload carries as its variant.
pub const PROFILE: &str = "k8s";
/// Name the imported image gets (`io.containerd.image.name`).
pub const IMAGE_REF: &str = "docker.io/ballast-test/hello:1";
/// The console event the container prints.
pub const CONTAINER_EVENT: &str = "k8s-test-container";
/// The guest device of the archive drive: the image disk is the first
/// virtio-blk device, the archive the second.
pub const ARCHIVE_DEVICE: &str = "/dev/vdb";

/// Where the container sees the node's `/etc` (read-only bind mount).
pub const HOST_ETC: &str = "/host-etc";

/// The container's command: a console event naming the PID it sees (1
/// inside its own PID namespace), the machine it runs on, and whether the
/// files the agent renders for `[kubernetes]` are in the node's `/etc`.
const CONTAINER_SCRIPT: &str = concat!(
    "has() { if [ -f /host-etc/$1 ]; then echo true; else echo false; fi; }; ",
    "rendered=false; /bin/busybox grep -q 'Rendered by ballast' /host-etc/containerd/config.toml && rendered=true; ",
    "echo \"BALLAST-EVENT {\\\"event\\\":\\\"k8s-test-container\\\",\\\"pid\\\":$$,",
    "\\\"machine\\\":\\\"$(/bin/busybox uname -m)\\\",",
    "\\\"kubelet_config\\\":$(has kubernetes/kubelet-config.json),",
    "\\\"cni_conflist\\\":$(has cni/net.d/10-ballast-bridge.conflist),",
    "\\\"containerd_config_rendered\\\":$rendered}\" > /dev/console"
);

/// Where the k8s image of `base` (an image directory
/// `build/<arch>/<version>`) is: `build/<arch>/k8s/<version>`.
pub fn image_dir_beside(base: &Path, version: &str) -> PathBuf {
    base.parent()
        .unwrap_or(Path::new("."))
        .join(PROFILE)
        .join(version)
}

/// The node's user-data: a host name (the Node's name), the operator's
/// `[api]` section (HTTPS on the forwarded port, its client CA), a static
/// address,
/// `[kubernetes] standalone = true` (the agent renders the containerd,
/// kubelet and CNI files and supervises containerd; with no kubelet in the
/// image it starts no kubelet), and the import and the container as user
/// services; both retry until containerd answers and the image is there.
/// The container gets the console device and a read-only view of `/etc`,
/// nothing else beyond ctr's defaults.
pub fn user_data(api_section: &str) -> String {
    format!(
        "hostname = \"k8s-node\"\n\
         {api_section}\
         [network.interfaces.eth0]\naddresses = [\"10.0.2.15/24\"]\ngateway = \"10.0.2.2\"\n\
         [kubernetes]\nstandalone = true\n\
         [services.import]\ncommand = [\"ctr\", \"-n\", \"k8s.io\", \"images\", \"import\", \"{ARCHIVE_DEVICE}\"]\n\
         restart = \"on-failure\"\n\
         [services.hello]\ncommand = [\"ctr\", \"-n\", \"k8s.io\", \"run\", \"--rm\", \"--device\", \"/dev/console\", \
         \"--mount\", \"type=bind,src=/etc,dst={HOST_ETC},options=rbind:ro\", \"{IMAGE_REF}\", \"hello\"]\n\
         after = [\"import\"]\nrestart = \"on-failure\"\n"
    )
}

fn digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn tar_entry(
    b: &mut tar::Builder<Vec<u8>>,
    path: &str,
    mode: u32,
    data: &[u8],
    dir: bool,
) -> std::io::Result<()> {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(if dir {
        tar::EntryType::Directory
    } else {
        tar::EntryType::Regular
    });
    h.set_mode(mode);
    h.set_size(data.len() as u64);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    b.append_data(&mut h, path, data)
}

/// An OCI image-layout archive (`oci-layout`, `index.json`,
/// `blobs/sha256/*`) of one uncompressed layer holding `/bin/busybox`,
/// whose config runs [`CONTAINER_SCRIPT`]. Byte-identical for the same
/// input; a multiple of 512 bytes, as a raw drive must be.
pub fn oci_archive(busybox: &[u8], arch: Arch) -> std::io::Result<Vec<u8>> {
    let mut layer = tar::Builder::new(Vec::new());
    tar_entry(&mut layer, "bin/", 0o755, &[], true)?;
    tar_entry(&mut layer, "bin/busybox", 0o755, busybox, false)?;
    let layer = layer.into_inner()?;
    let layer_digest = digest(&layer);
    let config = serde_json::to_vec(&json!({
        "architecture": arch.debian(),
        "os": "linux",
        "config": {
            "Env": ["PATH=/bin"],
            "Cmd": ["/bin/busybox", "sh", "-c", CONTAINER_SCRIPT],
        },
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    }))?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": digest(&config),
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest,
            "size": layer.len(),
        }],
    }))?;
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest(&manifest),
            "size": manifest.len(),
            "platform": {"architecture": arch.debian(), "os": "linux"},
            "annotations": {
                "io.containerd.image.name": IMAGE_REF,
                "org.opencontainers.image.ref.name": "1",
            },
        }],
    }))?;
    let mut out = tar::Builder::new(Vec::new());
    tar_entry(
        &mut out,
        "oci-layout",
        0o644,
        br#"{"imageLayoutVersion":"1.0.0"}"#,
        false,
    )?;
    tar_entry(&mut out, "index.json", 0o644, &index, false)?;
    tar_entry(&mut out, "blobs/", 0o755, &[], true)?;
    tar_entry(&mut out, "blobs/sha256/", 0o755, &[], true)?;
    for blob in [&layer, &config, &manifest] {
        let name = format!("blobs/sha256/{}", &digest(blob)["sha256:".len()..]);
        tar_entry(&mut out, &name, 0o644, blob, false)?;
    }
    out.into_inner()
}

/// Debian's `busybox-static` for `arch`, fetched with `apt-get download`
/// into `dir` and unpacked there; returns the binary's bytes.
fn busybox(arch: Arch, dir: &Path) -> Result<Vec<u8>, ScenarioError> {
    disk::run(
        Command::new("apt-get")
            .args(["download", "-q"])
            .arg(format!("busybox-static:{}", arch.debian()))
            .current_dir(dir),
    )?;
    let deb = std::fs::read_dir(dir)
        .map_err(ScenarioError::Scratch)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .ok_or_else(|| {
            ScenarioError::Setup(format!(
                "apt-get download busybox-static:{} left no .deb in {}",
                arch.debian(),
                dir.display()
            ))
        })?;
    let root = dir.join("busybox-root");
    disk::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    std::fs::read(root.join("bin/busybox"))
        .map_err(|e| ScenarioError::Setup(format!("{} has no bin/busybox: {e}", deb.display())))
}

/// The k8s image to boot for `ctx`.
fn k8s_image(ctx: &Context) -> Result<BuiltImage, ScenarioError> {
    if ctx.image.meta.variant == PROFILE {
        return Ok(ctx.image.clone());
    }
    let dir = image_dir_beside(&ctx.image.dir, &ctx.image.meta.version.to_string());
    let image = BuiltImage::load(&dir).map_err(|e| {
        ScenarioError::Setup(format!(
            "the k8s image: {e} (cargo xtask vm-test builds it, or cargo xtask image --profile k8s)"
        ))
    })?;
    if image.meta.variant != PROFILE || image.meta.arch != ctx.arch {
        return Err(ScenarioError::Setup(format!(
            "{} holds a {} {} image, expected {PROFILE} {}",
            dir.display(),
            image.meta.variant,
            image.meta.arch,
            ctx.arch
        )));
    }
    Ok(image)
}

/// One service of `/status`, by name.
fn service<'a>(status: &'a Value, name: &str) -> Option<&'a Value> {
    status["services"]
        .as_array()?
        .iter()
        .find(|s| s["name"] == name)
}

/// `k8s`: containerd supervised; an imported local OCI image runs.
pub fn k8s(ctx: &Context) -> Result<(), ScenarioError> {
    let image = k8s_image(ctx)?;
    let scratch = tempfile::Builder::new()
        .prefix("ballast-k8s-")
        .tempdir()
        .map_err(ScenarioError::Scratch)?;
    let archive = oci_archive(&busybox(ctx.arch, scratch.path())?, ctx.arch)
        .map_err(ScenarioError::Scratch)?;
    let archive_path = scratch.path().join("hello-oci.tar");
    std::fs::write(&archive_path, &archive).map_err(ScenarioError::Scratch)?;
    eprintln!(
        "  [k8s {}] OCI archive {} ({} bytes) as {ARCHIVE_DEVICE}, image {}",
        ctx.arch,
        archive_path.display(),
        archive.len(),
        image.dir.display()
    );

    let op = Operator::new()?;
    let mut vm = ctx
        .vm("k8s")
        .disk(&image.disk)
        .forward_api()
        .user_data(user_data(&op.api_user_data()?).as_bytes())
        .extra_drive(&archive_path)
        .spawn()?;
    let ready = vm.wait_for_any(&["ready", "boot-failed", "config-error"], ctx.boot_timeout)?;
    if ready.name != "ready" || ready.str_field("version") != Some(&image.meta.version.to_string())
    {
        return Err(vm
            .fail(format!(
                "expected ready on the k8s image, got {}",
                ready.json()
            ))
            .into());
    }
    // containerd's first start, the import and the container's run under
    // TCG: a few tens of seconds, more with the services' restart backoff.
    let ev = vm.wait_for_any(&[CONTAINER_EVENT, "boot-failed"], Duration::from_secs(300))?;
    let machine = ev.str_field("machine");
    let pid = ev.fields.get("pid").and_then(Value::as_u64);
    if ev.name != CONTAINER_EVENT || machine != Some(ctx.arch.as_str()) || pid != Some(1) {
        return Err(vm
            .fail(format!(
                "expected the container's event from PID 1 on {}, got {}",
                ctx.arch,
                ev.json()
            ))
            .into());
    }
    vm.progress("the container ran: its event came from PID 1 of its own PID namespace");
    let rendered = [
        "kubelet_config",
        "cni_conflist",
        "containerd_config_rendered",
    ];
    if let Some(missing) = rendered
        .iter()
        .find(|k| ev.fields.get(**k) != Some(&Value::Bool(true)))
    {
        return Err(vm
            .fail(format!(
                "[kubernetes] standalone: {missing} is not true in the node's /etc as the container saw it: {}",
                ev.json()
            ))
            .into());
    }
    vm.progress("rendered: kubelet-config.json, the CNI bridge conflist, containerd's config");

    let port = vm
        .api_port()
        .ok_or_else(|| ScenarioError::Setup("no API port forwarded".into()))?;
    let pin = operator::api_pin(&mut vm, 0)?;
    let api = op.admin_tls(&pin)?;
    // The container printed before `ctr run` returned: wait for the
    // supervisor to see the exit.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last;
    loop {
        let r = api.request(port, "GET", "/status", None, Duration::from_secs(20))?;
        let status: Value = serde_json::from_str(&r.body).unwrap_or(Value::Null);
        let state = |name: &str| service(&status, name).map(|s| s["state"].clone());
        let code = |name: &str| service(&status, name).map(|s| s["last_exit"]["code"].clone());
        // No kubelet in the image: the agent starts none, and says so in
        // the health report (passing: the node is standalone).
        let kubelet_check = status["health"]["checks"]
            .as_array()
            .and_then(|checks| checks.iter().find(|c| c["name"] == "kubelet"));
        let ok = state("containerd") == Some(json!("running"))
            && state("import") == Some(json!("exited"))
            && state("hello") == Some(json!("exited"))
            && code("hello") == Some(json!(0))
            && service(&status, "kubelet").is_none()
            && kubelet_check.is_some_and(|c| {
                c["ok"] == json!(true)
                    && c["message"]
                        .as_str()
                        .is_some_and(|m| m.starts_with("kubelet not installed"))
            });
        last = r.body;
        if ok {
            break;
        }
        if Instant::now() >= deadline {
            return Err(vm
                .fail(format!(
                    "/status: expected containerd running, import and hello exited with code 0, no kubelet, a passing health entry kubelet \"kubelet not installed...\": {last}"
                ))
                .into());
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    vm.progress("/status: containerd running; import and hello exited 0; no kubelet service; health entry kubelet: not installed (standalone)");
    vm.kill();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(archive: &[u8]) -> Vec<(String, Vec<u8>)> {
        let mut a = tar::Archive::new(archive);
        a.entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let name = e.path().unwrap().to_string_lossy().into_owned();
                let mut data = Vec::new();
                std::io::Read::read_to_end(&mut e, &mut data).unwrap();
                (name, data)
            })
            .collect()
    }

    #[test]
    fn the_archive_is_a_consistent_oci_layout() {
        let archive = oci_archive(b"\x7fELF busybox", Arch::Aarch64).unwrap();
        assert_eq!(archive.len() % 512, 0);
        assert_eq!(
            archive,
            oci_archive(b"\x7fELF busybox", Arch::Aarch64).unwrap()
        );
        let files: std::collections::BTreeMap<String, Vec<u8>> = entries(&archive)
            .into_iter()
            .filter(|(n, _)| !n.ends_with('/'))
            .collect();
        // every blob is named by its digest
        for (name, data) in &files {
            if let Some(hex) = name.strip_prefix("blobs/sha256/") {
                assert_eq!(digest(data), format!("sha256:{hex}"));
            }
        }
        let blob = |d: &Value| {
            let d = d.as_str().unwrap().strip_prefix("sha256:").unwrap();
            files[&format!("blobs/sha256/{d}")].clone()
        };
        let index: Value = serde_json::from_slice(&files["index.json"]).unwrap();
        let m = &index["manifests"][0];
        assert_eq!(m["annotations"]["io.containerd.image.name"], IMAGE_REF);
        assert_eq!(m["platform"]["architecture"], "arm64");
        let manifest: Value = serde_json::from_slice(&blob(&m["digest"])).unwrap();
        assert_eq!(m["size"], blob(&m["digest"]).len());
        let config: Value = serde_json::from_slice(&blob(&manifest["config"]["digest"])).unwrap();
        let layer = blob(&manifest["layers"][0]["digest"]);
        assert_eq!(
            config["rootfs"]["diff_ids"][0],
            manifest["layers"][0]["digest"]
        );
        let layer_files = entries(&layer);
        assert!(layer_files
            .iter()
            .any(|(n, d)| n == "bin/busybox" && d == b"\x7fELF busybox"));
        let cmd = config["config"]["Cmd"].as_array().unwrap();
        assert_eq!(cmd[0], "/bin/busybox");
    }

    #[test]
    fn the_container_script_prints_a_parsable_event() {
        // Run it with the host's sh against a stand-in for the node's /etc
        // and stdout for the console.
        let etc = tempfile::tempdir().unwrap();
        for (path, text) in [
            ("kubernetes/kubelet-config.json", "{}"),
            (
                "containerd/config.toml",
                "# Rendered by ballast at every boot\n",
            ),
        ] {
            let p = etc.path().join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        let script = CONTAINER_SCRIPT
            .replace("/bin/busybox ", "")
            .replace(HOST_ETC, &etc.path().to_string_lossy())
            .replace(" > /dev/console", "");
        let out = Command::new("sh").arg("-c").arg(&script).output().unwrap();
        let line = String::from_utf8(out.stdout).unwrap();
        let ev = crate::events::parse_line(line.trim()).unwrap().unwrap();
        assert_eq!(ev.name, CONTAINER_EVENT);
        assert!(ev.fields["pid"].as_u64().is_some(), "{line}");
        assert_eq!(ev.str_field("machine"), Some(std::env::consts::ARCH));
        assert_eq!(ev.fields["kubelet_config"], true);
        assert_eq!(ev.fields["cni_conflist"], false);
        assert_eq!(ev.fields["containerd_config_rendered"], true);
    }

    #[test]
    fn user_data_turns_kubernetes_on_and_declares_the_services() {
        let ud = user_data(&operator::api_section("PEM"));
        let v: toml::Table = ud.parse().unwrap();
        let services = v["services"].as_table().unwrap();
        let names: Vec<&str> = services.keys().map(String::as_str).collect();
        assert_eq!(names, ["hello", "import"]);
        assert_eq!(v["kubernetes"]["standalone"].as_bool(), Some(true));
        assert_eq!(services["hello"]["after"][0].as_str(), Some("import"));
        let run = services["hello"]["command"].as_array().unwrap();
        assert!(run.iter().any(|a| a.as_str() == Some(IMAGE_REF)));
        let import = services["import"]["command"].as_array().unwrap();
        assert_eq!(import.last().and_then(|a| a.as_str()), Some(ARCHIVE_DEVICE));
        assert_eq!(
            image_dir_beside(Path::new("build/x86_64/1.0.0"), "1.0.0"),
            PathBuf::from("build/x86_64/k8s/1.0.0")
        );
    }
}
