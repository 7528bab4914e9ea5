//! `GET /v1/logs/{agent|kernel|SERVICE}?tail=N&follow=true`: the last
//! lines of a log, then (with `follow`) new lines as they come, as chunked
//! text until the client leaves or the follow limit passes.
//!
//! Sources: `agent` is the agent's own log, kept in memory (a bounded
//! ring fed by the tracing writer [`AgentLogWriter`] beside stderr);
//! `kernel` is `/dev/kmsg`; any other name is a service's log as the
//! supervisor writes it (`<dir>/<service>.log`, and `.log.1` from before
//! the last rotation). Every read is bounded.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use hyper::body::{Bytes, Frame};

use crate::node::supervisor::{log_path, rotated_log_path, valid_service_name};

/// How often a follower looks for new lines.
const FOLLOW_POLL: Duration = Duration::from_millis(250);
/// Most bytes one poll sends (the rest comes at the next).
const MAX_CHUNK: usize = 256 * 1024;
/// Most bytes read from the end of a service log for a tail.
const MAX_TAIL_BYTES: u64 = 2 * 1024 * 1024;
/// The agent's in-memory log: lines and bytes kept.
const AGENT_LOG_LINES: usize = 10_000;
const AGENT_LOG_BYTES: usize = 1024 * 1024;

/// Where the sources are; tests point them elsewhere.
#[derive(Debug, Clone)]
pub struct LogPaths {
    pub services: PathBuf,
    pub kmsg: PathBuf,
}

impl Default for LogPaths {
    fn default() -> Self {
        LogPaths {
            services: crate::node::supervisor::DEFAULT_LOG_DIR.into(),
            kmsg: "/dev/kmsg".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Agent,
    Kernel,
    Service(String),
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{0:?} is not a log name (agent, kernel or a service name)")]
    InvalidName(String),
    #[error("service {0}: no log")]
    NoLog(String),
    #[error("reading {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Source {
    pub fn parse(name: &str) -> Result<Source, LogError> {
        match name {
            "agent" => Ok(Source::Agent),
            "kernel" => Ok(Source::Kernel),
            s if valid_service_name(s) => Ok(Source::Service(s.to_owned())),
            s => Err(LogError::InvalidName(s.to_owned())),
        }
    }
}

/// A log being read: the tail first, then whatever is new at each poll.
#[derive(Debug)]
pub enum Reader {
    Agent { next: u64 },
    Kernel(LineFile),
    Service(ServiceFollower),
}

/// Opens `source` and returns its last `tail` lines and a reader for what
/// comes after them.
pub fn open(paths: &LogPaths, source: &Source, tail: usize) -> Result<(Bytes, Reader), LogError> {
    match source {
        Source::Agent => {
            let (lines, next) = agent_log().tail(tail);
            Ok((join(lines), Reader::Agent { next }))
        }
        Source::Kernel => {
            let mut file = LineFile::open(&paths.kmsg)?;
            let mut last = VecDeque::new();
            // /dev/kmsg holds the kernel's whole ring: bounded by the kernel.
            for line in file.read_available(usize::MAX)? {
                if last.len() == tail {
                    last.pop_front();
                }
                if tail > 0 {
                    last.push_back(line);
                }
            }
            Ok((join(last.into_iter().collect()), Reader::Kernel(file)))
        }
        Source::Service(name) => {
            let (text, follower) = ServiceFollower::open(&paths.services, name, tail)?;
            Ok((Bytes::from(text), Reader::Service(follower)))
        }
    }
}

impl Reader {
    /// What is new since the last call (empty when nothing is).
    pub fn poll(&mut self) -> Result<Bytes, LogError> {
        match self {
            Reader::Agent { next } => {
                let (lines, after) = agent_log().since(*next);
                *next = after;
                Ok(join(lines))
            }
            Reader::Kernel(file) => Ok(join(file.read_available(MAX_CHUNK)?)),
            Reader::Service(f) => f.poll().map(Bytes::from),
        }
    }
}

fn join(lines: Vec<String>) -> Bytes {
    let mut out = String::new();
    for l in lines {
        out.push_str(&l);
        out.push('\n');
    }
    Bytes::from(out)
}

/// The response body of a log request: the tail, then (when following)
/// new lines every poll until `max_follow` passes. Dropping it (the
/// client left) ends the reads.
pub fn body_stream(
    first: Bytes,
    reader: Option<Reader>,
    max_follow: Duration,
    guard: Option<super::limits::BusyGuard>,
) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send {
    let deadline = tokio::time::Instant::now() + max_follow;
    let state = (Some(first), reader, guard);
    futures_util::stream::unfold(state, move |(first, mut reader, guard)| async move {
        if let Some(first) = first {
            return Some((Ok(Frame::data(first)), (None, reader, guard)));
        }
        let r = reader.as_mut()?;
        loop {
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(FOLLOW_POLL).await;
            match r.poll() {
                Ok(chunk) if chunk.is_empty() => continue,
                Ok(chunk) => return Some((Ok(Frame::data(chunk)), (None, reader, guard))),
                Err(e) => {
                    tracing::debug!(error = %crate::error_chain(&e), "log follow ended");
                    return None;
                }
            }
        }
    })
}

/// A file read line by line without blocking: `/dev/kmsg` (one record a
/// read) or a plain file in tests.
#[derive(Debug)]
pub struct LineFile {
    path: PathBuf,
    file: File,
    partial: Vec<u8>,
}

impl LineFile {
    fn open(path: &Path) -> Result<Self, LogError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
            .open(path)
            .map_err(|source| LogError::Read {
                path: path.to_owned(),
                source,
            })?;
        Ok(LineFile {
            path: path.to_owned(),
            file,
            partial: Vec::new(),
        })
    }

    /// Records readable now, up to about `max` bytes, as text lines.
    fn read_available(&mut self, max: usize) -> Result<Vec<String>, LogError> {
        let mut lines = Vec::new();
        let mut read = 0usize;
        // kmsg records are at most about 8 KiB (one per read).
        let mut buf = vec![0u8; 16 * 1024];
        while read < max {
            match self.file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    read += n;
                    self.partial.extend_from_slice(&buf[..n]);
                    while let Some(end) = self.partial.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = self.partial.drain(..=end).collect();
                        if let Some(l) = kmsg_line(&String::from_utf8_lossy(&line)) {
                            lines.push(l);
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                // EPIPE: records were overwritten before we read them.
                Err(e) if e.raw_os_error() == Some(nix::libc::EPIPE) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(LogError::Read {
                        path: self.path.clone(),
                        source,
                    })
                }
            }
        }
        Ok(lines)
    }
}

