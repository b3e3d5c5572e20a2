//! The `musicfs` binary as users and scripts meet it: real processes, real
//! FUSE mounts, a real music library, real signals.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::io::Read;
use std::path::Path;
use std::process::Command;

use musicfs_test_utils::{
    library_files, make_library, pseudo_random_bytes, write_file, LibrarySpec,
};
use tempfile::TempDir;

#[path = "support/daemon.rs"]
mod daemon;
use daemon::{musicfs, wait_until, BIN, DEADLINE as HANG};

/// Bytes in the chunk files of the cache at `cache` (a chunk file appears
/// only once it is whole).
fn chunk_bytes(cache: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![cache.join("chunks")];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for e in entries.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

/// Reads `path` through the mount, checks it is `want`, and keeps it open
/// until the daemon has stored every byte of it in the cache at `cache`
/// (an ingest stops when its file closes), so the file is served offline
/// later. Only for a cache that holds nothing else.
fn read_until_cached(path: &Path, want: &[u8], cache: &Path) {
    let mut file = std::fs::File::open(path).unwrap();
    let mut got = Vec::new();
    file.read_to_end(&mut got).unwrap();
    assert!(got == want, "{} differs through the mount", path.display());
    wait_until(&format!("{} cached", path.display()), || {
        chunk_bytes(cache) >= want.len() as u64
    });
}

/// A running `musicfs mount` over `origins` (the shared test daemon,
/// `tests/support/daemon.rs`); stopped and unmounted on drop.
struct Daemon;

impl Daemon {
    fn start(mountpoint: &Path, cache: &Path, origins: &[&Path], extra: &[&str]) -> daemon::Daemon {
        let mut args: Vec<&str> = Vec::new();
        for o in origins {
            args.push("--origin");
            args.push(o.to_str().expect("test paths are UTF-8"));
        }
        args.extend_from_slice(extra);
        daemon::Daemon::start(mountpoint, cache, &args)
    }
}

fn compare_tree(origin: &Path, mounted: &Path) {
    let files = library_files(origin);
    assert!(!files.is_empty());
    for f in &files {
        let a = std::fs::read(origin.join(f)).unwrap();
        let b = std::fs::read(mounted.join(f)).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        assert!(a == b, "{} differs through the mount", f.display());
    }
    assert_eq!(library_files(mounted), files);
}

#[test]
fn bad_input_gets_one_line_and_exit_2() {
    let tmp = TempDir::new().unwrap();
    let lib = tmp.path().join("lib");
    std::fs::create_dir(&lib).unwrap();
    let mp = tmp.path().join("mnt");
    std::fs::create_dir(&mp).unwrap();
    let full = tmp.path().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("x"), b"x").unwrap();
    let file = tmp.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let cache = tmp.path().join("cache");
    let (lib_s, mp_s, cache_s) = (
        lib.to_str().unwrap(),
        mp.to_str().unwrap(),
        cache.to_str().unwrap(),
    );
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "mount",
                "/nonexistent/mnt",
                "--origin",
                lib_s,
                "--cache-dir",
                cache_s,
            ],
            "does not exist",
        ),
        (
            vec![
                "mount",
                full.to_str().unwrap(),
                "--origin",
                lib_s,
                "--cache-dir",
                cache_s,
            ],
            "not empty",
        ),
        (
            vec![
                "mount",
                mp_s,
                "--origin",
                file.to_str().unwrap(),
                "--cache-dir",
                cache_s,
            ],
            "not a directory",
        ),
        (
            vec![
                "mount",
                mp_s,
                "--origin",
                "/nonexistent/lib",
                "--cache-dir",
                cache_s,
            ],
            "does not exist",
        ),
        (
            vec![
                "mount",
                mp_s,
                "--origin",
                lib_s,
                "--cache-size",
                "lots",
                "--cache-dir",
                cache_s,
            ],
            "cannot read size",
        ),
        (
            vec![
                "mount",
                mp_s,
                "--origin",
                lib_s,
                "--config",
                "/nonexistent.toml",
                "--cache-dir",
                cache_s,
            ],
            "cannot read config",
        ),
        (
            vec![
                "mount",
                mp_s,
                "--origin",
                "dav://me:hunter2@host/music",
                "--cache-dir",
                cache_s,
            ],
            "config file",
        ),
        (
            vec![
                "mount",
                mp_s,
                "--origin",
                "ftp://host/music",
                "--cache-dir",
                cache_s,
            ],
            "s3://BUCKET",
        ),
        (vec!["mount", mp_s, "--cache-dir", cache_s], "no origin"),
    ];
    for (args, want) in cases {
        let out = musicfs(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
    }
}

