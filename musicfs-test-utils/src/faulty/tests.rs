//! Unit tests of `faulty.rs`.

use super::*;
use crate::mem::MemOrigin;
use tokio::time::{timeout, Instant};

const FILE: &str = "a/song.flac";

fn setup(size: usize) -> (Arc<MemOrigin>, Arc<FaultyOrigin>, Vec<u8>) {
    let mem = MemOrigin::new(OriginId::new("mem").unwrap());
    let data = crate::library::pseudo_random_bytes(size, 7);
    mem.put(FILE, data.clone());
    let faulty = FaultyOrigin::new(mem.clone());
    (mem, faulty, data)
}

fn p(s: &str) -> OriginPath {
    OriginPath::new(s).unwrap()
}

/// A read of the file's current version, taken from the inner origin so
/// that the stat meets no fault and is not counted.
async fn read(f: &FaultyOrigin, path: &OriginPath, offset: u64, len: u64) -> Result<Bytes> {
    let version = f.inner().stat(path).await.map_or(
        FileVersion {
            size: 0,
            mtime_ns: None,
            etag: None,
        },
        |m| m.version(),
    );
    f.read_range(path, &version, offset, len).await
}

fn is_injected(e: &OriginError) -> bool {
    matches!(e, OriginError::Unavailable { reason, .. } if reason.starts_with("injected fault:"))
        && e.is_retryable()
}

#[tokio::test]
async fn no_fault_passes_through_and_counts_traffic() {
    let (_mem, f, data) = setup(10_000);
    assert_eq!(f.id().as_str(), "mem");
    let got = read(&f, &p(FILE), 100, 1000).await.unwrap();
    assert_eq!(&got[..], &data[100..1100]);
    let tail = read(&f, &p(FILE), 9_500, 1000).await.unwrap();
    assert_eq!(tail.len(), 500);
    f.list(&p("a")).await.unwrap();
    assert!(f.list(&p("missing")).await.unwrap_err().is_not_found());
    f.stat(&p(FILE)).await.unwrap();
    f.health().await.unwrap();
    assert!(f.stat(&p("missing")).await.unwrap_err().is_not_found());
    assert_eq!(
        f.stats(),
        OriginStats {
            read_calls: 2,
            bytes_served: 1500,
            list_calls: 2,
            stat_calls: 2,
            health_calls: 1,
            failures: 2,
            list_failures: 1,
            in_flight_reads: 0,
            max_in_flight_reads: 1,
            in_flight_lists: 0,
            max_in_flight_lists: 1,
        }
    );
    f.reset_stats();
    assert_eq!(f.stats(), OriginStats::default());
}

#[tokio::test]
async fn with_id_renames_and_range_reads_can_be_overridden() {
    let (mem, _, _) = setup(10);
    let f = FaultyOrigin::with_id(mem, OriginId::new("other").unwrap());
    assert_eq!(f.id().as_str(), "other");
    assert!(f.supports_range_reads());
    f.set_range_reads(false);
    assert!(!f.supports_range_reads());
}

#[tokio::test]
async fn transient_fails_every_op_with_a_retryable_error() {
    let (_mem, f, _) = setup(100);
    f.set_fault(Fault::Transient);
    assert!(is_injected(&read(&f, &p(FILE), 0, 10).await.unwrap_err()));
    assert!(is_injected(&f.list(&p("a")).await.unwrap_err()));
    assert!(is_injected(&f.stat(&p(FILE)).await.unwrap_err()));
    assert!(is_injected(&f.health().await.unwrap_err()));
    let s = f.stats();
    assert_eq!(s.failures, 4);
    assert_eq!(s.bytes_served, 0);
    assert_eq!(s.read_calls, 1);
    f.clear();
    assert_eq!(read(&f, &p(FILE), 0, 10).await.unwrap().len(), 10);
}

