//! The resilience suite: the engine (origins + chunk cache) under faults.
//!
//! Each test sets up real parts (a `LocalOrigin` over a temp directory or a
//! `MemOrigin`, a real cache directory, real tmpfs mounts where the disk
//! must fail) and injects faults with `FaultyOrigin`. Timer logic runs on
//! tokio's paused clock, so no assertion depends on how busy the machine is.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use musicfs_cas::store::disk_usage;
use musicfs_cas::{Cache, CacheConfig, CasError, ChunkId, FindingKind};
use musicfs_origins::{
    DynOrigin, EntryMeta, HealthMonitor, HealthState, LocalOrigin, OriginId, OriginPath,
};
use musicfs_test_utils::{pseudo_random_bytes, write_file, Fault, FaultyOrigin, MemOrigin, Ops};
use tempfile::TempDir;

const MIB: u64 = 1 << 20;

fn oid(name: &str) -> OriginId {
    OriginId::new(name).unwrap()
}

fn p(path: &str) -> OriginPath {
    OriginPath::new(path).unwrap()
}

/// A cache in a fresh temp dir over `origin`.
async fn cache_over(dir: &Path, origin: DynOrigin, max_size: u64) -> Cache {
    let (cache, _) = Cache::open(CacheConfig::new(dir, max_size)).await.unwrap();
    cache.add_origin(origin);
    cache
}

/// Opens `path` with a fresh stat from the origin and reads it whole in
/// `step`-byte reads, as a player would.
async fn read_all(
    cache: &Cache,
    origin: &DynOrigin,
    path: &str,
    step: u64,
) -> Result<Vec<u8>, CasError> {
    let meta = origin.stat(&p(path)).await?;
    let h = cache.open_file(origin.id(), &p(path), &meta).await?;
    let mut out = Vec::new();
    let mut off = 0;
    loop {
        let b = h.read(off, step).await?;
        if b.is_empty() {
            break;
        }
        off += b.len() as u64;
        out.extend_from_slice(&b);
    }
    Ok(out)
}

fn mem_with(files: &[(&str, Vec<u8>)]) -> Arc<MemOrigin> {
    let m = MemOrigin::new(oid("lib"));
    for (path, data) in files {
        m.put(path, data.clone());
    }
    m
}

/// `n` files named `{prefix}{i}{suffix}` of `len` pseudo-random bytes each.
fn numbered(prefix: &str, suffix: &str, n: u64, len: u64, seed: u64) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|i| {
            (
                format!("{prefix}{i}{suffix}"),
                pseudo_random_bytes(len as usize, seed + i),
            )
        })
        .collect()
}

fn mem_of(files: &[(String, Vec<u8>)]) -> Arc<MemOrigin> {
    let m = MemOrigin::new(oid("lib"));
    for (path, data) in files {
        m.put(path, data.clone());
    }
    m
}

/// The chunk files of a fully cached file, in file order, with start offsets.
fn chunks_of(cache: &Cache, path: &str) -> Vec<(u64, ChunkId, u32)> {
    let m = cache
        .index()
        .manifest(&oid("lib"), &p(path))
        .unwrap()
        .expect("manifest");
    let mut start = 0;
    m.chunks()
        .iter()
        .map(|c| {
            let s = start;
            start += u64::from(c.len);
            (s, c.id, c.len)
        })
        .collect()
}

/// Bounds every wait on an event in this file. Real time, also in tests on
/// tokio's paused clock, so it only ends a hang and never decides an
/// outcome on a busy machine.
const HANG: Duration = Duration::from_secs(60);

/// Waits until the file's manifest covers it whole.
async fn wait_cached(cache: &Cache, path: &str) {
    eventually(&format!("{path} fully cached"), || {
        cache
            .index()
            .manifest(&oid("lib"), &p(path))
            .is_ok_and(|m| m.is_some_and(|m| m.is_complete()))
    })
    .await;
}

