//! The durable-storage seam of the updater: every write, fsync, rename and
//! removal the install, bless and rollback paths make goes through
//! [`Storage`], so tests can run them on plain files ([`RealStorage`]) or on
//! an in-memory filesystem that loses whatever was not made durable when the
//! power is cut ([`MemStorage`]).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// Errors of the storage layer, each naming the path it concerns.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("power cut (simulated) before {op} {path}")]
    PowerCut { op: &'static str, path: PathBuf },
}

impl StorageError {
    pub fn io(op: &'static str, path: &Path, source: io::Error) -> Self {
        StorageError::Io {
            op,
            path: path.to_owned(),
            source,
        }
    }

    /// True when the file or directory did not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, StorageError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// A file opened for writing. Writes go to the given offset onwards;
/// [`WriteTarget::sync`] makes them durable.
pub trait WriteTarget: Send {
    fn write_all(&mut self, buf: &[u8]) -> Result<()>;
    /// fsync(2): data and size durable.
    fn sync(&mut self) -> Result<()>;
}

/// The file-system operations the updater needs. Paths are absolute.
pub trait Storage: Send + Sync {
    /// Reads a whole (small) file.
    fn read(&self, path: &Path) -> Result<Vec<u8>>;
    /// Opens a file or block device for reading from the start.
    fn open_read(&self, path: &Path) -> Result<Box<dyn Read + Send>>;
    /// Fills `buf` from `offset` of a file or block device (a reused
    /// chunk). The default reads up to the offset; real files seek.
    fn read_at(&self, path: &Path, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut reader = self.open_read(path)?;
        io::copy(&mut (&mut reader).take(offset), &mut io::sink())
            .and_then(|_| reader.read_exact(buf))
            .map_err(|e| StorageError::io("reading", path, e))
    }
    /// Size of a file, or of a block device (its end offset).
    fn size(&self, path: &Path) -> Result<u64>;
    fn exists(&self, path: &Path) -> bool;
    /// Names in a directory, sorted; a missing directory is empty.
    fn list_dir(&self, path: &Path) -> Result<Vec<String>>;
    fn create_dir_all(&self, path: &Path) -> Result<()>;
    /// Creates or truncates a regular file.
    fn create(&self, path: &Path) -> Result<Box<dyn WriteTarget>>;
    /// Opens an existing file or block device for writing in place from
    /// offset 0, without truncating it (a slot keeps its size).
    fn open_in_place(&self, path: &Path) -> Result<Box<dyn WriteTarget>>;
    fn rename(&self, from: &Path, to: &Path) -> Result<()>;
    fn remove_file(&self, path: &Path) -> Result<()>;
    fn remove_dir_all(&self, path: &Path) -> Result<()>;
    /// fsync(2) of a directory: its entries (creates, renames, removals)
    /// durable.
    fn sync_dir(&self, path: &Path) -> Result<()>;
}

/// Writes `bytes` to `path` atomically: a temporary sibling, fsync, rename,
/// fsync of the directory.
pub fn write_atomic(storage: &dyn Storage, path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = parent(path);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    storage.create_dir_all(dir)?;
    let mut file = storage.create(&tmp)?;
    file.write_all(bytes)?;
    file.sync()?;
    drop(file);
    storage.rename(&tmp, path)?;
    storage.sync_dir(dir)
}

/// The directory holding `path` (`/` for a bare name).
pub fn parent(path: &Path) -> &Path {
    path.parent().unwrap_or(Path::new("/"))
}

/// The real filesystem through `std::fs`.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealStorage;

/// Bytes written in place between early writeback requests.
const WRITE_BEHIND_BYTES: u64 = 64 << 20;

struct RealFile {
    file: File,
    path: PathBuf,
    write_behind: Option<WriteBehind>,
}

/// Flushes a big in-place write to the device while it is still being
/// written (fdatasync on a second descriptor, in its own thread), so the
/// final fsync has little left to do: download and disk overlap instead of
/// following each other.
struct WriteBehind {
    since_last: u64,
    kick: Option<std::sync::mpsc::SyncSender<()>>,
    thread: Option<std::thread::JoinHandle<io::Result<()>>>,
}

impl WriteBehind {
    fn start(file: &File) -> io::Result<Self> {
        let clone = file.try_clone()?;
        let (kick, kicks) = std::sync::mpsc::sync_channel::<()>(1);
        let thread = std::thread::Builder::new()
            .name("write-behind".into())
            .spawn(move || {
                for () in kicks {
                    clone.sync_data()?;
                }
                Ok(())
            })?;
        Ok(WriteBehind {
            since_last: 0,
            kick: Some(kick),
            thread: Some(thread),
        })
    }

