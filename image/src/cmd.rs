//! Runs the external tools the build needs (apt, depmod, mkfs.*, veritysetup,
//! mtools): one helper that shows the command line and, on failure, the exit
//! status and stderr, so every tool error names what was run.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A failed external command.
#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    #[error("cannot run `{cmdline}` (is it installed? try `cargo xtask deps`)")]
    Spawn {
        cmdline: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{cmdline}` failed ({status}): {stderr}")]
    Failed {
        cmdline: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("`{cmdline}` printed output that is not UTF-8")]
    Utf8 { cmdline: String },
}

/// One command line, built up and then run once.
#[derive(Debug, Clone)]
pub struct Cmd {
    program: OsString,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    cwd: Option<PathBuf>,
}

impl Cmd {
    pub fn new(program: impl AsRef<OsStr>) -> Self {
        Cmd {
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            env: Vec::new(),
            cwd: None,
        }
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    pub fn current_dir(mut self, dir: &Path) -> Self {
        self.cwd = Some(dir.to_owned());
        self
    }

    fn command(&self) -> Command {
        let mut c = Command::new(&self.program);
        c.args(&self.args);
        // Tools print dates and messages; keep them in one language.
        c.env("LC_ALL", "C");
        for (k, v) in &self.env {
            c.env(k, v);
        }
        if let Some(dir) = &self.cwd {
            c.current_dir(dir);
        }
        c
    }

    /// Runs the command, capturing stdout and stderr; returns stdout.
    pub fn output(&self) -> Result<String, CmdError> {
        let out = self
            .command()
            .stdin(Stdio::null())
            .output()
            .map_err(|source| CmdError::Spawn {
                cmdline: self.to_string(),
                source,
            })?;
        if !out.status.success() {
            return Err(CmdError::Failed {
                cmdline: self.to_string(),
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        String::from_utf8(out.stdout).map_err(|_| CmdError::Utf8 {
            cmdline: self.to_string(),
        })
    }

    /// Runs the command, discarding stdout.
    pub fn run(&self) -> Result<(), CmdError> {
        self.output().map(drop)
    }

    /// Runs the command with stdout and stderr on this terminal (for long
    /// steps whose progress the user should see).
    pub fn run_inherit(&self) -> Result<(), CmdError> {
        let status = self
            .command()
            .stdin(Stdio::null())
            .status()
            .map_err(|source| CmdError::Spawn {
                cmdline: self.to_string(),
                source,
            })?;
        if !status.success() {
            return Err(CmdError::Failed {
                cmdline: self.to_string(),
                status,
                stderr: "(printed above)".to_owned(),
            });
        }
        Ok(())
    }
}

impl fmt::Display for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (k, v) in &self.env {
            write!(f, "{}={} ", k.to_string_lossy(), v.to_string_lossy())?;
        }
        write!(f, "{}", self.program.to_string_lossy())?;
        for a in &self.args {
            let a = a.to_string_lossy();
            if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '\'') {
                write!(f, " '{}'", a.replace('\'', "'\\''"))?;
            } else {
                write!(f, " {a}")?;
            }
        }
        Ok(())
    }
}

/// True when `program` can be found on `PATH` (or is an existing path).
pub fn have(program: &str) -> bool {
    if program.contains('/') {
        return Path::new(program).exists();
    }
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_names_the_command_and_its_stderr() {
        let err = Cmd::new("sh")
            .args(["-c", "echo oops >&2; exit 3"])
            .run()
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("`sh -c 'echo oops >&2; exit 3'`"), "{msg}");
        assert!(msg.contains("oops"), "{msg}");
    }

    #[test]
    fn missing_program_is_a_spawn_error() {
        let err = Cmd::new("ballast-no-such-tool").run().unwrap_err();
        assert!(matches!(err, CmdError::Spawn { .. }));
        assert!(!have("ballast-no-such-tool"));
        assert!(have("sh"));
    }
}
