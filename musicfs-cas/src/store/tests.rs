//! Unit tests of the chunk store.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::*;

async fn open(dir: &Path, max: u64) -> ChunkStore {
    let s = ChunkStore::open(StoreConfig::new(dir, max), Index::temporary().unwrap())
        .unwrap()
        .0;
    s.reconciled().await;
    s
}

#[tokio::test]
async fn put_get_round_trip_and_dedup() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), 1 << 20).await;
    let id = s.put(Bytes::from_static(b"chunk one")).await.unwrap();
    assert_eq!(id, ChunkId::of(b"chunk one"));
    assert!(s.chunk_path(&id).exists());
    assert_eq!(s.get(id).await.unwrap(), Bytes::from_static(b"chunk one"));
    s.put(Bytes::from_static(b"chunk one")).await.unwrap();
    assert_eq!(s.chunk_count(), 1);
    assert_eq!(s.current_size(), 9);
    assert_eq!(s.counters().dedup_hits.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn oversized_chunks_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), 100 << 20).await;
    let err = s
        .put(Bytes::from(vec![0u8; (4 << 20) + 1]))
        .await
        .unwrap_err();
    assert!(matches!(err, CasError::ChunkTooLarge { .. }), "{err}");
    assert_eq!(s.chunk_count(), 0);
    assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
}

#[tokio::test]
async fn eviction_is_lru_and_skips_pinned_chunks() {
    let dir = tempfile::tempdir().unwrap();
    // 10 KiB limit, 9 KiB low watermark, 1 KiB chunks.
    let s = open(dir.path(), 10 * 1024).await;
    let mut ids = Vec::new();
    for i in 0..10u8 {
        ids.push(s.put(Bytes::from(vec![i; 1024])).await.unwrap());
    }
    assert_eq!(s.current_size(), 10 * 1024);
    // Touch chunk 0 so chunk 1 is the oldest; pin chunk 1.
    s.get(ids[0]).await.unwrap();
    let pin = s.pin(&[ids[1]]);
    s.put(Bytes::from(vec![100u8; 1024])).await.unwrap();
    assert!(s.current_size() <= 10 * 1024 * 90 / 100 + 1024);
    assert!(s.contains(&ids[0]), "recently read chunk evicted");
    assert!(s.contains(&ids[1]), "pinned chunk evicted");
    assert!(!s.contains(&ids[2]), "oldest unpinned chunk kept");
    assert!(!s.chunk_path(&ids[2]).exists());
    drop(pin);
    assert_eq!(s.current_size(), disk_usage(&dir.path().join("chunks")));
    // 11 KiB down to 9 KiB (90 % of 10 KiB): three 1 KiB chunks.
    assert_eq!(s.counters().evicted_chunks.load(Ordering::Relaxed), 3);
}

/// A chunk chosen for eviction and put again before its unlink keeps
/// its new file, counted once.
#[tokio::test]
async fn a_put_claims_back_a_chunk_chosen_for_eviction() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), 1 << 20).await;
    let data = Bytes::from(vec![7u8; 4096]);
    let id = s.put(data.clone()).await.unwrap();
    let victims = s.inner.table.lock().take_victims(1, 10);
    assert_eq!(victims.len(), 1);
    assert!(!s.contains(&id));
    // Not known to the table any more: this put writes the file again.
    s.put(data.clone()).await.unwrap();
    assert!(
        s.inner.unlink_victim(&id).is_none(),
        "unlinked a claimed chunk"
    );
    assert_eq!(s.get(id).await.unwrap(), data);
    assert_eq!(s.current_size(), 4096);
}

#[tokio::test]
async fn corrupt_and_missing_chunks_are_reported_and_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), 1 << 20).await;
    let a = s.put(Bytes::from_static(b"aaaa")).await.unwrap();
    let b = s.put(Bytes::from_static(b"bbbb")).await.unwrap();
    fs::write(s.chunk_path(&a), b"aaab").unwrap();
    fs::remove_file(s.chunk_path(&b)).unwrap();
    assert!(matches!(s.get(a).await, Err(CasError::ChunkCorrupt { .. })));
    assert!(!s.chunk_path(&a).exists(), "corrupt file left behind");
    assert!(matches!(s.get(b).await, Err(CasError::ChunkMissing { .. })));
    assert_eq!(s.chunk_count(), 0);
    assert_eq!(s.current_size(), 0);
}

#[tokio::test]
async fn open_heals_crash_leftovers_and_rebuilds_records() {
    let dir = tempfile::tempdir().unwrap();
    let id;
    {
        let s = open(dir.path(), 1 << 20).await;
        id = s.put(Bytes::from_static(b"kept")).await.unwrap();
    }
    fs::write(dir.path().join("tmp").join("half-written.tmp"), b"par").unwrap();
    fs::write(dir.path().join("chunks").join("junk"), b"x").unwrap();
    // A fresh (empty) index: the chunk files are the truth.
    let (s, report) = ChunkStore::open(
        StoreConfig::new(dir.path(), 1 << 20),
        Index::temporary().unwrap(),
    )
    .unwrap();
    assert_eq!(report.temp_files_removed, 1);
    let report = s.reconciled().await;
    assert_eq!(report.stray_files_removed, 1);
    assert_eq!(report.index_entries_added, 1);
    assert!(s.contains(&id));
    assert_eq!(s.index().chunk_count(), 1);
    assert_eq!(s.current_size(), 4);
}

