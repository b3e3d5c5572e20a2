//! The call log of a [`super::FaultyOrigin`]: which calls were made, on
//! what, and when each started and ended.
//!
//! Layer: test helper beside the counters. Off until
//! [`super::FaultyOrigin::record_calls`]; then every call is noted when it
//! starts, and its end is noted by a drop guard, so a call cancelled by a
//! caller's timeout still gets an end. A test reads overlap from it
//! ("the read started before the stat ended": one round trip, not two)
//! instead of timing anything. Times are `tokio::time::Instant`, so paused
//! time in unit tests orders them too.

use musicfs_origins::OriginPath;
use parking_lot::Mutex;
use tokio::time::Instant;

/// Which origin operation a [`Call`] was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CallKind {
    Read,
    List,
    Stat,
    ReadLink,
    Health,
}

/// One origin call as the log saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub kind: CallKind,
    /// `None` for `health`.
    pub path: Option<OriginPath>,
    /// For a read: the offset and length asked for.
    pub range: Option<(u64, u64)>,
    pub started: Instant,
    /// When the call returned (or was dropped unfinished); `None` while it
    /// runs.
    pub ended: Option<Instant>,
}

impl Call {
    /// Whether the two calls ran at the same time for a while.
    pub fn overlaps(&self, other: &Call) -> bool {
        let ends_after = |c: &Call, t: Instant| !matches!(c.ended, Some(e) if e <= t);
        ends_after(self, other.started) && ends_after(other, self.started)
    }
}

#[derive(Debug, Default)]
struct Log {
    on: bool,
    /// Bumped by each restart, so a guard of a call noted before it does
    /// not mark a call of the new log.
    generation: u64,
    calls: Vec<Call>,
}

#[derive(Debug, Default)]
pub(super) struct CallLog(Mutex<Log>);

impl CallLog {
    pub(super) fn start(&self) {
        let mut log = self.0.lock();
        log.on = true;
        log.generation += 1;
        log.calls.clear();
    }

    pub(super) fn calls(&self) -> Vec<Call> {
        self.0.lock().calls.clone()
    }

    /// Notes a call starting now; the guard notes its end when dropped.
    pub(super) fn note(
        &self,
        kind: CallKind,
        path: Option<&OriginPath>,
        range: Option<(u64, u64)>,
    ) -> Option<Noted<'_>> {
        let mut log = self.0.lock();
        if !log.on {
            return None;
        }
        log.calls.push(Call {
            kind,
            path: path.cloned(),
            range,
            started: Instant::now(),
            ended: None,
        });
        Some(Noted {
            log: self,
            generation: log.generation,
            index: log.calls.len() - 1,
        })
    }
}

/// Notes the end of one logged call when dropped.
pub(super) struct Noted<'a> {
    log: &'a CallLog,
    generation: u64,
    index: usize,
}

impl Drop for Noted<'_> {
    fn drop(&mut self) {
        let mut log = self.log.0.lock();
        if log.generation == self.generation {
            if let Some(call) = log.calls.get_mut(self.index) {
                call.ended = Some(Instant::now());
            }
        }
    }
}
