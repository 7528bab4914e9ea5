//! Kernel and initrd are downloaded once: preflight checks their bytes and
//! keeps them (in memory when small, in a spool file on STATE when big)
//! until step 3 writes them to the ESP. Spool files never outlive the
//! install, and a power cut while spooling leaves a bootable node.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ballast_updater::bootmodel::BootModel;
use ballast_updater::fetch::{DirFetch, Fetch, FetchError};
use ballast_updater::install::{ApplyOptions, STAGE_IN_MEMORY_MAX, STAGING_DIR};
use ballast_updater::manifest::Release;
use ballast_updater::payload::Arch;
use ballast_updater::storage::{MemStorage, Storage};
use common::*;
use sha2::{Digest, Sha256};

/// Counts stream opens per repository path, and notes which staged files
/// exist on the node when usr.img (step 2, after preflight) is opened.
struct CountingFetch {
    inner: DirFetch,
    node_fs: MemStorage,
    usr_object: String,
    opens: Mutex<BTreeMap<String, u32>>,
    staged_during_step_2: Mutex<Vec<String>>,
}

impl CountingFetch {
    fn new(repo: &Repo, node: &TestNode, release: &Payload) -> Self {
        let usr = release.meta.artifact("usr.img").unwrap();
        CountingFetch {
            inner: repo.fetch(),
            node_fs: node.fs.clone(),
            usr_object: Release::object_path(&usr.sha256),
            opens: Mutex::new(BTreeMap::new()),
            staged_during_step_2: Mutex::new(Vec::new()),
        }
    }

    fn opens_of(&self, p: &Payload, artifact: &str) -> u32 {
        let sha = &p.meta.artifact(artifact).unwrap().sha256;
        let opens = self.opens.lock().unwrap();
        opens.get(&Release::object_path(sha)).copied().unwrap_or(0)
    }
}

impl Fetch for CountingFetch {
    fn get(&self, path: &str, max: usize) -> Result<Option<Vec<u8>>, FetchError> {
        self.inner.get(path, max)
    }

