//! A remote origin far away, through real mounts: the first 64 KiB of a
//! cold track, and a cold and warm tree walk, against the origin's round
//! trip (not a criterion bench: it measures wall-clock latency over an
//! origin that sleeps, and prints one line per case).
//!
//! `cargo bench -p musicfs-fuse --bench remote [-- --rtt MS --runs N
//! --files N --readahead N --no-off --local --json FILE]` (root: it mounts;
//! `/dev/fuse`, `find` and `ls` needed)
//!
//! The origin is a [`MemOrigin`] behind a [`FaultyOrigin`] whose every call
//! first waits `--rtt` ms (100 by default: a far S3 region, a server
//! across the world), so the figures show how many round trips each
//! operation waits for one after another:
//! - `origin_rtt`: one 64 KiB `read_range` straight from the origin;
//! - `first_64k fresh`: open and read the first 64 KiB of a cold 8 MiB
//!   track whose directory was listed just now;
//! - `first_64k old`: the same with the listing older than the freshness
//!   bound (the open confirms the file with the origin);
//! - `find cold` / `ls -lR cold`: `find DIR -type f` and `ls -lR DIR` on a
//!   fresh mount over `--files` objects (100 per album, 5 albums per
//!   artist, the shape `scripts/bench` uses), with listing read-ahead on
//!   (the default width, or `--readahead N`) and, unless `--no-off`, off
//!   (`listing_readahead: 0`: every directory one round trip after the
//!   other); `find warm`: again on the same mount.
//!
//! `--local` runs only the walks, on a `LocalOrigin` over the same tree of
//! sparse files on local disk: what listing read-ahead costs or gains
//! where a listing takes microseconds.
#![allow(clippy::unwrap_used, clippy::expect_used)] // bench binary

use std::io::Read;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use musicfs_fuse::FsConfig;
use musicfs_origins::{DynOrigin, LocalOrigin, OriginId, OriginPath};
use musicfs_test_utils::{pseudo_random_bytes, Fault, FaultyOrigin, MemOrigin};

#[path = "../tests/support/harness.rs"]
mod harness;
use harness::Harness;

const TRACK: &str = "Artist/Album/01 - Track.flac";
const FIRST: usize = 64 << 10;

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

fn far(mem: Arc<MemOrigin>, rtt_ms: u64) -> Arc<FaultyOrigin> {
    let faulty = FaultyOrigin::new(mem as DynOrigin);
    faulty.set_fault(Fault::TimeoutMs(rtt_ms));
    faulty
}

/// One cold open + first 64 KiB, in ms; `old` waits out the freshness
/// bound after listing the directory.
fn first_64k(data: &[u8], rtt_ms: u64, old: bool) -> f64 {
    let mem = MemOrigin::new(OriginId::new("remote").unwrap());
    mem.put(TRACK, data.to_vec());
    let faulty = far(mem, rtt_ms);
    let config = FsConfig {
        freshness: Duration::from_millis(500),
        ..FsConfig::default()
    };
    let h = Harness::start(vec![faulty as DynOrigin], config.clone());
    let album = h.root().join("remote/Artist/Album");
    assert_eq!(std::fs::read_dir(&album).unwrap().count(), 1);
    if old {
        std::thread::sleep(config.freshness + Duration::from_millis(10));
    }
    let start = Instant::now();
    let mut f = std::fs::File::open(album.join("01 - Track.flac")).unwrap();
    let mut buf = vec![0u8; FIRST];
    f.read_exact(&mut buf).unwrap();
    let t = ms(start.elapsed());
    assert!(buf == data[..FIRST], "wrong bytes");
    t
}

/// The tree `scripts/bench` uses for metadata: 100 tracks per album, 5
/// albums per artist.
fn tree(files: usize) -> Arc<MemOrigin> {
    let mem = MemOrigin::new(OriginId::new("remote").unwrap());
    for i in 0..files {
        let path = format!(
            "Artist {:04}/Album {} - Some Title/{:02} - A track with a realistic title {i}.flac",
            i / 500,
            i / 100 % 5,
            i % 100
        );
        mem.put(path.as_str(), vec![0u8; 16]);
    }
    mem
}

/// Runs `cmd` on `dir` (its first argument) and returns its time in ms
/// and its output's lines.
fn timed(cmd: &[&str], dir: &Path) -> (f64, usize) {
    let start = Instant::now();
    let out = Command::new(cmd[0])
        .arg(dir)
        .args(&cmd[1..])
        .output()
        .unwrap();
    let t = ms(start.elapsed());
    assert!(out.status.success(), "{cmd:?} failed: {out:?}");
    (t, out.stdout.split(|&b| b == b'\n').count() - 1)
}

struct Walk {
    cold_find: f64,
    cold_ls: f64,
    warm_find: f64,
    list_calls: u64,
    max_in_flight: u64,
}

/// Makes the tree `scripts/bench` uses in `dir`, as sparse files.
fn local_tree(dir: &Path, files: usize) {
    for i in 0..files {
        let path = dir.join(format!(
            "Artist {:04}/Album {} - Some Title/{:02} - A track with a realistic title {i}.flac",
            i / 500,
            i / 100 % 5,
            i % 100
        ));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::File::create(&path)
            .unwrap()
            .set_len(8_000_000)
            .unwrap();
    }
}

