//! The cache directory lock: one MusicFS process per cache directory.
//!
//! `CACHE/musicfs.lock` is held with `flock(LOCK_EX | LOCK_NB)` for the life
//! of the process and holds its PID. The kernel drops an flock when its
//! holder dies, however it dies, so a crash never leaves a lock that blocks
//! the next start; the PID inside is only there to tell the user who holds
//! it. A second process gets [`LockError::Held`] at once, naming that PID.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

#[derive(Debug)]
pub struct CacheLock {
    file: File,
    path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another musicfs (PID {}) is using this cache directory (lock file {}); stop it first or use another --cache-dir", pid.map_or_else(|| "unknown".to_owned(), |p| p.to_string()), path.display())]
    Held { path: PathBuf, pid: Option<u32> },
    #[error("cannot lock {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl CacheLock {
    pub const FILE_NAME: &'static str = "musicfs.lock";

    /// Takes the lock in `cache_dir` (created if missing) and writes our PID.
    pub fn acquire(cache_dir: &Path) -> Result<Self, LockError> {
        let path = cache_dir.join(Self::FILE_NAME);
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(cache_dir).map_err(io)?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        // SAFETY: flock on a file descriptor we own and keep open; it has no
        // memory effects.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                return Err(LockError::Held {
                    path,
                    pid: text.trim().parse().ok(),
                });
            }
            return Err(io(err));
        }
        file.set_len(0).map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        file.flush().map_err(io)?;
        Ok(Self { file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for CacheLock {
    fn drop(&mut self) {
        // The flock goes with the fd; emptying the file keeps a stale PID
        // from being reported later.
        let _ = self.file.set_len(0);
    }
}

/// Who holds the lock, without taking it: `(pid, alive)`; `None` when free.
pub fn holder(cache_dir: &Path) -> Option<(Option<u32>, bool)> {
    match CacheLock::acquire_probe(cache_dir) {
        Ok(()) => None,
        Err(pid) => Some((pid, pid.is_some_and(pid_alive))),
    }
}

impl CacheLock {
    /// Tries the lock and releases it at once; Err(pid) when held.
    fn acquire_probe(cache_dir: &Path) -> Result<(), Option<u32>> {
        let path = cache_dir.join(Self::FILE_NAME);
        let Ok(mut file) = OpenOptions::new().read(true).open(&path) else {
            return Ok(());
        };
        // SAFETY: as in `acquire`; the lock is dropped with `file`.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(());
        }
        let mut text = String::new();
        let _ = file.read_to_string(&mut text);
        Err(text.trim().parse().ok())
    }
}

/// A shared hold on `musicfs.lock` that writes nothing: while it is held a
/// mount cannot take the lock (and start changing the cache), and other
/// readers (another verify) can. For `verify` without `--repair`.
#[derive(Debug)]
pub struct SharedLock {
    _file: File,
}

impl SharedLock {
    /// `Ok(None)` when there is no lock file (no mount ever ran here; none
    /// is created). A mount that holds the lock is [`LockError::Held`].
    pub fn acquire(cache_dir: &Path) -> Result<Option<Self>, LockError> {
        let path = cache_dir.join(CacheLock::FILE_NAME);
        let mut file = match OpenOptions::new().read(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(LockError::Io { path, source }),
        };
        // SAFETY: as in `CacheLock::acquire`; the lock goes with `file`.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) };
        if rc != 0 {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            return Err(LockError::Held {
                path,
                pid: text.trim().parse().ok(),
            });
        }
        Ok(Some(Self { _file: file }))
    }
}

pub fn pid_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_pid_file_prevents_concurrent_mount() {
        let dir = tempfile::tempdir().unwrap();
        let first = CacheLock::acquire(dir.path()).unwrap();
        let text = std::fs::read_to_string(first.path()).unwrap();
        assert_eq!(text.trim(), std::process::id().to_string());
        match CacheLock::acquire(dir.path()) {
            Err(e @ LockError::Held { pid: Some(pid), .. }) => {
                assert_eq!(pid, std::process::id());
                let msg = e.to_string();
                assert!(
                    msg.contains(&pid.to_string()) && msg.contains("musicfs.lock"),
                    "{msg}"
                );
            }
            other => panic!("second lock: {other:?}"),
        }
        assert_eq!(holder(dir.path()), Some((Some(std::process::id()), true)));
        drop(first);
        let again = CacheLock::acquire(dir.path()).unwrap();
        drop(again);
        assert_eq!(holder(dir.path()), None);
    }
}
