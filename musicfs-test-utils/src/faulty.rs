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
//! - `in_flight_reads` and `in_flight_lists` are decremented by a drop
//!   guard, so a call cancelled by a caller's timeout still leaves the count
//!   correct.
//! - The call log ([`FaultyOrigin::record_calls`], off by default) notes
//!   when each call started and ended, so a test can tell calls that
//!   overlapped from calls made one after another (round trips on a slow
//!   link) without timing anything.
//! - [`Origin::whole_digest`] is the inner origin's, so with
//!   [`Fault::CorruptBytes`] a download disagrees with the digest stated
//!   for it, as a corrupt first download from a store would.
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
    /// Each call has the whole rate to itself, so calls in flight at once
    /// add up to more than it.
    Bandwidth { bytes_per_sec: u64, latency_ms: u64 },
    /// One shared link: each call first waits `latency_ms` (the round
    /// trip), then the bytes `read_range` returns queue for a pipe of
    /// `bytes_per_sec` that all calls share, one transfer after another, so
    /// calls in flight at once never get more than the rate together.
    /// `bytes_per_sec == 0` means latency only.
    Link { bytes_per_sec: u64, latency_ms: u64 },
    /// A stream that stalls past the start of a file while a first read
    /// still works: each call first waits `latency_ms`, then `read_range`
    /// calls that start at or past `offset` never complete (until their
    /// future is dropped). Other operations pass after the wait.
    HangFrom { offset: u64, latency_ms: u64 },
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
    /// `list` calls currently running, including injected delays.
    pub in_flight_lists: u64,
    /// The most `list` calls that ran at once.
    pub max_in_flight_lists: u64,
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
    in_flight_lists: AtomicU64,
    max_in_flight_lists: AtomicU64,
}

/// Keeps an in-flight count right even when the call's future is dropped
/// mid-way (a caller's timeout around a hung call).
struct InFlight<'a>(&'a AtomicU64);

impl<'a> InFlight<'a> {
    fn enter(count: &'a AtomicU64, max: &AtomicU64) -> Self {
        let now = count.fetch_add(1, Ordering::SeqCst) + 1;
        max.fetch_max(now, Ordering::SeqCst);
        InFlight(count)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
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
    log: CallLog,
    /// When the shared pipe of [`Fault::Link`] is free again.
    link_free: Mutex<tokio::time::Instant>,
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
            log: CallLog::default(),
            link_free: Mutex::new(tokio::time::Instant::now()),
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
            in_flight_lists: load(&c.in_flight_lists),
            max_in_flight_lists: load(&c.max_in_flight_lists),
        }
    }

    /// Starts (or restarts, emptied) the call log: from now on every call
    /// is noted with its start and end (see [`Call`]).
    pub fn record_calls(&self) {
        self.log.start();
    }

    /// The calls noted since [`Self::record_calls`], in the order they
    /// started; empty when the log is off.
    pub fn calls(&self) -> Vec<Call> {
        self.log.calls()
    }

    /// Zeroes the counters. `in_flight_reads` and `in_flight_lists` are
    /// left alone because those calls are still running and will decrement
    /// them when they end; the maxima restart from them.
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
        c.max_in_flight_lists
            .store(c.in_flight_lists.load(Ordering::SeqCst), Ordering::SeqCst);
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
            Fault::Bandwidth { latency_ms, .. }
            | Fault::Link { latency_ms, .. }
            | Fault::HangFrom { latency_ms, .. } => {
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
        if matches!(fault, Fault::HangFrom { offset: from, .. } if offset >= from) {
            std::future::pending::<()>().await;
        }
        let data = self.inner.read_range(path, version, offset, len).await?;
        Ok(match fault {
            Fault::CorruptBytes => corrupt(&data, offset),
            Fault::Truncate => data.slice(..data.len() / 2),
            Fault::Bandwidth { bytes_per_sec, .. } => {
                tokio::time::sleep(transfer_time(data.len() as u64, bytes_per_sec)).await;
                data
            }
            Fault::Link { bytes_per_sec, .. } => {
                let transfer = transfer_time(data.len() as u64, bytes_per_sec);
                let done = {
                    let mut free = self.link_free.lock();
                    let done = (*free).max(tokio::time::Instant::now()) + transfer;
                    *free = done;
                    done
                };
                tokio::time::sleep_until(done).await;
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

    fn wrapped(&self) -> Option<&DynOrigin> {
        Some(&self.inner)
    }

    async fn list(&self, path: &OriginPath) -> Result<Vec<DirEntry>> {
        self.counters.list_calls.fetch_add(1, Ordering::SeqCst);
        let c = &self.counters;
        let _in_flight = InFlight::enter(&c.in_flight_lists, &c.max_in_flight_lists);
        let _noted = self.log.note(CallKind::List, Some(path), None);
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
        let _noted = self.log.note(CallKind::Stat, Some(path), None);
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
        let c = &self.counters;
        let _in_flight = InFlight::enter(&c.in_flight_reads, &c.max_in_flight_reads);
        let _noted = self
            .log
            .note(CallKind::Read, Some(path), Some((offset, len)));
        let result = self.read_inner(path, version, offset, len).await;
        if let Ok(data) = &result {
            self.counters
                .bytes_served
                .fetch_add(data.len() as u64, Ordering::SeqCst);
        }
        self.count_failure(result)
    }

    async fn read_link(&self, path: &OriginPath) -> Result<PathBuf> {
        self.counters.stat_calls.fetch_add(1, Ordering::SeqCst);
        let _noted = self.log.note(CallKind::ReadLink, Some(path), None);
        let result = match self.before(Op::Stat).await {
            Ok(_) => self.inner.read_link(path).await,
            Err(e) => Err(e),
        };
        self.count_failure(result)
    }

    async fn health(&self) -> Result<()> {
        self.counters.health_calls.fetch_add(1, Ordering::SeqCst);
        let _noted = self.log.note(CallKind::Health, None, None);
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

mod calls;
#[cfg(test)]
mod tests;

use calls::CallLog;
pub use calls::{Call, CallKind};
