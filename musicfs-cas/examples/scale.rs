//! Startup at scale: fills a cache directory with many tiny valid chunk
//! files, their index records and manifests, then times opening it.
//!
//! ```sh
//! cargo run --release -p musicfs-cas --example scale -- fill /tmp/big 200000
//! cargo run --release -p musicfs-cas --example scale -- open /tmp/big          # warm dentries
//! cargo run --release -p musicfs-cas --example scale -- open /tmp/big --cold   # drop_caches first (root)
//! ```
//!
//! `open` prints how long `Cache::open` took to return (what the mount
//! waits for before it mounts) and how long the background reconcile (the
//! shard scan and the index check) took after that. `scripts/mount-ready`
//! times a whole `musicfs mount` over a cache filled this way.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a measuring tool: a failure is a failed run

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use musicfs_cas::index::ChunkRecord;
use musicfs_cas::{Cache, CacheConfig, ChunkId, ChunkRef, FileVersion, Index, Manifest};
use musicfs_origins::{OriginId, OriginPath};

/// Chunks per manifest: a 7 MB track at 1 MiB average chunks.
const PER_FILE: u64 = 8;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("fill") if args.len() == 3 => fill(Path::new(&args[1]), args[2].parse().unwrap()),
        Some("open") if args.len() >= 2 => {
            open(PathBuf::from(&args[1]), args.iter().any(|a| a == "--cold"))
        }
        _ => {
            eprintln!("usage: scale fill DIR N | scale open DIR [--cold]");
            std::process::exit(2);
        }
    }
}

fn fill(dir: &Path, n: u64) {
    let started = Instant::now();
    let chunks = dir.join("chunks");
    let (index, _) = Index::open(&dir.join("index.sled")).unwrap();
    let origin = OriginId::new("lib").unwrap();
    let mut made_dirs = std::collections::HashSet::new();
    let mut refs = Vec::new();
    for i in 0..n {
        let data = format!("musicfs scale chunk {i:012}");
        let id = ChunkId::of(data.as_bytes());
        let hex = id.to_hex();
        let shard = chunks.join(&hex[0..2]).join(&hex[2..4]);
        if made_dirs.insert(shard.clone()) {
            std::fs::create_dir_all(&shard).unwrap();
        }
        std::fs::write(shard.join(&hex), data.as_bytes()).unwrap();
        index
            .put_chunk(
                &id,
                ChunkRecord {
                    size: data.len() as u64,
                    atime_ns: 1_700_000_000_000_000_000 + i,
                },
            )
            .unwrap();
        refs.push(ChunkRef {
            id,
            len: data.len() as u32,
        });
        if refs.len() as u64 == PER_FILE || i + 1 == n {
            let size = refs.iter().map(|r| u64::from(r.len)).sum();
            let mut m = Manifest::new(FileVersion {
                size,
                mtime_ns: Some(1),
                etag: None,
            });
            for r in refs.drain(..) {
                m.push(r).unwrap();
            }
            let path = OriginPath::new(&format!("Artist {}/Track {i}.flac", i / 1000)).unwrap();
            index.put_manifest(&origin, &path, &m).unwrap();
        }
        if i % 20_000 == 0 && i > 0 {
            eprintln!("{i} chunks ({:.1?})", started.elapsed());
        }
    }
    index.flush().unwrap();
    println!(
        "filled {} with {n} chunks and {} manifests in {:.1?}",
        dir.display(),
        n.div_ceil(PER_FILE),
        started.elapsed()
    );
}

fn open(dir: PathBuf, cold: bool) {
    if cold {
        // Dentries, inodes and pages of the cache dir out of memory, as
        // after a reboot.
        let _ = std::process::Command::new("sync").status();
        std::fs::write("/proc/sys/vm/drop_caches", b"2\n")
            .expect("drop_caches needs root (echo 2 > /proc/sys/vm/drop_caches)");
        std::fs::write("/proc/sys/vm/drop_caches", b"1\n").unwrap();
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let started = Instant::now();
        let (cache, _) = Cache::open(CacheConfig::new(&dir, 1 << 40)).await.unwrap();
        let opened = started.elapsed();
        let s = cache.stats();
        println!(
            "Cache::open returned in {:.1} ms ({} chunks, {} manifests known so far)",
            ms(opened),
            s.chunks,
            s.manifests
        );
        let report = cache.store().reconciled().await;
        let s = cache.stats();
        println!(
            "background reconcile done {:.1} ms after open: {} chunks, {} bytes, {} manifests; {report:?}",
            ms(started.elapsed()),
            s.chunks,
            s.size,
            s.manifests
        );
    });
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
