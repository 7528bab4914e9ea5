//! A defensive reader (and in-place rewriter) of GUID partition tables.
//! Every disk the node can see is scanned, including ones a workload or an
//! attacker controls, so nothing here trusts the bytes: every size, count
//! and LBA is bounds-checked with checked arithmetic, both CRCs are
//! verified, and anything odd is an error (for the table) or a skipped
//! entry, never a panic. Spec-legal tables the common tools do not write
//! (entry sizes other than 128, 4096-byte sectors, a damaged primary with a
//! good backup) are read too.
//!
//! The layout is the UEFI one the image build writes (image/src/gpt.rs):
//! header at LBA 1, entries from LBA 2, backup entries and header at the end.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use uuid::Uuid;

/// Sector sizes a table is looked for at, in this order.
const SECTOR_SIZES: [u64; 2] = [512, 4096];
/// The spec's minimum header size (the fields up to the entries' CRC).
const MIN_HEADER: usize = 92;
/// Largest entry array read: the standard one is 16 KiB; a megabyte bounds
/// what a hostile header can make us allocate.
const MAX_ARRAY_BYTES: u64 = 1 << 20;
/// Largest entry size accepted (the spec allows any 128 * 2^n).
const MAX_ENTRY_SIZE: u32 = 4096;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GptError {
    #[error("reading the disk at byte {offset}: {message}")]
    Read { offset: u64, message: String },
    #[error("writing the disk at byte {offset}: {message}")]
    Write { offset: u64, message: String },
    #[error("no GPT signature")]
    NoTable,
    #[error("{which} GPT header: {reason}")]
    BadHeader { which: &'static str, reason: String },
    #[error("partition {number} is not in the table")]
    NoEntry { number: u32 },
    #[error("partition {number}: LBAs {first}..={last} are outside the usable {usable_first}..={usable_last}")]
    EntryRange {
        number: u32,
        first: u64,
        last: u64,
        usable_first: u64,
        usable_last: u64,
    },
}

/// Where a table's bytes come from: a disk, or a byte slice (tests, fuzzing).
pub trait Source {
    fn size(&self) -> u64;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl Source for [u8] {
    fn size(&self) -> u64 {
        self.len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        let end = start
            .checked_add(buf.len())
            .filter(|e| *e <= self.len())
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(&self[start..end]);
        Ok(())
    }
}

/// Where a rewritten table goes: a disk, or a model of one in tests that
/// can lose the power between any two writes.
pub trait Sink {
    fn write_at(&self, bytes: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every earlier write durable.
    fn sync(&self) -> io::Result<()>;
}

impl Sink for File {
    fn write_at(&self, bytes: &[u8], offset: u64) -> io::Result<()> {
        self.write_all_at(bytes, offset)
    }
    fn sync(&self) -> io::Result<()> {
        self.sync_all()
    }
}

/// A disk (or image file) and its size in bytes.
#[derive(Debug)]
pub struct DiskFile {
    pub file: File,
    pub size: u64,
}

impl DiskFile {
    /// Sizes block devices with BLKGETSIZE64 and regular files by length.
    pub fn new(file: File) -> io::Result<Self> {
        let meta = file.metadata()?;
        let size = if meta.is_file() {
            meta.len()
        } else {
            crate::sys::block_device_size(&file)?
        };
        Ok(DiskFile { file, size })
    }
}

impl Source for DiskFile {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
}

/// One used partition entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// 1-based, as the kernel numbers partitions (`vda2` is 2).
    pub number: u32,
    pub type_guid: Uuid,
    pub guid: Uuid,
    pub first_lba: u64,
    /// Inclusive, as GPT stores it.
    pub last_lba: u64,
    pub name: String,
}

/// A validated table: the header fields, the raw entry array (kept so a
/// rewrite preserves whatever layout the table had) and its used entries.
#[derive(Debug, Clone)]
pub struct Table {
    pub sector: u64,
    pub disk_guid: Uuid,
    pub first_usable: u64,
    pub last_usable: u64,
    /// Used entries that lie inside the usable area.
    pub entries: Vec<Entry>,
    /// What was odd but skipped (entries out of range, a bad primary).
    pub warnings: Vec<String>,
    header: Vec<u8>,
    raw_entries: Vec<u8>,
    entry_size: u32,
    entry_count: u32,
}

/// The little-endian integer at `off` of `b` (callers keep `off` in range).
fn le_u32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

fn guid_at(b: &[u8], off: usize) -> Uuid {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[off..off + 16]);
    Uuid::from_bytes_le(a)
}

/// CRC-32 (IEEE, reflected), as GPT uses.
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Header fields after validation.
struct Header {
    bytes: Vec<u8>,
    my_lba: u64,
    first_usable: u64,
    last_usable: u64,
    disk_guid: Uuid,
    entries_lba: u64,
    entry_count: u32,
    entry_size: u32,
    entries_crc: u32,
}

fn read(src: &(impl Source + ?Sized), offset: u64, len: u64) -> Result<Vec<u8>, GptError> {
    let err = |message: String| GptError::Read { offset, message };
    let end = offset
        .checked_add(len)
        .ok_or_else(|| err("offset overflows".into()))?;
    if end > src.size() {
        return Err(err(format!(
            "{len} bytes reach past the end of the disk ({} bytes)",
            src.size()
        )));
    }
    let mut buf = vec![0u8; usize::try_from(len).map_err(|e| err(e.to_string()))?];
    src.read_at(&mut buf, offset)
        .map_err(|e| err(e.to_string()))?;
    Ok(buf)
}

/// Reads and checks the header at `lba` (everything but the entry array).
fn header_at(
    src: &(impl Source + ?Sized),
    sector: u64,
    lba: u64,
    which: &'static str,
) -> Result<Header, GptError> {
    let bad = |reason: String| GptError::BadHeader { which, reason };
    let sectors = src.size() / sector;
    let offset = lba
        .checked_mul(sector)
        .ok_or_else(|| bad(format!("LBA {lba} overflows")))?;
    let block = read(src, offset, sector)?;
    if &block[0..8] != b"EFI PART" {
        return Err(GptError::NoTable);
    }
    let size = le_u32(&block, 12) as usize;
    if size < MIN_HEADER || size as u64 > sector {
        return Err(bad(format!(
            "header size {size} is not in {MIN_HEADER}..={sector}"
        )));
    }
    let mut bytes = block[..size].to_vec();
    let stored = le_u32(&bytes, 16);
    bytes[16..20].fill(0);
    if crc32(&bytes) != stored {
        return Err(bad("header CRC does not match".into()));
    }
    bytes[16..20].copy_from_slice(&stored.to_le_bytes());
    let h = Header {
        my_lba: le_u64(&bytes, 24),
        first_usable: le_u64(&bytes, 40),
        last_usable: le_u64(&bytes, 48),
        disk_guid: guid_at(&bytes, 56),
        entries_lba: le_u64(&bytes, 72),
        entry_count: le_u32(&bytes, 80),
        entry_size: le_u32(&bytes, 84),
        entries_crc: le_u32(&bytes, 88),
        bytes,
    };
    if h.my_lba != lba {
        return Err(bad(format!(
            "says it is at LBA {}, found at {lba}",
            h.my_lba
        )));
    }
    if h.entry_size < 128 || h.entry_size > MAX_ENTRY_SIZE || !h.entry_size.is_power_of_two() {
        return Err(bad(format!("entry size {} is not 128 * 2^n", h.entry_size)));
    }
    let array = u64::from(h.entry_count) * u64::from(h.entry_size);
    if array > MAX_ARRAY_BYTES {
        return Err(bad(format!(
            "{} entries of {} bytes exceed {MAX_ARRAY_BYTES} bytes",
            h.entry_count, h.entry_size
        )));
    }
    if h.first_usable > h.last_usable || h.last_usable >= sectors {
        return Err(bad(format!(
            "usable LBAs {}..={} do not fit a disk of {sectors} sectors",
            h.first_usable, h.last_usable
        )));
    }
    let array_sectors = array.div_ceil(sector);
    let array_end = h
        .entries_lba
        .checked_add(array_sectors)
        .filter(|end| *end <= sectors)
        .ok_or_else(|| {
            bad(format!(
                "entry array at LBA {} is beyond the disk",
                h.entries_lba
            ))
        })?;
    // The array must not overlap the header or the usable area.
    let inside_usable = h.entries_lba <= h.last_usable && array_end > h.first_usable;
    if h.entries_lba <= lba && lba < array_end || inside_usable {
        return Err(bad(format!(
            "entry array LBAs {}..{array_end} overlap the header or the partitions",
            h.entries_lba
        )));
    }
    Ok(h)
}

impl Table {
    /// Reads the table of `src`: the primary, or the backup when the
    /// primary is damaged. Looks for 512- and then 4096-byte sectors.
    pub fn read(src: &(impl Source + ?Sized)) -> Result<Table, GptError> {
        let mut first_err = None;
        for sector in SECTOR_SIZES {
            match Self::read_with_sector(src, sector) {
                Ok(t) => return Ok(t),
                Err(GptError::NoTable) => {}
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        Err(first_err.unwrap_or(GptError::NoTable))
    }

    fn read_with_sector(src: &(impl Source + ?Sized), sector: u64) -> Result<Table, GptError> {
        let sectors = src.size() / sector;
        if sectors < 3 {
            return Err(GptError::NoTable);
        }
        let primary =
            header_at(src, sector, 1, "primary").and_then(|h| Self::with_entries(src, sector, h));
        let primary_err = match primary {
            Ok(t) => return Ok(t),
            Err(e) => e,
        };
        // A damaged primary: the backup lives in the last sector.
        let backup = header_at(src, sector, sectors - 1, "backup")
            .and_then(|h| Self::with_entries(src, sector, h));
        match (primary_err, backup) {
            (primary_err, Ok(mut t)) => {
                t.warnings.push(format!(
                    "primary table unusable ({primary_err}); using the backup"
                ));
                Ok(t)
            }
            (GptError::NoTable, Err(GptError::NoTable)) => Err(GptError::NoTable),
            (GptError::NoTable, Err(e)) | (e, Err(_)) => Err(e),
        }
    }

    fn with_entries(
        src: &(impl Source + ?Sized),
        sector: u64,
        h: Header,
    ) -> Result<Table, GptError> {
        let which = if h.my_lba == 1 { "primary" } else { "backup" };
        let array_len = u64::from(h.entry_count) * u64::from(h.entry_size);
        let offset = h
            .entries_lba
            .checked_mul(sector)
            .ok_or_else(|| GptError::BadHeader {
                which,
                reason: "entry array offset overflows".into(),
            })?;
        let raw = read(src, offset, array_len)?;
        if crc32(&raw) != h.entries_crc {
            return Err(GptError::BadHeader {
                which,
                reason: "entry array CRC does not match".into(),
            });
        }
        let mut entries = Vec::new();
        let mut warnings = Vec::new();
        let size = h.entry_size as usize;
        // Entry numbers count from 1; the count is a u32, so they fit.
        for (number, e) in (1..=h.entry_count).zip(raw.chunks_exact(size)) {
            let type_guid = guid_at(e, 0);
            if type_guid.is_nil() {
                continue;
            }
            let (first, last) = (le_u64(e, 32), le_u64(e, 40));
            if first > last || first < h.first_usable || last > h.last_usable {
                warnings.push(
                    GptError::EntryRange {
                        number,
                        first,
                        last,
                        usable_first: h.first_usable,
                        usable_last: h.last_usable,
                    }
                    .to_string(),
                );
                continue;
            }
            let units: Vec<u16> = e[56..128]
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .take_while(|u| *u != 0)
                .collect();
            entries.push(Entry {
                number,
                type_guid,
                guid: guid_at(e, 16),
                first_lba: first,
                last_lba: last,
                name: String::from_utf16_lossy(&units),
            });
        }
        Ok(Table {
            sector,
            disk_guid: h.disk_guid,
            first_usable: h.first_usable,
            last_usable: h.last_usable,
            entries,
            warnings,
            header: h.bytes,
            raw_entries: raw,
            entry_size: h.entry_size,
            entry_count: h.entry_count,
        })
    }

    /// Bytes of the entry array on disk, in whole sectors.
    fn array_sectors(&self) -> u64 {
        (u64::from(self.entry_count) * u64::from(self.entry_size)).div_ceil(self.sector)
    }

    fn raw_entry(&mut self, number: u32) -> Result<&mut [u8], GptError> {
        let size = self.entry_size as usize;
        let index = (number as usize)
            .checked_sub(1)
            .filter(|_| self.entries.iter().any(|e| e.number == number))
            .ok_or(GptError::NoEntry { number })?;
        self.raw_entries
            .get_mut(index * size..(index + 1) * size)
            .ok_or(GptError::NoEntry { number })
    }

    /// Moves the (inclusive) last LBA of partition `number`.
    pub fn set_last_lba(&mut self, number: u32, last_lba: u64) -> Result<(), GptError> {
        self.raw_entry(number)?[40..48].copy_from_slice(&last_lba.to_le_bytes());
        if let Some(e) = self.entries.iter_mut().find(|e| e.number == number) {
            e.last_lba = last_lba;
        }
        Ok(())
    }

    /// Gives partition `number` a new unique GUID.
    pub fn set_guid(&mut self, number: u32, guid: Uuid) -> Result<(), GptError> {
        self.raw_entry(number)?[16..32].copy_from_slice(&guid.to_bytes_le());
        if let Some(e) = self.entries.iter_mut().find(|e| e.number == number) {
            e.guid = guid;
        }
        Ok(())
    }

    /// Gives the disk a new GUID.
    pub fn set_disk_guid(&mut self, guid: Uuid) {
        self.disk_guid = guid;
    }

    /// The header for one copy of the table on a disk of `sectors` sectors.
    fn header_bytes(&self, primary: bool, sectors: u64, last_usable: u64) -> Vec<u8> {
        let last = sectors - 1;
        let (my_lba, alt_lba, entries_lba) = if primary {
            (1, last, 2)
        } else {
            (last, 1, last - self.array_sectors())
        };
        let mut h = self.header.clone();
        h[16..20].fill(0);
        h[24..32].copy_from_slice(&my_lba.to_le_bytes());
        h[32..40].copy_from_slice(&alt_lba.to_le_bytes());
        h[48..56].copy_from_slice(&last_usable.to_le_bytes());
        h[56..72].copy_from_slice(&self.disk_guid.to_bytes_le());
        h[72..80].copy_from_slice(&entries_lba.to_le_bytes());
        h[88..92].copy_from_slice(&crc32(&self.raw_entries).to_le_bytes());
        let crc = crc32(&h);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// Writes both copies for a disk of `disk_bytes` (the backup moves to
    /// the disk's end and the usable area grows to meet it). The backup is
    /// written and synced first, the primary header last: a power cut at
    /// any point leaves one valid, self-consistent copy (the old primary, or
    /// the new backup when the primary's entries were half written).
    pub fn write(&self, file: &(impl Sink + ?Sized), disk_bytes: u64) -> Result<(), GptError> {
        let sectors = disk_bytes / self.sector;
        let array = self.array_sectors();
        // Room for: protective MBR, primary header and array (rewritten at
        // LBA 2, before the first usable LBA), the usable area, backup
        // array and header.
        let Some(last_usable) = sectors
            .checked_sub(2 + array)
            .filter(|l| *l >= self.first_usable && self.first_usable >= 2 + array)
        else {
            return Err(GptError::Write {
                offset: 0,
                message: format!("a disk of {disk_bytes} bytes cannot hold this table"),
            });
        };
        if let Some(e) = self.entries.iter().find(|e| e.last_lba > last_usable) {
            return Err(GptError::EntryRange {
                number: e.number,
                first: e.first_lba,
                last: e.last_lba,
                usable_first: self.first_usable,
                usable_last: last_usable,
            });
        }
        let write = |bytes: &[u8], lba: u64| {
            let offset = lba * self.sector;
            file.write_at(bytes, offset).map_err(|e| GptError::Write {
                offset,
                message: e.to_string(),
            })
        };
        let sync = || {
            file.sync().map_err(|e| GptError::Write {
                offset: 0,
                message: format!("syncing: {e}"),
            })
        };
        let backup_header = self.header_bytes(false, sectors, last_usable);
        write(&self.raw_entries, sectors - 1 - array)?;
        write(&backup_header, sectors - 1)?;
        sync()?;
        write(&self.raw_entries, 2)?;
        sync()?;
        write(&self.header_bytes(true, sectors, last_usable), 1)?;
        sync()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// A disk image with a valid GPT: `entry_size`-byte entries, `count`
    /// of them, the given partitions (label, first, last LBA).
    pub(crate) fn image(
        sector: u64,
        entry_size: u32,
        count: u32,
        parts: &[(&str, u64, u64)],
        disk_bytes: u64,
    ) -> Vec<u8> {
        let mut disk = vec![0u8; usize::try_from(disk_bytes).unwrap()];
        let sectors = disk_bytes / sector;
        let array = (u64::from(count) * u64::from(entry_size)).div_ceil(sector);
        let mut entries =
            vec![0u8; usize::try_from(u64::from(count) * u64::from(entry_size)).unwrap()];
        for (i, (label, first, last)) in parts.iter().enumerate() {
            let e = &mut entries[i * entry_size as usize..];
            e[0..16].copy_from_slice(&Uuid::from_u128(0x0fc6_3daf).to_bytes_le());
            e[16..32].copy_from_slice(&Uuid::from_u128(0x1000 + i as u128).to_bytes_le());
            e[32..40].copy_from_slice(&first.to_le_bytes());
            e[40..48].copy_from_slice(&last.to_le_bytes());
            for (j, u) in label.encode_utf16().enumerate() {
                e[56 + 2 * j..58 + 2 * j].copy_from_slice(&u.to_le_bytes());
            }
        }
        let mut header = vec![0u8; 92];
        header[0..8].copy_from_slice(b"EFI PART");
        header[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        header[12..16].copy_from_slice(&92u32.to_le_bytes());
        header[40..48].copy_from_slice(&(2 + array).to_le_bytes());
        header[56..72].copy_from_slice(&Uuid::from_u128(0xd15c).to_bytes_le());
        header[80..84].copy_from_slice(&count.to_le_bytes());
        header[84..88].copy_from_slice(&entry_size.to_le_bytes());
        let t = Table {
            sector,
            disk_guid: Uuid::from_u128(0xd15c),
            first_usable: 2 + array,
            last_usable: sectors - 2 - array,
            entries: Vec::new(),
            warnings: Vec::new(),
            header,
            raw_entries: entries,
            entry_size,
            entry_count: count,
        };
        let last_usable = sectors - 2 - array;
        let put = |disk: &mut Vec<u8>, bytes: &[u8], lba: u64| {
            let off = usize::try_from(lba * sector).unwrap();
            disk[off..off + bytes.len()].copy_from_slice(bytes);
        };
        put(&mut disk, &t.header_bytes(true, sectors, last_usable), 1);
        put(&mut disk, &t.raw_entries, 2);
        put(&mut disk, &t.raw_entries, sectors - 1 - array);
        put(
            &mut disk,
            &t.header_bytes(false, sectors, last_usable),
            sectors - 1,
        );
        disk
    }

    fn standard() -> Vec<u8> {
        image(
            512,
            128,
            128,
            &[("ESP", 2048, 4095), ("STATE", 4096, 8191)],
            8 * MIB,
        )
    }

    /// Recomputes the primary header's CRC after a test changed a field.
    fn fix_header_crc(disk: &mut [u8], sector: usize) {
        let h = &mut disk[sector..sector + 92];
        h[16..20].fill(0);
        let crc = crc32(h);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn crc32_check_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    }

    #[test]
    fn reads_a_standard_table() {
        let t = Table::read(standard().as_slice()).unwrap();
        assert_eq!(t.sector, 512);
        assert_eq!(t.disk_guid, Uuid::from_u128(0xd15c));
        let names: Vec<_> = t
            .entries
            .iter()
            .map(|e| (e.number, e.name.as_str(), e.first_lba))
            .collect();
        assert_eq!(names, [(1, "ESP", 2048), (2, "STATE", 4096)]);
        assert!(t.warnings.is_empty());
    }

    #[test]
    fn reads_256_byte_entries_and_4k_sectors() {
        let disk = image(512, 256, 64, &[("USR-A", 2048, 4095)], 4 * MIB);
        let t = Table::read(disk.as_slice()).unwrap();
        assert_eq!(t.entries[0].name, "USR-A");
        let disk = image(4096, 128, 128, &[("STATE", 256, 511)], 4 * MIB);
        let t = Table::read(disk.as_slice()).unwrap();
        assert_eq!((t.sector, t.entries[0].first_lba), (4096, 256));
    }

    #[test]
    fn odd_entry_sizes_and_absurd_counts_are_errors() {
        for (size, count) in [
            (100u32, 128u32),
            (192, 128),
            (8192, 4),
            (128, u32::MAX),
            (128, 1 << 20),
        ] {
            let mut disk = standard();
            disk[512 + 80..512 + 84].copy_from_slice(&count.to_le_bytes());
            disk[512 + 84..512 + 88].copy_from_slice(&size.to_le_bytes());
            fix_header_crc(&mut disk, 512);
            // The backup is still good, so break it the same way.
            let last = disk.len() - 512;
            disk[last + 80..last + 84].copy_from_slice(&count.to_le_bytes());
            disk[last + 84..last + 88].copy_from_slice(&size.to_le_bytes());
            fix_header_crc(&mut disk, last);
            let err = Table::read(disk.as_slice()).unwrap_err();
            assert!(
                matches!(err, GptError::BadHeader { .. }),
                "{size} x {count}: {err}"
            );
        }
    }

    #[test]
    fn bad_crcs_fall_back_to_the_backup_or_fail() {
        let mut disk = standard();
        disk[512 + 60] ^= 1; // disk GUID: header CRC now wrong
        let t = Table::read(disk.as_slice()).unwrap();
        assert_eq!(t.entries.len(), 2);
        assert!(t.warnings[0].contains("header CRC"), "{:?}", t.warnings);
        let last = disk.len() - 512;
        disk[last + 60] ^= 1;
        assert!(Table::read(disk.as_slice()).is_err());

        let mut disk = standard();
        disk[1024 + 56] ^= 1; // a name byte in the primary array
        let t = Table::read(disk.as_slice()).unwrap();
        assert!(
            t.warnings[0].contains("entry array CRC"),
            "{:?}",
            t.warnings
        );
    }

    #[test]
    fn truncated_disks_and_lbas_beyond_the_disk_are_refused() {
        let disk = standard();
        for len in [0, 511, 1024, 1100, 2048, 4 << 20] {
            assert!(Table::read(&disk[..len]).is_err(), "{len}");
        }
        // An entry array claimed beyond the disk.
        let mut disk = standard();
        disk[512 + 72..512 + 80].copy_from_slice(&u64::MAX.to_le_bytes());
        fix_header_crc(&mut disk, 512);
        let t = Table::read(disk.as_slice()).unwrap();
        assert!(
            t.warnings[0].contains("beyond the disk"),
            "{:?}",
            t.warnings
        );
        // A partition whose last LBA is past the usable area is skipped.
        let disk = image(
            512,
            128,
            128,
            &[("A", 2048, 4095), ("B", 4096, u64::MAX)],
            8 * MIB,
        );
        let t = Table::read(disk.as_slice()).unwrap();
        assert_eq!(t.entries.len(), 1);
        assert!(t.warnings[0].contains("partition 2"), "{:?}", t.warnings);
    }

    #[test]
    fn rewriting_grows_and_regenerates_both_copies() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::write(&path, standard()).unwrap();
        // The disk grows to 16 MiB.
        let file = File::options().read(true).write(true).open(&path).unwrap();
        file.set_len(16 * MIB).unwrap();
        let mut t = Table::read(&DiskFile::new(file.try_clone().unwrap()).unwrap()).unwrap();
        // The backup is not at the (new) end yet, but the primary is fine.
        assert!(t.warnings.is_empty(), "{:?}", t.warnings);
        t.set_last_lba(2, 16 * MIB / 512 - 34).unwrap();
        t.set_guid(2, Uuid::from_u128(42)).unwrap();
        t.write(&file, 16 * MIB).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let again = Table::read(bytes.as_slice()).unwrap();
        assert!(again.warnings.is_empty(), "{:?}", again.warnings);
        assert_eq!(again.entries[1].last_lba, 16 * MIB / 512 - 34);
        assert_eq!(again.entries[1].guid, Uuid::from_u128(42));
        // The backup alone is just as good.
        let mut no_primary = bytes.clone();
        no_primary[512..1024].fill(0);
        let backup = Table::read(no_primary.as_slice()).unwrap();
        assert_eq!(backup.entries, again.entries);
        assert_eq!(
            t.set_guid(9, Uuid::nil()),
            Err(GptError::NoEntry { number: 9 })
        );
    }
}
