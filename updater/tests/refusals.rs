//! Every refusal of issue 3: a distinct error, and the node's files (ESP,
//! slots, state) exactly as they were.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::time::Duration;

use ballast_updater::install::{ApplyOptions, InstallError};
use ballast_updater::keys::{SecretKey, TrustedKeys};
use ballast_updater::manifest::{self, Manifest, ManifestError, Signature};
use ballast_updater::payload::Arch;
use ballast_updater::storage::{write_atomic, Storage};
use common::*;

fn v1() -> Payload {
    payload("1.0.0", Arch::X86_64, "base", 1)
}
fn v2() -> Payload {
    payload("1.1.0", Arch::X86_64, "base", 2)
}

/// Runs apply on a fresh node and checks nothing changed.
fn refused(node: &TestNode, repo: &Repo, trust: &TrustedKeys, opts: &ApplyOptions) -> InstallError {
    let before = node.fs.snapshot();
    let err = node
        .apply_with(&repo.fetch(), trust, opts)
        .expect_err("apply should refuse");
    assert_eq!(node.fs.snapshot(), before, "refusal {err} changed files");
    eprintln!("refused: {err}");
    err
}

/// `refused` on a fresh node running `running`, trusting the repo's key,
/// with default options: the shape of most refusals.
fn refused_by(running: &Payload, repo: &Repo) -> InstallError {
    refused(
        &TestNode::new(running),
        repo,
        &repo.trust(),
        &ApplyOptions::default(),
    )
}

fn resign_with(repo: &Repo, keys: &[&SecretKey]) {
    let bytes = std::fs::read(repo.path().join("manifest.json")).unwrap();
    let sigs: Vec<Signature> = keys
        .iter()
        .map(|k| Signature {
            key_id: k.key_id(),
            signature: hex::encode(k.sign(&bytes)),
        })
        .collect();
    std::fs::write(
        repo.path().join("manifest.json.sig"),
        serde_json::to_vec(&sigs).unwrap(),
    )
    .unwrap();
}

/// Rewrites the manifest with `edit` and signs it with the repo key.
fn edit_manifest(repo: &Repo, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = repo.path().join("manifest.json");
    let mut value: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut value);
    std::fs::write(&path, serde_json::to_vec_pretty(&value).unwrap()).unwrap();
    resign_with(repo, &[&repo.key]);
}

#[test]
fn tampered_manifest_is_refused() {
    let (a, b) = (v1(), v2());
    let repo = Repo::new(&[&a, &b]);
    let path = repo.path().join("manifest.json");
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x20;
    std::fs::write(&path, bytes).unwrap();
    let err = refused_by(&a, &repo);
    assert!(
        matches!(
            err,
            InstallError::Manifest(ManifestError::BadSignature { .. })
        ),
        "{err}"
    );
}

#[test]
fn missing_signature_is_refused() {
    let (a, b) = (v1(), v2());
    let repo = Repo::new(&[&a, &b]);
    std::fs::remove_file(repo.path().join("manifest.json.sig")).unwrap();
    let err = refused_by(&a, &repo);
    assert!(
        matches!(err, InstallError::Manifest(ManifestError::MissingSignature)),
        "{err}"
    );
}

#[test]
fn unknown_key_is_refused() {
    let (a, b) = (v1(), v2());
    let repo = Repo::new(&[&a, &b]);
    let stranger = TrustedKeys::new([SecretKey::from_seed([9; 32]).public()], 1).unwrap();
    let err = refused(
        &TestNode::new(&a),
        &repo,
        &stranger,
        &ApplyOptions::default(),
    );
    assert!(
        matches!(
            err,
            InstallError::Manifest(ManifestError::UnknownKey { .. })
        ),
        "{err}"
    );
}

#[test]
fn too_few_signatures_are_refused() {
    let (a, b) = (v1(), v2());
    let repo = Repo::new(&[&a, &b]);
    let second = SecretKey::from_seed([8; 32]);
    let trust = TrustedKeys::new([repo.key.public(), second.public()], 2).unwrap();
    let err = refused(&TestNode::new(&a), &repo, &trust, &ApplyOptions::default());
    assert!(
        matches!(
            err,
            InstallError::Manifest(ManifestError::Threshold {
                valid: 1,
                threshold: 2
            })
        ),
        "{err}"
    );
    // Both keys sign: accepted.
    resign_with(&repo, &[&repo.key, &second]);
    TestNode::new(&a)
        .apply_with(&repo.fetch(), &trust, &ApplyOptions::default())
        .unwrap();
}

