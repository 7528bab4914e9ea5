//! Safe wrappers for the few raw kernel interfaces nix does not cover:
//! device-mapper ioctls, block-device size and partition ioctls, the
//! ext4 online resize ioctl, the clock (set, slew with adjtimex, the RTC),
//! and the pre-exec hook that confines a service (user, capabilities,
//! no_new_privs, limits). This is the only module with `unsafe` code.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// `struct dm_ioctl` from `<linux/dm-ioctl.h>` (312 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct DmIoctl {
    version: [u32; 3],
    data_size: u32,
    data_start: u32,
    target_count: u32,
    open_count: i32,
    flags: u32,
    event_nr: u32,
    padding: u32,
    dev: u64,
    name: [u8; 128],
    uuid: [u8; 129],
    data: [u8; 7],
}

/// `struct dm_target_spec`, followed in memory by the NUL-terminated
/// parameter string.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct DmTargetSpec {
    sector_start: u64,
    length: u64,
    status: i32,
    next: u32,
    target_type: [u8; 16],
}

const DM_IOCTL_TYPE: u8 = 0xfd;
const DM_DEV_CREATE_CMD: u8 = 3;
const DM_DEV_REMOVE_CMD: u8 = 4;
const DM_DEV_SUSPEND_CMD: u8 = 6;
const DM_TABLE_LOAD_CMD: u8 = 9;
const DM_READONLY_FLAG: u32 = 1 << 0;

nix::ioctl_readwrite!(dm_dev_create, DM_IOCTL_TYPE, DM_DEV_CREATE_CMD, DmIoctl);
nix::ioctl_readwrite!(dm_dev_remove, DM_IOCTL_TYPE, DM_DEV_REMOVE_CMD, DmIoctl);
nix::ioctl_readwrite!(dm_dev_suspend, DM_IOCTL_TYPE, DM_DEV_SUSPEND_CMD, DmIoctl);
nix::ioctl_readwrite!(dm_table_load, DM_IOCTL_TYPE, DM_TABLE_LOAD_CMD, DmIoctl);
nix::ioctl_read!(blk_get_size64, 0x12, 114, u64);
// BLKPG is declared `_IO(0x12, 105)` although it takes a pointer.
nix::ioctl_write_ptr_bad!(blkpg, nix::request_code_none!(0x12, 105), BlkpgIoctlArg);
nix::ioctl_write_ptr!(ext4_resize_fs, b'f', 16, u64);

/// One device-mapper target line: `start length type params`.
#[derive(Debug, Clone)]
pub struct DmTarget {
    pub sector_start: u64,
    pub length: u64,
    pub target_type: String,
    pub params: String,
}

/// A buffer laid out as the kernel expects: header, then data. Kept in
/// `u64`s so the header is suitably aligned.
struct DmBuffer {
    words: Vec<u64>,
}

impl DmBuffer {
    const HEADER: usize = std::mem::size_of::<DmIoctl>();

