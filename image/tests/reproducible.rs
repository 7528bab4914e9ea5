//! Builds the tool-made pieces of an image (erofs + dm-verity, ESP, STATE,
//! GPT disk) twice from small fixtures and checks the bytes are identical,
//! that `veritysetup verify` accepts the appended tree at `hash_offset`
//! (what `VerityParams::hash_start_block` assumes) and refuses a flipped
//! byte, and that `sgdisk -v` accepts the disk. Needs erofs-utils,
//! cryptsetup-bin, dosfstools, mtools, e2fsprogs and gdisk (`cargo xtask
//! deps`); skipped with a note when they are missing. No root, no network.

#![allow(clippy::unwrap_used)] // test helpers

use std::fs;
use std::path::Path;

use ballast_image::build::{disk_layout, fixed_uuid, write_disk};
use ballast_image::cmd::{have, Cmd};
use ballast_image::fsimage;
use ballast_updater::payload::Arch;

const EPOCH: u64 = 1_700_000_000;
const MIB: u64 = 1 << 20;

fn tools_present() -> bool {
    let missing: Vec<&str> = [
        "mkfs.erofs",
        "veritysetup",
        "mkfs.fat",
        "mcopy",
        "mke2fs",
        "dumpe2fs",
        "sgdisk",
    ]
    .into_iter()
    .filter(|t| !have(t))
    .collect();
    if !missing.is_empty() {
        eprintln!("skipping: missing tools {missing:?} (run `cargo xtask deps`)");
    }
    missing.is_empty()
}

fn sha(path: &Path) -> String {
    ballast_image::apt::sha256_file(path).unwrap()
}

/// A small tree, its files created in the given order.
fn make_tree(root: &Path, names: &[&str]) {
    for n in names {
        let p = root.join(n);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, format!("content of {n}\n").repeat(300)).unwrap();
    }
    fsimage::normalize_tree(root, EPOCH, &[]).unwrap();
}

#[test]
fn tool_made_pieces_are_byte_identical_and_verity_checks() {
    if !tools_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let names = [
        "usr/bin/ballast",
        "usr/lib/os-release",
        "EFI/BOOT/BOOTX64.EFI",
        "loader/loader.conf",
        "b/z",
        "b/a",
    ];
    let mut reversed = names;
    reversed.reverse();
    make_tree(&d.join("t1"), &names);
    make_tree(&d.join("t2"), &reversed);

    let mut hashes = Vec::new();
    for i in 1..=2 {
        let tree = d.join(format!("t{i}"));
        // usr image + verity
        let erofs = d.join(format!("usr{i}.erofs"));
        fsimage::mkfs_erofs(&tree, &erofs, EPOCH, fixed_uuid("t/usr"), Some("lz4hc")).unwrap();
        let img = d.join(format!("usr{i}.img"));
        let params = fsimage::verity_format(&erofs, &img, "00ff", fixed_uuid("t/verity")).unwrap();
        assert_eq!(params.hash_offset, params.data_blocks * 4096);
        fsimage::verity_verify(&img, &params).unwrap();
        // the tree starts one block after the superblock at hash_offset
        let bytes = fs::read(&img).unwrap();
        let sb = &bytes[usize::try_from(params.hash_offset).unwrap()..];
        assert_eq!(&sb[..8], b"verity\0\0");
        assert_eq!(params.hash_start_block(), params.data_blocks + 1);
        // ESP and STATE
        let esp = d.join(format!("esp{i}.img"));
        fsimage::mkfs_esp(&tree, &esp, 64 * MIB, 0x1234_5678).unwrap();
        let state = d.join(format!("state{i}.img"));
        fsimage::mkfs_state(
            &state,
            32 * MIB,
            fixed_uuid("t/state"),
            fixed_uuid("t/seed"),
            EPOCH,
        )
        .unwrap();
        assert!(fsimage::ext4_used(&state).unwrap() > 0);
        // disk
        let layout = disk_layout(Arch::Aarch64, 64 * MIB, 8 * MIB, 32 * MIB).unwrap();
        let disk = d.join(format!("disk{i}.raw"));
        write_disk(
            &layout,
            &disk,
            &[("ESP", &esp), ("USR-A", &img), ("STATE", &state)],
        )
        .unwrap();
        Cmd::new("sgdisk").arg("-v").arg(&disk).run().unwrap();
        hashes.push([sha(&img), sha(&esp), sha(&state), sha(&disk)]);

        // a flipped data byte is refused
        let mut bad = bytes.clone();
        bad[4096 + 17] ^= 1;
        let bad_path = d.join("bad.img");
        fs::write(&bad_path, bad).unwrap();
        assert!(fsimage::verity_verify(&bad_path, &params).is_err());
    }
    assert_eq!(hashes[0], hashes[1], "[usr.img, esp, state, disk]");

    // the ESP holds the files under their names
    let out = Cmd::new("mtype")
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(d.join("esp1.img"))
        .arg("::/loader/loader.conf")
        .output()
        .unwrap();
    assert!(out.starts_with("content of loader/loader.conf"));
}

#[test]
fn too_big_content_is_refused() {
    if !tools_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big");
    fs::write(&big, vec![1u8; usize::try_from(2 * MIB).unwrap()]).unwrap();
    let layout = disk_layout(Arch::X86_64, MIB, MIB, MIB).unwrap();
    let err = write_disk(&layout, &dir.path().join("d.raw"), &[("USR-A", &big)]).unwrap_err();
    assert!(err.to_string().contains("USR-A"), "{err}");
}