/// Reads and puts made before the background reconcile ends are right,
/// and the merge neither loses nor double-counts them.
#[tokio::test]
async fn reads_and_puts_during_the_reconcile_are_right_and_counted_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut ids = Vec::new();
    {
        let s = open(dir.path(), 1 << 20).await;
        for i in 0..50u8 {
            ids.push(s.put(Bytes::from(vec![i; 100])).await.unwrap());
        }
    }
    let (s, _) = ChunkStore::open(
        StoreConfig::new(dir.path(), 1 << 20),
        Index::temporary().unwrap(),
    )
    .unwrap();
    // Whether or not the scan has got to them yet:
    assert_eq!(s.get(ids[3]).await.unwrap(), Bytes::from(vec![3u8; 100]));
    s.put(Bytes::from(vec![200u8; 100])).await.unwrap();
    s.put(Bytes::from(vec![4u8; 100])).await.unwrap();
    fs::remove_file(s.chunk_path(&ids[5])).unwrap();
    assert!(s.get(ids[5]).await.is_err());
    let report = s.reconciled().await;
    assert!(!s.reconciling());
    assert_eq!(s.chunk_count(), 50, "{report:?}");
    assert_eq!(s.current_size(), 50 * 100);
    assert_eq!(s.current_size(), disk_usage(&dir.path().join("chunks")));
    assert!(!s.contains(&ids[5]));
}

/// A disk that stops answering: the first operation to meet the hang
/// waits at most the disk timeout; then the store is degraded and
/// refuses disk work at once, and recovers when the stuck call returns.
/// (The hang is injected: every disk operation first waits.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_disk_is_noticed_bypassed_and_recovered_from() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = StoreConfig::new(dir.path(), 1 << 20);
    config.disk_timeout = Duration::from_millis(200);
    let (s, _) = ChunkStore::open(config, Index::temporary().unwrap()).unwrap();
    s.reconciled().await;
    let id = s.put(Bytes::from_static(b"cached")).await.unwrap();
    s.inject_disk_hang(true);
    // Released however the test ends, so a failed assertion fails the
    // test instead of hanging the runtime's shutdown.
    struct Unhang(ChunkStore);
    impl Drop for Unhang {
        fn drop(&mut self) {
            self.0.inject_disk_hang(false);
        }
    }
    let _unhang = Unhang(s.clone());
    let err = s.get(id).await.unwrap_err();
    assert!(matches!(err, CasError::CacheUnavailable { .. }), "{err}");
    // The timed-out read is still stuck on the disk: that is the sign.
    assert!(s.not_answering());
    let why = s.degraded().unwrap();
    assert!(why.contains("not answering"), "{why}");
    // Now refused at once, on both paths, without touching the disk.
    assert!(matches!(
        s.read_unverified_now(id, 0, 6),
        Err(CasError::CacheUnavailable { .. })
    ));
    assert!(matches!(
        s.put(Bytes::from_static(b"new")).await,
        Err(CasError::CacheUnavailable { .. })
    ));
    // The disk answers again: the stuck read returns, the store is
    // healthy without anyone probing it.
    s.inject_disk_hang(false);
    let deadline = Instant::now() + Duration::from_secs(60);
    while s.not_answering() {
        assert!(Instant::now() < deadline, "never recovered");
        tokio::task::yield_now().await;
    }
    assert_eq!(s.degraded(), None);
    assert_eq!(s.get(id).await.unwrap(), Bytes::from_static(b"cached"));
}

#[tokio::test]
async fn manifests_without_any_stored_chunk_are_swept() {
    use crate::manifest::{ChunkRef, FileVersion, Manifest};
    use musicfs_origins::{OriginId, OriginPath};
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), 1 << 20).await;
    let kept = s.put(Bytes::from_static(b"kept")).await.unwrap();
    let o = OriginId::new("lib").unwrap();
    let manifest = |ids: &[ChunkId]| {
        let mut m = Manifest::new(FileVersion {
            size: 4 * ids.len() as u64,
            mtime_ns: Some(1),
            etag: None,
        });
        for id in ids {
            m.push(ChunkRef { id: *id, len: 4 }).unwrap();
        }
        m
    };
    let gone = ChunkId::of(b"gone");
    let (a, b) = (OriginPath::new("a").unwrap(), OriginPath::new("b").unwrap());
    s.index()
        .put_manifest(&o, &a, &manifest(&[gone, kept]))
        .unwrap();
    s.index().put_manifest(&o, &b, &manifest(&[gone])).unwrap();
    assert_eq!(s.index().manifest_count(), 2);
    assert_eq!(s.sweep_manifests().await, 1);
    assert!(s.index().manifest(&o, &a).unwrap().is_some());
    assert!(s.index().manifest(&o, &b).unwrap().is_none());
    assert_eq!(s.index().manifest_count(), 1);
}

/// The index's disk use counts against the cache size.
#[tokio::test]
async fn eviction_keeps_chunks_and_index_within_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let (index, _) = Index::open(&dir.path().join("index.sled")).unwrap();
    index.flush().unwrap();
    let index_bytes = reconcile::dir_blocks(&dir.path().join("index.sled"));
    assert!(index_bytes > 0);
    // Room for the index (with slack for its growth) and 64 KiB.
    let limit = index_bytes + (1 << 20) + 64 * 1024;
    let (s, _) = ChunkStore::open(StoreConfig::new(dir.path(), limit), index).unwrap();
    s.reconciled().await;
    for i in 0..60u8 {
        s.put(Bytes::from(vec![i; 1024])).await.unwrap();
    }
    s.index().flush().unwrap();
    s.upkeep_now().await;
    assert!(s.index_size() > 0);
    assert!(
        s.current_size() + s.index_size() <= limit,
        "{} + {} > {limit}",
        s.current_size(),
        s.index_size()
    );
}
