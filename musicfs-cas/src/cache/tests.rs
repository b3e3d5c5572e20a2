//! Unit tests of the cache read path: versions, ingest, verified reads.

use super::*;
use crate::ChunkId;
use musicfs_origins::Origin;
use musicfs_test_utils::{pseudo_random_bytes, Fault, FaultyOrigin, MemOrigin, Ops};

const MIB: u64 = 1 << 20;
const TRACK: &str = "Album/01 - Track.flac";

fn path() -> OriginPath {
    OriginPath::new(TRACK).unwrap()
}

/// A cache over one in-memory track of `len` pseudo-random bytes,
/// behind a FaultyOrigin (no fault yet).
async fn setup(dir: &std::path::Path, len: usize) -> (Cache, Arc<FaultyOrigin>, Bytes) {
    let data = Bytes::from(pseudo_random_bytes(len, 7));
    let mem = MemOrigin::new(OriginId::new("lib").unwrap());
    mem.put(TRACK, data.clone());
    let faulty = FaultyOrigin::new(mem);
    let (cache, _) = Cache::open(CacheConfig::new(dir, 1 << 30)).await.unwrap();
    cache.add_origin(faulty.clone());
    (cache, faulty, data)
}

async fn open(cache: &Cache, origin: &Arc<FaultyOrigin>) -> FileHandle {
    let meta = origin.stat(&path()).await.unwrap();
    cache.open_file(origin.id(), &path(), &meta).await.unwrap()
}

