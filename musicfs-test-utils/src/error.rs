//! The one error type of the test fixtures that start real processes and
//! sockets (servers, the fault-injecting proxy).
//!
//! Every variant says what happened and what to do about it: a missing
//! binary names the package that provides it, a server that died or never
//! answered carries the end of its log. Tests fail loudly with these; a
//! fixture never skips a test because a tool is missing.

use std::io;
use std::time::Duration;

/// What went wrong while setting up or driving a test fixture.
#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    /// A program the fixture runs is not installed (or too old).
    #[error("{tool} not found: {detail}; install it with {install} (scripts/setup does)")]
    MissingTool {
        tool: &'static str,
        detail: String,
        install: &'static str,
    },
    /// A file or socket operation failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    /// The server process exited before it answered.
    #[error("{server} exited before it answered ({status}); the end of its log:\n{log}")]
    Exited {
        server: &'static str,
        status: String,
        log: String,
    },
    /// The server kept running but never gave a real protocol answer.
    #[error(
        "{server} did not answer within {waited:?} (last probe: {last}); the end of its log:\n{log}"
    )]
    NotReady {
        server: &'static str,
        waited: Duration,
        last: String,
        log: String,
    },
    /// A helper command (rclone, ssh-keygen, sftp, ...) failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    /// The fixture's server was stopped with `stop()`.
    #[error("{server} is stopped; call start_again() first")]
    Stopped { server: &'static str },
    /// An object key or relative path that cannot name a file in a store.
    #[error("bad key {key:?}: {why}")]
    BadKey { key: String, why: &'static str },
    /// An HTTP answer that could not be parsed.
    #[error("bad HTTP answer from {from}: {why}")]
    Http { from: String, why: String },
}

/// Result of the fixture functions.
pub type Result<T> = std::result::Result<T, FixtureError>;

impl FixtureError {
    /// Wraps an I/O error with what was being done.
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        FixtureError::Io {
            what: what.into(),
            source,
        }
    }
}

/// Adds context to I/O results.
pub(crate) trait IoContext<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| FixtureError::io(what(), e))
    }
}
