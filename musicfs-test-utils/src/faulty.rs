//! A fault-injecting, traffic-counting wrapper around any origin.
//!
//! [`FaultyOrigin`] makes a healthy origin behave like a slow, flaky, hung or
//! lying one, and counts what it served, so resilience tests can prove both
//! that MusicFS survives a bad origin and that it does not over-fetch from a
//! good one (a cold 64 KiB read must not download the whole file; eight
//! concurrent readers of one chunk must cause one fetch, not eight).
//!
//! Invariants:
//! - Each operation kind (read, list, stat, health) has its own current
//!   [`Fault`]; `read_link`, the other call about one entry's metadata,
//!   shares stat's fault and counter. The fault is read once, at the start of a call: changing it
//!   affects later calls, never a call that is already delayed. A call stuck
//!   in [`Fault::Hang`] stays stuck even after [`FaultyOrigin::clear`]; only
//!   dropping its future (a caller's timeout) ends it.
//! - Every call is counted, including failed and hung ones, so the counters
//!   show the attempts MusicFS made, not just the successes.
//! - `in_flight_reads` is decremented by a drop guard, so a read cancelled
//!   by a caller's timeout still leaves the count correct.
//! - Injected errors are always [`OriginError::Unavailable`] (retryable) with
//!   a reason starting with `injected fault:`, so a test can tell them from
//!   real errors of the inner origin.

use std::ops::BitOr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use musicfs_origins::{
    DirEntry, DynOrigin, EntryMeta, FileVersion, Origin, OriginError, OriginId, OriginPath, Result,
};
use parking_lot::Mutex;

/// What goes wrong on each affected call.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// The call goes straight to the inner origin.
    None,
    /// The call first sleeps this many milliseconds, then proceeds normally.
    TimeoutMs(u64),
    /// The call never completes (until its future is dropped).
    Hang,
    /// The call fails with a retryable [`OriginError::Unavailable`].
    Transient,
    /// Calls N, 2N, 3N, ... (1-based, counting the calls this fault applies
    /// to since it was set) fail with `Unavailable`; the others pass.
    /// `FailEveryNth(0)` never fails.
    FailEveryNth(u64),
    /// `read_range` returns the right length with wrong bytes: every byte at
    /// an absolute file position that is a multiple of 4096 is inverted, and
    /// so is the first byte of the buffer, so every non-empty read is
    /// corrupted, deterministically. Other operations pass.
    CorruptBytes,
    /// `read_range` returns only the first half (rounded down) of what the
    /// inner origin returned: a short read before the end of the file, which
    /// the trait forbids. Other operations pass.
    Truncate,
    /// A throttled link: each call first waits `latency_ms`, and `read_range`
    /// additionally waits `bytes / bytes_per_sec` seconds for the bytes it
    /// returns. `bytes_per_sec == 0` means no throughput limit (latency only).
    Bandwidth { bytes_per_sec: u64, latency_ms: u64 },
}

/// A set of operation kinds a fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ops {
    pub read: bool,
    pub list: bool,
    pub stat: bool,
    pub health: bool,
}

impl Ops {
    pub const NONE: Ops = Ops {
        read: false,
        list: false,
        stat: false,
        health: false,
    };
    pub const ALL: Ops = Ops {
        read: true,
        list: true,
        stat: true,
        health: true,
    };
    pub const READ: Ops = Ops {
        read: true,
        ..Ops::NONE
    };
    pub const LIST: Ops = Ops {
        list: true,
        ..Ops::NONE
    };
    pub const STAT: Ops = Ops {
        stat: true,
        ..Ops::NONE
    };
    pub const HEALTH: Ops = Ops {
        health: true,
        ..Ops::NONE
    };
    /// File contents only: the origin still lists, stats and answers health
    /// checks, as a NAS with a failing disk does.
    pub const DATA: Ops = Ops::READ;