#[test]
fn expired_manifest_is_refused() {
    let (a, b) = (v1(), v2());
    let repo = Repo::new(&[&a, &b]);
    let mut node = TestNode::new(&a);
    node.now += Duration::from_secs(7200);
    let err = refused(&node, &repo, &repo.trust(), &ApplyOptions::default());
    assert!(
        matches!(err, InstallError::Manifest(ManifestError::Expired { .. })),
        "{err}"
    );
}

#[test]
fn replayed_sequence_is_refused() {
    let (a, b) = (v1(), v2());
    let repo = Repo::new(&[&a, &b]);
    let node = TestNode::new(&a);
    write_atomic(
        &node.fs,
        std::path::Path::new("/state/highest-sequence"),
        b"5\n",
    )
    .unwrap();
    node.fs.sync_everything();
    let err = refused(&node, &repo, &repo.trust(), &ApplyOptions::default());
    assert!(
        matches!(
            err,
            InstallError::Manifest(ManifestError::Replay {
                sequence: 1,
                highest_seen: 5
            })
        ),
        "{err}"
    );
}

#[test]
fn sequence_is_persisted_and_older_manifests_refused_later() {
    let (a, b) = (v1(), v2());
    let repo = Repo::new(&[&a, &b]);
    let old = (
        std::fs::read(repo.path().join("manifest.json")).unwrap(),
        std::fs::read(repo.path().join("manifest.json.sig")).unwrap(),
    );
    repo.sign(); // sequence 2
    let node = TestNode::new(&a);
    node.apply(&repo).unwrap();
    std::fs::write(repo.path().join("manifest.json"), old.0).unwrap();
    std::fs::write(repo.path().join("manifest.json.sig"), old.1).unwrap();
    let err = node.apply(&repo).unwrap_err();
    assert!(
        matches!(
            err,
            InstallError::Manifest(ManifestError::Replay {
                sequence: 1,
                highest_seen: 2
            })
        ),
        "{err}"
    );
}

#[test]
fn release_below_floor_is_refused() {
    let (a, b) = (v1(), v2());
    let repo = Repo::new(&[&a, &b]);
    edit_manifest(&repo, |m| m["floor"] = "2.0.0".into());
    let err = refused_by(&a, &repo);
    assert!(
        matches!(
            err,
            InstallError::Manifest(ManifestError::BelowFloor { .. })
        ),
        "{err}"
    );
}

#[test]
fn downgrade_is_refused_unless_allowed() {
    let (a, b) = (v1(), v2());
    let repo = Repo::new(&[&a]);
    let node = TestNode::new(&b);
    let err = refused(&node, &repo, &repo.trust(), &ApplyOptions::default());
    assert!(
        matches!(err, InstallError::Manifest(ManifestError::Downgrade { .. })),
        "{err}"
    );
    let opts = ApplyOptions {
        version: Some(a.version()),
        allow_downgrade: true,
    };
    let report = node
        .apply_with(&repo.fetch(), &repo.trust(), &opts)
        .unwrap();
    assert_eq!(report.installed.unwrap().version, a.version());
}

#[test]
fn wrong_arch_and_variant_are_refused() {
    let (a, b) = (v1(), v2());
    let repo = Repo::new(&[&a, &b]);
    let mut node = TestNode::new(&a);
    node.arch = Arch::Aarch64;
    let err = refused(&node, &repo, &repo.trust(), &ApplyOptions::default());
    assert!(
        matches!(err, InstallError::Manifest(ManifestError::WrongArch { .. })),
        "{err}"
    );
    let mut node = TestNode::new(&a);
    node.variant = "k8s".into();
    let err = refused(&node, &repo, &repo.trust(), &ApplyOptions::default());
    assert!(
        matches!(
            err,
            InstallError::Manifest(ManifestError::WrongVariant { .. })
        ),
        "{err}"
    );
}

