//! The daemon's life as a terminal user meets it: SIGHUP (a reload, or the
//! terminal closing under `musicfs mount`), and where a mount may not go.
//! Real processes, real mounts, a real pseudo-terminal.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

#[path = "support/daemon.rs"]
mod daemon;

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;

use daemon::{is_mounted, musicfs, status, wait_until, Daemon, BIN, DEADLINE};
use musicfs_test_utils::{library_files, make_library, LibrarySpec};
use tempfile::TempDir;

/// A library with one long track (about 10 MB), to stream.
fn library() -> PathBuf {
    make_library(&LibrarySpec {
        big: 1,
        ..LibrarySpec::default()
    })
    .unwrap()
}

/// The largest file of `lib`, relative to it.
fn biggest(lib: &Path) -> PathBuf {
    library_files(lib)
        .into_iter()
        .max_by_key(|f| std::fs::metadata(lib.join(f)).unwrap().len())
        .unwrap()
}

fn one_line_usage_error(out: &std::process::Output, want: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(want), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn sighup_during_a_read_reloads_the_config_and_keeps_the_mount() {
    let lib = library();
    let big = biggest(&lib);
    let tmp = TempDir::new().unwrap();
    let mp = tmp.path().join("mnt");
    std::fs::create_dir(&mp).unwrap();
    let cache = tmp.path().join("cache");
    let config = tmp.path().join("musicfs.toml");
    let origins = format!("origins = [\"lib={}\"]\n", lib.display());
    std::fs::write(&config, format!("{origins}health_timeout = 5\n")).unwrap();
    let mut d = Daemon::start(&mp, &cache, &["--config", config.to_str().unwrap()]);

    // A reader streams the long track; it stops after its first 256 KiB
    // until the SIGHUP has been handled, with the file still open.
    let (started_tx, started) = mpsc::channel();
    let (go, go_rx) = mpsc::channel::<()>();
    let path = mp.join("lib").join(&big);
    let reader = std::thread::spawn(move || {
        let mut f = std::fs::File::open(&path).unwrap();
        let mut head = vec![0u8; 256 << 10];
        f.read_exact(&mut head).unwrap();
        started_tx.send(()).unwrap();
        go_rx.recv().unwrap();
        let mut rest = Vec::new();
        f.read_to_end(&mut rest).unwrap();
        head.extend_from_slice(&rest);
        head
    });
    started.recv_timeout(DEADLINE).unwrap();

    std::fs::write(
        &config,
        format!("{origins}health_timeout = 3\nlog_level = \"debug\"\ncache_size = \"1G\"\n"),
    )
    .unwrap();
    d.signal("HUP");
    let reloaded = |l: &str| l.contains("SIGHUP: re-read");
    assert!(
        d.log.wait_for(1, DEADLINE, reloaded),
        "no reload logged:\n{}",
        d.log.all()
    );
    let line = d.log.all();
    let line = line.lines().find(|l| reloaded(l)).unwrap();
    assert!(
        line.contains("reloaded: log_level = debug, health_timeout = 3s")
            && line.contains("needs a remount: cache_size"),
        "{line}"
    );

    go.send(()).unwrap();
    let got = reader.join().unwrap();
    assert!(
        got == std::fs::read(lib.join(&big)).unwrap(),
        "the stream across the SIGHUP has wrong bytes"
    );
    assert!(d.is_running(), "SIGHUP ended the daemon");
    // The new log level is live: closing the file logs at debug.
    assert!(
        d.log.wait_for(1, DEADLINE, |l| l.contains("DEBUG")
            && l.contains("released")),
        "no debug line after the reload:\n{}",
        d.log.all()
    );
    // The mount still answers, from the cache and from the origin.
    for f in library_files(&lib) {
        assert!(
            std::fs::read(mp.join("lib").join(&f)).unwrap() == std::fs::read(lib.join(&f)).unwrap()
        );
    }
    assert_eq!(status(&cache)["pid"], d.pid());

    // A config file broken in the meantime changes nothing.
    std::fs::write(&config, "cache_sise = 1\n").unwrap();
    d.signal("HUP");
    assert!(
        d.log
            .wait_for(1, DEADLINE, |l| l.contains("cannot reload the config file")),
        "{}",
        d.log.all()
    );
    assert!(std::fs::read_dir(mp.join("lib")).unwrap().count() > 0);
    d.stop();
    assert!(!is_mounted(&mp));
}

/// A new pseudo-terminal: (master, slave). Both are close-on-exec (std
/// opens files so), so no other process spawned meanwhile inherits the
/// master and keeps the terminal from hanging up when the test closes it.
fn open_pty() -> (std::fs::File, std::fs::File) {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let open = |path: &str| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(path)
            .unwrap()
    };
    let master = open("/dev/ptmx");
    let fd = master.as_raw_fd();
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: grantpt and unlockpt take an fd we own; ptsname_r writes a
    // NUL-terminated name of at most `name.len()` bytes into `name`.
    let rc = unsafe {
        if libc::grantpt(fd) != 0 || libc::unlockpt(fd) != 0 {
            -1
        } else {
            libc::ptsname_r(fd, name.as_mut_ptr(), name.len())
        }
    };
    assert_eq!(rc, 0, "pty setup: {}", std::io::Error::last_os_error());
    // SAFETY: ptsname_r succeeded, so `name` holds a NUL-terminated string.
    let name = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
    let slave = open(name.to_str().unwrap());
    (master, slave)
}

