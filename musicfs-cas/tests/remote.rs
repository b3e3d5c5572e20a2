//! The cache over a long link: several origin ranges in flight for a cold
//! sequential read, a user's read never queued behind read-ahead, and the
//! whole-file check of a first download.
//!
//! Origins here answer after a virtual delay (`tokio::time::pause`), so
//! "50 ms per call" costs no wall-clock time. Waits are for events (a
//! counter reaching a value, the ingests ending), polled with a deadline
//! that only bounds a hang.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use md5::{Digest, Md5};
use musicfs_cas::{Cache, CacheConfig, CasError, FileHandle};
use musicfs_origins::{LimitOrigin, Origin, OriginId, OriginPath, WholeDigest};
use musicfs_test_utils::{pseudo_random_bytes, Fault, FaultyOrigin, MemOrigin, Ops};

const MIB: u64 = 1 << 20;
/// What a link of 50 ms per call looks like to the cache.
const RTT50: Fault = Fault::Bandwidth {
    bytes_per_sec: 0,
    latency_ms: 50,
};

fn path(name: &str) -> OriginPath {
    OriginPath::new(name).unwrap()
}

fn md5(data: &[u8]) -> WholeDigest {
    WholeDigest::Md5(Md5::digest(data).into())
}

/// A cache over `origin`, in `dir`.
async fn cache_over(dir: &std::path::Path, origin: Arc<dyn Origin>) -> Cache {
    let (cache, _) = Cache::open(CacheConfig::new(dir, 1 << 30)).await.unwrap();
    cache.add_origin(origin);
    cache
}

/// An in-memory origin behind a FaultyOrigin, holding `files` of
/// pseudo-random bytes of the given sizes.
fn origin_with(files: &[(&str, u64)]) -> (Arc<MemOrigin>, Arc<FaultyOrigin>, Vec<Bytes>) {
    let mem = MemOrigin::new(OriginId::new("s3").unwrap());
    let mut datas = Vec::new();
    for (i, (name, len)) in files.iter().enumerate() {
        let data = Bytes::from(pseudo_random_bytes(*len as usize, 10 + i as u64));
        mem.put(*name, data.clone());
        datas.push(data);
    }
    let faulty = FaultyOrigin::new(mem.clone());
    (mem, faulty, datas)
}

async fn open(cache: &Cache, origin: &dyn Origin, name: &str) -> FileHandle {
    let meta = origin.stat(&path(name)).await.unwrap();
    cache
        .open_file(origin.id(), &path(name), &meta)
        .await
        .unwrap()
}

/// Reads the whole file in 1 MiB reads, one after another.
async fn read_through(h: &FileHandle) -> Result<Vec<u8>, CasError> {
    let mut out = Vec::new();
    while (out.len() as u64) < h.size() {
        out.extend_from_slice(&h.read(out.len() as u64, MIB).await?);
    }
    Ok(out)
}

/// Waits until `cond` holds, polling; panics after a deadline that only
/// bounds a hang.
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..60_000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("timed out waiting until {what}");
}

/// Waits until no ingest runs (each has stored what it read and stopped).
async fn ingests_done(cache: &Cache) {
    assert!(
        cache.wait_for_ingests(Duration::from_secs(600)).await,
        "an ingest never ended"
    );
}

/// `fut`, or a panic once `secs` of (virtual) time pass: under a paused
/// clock that happens only when everything else is stuck.
async fn within<T>(secs: u64, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(secs), fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what} did not complete"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_cold_sequential_read_keeps_several_ranges_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let len = 16 * MIB + 4321;
    let (_mem, origin, data) = origin_with(&[("a.flac", len)]);
    origin.set_fault_on(Ops::READ, RTT50);
    let cache = cache_over(dir.path(), origin.clone()).await;
    let h = open(&cache, &*origin, "a.flac").await;
    let got = read_through(&h).await.unwrap();
    assert!(got == data[0], "wrong bytes");
    let s = origin.stats();
    assert!(s.max_in_flight_reads > 1, "one range at a time: {s:?}");
    assert!(s.max_in_flight_reads <= 8, "more than 8 ranges: {s:?}");
    assert_eq!(s.bytes_served, len, "bytes read twice");
    let est = cache.link_estimate(origin.id()).unwrap();
    assert_eq!(est.rtt, Some(Duration::from_millis(50)));
    drop(h);
    ingests_done(&cache).await;
    let m = cache
        .index()
        .manifest(origin.id(), &path("a.flac"))
        .unwrap();
    assert!(m.is_some_and(|m| m.is_complete()), "not cached");
}

