//! Server processes: spawned with their output in a log file, waited for
//! until they give a real protocol answer, and stopped by PID.
//!
//! Invariants:
//! - Stopping kills the whole process tree by PID (the server and every
//!   process it forked, e.g. sshd's per-connection children, which leave
//!   sshd's process group), so a stopped server leaves no session that
//!   still answers. The root is frozen with SIGSTOP first so it cannot fork
//!   while its descendants are collected.
//! - A stopped server's listening port is closed when `kill` returns: the
//!   root is reaped, and its killed descendants are waited for until they
//!   are gone or zombies (a zombie holds no sockets).
//! - Ports handed out by [`reserve_ports`] are never handed out twice in
//!   one process, so fixtures starting in parallel in one `cargo test` do
//!   not race each other for a port; a race with another process shows as
//!   a server that cannot bind, and its fixture retries on fresh ports.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::error::{FixtureError, IoContext, Result};

/// How long a server may take to answer after it was started. Only bounds
/// a hang: the wait ends as soon as the server answers.
pub const START_DEADLINE: Duration = Duration::from_secs(30);

/// How often readiness is probed while waiting for a server.
const PROBE_INTERVAL: Duration = Duration::from_millis(25);

/// How many fresh sets of ports a fixture tries when its server cannot
/// start (another process took a port between reservation and bind).
pub(crate) const START_ATTEMPTS: usize = 4;

/// A running server process, killed (with its descendants) on drop.
#[derive(Debug)]
pub(crate) struct Spawned {
    child: Child,
    name: &'static str,
    log: PathBuf,
    reaped: bool,
}

impl Spawned {
    /// Starts `cmd` with stdin closed and stdout and stderr appended to
    /// `log`.
    pub(crate) fn spawn(name: &'static str, mut cmd: Command, log: &Path) -> Result<Spawned> {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .ctx(|| format!("opening {name}'s log {}", log.display()))?;
        let err = out
            .try_clone()
            .ctx(|| format!("opening {name}'s log {}", log.display()))?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd
            .spawn()
            .ctx(|| format!("starting {name} ({:?})", cmd.get_program()))?;
        Ok(Spawned {
            child,
            name,
            log: log.to_path_buf(),
            reaped: false,
        })
    }

    /// The server's PID.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the process has exited.
    pub(crate) fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits until `probe` succeeds, the process exits, or
    /// [`START_DEADLINE`] passes. `probe` returns why it failed, for the
    /// error message.
    pub(crate) fn wait_ready(
        &mut self,
        mut probe: impl FnMut() -> std::result::Result<(), String>,
    ) -> Result<()> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.exited() {
                self.reaped = true;
                return Err(FixtureError::Exited {
                    server: self.name,
                    status: status.to_string(),
                    log: log_tail(&self.log),
                });
            }
            let last = match probe() {
                Ok(()) => return Ok(()),
                Err(why) => why,
            };
            if started.elapsed() > START_DEADLINE {
                return Err(FixtureError::NotReady {
                    server: self.name,
                    waited: started.elapsed(),
                    last,
                    log: log_tail(&self.log),
                });
            }
            // Polling interval between probes of the event itself (the
            // server answering), not a guess at how long start-up takes.
            std::thread::sleep(PROBE_INTERVAL);
        }
    }

    /// Kills the process and all its descendants and waits until they are
    /// gone.
    pub(crate) fn kill(&mut self) {
        if self.reaped {
            return;
        }
        let pid = self.child.id();
        if self.exited().is_none() {
            // Freeze the root so it forks no new children while its tree is
            // collected; SIGKILL ends a stopped process too.
            signal(pid, libc::SIGSTOP);
            let descendants = descendants_of(pid);
            signal(pid, libc::SIGKILL);
            for &d in &descendants {
                signal(d, libc::SIGKILL);
            }
            let _ = self.child.wait();
            wait_gone(&descendants);
        }
        self.reaped = true;
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts a server with `attempt`, trying again (each attempt picks fresh
/// ports) while the server exits before answering, which is how a port
/// taken by another process since its reservation shows.
pub(crate) fn start_with_retries(mut attempt: impl FnMut() -> Result<Spawned>) -> Result<Spawned> {
    let mut tries = 1;
    loop {
        match attempt() {
            Err(FixtureError::Exited { .. }) if tries < START_ATTEMPTS => tries += 1,
            done => return done,
        }
    }
}

/// The running process of a fixture, if any: what `stop`, `start_again`
/// and `is_running` act on.
#[derive(Debug, Default)]
pub(crate) struct Slot(Mutex<Option<Spawned>>);

impl Slot {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Spawned>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn set(&self, p: Spawned) {
        *self.lock() = Some(p);
    }

    /// Kills the process; returns once it and its descendants are gone.
    pub(crate) fn stop(&self) {
        if let Some(mut p) = self.lock().take() {
            p.kill();
        }
    }

    /// Runs `launch` unless the process is running.
    pub(crate) fn start_again(&self, launch: impl FnOnce() -> Result<Spawned>) -> Result<()> {
        let mut guard = self.lock();
        if let Some(p) = guard.as_mut() {
            if p.exited().is_none() {
                return Ok(());
            }
        }
        *guard = Some(launch()?);
        Ok(())
    }

    pub(crate) fn is_running(&self) -> bool {
        self.lock().as_mut().is_some_and(|p| p.exited().is_none())
    }

    /// The PID of the running process.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.lock().as_ref().map(Spawned::pid)
    }
}

/// Sends `sig` to `pid`; a process that is already gone is fine.
fn signal(pid: u32, sig: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) takes plain integers and touches no memory of ours;
    // `pid` is a positive PID we spawned or found under it in /proc, never
    // 0 or -1 (which would signal groups).
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Every process below `root` in the process tree, read from /proc.
fn descendants_of(root: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        if let Some((ppid, _)) = stat_of(pid) {
            children.entry(ppid).or_default().push(pid);
        }
    }
    let mut out = Vec::new();
    let mut todo = vec![root];
    while let Some(p) = todo.pop() {
        if let Some(kids) = children.get(&p) {
            for &k in kids {
                out.push(k);
                todo.push(k);
            }
        }
    }
    out
}

