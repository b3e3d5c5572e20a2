//! Health monitoring: which origins answer right now.
//!
//! Layer: beside the origins, above them. The monitor probes each origin's
//! [`Origin::health`] and keeps the latest answer so upper layers (the
//! filesystem, status output) can decide quickly whether to wait for an
//! origin or serve from cache.
//!
//! Invariants:
//! - A check never takes longer than the monitor's timeout: a probe that does
//!   not answer in time is abandoned and counts as unhealthy.
//! - A hung origin never delays another origin's check: [`HealthMonitor::check_all`]
//!   runs every probe concurrently, so it takes about as long as the slowest
//!   single check (at most the timeout), never the sum.
//! - Health probes are never retried here or in [`crate::retry`]: a probe
//!   answers "right now", and the next periodic check is the retry.
//! - A hang is seen without waiting for the next probe: origins handed out
//!   by [`HealthMonitor::watch`] report any call still unanswered after the
//!   monitor's timeout, which marks the origin unhealthy at that moment.
//! - The timeout can change while the monitor runs ([`HealthMonitor::set_timeout`],
//!   a SIGHUP reload); a check uses the value current when it starts.
//! - Times come from tokio's clock (latencies from `tokio::time::Instant`;
//!   `since`/`last_checked` are wall times derived from it), so they advance
//!   with paused test time and never jump with wall-clock adjustments.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures::future::join_all;
use parking_lot::RwLock;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use crate::{
    DirEntry, DynOrigin, EntryMeta, FileVersion, Origin, OriginError, OriginId, OriginPath, Result,
};

/// What the monitor last concluded about an origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HealthState {
    /// Not checked yet.
    Unknown,
    Healthy,
    Unhealthy,
}

/// The latest health of one origin.
#[derive(Debug, Clone)]
pub struct OriginHealth {
    pub state: HealthState,
    /// How long the most recent check took; for a timed-out check, the
    /// timeout.
    pub last_latency: Option<Duration>,
    /// The error of the most recent check; `None` once a check succeeds.
    pub last_error: Option<String>,
    /// When `state` last changed (or when the origin was added).
    pub since: SystemTime,
    /// When the most recent check finished.
    pub last_checked: Option<SystemTime>,
    /// Failed checks in a row; 0 after a success.
    pub consecutive_failures: u32,
}

impl OriginHealth {
    fn unknown(since: SystemTime) -> Self {
        OriginHealth {
            state: HealthState::Unknown,
            last_latency: None,
            last_error: None,
            since,
            last_checked: None,
            consecutive_failures: 0,
        }
    }
}

/// Wall time that advances with tokio's clock: stable under wall-clock
/// adjustments, and deterministic when tests pause time.
#[derive(Debug)]
struct Clock {
    wall: SystemTime,
    mono: Instant,
}

impl Clock {
    fn new() -> Self {
        Clock {
            wall: SystemTime::now(),
            mono: Instant::now(),
        }
    }

    fn now(&self) -> SystemTime {
        self.wall + Instant::now().saturating_duration_since(self.mono)
    }
}

/// Periodically probes a set of origins and remembers their health.
#[derive(Debug)]
pub struct HealthMonitor {
    /// The check timeout in nanoseconds; atomic so a reload can change it.
    timeout_ns: AtomicU64,
    clock: Clock,
    origins: RwLock<Vec<DynOrigin>>,
    statuses: RwLock<HashMap<OriginId, OriginHealth>>,
}

impl HealthMonitor {
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

    /// A monitor whose checks each give up after `timeout`.
    pub fn new(timeout: Duration) -> Self {
        HealthMonitor {
            timeout_ns: AtomicU64::new(nanos(timeout)),
            clock: Clock::new(),
            origins: RwLock::new(Vec::new()),
            statuses: RwLock::new(HashMap::new()),
        }
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_nanos(self.timeout_ns.load(Ordering::Relaxed))
    }

    /// Changes the timeout of the checks (and of the hang detection of
    /// watched origins) from the next one on.
    pub fn set_timeout(&self, timeout: Duration) {
        self.timeout_ns.store(nanos(timeout), Ordering::Relaxed);
    }