/// The SIGHUP bit of a process's pending-signal masks.
fn sighup_pending(pid: u32) -> bool {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .filter(|l| l.starts_with("SigPnd:") || l.starts_with("ShdPnd:"))
        .any(|l| {
            let mask = u64::from_str_radix(l.split_whitespace().nth(1).unwrap(), 16).unwrap();
            mask & (1 << (libc::SIGHUP - 1)) != 0
        })
}

#[test]
fn closing_the_terminal_leaves_a_working_mount() {
    let lib = library();
    let tmp = TempDir::new().unwrap();
    let mp = tmp.path().join("mnt");
    std::fs::create_dir(&mp).unwrap();
    let cache = tmp.path().join("cache");
    // Debug logging, so every read through the mount writes to the
    // terminal after it is gone.
    let config = tmp.path().join("musicfs.toml");
    std::fs::write(&config, "log_level = \"debug\"\n").unwrap();

    let origin = format!("lib={}", lib.display());
    let args = [
        "--origin".as_ref(),
        origin.as_ref(),
        "--cache-dir".as_ref(),
        cache.as_os_str(),
        "--config".as_ref(),
        config.as_os_str(),
    ];
    let (mut daemon, master) = mount_on_a_terminal(&mp, &args);

    // Read the terminal until the mount is up, then close it: the kernel
    // hangs the terminal up and sends SIGHUP to the daemon.
    let pid = daemon.child.id();
    let terminal = std::thread::spawn(move || {
        let mut master = master;
        read_until(&mut master, "mounted at")
        // `master` is closed here.
    });
    let seen = terminal.join().unwrap();
    assert!(seen.contains("mounted at"), "{seen}");
    wait_until("the hangup's SIGHUP to be taken", || !sighup_pending(pid));

    // The daemon and its mount live on, writing its log to a dead terminal.
    for f in library_files(&lib) {
        assert!(
            std::fs::read(mp.join("lib").join(&f)).unwrap() == std::fs::read(lib.join(&f)).unwrap(),
            "{} differs after the terminal closed",
            f.display()
        );
    }
    assert!(
        daemon.child.try_wait().unwrap().is_none(),
        "the daemon died"
    );
    assert_eq!(status(&cache)["pid"], pid);

    // SIGTERM still ends it cleanly; its last line goes nowhere.
    let exit = daemon.stop();
    assert!(exit.success(), "{exit:?}");
    assert!(!is_mounted(&mp));
}

/// A `musicfs mount` on a terminal; on drop (a failed test too) it is
/// stopped and its mount removed.
struct OnTerminal {
    child: std::process::Child,
    mountpoint: PathBuf,
}

