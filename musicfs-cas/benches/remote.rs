//! Cold sequential reads over a long link: what a remote origin (S3,
//! WebDAV, SFTP) costs per byte when every origin call waits a round trip.
//!
//! `cargo bench -p musicfs-cas --bench remote` reports MB/s for a 32 MiB
//! incompressible track read cold through `Cache` in 1 MiB reads, one after
//! another as a player's reads arrive, from a [`MemOrigin`] behind a
//! [`FaultyOrigin`] whose every call waits 50 ms:
//! - `rtt50ms`: latency only (an unlimited pipe): how many bytes the cache
//!   keeps in flight per round trip decides the rate;
//! - `rtt50ms-link100MBps`: the same round trip on a 100 MB/s pipe that all
//!   calls in flight share (`Fault::Link`): the rate should approach it.
//!
//! Each case reads a new track of one origin through one cache per
//! iteration, so what the cache learned of the link from the tracks before
//! is kept (a library played track after track); `first-track` reads the
//! first track of a fresh cache and origin each iteration (nothing known of
//! the link yet). Sleeps are real: these run in wall-clock time.
#![allow(clippy::unwrap_used, clippy::expect_used)] // bench setup

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use musicfs_cas::{Cache, CacheConfig};
use musicfs_origins::{Origin, OriginId, OriginPath};
use musicfs_test_utils::{pseudo_random_bytes, Fault, FaultyOrigin, MemOrigin};

const LEN: usize = 32 << 20;
const READ: u64 = 1 << 20;

const CASES: [(&str, Fault); 2] = [
    (
        "rtt50ms",
        Fault::Bandwidth {
            bytes_per_sec: 0,
            latency_ms: 50,
        },
    ),
    (
        "rtt50ms-link100MBps",
        Fault::Link {
            bytes_per_sec: 100_000_000,
            latency_ms: 50,
        },
    ),
];

struct Setup {
    cache: Cache,
    mem: Arc<MemOrigin>,
    origin: Arc<FaultyOrigin>,
    _dir: tempfile::TempDir,
}

async fn setup(fault: &Fault) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let (cache, _) = Cache::open(CacheConfig::new(dir.path(), 1 << 40))
        .await
        .unwrap();
    let mem = MemOrigin::new(OriginId::new("remote").unwrap());
    let origin = FaultyOrigin::new(mem.clone());
    origin.set_fault_on(musicfs_test_utils::Ops::READ, fault.clone());
    cache.add_origin(origin.clone());
    Setup {
        cache,
        mem,
        origin,
        _dir: dir,
    }
}

/// Reads `path` from its start to its end, cold, and checks the length.
async fn read_cold(s: &Setup, path: &OriginPath) {
    let meta = s.origin.inner().stat(path).await.unwrap();
    let h = s.cache.open_file(s.origin.id(), path, &meta).await.unwrap();
    let mut off = 0;
    while off < LEN as u64 {
        off += h.read(off, READ).await.unwrap().len() as u64;
    }
    assert_eq!(off, LEN as u64);
}

fn remote(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("remote-cold-seq");
    g.throughput(Throughput::Bytes(LEN as u64));
    g.sample_size(10);
    let seed = AtomicU64::new(1);
    // A new track each time: the same bytes would be cached already.
    let track = |s: &Setup| {
        let n = seed.fetch_add(1, Ordering::Relaxed);
        let name = format!("track-{n}.flac");
        s.mem.put(&name, Bytes::from(pseudo_random_bytes(LEN, n)));
        OriginPath::new(&name).unwrap()
    };
    for (name, fault) in &CASES {
        let s = rt.block_on(setup(fault));
        g.bench_function(BenchmarkId::new("next-track", name), |b| {
            b.iter_batched(
                || track(&s),
                |path| rt.block_on(read_cold(&s, &path)),
                criterion::BatchSize::PerIteration,
            )
        });
        g.bench_function(BenchmarkId::new("first-track", name), |b| {
            b.iter_batched(
                || {
                    let s = rt.block_on(setup(fault));
                    let path = track(&s);
                    (s, path)
                },
                |(s, path)| {
                    rt.block_on(read_cold(&s, &path));
                    s
                },
                criterion::BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, remote);
criterion_main!(benches);