#[tokio::test]
async fn fail_every_nth_fails_exactly_calls_n_and_2n() {
    let (_mem, f, _) = setup(100);
    f.set_fault_on(Ops::READ, Fault::FailEveryNth(3));
    let mut failed = Vec::new();
    for call in 1..=7u64 {
        // Other ops are not affected and do not advance the count.
        f.stat(&p(FILE)).await.unwrap();
        if read(&f, &p(FILE), 0, 10).await.is_err() {
            failed.push(call);
        }
    }
    assert_eq!(failed, vec![3, 6]);
    assert_eq!(f.stats().failures, 2);

    // Setting the fault again restarts the count.
    f.set_fault_on(Ops::READ, Fault::FailEveryNth(2));
    assert!(read(&f, &p(FILE), 0, 10).await.is_ok());
    assert!(read(&f, &p(FILE), 0, 10).await.is_err());

    f.set_fault(Fault::FailEveryNth(0));
    for _ in 0..5 {
        assert!(read(&f, &p(FILE), 0, 10).await.is_ok());
    }
}

#[tokio::test]
async fn fail_every_nth_on_several_ops_counts_across_them() {
    let (_mem, f, _) = setup(100);
    f.set_fault(Fault::FailEveryNth(2));
    assert!(f.stat(&p(FILE)).await.is_ok());
    assert!(read(&f, &p(FILE), 0, 1).await.is_err());
    assert!(f.health().await.is_ok());
    assert!(f.list(&p("a")).await.is_err());
}

