//! GUID partition tables written byte for byte: partition placement (1 MiB
//! aligned), the protective MBR, primary and backup headers with 128
//! entries, CRC-32s. Every GUID is given by the caller, so the same layout
//! always gives the same bytes.

use uuid::Uuid;

/// Logical sector size of the images we write.
pub const SECTOR: u64 = SECTOR_LEN as u64;
/// [`SECTOR`] as a buffer length.
const SECTOR_LEN: usize = 512;
/// Partitions start and end on 1 MiB boundaries.
pub const ALIGN: u64 = 1 << 20;
/// Standard entry count and size: 128 * 128 bytes = 32 sectors.
pub const ENTRIES: u32 = 128;
pub const ENTRY_SIZE: u32 = 128;
const ENTRY_SECTORS: u64 = (ENTRIES as u64 * ENTRY_SIZE as u64) / SECTOR;

/// EFI System Partition.
pub const TYPE_ESP: Uuid = Uuid::from_u128(0xc12a7328_f81f_11d2_ba4b_00a0c93ec93b);
/// Linux filesystem data.
pub const TYPE_LINUX: Uuid = Uuid::from_u128(0x0fc63daf_8483_4772_8e79_3d69d8477de4);
/// Discoverable Partitions Specification: `/usr` on x86-64.
pub const TYPE_USR_X86_64: Uuid = Uuid::from_u128(0x8484680c_9521_48c6_9c11_b0720656f69e);
/// Discoverable Partitions Specification: `/usr` on AArch64.
pub const TYPE_USR_AARCH64: Uuid = Uuid::from_u128(0xb0e01050_ee5f_4390_949a_9101b17104e9);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GptError {
    #[error("partition {label:?}: size {size} is not a non-zero multiple of 1 MiB")]
    Size { label: String, size: u64 },
    #[error("partition label {0:?} is longer than 36 UTF-16 units")]
    Label(String),
    #[error("{0} partitions do not fit in a 128-entry table")]
    TooMany(usize),
}

/// A partition to place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionSpec {
    pub label: String,
    pub type_guid: Uuid,
    pub guid: Uuid,
    /// Bytes, a multiple of [`ALIGN`].
    pub size: u64,
}

/// A placed partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    pub spec: PartitionSpec,
    pub first_lba: u64,
    /// Inclusive, as GPT stores it.
    pub last_lba: u64,
}

impl Partition {
    pub fn offset(&self) -> u64 {
        self.first_lba * SECTOR
    }
    pub fn size(&self) -> u64 {
        (self.last_lba + 1 - self.first_lba) * SECTOR
    }
}

/// A whole disk: its size, GUID and partitions in table order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub disk_guid: Uuid,
    pub size: u64,
    pub partitions: Vec<Partition>,
}

impl Layout {
    /// Places `specs` one after another from 1 MiB, each on a 1 MiB
    /// boundary; the disk ends 1 MiB after the last partition (room for the
    /// backup table).
    pub fn new(disk_guid: Uuid, specs: Vec<PartitionSpec>) -> Result<Layout, GptError> {
        if specs.len() > ENTRIES as usize {
            return Err(GptError::TooMany(specs.len()));
        }
        let mut next = ALIGN;
        let mut partitions = Vec::with_capacity(specs.len());
        for spec in specs {
            if spec.size == 0 || spec.size % ALIGN != 0 {
                return Err(GptError::Size {
                    label: spec.label,
                    size: spec.size,
                });
            }
            if spec.label.encode_utf16().count() > 36 {
                return Err(GptError::Label(spec.label));
            }
            let first_lba = next / SECTOR;
            let last_lba = (next + spec.size) / SECTOR - 1;
            next += spec.size;
            partitions.push(Partition {
                spec,
                first_lba,
                last_lba,
            });
        }
        Ok(Layout {
            disk_guid,
            size: next + ALIGN,
            partitions,
        })
    }