#[test]
fn corrupt_or_oversized_kernel_object_is_refused_before_any_change() {
    let (a, b) = (v1(), v2());
    let repo = Repo::new(&[&a, &b]);
    let kernel = repo.object(&b.meta.artifact("vmlinuz").unwrap().sha256);
    let good = std::fs::read(&kernel).unwrap();
    let mut bad = good.clone();
    bad[100] ^= 1;
    std::fs::write(&kernel, &bad).unwrap();
    let err = refused_by(&a, &repo);
    assert!(
        matches!(
            err,
            InstallError::ArtifactHash {
                artifact: "vmlinuz",
                ..
            }
        ),
        "{err}"
    );

    let mut longer = good.clone();
    longer.push(0);
    std::fs::write(&kernel, &longer).unwrap();
    let err = refused_by(&a, &repo);
    assert!(
        matches!(
            err,
            InstallError::ArtifactTooLarge {
                artifact: "vmlinuz",
                ..
            }
        ),
        "{err}"
    );

    std::fs::write(&kernel, &good[..good.len() - 1]).unwrap();
    let err = refused_by(&a, &repo);
    assert!(
        matches!(
            err,
            InstallError::Download {
                artifact: "vmlinuz",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn corrupt_usr_image_never_gets_an_entry() {
    // usr.img is streamed into the slot, so a bad byte is found after
    // step 1; the running version is untouched and nothing boots the slot.
    let (a, b) = (v1(), v2());
    let repo = Repo::new(&[&a, &b]);
    let usr = repo.object(&b.meta.artifact("usr.img").unwrap().sha256);
    let mut bytes = std::fs::read(&usr).unwrap();
    bytes[12345] ^= 1;
    std::fs::write(&usr, bytes).unwrap();
    let node = TestNode::new(&a);
    let before = node.fs.snapshot();
    let err = node.apply(&repo).unwrap_err();
    assert!(
        matches!(
            err,
            InstallError::ArtifactHash {
                artifact: "usr.img",
                ..
            }
        ),
        "{err}"
    );
    let after = node.fs.snapshot();
    for (path, bytes) in &before {
        if path != &node.layout.slot_b.path && !path.starts_with("/state") {
            assert_eq!(after.get(path), Some(bytes), "{} changed", path.display());
        }
    }
    let entries: Vec<_> = after
        .keys()
        .filter(|p| p.starts_with(node.layout.entries_dir()))
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
}

#[test]
fn payload_larger_than_slot_is_refused() {
    let (a, b) = (v1(), v2());
    let repo = Repo::new(&[&a, &b]);
    let node = TestNode::new(&a);
    node.fs.put(&node.layout.slot_b.path, &vec![0u8; 1 << 20]);
    let err = refused(&node, &repo, &repo.trust(), &ApplyOptions::default());
    assert!(matches!(err, InstallError::PayloadTooLarge { .. }), "{err}");
}

#[test]
fn escaping_names_and_versions_are_refused() {
    let (a, b) = (v1(), v2());
    let repo = Repo::new(&[&a, &b]);
    edit_manifest(&repo, |m| {
        m["releases"][1]["payload"]["artifacts"][1]["name"] = "../../EFI/BOOT/BOOTX64.EFI".into()
    });
    let err = refused_by(&a, &repo);
    assert!(
        matches!(
            err,
            InstallError::Manifest(ManifestError::UnsafeName { .. })
        ),
        "{err}"
    );

    let repo = Repo::new(&[&a, &b]);
    edit_manifest(&repo, |m| {
        m["releases"][1]["payload"]["version"] = "../../1.2.0".into()
    });
    let err = refused_by(&a, &repo);
    assert!(
        matches!(err, InstallError::Manifest(ManifestError::Parse(_))),
        "{err}"
    );

    let repo = Repo::new(&[&a, &b]);
    edit_manifest(&repo, |m| {
        m["releases"][1]["payload"]["artifacts"][0]["sha256"] = "../../../etc/passwd".into()
    });
    let err = refused_by(&a, &repo);
    assert!(
        matches!(err, InstallError::Manifest(ManifestError::Release { .. })),
        "{err}"
    );
}

#[test]
fn unblessed_running_version_is_refused() {
    let (a, b) = (v1(), v2());
    let repo = Repo::new(&[&a, &b]);
    let node = TestNode::with_entry(&a, "ballast-1.0.0+2-1.conf");
    let err = refused(&node, &repo, &repo.trust(), &ApplyOptions::default());
    assert!(matches!(err, InstallError::NotBlessed { .. }), "{err}");
}

#[test]
fn corrupted_repository_is_refused() {
    let (a, b) = (v1(), v2());
    // Signed garbage: the signature holds but the contents do not parse.
    let repo = Repo::new(&[&a, &b]);
    std::fs::write(repo.path().join("manifest.json"), b"{\"schema\": 1, \"sequ").unwrap();
    resign_with(&repo, &[&repo.key]);
    let err = refused_by(&a, &repo);
    assert!(
        matches!(err, InstallError::Manifest(ManifestError::Parse(_))),
        "{err}"
    );
    // Garbage signature list.
    let repo = Repo::new(&[&a, &b]);
    std::fs::write(repo.path().join("manifest.json.sig"), b"\x00\x01nope").unwrap();
    let err = refused_by(&a, &repo);
    assert!(
        matches!(err, InstallError::Manifest(ManifestError::SignatureList(_))),
        "{err}"
    );
    // No manifest at all.
    let repo = Repo::new(&[&a, &b]);
    std::fs::remove_file(repo.path().join("manifest.json")).unwrap();
    let err = refused_by(&a, &repo);
    assert!(matches!(err, InstallError::NoManifest { .. }), "{err}");
    // A missing object.
    let repo = Repo::new(&[&a, &b]);
    std::fs::remove_file(repo.object(&b.meta.artifact("initrd").unwrap().sha256)).unwrap();
    let err = refused_by(&a, &repo);
    assert!(
        matches!(
            err,
            InstallError::Download {
                artifact: "initrd",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn manifest_round_trips_through_sign_and_verify() {
    let (a, b) = (v1(), v2());
    let repo = Repo::new(&[&a, &b]);
    let report =
        ballast_updater::repo::verify(&repo.path(), &repo.trust(), std::time::SystemTime::now())
            .unwrap();
    assert_eq!(report.sequence, 1);
    assert_eq!(report.objects_checked, 6);
    assert_eq!(report.signed_by, vec![repo.key.key_id()]);
    // A second key appends its signature without changing the bytes.
    let second = SecretKey::from_seed([8; 32]);
    let before = std::fs::read(repo.path().join("manifest.json")).unwrap();
    ballast_updater::repo::sign(&repo.path(), &[second], Duration::from_secs(60), true).unwrap();
    assert_eq!(
        std::fs::read(repo.path().join("manifest.json")).unwrap(),
        before
    );
    let trust = TrustedKeys::new(
        [repo.key.public(), SecretKey::from_seed([8; 32]).public()],
        2,
    )
    .unwrap();
    let report =
        ballast_updater::repo::verify(&repo.path(), &trust, std::time::SystemTime::now()).unwrap();
    assert_eq!(report.signed_by.len(), 2);
    // Re-signing raises the sequence.
    repo.sign();
    let m = Manifest::parse(&std::fs::read(repo.path().join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m.sequence, 2);
    // A corrupt object fails verification.
    std::fs::write(
        repo.object(&a.meta.artifact("initrd").unwrap().sha256),
        b"x",
    )
    .unwrap();
    assert!(ballast_updater::repo::verify(
        &repo.path(),
        &repo.trust(),
        std::time::SystemTime::now()
    )
    .is_err());
    let _ = manifest::SCHEMA;
}

#[test]
fn bless_then_rollback_cycle() {
    use ballast_updater::bootmodel::BootModel;
    use ballast_updater::cmdline::{BootParams, Slot};
    use ballast_updater::control;
    let (a, b) = (v1(), v2());
    let repo = Repo::new(&[&a, &b]);
    let node = TestNode::new(&a);
    node.apply(&repo).unwrap();
    // A second apply before the reboot re-installs and still completes.
    node.apply(&repo).unwrap();
    let model = BootModel {
        storage: &node.fs,
        esp: &node.layout.esp,
    };
    assert_eq!(
        model.boot_once().unwrap().unwrap().renamed_to,
        "ballast-1.1.0+2-1.conf"
    );
    let mut layout = node.layout.clone();
    layout.running = BootParams::for_payload(&b.meta, Slot::B, uuid_b());
    let status = control::status(&node.fs, &layout).unwrap();
    assert!(!status.blessed);
    // Not blessed yet: no new install.
    let node_b = TestNode {
        fs: node.fs.clone(),
        layout: layout.clone(),
        arch: node.arch,
        variant: node.variant.clone(),
        channel: node.channel.clone(),
        now: node.now,
    };
    assert!(matches!(node_b.apply(&repo), Ok(r) if r.installed.is_none()));
    let report = control::mark_good(&node.fs, &layout, node.now).unwrap();
    assert!(!report.was_blessed);
    assert!(node
        .fs
        .exists(&layout.entries_dir().join("ballast-1.1.0.conf")));
    // Roll back to 1.0.0 on slot A.
    let rb = control::rollback(&node.fs, &layout, "operator asked", node.now).unwrap();
    assert_eq!(rb.to, a.version());
    let up = model.boot_once().unwrap().unwrap();
    assert_eq!(up.chosen, "ballast-1.0.0.conf");
    let status = control::status(&node.fs, &node.layout).unwrap();
    assert_eq!(
        status.last_event.unwrap().reason.as_deref(),
        Some("operator asked")
    );
    assert_eq!(status.rejected, vec![b.version()]);
    // Back on 1.0.0, the rejected 1.1.0 is not offered again.
    let report = node.apply(&repo).unwrap();
    assert!(report.installed.is_none(), "{:?}", report.check);
}

#[test]
fn fallback_after_failed_trial_is_detected_by_mark_good() {
    use ballast_updater::bootmodel::BootModel;
    use ballast_updater::control;
    let (a, b) = (v1(), v2());
    let repo = Repo::new(&[&a, &b]);
    let node = TestNode::new(&a);
    node.apply(&repo).unwrap();
    let model = BootModel {
        storage: &node.fs,
        esp: &node.layout.esp,
    };
    // 1.1.0 fails three times; the fourth boot is 1.0.0.
    let up = model
        .boot_until_good(5, |e| e.name.version == a.version())
        .unwrap()
        .unwrap();
    assert_eq!(up.chosen, "ballast-1.0.0.conf");
    let report = control::mark_good(&node.fs, &node.layout, node.now).unwrap();
    assert_eq!(report.rolled_back_from, vec![b.version()]);
    let report = node.apply(&repo).unwrap();
    assert!(report.installed.is_none());
}

#[test]
fn the_floor_is_kept_and_a_rollback_below_it_is_refused() {
    use ballast_updater::bootmodel::BootModel;
    use ballast_updater::cmdline::{BootParams, Slot};
    use ballast_updater::control;
    let (a, b) = (v1(), v2());
    let repo = Repo::new(&[&a, &b]);
    edit_manifest(&repo, |m| m["floor"] = b.version().to_string().into());
    let node = TestNode::new(&a);
    node.apply(&repo).unwrap();
    let model = BootModel {
        storage: &node.fs,
        esp: &node.layout.esp,
    };
    model.boot_once().unwrap().unwrap();
    let mut layout = node.layout.clone();
    layout.running = BootParams::for_payload(&b.meta, Slot::B, uuid_b());
    control::mark_good(&node.fs, &layout, node.now).unwrap();
    // The repository is gone; the node still knows the floor.
    let before = node.fs.snapshot();
    let err = control::rollback(&node.fs, &layout, "operator asked", node.now).unwrap_err();
    assert!(
        matches!(&err, control::ControlError::BelowFloor { target, floor }
            if *target == a.version() && *floor == b.version()),
        "{err}"
    );
    assert_eq!(node.fs.snapshot(), before);
}

#[test]
fn rollback_without_target_changes_nothing() {
    let a = v1();
    let node = TestNode::new(&a);
    let before = node.fs.snapshot();
    let err =
        ballast_updater::control::rollback(&node.fs, &node.layout, "x", node.now).unwrap_err();
    assert!(matches!(
        err,
        ballast_updater::control::ControlError::NoRollbackTarget { .. }
    ));
    assert_eq!(node.fs.snapshot(), before);
}

#[test]
fn node_on_a_channel_without_the_release_is_refused_then_promoted() {
    let (old, new) = (v1(), v2());
    let repo = Repo::new(&[&new]);
    ballast_updater::repo::set_channels(&repo.path(), new.version(), vec!["beta".into()]).unwrap();
    repo.sign();
    let node = TestNode::new(&old);
    let err = refused(&node, &repo, &repo.trust(), &ApplyOptions::default());
    assert!(
        matches!(
            &err,
            InstallError::Manifest(ManifestError::WrongChannel { channel, offered, .. })
                if channel == "stable" && offered == &["beta"]
        ),
        "{err}"
    );
    // A beta node takes it; promotion puts it in stable too.
    let mut beta = TestNode::new(&old);
    beta.channel = "beta".into();
    assert!(beta.apply(&repo).unwrap().installed.is_some());
    ballast_updater::repo::set_channels(
        &repo.path(),
        new.version(),
        vec!["beta".into(), "stable".into()],
    )
    .unwrap();
    repo.sign();
    assert!(node.apply(&repo).unwrap().installed.is_some());
    // An unknown version and a bad channel name change nothing.
    let manifest = std::fs::read(repo.path().join("manifest.json")).unwrap();
    assert!(ballast_updater::repo::set_channels(
        &repo.path(),
        "9.9.9".parse().unwrap(),
        vec!["beta".into()]
    )
    .is_err());
    assert!(
        ballast_updater::repo::set_channels(&repo.path(), new.version(), vec!["Beta!".into()])
            .is_err()
    );
    assert_eq!(
        std::fs::read(repo.path().join("manifest.json")).unwrap(),
        manifest
    );
}