/// The walks over `--files` objects: on a far in-memory origin when
/// `local` is `None`, else on a `LocalOrigin` over that directory.
fn walk(files: usize, rtt_ms: u64, local: Option<&Path>, readahead: usize, runs: usize) -> Walk {
    let mut cold_find = Vec::new();
    let mut cold_ls = Vec::new();
    let mut warm_find = Vec::new();
    let mut list_calls = 0;
    let mut max_in_flight = 0;
    let config = FsConfig {
        listing_readahead: readahead,
        ..FsConfig::default()
    };
    for _ in 0..runs {
        for ls in [false, true] {
            let faulty = match local {
                None => far(tree(files), rtt_ms),
                Some(dir) => FaultyOrigin::new(Arc::new(LocalOrigin::new(
                    OriginId::new("remote").unwrap(),
                    dir,
                )) as DynOrigin),
            };
            let h = Harness::start(vec![Arc::clone(&faulty) as DynOrigin], config.clone());
            let top = h.root().join("remote");
            faulty.reset_stats();
            if ls {
                let (t, _) = timed(&["ls", "-lR"], &top);
                cold_ls.push(t);
            } else {
                let (t, n) = timed(&["find", "-type", "f"], &top);
                assert_eq!(n, files, "find saw {n} files");
                cold_find.push(t);
                let s = faulty.stats();
                list_calls = s.list_calls;
                max_in_flight = s.max_in_flight_lists;
                let (t, n) = timed(&["find", "-type", "f"], &top);
                assert_eq!(n, files);
                warm_find.push(t);
            }
        }
    }
    Walk {
        cold_find: median(cold_find),
        cold_ls: median(cold_ls),
        warm_find: median(warm_find),
        list_calls,
        max_in_flight,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let value_of = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let rtt_ms: u64 = value_of("--rtt").map_or(100, |r| r.parse().unwrap());
    let runs: usize = value_of("--runs").map_or(3, |r| r.parse().unwrap());
    let files: usize = value_of("--files").map_or(10_000, |r| r.parse().unwrap());
    let json = value_of("--json");
    let width: usize = value_of("--readahead").map_or(FsConfig::default().listing_readahead, |r| {
        r.parse().unwrap()
    });

    if args.iter().any(|a| a == "--local") {
        let dir = tempfile::tempdir().unwrap();
        local_tree(dir.path(), files);
        for readahead in [width, 0] {
            let w = walk(files, 0, Some(dir.path()), readahead, runs);
            println!(
                "local origin, {files} files, listing_readahead {readahead}: find cold {:.0} ms   ls -lR cold {:.0} ms   find warm {:.0} ms   ({} list calls, at most {} at once)   [median of {runs}]",
                w.cold_find, w.cold_ls, w.warm_find, w.list_calls, w.max_in_flight
            );
        }
        return;
    }
    let data = pseudo_random_bytes(8 << 20, 5);
    let rtt = {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let mem = MemOrigin::new(OriginId::new("remote").unwrap());
        mem.put(TRACK, data.clone());
        let faulty = far(mem, rtt_ms);
        let path = OriginPath::new(TRACK).unwrap();
        rt.block_on(async {
            use musicfs_origins::Origin;
            let version = faulty.inner().stat(&path).await.unwrap().version();
            let mut t = Vec::new();
            for _ in 0..runs {
                let start = Instant::now();
                faulty
                    .read_range(&path, &version, 0, FIRST as u64)
                    .await
                    .unwrap();
                t.push(ms(start.elapsed()));
            }
            median(t)
        })
    };
    let fresh = median((0..runs).map(|_| first_64k(&data, rtt_ms, false)).collect());
    let old = median((0..runs).map(|_| first_64k(&data, rtt_ms, true)).collect());
    println!("remote rtt {rtt_ms} ms: origin_rtt(64KiB) {rtt:.1} ms   first_64k fresh listing {fresh:.1} ms ({:.2}x rtt)   first_64k old listing {old:.1} ms ({:.2}x rtt)   [median of {runs}]", fresh / rtt, old / rtt);
    let mut rows = vec![format!(
        "{{\"case\":\"first_64k\",\"rtt_ms\":{rtt_ms},\"runs\":{runs},\"origin_rtt_ms\":{rtt:.3},\"fresh_listing_ms\":{fresh:.3},\"old_listing_ms\":{old:.3}}}"
    )];
    let widths = if args.iter().any(|a| a == "--no-off") {
        vec![width]
    } else {
        vec![width, 0]
    };
    for readahead in widths {
        let w = walk(files, rtt_ms, None, readahead, runs);
        println!(
            "remote rtt {rtt_ms} ms, {files} files, listing_readahead {readahead}: find cold {:.0} ms   ls -lR cold {:.0} ms   find warm {:.0} ms   ({} list calls, at most {} at once)   [median of {runs}]",
            w.cold_find, w.cold_ls, w.warm_find, w.list_calls, w.max_in_flight
        );
        rows.push(format!(
            "{{\"case\":\"walk\",\"rtt_ms\":{rtt_ms},\"files\":{files},\"listing_readahead\":{readahead},\"runs\":{runs},\"find_cold_ms\":{:.3},\"ls_lr_cold_ms\":{:.3},\"find_warm_ms\":{:.3},\"list_calls\":{},\"max_lists_in_flight\":{}}}",
            w.cold_find, w.cold_ls, w.warm_find, w.list_calls, w.max_in_flight
        ));
    }
    if let Some(path) = json {
        std::fs::write(&path, format!("[{}]\n", rows.join(",\n"))).unwrap();
    }
}
