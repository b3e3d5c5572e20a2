//! A library that never vanishes: after a cached session, an origin whose
//! root is emptied (a NAS unmounted under its mountpoint directory) or
//! absent is served from the cache, reported as looking unmounted, and
//! rejoins by itself; only `musicfs forget` drops its cached tree. Real
//! processes, real mounts, a real music library.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

#[path = "support/daemon.rs"]
mod daemon;

use std::path::{Path, PathBuf};

use daemon::{is_mounted, musicfs, status, wait_until, Daemon, DEADLINE};
use musicfs_test_utils::{copy_tree, library_files, make_library, LibrarySpec};
use tempfile::TempDir;

/// Every file of `reference` read through `mounted`, byte for byte, and
/// nothing more.
fn compare_tree(reference: &Path, mounted: &Path) {
    let files = library_files(reference);
    assert!(!files.is_empty());
    for f in &files {
        let a = std::fs::read(reference.join(f)).unwrap();
        let b = std::fs::read(mounted.join(f)).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        assert!(a == b, "{} differs through the mount", f.display());
    }
    assert_eq!(library_files(mounted), files);
}

struct Setup {
    tmp: TempDir,
    nas: PathBuf,
    mp: PathBuf,
    cache: PathBuf,
}

impl Setup {
    fn args(&self) -> Vec<String> {
        vec![
            "--origin".into(),
            format!("lib={}", self.nas.display()),
            // Short, so the test can see refreshes happen; health checks
            // time out quickly on a loaded machine's empty directory too.
            "--listing-ttl".into(),
            "1".into(),
            "--health-timeout".into(),
            "5".into(),
        ]
    }

    fn start(&self) -> Daemon {
        self.start_with(&[])
    }

