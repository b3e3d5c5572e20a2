//! A remote origin far away (every call waits [`RTT_MS`]), through real
//! mounts: which origin calls a cold track's first bytes and a cold tree
//! walk cost, and whether they run one after another (a round trip each)
//! or at the same time.
//!
//! The assertions are on the calls the origin saw and their overlap (the
//! FaultyOrigin's call log), never on wall-clock time; the times are in
//! `cargo bench -p musicfs-fuse --bench remote`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::fs;
use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use musicfs_fuse::FsConfig;
use musicfs_origins::{DynOrigin, OriginId, OriginPath};
use musicfs_test_utils::{pseudo_random_bytes, Call, CallKind, Fault, FaultyOrigin, MemOrigin};

#[path = "support/harness.rs"]
mod harness;
use harness::*;

/// The latency of every origin call.
const RTT_MS: u64 = 100;
const TRACK: &str = "Artist/Album/01 - Track.flac";
const FIRST: usize = 64 << 10;

fn remote(files: &[(&str, Vec<u8>)]) -> (Arc<MemOrigin>, Arc<FaultyOrigin>) {
    let mem = MemOrigin::new(OriginId::new("remote").unwrap());
    for (path, data) in files {
        mem.put(*path, data.clone());
    }
    let faulty = FaultyOrigin::new(Arc::clone(&mem) as DynOrigin);
    faulty.set_fault(Fault::TimeoutMs(RTT_MS));
    (mem, faulty)
}

/// The first [`FIRST`] bytes of `path`, read through a new open; the file
/// stays open (so its ingest goes on) until the caller drops it.
fn first_bytes(path: &Path) -> (fs::File, Vec<u8>) {
    let mut f = fs::File::open(path).unwrap();
    let mut buf = vec![0u8; FIRST];
    f.read_exact(&mut buf).unwrap();
    (f, buf)
}

/// Blocks until `bound` has passed since `since`: the behaviour under test
/// is what an open does once the listing is older than the bound.
fn wait_out(since: Instant, bound: Duration) {
    let until = since + bound + Duration::from_millis(1);
    let now = Instant::now();
    if until > now {
        std::thread::sleep(until - now);
    }
}

fn of_kind(calls: &[Call], kind: CallKind) -> Vec<&Call> {
    calls.iter().filter(|c| c.kind == kind).collect()
}

fn track() -> OriginPath {
    OriginPath::new(TRACK).unwrap()
}

/// The listing was fetched just now (within the freshness bound): the open
/// asks nothing, the first read is the only call.
#[test]
fn a_cold_track_under_a_fresh_listing_costs_one_read() {
    let data = pseudo_random_bytes(4 << 20, 1);
    let (_mem, faulty) = remote(&[(TRACK, data.clone())]);
    let cfg = FsConfig {
        freshness: Duration::from_secs(3600),
        revalidate_wait: Duration::from_secs(30),
        ..FsConfig::default()
    };
    let h = Harness::start(vec![Arc::clone(&faulty) as DynOrigin], cfg);
    let album = h.root().join("remote/Artist/Album");
    assert_eq!(names(&album).len(), 1);

    faulty.record_calls();
    let (file, got) = first_bytes(&album.join("01 - Track.flac"));
    let calls = faulty.calls();
    drop(file);
    assert!(got == data[..FIRST], "wrong first bytes");
    assert!(of_kind(&calls, CallKind::List).is_empty(), "{calls:#?}");
    assert!(of_kind(&calls, CallKind::Stat).is_empty(), "{calls:#?}");
    let first = &calls[0];
    assert_eq!(first.kind, CallKind::Read, "{calls:#?}");
    assert_eq!(first.path, Some(track()));
    assert_eq!(first.range.map(|(offset, _)| offset), Some(0));
}

/// The listing is older than the freshness bound, so the open confirms the
/// file with the origin; that check and the first read run at the same
/// time, so the first bytes cost one round trip, not two.
#[test]
fn a_cold_track_under_an_old_listing_costs_one_round_trip() {
    let data = pseudo_random_bytes(4 << 20, 2);
    let (_mem, faulty) = remote(&[(TRACK, data.clone())]);
    let cfg = FsConfig {
        freshness: Duration::from_millis(200),
        revalidate_wait: Duration::from_secs(30),
        ..FsConfig::default()
    };
    let h = Harness::start(vec![Arc::clone(&faulty) as DynOrigin], cfg.clone());
    let album = h.root().join("remote/Artist/Album");
    assert_eq!(names(&album).len(), 1);
    wait_out(Instant::now(), cfg.freshness);

    faulty.record_calls();
    let (file, got) = first_bytes(&album.join("01 - Track.flac"));
    let calls = faulty.calls();
    drop(file);
    assert!(got == data[..FIRST], "wrong first bytes");
    assert!(of_kind(&calls, CallKind::List).is_empty(), "{calls:#?}");
    let stats = of_kind(&calls, CallKind::Stat);
    assert_eq!(stats.len(), 1, "one freshness check: {calls:#?}");
    let reads = of_kind(&calls, CallKind::Read);
    let first = reads
        .iter()
        .find(|c| c.range.is_some_and(|(offset, _)| offset == 0))
        .unwrap_or_else(|| panic!("no read of the first bytes: {calls:#?}"));
    assert!(
        first.overlaps(stats[0]),
        "the first read waited for the freshness check (two round trips): {calls:#?}"
    );
}

