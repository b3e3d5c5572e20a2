//! Index operations at library scale: what opening a file (manifest
//! lookup), caching a chunk (`put_chunk`), starting the cache
//! (`chunk_records`, read once at open) and browsing (listing get/put) cost
//! in the sled index.
//!
//! `cargo bench -p musicfs-cas --bench index`. The index is on disk in a
//! temp dir and holds a 20,000-track library's worth of manifests (each 30
//! chunks, a 30 MB track) and 100,000 chunk records; a directory listing has
//! 200 entries (a big album folder or an artist with many albums).
#![allow(clippy::unwrap_used, clippy::expect_used)] // bench setup

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use musicfs_cas::index::ChunkRecord;
use musicfs_cas::{ChunkId, ChunkRef, FileVersion, Index, Listing, Manifest};
use musicfs_origins::{DirEntry, EntryKind, EntryMeta, OriginId, OriginPath};

const TRACKS: usize = 20_000;
const CHUNKS_PER_TRACK: usize = 30;
const CHUNK_RECORDS: usize = 100_000;
const LISTING_ENTRIES: usize = 200;

fn track_path(i: usize) -> OriginPath {
    OriginPath::new(&format!(
        "Artist {:03}/Album {:02}/{:02} - Track title number {i}.flac",
        i / 100,
        (i / 10) % 10,
        i % 10
    ))
    .unwrap()
}

fn manifest(i: usize) -> Manifest {
    let len = 1u32 << 20;
    let mut m = Manifest::new(FileVersion {
        size: u64::from(len) * CHUNKS_PER_TRACK as u64,
        mtime_ns: Some(1_700_000_000_000_000_000 + i as i64),
        etag: None,
    });
    for c in 0..CHUNKS_PER_TRACK {
        let id = ChunkId::of(format!("{i}/{c}").as_bytes());
        m.push(ChunkRef { id, len }).unwrap();
    }
    m
}

fn listing(n: usize) -> Listing {
    Listing {
        fetched_at_ns: 1_700_000_000_000_000_000,
        entries: (0..n)
            .map(|i| {
                DirEntry::new(
                    format!("{i:03} - A track with a realistic title.flac"),
                    EntryMeta {
                        kind: EntryKind::File,
                        size: 30_000_000 + i as u64,
                        mtime_ns: Some(1_700_000_000_000_000_000),
                        etag: None,
                    },
                )
            })
            .collect(),
    }
}

fn index(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let (idx, _) = Index::open(&dir.path().join("index.sled")).unwrap();
    let origin = OriginId::new("nas").unwrap();
    for i in 0..TRACKS {
        idx.put_manifest(&origin, &track_path(i), &manifest(i))
            .unwrap();
    }
    for i in 0..CHUNK_RECORDS {
        idx.put_chunk(
            &ChunkId::of(&(i as u64).to_le_bytes()),
            ChunkRecord {
                size: 1 << 20,
                atime_ns: i as u64,
            },
        )
        .unwrap();
    }
    let albums: Vec<OriginPath> = (0..TRACKS / 10)
        .map(|a| OriginPath::new(&format!("Artist {:03}/Album {:02}", a / 10, a % 10)).unwrap())
        .collect();
    let album_listing = listing(LISTING_ENTRIES);
    for a in &albums {
        idx.put_listing(&origin, a, &album_listing).unwrap();
    }
    idx.flush().unwrap();

    let mut g = c.benchmark_group("index");
    g.sample_size(30);
    g.measurement_time(Duration::from_secs(3));
    g.warm_up_time(Duration::from_secs(1));

    // Read once at every cache open (the store reconciles it with the chunk
    // files): time per 100,000 records.
    g.sample_size(10);
    g.throughput(Throughput::Elements(CHUNK_RECORDS as u64));
    g.bench_function(BenchmarkId::new("chunk-records", "100k"), |b| {
        b.iter(|| idx.chunk_records().unwrap().len())
    });
    g.sample_size(30);
    g.throughput(Throughput::Elements(1));

    // What `open` costs before any byte moves: find and decode one manifest
    // of 20,000 (30 chunks each).
    let mut i = 0;
    g.bench_function(BenchmarkId::new("manifest-lookup", "20k-tracks"), |b| {
        b.iter(|| {
            i = (i + 7919) % TRACKS;
            idx.manifest(&origin, &track_path(i)).unwrap().unwrap()
        })
    });
    // What ingest costs per stored chunk: the manifest grows by one chunk
    // and is written back whole.
    let grown = manifest(TRACKS + 1);
    let grown_path = track_path(TRACKS + 1);
    g.bench_function(BenchmarkId::new("put-manifest", "30-chunks"), |b| {
        b.iter(|| idx.put_manifest(&origin, &grown_path, &grown).unwrap())
    });
    // New chunks: ids past the ones set up above.
    let mut n = CHUNK_RECORDS as u64;
    g.bench_function("put-chunk", |b| {
        b.iter(|| {
            n += 1;
            idx.put_chunk(
                &ChunkId::of(&n.to_le_bytes()),
                ChunkRecord {
                    size: 1 << 20,
                    atime_ns: n,
                },
            )
            .unwrap()
        })
    });
    let mut a = 0;
    g.throughput(Throughput::Elements(LISTING_ENTRIES as u64));
    g.bench_function(BenchmarkId::new("listing-get", "200-entries"), |b| {
        b.iter(|| {
            a = (a + 13) % albums.len();
            idx.listing(&origin, &albums[a]).unwrap().unwrap()
        })
    });
    g.bench_function(BenchmarkId::new("listing-put", "200-entries"), |b| {
        b.iter(|| {
            a = (a + 13) % albums.len();
            idx.put_listing(&origin, &albums[a], &album_listing)
                .unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, index);
criterion_main!(benches);