/// `PRI,SEQ,USEC,FLAGS;text` as `[SECONDS] text`; continuation lines
/// (dictionary, starting with a space) are dropped.
fn kmsg_line(record: &str) -> Option<String> {
    let record = record.trim_end_matches('\n');
    if record.starts_with(' ') || record.is_empty() {
        return None;
    }
    let Some((head, text)) = record.split_once(';') else {
        return Some(record.to_owned());
    };
    let usec: u64 = head.split(',').nth(2).and_then(|u| u.parse().ok())?;
    Some(format!(
        "[{:5}.{:06}] {text}",
        usec / 1_000_000,
        usec % 1_000_000
    ))
}

/// A service's log file, followed across rotation and truncation.
#[derive(Debug)]
pub struct ServiceFollower {
    path: PathBuf,
    file: Option<File>,
    inode: u64,
    pos: u64,
}

impl ServiceFollower {
    fn open(dir: &Path, service: &str, tail: usize) -> Result<(String, Self), LogError> {
        let path = log_path(dir, service);
        let rotated = rotated_log_path(dir, service);
        let read_err = |path: &Path| {
            let path = path.to_owned();
            move |source| LogError::Read { path, source }
        };
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(LogError::NoLog(service.to_owned()))
            }
            Err(e) => return Err(read_err(&path)(e)),
        };
        let meta = file.metadata().map_err(read_err(&path))?;
        let mut text = read_end(&file, meta.len()).map_err(read_err(&path))?;
        let current_lines = text.lines().count();
        if current_lines < tail {
            if let Ok(old) = File::open(&rotated) {
                let len = old.metadata().map(|m| m.len()).unwrap_or(0);
                let before = read_end(&old, len).map_err(read_err(&rotated))?;
                text = before + &text;
            }
        }
        let lines: Vec<&str> = text.lines().collect();
        let start = lines.len().saturating_sub(tail);
        let mut out = lines[start..].join("\n");
        if !out.is_empty() {
            out.push('\n');
        }
        Ok((
            out,
            ServiceFollower {
                path,
                inode: meta.ino(),
                pos: meta.len(),
                file: Some(file),
            },
        ))
    }

    fn poll(&mut self) -> Result<String, LogError> {
        let mut out = Vec::new();
        // Rotated: finish the old file, then start the new one at 0.
        if let Ok(meta) = std::fs::metadata(&self.path) {
            if meta.ino() != self.inode {
                if let Some(old) = self.file.as_mut() {
                    let _ = read_from(old, self.pos, MAX_CHUNK as u64, &mut out);
                }
                self.file = File::open(&self.path).ok();
                self.inode = meta.ino();
                self.pos = 0;
            } else if meta.len() < self.pos {
                self.pos = 0; // truncated
            }
        }
        if let Some(file) = self.file.as_mut() {
            let n = read_from(file, self.pos, MAX_CHUNK as u64, &mut out).map_err(|source| {
                LogError::Read {
                    path: self.path.clone(),
                    source,
                }
            })?;
            self.pos += n;
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

/// The last [`MAX_TAIL_BYTES`] of a file of `len` bytes, from a line start.
fn read_end(file: &File, len: u64) -> std::io::Result<String> {
    let start = len.saturating_sub(MAX_TAIL_BYTES);
    let mut out = Vec::new();
    let mut f = file;
    f.seek(SeekFrom::Start(start))?;
    f.take(MAX_TAIL_BYTES).read_to_end(&mut out)?;
    let text = String::from_utf8_lossy(&out).into_owned();
    if start > 0 {
        // The first line is cut: drop it.
        return Ok(text
            .split_once('\n')
            .map(|(_, r)| r.to_owned())
            .unwrap_or_default());
    }
    Ok(text)
}

fn read_from(file: &mut File, pos: u64, max: u64, out: &mut Vec<u8>) -> std::io::Result<u64> {
    file.seek(SeekFrom::Start(pos))?;
    let n = file.take(max).read_to_end(out)?;
    Ok(n as u64)
}

/// The agent's own log lines, bounded by count and bytes.
#[derive(Debug, Default)]
pub struct AgentLog {
    ring: Mutex<Ring>,
}

#[derive(Debug, Default)]
struct Ring {
    lines: VecDeque<String>,
    bytes: usize,
    /// Number of the line after the newest (lines ever kept).
    next: u64,
    partial: Vec<u8>,
}

static AGENT_LOG: LazyLock<AgentLog> = LazyLock::new(AgentLog::default);

/// The process's agent log.
pub fn agent_log() -> &'static AgentLog {
    &AGENT_LOG
}

impl AgentLog {
    pub fn push(&self, bytes: &[u8]) {
        let Ok(mut ring) = self.ring.lock() else {
            return;
        };
        ring.partial.extend_from_slice(bytes);
        while let Some(end) = ring.partial.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = ring.partial.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
            ring.bytes += line.len();
            ring.lines.push_back(line);
            ring.next += 1;
            while ring.lines.len() > AGENT_LOG_LINES || ring.bytes > AGENT_LOG_BYTES {
                if let Some(old) = ring.lines.pop_front() {
                    ring.bytes -= old.len();
                }
            }
        }
        // A line that never ends must not grow without bound either.
        if ring.partial.len() > AGENT_LOG_BYTES / 16 {
            ring.partial.clear();
        }
    }

    /// The last `n` lines and the number of the next one.
    pub fn tail(&self, n: usize) -> (Vec<String>, u64) {
        let Ok(ring) = self.ring.lock() else {
            return (Vec::new(), 0);
        };
        let skip = ring.lines.len().saturating_sub(n);
        (ring.lines.iter().skip(skip).cloned().collect(), ring.next)
    }

    /// Lines from number `from` on (from the oldest kept, if those went).
    pub fn since(&self, from: u64) -> (Vec<String>, u64) {
        let Ok(ring) = self.ring.lock() else {
            return (Vec::new(), from);
        };
        let oldest = ring.next - ring.lines.len() as u64;
        let skip = usize::try_from(from.saturating_sub(oldest)).unwrap_or(usize::MAX);
        (ring.lines.iter().skip(skip).cloned().collect(), ring.next)
    }
}

