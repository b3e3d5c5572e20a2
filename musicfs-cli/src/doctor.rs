//! `musicfs doctor`: one report of everything that can go wrong, each
//! finding with its fix. Collects every finding rather than stopping.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;

use crate::config::human_size;
use crate::lock;
use crate::status::{self, read_mount_info};

struct Report {
    lines: Vec<(bool, String)>,
}

impl Report {
    fn ok(&mut self, msg: impl Into<String>) {
        self.lines.push((false, msg.into()));
    }
    fn act(&mut self, msg: impl Into<String>) {
        self.lines.push((true, msg.into()));
    }
}

pub fn run(cache_dir: PathBuf, mountpoint: Option<PathBuf>) -> Result<ExitCode> {
    let mountpoint = mountpoint.map(|m| std::path::absolute(&m).unwrap_or(m));
    let mut r = Report { lines: Vec::new() };
    println!("musicfs doctor: cache dir {}", cache_dir.display());
    if !cache_dir.exists() {
        r.ok(format!(
            "cache dir {} does not exist yet (created by the first mount)",
            cache_dir.display()
        ));
    }

    // Who holds the lock.
    match lock::holder(&cache_dir) {
        None => r.ok("cache lock: free (no mount running on this cache dir)"),
        Some((Some(pid), true)) => match status::query(&cache_dir) {
            Some(_) => r.ok(format!("cache lock: held by running musicfs PID {pid}, which answers status")),
            None => r.act(format!(
                "cache lock: held by PID {pid}, which does not answer on {}: if it is hung, stop it with `kill {pid}` (then `kill -9 {pid}` if it stays)",
                cache_dir.join(status::SOCKET).display()
            )),
        },
        Some((pid, _)) => r.act(format!(
            "cache lock: held by a process that cannot be identified (PID file says {pid:?}); find it with `fuser -v {}`",
            cache_dir.join(lock::CacheLock::FILE_NAME).display()
        )),
    }

    // Stale FUSE mounts.
    let mut points: Vec<PathBuf> = fuse_mounts();
    if let Some(m) = &mountpoint {
        if !points.contains(m) {
            points.push(m.clone());
        }
    }
    if let Some(info) = read_mount_info(&cache_dir) {
        if !points.contains(&info.mountpoint) {
            points.push(info.mountpoint);
        }
    }
    for p in &points {
        // Opening the directory reaches the filesystem; a bare stat may be
        // answered from the kernel's attribute cache.
        let probe = match std::fs::read_dir(p) {
            Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Err(e),
            _ => std::fs::metadata(p),
        };
        match probe {
            Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => r.act(format!(
                "{}: stale FUSE mount (Transport endpoint is not connected); `musicfs mount {}` cleans it up by itself, or run `fusermount3 -uz {}`",
                p.display(),
                p.display(),
                p.display()
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if Some(p) == mountpoint.as_ref() {
                    r.act(format!("{}: does not exist; create it with `mkdir -p {}`", p.display(), p.display()))
                }
            }
            Err(e) => r.act(format!("{}: cannot stat it: {e}", p.display())),
            Ok(_) => r.ok(format!("{}: reachable", p.display())),
        }
    }

    // Disk space and inodes of the cache dir.
    let probe = if cache_dir.exists() {
        cache_dir.clone()
    } else {
        cache_dir
            .parent()
            .map_or_else(|| PathBuf::from("/"), Path::to_path_buf)
    };
    match statvfs(&probe) {
        Some((free, total, ifree, itotal)) => {
            let msg = format!(
                "cache disk: {} free of {}, {ifree} of {itotal} inodes free",
                human_size(free),
                human_size(total)
            );
            if total > 0 && (free < total / 20 || free < 512 << 20) {
                r.act(format!(
                    "{msg}: low on space; free some or lower --cache-size"
                ));
            } else if itotal > 0 && ifree < itotal / 20 {
                r.act(format!(
                    "{msg}: low on inodes; lower --cache-size or use a filesystem with more inodes"
                ));
            } else {
                r.ok(msg);
            }
        }
        None => r.act(format!("cache disk: cannot statvfs {}", probe.display())),
    }

    // fd limit.
    let (soft, hard) = nofile();
    if soft < 1024 {
        r.act(format!(
            "fd limit: {soft} (hard {hard}); raise it with `ulimit -n 4096` before mounting"
        ));
    } else {
        r.ok(format!("fd limit: {soft} (hard {hard})"));
    }

    // Origins: the running mount's own health view, else a bounded stat of
    // the last mount's origin directories.
    if let Some(live) = status::query(&cache_dir) {
        for o in live.origins {
            let line = format!(
                "origin {}: {}{}",
                o.name,
                o.state,
                o.last_error.map_or_else(String::new, |e| format!(" ({e})"))
            );
            if o.state == "healthy" {
                r.ok(line);
            } else {
                // The error says what was seen and what to do.
                r.act(format!("{line}; MusicFS serves the cached tree meanwhile"));
            }
        }
    } else if let Some(info) = read_mount_info(&cache_dir) {
        for o in info.origins {
            if musicfs_origins::remote::is_remote_url(&o.location) {
                // Its credentials and settings live in the mount's config,
                // not in the record; a running mount checks it.
                r.ok(format!(
                    "origin {} ({}): remote; its health is checked while a mount runs \
                     (`musicfs status`)",
                    o.name, o.location
                ));
                continue;
            }
            let root = probe_root(Path::new(&o.location), Duration::from_secs(5));
            let vanished = match &root {
                Some(Ok(RootSeen::Empty)) => Some("empty"),
                Some(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => Some("missing"),
                _ => None,
            };
            let cached = vanished.map_or(0, |_| cached_root_entries(&cache_dir, &o.name));
            if let (Some(seen), true) = (vanished, cached > 0) {
                r.act(format!(
                    "origin {} ({}): root is {seen} but the cache holds {cached} entries for it: \
                     the NAS looks unmounted; mount it (`musicfs mount` serves the cached tree \
                     meanwhile and rejoins by itself), or if you emptied it on purpose run \
                     `musicfs forget {}`",
                    o.name, o.location, o.name
                ));
                continue;
            }
            match root {
                Some(Ok(RootSeen::Entries)) => {
                    r.ok(format!("origin {} ({}): reachable", o.name, o.location))
                }
                Some(Ok(RootSeen::Empty)) => r.ok(format!(
                    "origin {} ({}): reachable, empty",
                    o.name, o.location
                )),
                Some(Ok(RootSeen::NotDir)) => r.act(format!(
                    "origin {} ({}): not a directory",
                    o.name, o.location
                )),
                Some(Err(e)) => r.act(format!(
                    "origin {} ({}): {e}; check the NAS/mount",
                    o.name, o.location
                )),
                None => r.act(format!(
                    "origin {} ({}): no answer within 5 s; the NAS may be hung",
                    o.name, o.location
                )),
            }
        }
    }

    // Index consistency (only when no mount holds the cache).
    if lock::holder(&cache_dir).is_none() && cache_dir.join("index.sled").exists() {
        match musicfs_cas::Index::open(&cache_dir.join("index.sled")) {
            Ok((_, rep)) if rep.rebuilt => r.act(format!(
                "index: was damaged ({}) and has been rebuilt; run `musicfs verify --repair`",
                rep.reason.unwrap_or_default()
            )),
            Ok((idx, _)) => {
                // The manifest count is a counter; a fresh open counts once.
                idx.recount_manifests();
                r.ok(format!("index: opens cleanly ({} chunk records, {} manifests); `musicfs verify` checks every chunk", idx.chunk_count(), idx.manifest_count()))
            }
            Err(e) => r.act(format!("index: {e}")),
        }
    }

    let mut need = 0;
    for (act, line) in &r.lines {
        if *act {
            need += 1;
            println!("  ✗ {line}");
        } else {
            println!("  ✓ {line}");
        }
    }
    if need == 0 {
        println!("nothing needs action");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("{need} finding(s) need action");
        Ok(ExitCode::from(1))
    }
}

/// MusicFS mounts in the mount table: a source `musicfs:PID` (the fsname
/// names its serving process), or `musicfs` and a `fuse.musicfs` type from
/// older versions.
fn fuse_mounts() -> Vec<PathBuf> {
    crate::mountinfo::read()
        .into_iter()
        .filter(|e| {
            e.fstype.starts_with("fuse")
                && (musicfs_fuse::serving_pid(&e.source).is_some()
                    || e.source == "musicfs"
                    || e.fstype.contains("musicfs"))
        })
        .map(|e| e.mount_point)
        .collect()
}

fn statvfs(p: &Path) -> Option<(u64, u64, u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).ok()?;
    // SAFETY: zeroed is a valid bit pattern for the plain-data statvfs struct.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `s` a valid out pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return None;
    }
    let bs = s.f_frsize;
    Some((s.f_bavail * bs, s.f_blocks * bs, s.f_favail, s.f_files))
}

