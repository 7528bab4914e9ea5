//! `ballast logs SERVICE [-f] [-n|--tail LINES]`: prints a service's captured
//! stdout and stderr from the files the supervisor writes
//! (`<dir>/<service>.log`, and `.log.1` from before the last rotation).
//! Follow mode polls for growth and notices rotation (a new file under the
//! name) and truncation. Output that rotates twice between two polls
//! (more than the cap in 250 ms) skips the middle file.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::node::supervisor::{log_path, rotated_log_path, valid_service_name, DEFAULT_LOG_DIR};

/// How often follow mode looks for new output.
const FOLLOW_POLL: Duration = Duration::from_millis(250);

#[derive(Debug, clap::Args)]
pub struct LogsArgs {
    /// The service, as named in `[services.NAME]`.
    pub service: String,
    /// Keep printing output as the service writes it.
    #[arg(short, long)]
    pub follow: bool,
    /// How many of the last lines to print first.
    #[arg(short = 'n', long, visible_alias = "tail", default_value_t = 50)]
    pub lines: usize,
    /// Where the logs are (the supervisor's log directory).
    #[arg(long, default_value = DEFAULT_LOG_DIR, hide = true)]
    pub log_dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum LogsError {
    #[error("{service:?} is not a service name")]
    InvalidName { service: String },
    #[error("service {service}: no log at {}", path.display())]
    NoLog { service: String, path: PathBuf },
    #[error("reading {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing the output")]
    Write(#[source] std::io::Error),
}

pub fn run(args: LogsArgs) -> anyhow::Result<()> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let follower = print_tail(&args.log_dir, &args.service, args.lines, &mut out)?;
    if args.follow {
        let mut follower = follower;
        loop {
            std::thread::sleep(FOLLOW_POLL);
            follower.poll(&mut out)?;
        }
    }
    Ok(())
}

/// Prints the last `lines` lines (from the rotated file too when the
/// current one has fewer) and returns a follower positioned after them.
pub fn print_tail(
    dir: &Path,
    service: &str,
    lines: usize,
    out: &mut impl Write,
) -> Result<Follower, LogsError> {
    if !valid_service_name(service) {
        return Err(LogsError::InvalidName {
            service: service.to_owned(),
        });
    }
    let path = log_path(dir, service);
    let mut follower = match Follower::open(&path) {
        Ok(f) => f,
        Err(LogsError::Read { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Err(LogsError::NoLog {
                service: service.to_owned(),
                path,
            })
        }
        Err(e) => return Err(e),
    };
    let mut current = Vec::new();
    follower.read_new(&mut current)?;
    let wanted = lines;
    let mut text = current;
    if count_lines(&text) < wanted {
        let rotated = rotated_log_path(dir, service);
        match std::fs::read(&rotated) {
            Ok(mut older) => {
                older.extend_from_slice(&text);
                text = older;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(LogsError::Read {
                    path: rotated,
                    source,
                })
            }
        }
    }
    out.write_all(last_lines(&text, wanted))
        .and_then(|()| out.flush())
        .map_err(LogsError::Write)?;
    Ok(follower)
}

fn count_lines(text: &[u8]) -> usize {
    text.iter().filter(|&&b| b == b'\n').count()
}

/// The tail of `text` holding its last `n` lines.
fn last_lines(text: &[u8], n: usize) -> &[u8] {
    if n == 0 {
        return &[];
    }
    // Skip the final newline so it does not count as an empty line.
    let body = text.strip_suffix(b"\n").unwrap_or(text);
    let mut seen = 0;
    for (i, &b) in body.iter().enumerate().rev() {
        if b == b'\n' {
            seen += 1;
            if seen == n {
                return &text[i + 1..];
            }
        }
    }
    text
}

/// Reads a log file as it grows, across rotations.
#[derive(Debug)]
pub struct Follower {
    path: PathBuf,
    file: File,
    inode: u64,
    position: u64,
}

impl Follower {
    fn open(path: &Path) -> Result<Self, LogsError> {
        let read_err = |source| LogsError::Read {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(read_err)?;
        let inode = file.metadata().map_err(read_err)?.ino();
        Ok(Follower {
            path: path.to_owned(),
            file,
            inode,
            position: 0,
        })
    }

    /// Appends whatever was written since the last read.
    fn read_new(&mut self, buf: &mut Vec<u8>) -> Result<(), LogsError> {
        let read = self
            .file
            .read_to_end(buf)
            .map_err(|source| LogsError::Read {
                path: self.path.clone(),
                source,
            })?;
        self.position += read as u64;
        Ok(())
    }

    /// Prints new output. After a rotation it finishes the old file first,
    /// then starts the new one from its beginning.
    pub fn poll(&mut self, out: &mut impl Write) -> Result<(), LogsError> {
        let mut buf = Vec::new();
        match std::fs::metadata(&self.path) {
            Ok(meta) if meta.ino() != self.inode => {
                // The writer no longer writes to the old file once renamed.
                self.read_new(&mut buf)?;
                match Follower::open(&self.path) {
                    Ok(next) => *self = next,
                    Err(e) => tracing::debug!(error = %crate::error_chain(&e), "log reopen failed"),
                }
            }
            Ok(meta) if meta.len() < self.position => {
                self.file
                    .seek(SeekFrom::Start(0))
                    .map_err(|source| LogsError::Read {
                        path: self.path.clone(),
                        source,
                    })?;
                self.position = 0;
            }
            // Missing between rename and create, or unchanged.
            _ => {}
        }
        self.read_new(&mut buf)?;
        if !buf.is_empty() {
            out.write_all(&buf)
                .and_then(|()| out.flush())
                .map_err(LogsError::Write)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::supervisor::RotatingLog;

    #[test]
    fn tail_prints_the_last_lines_across_the_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = RotatingLog::open(dir.path(), "web", 40).unwrap();
        for i in 0..6 {
            log.write(format!("line {i}\n").as_bytes()).unwrap();
        }
        // 7 bytes a line, cap 40: lines 0-4 rotated, line 5 current.
        let mut out = Vec::new();
        print_tail(dir.path(), "web", 3, &mut out).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "line 3\nline 4\nline 5\n");
        let mut out = Vec::new();
        print_tail(dir.path(), "web", 100, &mut out).unwrap();
        assert_eq!(String::from_utf8(out).unwrap().lines().count(), 6);
        let mut out = Vec::new();
        print_tail(dir.path(), "web", 0, &mut out).unwrap();
        assert!(out.is_empty());

        let err = print_tail(dir.path(), "db", 3, &mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("service db: no log at"), "{err}");
        let err = print_tail(dir.path(), "../etc/passwd", 3, &mut Vec::new()).unwrap_err();
        assert!(matches!(err, LogsError::InvalidName { .. }), "{err}");
    }

    #[test]
    fn last_lines_handles_partial_and_empty_text() {
        assert_eq!(last_lines(b"a\nb\nc", 2), b"b\nc");
        assert_eq!(last_lines(b"a\nb\nc\n", 1), b"c\n");
        assert_eq!(last_lines(b"", 5), b"");
        assert_eq!(last_lines(b"a\n", 5), b"a\n");
    }

    #[test]
    fn follow_sees_growth_rotation_and_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = RotatingLog::open(dir.path(), "web", 30).unwrap();
        log.write(b"first\n").unwrap();
        let mut out = Vec::new();
        let mut follower = print_tail(dir.path(), "web", 10, &mut out).unwrap();
        assert_eq!(out, b"first\n");

        let mut out = Vec::new();
        follower.poll(&mut out).unwrap();
        assert!(out.is_empty());
        // Written in a burst that rotates twice between polls would lose the
        // middle file; one rotation between polls loses nothing.
        for line in ["second line\n", "third line\n", "fourth line\n"] {
            log.write(line.as_bytes()).unwrap();
        }
        follower.poll(&mut out).unwrap();
        follower.poll(&mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "second line\nthird line\nfourth line\n"
        );

        let path = log_path(dir.path(), "web");
        std::fs::write(&path, "").unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"cut\n")
            .unwrap();
        let mut out = Vec::new();
        follower.poll(&mut out).unwrap();
        // Seen as truncated because it is now shorter than what was read.
        assert_eq!(out, b"cut\n");
    }
}
