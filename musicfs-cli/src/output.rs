//! What `musicfs` writes to the terminal: logs (stderr) and its few plain
//! lines (stdout), neither of which may kill the daemon.
//!
//! Invariants:
//! - No write to stdout or stderr can panic or end the process. When the
//!   terminal a `musicfs mount` was started from closes, writes to it fail
//!   (EIO for a hung-up tty, EPIPE for a closed pipe; SIGPIPE is ignored by
//!   Rust programs); `println!`/`eprintln!` would panic on that, and so would
//!   `tracing_subscriber::fmt()`'s default of reporting a failed log write
//!   with `eprintln!`. Every line here is written with its error ignored,
//!   and the log layer is built with that reporting off.
//! - The log level can change while the daemon runs ([`set_filter`], a
//!   SIGHUP reload), except when `RUST_LOG` chose it ([`level_from_env`]).

use std::io::Write;
use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();
static FROM_ENV: OnceLock<bool> = OnceLock::new();

/// Logs to stderr at `level` (default info); `RUST_LOG` wins when it is set
/// and valid.
pub fn init_logging(level: Option<&str>) {
    let (filter, from_env) = match EnvFilter::try_from_default_env() {
        Ok(f) => (f, true),
        Err(_) => (EnvFilter::new(level.unwrap_or("info")), false),
    };
    let (filter, handle) = reload::Layer::new(filter);
    use std::io::IsTerminal;
    // A `fmt::Layer` (unlike the `fmt()` builder) does not report a failed
    // write with `eprintln!`, which would panic on a closed terminal.
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init()
        .is_ok()
    {
        let _ = FILTER.set(handle);
        let _ = FROM_ENV.set(from_env);
    }
}

/// True when `RUST_LOG` chose the log level (a reload leaves it alone).
pub fn level_from_env() -> bool {
    FROM_ENV.get().copied().unwrap_or(false)
}

/// The filter for a log level such as `debug` or `musicfs_cas=debug,info`.
pub fn parse_level(level: &str) -> Result<EnvFilter, String> {
    EnvFilter::try_new(level).map_err(|e| format!("'{level}' is not a valid log level: {e}"))
}

/// Makes `filter` the log filter of the running process.
pub fn set_filter(filter: EnvFilter) -> Result<(), String> {
    let handle = FILTER
        .get()
        .ok_or_else(|| "logging is not set up".to_owned())?;
    handle.reload(filter).map_err(|e| e.to_string())
}

/// One line on stdout; lost, not fatal, when the terminal is gone.
pub fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// One line on stderr; lost, not fatal, when the terminal is gone.
pub fn complain(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}