/// An origin that answers at once (memory, a local disk) gains nothing
/// from more in flight: the ingest reads one range at a time, as it always
/// did.
#[tokio::test(start_paused = true)]
async fn a_local_origin_is_read_one_range_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let (_mem, origin, data) = origin_with(&[("a.flac", 16 * MIB), ("b.flac", 16 * MIB)]);
    let cache = cache_over(dir.path(), origin.clone()).await;
    for (name, data) in ["a.flac", "b.flac"].into_iter().zip(&data) {
        let h = open(&cache, &*origin, name).await;
        assert!(read_through(&h).await.unwrap() == *data);
    }
    assert_eq!(origin.stats().max_in_flight_reads, 1);
}

/// With the link measured and wide open, the ingest still stops
/// `readahead` past what was read: playing the start of a track does not
/// download all of it.
#[tokio::test(start_paused = true)]
async fn ranges_in_flight_stay_within_the_readahead() {
    let dir = tempfile::tempdir().unwrap();
    let (_mem, origin, data) = origin_with(&[("a.flac", 16 * MIB), ("long.flac", 96 * MIB)]);
    origin.set_fault_on(Ops::READ, RTT50);
    let cache = cache_over(dir.path(), origin.clone()).await;
    // Learn the link.
    let a = open(&cache, &*origin, "a.flac").await;
    read_through(&a).await.unwrap();
    drop(a);
    ingests_done(&cache).await;
    origin.reset_stats();

    let h = open(&cache, &*origin, "long.flac").await;
    let head = h.read(0, MIB).await.unwrap();
    assert_eq!(&head[..], &data[1][..MIB as usize]);
    ingests_done(&cache).await;
    let s = origin.stats();
    let readahead = cache.config().readahead;
    assert!(s.max_in_flight_reads > 1, "{s:?}");
    // What was read, the read-ahead, and at most one 2 MiB range that
    // started inside it.
    assert!(
        s.bytes_served <= MIB + readahead + 2 * MIB,
        "downloaded {} bytes for a 1 MiB read",
        s.bytes_served
    );
}

/// Read-ahead fills the origin's connections with ranges that never
/// answer (a stalled stream); a player's cold read of another track still
/// reaches the origin at once instead of queueing behind them.
#[tokio::test(start_paused = true)]
async fn a_users_read_is_not_queued_behind_read_ahead() {
    let dir = tempfile::tempdir().unwrap();
    let (_mem, faulty, data) = origin_with(&[
        ("a.flac", 16 * MIB),
        ("b.flac", 64 * MIB),
        ("c.flac", 8 * MIB),
    ]);
    faulty.set_fault_on(Ops::READ, RTT50);
    // Four connections: three for read-ahead, one kept for readers.
    let limited: Arc<dyn Origin> = Arc::new(LimitOrigin::new(faulty.clone(), 4));
    let cache = cache_over(dir.path(), limited.clone()).await;
    // Learn the link, so read-ahead asks for several ranges at once.
    let a = open(&cache, &*limited, "a.flac").await;
    read_through(&a).await.unwrap();
    drop(a);
    ingests_done(&cache).await;

    // Past its first MiB, every range of any file stalls.
    faulty.set_fault_on(
        Ops::READ,
        Fault::HangFrom {
            offset: MIB,
            latency_ms: 50,
        },
    );
    let b = open(&cache, &*limited, "b.flac").await;
    let head = b.read(0, MIB).await.unwrap();
    assert_eq!(&head[..], &data[1][..MIB as usize]);
    // Read-ahead has taken what it may and queues for more.
    wait_until("read-ahead queues at the link", || {
        cache.link_estimate(limited.id()).unwrap().queued > 0 && faulty.stats().in_flight_reads >= 3
    })
    .await;
    assert_eq!(
        faulty.stats().in_flight_reads,
        3,
        "read-ahead took every connection"
    );

    // The player's read is a user read: the fourth connection is free for
    // it. Queued behind the stalled read-ahead, it would never answer.
    let c = open(&cache, &*limited, "c.flac").await;
    let got = within(60, "the user's read", c.read(0, 64 * 1024)).await;
    assert_eq!(&got.unwrap()[..], &data[2][..64 * 1024]);
    assert_eq!(
        faulty.stats().in_flight_reads,
        3,
        "read-ahead grew past its share"
    );
    // Background work (a listing refresh) waits behind queued read-ahead.
    let mut turn = Box::pin(cache.background_turn(limited.id()));
    assert!(
        futures::FutureExt::now_or_never(&mut turn).is_none(),
        "background work went before queued read-ahead"
    );
    drop((b, c));
}

