//! Chunk store cost per chunk: what a cache miss (put) and a cache hit (get,
//! which reads the whole chunk file and hashes it against its name) cost on
//! this machine, at the average chunk size (1 MiB) and at the minimum
//! (256 KiB).
//!
//! `cargo bench -p musicfs-cas --bench store`. The chunk files live in a
//! temp dir on the same disk as the cache would; gets read them from the
//! page cache (the warm case: a chunk read back soon after it was cached),
//! so the figure is the store's own cost (open, read, BLAKE3, bookkeeping),
//! not the disk's.
#![allow(clippy::unwrap_used, clippy::expect_used)] // bench setup

use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use musicfs_cas::{ChunkStore, Index, StoreConfig};
use musicfs_test_utils::pseudo_random_bytes;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn store(c: &mut Criterion) {
    let rt = runtime();
    let mut g = c.benchmark_group("store");
    g.sample_size(20);
    g.measurement_time(Duration::from_secs(3));
    g.warm_up_time(Duration::from_secs(1));
    for (label, size) in [("256KiB", 256usize << 10), ("1MiB", 1 << 20)] {
        g.throughput(Throughput::Bytes(size as u64));
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = ChunkStore::open(
            StoreConfig::new(dir.path(), 1 << 40),
            Index::temporary().unwrap(),
        )
        .unwrap();

        // A put of new bytes: hash, write a temp file, rename into place,
        // record it. Each iteration stores a distinct chunk.
        let mut seed = 1_000u64;
        g.bench_function(BenchmarkId::new("put-new", label), |b| {
            b.iter_batched(
                || {
                    seed += 1;
                    Bytes::from(pseudo_random_bytes(size, seed))
                },
                |data| rt.block_on(s.put(data)).unwrap(),
                criterion::BatchSize::SmallInput,
            )
        });

        // A put of bytes already stored (dedup): hash plus a stat.
        let known = Bytes::from(pseudo_random_bytes(size, 7));
        rt.block_on(s.put(known.clone())).unwrap();
        g.bench_function(BenchmarkId::new("put-dedup", label), |b| {
            b.iter(|| rt.block_on(s.put(known.clone())).unwrap())
        });

        // A get: read the file, verify it hashes to its name.
        let ids: Vec<_> = (0..32u64)
            .map(|i| {
                rt.block_on(s.put(Bytes::from(pseudo_random_bytes(size, 50 + i))))
                    .unwrap()
            })
            .collect();
        let mut i = 0;
        g.bench_function(BenchmarkId::new("get-verified", label), |b| {
            b.iter(|| {
                i = (i + 1) % ids.len();
                rt.block_on(s.get(ids[i])).unwrap()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, store);
criterion_main!(benches);