    fn new(name: &str, flags: u32, targets: &[DmTarget]) -> io::Result<Self> {
        if name.is_empty() || name.len() >= 128 || name.contains('/') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "bad device-mapper name",
            ));
        }
        // Serialise the target specs first to know the total size.
        let mut data = Vec::new();
        for t in targets {
            if t.target_type.len() >= 16 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "bad target type",
                ));
            }
            let spec_len = std::mem::size_of::<DmTargetSpec>();
            let params_len = t.params.len() + 1;
            // Each spec+params block is padded to 8 bytes; `next` is the
            // offset of the following spec relative to this one.
            let block = (spec_len + params_len).div_ceil(8) * 8;
            let mut target_type = [0u8; 16];
            target_type[..t.target_type.len()].copy_from_slice(t.target_type.as_bytes());
            let spec = DmTargetSpec {
                sector_start: t.sector_start,
                length: t.length,
                status: 0,
                next: u32::try_from(block)
                    .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
                target_type,
            };
            data.extend_from_slice(&spec.sector_start.to_ne_bytes());
            data.extend_from_slice(&spec.length.to_ne_bytes());
            data.extend_from_slice(&spec.status.to_ne_bytes());
            data.extend_from_slice(&spec.next.to_ne_bytes());
            data.extend_from_slice(&spec.target_type);
            data.extend_from_slice(t.params.as_bytes());
            data.resize(data.len() + block - spec_len - t.params.len(), 0);
        }
        // Leave generous room for what the kernel writes back.
        let total = Self::HEADER + data.len().max(16 * 1024);
        let mut words = vec![0u64; total.div_ceil(8)];
        let mut header = DmIoctl {
            version: [4, 0, 0],
            data_size: u32::try_from(words.len() * 8)
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
            data_start: u32::try_from(Self::HEADER)
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
            target_count: u32::try_from(targets.len())
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
            open_count: 0,
            flags,
            event_nr: 0,
            padding: 0,
            dev: 0,
            name: [0; 128],
            uuid: [0; 129],
            data: [0; 7],
        };
        header.name[..name.len()].copy_from_slice(name.as_bytes());
        let bytes = Self::bytes_mut(&mut words);
        // SAFETY: `bytes` is at least HEADER bytes long and DmIoctl is a
        // plain-old-data repr(C) struct; write_unaligned has no alignment
        // requirement.
        unsafe { std::ptr::write_unaligned(bytes.as_mut_ptr().cast::<DmIoctl>(), header) };
        bytes[Self::HEADER..Self::HEADER + data.len()].copy_from_slice(&data);
        Ok(DmBuffer { words })
    }

    fn bytes_mut(words: &mut [u64]) -> &mut [u8] {
        let len = words.len() * 8;
        // SAFETY: a u64 slice is valid as bytes of the same total length;
        // u8 has no alignment requirement and the borrow is tied to `words`.
        unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), len) }
    }

    fn header_ptr(&mut self) -> *mut DmIoctl {
        self.words.as_mut_ptr().cast::<DmIoctl>()
    }

    fn header(&self) -> DmIoctl {
        // SAFETY: the buffer starts with an initialised, 8-byte aligned DmIoctl.
        unsafe { std::ptr::read(self.words.as_ptr().cast::<DmIoctl>()) }
    }
}

type DmIoctlFn = unsafe fn(i32, *mut DmIoctl) -> nix::Result<i32>;

fn dm_call(control: &File, call: DmIoctlFn, buf: &mut DmBuffer) -> io::Result<DmIoctl> {
    // SAFETY: `buf` holds a valid dm_ioctl header whose data_size matches the
    // buffer's real length, so the kernel reads and writes only inside it.
    unsafe { call(control.as_raw_fd(), buf.header_ptr()) }.map_err(io::Error::from)?;
    Ok(buf.header())
}

/// Creates a read-only device-mapper device `name` with `targets` and
/// activates it. Returns its `dev_t` (major, minor).
pub fn dm_create_readonly(
    control: &File,
    name: &str,
    targets: &[DmTarget],
) -> io::Result<(u32, u32)> {
    let mut buf = DmBuffer::new(name, 0, &[])?;
    let created = dm_call(control, dm_dev_create, &mut buf)?;
    let load = (|| {
        let mut buf = DmBuffer::new(name, DM_READONLY_FLAG, targets)?;
        dm_call(control, dm_table_load, &mut buf)?;
        // DM_DEV_SUSPEND without the suspend flag resumes, which swaps the
        // loaded table in and makes the device usable.
        let mut buf = DmBuffer::new(name, 0, &[])?;
        dm_call(control, dm_dev_suspend, &mut buf)
    })();
    if let Err(e) = load {
        // Do not leave a half-made device behind; the original error matters more.
        if let Ok(mut buf) = DmBuffer::new(name, 0, &[]) {
            let _ = dm_call(control, dm_dev_remove, &mut buf);
        }
        return Err(e);
    }
    let dev = created.dev;
    // Linux majors have 12 bits and minors 20: both fit.
    let fit = |n: u64| u32::try_from(n).map_err(|_| io::Error::from(io::ErrorKind::InvalidData));
    Ok((
        fit(nix::sys::stat::major(dev))?,
        fit(nix::sys::stat::minor(dev))?,
    ))
}

