//! Time to the first bytes of a cold track, against the time of one origin
//! round trip, on a throttled origin (not a criterion bench: it measures
//! wall-clock latency with sleeping origins, and prints one line per case).
//!
//! `cargo bench -p musicfs-cas --bench ttfb [-- --runs N --json FILE]`
//!
//! What it measures, for a 100 MiB track on a [`MemOrigin`] behind a
//! [`FaultyOrigin`] with `Fault::Bandwidth` (every call first waits the
//! latency, then each read waits `bytes / rate`):
//! - `origin_rtt`: one `read_range` of the first 64 KiB straight from the
//!   origin: the floor for any cold first byte;
//! - `first_64k`: from `Cache::open_file` until `FileHandle::read(0, 64 KiB)`
//!   returns, with an empty cache dir (cold);
//! - `first_128k`: the same for a 128 KiB read, which is the first request
//!   the kernel sends to a FUSE file system when a player reads 64 KiB
//!   (its initial readahead window).
//!
//! The FUSE layer (a few tens of microseconds) and the directory lookup are
//! not in it; `scripts/bench` measures those end to end on a local origin.
//! Cases: a NAS or remote origin (20 MB/s, 20 ms), a LAN NAS (110 MB/s,
//! 1 ms), no throttle (the in-memory origin as is), and a file on local
//! disk read through `LocalOrigin` (page cache warm: the floor of what the
//! cache's own path costs).
#![allow(clippy::unwrap_used, clippy::expect_used)] // bench binary

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use musicfs_cas::{Cache, CacheConfig};
use musicfs_origins::{DynOrigin, LocalOrigin, OriginId, OriginPath};
use musicfs_test_utils::{pseudo_random_bytes, Fault, FaultyOrigin, MemOrigin};

const LEN: usize = 100 << 20;
const FIRST: u64 = 64 << 10;

struct Case {
    name: &'static str,
    /// `None`: the track in a file on local disk (page cache warm), read
    /// through `LocalOrigin`; else in memory behind this throttle.
    throttle: Option<(u64, u64)>,
}

const CASES: [Case; 4] = [
    Case {
        name: "throttled-20MBps-20ms",
        throttle: Some((20_000_000, 20)),
    },
    Case {
        name: "lan-110MBps-1ms",
        throttle: Some((110_000_000, 1)),
    },
    Case {
        name: "unthrottled-memory",
        throttle: Some((0, 0)),
    },
    Case {
        name: "local-disk-page-cached",
        throttle: None,
    },
];

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Cold open + first read of `len` bytes, in ms, with a fresh cache dir.
async fn cold_first_read(origin: &DynOrigin, path: &OriginPath, data: &Bytes, len: u64) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let (cache, _) = Cache::open(CacheConfig::new(dir.path(), 1 << 40))
        .await
        .unwrap();
    cache.add_origin(Arc::clone(origin));
    // The stat is not part of the measurement: the filesystem has it from
    // the directory listing before the player opens the file.
    let meta = origin.stat(path).await.unwrap();
    let start = Instant::now();
    let h = cache.open_file(origin.id(), path, &meta).await.unwrap();
    let got = h.read(0, len).await.unwrap();
    let t = ms(start.elapsed());
    assert_eq!(&got[..], &data[..len as usize], "wrong bytes");
    t
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let value_of = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let runs: usize = value_of("--runs").map_or(7, |r| r.parse().unwrap());
    let json = value_of("--json");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let data = Bytes::from(pseudo_random_bytes(LEN, 11));
    let lib = tempfile::tempdir().unwrap();
    let mut rows = Vec::new();
    for case in &CASES {
        let origin: DynOrigin = match case.throttle {
            Some((bytes_per_sec, latency_ms)) => {
                let mem = MemOrigin::new(OriginId::new("nas").unwrap());
                mem.put("track.flac", data.clone());
                let faulty = FaultyOrigin::new(mem);
                if bytes_per_sec > 0 || latency_ms > 0 {
                    // (A zero-length sleep would still wait for tokio's
                    // next timer tick, so the unthrottled case sets no
                    // fault at all.)
                    faulty.set_fault(Fault::Bandwidth {
                        bytes_per_sec,
                        latency_ms,
                    });
                }
                faulty
            }
            None => {
                std::fs::write(lib.path().join("track.flac"), &data).unwrap();
                Arc::new(LocalOrigin::new(OriginId::new("nas").unwrap(), lib.path()))
            }
        };
        let path = OriginPath::new("track.flac").unwrap();
        let (rtt, first_64k, first_128k) = rt.block_on(async {
            let mut rtt = Vec::new();
            let mut f64k = Vec::new();
            let mut f128k = Vec::new();
            let version = origin.stat(&path).await.unwrap().version();
            for _ in 0..runs {
                let start = Instant::now();
                let got = origin.read_range(&path, &version, 0, FIRST).await.unwrap();
                rtt.push(ms(start.elapsed()));
                assert_eq!(got.len() as u64, FIRST);
                f64k.push(cold_first_read(&origin, &path, &data, FIRST).await);
                f128k.push(cold_first_read(&origin, &path, &data, 2 * FIRST).await);
            }
            (median(rtt), median(f64k), median(f128k))
        });
        println!(
            "ttfb {:<24} origin_rtt(64KiB) {rtt:8.2} ms   first_64k {first_64k:8.2} ms ({:.2}x rtt)   first_128k {first_128k:8.2} ms ({:.2}x rtt)   [median of {runs}]",
            case.name,
            first_64k / rtt,
            first_128k / rtt,
        );
        rows.push(format!(
            "{{\"case\":\"{}\",\"bytes_per_sec\":{},\"latency_ms\":{},\"runs\":{runs},\"origin_rtt_ms\":{rtt:.3},\"first_64k_ms\":{first_64k:.3},\"first_128k_ms\":{first_128k:.3},\"first_64k_over_rtt\":{:.3},\"first_128k_over_rtt\":{:.3}}}",
            case.name,
            case.throttle.map_or(0, |t| t.0),
            case.throttle.map_or(0, |t| t.1),
            first_64k / rtt,
            first_128k / rtt,
        ));
    }
    if let Some(path) = json {
        std::fs::write(&path, format!("[{}]\n", rows.join(",\n"))).unwrap();
    }
}
