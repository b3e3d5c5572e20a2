//! Mounting, unmounting, and cleaning up after a mount whose process died.
//!
//! Layer: the edge between the filesystem and the kernel (via fuser).
//!
//! Invariants:
//! - A mount is read-only at the kernel level too (`ro`), so writes fail
//!   with `EROFS` before they reach MusicFS at all.
//! - The session runs on a thread of its own with several FUSE worker
//!   threads; the caller's thread never serves requests.
//! - [`Mounted::unmount`] tries a normal unmount first; only a busy mount
//!   (a player holding a file open) is detached lazily, and then the call
//!   says so instead of waiting for the files to close.
//! - Dropping a [`Mounted`] unmounts it too (without waiting), so a panic
//!   in the caller does not leave a dead mount behind.
//! - [`mount`] returns once the kernel has finished the FUSE handshake (it
//!   waits for one `getattr` of the root), and then raises the mount's
//!   read-ahead (best effort: it needs root) so the kernel sends reads of up
//!   to 1 MiB instead of 128 KiB ones.
//! - A mount's `fsname` (the source column of `/proc/self/mountinfo`, `df`
//!   and `findmnt`) is `musicfs:PID`, naming the process that serves it
//!   ([`serving_pid`] reads it back), so a second mount on a live one can
//!   say whom to stop.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fuser::{MountOption, SessionUnmounter};
use tracing::{debug, info, warn};

use crate::{FuseError, MusicFs, Result};

/// FUSE worker threads. Handlers never wait on an origin (that happens in
/// tokio tasks), so a few threads keep the kernel queue drained.
const FUSE_THREADS: usize = 4;

/// How long an unmount waits for the session thread to end once the kernel
/// side is gone.
const SESSION_END_WAIT: Duration = Duration::from_secs(10);

/// The read-ahead window of the mount, in KiB. The kernel's default for a
/// FUSE mount is 128 KiB, which caps every read request at 128 KiB (each one
/// a round trip through this process). fuser already negotiates requests of
/// up to `fs.fuse.max_pages_limit` pages (1 MiB by default); a 1 MiB window
/// lets the kernel send them, with the next one in flight while the player
/// consumes the last. A larger window measured no faster here
/// (docs/benchmarks.md) but makes the first request of a cold file 256 KiB
/// instead of 128 KiB, and the first bytes wait for all of it.
const READ_AHEAD_KB: u32 = 1024;

/// What a mount's `fsname` starts with; the serving PID follows.
const FSNAME_PREFIX: &str = "musicfs:";

/// The PID of the process serving a MusicFS mount, from its `fsname` (the
/// mount source in `/proc/self/mountinfo`); `None` for any other source.
pub fn serving_pid(fsname: &str) -> Option<u32> {
    fsname.strip_prefix(FSNAME_PREFIX)?.parse().ok()
}

/// A mounted MusicFS. Unmount it with [`Mounted::unmount`]; dropping it
/// unmounts too, without waiting for the session to end.
pub struct Mounted {
    mountpoint: PathBuf,
    /// `None` once joined.
    thread: Option<JoinHandle<io::Result<()>>>,
    unmounter: SessionUnmounter,
}

impl std::fmt::Debug for Mounted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mounted")
            .field("mountpoint", &self.mountpoint)
            .field("finished", &self.is_finished())
            .finish()
    }
}

/// Mounts `fs` read-only at `mountpoint` and serves it on a background
/// thread with several FUSE workers. The filesystem's tasks run on the
/// runtime handle it was built with, which must outlive the mount.
pub fn mount(fs: MusicFs, mountpoint: &Path) -> Result<Mounted> {
    let mount_error = |source| FuseError::Mount {
        mountpoint: mountpoint.to_path_buf(),
        source,
    };
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        MountOption::RO,
        MountOption::FSName(format!("{FSNAME_PREFIX}{}", std::process::id())),
        MountOption::Subtype("musicfs".to_owned()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::NoAtime,
    ];
    config.n_threads = Some(FUSE_THREADS);
    // One /dev/fuse descriptor per worker, so they do not contend on one.
    config.clone_fd = true;
    let mut session = fuser::Session::new(fs, mountpoint, &config).map_err(mount_error)?;
    let unmounter = session.unmount_callable();
    // If the thread cannot start, the closure (and with it the session) is
    // dropped, which unmounts.
    let thread = std::thread::Builder::new()
        .name("musicfs-fuse".to_owned())
        .spawn(move || session.run())
        .map_err(mount_error)?;
    let mounted = Mounted {
        mountpoint: mountpoint.to_path_buf(),
        thread: Some(thread),
        unmounter,
    };
    raise_read_ahead(mountpoint);
    info!(mountpoint = %mountpoint.display(), "mounted");
    Ok(mounted)
}

