//! `musicfs verify` as users meet it: a real binary over a cache made by a
//! real mount, read-only without `--repair`, refusing what is not a cache,
//! and beside a mount that is playing.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use musicfs_cas::ChunkId;
use musicfs_test_utils::{pseudo_random_bytes, write_file};
use tempfile::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_musicfs");

/// A running `musicfs mount`, stopped (and unmounted) on drop.
struct Daemon {
    child: Option<Child>,
    mountpoint: PathBuf,
}

impl Daemon {
    fn start(mountpoint: &Path, cache: &Path, origin: &Path) -> Daemon {
        let mut child = Command::new(BIN)
            .arg("mount")
            .arg(mountpoint)
            .arg("--cache-dir")
            .arg(cache)
            .arg("--origin")
            .arg(origin)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn musicfs");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let d = Daemon {
            child: Some(child),
            mountpoint: mountpoint.to_owned(),
        };
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) if line.contains("mounted at") => d,
            other => panic!("musicfs did not come up: {other:?}"),
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGTERM, and a clean exit within 20 s.
    fn stop(&mut self) {
        let mut child = self.child.take().unwrap();
        Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .unwrap();
        let st = wait_for(Duration::from_secs(20), || child.try_wait().unwrap())
            .expect("SIGTERM did not end musicfs");
        assert!(st.success(), "musicfs exited with {st:?}");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            if wait_for(Duration::from_secs(10), || c.try_wait().ok().flatten()).is_none() {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
        let _ = Command::new("fusermount3")
            .arg("-uz")
            .arg(&self.mountpoint)
            .stderr(Stdio::null())
            .status();
    }
}

/// Polls `f` until it gives `Some`, for at most `limit` (a bound on a
/// hang, not a timing).
fn wait_for<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn musicfs(args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn json(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Waits until the running mount reports stored chunks.
fn wait_for_chunks(cache: &Path) {
    let c = cache.to_str().unwrap();
    wait_for(Duration::from_secs(60), || {
        let v = json(&musicfs(&["status", "--json", "--cache-dir", c]));
        (v["chunks"].as_u64().unwrap_or(0) > 0).then_some(())
    })
    .expect("the mount never stored a chunk");
}

/// Every entry under `dir` with its type, size, mtime and (for files) its
/// bytes' hash: what "unchanged on disk" means.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (bool, u64, i64, i64, Option<ChunkId>)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let content = m
                .is_file()
                .then(|| ChunkId::of(&std::fs::read(&p).unwrap()));
            if m.is_dir() {
                stack.push(p.clone());
            }
            out.insert(
                p.strip_prefix(dir).unwrap().to_owned(),
                (m.is_dir(), m.len(), m.mtime(), m.mtime_nsec(), content),
            );
        }
    }
    out
}

/// A cache made by a real mount that read one track, then stopped.
fn stopped_cache(tmp: &Path) -> PathBuf {
    let lib = tmp.join("lib");
    write_file(&lib, "Artist/01.flac", &pseudo_random_bytes(3_000_000, 9)).unwrap();
    let mp = tmp.join("mnt");
    std::fs::create_dir_all(&mp).unwrap();
    let cache = tmp.join("cache");
    let mut d = Daemon::start(&mp, &cache, &lib);
    std::fs::read(mp.join("lib/Artist/01.flac")).unwrap();
    wait_for_chunks(&cache);
    d.stop();
    cache
}

