//! The cache's read path on a cached track, without FUSE: what one kernel
//! read request costs MusicFS once the track is in the chunk cache.
//!
//! `cargo bench -p musicfs-cas --bench read` reports, for a 64 MiB track
//! already ingested (chunk files in the page cache, a fresh `Cache` so no
//! in-memory state of the ingest is left):
//! - a whole sequential pass in 128 KiB requests (the kernel's default FUSE
//!   read size) and in 1 MiB requests (what MusicFS mounts ask for),
//! - 4 KiB reads at random offsets (a seek, fio's random-read test),
//!
//! each through the async read path (`FileHandle::read`, a task on the
//! runtime) and through the blocking fast path the filesystem uses for
//! fully cached files (`FileHandle::read_cached_blocking`, on the caller's
//! thread).
//!
//! Every byte served from a chunk is verified (against the chunk's name,
//! or, for small reads, against the chunk's BLAKE3 tree), so these figures
//! include BLAKE3 over whatever the read path has to hash.
#![allow(clippy::unwrap_used, clippy::expect_used)] // bench setup

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use musicfs_cas::{Cache, CacheConfig, FileHandle};
use musicfs_origins::{DynOrigin, OriginId, OriginPath};
use musicfs_test_utils::{pseudo_random_bytes, MemOrigin};

const LEN: u64 = 64 << 20;

/// A cache dir holding the whole track, and a handle opened on a fresh
/// `Cache` over it.
async fn cached_track(dir: &std::path::Path) -> (Cache, FileHandle) {
    let mem = MemOrigin::new(OriginId::new("lib").unwrap());
    mem.put(
        "track.flac",
        Bytes::from(pseudo_random_bytes(LEN as usize, 3)),
    );
    let origin: DynOrigin = mem;
    let path = OriginPath::new("track.flac").unwrap();
    let meta = origin.stat(&path).await.unwrap();
    {
        let (cache, _) = Cache::open(CacheConfig::new(dir, 1 << 40)).await.unwrap();
        cache.add_origin(Arc::clone(&origin));
        let h = cache.open_file(origin.id(), &path, &meta).await.unwrap();
        let mut off = 0;
        while off < LEN {
            off += h.read(off, 1 << 20).await.unwrap().len() as u64;
        }
        // The last bytes may have been served from the ingest buffer: wait
        // until the ingest has stored every chunk.
        while !cache
            .index()
            .manifest(origin.id(), &path)
            .unwrap()
            .is_some_and(|m| m.is_complete())
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(h);
        cache.flush().await.unwrap();
    }
    let (cache, _) = Cache::open(CacheConfig::new(dir, 1 << 40)).await.unwrap();
    cache.add_origin(Arc::clone(&origin));
    let h = cache.open_file(origin.id(), &path, &meta).await.unwrap();
    (cache, h)
}

fn read(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cache, h) = rt.block_on(cached_track(dir.path()));
    let mut g = c.benchmark_group("read-cached");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(5));
    g.warm_up_time(Duration::from_secs(1));
    g.throughput(Throughput::Bytes(LEN));
    for (label, req) in [("128KiB", 128u64 << 10), ("1MiB", 1 << 20)] {
        g.bench_function(BenchmarkId::new("sequential", label), |b| {
            b.iter(|| {
                rt.block_on(async {
                    let mut off = 0;
                    while off < LEN {
                        off += h.read(off, req).await.unwrap().len() as u64;
                    }
                })
            })
        });
    }
    for (label, req) in [("128KiB", 128u64 << 10), ("1MiB", 1 << 20)] {
        g.bench_function(BenchmarkId::new("sequential-blocking", label), |b| {
            b.iter(|| {
                let mut off = 0;
                while off < LEN {
                    off += h.read_cached_blocking(off, req).unwrap().len() as u64;
                }
            })
        });
    }
    g.throughput(Throughput::Elements(1));
    g.sample_size(30);
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut next_offset = move || {
        // xorshift: a cheap, repeatable spread of offsets over the file.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % (LEN / 4096)) * 4096
    };
    g.bench_function(BenchmarkId::new("random", "4KiB"), |b| {
        b.iter(|| rt.block_on(h.read(next_offset(), 4096)).unwrap())
    });
    g.bench_function(BenchmarkId::new("random-blocking", "4KiB"), |b| {
        b.iter(|| h.read_cached_blocking(next_offset(), 4096).unwrap())
    });
    g.finish();
    let s = cache.stats();
    assert_eq!(s.origin_bytes, 0, "a cached read went to the origin: {s:?}");
}

criterion_group!(benches, read);
criterion_main!(benches);
