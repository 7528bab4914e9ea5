//! Fuzzes the disk scanner early boot and PID 1 run on every attached
//! disk: arbitrary bytes as a disk image must give partitions or an
//! error, never a panic, and every partition found must lie inside the
//! image. A second pass repairs the CRCs first, so the fuzzer also gets
//! past the checksums into the header and entry checks.
#![no_main]

use ballast::boot::disks::scan_image;
use ballast::boot::gpt::crc32;
use libfuzzer_sys::fuzz_target;

fn check(disk: &[u8]) {
    if let Ok(parts) = scan_image(disk) {
        for p in parts {
            let end = p.start.checked_add(p.length).expect("partition end overflows");
            assert!(end <= disk.len() as u64, "{p:?} ends past the image");
        }
    }
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// Makes the CRCs of the header at `at` (and of the array it names) right.
fn fix_crcs(disk: &mut [u8], at: usize, sector: usize) -> Option<()> {
    let entries = usize::try_from(u64_at(disk, at + 72)?).ok()?.checked_mul(sector)?;
    let len = (u32_at(disk, at + 80)? as usize).checked_mul(u32_at(disk, at + 84)? as usize)?;
    if let Some(array) = disk.get(entries..entries.checked_add(len)?) {
        let crc = crc32(array);
        disk.get_mut(at + 88..at + 92)?.copy_from_slice(&crc.to_le_bytes());
    }
    let size = (u32_at(disk, at + 12)? as usize).min(sector);
    disk.get_mut(at + 16..at + 20)?.fill(0);
    let crc = crc32(disk.get(at..at.checked_add(size)?)?);
    disk.get_mut(at + 16..at + 20)?.copy_from_slice(&crc.to_le_bytes());
    Some(())
}

fuzz_target!(|data: &[u8]| {
    check(data);
    let mut fixed = data.to_vec();
    for sector in [512usize, 4096] {
        let _ = fix_crcs(&mut fixed, sector, sector);
        if let Some(last) = (fixed.len() / sector).checked_sub(1) {
            let _ = fix_crcs(&mut fixed, last * sector, sector);
        }
    }
    check(&fixed);
});