fn nofile() -> (u64, u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    (lim.rlim_cur, lim.rlim_max)
}

enum RootSeen {
    Entries,
    Empty,
    NotDir,
}

/// What an origin's root holds, without letting a dead NAS hang doctor:
/// `None` on timeout (the stuck thread is left behind; doctor exits soon
/// after).
fn probe_root(p: &Path, t: Duration) -> Option<std::io::Result<RootSeen>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let p = p.to_owned();
    std::thread::spawn(move || {
        let seen = std::fs::metadata(&p).and_then(|m| {
            if !m.is_dir() {
                return Ok(RootSeen::NotDir);
            }
            Ok(match std::fs::read_dir(&p)?.next() {
                None => RootSeen::Empty,
                Some(entry) => entry.map(|_| RootSeen::Entries)?,
            })
        });
        let _ = tx.send(seen);
    });
    rx.recv_timeout(t).ok()
}

/// Entries of the root listing the stopped cache holds for an origin; 0
/// when none, or when a mount holds the cache.
fn cached_root_entries(cache_dir: &Path, origin: &str) -> usize {
    let index = cache_dir.join("index.sled");
    let Ok(id) = musicfs_origins::OriginId::new(origin) else {
        return 0;
    };
    if lock::holder(cache_dir).is_some() || !index.exists() {
        return 0;
    }
    match musicfs_cas::Index::open(&index) {
        Ok((idx, _)) => match idx.listing(&id, &musicfs_origins::OriginPath::root()) {
            Ok(Some(l)) => l.entries.len(),
            _ => 0,
        },
        Err(_) => 0,
    }
}