/// Waits until `cond` holds, polling every 10 ms (real or paused time);
/// fails the test after [`HANG`] of real time.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + HANG;
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within {HANG:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until no ingest runs (each stops by itself once it has run its
/// read-ahead past the furthest read, or reached the end of its file).
async fn wait_ingests_idle(cache: &Cache) {
    assert!(
        cache.wait_for_ingests(HANG).await,
        "an ingest still runs after {HANG:?}"
    );
}

// ---------------------------------------------------------------- health

#[tokio::test(start_paused = true)]
async fn test_local_origin_health_check_has_timeout() {
    let dir = TempDir::new().unwrap();
    let local: DynOrigin = Arc::new(LocalOrigin::new(oid("nas"), dir.path()));
    let slow = FaultyOrigin::new(local);
    slow.set_fault_on(Ops::HEALTH, Fault::TimeoutMs(5000));
    let monitor = HealthMonitor::new(Duration::from_secs(1));
    let origin: DynOrigin = slow;
    monitor.add(origin.clone());
    let start = tokio::time::Instant::now();
    let health = monitor.check_one(&origin).await;
    let took = start.elapsed();
    assert_eq!(health.state, HealthState::Unhealthy);
    assert!(took < Duration::from_secs(2), "check took {took:?}");
    assert!(health.last_error.unwrap_or_default().contains("1s"));
}

#[tokio::test(start_paused = true)]
async fn test_health_checks_run_in_parallel() {
    let monitor = HealthMonitor::new(Duration::from_secs(5));
    let mut dirs = Vec::new();
    for name in ["a", "b", "c"] {
        let dir = TempDir::new().unwrap();
        let o = FaultyOrigin::new(Arc::new(LocalOrigin::new(oid(name), dir.path())));
        o.set_fault_on(Ops::HEALTH, Fault::TimeoutMs(200));
        monitor.add(o);
        dirs.push(dir);
    }
    let start = tokio::time::Instant::now();
    let results = monitor.check_all().await;
    let took = start.elapsed();
    assert_eq!(results.len(), 3);
    assert!(
        results.iter().all(|(_, h)| h.state == HealthState::Healthy),
        "{results:?}"
    );
    assert!(
        took < Duration::from_millis(350),
        "sequential checks: {took:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn hung_origin_does_not_delay_the_others_and_recovers() {
    let monitor = HealthMonitor::new(Duration::from_secs(5));
    let dir = TempDir::new().unwrap();
    let hung = FaultyOrigin::new(Arc::new(LocalOrigin::new(oid("hung"), dir.path())));
    hung.set_fault(Fault::Hang);
    let ok = FaultyOrigin::new(Arc::new(LocalOrigin::new(oid("ok"), dir.path())));
    monitor.add(hung.clone());
    monitor.add(ok.clone());
    let results = monitor.check_all().await;
    let get = |id: &str| {
        results
            .iter()
            .find(|(o, _)| o.as_str() == id)
            .unwrap()
            .1
            .clone()
    };
    assert_eq!(get("hung").state, HealthState::Unhealthy);
    assert_eq!(get("ok").state, HealthState::Healthy);
    assert!(get("ok").last_latency.unwrap() < Duration::from_secs(1));
    hung.clear();
    let again = monitor.check_all().await;
    assert!(again.iter().all(|(_, h)| h.state == HealthState::Healthy));
}

#[tokio::test(start_paused = true)]
async fn background_health_checks_see_a_hang_and_its_end() {
    let faulty = FaultyOrigin::new(mem_with(&[]));
    let monitor = Arc::new(HealthMonitor::new(Duration::from_secs(2)));
    monitor.add(faulty.clone());
    let id = oid("lib");
    let state = || monitor.status(&id).unwrap().state;
    // Rounds at 0 s, 10 s, 20 s, ... (paused clock).
    let _rounds = monitor.spawn(Duration::from_secs(10));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(state(), HealthState::Healthy);
    faulty.set_fault(Fault::Hang);
    // The 10 s round gives up on the hung probe after the 2 s timeout.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let hung = monitor.status(&id).unwrap();
    assert_eq!(hung.state, HealthState::Unhealthy);
    assert!(
        hung.last_error
            .as_deref()
            .unwrap_or_default()
            .contains("2s"),
        "{hung:?}"
    );
    // The hang ends; the next round (20 s) finds the origin healthy again,
    // with nobody asking for a check.
    faulty.clear();
    tokio::time::sleep(Duration::from_secs(8)).await;
    let back = monitor.status(&id).unwrap();
    assert_eq!(back.state, HealthState::Healthy, "{back:?}");
    assert_eq!(back.consecutive_failures, 0);
    assert!(back.last_error.is_none());
}

// ------------------------------------------------------ size and eviction

#[tokio::test]
async fn test_cas_size_tracking_is_correct() {
    let dir = TempDir::new().unwrap();
    let files: Vec<(String, Vec<u8>)> = (0..4)
        .map(|i| {
            (
                format!("a/{i}.flac"),
                pseudo_random_bytes(3 * MIB as usize, i),
            )
        })
        .collect();
    let origin = mem_of(&files);
    let o: DynOrigin = origin;
    let cache = cache_over(dir.path(), o.clone(), 1 << 30).await;
    cache
        .store()
        .put(Bytes::from(vec![7u8; 1000]))
        .await
        .unwrap();
    assert_eq!(cache.store().current_size(), 1000);
    for (path, data) in &files {
        assert_eq!(&read_all(&cache, &o, path, 256 * 1024).await.unwrap(), data);
        wait_cached(&cache, path).await;
    }
    let on_disk = disk_usage(&dir.path().join("chunks"));
    assert_eq!(cache.store().current_size(), on_disk);
    assert_eq!(
        on_disk,
        1000 + 4 * 3 * MIB,
        "every byte is in a chunk, no dedup here"
    );
    drop(cache);
    // A fresh open recomputes the size by scanning the shard tree (in the
    // background).
    let (reopened, _) = Cache::open(CacheConfig::new(dir.path(), 1 << 30))
        .await
        .unwrap();
    reopened.store().reconciled().await;
    assert_eq!(reopened.store().current_size(), on_disk);
}

#[tokio::test]
async fn eviction_keeps_the_cache_under_its_limit_and_reads_right() {
    let dir = TempDir::new().unwrap();
    let files = numbered("t", ".flac", 12, 2 * MIB, 100);
    let origin = mem_of(&files);
    let o: DynOrigin = origin;
    let limit = 8 * MIB;
    let cache = cache_over(dir.path(), o.clone(), limit).await;
    for round in 0..2 {
        for (path, data) in &files {
            assert_eq!(
                &read_all(&cache, &o, path, 128 * 1024).await.unwrap(),
                data,
                "round {round} {path}"
            );
            wait_cached(&cache, path).await;
            assert!(
                cache.store().current_size() <= limit,
                "over the limit: {}",
                cache.store().current_size()
            );
        }
    }
    assert!(cache.stats().evicted_chunks > 0);
    assert_eq!(
        cache.store().current_size(),
        disk_usage(&dir.path().join("chunks"))
    );
    // Evicted chunks are the cache working as sized: verify counts them
    // but finds nothing to repair.
    let report = cache.verify(false).await.unwrap();
    assert!(report.findings.is_empty(), "{report}");
    assert!(report.chunks_not_cached > 0, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_racing_with_reads_never_serves_wrong_bytes() {
    let dir = TempDir::new().unwrap();
    let files = numbered("r", ".mp3", 6, 3 * MIB, 300);
    let origin = mem_of(&files);
    let o: DynOrigin = origin;
    // Room for about two files: every pass evicts what another reader uses.
    let cache = cache_over(dir.path(), o.clone(), 6 * MIB).await;
    let mut tasks = Vec::new();
    for t in 0..4 {
        let (cache, o, files) = (cache.clone(), o.clone(), files.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..files.len() {
                let (path, data) = &files[(i + t) % files.len()];
                let got = read_all(&cache, &o, path, 64 * 1024).await.unwrap();
                assert!(&got == data, "wrong bytes for {path}");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(cache.store().current_size() <= 6 * MIB);
}

// ------------------------------------------------ damaged chunks, refetch

async fn cached_file(dir: &Path, len: usize) -> (Cache, Arc<FaultyOrigin>, DynOrigin, Vec<u8>) {
    let data = pseudo_random_bytes(len, 42);
    let mem = mem_with(&[("Album/01 - Track.flac", data.clone())]);
    let faulty = FaultyOrigin::new(mem);
    let o: DynOrigin = faulty.clone();
    let cache = cache_over(dir, o.clone(), 1 << 30).await;
    assert_eq!(
        read_all(&cache, &o, "Album/01 - Track.flac", 128 * 1024)
            .await
            .unwrap(),
        data
    );
    wait_cached(&cache, "Album/01 - Track.flac").await;
    faulty.reset_stats();
    (cache, faulty, o, data)
}

#[tokio::test]
async fn test_corrupt_chunk_auto_refetched() {
    let dir = TempDir::new().unwrap();
    let (cache, faulty, o, data) = cached_file(dir.path(), 9 * MIB as usize).await;
    let chunks = chunks_of(&cache, "Album/01 - Track.flac");
    assert!(
        chunks.len() >= 3,
        "want several chunks, got {}",
        chunks.len()
    );
    let (_, victim, victim_len) = chunks[1];
    let path = cache.store().chunk_path(&victim);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();

    let got = read_all(&cache, &o, "Album/01 - Track.flac", 128 * 1024)
        .await
        .unwrap();
    assert!(got == data, "corrupt chunk served");
    // Only the damaged chunk's byte range came from the origin.
    assert_eq!(faulty.stats().bytes_served, u64::from(victim_len));
    assert_eq!(cache.stats().refetched_chunks, 1);
    assert_eq!(
        ChunkId::of(&std::fs::read(&path).unwrap()),
        victim,
        "chunk healed on disk"
    );
}

#[tokio::test]
async fn test_missing_chunk_triggers_origin_fetch() {
    let dir = TempDir::new().unwrap();
    let (cache, faulty, o, data) = cached_file(dir.path(), 9 * MIB as usize).await;
    let chunks = chunks_of(&cache, "Album/01 - Track.flac");
    let (_, victim, victim_len) = *chunks.last().unwrap();
    std::fs::remove_file(cache.store().chunk_path(&victim)).unwrap();

    let got = read_all(&cache, &o, "Album/01 - Track.flac", 128 * 1024)
        .await
        .unwrap();
    assert!(got == data);
    assert_eq!(faulty.stats().bytes_served, u64::from(victim_len));
    assert!(cache.store().chunk_path(&victim).exists());
}

#[tokio::test]
async fn origin_without_range_reads_refetches_the_file_once() {
    let dir = TempDir::new().unwrap();
    let (cache, faulty, o, data) = cached_file(dir.path(), 9 * MIB as usize).await;
    faulty.set_range_reads(false);
    let chunks = chunks_of(&cache, "Album/01 - Track.flac");
    for (_, id, _) in &chunks[..3] {
        std::fs::remove_file(cache.store().chunk_path(id)).unwrap();
    }
    assert!(
        read_all(&cache, &o, "Album/01 - Track.flac", MIB)
            .await
            .unwrap()
            == data
    );
    // One whole-file fetch repaired all three chunks.
    assert_eq!(faulty.stats().bytes_served, data.len() as u64);
    for (_, id, _) in &chunks {
        assert!(cache.store().chunk_path(id).exists());
    }
}

#[tokio::test]
async fn truncated_and_zero_length_chunk_files_are_refetched() {
    let dir = TempDir::new().unwrap();
    let (cache, faulty, o, data) = cached_file(dir.path(), 9 * MIB as usize).await;
    let chunks = chunks_of(&cache, "Album/01 - Track.flac");
    let a = cache.store().chunk_path(&chunks[0].1);
    let b = cache.store().chunk_path(&chunks[2].1);
    let half = std::fs::read(&a).unwrap();
    std::fs::write(&a, &half[..half.len() / 2]).unwrap();
    std::fs::write(&b, b"").unwrap();
    assert!(
        read_all(&cache, &o, "Album/01 - Track.flac", MIB)
            .await
            .unwrap()
            == data
    );
    assert_eq!(
        faulty.stats().bytes_served,
        u64::from(chunks[0].2 + chunks[2].2)
    );
}

#[tokio::test]
async fn refetch_of_a_changed_origin_file_is_an_error_not_wrong_bytes() {
    let dir = TempDir::new().unwrap();
    let data = pseudo_random_bytes(6 * MIB as usize, 5);
    let mem = mem_with(&[("x.flac", data.clone())]);
    let o: DynOrigin = mem.clone();
    let cache = cache_over(dir.path(), o.clone(), 1 << 30).await;
    read_all(&cache, &o, "x.flac", MIB).await.unwrap();
    wait_cached(&cache, "x.flac").await;
    let meta = o.stat(&p("x.flac")).await.unwrap();
    // Same size and mtime, different bytes (a rewrite that kept the mtime).
    let mut other = data.clone();
    other[0] ^= 1;
    mem.put_with_mtime("x.flac", other, meta.mtime_ns.unwrap());
    let (_, first, _) = chunks_of(&cache, "x.flac")[0];
    std::fs::remove_file(cache.store().chunk_path(&first)).unwrap();
    let h = cache
        .open_file(&oid("lib"), &p("x.flac"), &meta)
        .await
        .unwrap();
    let err = h.read(0, 4096).await.unwrap_err();
    assert!(matches!(err, CasError::OriginChanged { .. }), "{err}");
}

#[tokio::test]
async fn corrupted_origin_bytes_are_caught_by_the_chunk_hash_and_never_stored() {
    let dir = TempDir::new().unwrap();
    let (cache, faulty, o, data) = cached_file(dir.path(), 9 * MIB as usize).await;
    let path = "Album/01 - Track.flac";
    let chunks = chunks_of(&cache, path);
    let (start, victim, len) = chunks[1];
    std::fs::remove_file(cache.store().chunk_path(&victim)).unwrap();
    faulty.set_fault_on(Ops::READ, Fault::CorruptBytes);
    let meta = o.stat(&p(path)).await.unwrap();
    let h = cache.open_file(o.id(), &p(path), &meta).await.unwrap();
    // The re-fetch of the missing chunk hashes to another name: an error,
    // not the origin's wrong bytes.
    let err = h.read(start, u64::from(len)).await.unwrap_err();
    assert!(matches!(err, CasError::OriginChanged { .. }), "{err}");
    assert!(faulty.stats().read_calls > 0, "the origin was not asked");
    assert!(
        !cache.store().chunk_path(&victim).exists(),
        "wrong bytes stored under the chunk's name"
    );
    drop(h);
    // Once the origin serves right bytes again, so does the cache.
    faulty.clear();
    assert!(read_all(&cache, &o, path, MIB).await.unwrap() == data);
    wait_cached(&cache, path).await;
    assert_eq!(chunks_of(&cache, path), chunks);
    assert!(cache.verify(false).await.unwrap().findings.is_empty());
}

/// Chunk files vanish (a user's `rm`, another tool) while reads run: each
/// read looks the chunk up in the manifest and then opens its file, and
/// whichever side of that gap the unlink lands on, the read is right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_deleted_while_reads_run_are_refetched_and_reads_stay_right() {
    let dir = TempDir::new().unwrap();
    let (cache, faulty, o, data) = cached_file(dir.path(), 9 * MIB as usize).await;
    let path = "Album/01 - Track.flac";
    let chunks = chunks_of(&cache, path);
    let files: Vec<PathBuf> = chunks
        .iter()
        .map(|(_, id, _)| cache.store().chunk_path(id))
        .collect();
    // The first reads are sure to meet missing chunks; the deleter then
    // keeps racing the reads.
    for f in &files {
        std::fs::remove_file(f).unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let deleter = {
        let (stop, files) = (stop.clone(), files.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                for f in &files {
                    let _ = std::fs::remove_file(f);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let mut readers = Vec::new();
    for step in [64 * 1024, 256 * 1024, MIB] {
        let (cache, o, data) = (cache.clone(), o.clone(), data.clone());
        readers.push(tokio::spawn(async move {
            for round in 0..4 {
                let got = read_all(&cache, &o, path, step).await.unwrap();
                assert!(got == data, "wrong bytes, step {step} round {round}");
            }
        }));
    }
    for r in readers {
        r.await.unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    deleter.join().unwrap();
    let refetched = cache.stats().refetched_chunks;
    assert!(refetched >= chunks.len() as u64, "{:?}", cache.stats());
    // Each re-fetch asked for its own chunk's range, never the whole file.
    let largest = chunks.iter().map(|c| u64::from(c.2)).max().unwrap();
    assert!(faulty.stats().bytes_served <= refetched * largest);
    // With the deleter gone, one read heals every file, and the store's size
    // matches the disk again.
    assert!(read_all(&cache, &o, path, MIB).await.unwrap() == data);
    assert!(files.iter().all(|f| f.exists()));
    assert_eq!(
        cache.store().current_size(),
        disk_usage(&dir.path().join("chunks"))
    );
}

// ------------------------------------------------------------- staleness

#[tokio::test]
async fn changed_origin_file_is_not_served_from_stale_chunks() {
    let dir = TempDir::new().unwrap();
    let v1 = pseudo_random_bytes(3 * MIB as usize, 1);
    let mem = mem_with(&[("song.flac", v1.clone())]);
    let o: DynOrigin = mem.clone();
    let cache = cache_over(dir.path(), o.clone(), 1 << 30).await;
    assert_eq!(read_all(&cache, &o, "song.flac", MIB).await.unwrap(), v1);
    wait_cached(&cache, "song.flac").await;
    // Re-tagged: same size, new bytes, new mtime.
    let v2 = pseudo_random_bytes(3 * MIB as usize, 2);
    mem.put("song.flac", v2.clone());
    assert_eq!(read_all(&cache, &o, "song.flac", MIB).await.unwrap(), v2);
    // And a size change.
    let v3 = pseudo_random_bytes(MIB as usize, 3);
    mem.put("song.flac", v3.clone());
    assert_eq!(read_all(&cache, &o, "song.flac", MIB).await.unwrap(), v3);
}

#[tokio::test]
async fn origin_file_changed_only_in_mtime_while_cached_and_open() {
    let dir = TempDir::new().unwrap();
    let path = "touch.flac";
    let v1 = pseudo_random_bytes(4 * MIB as usize, 41);
    let mem = mem_with(&[(path, v1.clone())]);
    let faulty = FaultyOrigin::new(mem.clone());
    let o: DynOrigin = faulty.clone();
    let cache = cache_over(dir.path(), o.clone(), 1 << 30).await;
    assert!(read_all(&cache, &o, path, MIB).await.unwrap() == v1);
    wait_cached(&cache, path).await;
    let first = o.stat(&p(path)).await.unwrap();
    let t1 = first.mtime_ns.unwrap();
    let stored = cache.store().current_size();

    // `touch`: same bytes, same size, the mtime moves by one nanosecond.
    mem.put_with_mtime(path, v1.clone(), t1 + 1);
    let touched = o.stat(&p(path)).await.unwrap();
    assert_eq!(touched.size, first.size);
    assert!(read_all(&cache, &o, path, MIB).await.unwrap() == v1);
    wait_cached(&cache, path).await;
    let m = cache
        .index()
        .manifest(&oid("lib"), &p(path))
        .unwrap()
        .unwrap();
    assert_eq!(
        m.version.mtime_ns,
        Some(t1 + 1),
        "manifest kept the old version"
    );
    // The new version's chunks are the old ones: nothing stored twice.
    assert_eq!(cache.store().current_size(), stored);

    // Same size, other bytes, the mtime one nanosecond on, while a handle on
    // the cached version is still open (a player mid-track).
    let playing = cache.open_file(o.id(), &p(path), &touched).await.unwrap();
    let v2 = pseudo_random_bytes(4 * MIB as usize, 42);
    mem.put_with_mtime(path, v2.clone(), t1 + 2);
    assert_eq!(o.stat(&p(path)).await.unwrap().size, first.size);
    assert!(read_all(&cache, &o, path, MIB).await.unwrap() == v2);
    wait_cached(&cache, path).await;
    // The open handle keeps reading its own version whole, from its chunks,
    // and does not put its manifest back over the new one.
    assert!(playing.read(0, 4 * MIB).await.unwrap() == v1);
    drop(playing);
    let m = cache
        .index()
        .manifest(&oid("lib"), &p(path))
        .unwrap()
        .unwrap();
    assert_eq!(m.version.mtime_ns, Some(t1 + 2));
    faulty.reset_stats();
    assert!(read_all(&cache, &o, path, MIB).await.unwrap() == v2);
    assert_eq!(faulty.stats().read_calls, 0, "v2 was not served from cache");
}

// ----------------------------------------------------- cold reads, ingest

#[tokio::test(start_paused = true)]
async fn cold_first_read_does_not_fetch_the_whole_file() {
    let dir = TempDir::new().unwrap();
    let data = pseudo_random_bytes(48 * MIB as usize, 9);
    let faulty = FaultyOrigin::new(mem_with(&[("big.flac", data.clone())]));
    // A NAS-like link: 20 ms per request, 20 MB/s.
    let (latency_ms, bw) = (20u64, 20_000_000u64);
    faulty.set_fault_on(
        Ops::READ,
        Fault::Bandwidth {
            bytes_per_sec: bw,
            latency_ms,
        },
    );
    let o: DynOrigin = faulty.clone();
    let mut config = CacheConfig::new(dir.path(), 1 << 30);
    config.readahead = MIB;
    let (cache, _) = Cache::open(config).await.unwrap();
    cache.add_origin(o.clone());
    let meta = o.stat(&p("big.flac")).await.unwrap();
    let h = cache
        .open_file(o.id(), &p("big.flac"), &meta)
        .await
        .unwrap();
    let start = tokio::time::Instant::now();
    let first = h.read(0, 64 * 1024).await.unwrap();
    let ttfb = start.elapsed();
    assert_eq!(&first[..], &data[..64 * 1024]);
    // One origin round trip for 64 KiB, on virtual time.
    let round_trip =
        Duration::from_millis(latency_ms) + Duration::from_secs_f64(65536.0 / bw as f64);
    assert!(
        ttfb <= round_trip * 2,
        "first 64 KiB took {ttfb:?}, one round trip is {round_trip:?}"
    );
    // Let the ingest run as far as it wants, then count.
    wait_ingests_idle(&cache).await;
    let served = faulty.stats().bytes_served;
    assert!(
        served <= 4 * MIB,
        "a 64 KiB read pulled {served} bytes of a 48 MiB file"
    );
}

#[tokio::test]
async fn concurrent_readers_of_one_cold_file_share_one_fetch() {
    let dir = TempDir::new().unwrap();
    let data = pseudo_random_bytes(20 * MIB as usize, 11);
    let faulty = FaultyOrigin::new(mem_with(&[("shared.flac", data.clone())]));
    faulty.set_fault_on(
        Ops::READ,
        Fault::Bandwidth {
            bytes_per_sec: 200 * MIB,
            latency_ms: 2,
        },
    );
    let o: DynOrigin = faulty.clone();
    let cache = cache_over(dir.path(), o.clone(), 1 << 30).await;
    let mut readers = Vec::new();
    for _ in 0..8 {
        let (cache, o) = (cache.clone(), o.clone());
        readers.push(tokio::spawn(async move {
            read_all(&cache, &o, "shared.flac", 128 * 1024).await
        }));
    }
    for r in readers {
        assert!(r.await.unwrap().unwrap() == data);
    }
    let served = faulty.stats().bytes_served;
    assert!(
        served < data.len() as u64 + 4 * MIB,
        "8 readers pulled {served} bytes for a {} byte file",
        data.len()
    );
}

#[tokio::test]
async fn seek_far_ahead_reads_directly_and_stays_right() {
    let dir = TempDir::new().unwrap();
    let data = pseudo_random_bytes(40 * MIB as usize, 12);
    let faulty = FaultyOrigin::new(mem_with(&[("seek.flac", data.clone())]));
    let o: DynOrigin = faulty.clone();
    let mut config = CacheConfig::new(dir.path(), 1 << 30);
    config.readahead = MIB;
    let (cache, _) = Cache::open(config).await.unwrap();
    cache.add_origin(o.clone());
    let meta = o.stat(&p("seek.flac")).await.unwrap();
    let h = cache
        .open_file(o.id(), &p("seek.flac"), &meta)
        .await
        .unwrap();
    // ID3v1 tags live in the last 128 bytes: players read them first.
    let tail = h.read(data.len() as u64 - 128, 128).await.unwrap();
    assert_eq!(&tail[..], &data[data.len() - 128..]);
    let mid = h.read(30 * MIB, 100_000).await.unwrap();
    assert_eq!(
        &mid[..],
        &data[30 * MIB as usize..30 * MIB as usize + 100_000]
    );
    // Had the seeks started an ingest, it would run its read-ahead now.
    wait_ingests_idle(&cache).await;
    assert!(
        faulty.stats().bytes_served < 4 * MIB,
        "seeks dragged the ingest along"
    );
}

// ------------------------------------------------ origin faults on reads

#[tokio::test]
async fn cached_file_reads_while_the_origin_hangs() {
    let dir = TempDir::new().unwrap();
    let (cache, faulty, o, data) = cached_file(dir.path(), 5 * MIB as usize).await;
    faulty.set_fault(Fault::Hang);
    let meta = EntryMeta {
        ..faulty
            .inner()
            .stat(&p("Album/01 - Track.flac"))
            .await
            .unwrap()
    };
    let h = cache
        .open_file(o.id(), &p("Album/01 - Track.flac"), &meta)
        .await
        .unwrap();
    let got = tokio::time::timeout(HANG, h.read(0, 5 * MIB))
        .await
        .expect("cached read hung")
        .unwrap();
    assert!(got == data);
    assert_eq!(faulty.stats().read_calls, 0);
}

#[tokio::test(start_paused = true)]
async fn uncached_read_from_a_hung_origin_times_out_with_a_clear_error() {
    let dir = TempDir::new().unwrap();
    let faulty = FaultyOrigin::new(mem_with(&[("h.flac", vec![1u8; 1000])]));
    let o: DynOrigin = faulty.clone();
    let mut config = CacheConfig::new(dir.path(), 1 << 30);
    config.origin_timeout = Duration::from_secs(3);
    let (cache, _) = Cache::open(config).await.unwrap();
    cache.add_origin(o.clone());
    let meta = o.stat(&p("h.flac")).await.unwrap();
    faulty.set_fault(Fault::Hang);
    let h = cache.open_file(o.id(), &p("h.flac"), &meta).await.unwrap();
    let start = tokio::time::Instant::now();
    let err = h.read(0, 1000).await.unwrap_err();
    assert!(matches!(err, CasError::OriginTimeout { .. }), "{err}");
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn truncated_origin_reads_are_errors_not_short_data() {
    let dir = TempDir::new().unwrap();
    let faulty = FaultyOrigin::new(mem_with(&[(
        "t.flac",
        pseudo_random_bytes(MIB as usize, 3),
    )]));
    let o: DynOrigin = faulty.clone();
    let cache = cache_over(dir.path(), o.clone(), 1 << 30).await;
    faulty.set_fault_on(Ops::READ, Fault::Truncate);
    let err = read_all(&cache, &o, "t.flac", 64 * 1024).await.unwrap_err();
    assert!(matches!(err, CasError::OriginChanged { .. }), "{err}");
}

#[tokio::test]
async fn transient_origin_errors_surface_typed_and_retryable() {
    let dir = TempDir::new().unwrap();
    let data = pseudo_random_bytes(MIB as usize, 8);
    let faulty = FaultyOrigin::new(mem_with(&[("f.flac", data.clone())]));
    let o: DynOrigin = faulty.clone();
    let cache = cache_over(dir.path(), o.clone(), 1 << 30).await;
    let meta = o.stat(&p("f.flac")).await.unwrap();
    faulty.set_fault_on(Ops::READ, Fault::Transient);
    let h = cache.open_file(o.id(), &p("f.flac"), &meta).await.unwrap();
    match h.read(0, 4096).await {
        Err(CasError::Origin(e)) => assert!(e.is_retryable(), "{e}"),
        other => panic!("expected a retryable origin error, got {other:?}"),
    }
    // With a retry layer between cache and origin, flapping is invisible.
    faulty.set_fault_on(Ops::READ, Fault::FailEveryNth(2));
    let retrying: DynOrigin = Arc::new(musicfs_origins::RetryOrigin::new(
        o.clone(),
        musicfs_origins::RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(5),
        },
    ));
    let dir2 = TempDir::new().unwrap();
    let cache2 = cache_over(dir2.path(), retrying.clone(), 1 << 30).await;
    assert_eq!(
        read_all(&cache2, &retrying, "f.flac", 64 * 1024)
            .await
            .unwrap(),
        data
    );
}

#[tokio::test(start_paused = true)]
async fn slow_origin_is_slow_but_right() {
    let dir = TempDir::new().unwrap();
    let files = numbered("slow/", ".flac", 2, 3 * MIB, 900);
    let faulty = FaultyOrigin::new(mem_of(&files));
    // Every call waits 2 s (paused clock): slow, but within the 30 s bound.
    let delay = Duration::from_secs(2);
    faulty.set_fault(Fault::TimeoutMs(delay.as_millis() as u64));
    let o: DynOrigin = faulty.clone();
    let cache = cache_over(dir.path(), o.clone(), 1 << 30).await;
    for (path, data) in &files {
        let start = tokio::time::Instant::now();
        let got = read_all(&cache, &o, path, 128 * 1024).await.unwrap();
        assert!(&got == data, "wrong bytes for {path}");
        assert!(start.elapsed() >= 2 * delay, "the delay was not applied");
        wait_cached(&cache, path).await;
    }
    // Cached now: the next reads cost a stat, not a read.
    faulty.reset_stats();
    for (path, data) in &files {
        assert!(&read_all(&cache, &o, path, MIB).await.unwrap() == data);
    }
    assert_eq!(faulty.stats().read_calls, 0);
}

/// The origin goes down and comes back, again and again, while readers read
/// and the health monitor runs: every read gives the right bytes or a typed,
/// retryable origin error, and the monitor follows each flip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flapping_origin_reads_are_right_or_typed_and_health_follows() {
    let dir = TempDir::new().unwrap();
    let files = numbered("flap/", ".flac", 6, MIB, 810);
    let faulty = FaultyOrigin::new(mem_of(&files));
    let o: DynOrigin = faulty.clone();
    let cache = cache_over(dir.path(), o.clone(), 1 << 30).await;
    let monitor = Arc::new(HealthMonitor::new(Duration::from_secs(1)));
    monitor.add(o.clone());
    let _rounds = monitor.spawn(Duration::from_millis(5));
    let state = || monitor.status(o.id()).map(|h| h.state);

    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicU64::new(0));
    let read_right = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for t in 0..3 {
        let (cache, o, files) = (cache.clone(), o.clone(), files.clone());
        let (stop, failed, read_right) = (stop.clone(), failed.clone(), read_right.clone());
        readers.push(tokio::spawn(async move {
            for i in t.. {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let (path, data) = &files[i % files.len()];
                let read = tokio::time::timeout(
                    Duration::from_secs(30),
                    read_all(&cache, &o, path, 128 * 1024),
                );
                match read.await.expect("a read hung on a flapping origin") {
                    Ok(got) => {
                        assert!(&got == data, "wrong bytes for {path}");
                        read_right.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(CasError::Origin(e)) if e.is_retryable() => {
                        failed.fetch_add(1, Ordering::SeqCst);
                        // An injected failure returns at once; back off as
                        // a player would instead of spinning the workers.
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    Err(e) => panic!("unexpected error from a flapping origin: {e:?}"),
                }
            }
        }));
    }
    for flip in 0..5 {
        faulty.set_fault(Fault::Transient);
        // Down until a reader has met the outage and the monitor noticed.
        let failed_before = failed.load(Ordering::SeqCst);
        eventually(&format!("flip {flip}: down"), || {
            failed.load(Ordering::SeqCst) > failed_before && state() == Some(HealthState::Unhealthy)
        })
        .await;
        faulty.clear();
        eventually(&format!("flip {flip}: up"), || {
            state() == Some(HealthState::Healthy)
        })
        .await;
        // Up until a reader has read a whole file right since the monitor
        // saw the origin back.
        let right_before = read_right.load(Ordering::SeqCst);
        eventually(&format!("flip {flip}: a right read"), || {
            read_right.load(Ordering::SeqCst) > right_before
        })
        .await;
    }
    stop.store(true, Ordering::SeqCst);
    for r in readers {
        r.await.unwrap();
    }
    // Up for good: every file reads right.
    for (path, data) in &files {
        assert!(&read_all(&cache, &o, path, MIB).await.unwrap() == data);
    }
}

// --------------------------------------------------- crash leftovers, index

#[tokio::test]
async fn crash_leftovers_and_a_corrupt_index_are_healed_at_open() {
    let dir = TempDir::new().unwrap();
    let data = pseudo_random_bytes(5 * MIB as usize, 21);
    let mem = mem_with(&[("a.flac", data.clone())]);
    let o: DynOrigin = mem.clone();
    {
        let cache = cache_over(dir.path(), o.clone(), 1 << 30).await;
        read_all(&cache, &o, "a.flac", MIB).await.unwrap();
        wait_cached(&cache, "a.flac").await;
        cache.flush().await.unwrap();
    }
    let chunk_bytes = disk_usage(&dir.path().join("chunks"));
    std::fs::write(
        dir.path().join("tmp").join("deadbeef.123.0.tmp"),
        b"partial chunk",
    )
    .unwrap();
    // Wreck the index: overwrite every file sled keeps.
    for e in std::fs::read_dir(dir.path().join("index.sled")).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::write(e.path(), vec![0x5Au8; 4096]).unwrap();
        }
    }
    let (cache, report) = Cache::open(CacheConfig::new(dir.path(), 1 << 30))
        .await
        .unwrap();
    assert!(report.index.rebuilt, "{report:?}");
    assert_eq!(report.store.temp_files_removed, 1);
    cache.store().reconciled().await;
    assert_eq!(
        std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
        0
    );
    assert_eq!(
        cache.store().current_size(),
        chunk_bytes,
        "chunks lost in the rebuild"
    );
    cache.add_origin(o.clone());
    // The manifest went with the index; re-reading costs origin reads but
    // stores nothing new: the chunks are still there.
    assert_eq!(read_all(&cache, &o, "a.flac", MIB).await.unwrap(), data);
    wait_cached(&cache, "a.flac").await;
    assert_eq!(cache.store().current_size(), chunk_bytes);
}

#[tokio::test]
async fn missing_index_is_rebuilt_from_chunk_files() {
    let dir = TempDir::new().unwrap();
    let o: DynOrigin = mem_with(&[("a.flac", pseudo_random_bytes(3 * MIB as usize, 22))]);
    let count;
    {
        let cache = cache_over(dir.path(), o.clone(), 1 << 30).await;
        read_all(&cache, &o, "a.flac", MIB).await.unwrap();
        wait_cached(&cache, "a.flac").await;
        count = cache.store().chunk_count();
    }
    std::fs::remove_dir_all(dir.path().join("index.sled")).unwrap();
    let (cache, report) = Cache::open(CacheConfig::new(dir.path(), 1 << 30))
        .await
        .unwrap();
    assert!(!report.index.rebuilt, "{report:?}");
    let reconciled = cache.store().reconciled().await;
    assert_eq!(reconciled.index_entries_added, count);
    assert_eq!(cache.index().chunk_count() as u64, count);
}

// ------------------------------------------------------------ verify

#[tokio::test]
async fn verify_finds_every_problem_and_repair_makes_it_clean() {
    let dir = TempDir::new().unwrap();
    let (cache, faulty, _o, _data) = cached_file(dir.path(), 9 * MIB as usize).await;
    assert!(cache.verify(false).await.unwrap().is_clean());
    let chunks = chunks_of(&cache, "Album/01 - Track.flac");
    let corrupt = cache.store().chunk_path(&chunks[0].1);
    std::fs::write(&corrupt, b"not the chunk").unwrap();
    std::fs::remove_file(cache.store().chunk_path(&chunks[1].1)).unwrap();
    cache
        .index()
        .put_chunk(
            &ChunkId::of(b"ghost"),
            musicfs_cas::index::ChunkRecord {
                size: 5,
                atime_ns: 1,
            },
        )
        .unwrap();

    let report = cache.verify(false).await.unwrap();
    let kinds: Vec<FindingKind> = report.findings.iter().map(|f| f.kind).collect();
    assert!(!report.is_clean());
    assert!(kinds.contains(&FindingKind::CorruptChunk), "{report}");
    assert!(kinds.contains(&FindingKind::RecordWithoutFile), "{report}");
    assert!(kinds.contains(&FindingKind::MissingChunk), "{report}");
    assert!(report.findings.iter().all(|f| !f.fix.is_empty()));

    let repaired = cache.verify(true).await.unwrap();
    assert!(repaired.is_clean(), "{repaired}");
    // Both damaged chunks came back by their own byte ranges.
    assert_eq!(
        faulty.stats().bytes_served,
        u64::from(chunks[0].2 + chunks[1].2)
    );
    let again = cache.verify(false).await.unwrap();
    assert!(again.findings.is_empty(), "{again}");
}

#[tokio::test]
async fn repair_without_the_origin_drops_the_manifest_and_is_clean() {
    let dir = TempDir::new().unwrap();
    let (cache, faulty, _o, _) = cached_file(dir.path(), 6 * MIB as usize).await;
    let chunks = chunks_of(&cache, "Album/01 - Track.flac");
    std::fs::remove_file(cache.store().chunk_path(&chunks[0].1)).unwrap();
    faulty.set_fault(Fault::Transient);
    let repaired = cache.verify(true).await.unwrap();
    assert!(repaired.is_clean(), "{repaired}");
    assert!(cache
        .index()
        .manifest(&oid("lib"), &p("Album/01 - Track.flac"))
        .unwrap()
        .is_none());
    assert!(cache.verify(false).await.unwrap().findings.is_empty());
}

// ------------------------------------------------- dead cache disk (tmpfs)

/// A tmpfs, seen by the cache through a bind mount that can be swapped for
/// a read-only view of the same files (remounting the tmpfs itself read-only
/// fails while the index holds files open for writing). Unmounted on drop.
struct Tmpfs {
    backing: TempDir,
    view: TempDir,
}

fn mount(args: &[&str], target: &Path) {
    let st = Command::new("mount")
        .args(args)
        .arg(target)
        .status()
        .expect("run mount");
    assert!(
        st.success(),
        "mount {args:?} {} failed (these tests run as root)",
        target.display()
    );
}

impl Tmpfs {
    fn new(size: &str) -> Self {
        let backing = TempDir::new().unwrap();
        let view = TempDir::new().unwrap();
        mount(
            &["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"],
            backing.path(),
        );
        mount(&["--bind", &backing.path().to_string_lossy()], view.path());
        Self { backing, view }
    }

    fn path(&self) -> &Path {
        self.view.path()
    }

    /// The cache disk turns read-only: same files, no writes.
    fn make_read_only(&self) {
        let _ = Command::new("umount").arg("-l").arg(self.path()).status();
        mount(
            &["--bind", &self.backing.path().to_string_lossy()],
            self.path(),
        );
        mount(&["-o", "remount,ro,bind"], self.path());
    }

    fn make_writable(&self) {
        let _ = Command::new("umount").arg("-l").arg(self.path()).status();
        mount(
            &["--bind", &self.backing.path().to_string_lossy()],
            self.path(),
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.view.path())
            .status();
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.backing.path())
            .status();
    }
}

#[tokio::test]
async fn test_passthrough_mode_when_cache_disk_dead() {
    let fs = Tmpfs::new("64m");
    let files = numbered("p", ".flac", 3, 3 * MIB, 500);
    let faulty = FaultyOrigin::new(mem_of(&files));
    let o: DynOrigin = faulty.clone();
    let cache = cache_over(fs.path(), o.clone(), 1 << 30).await;
    assert_eq!(
        read_all(&cache, &o, "p0.flac", MIB).await.unwrap(),
        files[0].1
    );
    wait_cached(&cache, "p0.flac").await;

    fs.make_read_only();
    // Uncached: served from the origin, no error to the caller.
    assert_eq!(
        read_all(&cache, &o, "p1.flac", 128 * 1024).await.unwrap(),
        files[1].1
    );
    // The ingest's write fails in the background, after the reads it fed.
    eventually("the cache turns degraded", || {
        cache.stats().degraded.is_some()
    })
    .await;
    let degraded = cache.stats().degraded.expect("cache marked degraded");
    assert!(degraded.contains("read-only"), "{degraded}");
    // Cached: still served from the (readable) chunks.
    faulty.reset_stats();
    assert_eq!(
        read_all(&cache, &o, "p0.flac", MIB).await.unwrap(),
        files[0].1
    );
    assert_eq!(faulty.stats().bytes_served, 0);

    fs.make_writable();
    // Nobody calls for a probe: reads alone bring the cache back (the store
    // probes the disk at most every 5 s).
    let deadline = std::time::Instant::now() + HANG;
    loop {
        assert_eq!(
            read_all(&cache, &o, "p2.flac", MIB).await.unwrap(),
            files[2].1
        );
        if cache.stats().degraded.is_none() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the cache did not recover by itself within {HANG:?}"
        );
        // Reads at a player's pace, not a spin.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        read_all(&cache, &o, "p2.flac", MIB).await.unwrap(),
        files[2].1
    );
    wait_cached(&cache, "p2.flac").await;
}

#[tokio::test]
async fn full_cache_disk_evicts_then_passes_through() {
    // The disk is far smaller than the configured cache size.
    let fs = Tmpfs::new("6m");
    let files = numbered("f", ".flac", 6, 2 * MIB, 600);
    let o: DynOrigin = mem_of(&files);
    let cache = cache_over(fs.path(), o.clone(), 1 << 30).await;
    for round in 0..2 {
        for (path, data) in &files {
            let got = read_all(&cache, &o, path, 256 * 1024).await.unwrap();
            assert!(&got == data, "round {round}: wrong bytes for {path}");
        }
    }
    assert!(
        cache.stats().evicted_chunks > 0,
        "ENOSPC did not trigger eviction: {:?}",
        cache.stats()
    );
}

#[tokio::test]
async fn disk_filled_by_others_passes_through_then_recovers_when_space_returns() {
    let fs = Tmpfs::new("24m");
    let files = numbered("s", ".flac", 3, 3 * MIB, 950);
    let o: DynOrigin = mem_of(&files);
    let cache = cache_over(&fs.path().join("cache"), o.clone(), 1 << 30).await;
    // Another program fills the disk: evicting the cache cannot make room.
    let filler = fs.path().join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; MIB as usize];
        while f.write_all(&block).is_ok() {}
    }
    for (path, data) in &files[..2] {
        let got = read_all(&cache, &o, path, 256 * 1024).await.unwrap();
        assert!(&got == data, "wrong bytes for {path} on a full disk");
    }
    eventually("the cache turns degraded", || {
        cache.stats().degraded.is_some()
    })
    .await;
    let why = cache.stats().degraded.unwrap();
    assert!(why.contains("full"), "{why}");

    std::fs::remove_file(&filler).unwrap();
    // Reads alone bring the cache back (a probe at most every 5 s).
    let (path, data) = &files[2];
    let deadline = std::time::Instant::now() + HANG;
    loop {
        assert!(&read_all(&cache, &o, path, MIB).await.unwrap() == data);
        if cache.stats().degraded.is_none() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the cache did not recover within {HANG:?} of space returning"
        );
        // Reads at a player's pace, not a spin.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(&read_all(&cache, &o, path, MIB).await.unwrap() == data);
    wait_cached(&cache, path).await;
}

#[tokio::test]
async fn removed_cache_directory_is_recreated() {
    let dir = TempDir::new().unwrap();
    let cache_dir = dir.path().join("cache");
    let data = pseudo_random_bytes(3 * MIB as usize, 31);
    let o: DynOrigin = mem_with(&[
        ("a.flac", data.clone()),
        ("b.flac", data[..MIB as usize].to_vec()),
    ]);
    let cache = cache_over(&cache_dir, o.clone(), 1 << 30).await;
    assert_eq!(read_all(&cache, &o, "a.flac", MIB).await.unwrap(), data);
    wait_cached(&cache, "a.flac").await;
    std::fs::remove_dir_all(&cache_dir).unwrap();
    assert_eq!(read_all(&cache, &o, "a.flac", MIB).await.unwrap(), data);
    assert_eq!(
        read_all(&cache, &o, "b.flac", 64 * 1024).await.unwrap(),
        &data[..MIB as usize]
    );
    wait_cached(&cache, "b.flac").await;
    assert!(cache_dir.join("chunks").exists());
}

// ------------------------------------------------------------ fds

/// Runs in a child process whose fd limit is low, so the shared test process
/// keeps its own limit. The child exhausts its fds on purpose and reads; the
/// parent checks it never panicked and never got wrong bytes.
#[test]
fn test_fd_exhaustion_handling() {
    if std::env::var_os("MUSICFS_FD_CHILD").is_some() {
        fd_child();
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("prlimit")
        .arg("--nofile=64:64")
        .arg(exe)
        .args([
            "--exact",
            "test_fd_exhaustion_handling",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("MUSICFS_FD_CHILD", "1")
        .output()
        .expect("run prlimit (util-linux)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed:\n{stdout}\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let line = stdout
        .lines()
        .find_map(|l| l.find("fd-child: exhausted").map(|i| &l[i..]))
        .unwrap_or_else(|| panic!("no summary:\n{stdout}\n{stderr}"));
    assert!(line.contains("wrong=0"), "{line}");
    assert!(line.contains("lasting=typed"), "{line}");
    assert!(line.contains("queued=true"), "{line}");
    assert!(line.contains("queued_ok=15"), "{line}");
}

fn fd_child() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let lib = TempDir::new().unwrap();
        let files = numbered("d/", ".flac", 16, 600_000, 700);
        for (path, data) in &files {
            write_file(lib.path(), path, data).unwrap();
        }
        // Wrapped only to see when a read has reached the origin.
        let counted = FaultyOrigin::new(Arc::new(LocalOrigin::new(oid("lib"), lib.path())));
        let o: DynOrigin = counted.clone();
        let dir = TempDir::new().unwrap();
        let (cache, _) = Cache::open(CacheConfig::new(dir.path(), 1 << 30))
            .await
            .expect("a cache opens under a 64-fd limit");
        cache.add_origin(o.clone());
        // Use up every remaining fd.
        let hog_fds = || {
            let mut hog = Vec::new();
            while let Ok(f) = std::fs::File::open("/dev/null") {
                hog.push(f);
            }
            hog
        };
        let mut wrong = 0;
        // Exhaustion that lasts: the read waits a bounded time, then fails
        // with a typed error (never a panic, never short or wrong data).
        let hog = hog_fds();
        let (path, data) = &files[0];
        let lasting = match read_all(&cache, &o, path, 128 * 1024).await {
            Ok(got) => {
                wrong += usize::from(&got != data);
                "ok"
            }
            Err(e) if e.to_string().contains("too many open files") => "typed",
            Err(e) => {
                println!("fd-child: unexpected error under exhaustion: {e}");
                "other"
            }
        };
        drop(hog);
        // A moment's exhaustion: reads started while no fd is free queue,
        // and all complete right once other files close. The fds are let go
        // once a read waits at the origin (or, should none get that far,
        // once something has failed: holding on would only hide why).
        counted.reset_stats();
        let hog = hog_fds();
        let release = {
            let counted = counted.clone();
            std::thread::spawn(move || {
                let deadline = std::time::Instant::now() + HANG;
                let queued = loop {
                    let s = counted.stats();
                    if s.in_flight_reads > 0 {
                        break true;
                    }
                    if s.failures > 0 || std::time::Instant::now() >= deadline {
                        break false;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                };
                drop(hog);
                queued
            })
        };
        let reads = files.iter().skip(1).map(|(path, data)| {
            let (cache, o) = (cache.clone(), o.clone());
            async move {
                match read_all(&cache, &o, path, 128 * 1024).await {
                    Ok(got) if &got == data => (1, 0),
                    Ok(_) => (0, 1),
                    Err(e) => {
                        println!("fd-child: queued read failed: {e}");
                        (0, 0)
                    }
                }
            }
        });
        let results = futures::future::join_all(reads).await;
        let queued = release.join().unwrap();
        let queued_ok: usize = results.iter().map(|r| r.0).sum();
        wrong += results.iter().map(|r| r.1).sum::<usize>();
        println!(
            "fd-child: exhausted lasting={lasting} queued={queued} queued_ok={queued_ok} wrong={wrong}"
        );
    });
}

// ----------------------------------------------- a range read is a slice

mod prop {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn range_read_equals_slice_of_whole(len in 0usize..3_000_000, reads in proptest::collection::vec((any::<u64>(), 1u64..2_000_000), 1..8), seed in any::<u64>()) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let dir = TempDir::new().unwrap();
                let data = pseudo_random_bytes(len, seed);
                let o: DynOrigin = mem_with(&[("f", data.clone())]);
                let mut config = CacheConfig::new(dir.path(), 1 << 30);
                config.chunk_params = musicfs_cas::ChunkParams { min: 16 * 1024, avg: 64 * 1024, max: 256 * 1024 };
                config.readahead = 512 * 1024;
                let (cache, _) = Cache::open(config).await.unwrap();
                cache.add_origin(o.clone());
                let meta = o.stat(&p("f")).await.unwrap();
                let h = cache.open_file(o.id(), &p("f"), &meta).await.unwrap();
                for (off, n) in reads {
                    let off = if len == 0 { off % 10 } else { off % (len as u64 + 10) };
                    let got = h.read(off, n).await.unwrap();
                    let s = (off as usize).min(len);
                    let e = (off.saturating_add(n) as usize).min(len);
                    assert_eq!(&got[..], &data[s..e], "read({off}, {n}) of {len}");
                }
            });
        }
    }
}