    fn wrote(&mut self, n: usize) {
        self.since_last += n as u64;
        if self.since_last >= WRITE_BEHIND_BYTES {
            self.since_last = 0;
            if let Some(kick) = &self.kick {
                // Full: a flush is already queued and will cover these bytes.
                let _ = kick.try_send(());
            }
        }
    }

    fn finish(&mut self) -> io::Result<()> {
        self.kick = None;
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(io::Error::other("write-behind thread panicked")),
            None => Ok(()),
        }
    }
}

impl Drop for WriteBehind {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

impl WriteTarget for RealFile {
    fn write_all(&mut self, buf: &[u8]) -> Result<()> {
        self.file
            .write_all(buf)
            .map_err(|e| StorageError::io("writing", &self.path, e))?;
        if let Some(wb) = self.write_behind.as_mut() {
            wb.wrote(buf.len());
        }
        Ok(())
    }

    fn sync(&mut self) -> Result<()> {
        if let Some(mut wb) = self.write_behind.take() {
            wb.finish()
                .map_err(|e| StorageError::io("early writeback of", &self.path, e))?;
        }
        self.file
            .sync_all()
            .map_err(|e| StorageError::io("fsync of", &self.path, e))
    }
}

impl Storage for RealStorage {
    fn read(&self, path: &Path) -> Result<Vec<u8>> {
        std::fs::read(path).map_err(|e| StorageError::io("reading", path, e))
    }

    fn open_read(&self, path: &Path) -> Result<Box<dyn Read + Send>> {
        let file = File::open(path).map_err(|e| StorageError::io("opening", path, e))?;
        Ok(Box::new(file))
    }

    fn read_at(&self, path: &Path, offset: u64, buf: &mut [u8]) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let file = File::open(path).map_err(|e| StorageError::io("opening", path, e))?;
        file.read_exact_at(buf, offset)
            .map_err(|e| StorageError::io("reading", path, e))
    }

    fn size(&self, path: &Path) -> Result<u64> {
        // Seeking to the end works for block devices, whose metadata length is 0.
        let mut file = File::open(path).map_err(|e| StorageError::io("opening", path, e))?;
        file.seek(SeekFrom::End(0))
            .map_err(|e| StorageError::io("measuring", path, e))
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn list_dir(&self, path: &Path) -> Result<Vec<String>> {
        let rd = match std::fs::read_dir(path) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(StorageError::io("listing", path, e)),
        };
        let mut names = Vec::new();
        for entry in rd {
            let entry = entry.map_err(|e| StorageError::io("listing", path, e))?;
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        Ok(names)
    }

    fn create_dir_all(&self, path: &Path) -> Result<()> {
        std::fs::create_dir_all(path).map_err(|e| StorageError::io("creating directory", path, e))
    }

    fn create(&self, path: &Path) -> Result<Box<dyn WriteTarget>> {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(path)
            .map_err(|e| StorageError::io("creating", path, e))?;
        Ok(Box::new(RealFile {
            file,
            path: path.to_owned(),
            write_behind: None,
        }))
    }

    fn open_in_place(&self, path: &Path) -> Result<Box<dyn WriteTarget>> {
        let file = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| StorageError::io("opening for writing", path, e))?;
        let write_behind =
            Some(WriteBehind::start(&file).map_err(|e| StorageError::io("opening", path, e))?);
        Ok(Box::new(RealFile {
            file,
            path: path.to_owned(),
            write_behind,
        }))
    }