/// The same, but the track changed on the origin after it was listed: the
/// read that started beside the check was of the listed version, which the
/// origin no longer has; the open must still give the new version, whole.
#[test]
fn a_cold_track_changed_behind_an_old_listing_opens_as_the_new_version() {
    let old = pseudo_random_bytes(3 << 20, 3);
    let new = pseudo_random_bytes(5 << 20, 4);
    let (mem, faulty) = remote(&[(TRACK, old)]);
    let cfg = FsConfig {
        freshness: Duration::from_millis(200),
        revalidate_wait: Duration::from_secs(30),
        ..FsConfig::default()
    };
    let h = Harness::start(vec![Arc::clone(&faulty) as DynOrigin], cfg.clone());
    let album = h.root().join("remote/Artist/Album");
    assert_eq!(names(&album).len(), 1);
    mem.put(TRACK, new.clone());
    wait_out(Instant::now(), cfg.freshness);

    faulty.record_calls();
    let got = fs::read(album.join("01 - Track.flac")).unwrap();
    assert_eq!(got.len(), new.len(), "not the new version's size");
    assert!(got == new, "not the new version's bytes");
    let calls = faulty.calls();
    let stats = of_kind(&calls, CallKind::Stat);
    assert!(!stats.is_empty(), "the change was not checked: {calls:#?}");
    // The early read of the listed (old) version ran beside the check, so
    // this test covers the case where its handle must be dropped.
    assert!(
        of_kind(&calls, CallKind::Read)
            .iter()
            .any(|r| r.range.is_some_and(|(o, _)| o == 0) && r.overlaps(stats[0])),
        "no read beside the check: {calls:#?}"
    );
    // A second open agrees, and so does the listing's size soon after.
    assert!(fs::read(album.join("01 - Track.flac")).unwrap() == new);
}

/// One file of the walk test's tree, by its indices.
fn walk_file(artist: usize, album: usize, track: usize) -> (String, Vec<u8>) {
    let path = format!("Artist {artist}/Album {album}/{track:02} - Track.flac");
    let len = 100 + artist * 1000 + album * 20 + track;
    (path, vec![b'x'; len])
}

/// Every entry under `dir` as (path relative to `top`, is a directory,
/// size), as `ls -lR` sees them (lstat of each).
fn walk(top: &Path, dir: &Path, out: &mut Vec<(String, bool, u64)>) {
    for entry in fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let meta = fs::symlink_metadata(entry.path()).unwrap();
        let rel = entry
            .path()
            .strip_prefix(top)
            .unwrap()
            .display()
            .to_string();
        out.push((rel, meta.is_dir(), meta.len()));
        if meta.is_dir() {
            walk(top, &entry.path(), out);
        }
    }
}

/// A cold walk of 5 artists × 10 albums × 20 tracks: the directories are
/// listed ahead of the walker, several at once, each exactly once, and the
/// walk sees every entry as the origin has it.
#[test]
fn a_cold_tree_walk_lists_directories_ahead_several_at_once() {
    let (artists, albums, tracks) = (5, 10, 20);
    let mut files = Vec::new();
    for a in 0..artists {
        for b in 0..albums {
            for t in 0..tracks {
                files.push(walk_file(a, b, t));
            }
        }
    }
    let refs: Vec<(&str, Vec<u8>)> = files.iter().map(|(p, d)| (p.as_str(), d.clone())).collect();
    let (_mem, faulty) = remote(&refs);
    let cfg = FsConfig {
        revalidate_wait: Duration::from_secs(30),
        ..FsConfig::default()
    };
    assert!(cfg.listing_readahead > 1, "read-ahead is on by default");
    let h = Harness::start(vec![Arc::clone(&faulty) as DynOrigin], cfg);
    let top = h.root().join("remote");
    faulty.reset_stats();
    faulty.record_calls();

    let mut seen = Vec::new();
    walk(&top, &top, &mut seen);
    seen.sort();
    let mut expected = Vec::new();
    for a in 0..artists {
        expected.push((format!("Artist {a}"), true, 0));
        for b in 0..albums {
            expected.push((format!("Artist {a}/Album {b}"), true, 0));
            for t in 0..tracks {
                let (path, data) = walk_file(a, b, t);
                expected.push((path, false, data.len() as u64));
            }
        }
    }
    expected.sort();
    // Directory sizes are the origin's business; compare kinds and names.
    let strip = |v: &[(String, bool, u64)]| -> Vec<(String, bool, u64)> {
        v.iter()
            .map(|(p, d, n)| (p.clone(), *d, if *d { 0 } else { *n }))
            .collect()
    };
    assert_eq!(
        strip(&seen),
        expected,
        "the walk did not see the origin's tree"
    );

    let stats = faulty.stats();
    let dirs = (artists + artists * albums) as u64;
    let calls = faulty.calls();
    assert_eq!(
        stats.list_calls,
        dirs,
        "each directory listed exactly once: {:#?}",
        of_kind(&calls, CallKind::List)
    );
    assert!(
        stats.max_in_flight_lists > 1,
        "listings ran one after another: {:#?}",
        of_kind(&calls, CallKind::List)
    );
    assert!(
        stats.max_in_flight_lists <= max_lists_at_once(),
        "more read-ahead listings at once than allowed: {}",
        stats.max_in_flight_lists
    );
    assert_eq!(stats.read_calls, 0, "a walk reads no file");
}

/// At most this many listings run at once in the walk: the read-ahead's
/// width plus the walker's own listing.
fn max_lists_at_once() -> u64 {
    FsConfig::default().listing_readahead as u64 + 1
}