    /// Both sets together (also available as `a | b`).
    pub const fn union(self, other: Ops) -> Ops {
        Ops {
            read: self.read || other.read,
            list: self.list || other.list,
            stat: self.stat || other.stat,
            health: self.health || other.health,
        }
    }
}

impl BitOr for Ops {
    type Output = Ops;

    fn bitor(self, rhs: Ops) -> Ops {
        self.union(rhs)
    }
}

/// A snapshot of what a [`FaultyOrigin`] has seen since creation or the last
/// [`FaultyOrigin::reset_stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OriginStats {
    /// `read_range` calls, including failed and hung ones.
    pub read_calls: u64,
    /// Bytes returned to callers by successful `read_range` calls (after any
    /// truncation).
    pub bytes_served: u64,
    pub list_calls: u64,
    /// `stat` and `read_link` calls.
    pub stat_calls: u64,
    pub health_calls: u64,
    /// Calls that returned an error, injected or from the inner origin.
    pub failures: u64,
    /// The `list` calls among `failures`: counted when the error returns,
    /// so a test can wait for a directory refresh to have failed.
    pub list_failures: u64,
    /// `read_range` calls currently running, including injected delays.
    pub in_flight_reads: u64,
    /// The most `read_range` calls that ran at once.
    pub max_in_flight_reads: u64,
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Read,
    List,
    Stat,
    Health,
}

/// One `set_fault_on` call: the fault plus the count of calls it affected.
/// The ops named in one call share a slot, so `FailEveryNth` counts across
/// all of them (with `Ops::ALL`, every Nth call of any kind fails).
#[derive(Debug)]
struct Slot {
    fault: Fault,
    calls: AtomicU64,
}

impl Slot {
    fn new(fault: Fault) -> Arc<Slot> {
        Arc::new(Slot {
            fault,
            calls: AtomicU64::new(0),
        })
    }
}

#[derive(Debug)]
struct Faults {
    read: Arc<Slot>,
    list: Arc<Slot>,
    stat: Arc<Slot>,
    health: Arc<Slot>,
}

