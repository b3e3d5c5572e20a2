//! A `musicfs mount` process for tests: started for real, its stdout and
//! stderr (the log) captured line by line so a test can wait for what the
//! daemon says instead of sleeping, and stopped and unmounted on drop.
#![allow(dead_code)] // each test file uses part of it

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_musicfs");

/// Bounds waits that should end in seconds, so a hang fails the test
/// instead of blocking it; generous for a loaded 2-core machine.
pub const DEADLINE: Duration = Duration::from_secs(90);

/// Lines a process wrote, and a signal when another arrives.
#[derive(Default)]
pub struct Lines {
    lines: Mutex<Vec<String>>,
    more: Condvar,
}

impl Lines {
    fn push(&self, line: String) {
        self.lines.lock().unwrap().push(line);
        self.more.notify_all();
    }

    pub fn count(&self, pred: impl Fn(&str) -> bool) -> usize {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| pred(l))
            .count()
    }

    pub fn all(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Waits until `n` lines match `pred`; false at the deadline.
    pub fn wait_for(&self, n: usize, limit: Duration, pred: impl Fn(&str) -> bool) -> bool {
        let deadline = Instant::now() + limit;
        let mut lines = self.lines.lock().unwrap();
        loop {
            if lines.iter().filter(|l| pred(l)).count() >= n {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            lines = self.more.wait_timeout(lines, deadline - now).unwrap().0;
        }
    }
}

fn capture(stream: impl std::io::Read + Send + 'static, into: Arc<Lines>) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            into.push(line);
        }
    });
}

/// A running `musicfs mount`; on drop it is stopped and its mount removed.
pub struct Daemon {
    child: Option<Child>,
    pub mountpoint: PathBuf,
    pub stdout: Arc<Lines>,
    pub log: Arc<Lines>,
}

impl Daemon {
    /// Starts `musicfs mount MOUNTPOINT --cache-dir CACHE ARGS...` and waits
    /// until it says it is mounted.
    pub fn start(mountpoint: &Path, cache: &Path, args: &[&str]) -> Daemon {
        Self::start_with_env(mountpoint, cache, args, &[])
    }

    /// [`Daemon::start`] with extra environment variables (credentials of
    /// a remote origin).
    pub fn start_with_env(
        mountpoint: &Path,
        cache: &Path,
        args: &[&str],
        env: &[(&str, String)],
    ) -> Daemon {
        let mut child = Command::new(BIN)
            .arg("mount")
            .arg(mountpoint)
            .arg("--cache-dir")
            .arg(cache)
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn musicfs");
        let stdout = Arc::new(Lines::default());
        let log = Arc::new(Lines::default());
        capture(child.stdout.take().unwrap(), Arc::clone(&stdout));
        capture(child.stderr.take().unwrap(), Arc::clone(&log));
        let mut d = Daemon {
            child: Some(child),
            mountpoint: mountpoint.to_owned(),
            stdout,
            log,
        };
        let up = d.stdout.wait_for(1, DEADLINE, |l| l.contains("mounted at"));
        if !up {
            let status = d.wait(Duration::from_secs(5));
            panic!(
                "musicfs did not come up ({status:?}); its log:\n{}",
                d.log.all()
            );
        }
        d
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(st.success(), "kill -{sig} failed");
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => c.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    /// SIGTERM, then asserts a clean exit (0).
    pub fn stop(&mut self) {
        self.signal("TERM");
        let st = self.wait(DEADLINE).expect("SIGTERM did not end musicfs");
        assert!(
            st.success(),
            "musicfs exited with {st:?}:\n{}",
            self.log.all()
        );
    }

    /// Waits for the process to end; its exit status.
    pub fn wait(&mut self, limit: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        let child = self.child.as_mut()?;
        while start.elapsed() < limit {
            if let Some(st) = child.try_wait().unwrap() {
                self.child = None;
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                if c.try_wait().ok().flatten().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("fusermount3")
            .arg("-uz")
            .arg(&self.mountpoint)
            .stderr(Stdio::null())
            .status();
    }
}

pub fn musicfs(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

/// `musicfs status --json` of `cache`.
pub fn status(cache: &Path) -> serde_json::Value {
    let out = musicfs(&["status", "--json", "--cache-dir", cache.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Polls `cond` until it holds; panics naming `what` at the deadline. The
/// pause between polls only spaces them out: the condition is the event.
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn is_mounted(mp: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    let mp = mp.to_str().unwrap().replace(' ', "\\040");
    mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(mp.as_str()))
}
