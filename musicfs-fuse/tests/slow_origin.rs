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