impl OnTerminal {
    /// SIGTERM, then the exit status once it ended.
    fn stop(&mut self) -> std::process::ExitStatus {
        Command::new("kill")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        let mut exit = None;
        wait_until("the daemon to exit", || {
            exit = self.child.try_wait().unwrap();
            exit.is_some()
        });
        exit.unwrap()
    }
}

impl Drop for OnTerminal {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = Command::new("fusermount3")
            .arg("-uz")
            .arg(&self.mountpoint)
            .stderr(Stdio::null())
            .status();
    }
}

/// Spawns `musicfs mount MOUNTPOINT ARGS...` on the slave side of a new
/// pseudo-terminal, as a shell runs a command (a session of its own, the
/// terminal as its controlling one); returns it and the master side.
fn mount_on_a_terminal(
    mountpoint: &Path,
    args: &[&std::ffi::OsStr],
) -> (OnTerminal, std::fs::File) {
    let (master, slave) = open_pty();
    let mut cmd = Command::new(BIN);
    cmd.arg("mount")
        .arg(mountpoint)
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave));
    // SAFETY: runs in the child between fork and exec, and calls only
    // async-signal-safe functions (setsid, ioctl).
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    let daemon = OnTerminal {
        child,
        mountpoint: mountpoint.to_owned(),
    };
    (daemon, master)
}

/// Reads the terminal until `want` shows up (or it ends); all it read.
fn read_until(master: &mut std::fs::File, want: &str) -> String {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains(want) {
        match master.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&seen).into_owned()
}

#[test]
fn a_terminal_that_stops_reading_does_not_stall_the_mount() {
    let tmp = TempDir::new().unwrap();
    let lib = tmp.path().join("lib");
    std::fs::create_dir_all(lib.join("Album")).unwrap();
    std::fs::write(lib.join("Album/t.flac"), b"fLaC").unwrap();
    let mp = tmp.path().join("mnt");
    std::fs::create_dir(&mp).unwrap();
    let cache = tmp.path().join("cache");
    let origin = format!("lib={}", lib.display());
    let args = [
        "--origin".as_ref(),
        origin.as_ref(),
        "--cache-dir".as_ref(),
        cache.as_os_str(),
        "--log-level".as_ref(),
        "debug".as_ref(),
    ];
    let (mut daemon, mut master) = mount_on_a_terminal(&mp, &args);
    let seen = read_until(&mut master, "mounted at");
    assert!(seen.contains("mounted at"), "{seen}");

    // Nobody reads the terminal now (as after Ctrl-S): its buffer fills
    // with the debug log of these opens, and the mount must keep
    // answering. Run in a thread, so a stalled mount fails the test
    // instead of hanging it.
    let file = mp.join("lib/Album/t.flac");
    let (done_tx, done) = mpsc::channel();
    std::thread::spawn(move || {
        for _ in 0..6000 {
            assert_eq!(std::fs::read(&file).unwrap(), b"fLaC");
        }
        done_tx.send(()).unwrap();
    });
    let finished = done.recv_timeout(DEADLINE).is_ok();
    assert!(
        finished,
        "the mount stalled while the terminal was not read"
    );

    // Reading again, the terminal hears that what it missed was dropped.
    let seen = read_until(&mut master, "log lines were dropped");
    assert!(seen.contains("log lines were dropped"), "{seen}");
    // SIGTERM ends it, though the terminal stopped reading again.
    let exit = daemon.stop();
    assert!(exit.success(), "{exit:?}");
    assert!(!is_mounted(&mp));
}

#[test]
fn sighup_without_a_config_file_is_logged_and_changes_nothing() {
    let tmp = TempDir::new().unwrap();
    let lib = tmp.path().join("lib");
    std::fs::create_dir_all(lib.join("Album")).unwrap();
    std::fs::write(lib.join("Album/t.flac"), b"fLaC").unwrap();
    let mp = tmp.path().join("mnt");
    std::fs::create_dir(&mp).unwrap();
    let cache = tmp.path().join("cache");
    let mut d = Daemon::start(&mp, &cache, &["--origin", lib.to_str().unwrap()]);
    d.signal("HUP");
    assert!(d
        .log
        .wait_for(1, DEADLINE, |l| l.contains("no --config file to reload")));
    assert_eq!(std::fs::read(mp.join("lib/Album/t.flac")).unwrap(), b"fLaC");
    d.stop();
}