    fn start_with(&self, extra: &[&str]) -> Daemon {
        let mut args = self.args();
        args.extend(extra.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Daemon::start(&self.mp, &self.cache, &args)
    }

    fn cache_arg(&self) -> &str {
        self.cache.to_str().unwrap()
    }

    fn origin_status(&self) -> serde_json::Value {
        let s = status(&self.cache);
        assert_eq!(s["running"], true, "{s}");
        s["origins"][0].clone()
    }
}

/// A library read through a mount once, then the mount stopped once its
/// cache says every file is fully cached (listings and bytes).
fn cached_session() -> Setup {
    let lib = make_library(&LibrarySpec::default()).unwrap();
    let tmp = TempDir::new().unwrap();
    let nas = tmp.path().join("nas");
    copy_tree(&lib, &nas).unwrap();
    let mp = tmp.path().join("mnt");
    std::fs::create_dir(&mp).unwrap();
    let cache = tmp.path().join("cache");
    let s = Setup {
        tmp,
        nas,
        mp,
        cache,
    };
    // Debug, for the cache's "file fully cached" event.
    let mut d = s.start_with(&["--log-level", "debug"]);
    compare_tree(&s.nas, &s.mp.join("lib"));
    let files = library_files(&s.nas)
        .into_iter()
        .filter(|f| std::fs::metadata(s.nas.join(f)).unwrap().len() > 0)
        .count();
    assert!(
        d.log
            .wait_for(files, DEADLINE, |l| l.contains("file fully cached")),
        "not every file got cached:\n{}",
        d.log.all()
    );
    d.stop();
    s
}

#[derive(Debug, Clone, Copy)]
enum Vanish {
    /// The NAS is unmounted and leaves its (empty) mountpoint directory.
    Emptied,
    /// The directory itself is gone (an automount, a pulled disk).
    Absent,
}

/// Moves the library out of `nas` into `aside`, as `how` says.
fn vanish(s: &Setup, how: Vanish) -> PathBuf {
    let aside = s.tmp.path().join("aside");
    match how {
        Vanish::Emptied => {
            std::fs::create_dir(&aside).unwrap();
            for e in std::fs::read_dir(&s.nas).unwrap() {
                let e = e.unwrap();
                std::fs::rename(e.path(), aside.join(e.file_name())).unwrap();
            }
            assert_eq!(std::fs::read_dir(&s.nas).unwrap().count(), 0);
        }
        Vanish::Absent => std::fs::rename(&s.nas, &aside).unwrap(),
    }
    aside
}

fn come_back(s: &Setup, aside: &Path, how: Vanish) {
    match how {
        Vanish::Emptied => {
            for e in std::fs::read_dir(aside).unwrap() {
                let e = e.unwrap();
                std::fs::rename(e.path(), s.nas.join(e.file_name())).unwrap();
            }
        }
        Vanish::Absent => std::fs::rename(aside, &s.nas).unwrap(),
    }
}

fn library_survives_and_rejoins(how: Vanish) {
    let s = cached_session();
    let aside = vanish(&s, how);
    let mut d = s.start();
    let lib = s.mp.join("lib");

    // At once: the whole cached tree and its bytes.
    compare_tree(&aside, &lib);

    // status says what was seen and what to do.
    let seen = match how {
        Vanish::Emptied => "is empty but the cache holds 3 entries for it",
        Vanish::Absent => "is missing",
    };
    wait_until("status to report the origin", || {
        s.origin_status()["state"] != "unknown"
    });
    let o = s.origin_status();
    assert_eq!(o["state"], "unhealthy", "{o}");
    let error = o["last_error"].as_str().unwrap();
    assert!(error.contains("looks unmounted"), "{error}");
    assert!(error.contains(seen), "{error}");
    assert!(error.contains("rejoins by itself"), "{error}");

    // Two refreshes of the root, each after the listing TTL: both refused,
    // and the library is still all there.
    let refused = |l: &str| l.contains("cannot refresh a listing") && l.contains("dir=/ ");
    wait_until("two refused refreshes of the root listing", || {
        // A readdir of a stale listing is what starts its refresh.
        assert!(std::fs::read_dir(&lib).unwrap().count() > 0);
        d.log.count(refused) >= 2
    });
    compare_tree(&aside, &lib);
    assert_eq!(s.origin_status()["state"], "unhealthy");

    // The NAS is back, with a new album: the origin rejoins by itself.
    come_back(&s, &aside, how);
    let some_flac = library_files(&s.nas)
        .into_iter()
        .find(|f| f.extension().is_some_and(|e| e == "flac"))
        .unwrap();
    let new = s.nas.join("New Artist/2025 - New/01 - New.flac");
    std::fs::create_dir_all(new.parent().unwrap()).unwrap();
    std::fs::copy(s.nas.join(some_flac), &new).unwrap();
    wait_until("the origin to rejoin with the new album", || {
        s.origin_status()["state"] == "healthy" && lib.join("New Artist").is_dir()
    });
    compare_tree(&s.nas, &lib);
    assert!(d.is_running());
    d.stop();
}

#[test]
fn an_emptied_origin_is_served_from_the_cache_and_rejoins() {
    library_survives_and_rejoins(Vanish::Emptied);
}

#[test]
fn an_absent_origin_is_served_from_the_cache_and_rejoins() {
    library_survives_and_rejoins(Vanish::Absent);
}

#[test]
fn an_absent_origin_with_nothing_cached_is_a_usage_error() {
    let tmp = TempDir::new().unwrap();
    let mp = tmp.path().join("mnt");
    std::fs::create_dir(&mp).unwrap();
    let absent = tmp.path().join("nas");
    let cache = tmp.path().join("cache");
    let check = |out: std::process::Output| {
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains("does not exist"), "{err}");
        assert!(err.contains("nothing of it is cached"), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(!is_mounted(&mp));
    };
    let origin = format!("lib={}", absent.display());
    let (mp_s, cache_s) = (mp.to_str().unwrap(), cache.to_str().unwrap());
    // No cache at all: refused before anything is created.
    check(musicfs(&[
        "mount",
        mp_s,
        "--origin",
        &origin,
        "--cache-dir",
        cache_s,
    ]));
    assert!(
        !cache.exists(),
        "a cache dir was created for a refused mount"
    );

    // A cache that holds another origin, but nothing of this one.
    let other = tmp.path().join("other");
    std::fs::create_dir_all(other.join("Album")).unwrap();
    std::fs::write(other.join("Album/t.flac"), b"fLaC").unwrap();
    let mut d = Daemon::start(
        &mp,
        &cache,
        &["--origin", &format!("other={}", other.display())],
    );
    assert!(mp.join("other/Album").is_dir());
    d.stop();
    check(musicfs(&[
        "mount",
        mp_s,
        "--origin",
        &origin,
        "--cache-dir",
        cache_s,
    ]));
}

#[test]
fn forget_drops_the_cached_tree_of_an_origin_emptied_on_purpose() {
    let s = cached_session();
    let aside = vanish(&s, Vanish::Emptied);

    // A stopped mount's doctor says what it sees and both ways out.
    let out = musicfs(&["doctor", "--cache-dir", s.cache_arg()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("root is empty but the cache holds 3 entries")
            && text.contains("looks unmounted")
            && text.contains("musicfs forget lib"),
        "{text}"
    );

    // Not while a mount uses the cache: it names the PID to stop.
    let mut d = s.start();
    compare_tree(&aside, &s.mp.join("lib"));
    let out = musicfs(&["forget", "lib", "--cache-dir", s.cache_arg()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&d.pid().to_string()), "{err}");
    d.stop();

    let out = musicfs(&["forget", "lib", "--cache-dir", s.cache_arg()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(text.contains("forgot origin lib"), "{text}");

    // The next mount shows the origin as it is: empty, and healthy.
    let mut d = s.start();
    assert_eq!(std::fs::read_dir(s.mp.join("lib")).unwrap().count(), 0);
    wait_until("the empty origin to be checked", || {
        s.origin_status()["state"] != "unknown"
    });
    assert_eq!(s.origin_status()["state"], "healthy");
    d.stop();

    // A name with nothing cached (a typo) is a usage error.
    let out = musicfs(&["forget", "nope", "--cache-dir", s.cache_arg()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("nothing is cached for origin nope"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}