    /// Starts monitoring `origin`; its state is `Unknown` until checked. An
    /// origin with the same id replaces the old one and starts over as
    /// `Unknown`, since the old answers were about a different origin.
    pub fn add(&self, origin: DynOrigin) {
        let id = origin.id().clone();
        {
            let mut origins = self.origins.write();
            match origins.iter_mut().find(|o| o.id() == &id) {
                Some(slot) => *slot = origin,
                None => origins.push(origin),
            }
        }
        self.statuses
            .write()
            .insert(id, OriginHealth::unknown(self.clock.now()));
    }

    /// Monitors `origin` (as [`add`](Self::add) does) and returns it wrapped
    /// so that any of its calls still unanswered after the monitor's timeout
    /// marks it unhealthy right away; the next probe that succeeds marks it
    /// healthy again. Use the returned origin for reads.
    pub fn watch(self: &Arc<Self>, origin: DynOrigin) -> DynOrigin {
        self.add(Arc::clone(&origin));
        Arc::new(Watched {
            inner: origin,
            monitor: Arc::downgrade(self),
        })
    }

    pub fn origins(&self) -> Vec<DynOrigin> {
        self.origins.read().clone()
    }

    /// Probes one origin, bounded by the monitor's timeout, and records the
    /// result (also for an origin that was never added).
    pub async fn check_one(&self, origin: &DynOrigin) -> OriginHealth {
        let id = origin.id();
        let start = Instant::now();
        let timeout = self.timeout();
        let outcome = tokio::time::timeout(timeout, origin.health()).await;
        let latency = start.elapsed();
        let error = match outcome {
            Ok(Ok(())) => None,
            Ok(Err(err)) => Some(err.to_string()),
            Err(_elapsed) => Some(
                OriginError::Timeout {
                    origin: id.clone(),
                    timeout,
                }
                .to_string(),
            ),
        };
        self.record(id, latency, error)
    }

    /// Probes every origin concurrently; returns the results sorted by id.
    pub async fn check_all(&self) -> Vec<(OriginId, OriginHealth)> {
        // Snapshot so no lock is held across the probes.
        let origins = self.origins();
        let mut results = join_all(
            origins
                .iter()
                .map(|origin| async move { (origin.id().clone(), self.check_one(origin).await) }),
        )
        .await;
        results.sort_by(|a, b| a.0.cmp(&b.0));
        results
    }

    pub fn status(&self, id: &OriginId) -> Option<OriginHealth> {
        self.statuses.read().get(id).cloned()
    }