#[test]
fn help_reads_well_for_every_command() {
    for cmd in [
        vec!["--help"],
        vec!["mount", "--help"],
        vec!["status", "--help"],
        vec!["verify", "--help"],
        vec!["doctor", "--help"],
    ] {
        let out = musicfs(&cmd);
        assert!(out.status.success(), "{cmd:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("Usage:"), "{cmd:?}: {text}");
    }
}

#[test]
fn mount_serves_the_library_byte_for_byte_and_sigterm_ends_it() {
    let lib = make_library(&LibrarySpec::default()).unwrap();
    let tmp = TempDir::new().unwrap();
    let mp = tmp.path().join("mnt");
    std::fs::create_dir(&mp).unwrap();
    let cache = tmp.path().join("cache");
    let mut d = Daemon::start(&mp, &cache, &[&lib], &[]);
    let name = lib.file_name().unwrap();
    compare_tree(&lib, &mp.join(name));
    // A real decoder as the client.
    let flac = library_files(&lib)
        .into_iter()
        .find(|f| f.extension().is_some_and(|e| e == "flac"))
        .unwrap();
    let st = Command::new("flac")
        .arg("-t")
        .arg("-s")
        .arg(mp.join(name).join(&flac))
        .status()
        .unwrap();
    assert!(st.success(), "flac -t failed through the mount");
    // Second pass comes from the cache.
    compare_tree(&lib, &mp.join(name));

    let out = musicfs(&["status", "--json", "--cache-dir", cache.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["running"], true);
    assert_eq!(v["pid"], d.pid());
    assert!(v["chunks"].as_u64().unwrap() > 0, "{v}");
    assert!(v["origins"][0]["name"].as_str().is_some());

    d.signal("TERM");
    let st = d.wait(HANG).expect("SIGTERM did not end musicfs");
    assert!(st.success(), "{st:?}");
    assert!(!is_mounted(&mp), "still mounted after SIGTERM");

    // verify on the stopped cache: clean.
    let out = musicfs(&["verify", "--cache-dir", cache.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

fn is_mounted(mp: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    let mp = mp.to_str().unwrap().replace(' ', "\\040");
    mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(mp.as_str()))
}

#[test]
fn test_pid_file_prevents_concurrent_mount() {
    let tmp = TempDir::new().unwrap();
    let lib = tmp.path().join("lib");
    write_file(&lib, "a/b.flac", &pseudo_random_bytes(10_000, 1)).unwrap();
    let (mp1, mp2) = (tmp.path().join("m1"), tmp.path().join("m2"));
    std::fs::create_dir(&mp1).unwrap();
    std::fs::create_dir(&mp2).unwrap();
    let cache = tmp.path().join("cache");
    let d = Daemon::start(&mp1, &cache, &[&lib], &[]);
    let out = Command::new(BIN)
        .arg("mount")
        .arg(&mp2)
        .arg("--origin")
        .arg(&lib)
        .arg("--cache-dir")
        .arg(&cache)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains(&d.pid().to_string()), "{err}");
    assert!(err.contains("musicfs.lock"), "{err}");
    assert!(!is_mounted(&mp2));
}

#[test]
fn stale_mount_after_kill_9_is_recovered_by_the_next_mount() {
    let tmp = TempDir::new().unwrap();
    let lib = tmp.path().join("lib");
    let data = pseudo_random_bytes(3_000_000, 2);
    write_file(&lib, "Artist/01 - Song.flac", &data).unwrap();
    let mp = tmp.path().join("mnt");
    std::fs::create_dir(&mp).unwrap();
    let cache = tmp.path().join("cache");
    let mut d = Daemon::start(&mp, &cache, &[&lib], &[]);
    assert_eq!(
        std::fs::read(mp.join("lib/Artist/01 - Song.flac")).unwrap(),
        data
    );
    d.signal("KILL");
    d.wait(HANG).expect("kill -9 did not end it");
    let e = std::fs::read_dir(&mp).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOTCONN), "{e}");
    // No fusermount, no rm -rf: just mount again.
    let _d2 = Daemon::start(&mp, &cache, &[&lib], &[]);
    assert_eq!(
        std::fs::read(mp.join("lib/Artist/01 - Song.flac")).unwrap(),
        data
    );
}

#[test]
fn origin_down_at_start_is_served_from_cache_or_refused_when_uncached() {
    let tmp = TempDir::new().unwrap();
    // The origin is reached through a symlink, like a NAS mount that can
    // vanish: renaming its target away makes the origin unreachable.
    let real = tmp.path().join("nas-export");
    let data = pseudo_random_bytes(2_000_000, 3);
    write_file(&real, "x/t.flac", &data).unwrap();
    let lib = tmp.path().join("lib");
    std::os::unix::fs::symlink(&real, &lib).unwrap();
    let mp = tmp.path().join("mnt");
    std::fs::create_dir(&mp).unwrap();
    let cache = tmp.path().join("cache");
    {
        let mut d = Daemon::start(&mp, &cache, &[&lib], &[]);
        read_until_cached(&mp.join("lib/x/t.flac"), &data, &cache);
        d.stop();
    }
    std::fs::rename(&real, tmp.path().join("gone")).unwrap();
    {
        let _d = Daemon::start(&mp, &cache, &[&lib], &["--health-timeout", "2"]);
        assert_eq!(
            std::fs::read(mp.join("lib/x/t.flac")).unwrap(),
            data,
            "cached file not served offline"
        );
        let names: Vec<_> = std::fs::read_dir(mp.join("lib"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("x")]);
    }
    // Down with nothing cached: a clear error and no mount.
    let out = Command::new(BIN)
        .arg("mount")
        .arg(&mp)
        .arg("--origin")
        .arg(&lib)
        .arg("--cache-dir")
        .arg(tmp.path().join("cache2"))
        .args(["--health-timeout", "2"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("lib"), "{err}");
    assert!(!is_mounted(&mp));
}

#[test]
fn verify_finds_damage_and_repair_fixes_it() {
    let tmp = TempDir::new().unwrap();
    let lib = tmp.path().join("lib");
    let data = pseudo_random_bytes(5_000_000, 4);
    write_file(&lib, "v.flac", &data).unwrap();
    let mp = tmp.path().join("mnt");
    std::fs::create_dir(&mp).unwrap();
    let cache = tmp.path().join("cache");
    {
        let mut d = Daemon::start(&mp, &cache, &[&lib], &[]);
        read_until_cached(&mp.join("lib/v.flac"), &data, &cache);
        d.stop();
    }
    // Corrupt one chunk file.
    let mut chunk = None;
    let mut stack = vec![cache.join("chunks")];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                chunk = Some(e.path());
            }
        }
    }
    std::fs::write(chunk.unwrap(), b"rot").unwrap();
    let c = cache.to_str().unwrap();
    let out = musicfs(&["verify", "--cache-dir", c]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("corrupt chunk"));
    let out = musicfs(&["verify", "--repair", "--cache-dir", c]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = musicfs(&["verify", "--json", "--cache-dir", c]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["clean"], true, "{v}");
    assert_eq!(v["findings"].as_array().unwrap().len(), 0, "{v}");
}

