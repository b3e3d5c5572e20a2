//! Cached-read latency during a large eviction, against the same read with
//! no eviction running.
//!
//! `cargo bench -p musicfs-cas --bench evict`
//!
//! The store holds 20,000 small chunks and one 256 KiB "playing" chunk.
//! A read pins the chunk (the table lock every read needs) and reads it
//! verified (`ChunkStore::get`). In `during-eviction`, each sample first
//! refills the 20,000 chunks (not timed), then a put that passes the limit
//! starts an eviction of all 20,000 on another thread, and only the reads
//! made while that eviction runs are timed: criterion's figure is their
//! mean. At the end the tail (p50, p99, max over all samples) of both cases
//! is printed, since a stall shows in the tail first.
#![allow(clippy::unwrap_used, clippy::expect_used)] // bench setup

use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use musicfs_cas::{ChunkId, ChunkStore, Index, StoreConfig};
use musicfs_test_utils::pseudo_random_bytes;

const FILLER: usize = 20_000;
const FILLER_SIZE: usize = 4096;
const HOT_SIZE: usize = 256 << 10;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn percentiles(label: &str, v: &mut [Duration]) {
    if v.is_empty() {
        return;
    }
    v.sort_unstable();
    let at = |q: f64| v[((v.len() - 1) as f64 * q) as usize];
    println!(
        "evict/{label}: {} reads: p50 {:?}, p99 {:?}, max {:?}",
        v.len(),
        at(0.5),
        at(0.99),
        v[v.len() - 1]
    );
}

fn evict(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    // The low watermark (1 %) leaves room for little more than the playing
    // chunk, so an eviction removes about all 20,000 fillers.
    let mut config = StoreConfig::new(
        dir.path(),
        (FILLER * FILLER_SIZE + HOT_SIZE + FILLER_SIZE) as u64,
    );
    config.low_watermark_pct = 1;
    let (s, _) = ChunkStore::open(config, Index::temporary().unwrap()).unwrap();
    rt.block_on(s.reconciled());
    let max = s.max_size();
    let mut seed = 1u64;
    // Fills up to just under the limit: the next put evicts the fillers.
    let mut refill = |s: &ChunkStore| {
        while s.current_size() + 2 * FILLER_SIZE as u64 <= max {
            seed += 1;
            let mut b = seed.to_le_bytes().to_vec();
            b.resize(FILLER_SIZE, 0xA5);
            rt.block_on(s.put(Bytes::from(b))).unwrap();
        }
    };
    let hot = rt
        .block_on(s.put(Bytes::from(pseudo_random_bytes(HOT_SIZE, 3))))
        .unwrap();
    // The playing track holds its chunk for the whole run (as an open
    // file's read in flight would); each read pins it again, which is the
    // table lock an eviction must not hold for long.
    let _playing = s.pin(&[hot]);
    let read = |s: &ChunkStore, id: ChunkId| {
        let _pin = s.pin(&[id]);
        let got = rt.block_on(s.get(id)).unwrap();
        assert_eq!(got.len(), HOT_SIZE);
    };

    let mut g = c.benchmark_group("evict");
    g.sample_size(10);
    g.warm_up_time(Duration::from_secs(1));
    g.measurement_time(Duration::from_secs(5));

    let idle = Mutex::new(Vec::new());
    g.bench_function("cached-read/idle", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let t = Instant::now();
                read(&s, hot);
                let d = t.elapsed();
                idle.lock().unwrap().push(d);
                total += d;
            }
            total
        })
    });

    let during = Mutex::new(Vec::new());
    let evicted_per_sample = Mutex::new(Vec::new());
    let mut sample = 0u64;
    g.bench_function("cached-read/during-eviction-of-20000", |b| {
        b.iter_custom(|iters| {
            refill(&s);
            let before = s
                .counters()
                .evicted_chunks
                .load(std::sync::atomic::Ordering::Relaxed);
            sample += 1;
            let evictor = {
                let s = s.clone();
                let handle = rt.handle().clone();
                // New bytes (a known chunk would only be touched), and more
                // than the room the refill left: this put passes the limit
                // and evicts all fillers, on this thread.
                let mut extra = vec![0x5Au8; 2 * FILLER_SIZE];
                extra[..8].copy_from_slice(&sample.to_le_bytes());
                std::thread::spawn(move || {
                    handle.block_on(s.put(Bytes::from(extra))).unwrap();
                })
            };
            let mut lat = Vec::new();
            while !evictor.is_finished() {
                let t = Instant::now();
                read(&s, hot);
                lat.push(t.elapsed());
            }
            evictor.join().unwrap();
            let after = s
                .counters()
                .evicted_chunks
                .load(std::sync::atomic::Ordering::Relaxed);
            evicted_per_sample.lock().unwrap().push(after - before);
            assert!(s.contains(&hot), "the playing chunk was evicted");
            let sum: Duration = lat.iter().sum();
            let n = lat.len().max(1) as u32;
            during.lock().unwrap().extend(lat);
            // The mean read during the eviction, as `iters` reads.
            sum / n * iters as u32
        })
    });
    g.finish();
    let ev = evicted_per_sample.lock().unwrap();
    println!(
        "evict: chunks evicted per sample: min {:?}, max {:?}",
        ev.iter().min(),
        ev.iter().max()
    );
    percentiles("idle", &mut idle.lock().unwrap());
    percentiles("during-eviction", &mut during.lock().unwrap());
}

criterion_group!(benches, evict);
criterion_main!(benches);
