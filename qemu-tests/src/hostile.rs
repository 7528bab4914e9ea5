//! The `hostile-disks` scenario (issue 12): disks and volumes a node did not
//! ask for cannot crash it or take it over.
//!
//! Boot 1 provisions the node through fw_cfg while five extra disks carry
//! partition tables the agent must survive: a spec-legal one with 256-byte
//! entries and a partition named `STATE`, one truncated after its header,
//! one claiming 2³²−1 entries, one whose CRCs are wrong in both copies, and
//! one with 100-byte entries. The node must reach `ready` with the
//! provisioned host name. Boot 2 (same disk, fw_cfg gone) adds a `CIDATA`
//! volume that would rename the node: the node keeps its saved user-data,
//! prints `user-data-ignored` for the volume and shows it in `/status`.

use std::path::{Path, PathBuf};

use ballast::boot::gpt::crc32;
use serde_json::Value;

use crate::events::Event;
use crate::operator::{self, Operator};
use crate::runtime::make_cidata;
use crate::scenarios::{Context, ScenarioError, STATIC_NETWORK};
use crate::vm::Vm;

/// The host name the node is provisioned with (fw_cfg).
const PROVISIONED: &str = "provisioned-by-fwcfg";
/// The host name a later CIDATA volume tries to set.
const TAKEOVER: &str = "taken-over-by-cidata";

const SECTOR: usize = 512;
/// Every hostile disk but the truncated one: 2 MiB.
const DISK_SECTORS: u64 = 4096;
/// Linux filesystem data partition type.
const LINUX_FS: [u8; 16] = guid_bytes(0x0fc6_3daf, 0x8483, 0x4772, 0x8e79_3d69_d847_7de4);
const FOREIGN_DISK: [u8; 16] = guid_bytes(0x6a1f_0e7a, 0x5eed, 0x4bad, 0x9d15_c0de_0000_0001);
const FOREIGN_PART: [u8; 16] = guid_bytes(0x6a1f_0e7a, 0x5eed, 0x4bad, 0x9d15_c0de_0000_0002);

/// A GUID's on-disk bytes (mixed endian) from its text form's fields, the
/// last two fields as one 64-bit number.
const fn guid_bytes(a: u32, b: u16, c: u16, d: u64) -> [u8; 16] {
    let a = a.to_le_bytes();
    let b = b.to_le_bytes();
    let c = c.to_le_bytes();
    let d = d.to_be_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5], d[6],
        d[7],
    ]
}

/// What a header claims; the builder writes exactly this, right or wrong.
struct Table {
    entry_size: u32,
    entries: u32,
    /// Header CRCs as computed (true) or deliberately wrong (false).
    good_crcs: bool,
    /// One partition named this, if any.
    partition: Option<&'static str>,
}

fn put(buf: &mut [u8], at: usize, bytes: &[u8]) {
    buf[at..at + bytes.len()].copy_from_slice(bytes);
}