/// A file rewritten while several of its ranges are in flight: the handle
/// serves bytes of the version it opened and then `OriginChanged`, never a
/// byte of the new version.
#[tokio::test(start_paused = true)]
async fn a_change_mid_pipeline_never_mixes_versions() {
    let dir = tempfile::tempdir().unwrap();
    let len = 32 * MIB;
    let (mem, origin, data) = origin_with(&[("a.flac", 16 * MIB), ("t.flac", len)]);
    origin.set_fault_on(Ops::READ, RTT50);
    let cache = cache_over(dir.path(), origin.clone()).await;
    let a = open(&cache, &*origin, "a.flac").await;
    read_through(&a).await.unwrap();
    drop(a);
    ingests_done(&cache).await;

    let old = &data[1];
    let h = open(&cache, &*origin, "t.flac").await;
    let head = h.read(0, 2 * MIB).await.unwrap();
    assert_eq!(&head[..], &old[..2 * MIB as usize]);
    wait_until("ranges in flight", || origin.stats().in_flight_reads > 1).await;
    mem.put("t.flac", Bytes::from(pseudo_random_bytes(len as usize, 99)));

    let mut failed = false;
    let mut off = 2 * MIB;
    while off < len {
        match h.read(off, MIB).await {
            Ok(got) => {
                assert!(!failed, "bytes served after the handle failed");
                let at = off as usize;
                assert_eq!(&got[..], &old[at..at + got.len()], "new bytes at {off}");
            }
            Err(e) => {
                assert!(matches!(e, CasError::OriginChanged { .. }), "{e}");
                failed = true;
            }
        }
        off += MIB;
    }
    assert!(failed, "the change went unnoticed");
    ingests_done(&cache).await;
    let stored = cache
        .index()
        .manifest(origin.id(), &path("t.flac"))
        .unwrap();
    assert!(stored.is_none(), "a manifest of the old version survived");
}

/// The range at the front of the pipeline fails (the file changed): the
/// ingest ends at once, and the ranges behind it, which would never
/// answer, are dropped rather than left running until their timeout.
#[tokio::test(start_paused = true)]
async fn a_failed_range_drops_the_ranges_behind_it() {
    let dir = tempfile::tempdir().unwrap();
    let len = 32 * MIB;
    let (mem, origin, data) = origin_with(&[("a.flac", 16 * MIB), ("t.flac", len)]);
    origin.set_fault_on(Ops::READ, RTT50);
    let cache = cache_over(dir.path(), origin.clone()).await;
    let a = open(&cache, &*origin, "a.flac").await;
    read_through(&a).await.unwrap();
    drop(a);
    ingests_done(&cache).await;

    // Ranges from 8 MiB on never answer.
    origin.set_fault_on(
        Ops::READ,
        Fault::HangFrom {
            offset: 8 * MIB,
            latency_ms: 50,
        },
    );
    let h = open(&cache, &*origin, "t.flac").await;
    let head = h.read(0, 2 * MIB).await.unwrap();
    assert_eq!(&head[..], &data[1][..2 * MIB as usize]);
    wait_until("ranges past 8 MiB in flight", || {
        origin.stats().in_flight_reads > 1
    })
    .await;
    let start = tokio::time::Instant::now();
    // The ranges before 8 MiB answer Changed.
    mem.put("t.flac", Bytes::from(pseudo_random_bytes(len as usize, 99)));
    ingests_done(&cache).await;
    assert!(
        start.elapsed() < cache.config().origin_timeout,
        "the ingest waited for a timeout"
    );
    assert_eq!(origin.stats().in_flight_reads, 0, "ranges left in flight");
    drop(h);
}