/// Sets the mount's read-ahead to [`READ_AHEAD_KB`] through sysfs
/// (`/sys/class/bdi/<major>:<minor>/read_ahead_kb` of the mount's device).
///
/// It must happen after the handshake: the kernel applies the handshake's
/// `max_readahead` to the same setting, so an earlier write would be undone.
/// The `stat` of the root waits for exactly that, since the kernel holds
/// every request until the handshake is done. Failing here (not root, no
/// sysfs) only costs speed, so it is logged, not returned.
fn raise_read_ahead(mountpoint: &Path) {
    use std::os::unix::fs::MetadataExt;
    let dev = match std::fs::metadata(mountpoint) {
        Ok(meta) => meta.dev(),
        Err(e) => {
            warn!(mountpoint = %mountpoint.display(), error = %e, "cannot stat the new mount");
            return;
        }
    };
    let knob = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    );
    match std::fs::write(&knob, READ_AHEAD_KB.to_string()) {
        Ok(()) => debug!(%knob, kb = READ_AHEAD_KB, "raised the mount's read-ahead"),
        Err(e) => info!(
            %knob,
            error = %e,
            "cannot raise the mount's read-ahead (needs root); reads arrive in 128 KiB requests"
        ),
    }
}

impl Mounted {
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Unmounts and waits for the session thread to end. A busy mount is
    /// detached lazily and reported as an error: it keeps serving the open
    /// files (so the runtime must stay up) until they close.
    pub fn unmount(mut self) -> Result<()> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        if !thread.is_finished() {
            if let Err(e) = self.unmounter.unmount() {
                if !self.handle_failed_unmount(&thread, &e)? {
                    return Err(FuseError::Unmount {
                        mountpoint: self.mountpoint.clone(),
                        reason: format!(
                            "the mount is still in use by open files ({e}); it was detached \
                             and ends when they close"
                        ),
                    });
                }
            }
        }
        if !wait_finished(&thread, SESSION_END_WAIT) {
            return Err(FuseError::Unmount {
                mountpoint: self.mountpoint.clone(),
                reason: format!(
                    "the kernel side is gone but the session did not end within {SESSION_END_WAIT:?}"
                ),
            });
        }
        let outcome = thread.join();
        info!(mountpoint = %self.mountpoint.display(), "unmounted");
        match outcome {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => Err(FuseError::Session {
                mountpoint: self.mountpoint.clone(),
                source,
            }),
            Err(_panic) => Err(FuseError::Session {
                mountpoint: self.mountpoint.clone(),
                source: io::Error::other("the session thread panicked"),
            }),
        }
    }

    /// After a failed plain unmount: true when the session ends anyway (it
    /// was unmounted from outside meanwhile), false when the mount was busy
    /// and has been detached lazily.
    fn handle_failed_unmount(
        &self,
        thread: &JoinHandle<io::Result<()>>,
        e: &io::Error,
    ) -> Result<bool> {
        if e.raw_os_error() != Some(libc::EBUSY) {
            // Most likely someone ran `fusermount3 -u` a moment ago and the
            // session is on its way out.
            if wait_finished(thread, Duration::from_secs(1)) {
                return Ok(true);
            }
            return Err(FuseError::Unmount {
                mountpoint: self.mountpoint.clone(),
                reason: e.to_string(),
            });
        }
        warn!(mountpoint = %self.mountpoint.display(), "mount is busy; detaching it lazily");
        lazy_unmount(&self.mountpoint).map_err(|reason| FuseError::Unmount {
            mountpoint: self.mountpoint.clone(),
            reason: format!("it is busy ({e}) and a lazy unmount failed too: {reason}"),
        })?;
        Ok(wait_finished(thread, Duration::from_secs(2)))
    }

    /// True once the session has ended: unmounted by [`Mounted::unmount`] or
    /// from outside (`fusermount3 -u`, `umount`). The CLI polls this to exit.
    pub fn is_finished(&self) -> bool {
        match &self.thread {
            Some(thread) => thread.is_finished(),
            None => true,
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        if thread.is_finished() {
            return;
        }
        if let Err(e) = self.unmounter.unmount() {
            warn!(mountpoint = %self.mountpoint.display(), error = %e, "unmount failed; detaching lazily");
            if let Err(reason) = lazy_unmount(&self.mountpoint) {
                warn!(mountpoint = %self.mountpoint.display(), %reason, "lazy unmount failed");
            }
        }
        // The thread ends by itself once the kernel side is gone; a drop
        // does not wait for it.
    }
}