/// `(ppid, state)` of `pid` from /proc/PID/stat, or None when it is gone.
fn stat_of(pid: u32) -> Option<(u32, char)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces or ')';
    // the fields after the last ')' are "state ppid ...".
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((ppid, state))
}

/// Waits until each of `pids` is gone or a zombie (its sockets closed).
fn wait_gone(pids: &[u32]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    for &pid in pids {
        while matches!(stat_of(pid), Some((_, state)) if state != 'Z' && state != 'X') {
            if Instant::now() > deadline {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// The last lines of a log file, for error messages.
pub(crate) fn log_tail(path: &Path) -> String {
    const TAIL: u64 = 4096;
    let Ok(mut f) = File::open(path) else {
        return format!("(no log at {})", path.display());
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(TAIL)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    if text.trim().is_empty() {
        format!("(empty log at {})", path.display())
    } else {
        text
    }
}

/// Ports already handed out in this process.
fn handed_out() -> &'static Mutex<HashSet<u16>> {
    static PORTS: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    PORTS.get_or_init(|| Mutex::new(HashSet::new()))
}

/// `n` distinct loopback ports that were free a moment ago and that this
/// process has not handed out before.
pub(crate) fn reserve_ports(n: usize) -> Result<Vec<u16>> {
    let mut taken = handed_out().lock().unwrap_or_else(|p| p.into_inner());
    // All listeners are held until the end, so the kernel gives n distinct
    // ports.
    let mut held = Vec::new();
    let mut ports = Vec::new();
    while ports.len() < n {
        let l = TcpListener::bind("127.0.0.1:0").ctx(|| "binding 127.0.0.1:0".to_string())?;
        let port = l
            .local_addr()
            .ctx(|| "reading a bound port".to_string())?
            .port();
        held.push(l);
        if taken.insert(port) {
            ports.push(port);
        }
    }
    Ok(ports)
}

/// Connects to `addr` with a short timeout, for readiness probes.
pub(crate) fn connect(addr: SocketAddr) -> std::result::Result<TcpStream, String> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
    Ok(s)
}

/// Runs `cmd` to completion and returns its stdout, or a
/// [`FixtureError::Command`] with its stderr.
pub(crate) fn run(cmd: &mut Command) -> Result<Vec<u8>> {
    run_with_input(cmd, None)
}

/// Like [`run`], feeding `input` to the command's stdin.
pub(crate) fn run_with_input(cmd: &mut Command, input: Option<&[u8]>) -> Result<Vec<u8>> {
    use std::io::Write;
    let shown = format!("{cmd:?}");
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().ctx(|| format!("running {shown}"))?;
    let stdin = child.stdin.take();
    // The writer runs beside the reader so neither side can block the other
    // on a full pipe.
    let output = std::thread::scope(|scope| {
        if let (Some(mut stdin), Some(input)) = (stdin, input) {
            scope.spawn(move || {
                let _ = stdin.write_all(input);
            });
        }
        child.wait_with_output()
    })
    .ctx(|| format!("waiting for {shown}"))?;
    if output.status.success() {
        Ok(output.stdout)
    } else {
        Err(FixtureError::Command {
            command: shown,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_ports_are_distinct_across_calls() {
        let a = reserve_ports(5).unwrap();
        let b = reserve_ports(5).unwrap();
        let all: HashSet<u16> = a.iter().chain(&b).copied().collect();
        assert_eq!(all.len(), 10);
    }

    #[test]
    fn kill_takes_the_forked_children_too() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        // A parent that forks a child which leaves its process group, as
        // sshd's session children do; the child's PID goes to a file.
        let pidfile = dir.path().join("child.pid");
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(format!(
            "setsid sleep 1000 & echo $! > {}; wait",
            pidfile.display()
        ));
        let mut p = Spawned::spawn("sh", cmd, &log).unwrap();
        p.wait_ready(|| {
            std::fs::read_to_string(&pidfile)
                .ok()
                .filter(|s| s.ends_with('\n'))
                .map(|_| ())
                .ok_or_else(|| "no pid file yet".to_string())
        })
        .unwrap();
        let child: u32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(stat_of(child).is_some());
        p.kill();
        assert!(
            matches!(stat_of(child), None | Some((_, 'Z' | 'X'))),
            "the forked child still runs"
        );
    }
}