#[test]
fn a_mountpoint_inside_an_origin_or_around_one_is_refused() {
    let tmp = TempDir::new().unwrap();
    let lib = tmp.path().join("lib");
    std::fs::create_dir_all(lib.join("mnt")).unwrap();
    std::fs::write(lib.join("t.flac"), b"fLaC").unwrap();
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(&lib, &link).unwrap();
    let cache = tmp.path().join("cache");
    let cache_s = cache.to_str().unwrap();
    let origin = format!("lib={}", lib.display());

    let inside = lib.join("mnt");
    let out = musicfs(&[
        "mount",
        inside.to_str().unwrap(),
        "--origin",
        &origin,
        "--cache-dir",
        cache_s,
    ]);
    one_line_usage_error(&out, "is inside origin lib");
    // Through a symlink, the same place.
    let via_link = link.join("mnt");
    let out = musicfs(&[
        "mount",
        via_link.to_str().unwrap(),
        "--origin",
        &origin,
        "--cache-dir",
        cache_s,
    ]);
    one_line_usage_error(&out, "is inside origin lib");
    // The origin's own directory.
    let out = musicfs(&[
        "mount",
        lib.to_str().unwrap(),
        "--origin",
        &origin,
        "--cache-dir",
        cache_s,
    ]);
    one_line_usage_error(&out, "origin lib itself");
    // An origin inside the mountpoint (an absent one too).
    for o in [lib.clone(), tmp.path().join("nas/music")] {
        let out = musicfs(&[
            "mount",
            tmp.path().to_str().unwrap(),
            "--origin",
            &format!("x={}", o.display()),
            "--cache-dir",
            cache_s,
        ]);
        one_line_usage_error(&out, "is inside the mountpoint");
    }
    assert!(!cache.exists(), "a refused mount created its cache dir");
    assert!(!is_mounted(&inside));

    // A sibling that only shares a prefix is fine.
    let sibling = tmp.path().join("lib2");
    std::fs::create_dir(&sibling).unwrap();
    let mut d = Daemon::start(&sibling, &cache, &["--origin", &origin]);
    assert_eq!(std::fs::read(sibling.join("lib/t.flac")).unwrap(), b"fLaC");
    d.stop();
}

#[test]
fn a_mount_on_a_live_mount_names_the_pid_serving_it() {
    let tmp = TempDir::new().unwrap();
    let lib = tmp.path().join("lib");
    std::fs::create_dir_all(&lib).unwrap();
    std::fs::write(lib.join("t.flac"), b"fLaC").unwrap();
    let mp = tmp.path().join("mnt");
    std::fs::create_dir(&mp).unwrap();
    let mut d = Daemon::start(
        &mp,
        &tmp.path().join("cache"),
        &["--origin", lib.to_str().unwrap()],
    );
    // Another cache dir, so the cache lock is not what stops it.
    let out = musicfs(&[
        "mount",
        mp.to_str().unwrap(),
        "--origin",
        lib.to_str().unwrap(),
        "--cache-dir",
        tmp.path().join("cache2").to_str().unwrap(),
    ]);
    one_line_usage_error(&out, &format!("served by PID {}", d.pid()));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("kill {}", d.pid())), "{err}");
    // The first mount is untouched.
    assert_eq!(std::fs::read(mp.join("lib/t.flac")).unwrap(), b"fLaC");
    // doctor finds it in the mount table by its fsname, from any cache dir.
    let out = musicfs(&[
        "doctor",
        "--cache-dir",
        tmp.path().join("cache3").to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("{}: reachable", mp.display())),
        "{text}"
    );
    d.stop();
}