    fn rename(&self, from: &Path, to: &Path) -> Result<()> {
        std::fs::rename(from, to).map_err(|e| StorageError::io("renaming", from, e))?;
        // On FAT (the ESP) a rename writes the new directory entry with no
        // start cluster and size; Linux fills them in only when the moved
        // file's inode is written back. An fsync of the directory alone
        // leaves an empty file behind after a power cut (seen in the
        // update-power-cut VM test: the new entry vanished and the node
        // booted the old version), so the file itself is synced at its new
        // name before the caller syncs the directory.
        let file = File::open(to).map_err(|e| StorageError::io("opening", to, e))?;
        if file.metadata().is_ok_and(|m| m.is_file()) {
            file.sync_all()
                .map_err(|e| StorageError::io("fsync after rename", to, e))?;
        }
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> Result<()> {
        std::fs::remove_file(path).map_err(|e| StorageError::io("removing", path, e))
    }

    fn remove_dir_all(&self, path: &Path) -> Result<()> {
        std::fs::remove_dir_all(path).map_err(|e| StorageError::io("removing", path, e))
    }

    fn sync_dir(&self, path: &Path) -> Result<()> {
        File::open(path)
            .and_then(|d| d.sync_all())
            .map_err(|e| StorageError::io("fsync of directory", path, e))
    }
}

/// Which operations count toward a simulated power cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DurableOp {
    Write,
    Sync,
    Rename,
    Remove,
}

#[derive(Debug, Clone, Default)]
struct MemFile {
    /// What a reader sees now.
    live: Vec<u8>,
    /// What survives a power cut: the contents at the last fsync.
    durable: Vec<u8>,
}

#[derive(Debug, Default)]
struct MemState {
    /// Files by path, as the running system sees them.
    files: BTreeMap<PathBuf, Arc<Mutex<MemFile>>>,
    dirs: std::collections::BTreeSet<PathBuf>,
    /// Each directory's entries as of its last fsync: name -> file.
    durable_entries: BTreeMap<PathBuf, BTreeMap<String, Arc<Mutex<MemFile>>>>,
    /// Operations left before the power is cut; `None`: never.
    ops_left: Option<u64>,
    ops_done: u64,
    cut: bool,
}

/// An in-memory filesystem with a pessimistic crash model: a file's data
/// survives a power cut only as of its last fsync, a directory's entries
/// (created, renamed, removed names) only as of the directory's last fsync.
/// It can cut the power before the Nth write, fsync, rename or removal.
#[derive(Debug, Clone, Default)]
pub struct MemStorage {
    state: Arc<Mutex<MemState>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock only happens in a failing test.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn not_found(op: &'static str, path: &Path) -> StorageError {
    StorageError::io(op, path, io::Error::from(io::ErrorKind::NotFound))
}

impl MemStorage {
    pub fn new() -> Self {
        Self::default()
    }

    /// Cuts the power when `n` more durable operations have run: the
    /// (n+1)th fails and so does everything after it.
    pub fn cut_power_after(&self, n: u64) {
        let mut s = lock(&self.state);
        s.ops_left = Some(n);
    }

    /// Durable operations (writes, fsyncs, renames, removals) so far.
    pub fn ops_done(&self) -> u64 {
        lock(&self.state).ops_done
    }

    pub fn power_was_cut(&self) -> bool {
        lock(&self.state).cut
    }

    /// The machine comes back: everything not made durable is lost and
    /// the power stays on.
    pub fn reboot_after_crash(&self) {
        let mut s = lock(&self.state);
        let mut files = BTreeMap::new();
        for (dir, entries) in &s.durable_entries {
            for (name, file) in entries {
                {
                    let mut f = lock(file);
                    f.live = f.durable.clone();
                }
                files.insert(dir.join(name), Arc::clone(file));
            }
        }
        s.files = files;
        s.ops_left = None;
        s.cut = false;
    }

    /// Makes everything durable at once (to set up a test's starting disk).
    pub fn sync_everything(&self) {
        let mut s = lock(&self.state);
        let mut entries: BTreeMap<PathBuf, BTreeMap<String, Arc<Mutex<MemFile>>>> = BTreeMap::new();
        for dir in s.dirs.clone() {
            entries.entry(dir).or_default();
        }
        for (path, file) in &s.files {
            let mut f = lock(file);
            f.durable = f.live.clone();
            let dir = parent(path).to_owned();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            entries
                .entry(dir)
                .or_default()
                .insert(name, Arc::clone(file));
        }
        s.durable_entries = entries;
    }

    /// Writes a file and makes it durable, for test setup.
    pub fn put(&self, path: &Path, bytes: &[u8]) {
        let mut s = lock(&self.state);
        let mut dir = parent(path).to_owned();
        loop {
            s.dirs.insert(dir.clone());
            match dir.parent() {
                Some(p) => dir = p.to_owned(),
                None => break,
            }
        }
        s.files.insert(
            path.to_owned(),
            Arc::new(Mutex::new(MemFile {
                live: bytes.to_vec(),
                durable: bytes.to_vec(),
            })),
        );
        drop(s);
        self.sync_everything();
    }

