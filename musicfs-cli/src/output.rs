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
//! - A terminal that stops reading (Ctrl-S, a stopped pager, a terminal
//!   whose master nobody reads) never stalls the filesystem: log lines are
//!   queued (bounded) to one writer thread, and dropped, counted, when the
//!   queue is full; the writer says how many it dropped when it can write
//!   again. [`flush_logs`] waits a bounded time for the queue at exit, and
//!   the plain lines ([`say`], [`complain`]) wait at most a second.
//! - The log level can change while the daemon runs ([`set_filter`], a
//!   SIGHUP reload), except when `RUST_LOG` chose it ([`level_from_env`]).

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();
static FROM_ENV: OnceLock<bool> = OnceLock::new();
static QUEUE: OnceLock<LogQueue> = OnceLock::new();

/// Log lines the writer thread has not written yet, at most.
const QUEUE_LINES: usize = 4096;

enum Item {
    Line(Vec<u8>),
    /// Answered once every line queued before it was written.
    Flush(mpsc::Sender<()>),
}

/// The log's writer: hands each formatted line to the writer thread.
#[derive(Clone)]
struct LogQueue {
    tx: SyncSender<Item>,
    dropped: Arc<AtomicU64>,
}

impl LogQueue {
    fn start() -> Self {
        let (tx, rx) = mpsc::sync_channel::<Item>(QUEUE_LINES);
        let dropped = Arc::new(AtomicU64::new(0));
        let lost = Arc::clone(&dropped);
        let spawned = std::thread::Builder::new()
            .name("musicfs-log".to_owned())
            .spawn(move || {
                for item in rx {
                    match item {
                        Item::Line(line) => {
                            let mut err = std::io::stderr().lock();
                            let n = lost.swap(0, Ordering::Relaxed);
                            if n > 0 {
                                let _ = writeln!(
                                    err,
                                    "musicfs: {n} log lines were dropped while the terminal was not reading"
                                );
                            }
                            let _ = err.write_all(&line);
                        }
                        Item::Flush(done) => {
                            let _ = done.send(());
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            // Without the thread the queue fills and lines are dropped;
            // say so once, the way everything here is said.
            complain(&format!(
                "musicfs: cannot start the log writer ({e}); logs are lost"
            ));
        }
        LogQueue { tx, dropped }
    }
}

impl Write for LogQueue {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.tx.try_send(Item::Line(buf.to_vec())) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LogQueue {
    type Writer = LogQueue;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Waits, at most `limit`, until every log line so far is written (call
/// before exiting, and before a line written directly, so it comes last).
pub fn flush_logs(limit: Duration) {
    let Some(queue) = QUEUE.get() else {
        return;
    };
    let (done, wait) = mpsc::channel();
    let sent = match queue.tx.try_send(Item::Flush(done.clone())) {
        Ok(()) => true,
        // Full: wait for room, within the same limit.
        Err(TrySendError::Full(_)) => {
            let tx = queue.tx.clone();
            std::thread::spawn(move || {
                let _ = tx.send(Item::Flush(done));
            });
            true
        }
        Err(TrySendError::Disconnected(_)) => false,
    };
    if sent {
        let _ = wait.recv_timeout(limit);
    }
}

/// Logs to stderr at `level` (default info); `RUST_LOG` wins when it is set
/// and valid.
pub fn init_logging(level: Option<&str>) {
    let (filter, from_env) = match EnvFilter::try_from_default_env() {
        Ok(f) => (f, true),
        Err(_) => (EnvFilter::new(level.unwrap_or("info")), false),
    };
    let (filter, handle) = reload::Layer::new(filter);
    use std::io::IsTerminal;
    let queue = QUEUE.get_or_init(LogQueue::start).clone();
    // A `fmt::Layer` (unlike the `fmt()` builder) does not report a failed
    // write with `eprintln!`, which would panic on a closed terminal.
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(queue)
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

/// How long a plain line may wait for a terminal that is not reading.
const LINE_WAIT: Duration = Duration::from_secs(1);

/// Writes `line` on a thread of its own and waits for it at most
/// [`LINE_WAIT`]: neither a gone terminal (the write fails) nor one that
/// stopped reading (the write blocks) may hold the daemon, its exit
/// included. A line given up on is still written if the terminal reads
/// again before the process ends.
fn write_line(to_stderr: bool, line: &str) {
    let line = format!("{line}\n");
    let (done, wait) = mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("musicfs-line".to_owned())
        .spawn(move || {
            let _ = if to_stderr {
                std::io::stderr().lock().write_all(line.as_bytes())
            } else {
                let mut out = std::io::stdout().lock();
                out.write_all(line.as_bytes()).and_then(|()| out.flush())
            };
            let _ = done.send(());
        });
    if spawned.is_ok() {
        let _ = wait.recv_timeout(LINE_WAIT);
    }
}

/// One line on stdout; lost, not fatal, when the terminal is gone.
pub fn say(line: &str) {
    write_line(false, line);
}

/// One line on stderr; lost, not fatal, when the terminal is gone.
pub fn complain(line: &str) {
    write_line(true, line);
}