fn wait_finished<T>(thread: &JoinHandle<T>, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while !thread.is_finished() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// True for the errors a FUSE mount gives once its process is gone.
fn is_dead_mount(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOTCONN) | Some(libc::ECONNABORTED)
    )
}

/// If `mountpoint` is a dead FUSE mount (its process died: "Transport
/// endpoint is not connected"), detaches it lazily and returns true; false
/// when there was nothing to clean (including a live mount, which is not
/// touched).
pub fn cleanup_stale_mount(mountpoint: &Path) -> Result<bool> {
    if !looks_dead(mountpoint) {
        return Ok(false);
    }
    warn!(mountpoint = %mountpoint.display(), "found a dead MusicFS mount; unmounting it");
    lazy_unmount(mountpoint).map_err(|reason| FuseError::StaleMount {
        mountpoint: mountpoint.to_path_buf(),
        reason,
    })?;
    if looks_dead(mountpoint) {
        return Err(FuseError::StaleMount {
            mountpoint: mountpoint.to_path_buf(),
            reason: "it is still not connected after the unmount".to_owned(),
        });
    }
    Ok(true)
}

/// True when `mountpoint` is a FUSE mount whose process is gone. `stat`
/// alone can miss it for a moment (the kernel may still answer from
/// attributes it cached), so opening the directory, which always asks the
/// filesystem, is checked too.
fn looks_dead(mountpoint: &Path) -> bool {
    match std::fs::metadata(mountpoint) {
        Err(e) => is_dead_mount(&e),
        Ok(meta) if meta.is_dir() => {
            matches!(std::fs::read_dir(mountpoint), Err(e) if is_dead_mount(&e))
        }
        Ok(_) => false,
    }
}

/// `fusermount3 -u -z`, else `umount -l`: detach the mount now, let the
/// kernel finish it when the last open file closes.
fn lazy_unmount(mountpoint: &Path) -> std::result::Result<(), String> {
    let mut failures = Vec::new();
    for (program, flags) in [("fusermount3", &["-u", "-z"][..]), ("umount", &["-l"][..])] {
        let output = Command::new(program)
            .args(flags)
            .arg("--")
            .arg(mountpoint)
            .output();
        match output {
            Ok(out) if out.status.success() => return Ok(()),
            Ok(out) => failures.push(format!(
                "{program} {}: {} ({})",
                flags.join(" "),
                String::from_utf8_lossy(&out.stderr).trim(),
                out.status
            )),
            Err(e) => failures.push(format!("{program}: {e}")),
        }
    }
    Err(failures.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fsname_names_the_serving_pid() {
        assert_eq!(serving_pid("musicfs:4242"), Some(4242));
        assert_eq!(
            serving_pid(&format!("{FSNAME_PREFIX}{}", std::process::id())),
            Some(std::process::id())
        );
        for other in ["musicfs", "musicfs:", "musicfs:x", "/dev/sda1", "bindfs:1"] {
            assert_eq!(serving_pid(other), None, "{other}");
        }
    }

    #[test]
    fn a_plain_directory_needs_no_cleanup() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!cleanup_stale_mount(dir.path()).unwrap());
        assert!(!cleanup_stale_mount(&dir.path().join("missing")).unwrap());
    }
}
