//! Ingest throughput: what filling the cache costs per byte on this machine.
//!
//! `cargo bench -p musicfs-cas --bench ingest` reports, for a 64 MiB
//! incompressible track: FastCDC alone, BLAKE3 alone, chunk+hash+store into
//! a fresh cache directory (the ingest's own work), and a whole cold read
//! through `Cache` from an in-memory origin (ingest plus the read path).
#![allow(clippy::unwrap_used, clippy::expect_used)] // bench setup

use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use musicfs_cas::{Cache, CacheConfig, ChunkParams, ChunkStore, Index, StoreConfig};
use musicfs_origins::{DynOrigin, OriginId, OriginPath};
use musicfs_test_utils::{pseudo_random_bytes, MemOrigin};

const LEN: usize = 64 << 20;

fn ingest(c: &mut Criterion) {
    let data = Bytes::from(pseudo_random_bytes(LEN, 1));
    let params = ChunkParams::default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("ingest");
    g.throughput(Throughput::Bytes(LEN as u64));
    g.sample_size(10);

    g.bench_function("fastcdc", |b| b.iter(|| params.cut_all(&data).len()));
    g.bench_function("blake3", |b| b.iter(|| blake3::hash(&data)));
    g.bench_function(BenchmarkId::new("chunk+hash+store", "1MiB-avg"), |b| {
        b.iter_batched(
            || tempfile::tempdir().unwrap(),
            |dir| {
                rt.block_on(async {
                    let (store, _) = ChunkStore::open(
                        StoreConfig::new(dir.path(), 1 << 40),
                        Index::temporary().unwrap(),
                    )
                    .unwrap();
                    let mut pos = 0;
                    for n in params.cut_all(&data) {
                        store.put(data.slice(pos..pos + n)).await.unwrap();
                        pos += n;
                    }
                });
                dir
            },
            criterion::BatchSize::PerIteration,
        )
    });
    g.bench_function("cold-read-through-cache", |b| {
        b.iter_batched(
            || tempfile::tempdir().unwrap(),
            |dir| {
                rt.block_on(async {
                    let mem = MemOrigin::new(OriginId::new("lib").unwrap());
                    mem.put("track.flac", data.clone());
                    let origin: DynOrigin = mem;
                    let (cache, _) = Cache::open(CacheConfig::new(dir.path(), 1 << 40))
                        .await
                        .unwrap();
                    cache.add_origin(Arc::clone(&origin));
                    let path = OriginPath::new("track.flac").unwrap();
                    let meta = origin.stat(&path).await.unwrap();
                    let h = cache.open_file(origin.id(), &path, &meta).await.unwrap();
                    let mut off = 0;
                    while off < LEN as u64 {
                        off += h.read(off, 1 << 20).await.unwrap().len() as u64;
                    }
                });
                dir
            },
            criterion::BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group!(benches, ingest);
criterion_main!(benches);