/// Protective MBR, then the primary header at LBA 1 and entries from LBA 2,
/// and (when the entries fit) the backup entries and header at the end.
fn gpt_disk(table: &Table, sectors: u64) -> Vec<u8> {
    let len = usize::try_from(sectors).unwrap_or(0) * SECTOR;
    let mut disk = vec![0u8; len];
    // Protective MBR: one 0xEE partition over the disk.
    put(&mut disk, 0x1be + 4, &[0xee]);
    put(&mut disk, 0x1be + 8, &1u32.to_le_bytes());
    let mbr_len = u32::try_from(sectors - 1).unwrap_or(u32::MAX);
    put(&mut disk, 0x1be + 12, &mbr_len.to_le_bytes());
    put(&mut disk, 0x1fe, &[0x55, 0xaa]);

    // The entry array as the header describes it, capped to what the disk
    // can hold (a truncated or absurd table is cut off by the disk's end).
    let claimed = u64::from(table.entries) * u64::from(table.entry_size);
    let array_len = usize::try_from(claimed.min(64 * 1024)).unwrap_or(0);
    let mut array = vec![0u8; array_len];
    if let (Some(name), true) = (table.partition, table.entry_size >= 128) {
        put(&mut array, 0, &LINUX_FS);
        put(&mut array, 16, &FOREIGN_PART);
        put(&mut array, 32, &2048u64.to_le_bytes());
        put(&mut array, 40, &(DISK_SECTORS - 64).to_le_bytes());
        let utf16: Vec<u8> = name.encode_utf16().flat_map(u16::to_le_bytes).collect();
        put(&mut array, 56, &utf16);
    }
    let array_crc = crc32(&array);
    let array_sectors = u64::try_from(array_len.div_ceil(SECTOR)).unwrap_or(0);
    let last = sectors - 1;

    let header = |my_lba: u64, alt_lba: u64, entries_lba: u64| {
        let mut h = vec![0u8; 92];
        put(&mut h, 0, b"EFI PART");
        put(&mut h, 8, &0x0001_0000u32.to_le_bytes());
        put(&mut h, 12, &92u32.to_le_bytes());
        put(&mut h, 24, &my_lba.to_le_bytes());
        put(&mut h, 32, &alt_lba.to_le_bytes());
        put(&mut h, 40, &(2 + array_sectors).to_le_bytes());
        put(
            &mut h,
            48,
            &(last.saturating_sub(1 + array_sectors)).to_le_bytes(),
        );
        put(&mut h, 56, &FOREIGN_DISK);
        put(&mut h, 72, &entries_lba.to_le_bytes());
        put(&mut h, 80, &table.entries.to_le_bytes());
        put(&mut h, 84, &table.entry_size.to_le_bytes());
        put(&mut h, 88, &array_crc.to_le_bytes());
        let crc = crc32(&h);
        let crc = if table.good_crcs { crc } else { !crc };
        put(&mut h, 16, &crc.to_le_bytes());
        h
    };
    put(&mut disk, SECTOR, &header(1, last, 2));
    let room = len.saturating_sub(2 * SECTOR);
    put(&mut disk, 2 * SECTOR, &array[..array_len.min(room)]);
    // Backup copy only where the whole array fits before the last sector.
    let backup_entries = last.saturating_sub(array_sectors);
    if array_len > 0 && backup_entries > 2 + array_sectors {
        let at = usize::try_from(backup_entries).unwrap_or(0) * SECTOR;
        put(&mut disk, at, &array);
        let at = usize::try_from(last).unwrap_or(0) * SECTOR;
        put(&mut disk, at, &header(last, 1, backup_entries));
    }
    disk
}

/// Writes the five hostile disks into `dir`, in the order they attach.
fn write_hostile_disks(dir: &Path) -> Result<Vec<PathBuf>, ScenarioError> {
    let disks = [
        (
            "wide-entries",
            Table {
                entry_size: 256,
                entries: 64,
                good_crcs: true,
                partition: Some("STATE"),
            },
            DISK_SECTORS,
        ),
        (
            "truncated",
            Table {
                entry_size: 128,
                entries: 128,
                good_crcs: true,
                partition: Some("USR-A"),
            },
            3,
        ),
        (
            "absurd-count",
            Table {
                entry_size: 128,
                entries: u32::MAX,
                good_crcs: true,
                partition: None,
            },
            DISK_SECTORS,
        ),
        (
            "bad-crcs",
            Table {
                entry_size: 128,
                entries: 128,
                good_crcs: false,
                partition: Some("STATE"),
            },
            DISK_SECTORS,
        ),
        (
            "odd-entry-size",
            Table {
                entry_size: 100,
                entries: 128,
                good_crcs: true,
                partition: None,
            },
            DISK_SECTORS,
        ),
    ];
    let mut paths = Vec::new();
    for (name, table, sectors) in disks {
        let path = dir.join(format!("{name}.img"));
        std::fs::write(&path, gpt_disk(&table, sectors)).map_err(ScenarioError::Scratch)?;
        paths.push(path);
    }
    Ok(paths)
}

/// Waits for `ready` (failing on `boot-failed` or `panic`) and checks the
/// host name it announces.
fn ready_as(vm: &mut Vm, ctx: &Context, hostname: &str) -> Result<Event, ScenarioError> {
    let ev = vm.wait_for_any(&["ready", "boot-failed", "panic"], ctx.boot_timeout)?;
    if ev.name != "ready" {
        return Err(vm.fail(format!("expected ready, got {}", ev.json())).into());
    }
    if ev.str_field("hostname") != Some(hostname) {
        return Err(vm
            .fail(format!("ready as {hostname:?} expected: {}", ev.json()))
            .into());
    }
    vm.progress(&format!("ready as {hostname}"));
    Ok(ev)
}