#[tokio::test]
async fn set_fault_on_scopes_to_the_named_ops() {
    let (_mem, f, _) = setup(100);
    f.set_fault_on(Ops::LIST | Ops::HEALTH, Fault::Transient);
    assert!(read(&f, &p(FILE), 0, 10).await.is_ok());
    assert!(f.stat(&p(FILE)).await.is_ok());
    assert!(f.list(&p("a")).await.is_err());
    assert!(f.health().await.is_err());

    // Replacing the read fault leaves list/health as they were.
    f.set_fault_on(Ops::DATA, Fault::Transient);
    f.set_fault_on(Ops::LIST, Fault::None);
    assert!(read(&f, &p(FILE), 0, 10).await.is_err());
    assert!(f.list(&p("a")).await.is_ok());
    assert!(f.health().await.is_err());
    assert!(f.stat(&p(FILE)).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn timeout_delays_then_succeeds() {
    let (_mem, f, data) = setup(100);
    f.set_fault(Fault::TimeoutMs(250));
    let start = Instant::now();
    let got = read(&f, &p(FILE), 0, 100).await.unwrap();
    assert_eq!(&got[..], &data[..]);
    assert_eq!(start.elapsed(), Duration::from_millis(250));

    let start = Instant::now();
    f.stat(&p(FILE)).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(250));

    // A caller with a shorter deadline gives up.
    assert!(timeout(Duration::from_millis(100), f.health())
        .await
        .is_err());
}

#[tokio::test(start_paused = true)]
async fn changing_the_fault_does_not_affect_a_delayed_call() {
    let (_mem, f, _) = setup(100);
    f.set_fault(Fault::TimeoutMs(1000));
    let file = p(FILE);
    let mut delayed = Box::pin(read(&f, &file, 0, 10));
    assert!(futures::poll!(&mut delayed).is_pending());
    f.set_fault(Fault::Transient);
    assert!(read(&f, &p(FILE), 0, 10).await.is_err());
    assert_eq!(delayed.await.unwrap().len(), 10);
}

#[tokio::test(start_paused = true)]
async fn hang_never_completes_and_stays_hung_after_clear() {
    let (_mem, f, _) = setup(100);
    f.set_fault(Fault::Hang);
    assert!(timeout(Duration::from_secs(3600), f.health())
        .await
        .is_err());
    assert!(timeout(Duration::from_secs(3600), f.list(&p("a")))
        .await
        .is_err());

    let file = p(FILE);
    let mut hung = Box::pin(read(&f, &file, 0, 10));
    assert!(futures::poll!(&mut hung).is_pending());
    assert_eq!(f.stats().in_flight_reads, 1);
    f.clear();
    assert!(read(&f, &p(FILE), 0, 10).await.is_ok());
    assert!(timeout(Duration::from_secs(3600), &mut hung).await.is_err());
    assert_eq!(f.stats().in_flight_reads, 1);
    drop(hung);
    let s = f.stats();
    assert_eq!(s.in_flight_reads, 0);
    assert_eq!(s.read_calls, 2);
    assert_eq!(s.bytes_served, 10);
}

#[tokio::test]
async fn corrupt_bytes_keeps_length_and_flips_deterministically() {
    let (_mem, f, data) = setup(20_000);
    f.set_fault(Fault::CorruptBytes);
    // Metadata ops are unaffected.
    assert_eq!(f.stat(&p(FILE)).await.unwrap().size, 20_000);

    let offset = 4000u64;
    let got = read(&f, &p(FILE), offset, 10_000).await.unwrap();
    assert_eq!(got.len(), 10_000);
    let flipped: Vec<usize> = (0..got.len())
        .filter(|&i| got[i] != data[4000 + i])
        .collect();
    // Buffer start, then file positions 4096, 8192 and 12288.
    assert_eq!(flipped, vec![0, 96, 4192, 8288]);
    for &i in &flipped {
        assert_eq!(got[i], data[4000 + i] ^ 0xFF);
    }
    let again = read(&f, &p(FILE), offset, 10_000).await.unwrap();
    assert_eq!(got, again);

    // A read starting on a 4096 boundary is flipped once, not twice.
    let aligned = read(&f, &p(FILE), 4096, 1).await.unwrap();
    assert_eq!(aligned[0], data[4096] ^ 0xFF);
    assert!(read(&f, &p(FILE), 20_000, 10).await.unwrap().is_empty());
}

#[tokio::test]
async fn truncate_returns_half_and_counts_what_was_returned() {
    let (_mem, f, data) = setup(1000);
    f.set_fault_on(Ops::READ, Fault::Truncate);
    let got = read(&f, &p(FILE), 100, 301).await.unwrap();
    assert_eq!(&got[..], &data[100..250]);
    assert_eq!(f.stats().bytes_served, 150);
    assert!(f.list(&p("a")).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn bandwidth_adds_latency_and_transfer_time() {
    let (_mem, f, _) = setup(1_000_000);
    f.set_fault(Fault::Bandwidth {
        bytes_per_sec: 100_000,
        latency_ms: 20,
    });
    let start = Instant::now();
    f.stat(&p(FILE)).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(20));

    let start = Instant::now();
    let got = read(&f, &p(FILE), 0, 50_000).await.unwrap();
    assert_eq!(got.len(), 50_000);
    assert_eq!(start.elapsed(), Duration::from_millis(520));

    // Only the bytes actually returned cost transfer time.
    let start = Instant::now();
    let tail = read(&f, &p(FILE), 990_000, 50_000).await.unwrap();
    assert_eq!(tail.len(), 10_000);
    assert_eq!(start.elapsed(), Duration::from_millis(120));
}

#[tokio::test(start_paused = true)]
async fn a_link_is_shared_by_the_calls_in_flight() {
    let (_mem, f, _) = setup(1_000_000);
    f.set_fault(Fault::Link {
        bytes_per_sec: 100_000,
        latency_ms: 20,
    });
    let file = p(FILE);
    let start = Instant::now();
    let (a, b) = tokio::join!(read(&f, &file, 0, 50_000), read(&f, &file, 50_000, 50_000));
    assert_eq!((a.unwrap().len(), b.unwrap().len()), (50_000, 50_000));
    // One round trip, then 100,000 bytes through one 100 kB/s pipe.
    assert_eq!(start.elapsed(), Duration::from_millis(1_020));
    // The pipe is free again: a lone call pays its own time only.
    let start = Instant::now();
    read(&f, &file, 0, 10_000).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(120));
}

#[tokio::test(start_paused = true)]
async fn hang_from_stalls_only_reads_past_the_offset() {
    let (_mem, f, data) = setup(10_000);
    f.set_fault(Fault::HangFrom {
        offset: 4096,
        latency_ms: 20,
    });
    let file = p(FILE);
    let start = Instant::now();
    let head = read(&f, &file, 0, 4096).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(20));
    assert_eq!(&head[..], &data[..4096]);
    f.stat(&file).await.unwrap();
    let stalled = timeout(Duration::from_secs(3600), read(&f, &file, 4096, 10)).await;
    assert!(stalled.is_err(), "a read past the offset completed");
    assert_eq!(
        f.stats().in_flight_reads,
        0,
        "the dropped read is counted out"
    );
}