    /// Every known origin's health, sorted by id.
    pub fn statuses(&self) -> Vec<(OriginId, OriginHealth)> {
        let mut all: Vec<_> = self
            .statuses
            .read()
            .iter()
            .map(|(id, health)| (id.clone(), health.clone()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// True only when the last check succeeded; `Unknown` is not healthy.
    pub fn is_healthy(&self, id: &OriginId) -> bool {
        self.statuses
            .read()
            .get(id)
            .is_some_and(|h| h.state == HealthState::Healthy)
    }

    /// Runs [`check_all`](Self::check_all) now and then every `interval`
    /// (at least 1 ms) until the returned task is dropped or stopped, or the
    /// monitor itself is dropped. A slow round delays the next one instead of
    /// piling rounds up.
    pub fn spawn(self: &Arc<Self>, interval: Duration) -> MonitorTask {
        let monitor: Weak<Self> = Arc::downgrade(self);
        // tokio::time::interval panics on a zero period.
        let period = interval.max(Duration::from_millis(1));
        let handle = tokio::spawn(async move {
            let mut ticks = tokio::time::interval(period);
            ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                // Weak, so a forgotten task does not keep the monitor alive.
                let Some(monitor) = monitor.upgrade() else {
                    break;
                };
                monitor.check_all().await;
            }
        });
        MonitorTask { handle }
    }

    fn record(&self, id: &OriginId, latency: Duration, error: Option<String>) -> OriginHealth {
        let now = self.clock.now();
        let new_state = match error {
            None => HealthState::Healthy,
            Some(_) => HealthState::Unhealthy,
        };
        let (previous, health) = {
            let mut statuses = self.statuses.write();
            let health = statuses
                .entry(id.clone())
                .or_insert_with(|| OriginHealth::unknown(now));
            let previous = health.state;
            if previous != new_state {
                health.state = new_state;
                health.since = now;
            }
            health.last_latency = Some(latency);
            health.last_checked = Some(now);
            health.consecutive_failures = match error {
                None => 0,
                Some(_) => health.consecutive_failures.saturating_add(1),
            };
            health.last_error = error;
            (previous, health.clone())
        };
        match (previous, new_state) {
            (HealthState::Unhealthy, HealthState::Unhealthy)
            | (HealthState::Healthy, HealthState::Healthy) => {}
            (_, HealthState::Unhealthy) => tracing::warn!(
                origin = %id,
                error = health.last_error.as_deref().unwrap_or_default(),
                "origin became unhealthy; reads from it will fail or wait until it recovers"
            ),
            (HealthState::Unhealthy, _) => {
                tracing::info!(origin = %id, ?latency, "origin recovered")
            }
            (_, _) => tracing::debug!(origin = %id, ?latency, "origin is healthy"),
        }
        health
    }
}

/// A duration as nanoseconds, saturating (u64 nanoseconds is 584 years).
fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// An origin whose calls report a hang to its monitor (see
/// [`HealthMonitor::watch`]).
#[derive(Debug)]
struct Watched {
    inner: DynOrigin,
    monitor: Weak<HealthMonitor>,
}

impl Watched {
    /// Awaits `call`; if it is still waiting after the monitor's timeout,
    /// records the origin unhealthy and goes on waiting (the caller's own
    /// timeout decides when to give up).
    async fn watched<T>(&self, op: &str, call: impl Future<Output = Result<T>>) -> Result<T> {
        let Some(timeout) = self.monitor.upgrade().map(|m| m.timeout()) else {
            return call.await;
        };
        tokio::pin!(call);
        tokio::select! {
            result = &mut call => return result,
            () = tokio::time::sleep(timeout) => {}
        }
        if let Some(monitor) = self.monitor.upgrade() {
            let error =
                format!("a {op} call has had no answer for {timeout:?}; the origin may be hung");
            monitor.record(self.inner.id(), timeout, Some(error));
        }
        call.await
    }
}

#[async_trait]
impl Origin for Watched {
    fn id(&self) -> &OriginId {
        self.inner.id()
    }

    fn wrapped(&self) -> Option<&DynOrigin> {
        Some(&self.inner)
    }

    async fn list(&self, path: &OriginPath) -> Result<Vec<DirEntry>> {
        self.watched("list", self.inner.list(path)).await
    }

    async fn stat(&self, path: &OriginPath) -> Result<EntryMeta> {
        self.watched("stat", self.inner.stat(path)).await
    }

    async fn read_range(
        &self,
        path: &OriginPath,
        version: &FileVersion,
        offset: u64,
        len: u64,
    ) -> Result<Bytes> {
        self.watched("read", self.inner.read_range(path, version, offset, len))
            .await
    }

    async fn health(&self) -> Result<()> {
        // Probes have their own timeout and record their own result.
        self.inner.health().await
    }

    async fn read_link(&self, path: &OriginPath) -> Result<PathBuf> {
        self.watched("readlink", self.inner.read_link(path)).await
    }
}

/// The periodic check loop started by [`HealthMonitor::spawn`]; dropping it
/// stops the loop.
#[derive(Debug)]
pub struct MonitorTask {
    handle: JoinHandle<()>,
}

impl MonitorTask {
    /// Stops the loop (same as dropping it).
    pub fn stop(self) {
        drop(self);
    }

    /// True once the loop has ended (its monitor was dropped).
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }
}

impl Drop for MonitorTask {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

#[cfg(test)]
mod tests;
