//! Fixtures shared by the integration tests: payload directories, a signed
//! repository on disk, and a node (ESP, two slots, state) in a MemStorage.
#![allow(dead_code, clippy::unwrap_used)]

pub mod server;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use ballast_updater::bootentry::{BootEntry, EntryName, ENTRIES_DIR};
use ballast_updater::cmdline::{BootParams, Slot};
use ballast_updater::esp::{InstalledEntry, NodeLayout, SlotDevice};
use ballast_updater::fetch::DirFetch;
use ballast_updater::install::{self, ApplyOptions, ApplyReport, InstallError, Node, Source};
use ballast_updater::keys::{SecretKey, TrustedKeys};
use ballast_updater::payload::{Arch, Artifact, PayloadMetadata, VerityParams, Version};
use ballast_updater::repo;
use ballast_updater::storage::{MemStorage, Storage};
use sha2::{Digest, Sha256};

pub const SLOT_BYTES: usize = 2 << 20;
pub const USR_BYTES: usize = (1 << 20) + 4096 * 5;

pub fn uuid_a() -> uuid::Uuid {
    uuid::Uuid::from_u128(0xa)
}
pub fn uuid_b() -> uuid::Uuid {
    uuid::Uuid::from_u128(0xb)
}

fn bytes(seed: u8, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut x = u32::from(seed).wrapping_mul(2_654_435_761) | 1;
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn sha(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// The bytes of one version's payload and its metadata.
#[derive(Debug, Clone)]
pub struct Payload {
    pub meta: PayloadMetadata,
    pub usr: Vec<u8>,
    pub kernel: Vec<u8>,
    pub initrd: Vec<u8>,
}

pub fn payload(version: &str, arch: Arch, variant: &str, seed: u8) -> Payload {
    let usr = bytes(seed, USR_BYTES);
    let kernel = bytes(seed.wrapping_add(100), 50_000);
    let initrd = bytes(seed.wrapping_add(200), 30_000);
    let meta = PayloadMetadata {
        version: version.parse().unwrap(),
        arch,
        variant: variant.into(),
        kernel_release: "6.1.0-1-cloud-amd64".into(),
        usr_fstype: "erofs".into(),
        verity: VerityParams {
            root_hash: sha(&usr[..64]),
            salt: "0011".into(),
            data_blocks: (USR_BYTES / 4096 - 1) as u64,
            data_block_size: 4096,
            hash_block_size: 4096,
            hash_offset: ((USR_BYTES / 4096 - 1) * 4096) as u64,
            hash_algorithm: "sha256".into(),
        },
        artifacts: vec![
            Artifact {
                name: "usr.img".into(),
                size: usr.len() as u64,
                sha256: sha(&usr),
            },
            Artifact {
                name: "vmlinuz".into(),
                size: kernel.len() as u64,
                sha256: sha(&kernel),
            },
            Artifact {
                name: "initrd".into(),
                size: initrd.len() as u64,
                sha256: sha(&initrd),
            },
        ],
        packages: vec![],
    };
    Payload {
        meta,
        usr,
        kernel,
        initrd,
    }
}

/// `base` with `len` bytes of usr.img replaced at `at` (a changed file in
/// the image), the kernel replaced when `new_kernel`, and the same initrd:
/// a release delta updates can reuse most of.
pub fn derived(
    base: &Payload,
    version: &str,
    at: usize,
    len: usize,
    seed: u8,
    new_kernel: bool,
) -> Payload {
    let mut p = base.clone();
    p.meta.version = version.parse().unwrap();
    p.usr[at..at + len].copy_from_slice(&bytes(seed, len));
    if new_kernel {
        p.kernel = bytes(seed.wrapping_add(100), p.kernel.len() + 4096);
    }
    p.meta.verity.root_hash = sha(&p.usr[..64]
        .iter()
        .chain(&[seed])
        .copied()
        .collect::<Vec<_>>());
    for a in &mut p.meta.artifacts {
        let b = match a.name.as_str() {
            "usr.img" => &p.usr,
            "vmlinuz" => &p.kernel,
            _ => &p.initrd,
        };
        a.size = b.len() as u64;
        a.sha256 = sha(b);
    }
    p
}

impl Payload {
    pub fn write_dir(&self, dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("usr.img"), &self.usr).unwrap();
        std::fs::write(dir.join("vmlinuz"), &self.kernel).unwrap();
        std::fs::write(dir.join("initrd"), &self.initrd).unwrap();
        std::fs::write(
            dir.join("metadata.json"),
            serde_json::to_vec_pretty(&self.meta).unwrap(),
        )
        .unwrap();
    }

    pub fn version(&self) -> Version {
        self.meta.version
    }
}

/// A signed repository in a temporary directory.
pub struct Repo {
    pub dir: tempfile::TempDir,
    pub key: SecretKey,
}

impl Repo {
    /// A repository cut into chunks too (what `ballast repo add` makes).
    pub fn new(payloads: &[&Payload]) -> Repo {
        Self::with(payloads, repo::Chunking::Cut)
    }

    /// A repository of whole artifacts only: nodes download in full.
    pub fn full_only(payloads: &[&Payload]) -> Repo {
        Self::with(payloads, repo::Chunking::FullOnly)
    }

    pub fn with(payloads: &[&Payload], chunking: repo::Chunking) -> Repo {
        let dir = tempfile::tempdir().unwrap();
        for (i, p) in payloads.iter().enumerate() {
            let pdir = dir.path().join(format!("payload-{i}"));
            p.write_dir(&pdir);
            repo::add_with(&dir.path().join("repo"), &pdir, vec![], vec![], chunking).unwrap();
        }
        let key = SecretKey::from_seed([7; 32]);
        let r = Repo { dir, key };
        r.sign();
        r
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("repo")
    }

    pub fn sign(&self) {
        repo::sign(
            &self.path(),
            std::slice::from_ref(&self.key),
            Duration::from_secs(3600),
            false,
        )
        .unwrap();
    }

    pub fn trust(&self) -> TrustedKeys {
        TrustedKeys::new([self.key.public()], 1).unwrap()
    }

    pub fn fetch(&self) -> DirFetch {
        DirFetch { root: self.path() }
    }

    pub fn object(&self, sha256: &str) -> PathBuf {
        self.path().join("objects").join(sha256)
    }
}

/// A node running `running` from slot A, in memory.
pub struct TestNode {
    pub fs: MemStorage,
    pub layout: NodeLayout,
    pub arch: Arch,
    pub variant: String,
    pub channel: String,
    pub now: SystemTime,
}

pub fn esp() -> PathBuf {
    PathBuf::from("/efi")
}

pub fn entry_text(p: &Payload, slot: Slot) -> String {
    let uuid = if slot == Slot::A { uuid_a() } else { uuid_b() };
    BootEntry {
        params: BootParams::for_payload(&p.meta, slot, uuid),
        extra_args: BootEntry::default_extra_args(p.meta.arch),
    }
    .render()
}

impl TestNode {
    pub fn new(running: &Payload) -> TestNode {
        Self::with_entry(running, &EntryName::blessed(running.version()).to_string())
    }

    pub fn with_entry(running: &Payload, entry_file: &str) -> TestNode {
        let fs = MemStorage::new();
        let esp = esp();
        let v = running.version();
        fs.put(
            &esp.join(ENTRIES_DIR).join(entry_file),
            entry_text(running, Slot::A).as_bytes(),
        );
        fs.put(&esp.join(format!("ballast/{v}/vmlinuz")), &running.kernel);
        fs.put(&esp.join(format!("ballast/{v}/initrd")), &running.initrd);
        fs.put(&esp.join("loader/loader.conf"), b"timeout 0\neditor no\n");
        let mut slot_a = running.usr.clone();
        slot_a.resize(SLOT_BYTES, 0);
        fs.put(Path::new("/dev/usr-a"), &slot_a);
        fs.put(Path::new("/dev/usr-b"), &vec![0u8; SLOT_BYTES]);
        fs.create_dir_all(Path::new("/state")).unwrap();
        fs.sync_everything();
        let layout = NodeLayout {
            esp,
            slot_a: SlotDevice {
                slot: Slot::A,
                path: "/dev/usr-a".into(),
                partuuid: uuid_a(),
            },
            slot_b: SlotDevice {
                slot: Slot::B,
                path: "/dev/usr-b".into(),
                partuuid: uuid_b(),
            },
            state_dir: "/state".into(),
            running: BootParams::for_payload(&running.meta, Slot::A, uuid_a()),
        };
        TestNode {
            fs,
            layout,
            arch: running.meta.arch,
            variant: running.meta.variant.clone(),
            channel: "stable".into(),
            now: SystemTime::now(),
        }
    }

    pub fn node(&self) -> Node<'_> {
        Node {
            storage: &self.fs,
            layout: &self.layout,
            arch: self.arch,
            variant: self.variant.clone(),
            channel: self.channel.clone(),
            now: self.now,
            config_words: Vec::new(),
        }
    }

    pub fn apply_with(
        &self,
        fetch: &dyn ballast_updater::fetch::Fetch,
        trust: &TrustedKeys,
        opts: &ApplyOptions,
    ) -> Result<ApplyReport, InstallError> {
        let node = self.node();
        let source = Source { fetch, trust };
        install::apply(&node, &source, opts, &mut |_| {})
    }

    pub fn apply(&self, repo: &Repo) -> Result<ApplyReport, InstallError> {
        self.apply_with(&repo.fetch(), &repo.trust(), &ApplyOptions::default())
    }
}

/// True when `e` would boot into a complete, signed version: its contents
/// are exactly what the install renders for one of `known`, its kernel and
/// initrd are that version's, and its slot holds that version's image.
pub fn boots_fine(
    fs: &dyn Storage,
    layout: &NodeLayout,
    known: &[&Payload],
    e: &InstalledEntry,
) -> bool {
    let Ok(entry) = &e.entry else { return false };
    let Some(p) = known.iter().find(|p| p.version() == e.name.version) else {
        return false;
    };
    let slot = entry.params.slot;
    let text = fs
        .read(&layout.entries_dir().join(&e.file_name))
        .unwrap_or_default();
    if text != entry_text(p, slot).as_bytes() {
        return false;
    }
    let v = p.version();
    if fs.read(&layout.kernel_path(v)).ok().as_deref() != Some(&p.kernel[..])
        || fs.read(&layout.initrd_path(v)).ok().as_deref() != Some(&p.initrd[..])
    {
        return false;
    }
    let slot_bytes = fs.read(&layout.slot(slot).path).unwrap_or_default();
    slot_bytes.len() >= p.usr.len() && slot_bytes[..p.usr.len()] == p.usr[..]
}
