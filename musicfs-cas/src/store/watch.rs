//! Noticing a cache disk that stopped answering.
//!
//! An NFS cache directory whose server went away does not fail: its system
//! calls block, possibly for ever. A blocked call cannot be cancelled, so
//! the store cannot get its thread back; what it can do is notice and stop
//! sending work there. Every chunk-file operation is registered here with
//! its start time for as long as it runs. When the oldest one has run for
//! longer than the disk timeout, the disk counts as *not answering*: the
//! store reports itself degraded, refuses new disk work at once (the async
//! read path then reads through the origin, the blocking path declines),
//! and turns healthy again by itself as soon as the stuck operations
//! return. Async callers also bound each operation with the same timeout,
//! so the first read to meet a hang waits at most that long.
//!
//! Invariant: the check costs one uncontended lock and no system call, so
//! every read can afford it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

#[derive(Debug)]
pub(crate) struct DiskWatch {
    timeout: Duration,
    next: AtomicU64,
    in_flight: Mutex<BTreeMap<u64, Instant>>,
    /// Test hook: while true, every operation blocks, as on a disk that
    /// stopped answering.
    hang: Mutex<bool>,
    unhung: Condvar,
}

/// One registered disk operation; deregistered on drop.
#[derive(Debug)]
pub(crate) struct DiskOp<'a> {
    watch: &'a DiskWatch,
    seq: u64,
}

impl Drop for DiskOp<'_> {
    fn drop(&mut self) {
        self.watch.in_flight.lock().remove(&self.seq);
    }
}

impl DiskWatch {
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            next: AtomicU64::new(0),
            in_flight: Mutex::new(BTreeMap::new()),
            hang: Mutex::new(false),
            unhung: Condvar::new(),
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Registers a disk operation that runs until the guard drops.
    pub fn start(&self) -> DiskOp<'_> {
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        self.in_flight.lock().insert(seq, Instant::now());
        let op = DiskOp { watch: self, seq };
        let mut hang = self.hang.lock();
        while *hang {
            self.unhung.wait(&mut hang);
        }
        op
    }

    /// How long the oldest operation in flight has run, when that is
    /// longer than the timeout: the disk is not answering.
    pub fn stuck_for(&self) -> Option<Duration> {
        let oldest = self.in_flight.lock().values().next().copied()?;
        let ran = oldest.elapsed();
        (ran > self.timeout).then_some(ran)
    }

    pub fn set_hang(&self, hang: bool) {
        *self.hang.lock() = hang;
        self.unhung.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_operation_past_the_timeout_marks_the_disk_stuck_until_it_returns() {
        let w = DiskWatch::new(Duration::from_millis(20));
        assert_eq!(w.stuck_for(), None);
        let op = w.start();
        let quick = w.start();
        drop(quick);
        let deadline = Instant::now() + Duration::from_secs(10);
        while w.stuck_for().is_none() {
            assert!(Instant::now() < deadline, "never noticed");
            std::thread::yield_now();
        }
        drop(op);
        assert_eq!(w.stuck_for(), None);
    }
}