/// A `tracing_subscriber` writer: stderr (the console), and a copy into
/// the agent log the API serves.
#[derive(Debug, Clone, Copy, Default)]
pub struct AgentLogWriter;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for AgentLogWriter {
    type Writer = AgentLogWriter;
    fn make_writer(&'a self) -> Self::Writer {
        AgentLogWriter
    }
}

impl Write for AgentLogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        agent_log().push(buf);
        // The console copy is best effort, as before.
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    #[test]
    fn names_are_checked() {
        assert_eq!(Source::parse("agent").unwrap(), Source::Agent);
        assert_eq!(Source::parse("kernel").unwrap(), Source::Kernel);
        assert_eq!(Source::parse("web").unwrap(), Source::Service("web".into()));
        for bad in ["", "..", "a/b", "../../etc/shadow"] {
            assert!(Source::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn kmsg_records_become_lines() {
        assert_eq!(
            kmsg_line("6,339,5140900,-;eth0: link up\n").as_deref(),
            Some("[    5.140900] eth0: link up")
        );
        assert_eq!(kmsg_line(" SUBSYSTEM=net\n"), None);
        let dir = tempfile::tempdir().unwrap();
        let kmsg = dir.path().join("kmsg");
        let records: String = (0..5)
            .map(|i| format!("6,{i},{}000000,-;line {i}\n SUBSYSTEM=x\n", i))
            .collect();
        std::fs::write(&kmsg, records).unwrap();
        let paths = LogPaths {
            services: dir.path().into(),
            kmsg,
        };
        let (tail, _) = open(&paths, &Source::Kernel, 2).unwrap();
        assert_eq!(
            std::str::from_utf8(&tail).unwrap(),
            "[    3.000000] line 3\n[    4.000000] line 4\n"
        );
    }

    #[test]
    fn the_agent_ring_is_bounded_and_followable() {
        let log = AgentLog::default();
        log.push(b"one\ntw");
        log.push(b"o\n");
        let (lines, next) = log.tail(10);
        assert_eq!(lines, ["one", "two"]);
        log.push(b"three\n");
        assert_eq!(log.since(next).0, ["three"]);
        for i in 0..(AGENT_LOG_LINES + 5) {
            log.push(format!("l{i}\n").as_bytes());
        }
        let (all, next) = log.tail(usize::MAX);
        assert_eq!(all.len(), AGENT_LOG_LINES);
        assert_eq!(all.last().unwrap(), &format!("l{}", AGENT_LOG_LINES + 4));
        // A reader that fell behind gets the oldest kept line on.
        assert_eq!(log.since(0).0.len(), AGENT_LOG_LINES);
        assert!(log.since(next).0.is_empty());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn service_logs_tail_then_follow_across_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let paths = LogPaths {
            services: dir.path().into(),
            kmsg: "/nonexistent".into(),
        };
        let source = Source::parse("web").unwrap();
        assert!(matches!(open(&paths, &source, 5), Err(LogError::NoLog(_))));
        std::fs::write(rotated_log_path(dir.path(), "web"), "a\nb\n").unwrap();
        std::fs::write(log_path(dir.path(), "web"), "c\nd\n").unwrap();
        let (tail, reader) = open(&paths, &source, 3).unwrap();
        assert_eq!(&tail[..], b"b\nc\nd\n");
        let mut body = Box::pin(body_stream(
            tail,
            Some(reader),
            Duration::from_secs(5),
            None,
        ));
        let first = body.next().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&first[..], b"b\nc\nd\n");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(log_path(dir.path(), "web"))
            .unwrap();
        f.write_all(b"e\n").unwrap();
        let next = body.next().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&next[..], b"e\n");
        // Rotation: the supervisor renames and starts a new file.
        f.write_all(b"f\n").unwrap();
        std::fs::rename(
            log_path(dir.path(), "web"),
            rotated_log_path(dir.path(), "web"),
        )
        .unwrap();
        std::fs::write(log_path(dir.path(), "web"), "g\n").unwrap();
        let mut seen = String::new();
        while !seen.contains('g') {
            let chunk = body.next().await.unwrap().unwrap().into_data().unwrap();
            seen.push_str(std::str::from_utf8(&chunk).unwrap());
        }
        assert_eq!(seen, "f\ng\n");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn following_stops_at_the_limit() {
        let (first, reader) = {
            let log = agent_log();
            log.push(b"x\n");
            let (_, next) = log.tail(0);
            (Bytes::new(), Reader::Agent { next })
        };
        let body = body_stream(first, Some(reader), Duration::from_millis(600), None);
        let frames = tokio::time::timeout(Duration::from_secs(5), body.collect::<Vec<_>>())
            .await
            .expect("the follow ended by itself");
        // The (empty) tail first.
        assert!(!frames.is_empty());
    }
}