    pub fn sectors(&self) -> u64 {
        self.size / SECTOR
    }

    pub fn first_usable_lba(&self) -> u64 {
        2 + ENTRY_SECTORS
    }

    pub fn last_usable_lba(&self) -> u64 {
        self.sectors() - 2 - ENTRY_SECTORS
    }

    pub fn by_label(&self, label: &str) -> Option<&Partition> {
        self.partitions.iter().find(|p| p.spec.label == label)
    }

    /// The partition entry array (128 entries).
    pub fn entries(&self) -> Vec<u8> {
        let mut out = vec![0u8; (ENTRIES * ENTRY_SIZE) as usize];
        for (i, p) in self.partitions.iter().enumerate() {
            let e = &mut out[i * ENTRY_SIZE as usize..(i + 1) * ENTRY_SIZE as usize];
            e[0..16].copy_from_slice(&p.spec.type_guid.to_bytes_le());
            e[16..32].copy_from_slice(&p.spec.guid.to_bytes_le());
            e[32..40].copy_from_slice(&p.first_lba.to_le_bytes());
            e[40..48].copy_from_slice(&p.last_lba.to_le_bytes());
            // attributes (48..56) stay 0
            for (j, unit) in p.spec.label.encode_utf16().enumerate() {
                e[56 + 2 * j..58 + 2 * j].copy_from_slice(&unit.to_le_bytes());
            }
        }
        out
    }

    fn header(&self, primary: bool, entries_crc: u32) -> Vec<u8> {
        let last = self.sectors() - 1;
        let (my_lba, alt_lba, entries_lba) = if primary {
            (1, last, 2)
        } else {
            (last, 1, last - ENTRY_SECTORS)
        };
        let mut h = vec![0u8; SECTOR_LEN];
        h[0..8].copy_from_slice(b"EFI PART");
        h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        h[12..16].copy_from_slice(&92u32.to_le_bytes());
        h[24..32].copy_from_slice(&my_lba.to_le_bytes());
        h[32..40].copy_from_slice(&alt_lba.to_le_bytes());
        h[40..48].copy_from_slice(&self.first_usable_lba().to_le_bytes());
        h[48..56].copy_from_slice(&self.last_usable_lba().to_le_bytes());
        h[56..72].copy_from_slice(&self.disk_guid.to_bytes_le());
        h[72..80].copy_from_slice(&entries_lba.to_le_bytes());
        h[80..84].copy_from_slice(&ENTRIES.to_le_bytes());
        h[84..88].copy_from_slice(&ENTRY_SIZE.to_le_bytes());
        h[88..92].copy_from_slice(&entries_crc.to_le_bytes());
        let crc = crc32(&h[..92]);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        h
    }

    fn protective_mbr(&self) -> Vec<u8> {
        let mut m = vec![0u8; SECTOR_LEN];
        let r = &mut m[446..462];
        r[0] = 0; // not bootable
        r[1..4].copy_from_slice(&[0x00, 0x02, 0x00]); // CHS of LBA 1
        r[4] = 0xee;
        r[5..8].copy_from_slice(&[0xff, 0xff, 0xff]);
        r[8..12].copy_from_slice(&1u32.to_le_bytes());
        let count = u32::try_from(self.sectors() - 1).unwrap_or(u32::MAX);
        r[12..16].copy_from_slice(&count.to_le_bytes());
        m[510] = 0x55;
        m[511] = 0xaa;
        m
    }

    /// Bytes for the start of the disk (protective MBR, primary header,
    /// entries: LBA 0-33) and for its end (entries, backup header: the last
    /// 33 sectors).
    pub fn table_bytes(&self) -> (Vec<u8>, Vec<u8>) {
        let entries = self.entries();
        let crc = crc32(&entries);
        let mut head = self.protective_mbr();
        head.extend(self.header(true, crc));
        head.extend(&entries);
        let mut tail = entries;
        tail.extend(self.header(false, crc));
        (head, tail)
    }