/// Waits (bounded) until the track's manifest covers the whole file.
async fn wait_complete(cache: &Cache, origin: &Arc<FaultyOrigin>) -> Manifest {
    for _ in 0..500 {
        if let Some(m) = cache.index().manifest(origin.id(), &path()).unwrap() {
            if m.is_complete() {
                return m;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the track never became fully cached");
}

/// Reads the whole track sequentially in 1 MiB reads.
async fn read_through(h: &FileHandle, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    while (out.len() as u64) < h.size() {
        out.extend_from_slice(&h.read(out.len() as u64, MIB).await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_track_read_to_the_end_and_closed_at_once_is_fully_cached() {
    let dir = tempfile::tempdir().unwrap();
    let len = 13 * MIB as usize + 12_345;
    let (cache, origin, data) = setup(dir.path(), len).await;
    let h = open(&cache, &origin).await;
    assert_eq!(read_through(&h, len).await, data);
    // The last bytes were served from the ingest buffer; closing must
    // not lose them.
    drop(h);
    let m = wait_complete(&cache, &origin).await;
    assert_eq!(m.covered(), len as u64);
    assert_eq!(origin.stats().bytes_served, len as u64, "read twice");
}

/// The kernel's read-ahead sends requests several MiB past what a
/// reader consumed; when the ingest lags, those land past the wait
/// window. They must not leave the ingest behind: the file still ends
/// up fully cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_that_run_ahead_of_the_ingest_keep_it_going() {
    let dir = tempfile::tempdir().unwrap();
    let len = 40 * MIB as usize;
    let (cache, origin, data) = setup(dir.path(), len).await;
    origin.set_fault_on(Ops::READ, Fault::TimeoutMs(5));
    let h = open(&cache, &origin).await;
    // Windows of 8 concurrent 1 MiB requests, each window starting
    // where the previous one ended.
    let mut off = 0u64;
    while off < len as u64 {
        let reads: Vec<_> = (0..8)
            .map(|i| {
                let h = h.clone();
                tokio::spawn(async move { (off + i * MIB, h.read(off + i * MIB, MIB).await) })
            })
            .collect();
        for r in reads {
            let (at, got) = r.await.unwrap();
            let got = got.unwrap();
            let at = at as usize;
            assert_eq!(&got[..], &data[at.min(len)..(at + MIB as usize).min(len)]);
        }
        off += 8 * MIB;
    }
    wait_complete(&cache, &origin).await;
    drop(h);
}

/// What a tagger does to a track being played: rewrite it in place,
/// same size, new bytes, new mtime. The open handle serves bytes of the
/// version it opened and then an error, never the new bytes; a new open
/// gets exactly the new file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_rewritten_while_read_never_mixes_versions() {
    let dir = tempfile::tempdir().unwrap();
    let len = 24 * MIB as usize;
    let old = Bytes::from(pseudo_random_bytes(len, 7));
    let new = Bytes::from(pseudo_random_bytes(len, 8));
    let mem = MemOrigin::new(OriginId::new("lib").unwrap());
    mem.put(TRACK, old.clone());
    let origin = FaultyOrigin::new(mem.clone());
    let (cache, _) = Cache::open(CacheConfig::new(dir.path(), 1 << 30))
        .await
        .unwrap();
    cache.add_origin(origin.clone());

    let h = open(&cache, &origin).await;
    let head = h.read(0, 2 * MIB).await.unwrap();
    assert_eq!(&head[..], &old[..2 * MIB as usize]);
    mem.put(TRACK, new.clone());

    let mut failed = None;
    let mut off = 2 * MIB;
    while off < len as u64 {
        match h.read(off, MIB).await {
            Ok(got) => {
                assert!(failed.is_none(), "bytes served after the handle failed");
                let at = off as usize;
                assert_eq!(
                    &got[..],
                    &old[at..at + got.len()],
                    "bytes of another version at {off}"
                );
            }
            Err(e) => {
                assert!(matches!(e, CasError::OriginChanged { .. }), "{e}");
                failed.get_or_insert(off);
            }
        }
        off += MIB;
    }
    // 24 MiB with 16 MiB of read-ahead: the end was not read before the
    // change, so the handle must have ended with the error.
    assert!(failed.is_some(), "the change went unnoticed");
    drop(h);
    let now = origin.stat(&path()).await.unwrap().version();
    let stored = cache.index().manifest(origin.id(), &path()).unwrap();
    assert!(
        stored.is_none_or(|m| m.version == now),
        "a manifest of the old version survived"
    );

    let h = open(&cache, &origin).await;
    assert_eq!(read_through(&h, len).await, new);
    drop(h);
    let m = wait_complete(&cache, &origin).await;
    assert_eq!(m.version, origin.stat(&path()).await.unwrap().version());
}

/// A track deleted on the origin while a handle reads it: the handle gets
/// bytes of its version and then `OriginChanged` (ESTALE at the mount),
/// not "no such file" -- the file it opened is gone, as after a rewrite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_deleted_while_read_ends_its_reads_as_changed() {
    let dir = tempfile::tempdir().unwrap();
    let len = 24 * MIB as usize;
    let old = Bytes::from(pseudo_random_bytes(len, 7));
    let mem = MemOrigin::new(OriginId::new("lib").unwrap());
    mem.put(TRACK, old.clone());
    let origin = FaultyOrigin::new(mem.clone());
    let (cache, _) = Cache::open(CacheConfig::new(dir.path(), 1 << 30))
        .await
        .unwrap();
    cache.add_origin(origin.clone());

    let h = open(&cache, &origin).await;
    let head = h.read(0, 2 * MIB).await.unwrap();
    assert_eq!(&head[..], &old[..2 * MIB as usize]);
    mem.remove(TRACK);

    let mut failed = None;
    let mut off = 2 * MIB;
    while off < len as u64 {
        match h.read(off, MIB).await {
            Ok(got) => {
                assert!(failed.is_none(), "bytes served after the handle failed");
                let at = off as usize;
                assert_eq!(&got[..], &old[at..at + got.len()]);
            }
            Err(e) => {
                assert!(matches!(e, CasError::OriginChanged { .. }), "{e}");
                failed.get_or_insert(off);
            }
        }
        off += MIB;
    }
    // 24 MiB with 16 MiB of read-ahead: the end was not read before the
    // delete, so the handle must have ended with the error.
    assert!(failed.is_some(), "the delete went unnoticed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_reads_without_the_runtime_serve_exact_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let len = 9 * MIB as usize + 777;
    let (cache, origin, data) = setup(dir.path(), len).await;
    let h = open(&cache, &origin).await;
    // Partly cached: the blocking path declines, the async one serves.
    h.read(0, 64 * 1024).await.unwrap();
    assert!(h.read_cached_blocking(0, 4096).is_none());
    read_through(&h, len).await;
    drop(h);
    wait_complete(&cache, &origin).await;

    let h = open(&cache, &origin).await;
    origin.reset_stats();
    let (a, b) = (h.clone(), data.clone());
    tokio::task::spawn_blocking(move || {
        // Whole 1 MiB requests (building trees), then small reads at
        // odd places (served through the trees), and the end of file.
        for off in (0..len as u64).step_by(MIB as usize) {
            let got = a.read_cached_blocking(off, MIB).unwrap();
            let off = off as usize;
            assert_eq!(&got[..], &b[off..(off + MIB as usize).min(len)]);
        }
        for off in [0u64, 4095, 1_000_001, 5 * MIB - 3, len as u64 - 10] {
            let got = a.read_cached_blocking(off, 4096).unwrap();
            let off = off as usize;
            assert_eq!(&got[..], &b[off..(off + 4096).min(len)]);
        }
        assert!(a.read_cached_blocking(len as u64, 10).unwrap().is_empty());
    })
    .await
    .unwrap();
    assert_eq!(
        origin.stats().read_calls,
        0,
        "a cached read asked the origin"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_chunk_is_never_served_from_its_tree_and_gets_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let len = 9 * MIB as usize;
    let (cache, origin, data) = setup(dir.path(), len).await;
    let h = open(&cache, &origin).await;
    read_through(&h, len).await;
    drop(h);
    let m = wait_complete(&cache, &origin).await;
    let (start, victim) = (m.chunks()[0].len as usize, m.chunks()[1]);
    // Trees of every chunk are built by reading them whole once.
    let h = open(&cache, &origin).await;
    read_through(&h, len).await;
    drop(h);

    let file = cache.store().chunk_path(&victim.id);
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[100_000] ^= 0x40;
    std::fs::write(&file, &bytes).unwrap();

    let h = open(&cache, &origin).await;
    let hit = (start + 100_000) as u64;
    let b = h.clone();
    // Groups of the chunk away from the damage still check; the one
    // with the damage does not, and then the chunk is distrusted whole.
    let (intact, damaged, after) = tokio::task::spawn_blocking(move || {
        (
            b.read_cached_blocking(hit + 200_000, 4096),
            b.read_cached_blocking(hit - 10, 20),
            b.read_cached_blocking(hit + 200_000, 4096),
        )
    })
    .await
    .unwrap();
    let at = (hit + 200_000) as usize;
    assert_eq!(intact.as_deref(), Some(&data[at..at + 4096]));
    assert!(damaged.is_none(), "bytes of a damaged chunk were served");
    assert!(after.is_none(), "a chunk known damaged was served");
    // The async path re-fetches the chunk and serves the right bytes.
    let got = h.read(hit - 10, 20).await.unwrap();
    assert_eq!(&got[..], &data[hit as usize - 10..hit as usize + 10]);
    assert_eq!(cache.stats().refetched_chunks, 1);
    assert_eq!(
        ChunkId::of(&std::fs::read(&file).unwrap()),
        victim.id,
        "chunk healed on disk"
    );
}
