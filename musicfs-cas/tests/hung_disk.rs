//! A cache disk that stops answering (an NFS cache directory whose server
//! went away) is bounded like a hung origin: reads of cached tracks go to
//! the origin within the read timeout, the FUSE threads' blocking path
//! declines instead of joining the stuck one, and the cache recovers by
//! itself when the disk answers again.
//!
//! The hang is injected (`ChunkStore::inject_disk_hang`: every cache-disk
//! operation blocks until released), because no test can make a real disk
//! stop answering reads reliably: `fsfreeze` blocks writes only, and reads
//! of page-cached chunks never reach the disk.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use musicfs_cas::{Cache, CacheConfig, FileHandle};
use musicfs_origins::{Origin, OriginId, OriginPath};
use musicfs_test_utils::{pseudo_random_bytes, FaultyOrigin, MemOrigin};

const TRACK: &str = "Album/01.flac";
const MIB: u64 = 1 << 20;

struct Unhang(musicfs_cas::ChunkStore);

impl Drop for Unhang {
    fn drop(&mut self) {
        self.0.inject_disk_hang(false);
    }
}

async fn open(cache: &Cache, origin: &Arc<FaultyOrigin>) -> FileHandle {
    let p = OriginPath::new(TRACK).unwrap();
    let meta = origin.stat(&p).await.unwrap();
    cache.open_file(origin.id(), &p, &meta).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_cache_disk_sends_reads_to_the_origin_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let len = 6 * MIB as usize + 1234;
    let data = Bytes::from(pseudo_random_bytes(len, 5));
    let mem = MemOrigin::new(OriginId::new("lib").unwrap());
    mem.put(TRACK, data.clone());
    let origin = FaultyOrigin::new(mem);
    let mut config = CacheConfig::new(dir.path(), 1 << 30);
    // The disk timeout is a quarter of this (at least 1 s).
    config.origin_timeout = Duration::from_secs(8);
    let (cache, _) = Cache::open(config).await.unwrap();
    cache.add_origin(origin.clone());
    cache.store().reconciled().await;

    // Cache the whole track, and wait for the ingest to have stored it.
    let h = open(&cache, &origin).await;
    let mut off = 0;
    while off < len as u64 {
        off += h.read(off, MIB).await.unwrap().len() as u64;
    }
    drop(h);
    assert!(cache.wait_for_ingests(Duration::from_secs(60)).await);
    let p = OriginPath::new(TRACK).unwrap();
    assert!(cache
        .index()
        .manifest(origin.id(), &p)
        .unwrap()
        .is_some_and(|m| m.is_complete()));

    cache.store().inject_disk_hang(true);
    // Released however the test ends, so a failure fails instead of
    // hanging the runtime's shutdown on the stuck threads.
    let _unhang = Unhang(cache.store().clone());
    origin.reset_stats();
    let h = open(&cache, &origin).await;
    // A FUSE thread that meets the hang first is stuck in it (nothing can
    // get a blocked system call back) ...
    let stuck = {
        let h = h.clone();
        tokio::task::spawn_blocking(move || h.read_cached_blocking(0, 128 * 1024))
    };
    // ... but an async read is bounded: after the disk timeout it goes to
    // the origin and serves the right bytes.
    let at = 2 * MIB + 17;
    let got = tokio::time::timeout(Duration::from_secs(60), h.read(at, 300_000))
        .await
        .expect("a read hung with the cache disk")
        .unwrap();
    assert_eq!(&got[..], &data[at as usize..at as usize + 300_000]);
    assert!(origin.stats().bytes_served > 0, "the origin was not asked");
    let why = cache.stats().degraded.expect("not reported as degraded");
    assert!(why.contains("not answering"), "{why}");
    // Now the blocking path declines at once instead of joining the stuck
    // reader (for a chunk it does not hold in memory: the last one), and
    // the async one goes straight to the origin.
    let h2 = h.clone();
    let last = len as u64 - 4096;
    let declined = tokio::task::spawn_blocking(move || h2.read_cached_blocking(last, 4096))
        .await
        .unwrap();
    assert!(
        declined.is_none(),
        "the blocking path touched the hung disk"
    );
    let got = h.read(5 * MIB, 4096).await.unwrap();
    assert_eq!(&got[..], &data[5 * MIB as usize..5 * MIB as usize + 4096]);

    // The disk answers again: the stuck call returns (with right bytes, if
    // any), and the cache serves from disk again without the origin.
    cache.store().inject_disk_hang(false);
    if let Some(b) = stuck.await.unwrap() {
        assert_eq!(&b[..], &data[..128 * 1024]);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while cache.stats().degraded.is_some() {
        assert!(std::time::Instant::now() < deadline, "never recovered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    origin.reset_stats();
    let h3 = h.clone();
    let again = tokio::task::spawn_blocking(move || h3.read_cached_blocking(MIB, 64 * 1024))
        .await
        .unwrap()
        .expect("cached read after recovery");
    assert_eq!(&again[..], &data[MIB as usize..MIB as usize + 64 * 1024]);
    assert_eq!(origin.stats().read_calls, 0);
}