    /// An independent copy of what survives right now (live state treated
    /// as durable), e.g. to boot a model on without touching this one.
    pub fn fork(&self) -> MemStorage {
        let copy = MemStorage::new();
        {
            let s = lock(&self.state);
            let mut c = lock(&copy.state);
            c.dirs = s.dirs.clone();
            for (p, f) in &s.files {
                let live = lock(f).live.clone();
                c.files.insert(
                    p.clone(),
                    Arc::new(Mutex::new(MemFile {
                        durable: live.clone(),
                        live,
                    })),
                );
            }
        }
        copy.sync_everything();
        copy
    }

    /// A snapshot of every live file, for "nothing changed" assertions.
    pub fn snapshot(&self) -> BTreeMap<PathBuf, Vec<u8>> {
        let s = lock(&self.state);
        s.files
            .iter()
            .map(|(p, f)| (p.clone(), lock(f).live.clone()))
            .collect()
    }

    fn count(&self, op: DurableOp, path: &Path) -> Result<()> {
        let mut s = lock(&self.state);
        let name = match op {
            DurableOp::Write => "write",
            DurableOp::Sync => "fsync",
            DurableOp::Rename => "rename",
            DurableOp::Remove => "remove",
        };
        if s.cut {
            return Err(StorageError::PowerCut {
                op: name,
                path: path.to_owned(),
            });
        }
        if let Some(left) = s.ops_left {
            if left == 0 {
                s.cut = true;
                return Err(StorageError::PowerCut {
                    op: name,
                    path: path.to_owned(),
                });
            }
            s.ops_left = Some(left - 1);
        }
        s.ops_done += 1;
        Ok(())
    }

    fn file(&self, path: &Path, op: &'static str) -> Result<Arc<Mutex<MemFile>>> {
        lock(&self.state)
            .files
            .get(path)
            .cloned()
            .ok_or_else(|| not_found(op, path))
    }
}

struct MemWriter {
    storage: MemStorage,
    file: Arc<Mutex<MemFile>>,
    path: PathBuf,
    pos: usize,
}

impl WriteTarget for MemWriter {
    fn write_all(&mut self, buf: &[u8]) -> Result<()> {
        self.storage.count(DurableOp::Write, &self.path)?;
        let mut f = lock(&self.file);
        let end = self.pos + buf.len();
        if f.live.len() < end {
            f.live.resize(end, 0);
        }
        f.live[self.pos..end].copy_from_slice(buf);
        self.pos = end;
        Ok(())
    }

    fn sync(&mut self) -> Result<()> {
        self.storage.count(DurableOp::Sync, &self.path)?;
        let mut f = lock(&self.file);
        f.durable = f.live.clone();
        Ok(())
    }
}

impl Storage for MemStorage {
    fn read(&self, path: &Path) -> Result<Vec<u8>> {
        let f = self.file(path, "reading")?;
        let bytes = lock(&f).live.clone();
        Ok(bytes)
    }

    fn open_read(&self, path: &Path) -> Result<Box<dyn Read + Send>> {
        Ok(Box::new(io::Cursor::new(self.read(path)?)))
    }

    fn read_at(&self, path: &Path, offset: u64, buf: &mut [u8]) -> Result<()> {
        let f = self.file(path, "reading")?;
        let file = lock(&f);
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let bytes = start
            .checked_add(buf.len())
            .and_then(|end| file.live.get(start..end))
            .ok_or_else(|| {
                StorageError::io("reading", path, io::ErrorKind::UnexpectedEof.into())
            })?;
        buf.copy_from_slice(bytes);
        Ok(())
    }

    fn size(&self, path: &Path) -> Result<u64> {
        let f = self.file(path, "measuring")?;
        let len = lock(&f).live.len() as u64;
        Ok(len)
    }

    fn exists(&self, path: &Path) -> bool {
        let s = lock(&self.state);
        s.files.contains_key(path) || s.dirs.contains(path)
    }