/// Size of a block device in bytes.
pub fn block_device_size(dev: &File) -> io::Result<u64> {
    let mut size = 0u64;
    // SAFETY: BLKGETSIZE64 writes one u64 through the valid pointer.
    unsafe { blk_get_size64(dev.as_raw_fd(), &mut size) }.map_err(io::Error::from)?;
    Ok(size)
}

/// `struct blkpg_ioctl_arg` from `<linux/blkpg.h>`.
#[repr(C)]
#[derive(Debug)]
pub struct BlkpgIoctlArg {
    op: i32,
    flags: i32,
    datalen: i32,
    data: *mut BlkpgPartition,
}

/// `struct blkpg_partition`.
#[repr(C)]
#[derive(Debug)]
struct BlkpgPartition {
    start: i64,
    length: i64,
    pno: i32,
    devname: [u8; 64],
    volname: [u8; 64],
}

const BLKPG_RESIZE_PARTITION: i32 = 3;

/// Tells the kernel that partition `number` of `disk` now spans
/// `start..start+length` bytes (the GPT on disk must already say so).
pub fn resize_partition(disk: &File, number: u32, start: u64, length: u64) -> io::Result<()> {
    let invalid = || io::Error::from(io::ErrorKind::InvalidInput);
    let mut part = BlkpgPartition {
        start: i64::try_from(start).map_err(|_| invalid())?,
        length: i64::try_from(length).map_err(|_| invalid())?,
        pno: i32::try_from(number).map_err(|_| invalid())?,
        devname: [0; 64],
        volname: [0; 64],
    };
    let arg = BlkpgIoctlArg {
        op: BLKPG_RESIZE_PARTITION,
        flags: 0,
        datalen: i32::try_from(std::mem::size_of::<BlkpgPartition>())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
        data: &mut part,
    };
    // SAFETY: `arg` points at a live, correctly sized blkpg_partition for
    // the duration of the call.
    unsafe { blkpg(disk.as_raw_fd(), &arg) }.map_err(io::Error::from)?;
    Ok(())
}

/// Grows the mounted ext4 filesystem whose mount point `dir` is open to
/// `blocks` filesystem blocks (EXT4_IOC_RESIZE_FS).
pub fn ext4_resize(dir: &File, blocks: u64) -> io::Result<()> {
    // SAFETY: the ioctl reads one u64 through the valid pointer.
    unsafe { ext4_resize_fs(dir.as_raw_fd(), &blocks) }.map_err(io::Error::from)?;
    Ok(())
}

/// Sets the system clock (CLOCK_REALTIME) to `to`.
pub fn set_realtime(to: std::time::SystemTime) -> io::Result<()> {
    let since = to
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "time before 1970"))?;
    nix::time::clock_settime(
        nix::time::ClockId::CLOCK_REALTIME,
        nix::sys::time::TimeSpec::from_duration(since),
    )
    .map_err(io::Error::from)
}