#[tokio::test]
async fn the_inner_origins_digest_is_stated() {
    let (mem, f, _) = setup(10);
    let version = mem.stat(&p(FILE)).await.unwrap().version();
    assert_eq!(f.whole_digest(&p(FILE), &version), None);
    let d = musicfs_origins::WholeDigest::Md5([1; 16]);
    mem.set_whole_digest(FILE, Some(d));
    assert_eq!(f.whole_digest(&p(FILE), &version), Some(d));
}

#[tokio::test(start_paused = true)]
async fn concurrent_reads_are_tracked() {
    let (_mem, f, _) = setup(1000);
    f.set_fault_on(Ops::READ, Fault::TimeoutMs(100));
    let file = p(FILE);
    let reads = (0..5).map(|i| read(&f, &file, i * 100, 100));
    let results = futures::future::join_all(reads).await;
    assert!(results.iter().all(|r| r.as_ref().unwrap().len() == 100));
    let s = f.stats();
    assert_eq!(s.read_calls, 5);
    assert_eq!(s.bytes_served, 500);
    assert_eq!(s.in_flight_reads, 0);
    assert_eq!(s.max_in_flight_reads, 5);
}

#[tokio::test]
async fn inner_errors_are_counted_as_failures() {
    let (mem, f, _) = setup(100);
    mem.set_available(false);
    assert!(f.health().await.is_err());
    assert!(read(&f, &p(FILE), 0, 1).await.is_err());
    assert_eq!(f.stats().failures, 2);
}

#[tokio::test(start_paused = true)]
async fn concurrent_lists_are_tracked_and_the_log_shows_overlap() {
    let (_mem, f, _) = setup(1000);
    f.set_fault_on(Ops::LIST | Ops::STAT, Fault::TimeoutMs(100));
    // Off by default.
    f.list(&p("a")).await.unwrap();
    assert!(f.calls().is_empty());
    f.reset_stats();
    f.record_calls();
    let dir = p("a");
    let file = p(FILE);
    let lists = (0..3).map(|_| f.list(&dir));
    let (lists, stat) = tokio::join!(futures::future::join_all(lists), f.stat(&file));
    assert!(lists.iter().all(|l| l.is_ok()));
    stat.unwrap();
    // One after the other: no overlap.
    f.stat(&file).await.unwrap();
    let s = f.stats();
    assert_eq!(s.list_calls, 3);
    assert_eq!(s.in_flight_lists, 0);
    assert_eq!(s.max_in_flight_lists, 3);
    let calls = f.calls();
    let kinds: Vec<CallKind> = calls.iter().map(|c| c.kind).collect();
    assert_eq!(
        kinds,
        [
            CallKind::List,
            CallKind::List,
            CallKind::List,
            CallKind::Stat,
            CallKind::Stat
        ]
    );
    assert!(calls.iter().all(|c| c.ended.is_some()));
    assert!(calls[0].overlaps(&calls[3]));
    assert!(!calls[3].overlaps(&calls[4]));
    assert_eq!(calls[4].path.as_ref(), Some(&file));
    // A restart empties the log.
    f.record_calls();
    assert!(f.calls().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_call_dropped_by_a_timeout_still_ends_in_the_log() {
    let (_mem, f, _) = setup(1000);
    f.set_fault_on(Ops::LIST, Fault::Hang);
    f.record_calls();
    let dir = p("a");
    assert!(timeout(Duration::from_millis(50), f.list(&dir))
        .await
        .is_err());
    let calls = f.calls();
    assert_eq!(calls.len(), 1);
    assert!(calls[0].ended.is_some());
    assert_eq!(f.stats().in_flight_lists, 0);
}