    fn list_dir(&self, path: &Path) -> Result<Vec<String>> {
        let s = lock(&self.state);
        let mut names: Vec<String> = s
            .files
            .keys()
            .chain(s.dirs.iter())
            .filter(|p| p.parent() == Some(path))
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    fn create_dir_all(&self, path: &Path) -> Result<()> {
        // Directories are cheap metadata here; their entries are what the
        // crash model tracks.
        let mut s = lock(&self.state);
        let mut dir = path.to_owned();
        loop {
            s.dirs.insert(dir.clone());
            match dir.parent() {
                Some(p) => dir = p.to_owned(),
                None => break,
            }
        }
        Ok(())
    }

    fn create(&self, path: &Path) -> Result<Box<dyn WriteTarget>> {
        self.count(DurableOp::Write, path)?;
        let mut s = lock(&self.state);
        if !s.dirs.contains(parent(path)) {
            return Err(not_found("creating", path));
        }
        let file = Arc::new(Mutex::new(MemFile::default()));
        s.files.insert(path.to_owned(), Arc::clone(&file));
        drop(s);
        Ok(Box::new(MemWriter {
            storage: self.clone(),
            file,
            path: path.to_owned(),
            pos: 0,
        }))
    }

    fn open_in_place(&self, path: &Path) -> Result<Box<dyn WriteTarget>> {
        let file = self.file(path, "opening for writing")?;
        Ok(Box::new(MemWriter {
            storage: self.clone(),
            file,
            path: path.to_owned(),
            pos: 0,
        }))
    }

    fn rename(&self, from: &Path, to: &Path) -> Result<()> {
        self.count(DurableOp::Rename, from)?;
        let mut s = lock(&self.state);
        let file = s
            .files
            .remove(from)
            .ok_or_else(|| not_found("renaming", from))?;
        s.files.insert(to.to_owned(), file);
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> Result<()> {
        self.count(DurableOp::Remove, path)?;
        let mut s = lock(&self.state);
        s.files
            .remove(path)
            .map(|_| ())
            .ok_or_else(|| not_found("removing", path))
    }

    fn remove_dir_all(&self, path: &Path) -> Result<()> {
        self.count(DurableOp::Remove, path)?;
        let mut s = lock(&self.state);
        s.files.retain(|p, _| !p.starts_with(path));
        s.dirs.retain(|p| !p.starts_with(path));
        // Removing a whole tree is modelled as durable at once for the
        // subtree, and the parent's entry goes with the parent's next fsync.
        s.durable_entries.retain(|p, _| !p.starts_with(path));
        Ok(())
    }

    fn sync_dir(&self, path: &Path) -> Result<()> {
        self.count(DurableOp::Sync, path)?;
        let mut s = lock(&self.state);
        let entries: BTreeMap<String, Arc<Mutex<MemFile>>> = s
            .files
            .iter()
            .filter(|(p, _)| p.parent() == Some(path))
            .filter_map(|(p, f)| {
                p.file_name()
                    .map(|n| (n.to_string_lossy().into_owned(), Arc::clone(f)))
            })
            .collect();
        s.durable_entries.insert(path.to_owned(), entries);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsynced_data_and_names_are_lost_in_a_crash() {
        let fs = MemStorage::new();
        let dir = Path::new("/esp");
        fs.create_dir_all(dir).unwrap();
        fs.sync_everything();
        let a = dir.join("a");
        let mut w = fs.create(&a).unwrap();
        w.write_all(b"hello").unwrap();
        w.sync().unwrap();
        // The file's data is durable but its name is not.
        fs.reboot_after_crash();
        assert!(!fs.exists(&a));

        write_atomic(&fs, &a, b"one").unwrap();
        let mut w = fs.open_in_place(&a).unwrap();
        w.write_all(b"two").unwrap();
        fs.reboot_after_crash();
        assert_eq!(fs.read(&a).unwrap(), b"one");
    }

    #[test]
    fn power_cut_fails_the_nth_operation_and_everything_after() {
        let fs = MemStorage::new();
        fs.create_dir_all(Path::new("/d")).unwrap();
        fs.cut_power_after(2);
        let mut w = fs.create(Path::new("/d/f")).unwrap();
        w.write_all(b"x").unwrap();
        assert!(matches!(w.sync(), Err(StorageError::PowerCut { .. })));
        assert!(fs.power_was_cut());
        assert!(fs.sync_dir(Path::new("/d")).is_err());
    }

    #[test]
    fn real_storage_round_trips_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x");
        write_atomic(&RealStorage, &path, b"abc").unwrap();
        assert_eq!(RealStorage.read(&path).unwrap(), b"abc");
        assert_eq!(RealStorage.size(&path).unwrap(), 3);
        assert_eq!(RealStorage.list_dir(dir.path()).unwrap(), vec!["x"]);
    }
}