    /// Offset of [`Layout::table_bytes`]'s second part.
    pub fn tail_offset(&self) -> u64 {
        self.size - (ENTRY_SECTORS + 1) * SECTOR
    }
}

/// CRC-32 (IEEE 802.3, reflected), as GPT uses.
pub fn crc32(data: &[u8]) -> u32 {
    const fn table() -> [u32; 256] {
        let mut t = [0u32; 256];
        let mut i = 0u32;
        while i < 256 {
            let mut c = i;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i as usize] = c;
            i += 1;
        }
        t
    }
    const TABLE: [u32; 256] = table();
    let mut c = 0xffff_ffffu32;
    for &b in data {
        c = TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
    }
    c ^ 0xffff_ffff
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn spec(label: &str, size: u64, n: u128) -> PartitionSpec {
        PartitionSpec {
            label: label.into(),
            type_guid: TYPE_LINUX,
            guid: Uuid::from_u128(n),
            size,
        }
    }

    #[test]
    fn crc32_check_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    }

    #[test]
    fn partitions_are_aligned_and_adjacent() {
        let l = Layout::new(
            Uuid::from_u128(1),
            vec![
                spec("ESP", 256 * MIB, 2),
                spec("USR-A", 1024 * MIB, 3),
                spec("STATE", 256 * MIB, 4),
            ],
        )
        .unwrap();
        assert_eq!(l.partitions[0].first_lba, 2048);
        assert_eq!(l.partitions[0].last_lba, 2048 + 256 * 2048 - 1);
        assert_eq!(l.partitions[1].offset(), 257 * MIB);
        assert_eq!(l.partitions[2].offset(), 1281 * MIB);
        assert_eq!(l.size, 1538 * MIB);
        assert!(l
            .partitions
            .iter()
            .all(|p| p.offset() % MIB == 0 && p.size() % MIB == 0));
        let last = l.partitions.last().unwrap().last_lba;
        assert!(last <= l.last_usable_lba());
        assert_eq!(l.last_usable_lba(), l.sectors() - 34);
        assert_eq!(l.tail_offset(), l.size - 33 * 512);
        assert!(Layout::new(Uuid::nil(), vec![spec("x", MIB + 1, 1)]).is_err());
        assert!(Layout::new(Uuid::nil(), vec![spec(&"x".repeat(37), MIB, 1)]).is_err());
    }

    #[test]
    fn table_bytes_have_valid_headers_and_entries() {
        let l = Layout::new(Uuid::from_u128(0xabcd), vec![spec("ESP", MIB, 2)]).unwrap();
        let (head, tail) = l.table_bytes();
        assert_eq!(head.len(), 34 * 512);
        assert_eq!(tail.len(), 33 * 512);
        assert_eq!(&head[510..512], &[0x55, 0xaa]);
        assert_eq!(head[450], 0xee);
        let hdr = &head[512..1024];
        assert_eq!(&hdr[0..8], b"EFI PART");
        let mut zeroed = hdr[..92].to_vec();
        zeroed[16..20].fill(0);
        assert_eq!(crc32(&zeroed).to_le_bytes(), hdr[16..20]);
        assert_eq!(crc32(&head[1024..]).to_le_bytes(), hdr[88..92]);
        let e = &head[1024..1024 + 128];
        assert_eq!(&e[56..62], &[b'E', 0, b'S', 0, b'P', 0]);
        assert_eq!(
            Uuid::from_bytes_le(e[16..32].try_into().unwrap()),
            Uuid::from_u128(2)
        );
        let backup = &tail[32 * 512..];
        assert_eq!(&backup[0..8], b"EFI PART");
        assert_eq!(
            u64::from_le_bytes(backup[24..32].try_into().unwrap()),
            l.sectors() - 1
        );
        assert_eq!(
            u64::from_le_bytes(backup[72..80].try_into().unwrap()),
            l.sectors() - 33
        );
    }
}