#[tokio::test(start_paused = true)]
async fn a_corrupt_first_download_is_never_cached() {
    let dir = tempfile::tempdir().unwrap();
    let len = 6 * MIB + 777;
    let (mem, origin, data) = origin_with(&[("t.flac", len)]);
    let digest = md5(&data[0]);
    mem.set_whole_digest("t.flac", Some(digest));
    origin.set_fault_on(Ops::READ, Fault::CorruptBytes);
    let cache = cache_over(dir.path(), origin.clone()).await;

    // The bytes streamed before the end was reached cannot be held back;
    // what matters is that none of them stays cached.
    let bad = open(&cache, &*origin, "t.flac").await;
    let _ = read_through(&bad).await;
    ingests_done(&cache).await;
    match bad.read(0, 4096).await {
        Err(CasError::OriginCorrupt { expected, got, .. }) => {
            assert_eq!(expected, digest);
            assert_ne!(got, digest);
        }
        other => panic!("expected OriginCorrupt, got {other:?}"),
    }
    assert!(
        cache
            .index()
            .manifest(origin.id(), &path("t.flac"))
            .unwrap()
            .is_none(),
        "the corrupt download is referenced"
    );
    assert!(
        bad.read_cached_blocking(0, 4096).is_none(),
        "served from the corrupt download"
    );

    // The origin answers right again: the next open, while the failed
    // handle is still open, downloads the file again and caches it.
    origin.set_fault_on(Ops::READ, Fault::None);
    origin.reset_stats();
    let good = open(&cache, &*origin, "t.flac").await;
    assert!(read_through(&good).await.unwrap() == data[0]);
    assert_eq!(origin.stats().bytes_served, len, "not a fresh download");
    drop(good);
    ingests_done(&cache).await;
    let m = cache
        .index()
        .manifest(origin.id(), &path("t.flac"))
        .unwrap();
    assert!(
        m.is_some_and(|m| m.is_complete()),
        "the good download is not cached"
    );
    assert!(
        matches!(bad.read(0, 1).await, Err(CasError::OriginCorrupt { .. })),
        "the failed handle came back to life"
    );

    // Later reads are served from the cache.
    origin.reset_stats();
    let again = open(&cache, &*origin, "t.flac").await;
    assert!(read_through(&again).await.unwrap() == data[0]);
    assert_eq!(origin.stats().read_calls, 0, "not served from the cache");
}

/// An ingest that resumes a file cached in part by an earlier open hashes
/// the stored chunks for the check: a corrupt rest is caught too.
#[tokio::test(start_paused = true)]
async fn a_download_finished_by_a_later_open_is_checked_whole() {
    let dir = tempfile::tempdir().unwrap();
    let len = 24 * MIB + 5;
    let (mem, origin, data) = origin_with(&[("t.flac", len)]);
    mem.set_whole_digest("t.flac", Some(md5(&data[0])));
    let cache = cache_over(dir.path(), origin.clone()).await;
    let manifest = || {
        cache
            .index()
            .manifest(origin.id(), &path("t.flac"))
            .unwrap()
    };

    // The start is played and cached as far as the read-ahead went, then
    // the track is skipped.
    let h = open(&cache, &*origin, "t.flac").await;
    h.read(0, MIB).await.unwrap();
    ingests_done(&cache).await;
    drop(h);
    let part = manifest().expect("nothing cached");
    assert!(
        part.covered() > 0 && !part.is_complete(),
        "{}",
        part.covered()
    );

    // The rest arrives corrupt.
    origin.set_fault_on(Ops::READ, Fault::CorruptBytes);
    let h = open(&cache, &*origin, "t.flac").await;
    let _ = read_through(&h).await;
    ingests_done(&cache).await;
    assert!(matches!(
        h.read(0, 1).await,
        Err(CasError::OriginCorrupt { .. })
    ));
    assert!(manifest().is_none(), "the corrupt download is referenced");
    drop(h);

    // Downloaded again, right, from the start: cached.
    origin.set_fault_on(Ops::READ, Fault::None);
    let h = open(&cache, &*origin, "t.flac").await;
    assert!(read_through(&h).await.unwrap() == data[0]);
    drop(h);
    ingests_done(&cache).await;
    assert!(manifest().is_some_and(|m| m.is_complete()));
}

/// Where the origin states no digest nothing can tell a corrupt download
/// from a good one, and the cache behaves as it always has: the file is
/// cached as downloaded (the gap a stated digest closes).
#[tokio::test(start_paused = true)]
async fn without_a_stated_digest_a_download_is_cached_as_before() {
    let dir = tempfile::tempdir().unwrap();
    let (_mem, origin, data) = origin_with(&[("t.flac", 3 * MIB)]);
    let cache = cache_over(dir.path(), origin.clone()).await;
    let h = open(&cache, &*origin, "t.flac").await;
    assert!(read_through(&h).await.unwrap() == data[0]);
    drop(h);
    ingests_done(&cache).await;
    let m = cache
        .index()
        .manifest(origin.id(), &path("t.flac"))
        .unwrap();
    assert!(m.is_some_and(|m| m.is_complete()));

    origin.set_fault_on(Ops::READ, Fault::CorruptBytes);
    let dir2 = tempfile::tempdir().unwrap();
    let cache2 = cache_over(dir2.path(), origin.clone()).await;
    let h = open(&cache2, &*origin, "t.flac").await;
    let got = read_through(&h).await.unwrap();
    assert!(got != data[0], "the fault did not corrupt");
    drop(h);
    ingests_done(&cache2).await;
    let m = cache2
        .index()
        .manifest(origin.id(), &path("t.flac"))
        .unwrap();
    assert!(m.is_some_and(|m| m.is_complete()));
}