/// Starts slewing the system clock by `offset_us` microseconds (positive:
/// forward): adjtimex's single-shot mode, as adjtime(3), which the kernel
/// spreads at 500 ppm. Replaces any slew still in progress.
pub fn slew_realtime(offset_us: i64) -> io::Result<()> {
    let offset = nix::libc::c_long::try_from(offset_us)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "slew offset out of range"))?;
    // SAFETY: timex is plain data; all-zero is a valid value.
    let mut tx: nix::libc::timex = unsafe { std::mem::zeroed() };
    tx.modes = nix::libc::ADJ_OFFSET_SINGLESHOT;
    tx.offset = offset;
    // SAFETY: adjtimex reads and writes the one valid, exclusively borrowed timex.
    let rc = unsafe { nix::libc::adjtimex(&mut tx) };
    if rc == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `struct rtc_time` from `<linux/rtc.h>` (the fields of `struct tm`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RtcTime {
    pub tm_sec: i32,
    pub tm_min: i32,
    pub tm_hour: i32,
    pub tm_mday: i32,
    /// 0..=11.
    pub tm_mon: i32,
    /// Years since 1900.
    pub tm_year: i32,
    pub tm_wday: i32,
    pub tm_yday: i32,
    pub tm_isdst: i32,
}

impl RtcTime {
    /// The UTC calendar time `unix_secs` seconds after 1970 (the RTC keeps
    /// UTC); `None` past the year 2^31.
    pub fn from_unix(unix_secs: u64) -> Option<RtcTime> {
        let days = i64::try_from(unix_secs / 86_400).ok()?;
        let secs = i32::try_from(unix_secs % 86_400).ok()?;
        // Howard Hinnant's days-to-civil algorithm (proleptic Gregorian).
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        Some(RtcTime {
            tm_sec: secs % 60,
            tm_min: secs / 60 % 60,
            tm_hour: secs / 3600,
            tm_mday: i32::try_from(day).ok()?,
            tm_mon: i32::try_from(month - 1).ok()?,
            tm_year: i32::try_from(year - 1900).ok()?,
            ..RtcTime::default()
        })
    }
}

nix::ioctl_write_ptr!(rtc_set_time, b'p', 0x0a, RtcTime);

/// Writes `time` (UTC) to the real-time clock open as `rtc` (RTC_SET_TIME).
pub fn rtc_write(rtc: &File, time: &RtcTime) -> io::Result<()> {
    // SAFETY: the ioctl reads one rtc_time through the valid pointer.
    unsafe { rtc_set_time(rtc.as_raw_fd(), time) }.map_err(io::Error::from)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rtc_time_is_the_utc_calendar_date() {
        assert_eq!(std::mem::size_of::<RtcTime>(), 36);
        // 2015-06-01T00:00:00Z
        let t = RtcTime::from_unix(1_433_116_800).unwrap();
        assert_eq!(
            (t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec),
            (115, 5, 1, 0, 0, 0)
        );
        // 2024-02-29T23:59:58Z (a leap day)
        let t = RtcTime::from_unix(1_709_251_198).unwrap();
        assert_eq!(
            (t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec),
            (124, 1, 29, 23, 59, 58)
        );
        let t = RtcTime::from_unix(0).unwrap();
        assert_eq!((t.tm_year, t.tm_mon, t.tm_mday), (70, 0, 1));
    }

    #[test]
    fn dm_structs_match_the_kernel_abi() {
        assert_eq!(std::mem::size_of::<DmIoctl>(), 312);
        assert_eq!(std::mem::size_of::<DmTargetSpec>(), 40);
        assert_eq!(std::mem::size_of::<BlkpgPartition>(), 152);
    }

    #[test]
    fn table_buffer_lays_out_spec_then_params() {
        let t = DmTarget {
            sector_start: 0,
            length: 8,
            target_type: "verity".into(),
            params: "1 2 3".into(),
        };
        let mut buf = DmBuffer::new("usr", DM_READONLY_FLAG, &[t]).unwrap();
        let h = buf.header();
        assert_eq!(h.target_count, 1);
        assert_eq!(h.data_start, 312);
        assert_eq!(&h.name[..4], b"usr\0");
        let bytes = DmBuffer::bytes_mut(&mut buf.words);
        let spec = &bytes[312..352];
        assert_eq!(u64::from_ne_bytes(spec[8..16].try_into().unwrap()), 8);
        assert_eq!(u32::from_ne_bytes(spec[20..24].try_into().unwrap()), 48);
        assert_eq!(&spec[24..30], b"verity");
        assert_eq!(&bytes[352..358], b"1 2 3\0");
    }

    #[test]
    fn names_that_the_kernel_would_refuse_are_refused_here() {
        assert!(DmBuffer::new("", 0, &[]).is_err());
        assert!(DmBuffer::new("a/b", 0, &[]).is_err());
        assert!(DmBuffer::new(&"x".repeat(128), 0, &[]).is_err());
    }
}

/// What a service process gives up between fork and exec
/// (`node::confine` builds it from `[services.NAME]`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Confinement {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Capabilities kept (bit `n` is capability `n`); every other one
    /// leaves the bounding set. For a non-root `uid` they are also raised
    /// as ambient capabilities, so the program holds them after exec.
    pub capabilities: Option<u64>,
    pub no_new_privs: bool,
    /// `RLIMIT_NOFILE`, soft and hard.
    pub nofile: Option<u64>,
    pub oom_score_adj: Option<i32>,
}

