//! Power cut before every write, fsync, rename and removal the install
//! reaches; after each, the systemd-boot model must come up on a signed,
//! complete version, and `apply` run again must complete.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use ballast_updater::bootmodel::BootModel;
use ballast_updater::control;
use ballast_updater::payload::Arch;
use common::*;

#[test]
fn every_power_cut_leaves_a_bootable_signed_version_and_apply_completes_after() {
    let v1 = payload("1.0.0", Arch::X86_64, "base", 1);
    let v2 = payload("1.1.0", Arch::X86_64, "base", 2);
    cut_power_everywhere(&v1, &v2, Repo::full_only(&[&v1, &v2]), false);
}

/// The delta path: usr.img assembled from the running slot's chunks and a
/// few downloaded ones, the unchanged initrd and kernel copied on the ESP.
#[test]
fn every_power_cut_on_the_delta_path_leaves_a_bootable_signed_version() {
    let v1 = payload("1.0.0", Arch::X86_64, "base", 1);
    let v2 = derived(&v1, "1.1.0", 500_000, 3000, 2, false);
    cut_power_everywhere(&v1, &v2, Repo::new(&[&v1, &v2]), true);
}

fn cut_power_everywhere(v1: &Payload, v2: &Payload, repo: Repo, delta: bool) {
    let (v1, v2) = (v1.clone(), v2.clone());
    // The node also has an old entry on slot B, so step 1 has work to do.
    let v0 = payload("0.9.0", Arch::X86_64, "base", 9);

    let setup = || {
        let n = TestNode::new(&v1);
        let entries = n.layout.entries_dir();
        n.fs.put(
            &entries.join("ballast-0.9.0.conf"),
            entry_text(&v0, ballast_updater::cmdline::Slot::B).as_bytes(),
        );
        n.fs.put(&n.layout.kernel_path(v0.version()), &v0.kernel);
        n.fs.put(&n.layout.initrd_path(v0.version()), &v0.initrd);
        let mut slot_b = v0.usr.clone();
        slot_b.resize(SLOT_BYTES, 0);
        n.fs.put(&n.layout.slot_b.path, &slot_b);
        n
    };
    // Count the operations of a complete install.
    let total = {
        let n = setup();
        let installed = n.apply(&repo).unwrap().installed.unwrap();
        assert_eq!(installed.delta, delta, "{installed:?}");
        n.fs.ops_done()
    };
    assert!(total > 10, "install made only {total} durable operations");

    let mut cuts = 0;
    for cut_after in 0..=total {
        let n = setup();
        n.fs.cut_power_after(cut_after);
        let result = n.apply(&repo);
        if !n.fs.power_was_cut() {
            result.unwrap();
            assert_eq!(cut_after, total, "finished early");
            continue;
        }
        cuts += 1;
        assert!(result.is_err(), "cut after {cut_after} but apply succeeded");
        n.fs.reboot_after_crash();

        // A copy of the disk boots in the model.
        let disk = n.fs.fork();
        let model = BootModel {
            storage: &disk,
            esp: &n.layout.esp,
        };
        let up = model
            .boot_until_good(8, |e| boots_fine(&disk, &n.layout, &[&v0, &v1, &v2], e))
            .unwrap()
            .unwrap_or_else(|| panic!("no bootable version after a cut after {cut_after} ops"));
        assert!(
            [v1.version(), v2.version(), v0.version()].contains(&up.name.version),
            "booted {up:?}"
        );

        // The same disk, apply again without cuts: completes.
        let report = n
            .apply(&repo)
            .unwrap_or_else(|e| panic!("re-apply after cut {cut_after}: {e}"));
        let installed = report.installed.expect("installed");
        assert_eq!(installed.version, v2.version());
        // And now the new version boots first, on trial.
        let disk = n.fs.fork();
        let model = BootModel {
            storage: &disk,
            esp: &n.layout.esp,
        };
        let up = model
            .boot_until_good(1, |e| boots_fine(&disk, &n.layout, &[&v2], e))
            .unwrap()
            .expect("v2 boots after the completed install");
        assert_eq!(up.chosen, "ballast-1.1.0+3.conf");
    }
    assert_eq!(cuts, total, "every operation was cut once");
    eprintln!("{total} durable operations, each cut once");
}

#[test]
fn power_cut_during_bless_and_rollback_keeps_a_bootable_entry() {
    let v1 = payload("1.0.0", Arch::X86_64, "base", 1);
    let v2 = payload("1.1.0", Arch::X86_64, "base", 2);
    let repo = Repo::new(&[&v1, &v2]);
    for cut_after in 0..6 {
        let n = TestNode::new(&v1);
        n.apply(&repo).unwrap();
        // Reboot into v2 (the loader counts the try), now running v2.
        let model = BootModel {
            storage: &n.fs,
            esp: &n.layout.esp,
        };
        model.boot_once().unwrap().unwrap();
        let mut layout = n.layout.clone();
        layout.running = ballast_updater::cmdline::BootParams::for_payload(
            &v2.meta,
            ballast_updater::cmdline::Slot::B,
            uuid_b(),
        );
        n.fs.cut_power_after(cut_after);
        let bless = control::mark_good(&n.fs, &layout, n.now);
        n.fs.reboot_after_crash();
        n.fs.cut_power_after(cut_after);
        let rb = control::rollback(&n.fs, &layout, "test", n.now);
        n.fs.reboot_after_crash();
        let _ = (bless, rb);
        let disk = n.fs.fork();
        let model = BootModel {
            storage: &disk,
            esp: &n.layout.esp,
        };
        model
            .boot_until_good(8, |e| boots_fine(&disk, &n.layout, &[&v1, &v2], e))
            .unwrap()
            .unwrap_or_else(|| panic!("no bootable entry after cut {cut_after}"));
    }
}