impl Faults {
    fn all(fault: Fault) -> Faults {
        let slot = Slot::new(fault);
        Faults {
            read: slot.clone(),
            list: slot.clone(),
            stat: slot.clone(),
            health: slot,
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    read_calls: AtomicU64,
    bytes_served: AtomicU64,
    list_calls: AtomicU64,
    stat_calls: AtomicU64,
    health_calls: AtomicU64,
    failures: AtomicU64,
    list_failures: AtomicU64,
    in_flight_reads: AtomicU64,
    max_in_flight_reads: AtomicU64,
}

/// Keeps `in_flight_reads` right even when the read's future is dropped
/// mid-way (a caller's timeout around a hung read).
struct InFlight<'a>(&'a Counters);

impl<'a> InFlight<'a> {
    fn enter(counters: &'a Counters) -> Self {
        let now = counters.in_flight_reads.fetch_add(1, Ordering::SeqCst) + 1;
        counters
            .max_in_flight_reads
            .fetch_max(now, Ordering::SeqCst);
        InFlight(counters)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight_reads.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Wraps an origin, injecting [`Fault`]s and counting traffic. See the module
/// docs for the exact semantics.
#[derive(Debug)]
pub struct FaultyOrigin {
    inner: DynOrigin,
    id: OriginId,
    faults: Mutex<Faults>,
    range_reads: AtomicBool,
    counters: Counters,
}

impl FaultyOrigin {
    /// Wraps `inner` under the same id, with no fault.
    pub fn new(inner: DynOrigin) -> Arc<Self> {
        let id = inner.id().clone();
        Self::with_id(inner, id)
    }

    /// Wraps `inner` under another id, e.g. to mount the same data twice.
    pub fn with_id(inner: DynOrigin, id: OriginId) -> Arc<Self> {
        let range_reads = AtomicBool::new(inner.supports_range_reads());
        Arc::new(Self {
            inner,
            id,
            faults: Mutex::new(Faults::all(Fault::None)),
            range_reads,
            counters: Counters::default(),
        })
    }

    /// The wrapped origin.
    pub fn inner(&self) -> &DynOrigin {
        &self.inner
    }

    /// Sets the fault for every operation kind.
    pub fn set_fault(&self, fault: Fault) {
        *self.faults.lock() = Faults::all(fault);
    }

    /// Sets the fault for the operation kinds in `ops` only; the others keep
    /// theirs. Restarts the `FailEveryNth` count for those kinds.
    pub fn set_fault_on(&self, ops: Ops, fault: Fault) {
        let slot = Slot::new(fault);
        let mut faults = self.faults.lock();
        if ops.read {
            faults.read = slot.clone();
        }
        if ops.list {
            faults.list = slot.clone();
        }
        if ops.stat {
            faults.stat = slot.clone();
        }
        if ops.health {
            faults.health = slot;
        }
    }

    /// No fault anywhere. Calls already hung stay hung.
    pub fn clear(&self) {
        self.set_fault(Fault::None);
    }

    pub fn stats(&self) -> OriginStats {
        let c = &self.counters;
        let load = |a: &AtomicU64| a.load(Ordering::SeqCst);
        OriginStats {
            read_calls: load(&c.read_calls),
            bytes_served: load(&c.bytes_served),
            list_calls: load(&c.list_calls),
            stat_calls: load(&c.stat_calls),
            health_calls: load(&c.health_calls),
            failures: load(&c.failures),
            list_failures: load(&c.list_failures),
            in_flight_reads: load(&c.in_flight_reads),
            max_in_flight_reads: load(&c.max_in_flight_reads),
        }
    }

    /// Zeroes the counters. `in_flight_reads` is left alone because those
    /// reads are still running and will decrement it when they end;
    /// `max_in_flight_reads` restarts from it.
    pub fn reset_stats(&self) {
        let c = &self.counters;
        for counter in [
            &c.read_calls,
            &c.bytes_served,
            &c.list_calls,
            &c.stat_calls,
            &c.health_calls,
            &c.failures,
            &c.list_failures,
        ] {
            counter.store(0, Ordering::SeqCst);
        }
        c.max_in_flight_reads
            .store(c.in_flight_reads.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    /// Overrides what [`Origin::supports_range_reads`] reports (by default the
    /// inner origin's answer at wrap time).
    pub fn set_range_reads(&self, supported: bool) {
        self.range_reads.store(supported, Ordering::SeqCst);
    }

    fn slot(&self, op: Op) -> Arc<Slot> {
        let faults = self.faults.lock();
        match op {
            Op::Read => faults.read.clone(),
            Op::List => faults.list.clone(),
            Op::Stat => faults.stat.clone(),
            Op::Health => faults.health.clone(),
        }
    }

    fn injected(&self, what: String) -> OriginError {
        OriginError::Unavailable {
            origin: self.id.clone(),
            reason: format!("injected fault: {what}"),
        }
    }

    /// Applies the delay or failure part of the current fault for `op` and
    /// returns the fault, whose data part (corruption, truncation, transfer
    /// time) `read_range` applies after the inner call.
    async fn before(&self, op: Op) -> Result<Fault> {
        let slot = self.slot(op);
        let call = slot.calls.fetch_add(1, Ordering::SeqCst) + 1;
        match &slot.fault {
            Fault::None | Fault::CorruptBytes | Fault::Truncate => {}
            Fault::TimeoutMs(ms) => tokio::time::sleep(Duration::from_millis(*ms)).await,
            Fault::Hang => std::future::pending::<()>().await,
            Fault::Transient => return Err(self.injected(format!("transient failure ({op:?})"))),
            Fault::FailEveryNth(n) => {
                if call.checked_rem(*n) == Some(0) {
                    return Err(self.injected(format!("call {call} fails, every {n}th ({op:?})")));
                }
            }
            Fault::Bandwidth { latency_ms, .. } => {
                tokio::time::sleep(Duration::from_millis(*latency_ms)).await;
            }
        }
        Ok(slot.fault.clone())
    }

    fn count_failure<T>(&self, result: Result<T>) -> Result<T> {
        if result.is_err() {
            self.counters.failures.fetch_add(1, Ordering::SeqCst);
        }
        result
    }

    async fn read_inner(
        &self,
        path: &OriginPath,
        version: &FileVersion,
        offset: u64,
        len: u64,
    ) -> Result<Bytes> {
        let fault = self.before(Op::Read).await?;
        let data = self.inner.read_range(path, version, offset, len).await?;
        Ok(match fault {
            Fault::CorruptBytes => corrupt(&data, offset),
            Fault::Truncate => data.slice(..data.len() / 2),
            Fault::Bandwidth { bytes_per_sec, .. } => {
                tokio::time::sleep(transfer_time(data.len() as u64, bytes_per_sec)).await;
                data
            }
            _ => data,
        })
    }
}

/// Inverts the bytes at file positions that are multiples of 4096 and the
/// buffer's first byte (once, even when both rules pick it).
fn corrupt(data: &Bytes, offset: u64) -> Bytes {
    let mut out = BytesMut::from(&data[..]);
    for (i, byte) in out.iter_mut().enumerate() {
        if i == 0 || offset.wrapping_add(i as u64) & 4095 == 0 {
            *byte ^= 0xFF;
        }
    }
    out.freeze()
}

fn transfer_time(bytes: u64, bytes_per_sec: u64) -> Duration {
    if bytes_per_sec == 0 {
        return Duration::ZERO;
    }
    let nanos = u128::from(bytes) * 1_000_000_000 / u128::from(bytes_per_sec);
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

#[async_trait]
impl Origin for FaultyOrigin {
    fn id(&self) -> &OriginId {
        &self.id
    }

    async fn list(&self, path: &OriginPath) -> Result<Vec<DirEntry>> {
        self.counters.list_calls.fetch_add(1, Ordering::SeqCst);
        let result = match self.before(Op::List).await {
            Ok(_) => self.inner.list(path).await,
            Err(e) => Err(e),
        };
        if result.is_err() {
            self.counters.list_failures.fetch_add(1, Ordering::SeqCst);
        }
        self.count_failure(result)
    }

    async fn stat(&self, path: &OriginPath) -> Result<EntryMeta> {
        self.counters.stat_calls.fetch_add(1, Ordering::SeqCst);
        let result = match self.before(Op::Stat).await {
            Ok(_) => self.inner.stat(path).await,
            Err(e) => Err(e),
        };
        self.count_failure(result)
    }

    async fn read_range(
        &self,
        path: &OriginPath,
        version: &FileVersion,
        offset: u64,
        len: u64,
    ) -> Result<Bytes> {
        self.counters.read_calls.fetch_add(1, Ordering::SeqCst);
        let _in_flight = InFlight::enter(&self.counters);
        let result = self.read_inner(path, version, offset, len).await;
        if let Ok(data) = &result {
            self.counters
                .bytes_served
                .fetch_add(data.len() as u64, Ordering::SeqCst);
        }
        self.count_failure(result)
    }

    fn release(&self, path: &OriginPath, version: &FileVersion) {
        self.inner.release(path, version);
    }

    async fn read_link(&self, path: &OriginPath) -> Result<PathBuf> {
        self.counters.stat_calls.fetch_add(1, Ordering::SeqCst);
        let result = match self.before(Op::Stat).await {
            Ok(_) => self.inner.read_link(path).await,
            Err(e) => Err(e),
        };
        self.count_failure(result)
    }

    async fn health(&self) -> Result<()> {
        self.counters.health_calls.fetch_add(1, Ordering::SeqCst);
        let result = match self.before(Op::Health).await {
            Ok(_) => self.inner.health().await,
            Err(e) => Err(e),
        };
        self.count_failure(result)
    }

    fn supports_range_reads(&self) -> bool {
        self.range_reads.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
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
}