#[test]
fn doctor_reports_a_stale_mount_with_its_fix() {
    let tmp = TempDir::new().unwrap();
    let lib = tmp.path().join("lib");
    write_file(&lib, "a.flac", b"abc").unwrap();
    let mp = tmp.path().join("mnt");
    std::fs::create_dir(&mp).unwrap();
    let cache = tmp.path().join("cache");
    let mut d = Daemon::start(&mp, &cache, &[&lib], &[]);
    d.signal("KILL");
    d.wait(HANG).expect("kill -9 did not end it");
    let out = musicfs(&[
        "doctor",
        "--cache-dir",
        cache.to_str().unwrap(),
        "--mountpoint",
        mp.to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("stale FUSE mount") && text.contains("fusermount3 -uz"),
        "{text}"
    );
    drop(d);
    let out = musicfs(&[
        "doctor",
        "--cache-dir",
        cache.to_str().unwrap(),
        "--mountpoint",
        mp.to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("stale FUSE mount"), "{text}");
}

#[test]
fn a_too_low_fd_limit_is_refused_with_what_to_do() {
    let tmp = TempDir::new().unwrap();
    let (lib, mp) = (tmp.path().join("lib"), tmp.path().join("mnt"));
    std::fs::create_dir_all(&lib).unwrap();
    std::fs::create_dir_all(&mp).unwrap();
    let out = Command::new("prlimit")
        .arg("--nofile=30:30")
        .arg(BIN)
        .arg("mount")
        .arg(&mp)
        .arg("--origin")
        .arg(&lib)
        .arg("--cache-dir")
        .arg(tmp.path().join("cache"))
        .output()
        .expect("run prlimit (util-linux)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("open-file limit is 30"), "{stderr}");
    assert!(stderr.contains("ulimit -n"), "{stderr}");
    assert!(!is_mounted(&mp));
}
