//! Unit tests of `readahead.rs`: its bounds (window, depth, width) and its
//! order, over an in-memory origin that counts its calls.

use std::sync::Arc;
use std::time::Duration;

use musicfs_cas::{Cache, CacheConfig};
use musicfs_origins::{DynOrigin, OriginId, OriginPath};
use musicfs_test_utils::{Fault, FaultyOrigin, MemOrigin};
use tokio::runtime::Runtime;

use super::*;
use crate::fs::MusicFs;
use crate::FsConfig;

struct Setup {
    rt: Runtime,
    fs: MusicFs,
    faulty: Arc<FaultyOrigin>,
    _cache_dir: tempfile::TempDir,
}

fn setup(paths: &[String], config: FsConfig) -> Setup {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cache, _) = rt
        .block_on(Cache::open(CacheConfig::new(dir.path(), 1 << 30)))
        .unwrap();
    let mem = MemOrigin::new(OriginId::new("o").unwrap());
    for p in paths {
        mem.put(p.as_str(), b"x".to_vec());
    }
    let faulty = FaultyOrigin::new(mem as DynOrigin);
    let fs = MusicFs::new(
        cache,
        vec![Arc::clone(&faulty) as DynOrigin],
        config,
        rt.handle().clone(),
    );
    Setup {
        rt,
        fs,
        faulty,
        _cache_dir: dir,
    }
}

fn key(path: &str) -> NodeKey {
    NodeKey {
        origin: OriginId::new("o").unwrap(),
        path: OriginPath::new(path).unwrap(),
    }
}

impl Setup {
    /// A user opens `path`: its listing (asked for if need be), then the
    /// read-ahead below it.
    fn open_dir(&self, path: &str) {
        let inner = &self.fs.inner;
        let dir = key(path);
        let listing = self.rt.block_on(inner.listing(&dir)).unwrap();
        inner.read_ahead_below(&dir, listing);
    }

    /// The root listed (not opened: nothing is read ahead), and the
    /// origin's counters zeroed.
    fn root_listed(&self) {
        self.rt.block_on(self.fs.inner.listing(&key(""))).unwrap();
        self.faulty.reset_stats();
    }

    /// Waits until the read-ahead has nothing running and nothing it may
    /// start (the deadline only bounds a hang).
    fn settle(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !self.fs.inner.read_ahead.settled() {
            assert!(
                std::time::Instant::now() < deadline,
                "read-ahead never settled"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn cached(&self, path: &str) -> bool {
        self.fs.inner.is_listing_cached(&key(path))
    }
}

#[test]
fn priority_is_newest_trigger_first_then_depth_first_by_name() {
    let a = priority(1, &key("A"));
    let a_sub = priority(1, &key("A/x"));
    let a_space = priority(1, &key("A y"));
    let b = priority(1, &key("B"));
    let newer = priority(2, &key("Z"));
    let mut all = vec![
        b.clone(),
        a_space.clone(),
        newer.clone(),
        a_sub.clone(),
        a.clone(),
    ];
    all.sort();
    assert_eq!(all, vec![newer, a, a_sub, a_space, b]);
}

#[test]
fn a_root_opened_lists_at_most_the_window_ahead_until_more_is_opened() {
    let artists = WINDOW + 40;
    let paths: Vec<String> = (0..artists)
        .map(|i| format!("Artist {i:04}/Album/01.flac"))
        .collect();
    let s = setup(&paths, FsConfig::default());
    s.root_listed();
    s.open_dir("");
    s.settle();
    assert_eq!(s.faulty.stats().list_calls, WINDOW as u64, "window");
    // Depth first: the first artists and their albums, not every artist.
    assert!(s.cached("Artist 0000/Album"));
    assert!(!s.cached(&format!("Artist {:04}", artists - 1)));
    // A user opening what was read ahead lets it go further.
    for i in 0..3 {
        s.open_dir(&format!("Artist {i:04}"));
        s.open_dir(&format!("Artist {i:04}/Album"));
    }
    s.settle();
    assert_eq!(s.faulty.stats().list_calls, WINDOW as u64 + 6);
}

#[test]
fn read_ahead_goes_no_deeper_than_its_depth() {
    let s = setup(&["1/2/3/4/5/song.flac".to_owned()], FsConfig::default());
    s.root_listed();
    s.open_dir("");
    s.settle();
    assert_eq!(s.faulty.stats().list_calls, u64::from(MAX_DEPTH));
    assert!(s.cached("1/2/3"));
    assert!(!s.cached("1/2/3/4"));
    // Opening the deepest one read ahead goes on from there.
    s.open_dir("1/2/3");
    s.settle();
    assert!(s.cached("1/2/3/4/5"));
}

#[test]
fn at_most_the_width_runs_at_once_and_off_is_off() {
    let paths: Vec<String> = (0..30).map(|i| format!("d{i:02}/f.flac")).collect();
    let config = FsConfig {
        listing_readahead: 3,
        ..FsConfig::default()
    };
    let s = setup(&paths, config);
    s.faulty.set_fault(Fault::TimeoutMs(20));
    s.root_listed();
    s.open_dir("");
    s.settle();
    let stats = s.faulty.stats();
    assert_eq!(stats.list_calls, 30);
    assert_eq!(stats.max_in_flight_lists, 3);

    let off = FsConfig {
        listing_readahead: 0,
        ..FsConfig::default()
    };
    let s = setup(&paths, off);
    s.root_listed();
    s.open_dir("");
    s.settle();
    assert_eq!(s.faulty.stats().list_calls, 0);
}

#[test]
fn a_user_listing_joins_the_read_ahead_of_its_directory() {
    let s = setup(&["a/b/f.flac".to_owned()], FsConfig::default());
    s.root_listed();
    s.faulty
        .set_fault_on(musicfs_test_utils::Ops::LIST, Fault::TimeoutMs(300));
    s.open_dir("");
    // The read-ahead of "a" has started; the user's listing of it waits
    // for that call instead of making another.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while s.faulty.stats().list_calls == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the read-ahead listing never started"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let listing = s.rt.block_on(s.fs.inner.listing(&key("a"))).unwrap();
    assert_eq!(listing.entries.len(), 1);
    s.settle();
    // "a" once, and "a/b" read ahead below it.
    assert_eq!(s.faulty.stats().list_calls, 2);
}