/// `hostile-disks`: see the module doc.
pub fn hostile_disks(ctx: &Context) -> Result<(), ScenarioError> {
    let scratch = tempfile::tempdir().map_err(ScenarioError::Scratch)?;
    let disks = write_hostile_disks(scratch.path())?;
    let op = Operator::new()?;
    let provisioned = format!(
        "hostname = \"{PROVISIONED}\"\n{}{STATIC_NETWORK}",
        op.api_user_data()?
    );
    let work = scratch.path().join("vm");

    // Boot 1: provisioned through fw_cfg, hostile partition tables attached.
    let mut builder = ctx
        .vm("hostile-disks")
        .work_dir(&work)
        .user_data(provisioned.as_bytes());
    for disk in &disks {
        builder = builder.extra_drive(disk);
    }
    let mut vm = builder.spawn()?;
    ready_as(&mut vm, ctx, PROVISIONED)?;
    vm.kill();

    // Boot 2: fw_cfg gone, a CIDATA volume that would rename the node.
    let cidata_dir = scratch.path().join("cidata");
    std::fs::create_dir_all(&cidata_dir).map_err(ScenarioError::Scratch)?;
    let cidata = make_cidata(&cidata_dir, &format!("hostname = \"{TAKEOVER}\"\n"))?;
    let mut builder = ctx
        .vm("hostile-disks-later-cidata")
        .work_dir(&work)
        .resume(true)
        .forward_api()
        .extra_drive(&cidata);
    for disk in &disks {
        builder = builder.extra_drive(disk);
    }
    let mut vm = builder.spawn()?;
    ready_as(&mut vm, ctx, PROVISIONED)?;
    let ignored = vm
        .events_seen()
        .iter()
        .find(|e| e.name == "user-data-ignored")
        .cloned();
    let ignored = match ignored {
        Some(ev) if ev.str_field("source") == Some("cidata") => ev,
        other => {
            return Err(vm
                .fail(format!(
                    "expected user-data-ignored for the CIDATA volume, saw {:?}",
                    other.map(|e| e.json())
                ))
                .into())
        }
    };
    vm.progress(&format!("reported: {}", ignored.json()));

    let port = vm
        .api_port()
        .ok_or_else(|| ScenarioError::Setup("no API port forwarded".into()))?;
    let pin = operator::api_pin(&mut vm, 0)?;
    operator::wait_healthz(&mut vm, port, &pin)?;
    let run = op.remote("admin", port, Some(&pin), &["status", "--json"])?;
    let status: Value = serde_json::from_str(run.stdout.trim()).unwrap_or(Value::Null);
    let user_data = &status["node"]["user_data"];
    let ok = run.ok
        && status["node"]["hostname"].as_str() == Some(PROVISIONED)
        && user_data["source"].as_str() == Some("saved")
        && user_data["ignored"][0]["source"].as_str() == Some("cidata")
        && user_data["ignored"][0]["device"].as_str() == ignored.str_field("device");
    if !ok {
        return Err(vm
            .fail(format!(
                "/status should show the saved user-data in force and the CIDATA volume ignored: {}",
                run.describe()
            ))
            .into());
    }
    vm.progress(&format!("/status user_data: {user_data}"));
    vm.kill();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The agent's own reader agrees with what each disk is meant to be.
    #[test]
    fn the_hostile_tables_are_what_they_claim() {
        let dir = tempfile::tempdir().unwrap();
        let disks = write_hostile_disks(dir.path()).unwrap();
        let parsed: Vec<_> = disks
            .iter()
            .map(|p| {
                let bytes = std::fs::read(p).unwrap();
                ballast::boot::gpt::Table::read(&bytes[..])
            })
            .collect();
        // wide-entries is spec-legal: one partition named STATE.
        let wide = parsed[0].as_ref().expect("256-byte entries are legal");
        assert_eq!(wide.entries.len(), 1);
        assert_eq!(wide.entries[0].name, "STATE");
        // The other four are refused, not panicked on.
        for (i, p) in parsed.iter().enumerate().skip(1) {
            assert!(p.is_err(), "disk {i} should be refused: {p:?}");
        }
    }
}