impl Confinement {
    /// Whether there is anything to do.
    pub fn is_empty(&self) -> bool {
        *self == Confinement::default()
    }
}

/// Highest capability number the loop below tries; the kernel refuses the
/// ones it does not know (EINVAL), which are skipped.
const CAP_BITS: u32 = 64;

/// Applies `c` in the child; only raw syscalls through rustix, no
/// allocation and no locks, as a `pre_exec` hook requires.
fn apply_confinement(c: &Confinement, oom_text: Option<&[u8]>) -> io::Result<()> {
    use rustix::process::{setrlimit, Resource, Rlimit};
    use rustix::thread::{self, CapabilitySet, CapabilitySets};

    if let Some(n) = c.nofile {
        let limit = Rlimit {
            current: Some(n),
            maximum: Some(n),
        };
        setrlimit(Resource::Nofile, limit)?;
    }
    if let Some(text) = oom_text {
        let fd = rustix::fs::open(
            c"/proc/self/oom_score_adj",
            rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )?;
        rustix::io::write(&fd, text)?;
    }
    let keep = c.capabilities.map(CapabilitySet::from_bits_retain);
    if let Some(keep) = keep {
        for bit in 0..CAP_BITS {
            let cap = CapabilitySet::from_bits_retain(1 << bit);
            if keep.contains(cap) {
                continue;
            }
            match thread::remove_capability_from_bounding_set(cap) {
                Ok(()) | Err(rustix::io::Errno::INVAL) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    let non_root = c.uid.is_some_and(|u| u != 0);
    let ambient = keep.filter(|k| non_root && !k.is_empty());
    if ambient.is_some() {
        // Keep the permitted set across setuid, to raise the ambient set.
        thread::set_keep_capabilities(true)?;
    }
    if c.uid.is_some() || c.gid.is_some() {
        thread::set_thread_groups(&[])?;
    }
    if let Some(gid) = c.gid {
        thread::set_thread_gid(rustix::process::Gid::from_raw(gid))?;
    }
    if let Some(uid) = c.uid {
        // The forked child has one thread: its setuid is the process's.
        thread::set_thread_uid(rustix::process::Uid::from_raw(uid))?;
    }
    if let Some(keep) = ambient {
        thread::set_capabilities(
            None,
            CapabilitySets {
                effective: keep,
                permitted: keep,
                inheritable: keep,
            },
        )?;
        for bit in 0..CAP_BITS {
            let cap = CapabilitySet::from_bits_retain(1 << bit);
            if keep.contains(cap) {
                thread::configure_capability_in_ambient_set(cap, true)?;
            }
        }
    }
    if c.no_new_privs {
        thread::set_no_new_privs(true)?;
    }
    Ok(())
}

/// Makes `command`'s child apply `confinement` just before exec.
pub fn confine(command: &mut std::process::Command, confinement: Confinement) {
    use std::os::unix::process::CommandExt;
    if confinement.is_empty() {
        return;
    }
    // Formatted before the fork: the hook must not allocate.
    let oom_text = confinement
        .oom_score_adj
        .map(|v| v.to_string().into_bytes());
    // SAFETY: the hook runs in the forked child before exec; it makes only
    // raw syscalls (rustix), takes no locks and does not allocate, and it
    // touches only its own captured values.
    unsafe {
        command.pre_exec(move || apply_confinement(&confinement, oom_text.as_deref()));
    }
}