    fn open(&self, path: &str, offset: u64) -> Result<Box<dyn Read + Send>, FetchError> {
        *self
            .opens
            .lock()
            .unwrap()
            .entry(path.to_owned())
            .or_default() += 1;
        if path == self.usr_object {
            let staged = staging_files(&self.node_fs);
            self.staged_during_step_2.lock().unwrap().extend(staged);
        }
        self.inner.open(path, offset)
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

fn staging_dir() -> PathBuf {
    Path::new("/state").join(STAGING_DIR)
}

fn staging_files(fs: &MemStorage) -> Vec<String> {
    fs.list_dir(&staging_dir()).unwrap_or_default()
}

/// `p` with a kernel of `size` bytes (its metadata updated to match).
fn with_kernel_size(mut p: Payload, size: usize) -> Payload {
    let mut kernel = Vec::with_capacity(size);
    let mut x = 0x9e37_79b9u32;
    while kernel.len() < size {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        kernel.extend_from_slice(&x.to_le_bytes());
    }
    kernel.truncate(size);
    let art = p
        .meta
        .artifacts
        .iter_mut()
        .find(|a| a.name == "vmlinuz")
        .unwrap();
    art.size = size as u64;
    art.sha256 = hex::encode(Sha256::digest(&kernel));
    p.kernel = kernel;
    p
}

#[test]
fn small_kernel_and_initrd_are_downloaded_once() {
    let (v1, v2) = (
        payload("1.0.0", Arch::X86_64, "base", 1),
        payload("1.1.0", Arch::X86_64, "base", 2),
    );
    assert!(v2.kernel.len() as u64 <= STAGE_IN_MEMORY_MAX);
    let repo = Repo::new(&[&v1, &v2]);
    let node = TestNode::new(&v1);
    let fetch = CountingFetch::new(&repo, &node, &v2);
    node.apply_with(&fetch, &repo.trust(), &ApplyOptions::default())
        .unwrap();
    for artifact in ["vmlinuz", "initrd", "usr.img"] {
        assert_eq!(fetch.opens_of(&v2, artifact), 1, "{artifact}");
    }
    // Small ones stay in memory: nothing was spooled.
    assert!(fetch.staged_during_step_2.lock().unwrap().is_empty());
    assert_eq!(
        node.fs
            .read(&node.layout.kernel_path(v2.version()))
            .unwrap(),
        v2.kernel
    );
}

#[test]
fn a_big_kernel_waits_on_state_and_its_spool_file_is_removed() {
    let v1 = payload("1.0.0", Arch::X86_64, "base", 1);
    let v2 = with_kernel_size(
        payload("1.1.0", Arch::X86_64, "base", 2),
        usize::try_from(STAGE_IN_MEMORY_MAX).unwrap() + 12_345,
    );
    let repo = Repo::new(&[&v1, &v2]);
    let node = TestNode::new(&v1);
    let fetch = CountingFetch::new(&repo, &node, &v2);
    node.apply_with(&fetch, &repo.trust(), &ApplyOptions::default())
        .unwrap();
    assert_eq!(fetch.opens_of(&v2, "vmlinuz"), 1);
    assert_eq!(fetch.opens_of(&v2, "initrd"), 1);
    assert_eq!(
        *fetch.staged_during_step_2.lock().unwrap(),
        vec!["vmlinuz".to_owned()],
        "the big kernel is spooled, the small initrd is not"
    );
    assert!(staging_files(&node.fs).is_empty(), "spool file left behind");
    assert_eq!(
        node.fs
            .read(&node.layout.kernel_path(v2.version()))
            .unwrap(),
        v2.kernel
    );
}

#[test]
fn a_refusal_after_spooling_changes_nothing() {
    let v1 = payload("1.0.0", Arch::X86_64, "base", 1);
    let v2 = with_kernel_size(
        payload("1.1.0", Arch::X86_64, "base", 2),
        usize::try_from(STAGE_IN_MEMORY_MAX).unwrap() + 1,
    );
    let repo = Repo::new(&[&v1, &v2]);
    // The kernel is fine and spooled first; the initrd object is corrupt.
    let initrd = repo.object(&v2.meta.artifact("initrd").unwrap().sha256);
    let mut bytes = std::fs::read(&initrd).unwrap();
    bytes[7] ^= 0x40;
    std::fs::write(&initrd, bytes).unwrap();
    let node = TestNode::new(&v1);
    let before = node.fs.snapshot();
    let err = node.apply(&repo).unwrap_err();
    assert!(err.to_string().contains("initrd has sha256"), "{err}");
    assert_eq!(node.fs.snapshot(), before, "refusal {err} changed files");
}

#[test]
fn every_power_cut_while_spooling_or_after_leaves_a_bootable_node() {
    let v1 = payload("1.0.0", Arch::X86_64, "base", 1);
    let v2 = with_kernel_size(
        payload("1.1.0", Arch::X86_64, "base", 2),
        usize::try_from(STAGE_IN_MEMORY_MAX).unwrap() * 2 + 3,
    );
    let repo = Repo::new(&[&v1, &v2]);
    let total = {
        let n = TestNode::new(&v1);
        n.apply(&repo).unwrap();
        n.fs.ops_done()
    };
    for cut_after in 0..total {
        let n = TestNode::new(&v1);
        n.fs.cut_power_after(cut_after);
        assert!(n.apply(&repo).is_err(), "cut after {cut_after}");
        assert!(n.fs.power_was_cut());
        n.fs.reboot_after_crash();
        let disk = n.fs.fork();
        let model = BootModel {
            storage: &disk,
            esp: &n.layout.esp,
        };
        model
            .boot_until_good(8, |e| boots_fine(&disk, &n.layout, &[&v1, &v2], e))
            .unwrap()
            .unwrap_or_else(|| panic!("no bootable version after a cut after {cut_after}"));
        // A spool file a crash left behind is overwritten, then removed.
        let report = n
            .apply(&repo)
            .unwrap_or_else(|e| panic!("re-apply after cut {cut_after}: {e}"));
        assert_eq!(report.installed.unwrap().version, v2.version());
        assert!(staging_files(&n.fs).is_empty(), "cut {cut_after}");
    }
}