#[test]
fn verify_without_repair_changes_nothing_and_reports_what_an_open_would_heal() {
    let tmp = TempDir::new().unwrap();
    let cache = stopped_cache(tmp.path());
    let c = cache.to_str().unwrap();
    let out = musicfs(&["verify", "--cache-dir", c]);
    assert!(
        out.status.success(),
        "a fresh cache is not clean: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    // What a crash and a stray hand leave behind.
    std::fs::write(cache.join("tmp/0a1b.4242.0.tmp"), b"half a chunk").unwrap();
    let lone = b"a chunk whose index record was lost";
    let id = ChunkId::of(lone);
    let hex = id.to_hex();
    let shard = cache.join("chunks").join(&hex[0..2]).join(&hex[2..4]);
    std::fs::create_dir_all(&shard).unwrap();
    std::fs::write(shard.join(&hex), lone).unwrap();
    std::fs::write(cache.join("chunks/notes.txt"), b"not a chunk").unwrap();

    let before = snapshot(&cache);
    let out = musicfs(&["verify", "--cache-dir", c]);
    let text = String::from_utf8_lossy(&out.stdout);
    // Crash leftovers the next mount heals: listed, but not damage.
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("orphaned temp file"), "{text}");
    assert!(text.contains(&format!("unindexed chunk: {hex}")), "{text}");
    assert!(text.contains("stray file"), "{text}");
    assert!(text.contains("3 crash leftover(s)"), "{text}");
    let v = json(&musicfs(&["verify", "--json", "--cache-dir", c]));
    assert_eq!(v["clean"], true, "{v}");
    assert_eq!(v["leftovers"], 3, "{v}");
    let kinds: Vec<&str> = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["kind"].as_str().unwrap())
        .collect();
    for want in ["orphaned temp file", "unindexed chunk", "stray file"] {
        assert!(kinds.contains(&want), "{want} missing: {v}");
    }
    assert!(kinds.iter().all(|k| !k.contains("corrupt")), "{v}");
    assert_eq!(
        snapshot(&cache),
        before,
        "verify without --repair changed the cache"
    );

    // Damage is exit 1, and still nothing is changed.
    let rotten = std::fs::read_dir(cache.join("chunks"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .flat_map(|d| std::fs::read_dir(d).unwrap().map(|e| e.unwrap().path()))
        .flat_map(|d| std::fs::read_dir(d).unwrap().map(|e| e.unwrap().path()))
        .find(|p| p.file_name().unwrap() != hex.as_str())
        .unwrap();
    std::fs::write(&rotten, b"bit rot").unwrap();
    let before = snapshot(&cache);
    let out = musicfs(&["verify", "--cache-dir", c]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("corrupt chunk"), "{text}");
    assert!(text.contains("musicfs verify --repair"), "{text}");
    assert_eq!(
        snapshot(&cache),
        before,
        "verify without --repair changed the cache"
    );

    let out = musicfs(&["verify", "--repair", "--cache-dir", c]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("clean after repair"), "{text}");
    let v = json(&musicfs(&["verify", "--json", "--cache-dir", c]));
    assert_eq!(v["clean"], true, "{v}");
    assert_eq!(v["findings"].as_array().unwrap().len(), 0, "{v}");
    assert!(shard.join(&hex).exists(), "a valid chunk was removed");
    // Removed, or re-fetched from the origin: either way no bad bytes.
    if let Ok(bytes) = std::fs::read(&rotten) {
        let name = rotten.file_name().unwrap().to_str().unwrap();
        assert_eq!(
            ChunkId::of(&bytes).to_hex(),
            name,
            "the corrupt chunk was kept"
        );
    }
    assert!(!cache.join("tmp/0a1b.4242.0.tmp").exists());
}

#[test]
fn a_directory_that_is_not_a_cache_is_refused_and_left_alone() {
    let tmp = TempDir::new().unwrap();
    let typo = tmp.path().join("cahce");
    let music = tmp.path().join("Music");
    write_file(&music, "song.flac", b"fLaC").unwrap();
    let before = snapshot(&music);
    for dir in [&typo, &music] {
        for extra in [&[][..], &["--repair"][..], &["--json"][..]] {
            let mut args = vec!["verify", "--cache-dir", dir.to_str().unwrap()];
            args.extend_from_slice(extra);
            let out = musicfs(&args);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
            assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
            assert!(err.contains("MusicFS cache"), "{args:?}: {err}");
            assert!(out.stdout.is_empty(), "{args:?}");
        }
    }
    assert!(!typo.exists(), "verify created the mistyped directory");
    assert_eq!(snapshot(&music), before, "verify wrote into a non-cache");
}

#[test]
fn verify_checks_a_running_mount_without_disturbing_its_reader() {
    let tmp = TempDir::new().unwrap();
    let lib = tmp.path().join("lib");
    let data = pseudo_random_bytes(4_000_000, 11);
    write_file(&lib, "Album/01.flac", &data).unwrap();
    let mp = tmp.path().join("mnt");
    std::fs::create_dir_all(&mp).unwrap();
    let cache = tmp.path().join("cache");
    let c = cache.to_str().unwrap();
    let mut d = Daemon::start(&mp, &cache, &lib);
    let track = mp.join("lib/Album/01.flac");
    assert_eq!(std::fs::read(&track).unwrap(), data);
    wait_for_chunks(&cache);

    // A player reading the track over and over while verify runs.
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let reader = {
        let (stop, reads, track, data) = (stop.clone(), reads.clone(), track.clone(), data.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let got = std::fs::read(&track).expect("a read failed during verify");
                assert!(got == data, "wrong bytes during verify");
                reads.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    wait_for(Duration::from_secs(60), || {
        (reads.load(Ordering::SeqCst) > 0).then_some(())
    })
    .expect("the reader never finished a read");
    let at_start = reads.load(Ordering::SeqCst);

    let out = musicfs(&["verify", "--json", "--cache-dir", c]);
    let v = json(&out);
    assert_eq!(out.status.code(), Some(0), "{v}");
    assert_eq!(v["clean"], true, "{v}");
    assert_eq!(v["mount_running"], true, "{v}");
    assert!(v["chunks_checked"].as_u64().unwrap() > 0, "{v}");
    let skipped = v["skipped"][0].as_str().unwrap();
    assert!(
        skipped.contains("index") && skipped.contains(&d.pid().to_string()),
        "{v}"
    );
    // The text form says it too.
    let out = musicfs(&["verify", "--cache-dir", c]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("skipped: index"), "{text}");

    // Repair needs the mount stopped, and says how.
    let out = musicfs(&["verify", "--repair", "--cache-dir", c]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&d.pid().to_string()) && err.contains("kill -TERM"),
        "{err}"
    );

    wait_for(Duration::from_secs(60), || {
        (reads.load(Ordering::SeqCst) > at_start).then_some(())
    })
    .expect("the reader stalled");
    stop.store(true, Ordering::SeqCst);
    reader.join().expect("the reader failed");
    d.stop();
}
