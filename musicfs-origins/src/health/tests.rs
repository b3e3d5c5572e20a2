//! Unit tests of `health.rs`.

use super::*;
use crate::{DirEntry, EntryMeta, Origin, OriginPath, Result};
use async_trait::async_trait;
use bytes::Bytes;
use std::sync::atomic::{AtomicU32, Ordering};

fn version() -> FileVersion {
    FileVersion {
        size: 10,
        mtime_ns: None,
        etag: None,
    }
}

#[derive(Debug, Clone)]
enum Mode {
    Answer(Duration),
    Hang,
    Fail,
}

#[derive(Debug)]
struct Fake {
    id: OriginId,
    mode: parking_lot::Mutex<Mode>,
    probes: AtomicU32,
}

impl Fake {
    fn new(name: &str, mode: Mode) -> Arc<Fake> {
        Arc::new(Fake {
            id: OriginId::new(name).unwrap(),
            mode: parking_lot::Mutex::new(mode),
            probes: AtomicU32::new(0),
        })
    }

    fn set(&self, mode: Mode) {
        *self.mode.lock() = mode;
    }

    fn probes(&self) -> u32 {
        self.probes.load(Ordering::SeqCst)
    }

    fn unavailable(&self) -> OriginError {
        OriginError::Unavailable {
            origin: self.id.clone(),
            reason: "disk on fire".into(),
        }
    }
}

#[async_trait]
impl Origin for Fake {
    fn id(&self) -> &OriginId {
        &self.id
    }
    async fn list(&self, _: &OriginPath) -> Result<Vec<DirEntry>> {
        Err(self.unavailable())
    }
    async fn stat(&self, _: &OriginPath) -> Result<EntryMeta> {
        Err(self.unavailable())
    }
    async fn read_range(&self, _: &OriginPath, _: &FileVersion, _: u64, _: u64) -> Result<Bytes> {
        let mode = self.mode.lock().clone();
        match mode {
            Mode::Hang => std::future::pending().await,
            _ => Err(self.unavailable()),
        }
    }
    async fn health(&self) -> Result<()> {
        self.probes.fetch_add(1, Ordering::SeqCst);
        let mode = self.mode.lock().clone();
        match mode {
            Mode::Answer(delay) => {
                tokio::time::sleep(delay).await;
                Ok(())
            }
            Mode::Hang => std::future::pending().await,
            Mode::Fail => Err(self.unavailable()),
        }
    }
}

fn dyn_origin(fake: &Arc<Fake>) -> DynOrigin {
    Arc::clone(fake) as DynOrigin
}

fn state(monitor: &HealthMonitor, fake: &Fake) -> HealthState {
    monitor.status(&fake.id).unwrap().state
}

const MS: Duration = Duration::from_millis(1);

/// Virtual elapsed time is exact up to the timer wheel's 1 ms resolution.
fn assert_about(took: Duration, expected: Duration) {
    assert!(
        took >= expected && took <= expected + 2 * MS,
        "took {took:?}, expected about {expected:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn check_one_has_a_timeout() {
    let monitor = HealthMonitor::new(Duration::from_secs(1));
    for mode in [Mode::Answer(Duration::from_secs(60)), Mode::Hang] {
        let fake = Fake::new("slow", mode);
        let origin = dyn_origin(&fake);
        monitor.add(Arc::clone(&origin));

        let start = Instant::now();
        let health = monitor.check_one(&origin).await;
        assert_about(start.elapsed(), Duration::from_secs(1));
        assert_eq!(health.state, HealthState::Unhealthy);
        let error = health.last_error.unwrap();
        assert!(error.contains("no answer within 1s"), "{error}");
        assert_eq!(health.consecutive_failures, 1);
        assert_about(health.last_latency.unwrap(), Duration::from_secs(1));
        assert_eq!(state(&monitor, &fake), HealthState::Unhealthy);
    }
    assert_eq!(HealthMonitor::DEFAULT_TIMEOUT, Duration::from_secs(5));
}

#[tokio::test(start_paused = true)]
async fn a_changed_timeout_bounds_the_next_check() {
    let monitor = HealthMonitor::new(Duration::from_secs(5));
    let fake = Fake::new("slow", Mode::Hang);
    let origin = dyn_origin(&fake);
    monitor.add(Arc::clone(&origin));
    monitor.set_timeout(Duration::from_secs(2));
    assert_eq!(monitor.timeout(), Duration::from_secs(2));
    let start = Instant::now();
    let health = monitor.check_one(&origin).await;
    assert_about(start.elapsed(), Duration::from_secs(2));
    assert!(health.last_error.unwrap().contains("no answer within 2s"));
}

#[tokio::test(start_paused = true)]
async fn a_hung_call_marks_a_watched_origin_unhealthy_without_a_probe() {
    let monitor = Arc::new(HealthMonitor::new(Duration::from_secs(2)));
    let fake = Fake::new("nas", Mode::Answer(MS));
    let watched = monitor.watch(dyn_origin(&fake));
    monitor.check_one(&dyn_origin(&fake)).await;
    assert_eq!(state(&monitor, &fake), HealthState::Healthy);

    fake.set(Mode::Hang);
    let path = OriginPath::new("a.flac").unwrap();
    let read = tokio::spawn(async move { watched.read_range(&path, &version(), 0, 10).await });
    tokio::time::sleep(Duration::from_millis(1990)).await;
    assert_eq!(state(&monitor, &fake), HealthState::Healthy);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let health = monitor.status(&fake.id).unwrap();
    assert_eq!(health.state, HealthState::Unhealthy);
    assert!(health.last_error.unwrap().contains("read call"));
    assert_eq!(fake.probes(), 1, "no probe was needed");
    assert!(!read.is_finished(), "the read itself keeps waiting");
    read.abort();

    fake.set(Mode::Answer(MS));
    monitor.check_one(&dyn_origin(&fake)).await;
    assert_eq!(state(&monitor, &fake), HealthState::Healthy);
}

#[tokio::test(start_paused = true)]
async fn check_all_takes_the_slowest_check_not_the_sum() {
    let monitor = HealthMonitor::new(HealthMonitor::DEFAULT_TIMEOUT);
    let fakes: Vec<_> = ["a", "b", "c"]
        .into_iter()
        .map(|name| Fake::new(name, Mode::Answer(200 * MS)))
        .collect();
    for fake in &fakes {
        monitor.add(dyn_origin(fake));
    }
    let start = Instant::now();
    let results = monitor.check_all().await;
    assert_about(start.elapsed(), 200 * MS);
    assert_eq!(results.len(), 3);
    for ((id, health), fake) in results.iter().zip(&fakes) {
        assert_eq!(id, &fake.id);
        assert_eq!(health.state, HealthState::Healthy);
        assert_about(health.last_latency.unwrap(), 200 * MS);
    }
}

#[tokio::test(start_paused = true)]
async fn hung_origin_does_not_delay_a_healthy_one() {
    let monitor = Arc::new(HealthMonitor::new(HealthMonitor::DEFAULT_TIMEOUT));
    // Added first, so a sequential implementation would wait on it first.
    let hung = Fake::new("hung", Mode::Hang);
    let fine = Fake::new("fine", Mode::Answer(10 * MS));
    monitor.add(dyn_origin(&hung));
    monitor.add(dyn_origin(&fine));

    let start = Instant::now();
    let round = tokio::spawn({
        let monitor = Arc::clone(&monitor);
        async move { monitor.check_all().await }
    });
    tokio::time::sleep(100 * MS).await;
    // The healthy answer is recorded while the hung probe still waits.
    assert!(monitor.is_healthy(&fine.id));
    assert_eq!(state(&monitor, &hung), HealthState::Unknown);
    assert_about(
        monitor.status(&fine.id).unwrap().last_latency.unwrap(),
        10 * MS,
    );

    let results = round.await.unwrap();
    assert_about(start.elapsed(), HealthMonitor::DEFAULT_TIMEOUT);
    let hung_health = &results.iter().find(|(id, _)| id == &hung.id).unwrap().1;
    assert_eq!(hung_health.state, HealthState::Unhealthy);
    assert!(hung_health
        .last_error
        .as_deref()
        .unwrap()
        .contains("no answer within 5s"));
    assert!(monitor.is_healthy(&fine.id));
    assert!(!monitor.is_healthy(&hung.id));
}

#[tokio::test(start_paused = true)]
async fn errors_are_unhealthy_and_recovery_flips_state() {
    let monitor = HealthMonitor::new(Duration::from_secs(1));
    let fake = Fake::new("nas", Mode::Fail);
    let origin = dyn_origin(&fake);
    monitor.add(Arc::clone(&origin));
    let added = monitor.status(&fake.id).unwrap();
    assert_eq!(added.state, HealthState::Unknown);
    assert_eq!(added.last_checked, None);

    let first = monitor.check_one(&origin).await;
    assert_eq!(first.state, HealthState::Unhealthy);
    assert!(first
        .last_error
        .as_deref()
        .unwrap()
        .contains("disk on fire"));
    assert_eq!(first.last_latency, Some(Duration::ZERO));

    tokio::time::sleep(Duration::from_secs(10)).await;
    let second = monitor.check_one(&origin).await;
    assert_eq!(second.state, HealthState::Unhealthy);
    assert_eq!(second.since, first.since, "no state change, no new `since`");
    assert_eq!(second.consecutive_failures, 2);
    let checked_gap = second
        .last_checked
        .unwrap()
        .duration_since(first.last_checked.unwrap())
        .unwrap();
    assert_about(checked_gap, Duration::from_secs(10));

    fake.set(Mode::Answer(MS));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let third = monitor.check_one(&origin).await;
    assert_eq!(third.state, HealthState::Healthy);
    assert_eq!(third.consecutive_failures, 0);
    assert_eq!(third.last_error, None);
    let unhealthy_for = third.since.duration_since(first.since).unwrap();
    assert_about(unhealthy_for, Duration::from_secs(15) + MS);
    assert!(monitor.is_healthy(&fake.id));
}

#[tokio::test(start_paused = true)]
async fn statuses_are_sorted_and_unknown_is_not_healthy() {
    let monitor = HealthMonitor::new(Duration::from_secs(1));
    let b = Fake::new("b", Mode::Answer(Duration::ZERO));
    let a = Fake::new("a", Mode::Fail);
    monitor.add(dyn_origin(&b));
    monitor.add(dyn_origin(&a));
    assert!(!monitor.is_healthy(&b.id));
    assert!(monitor.status(&OriginId::new("zzz").unwrap()).is_none());

    monitor.check_all().await;
    let ids: Vec<_> = monitor
        .statuses()
        .into_iter()
        .map(|(id, h)| (id.to_string(), h.state))
        .collect();
    assert_eq!(
        ids,
        [
            ("a".to_owned(), HealthState::Unhealthy),
            ("b".to_owned(), HealthState::Healthy)
        ]
    );

    // Re-adding an id replaces the origin and forgets the old answers.
    let b2 = Fake::new("b", Mode::Fail);
    monitor.add(dyn_origin(&b2));
    assert_eq!(monitor.origins().len(), 2);
    assert_eq!(state(&monitor, &b2), HealthState::Unknown);
    monitor.check_all().await;
    assert_eq!(state(&monitor, &b2), HealthState::Unhealthy);
    assert_eq!(b.probes(), 1);
}

#[tokio::test(start_paused = true)]
async fn periodic_task_checks_over_time_and_stops_on_drop() {
    let monitor = Arc::new(HealthMonitor::new(Duration::from_secs(1)));
    let fake = Fake::new("nas", Mode::Answer(Duration::ZERO));
    monitor.add(dyn_origin(&fake));

    let task = monitor.spawn(Duration::from_secs(30));
    // The first round runs at once.
    tokio::time::sleep(MS).await;
    assert_eq!(fake.probes(), 1);
    assert!(monitor.is_healthy(&fake.id));

    fake.set(Mode::Fail);
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(fake.probes(), 2);
    assert_eq!(state(&monitor, &fake), HealthState::Unhealthy);

    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(fake.probes(), 4);
    assert_eq!(monitor.status(&fake.id).unwrap().consecutive_failures, 3);

    drop(task);
    fake.set(Mode::Answer(Duration::ZERO));
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(
        fake.probes(),
        4,
        "checks continued after the task was dropped"
    );
    assert_eq!(state(&monitor, &fake), HealthState::Unhealthy);
}

#[tokio::test(start_paused = true)]
async fn periodic_task_stops_on_stop_and_with_its_monitor() {
    let fake = Fake::new("nas", Mode::Answer(Duration::ZERO));
    let monitor = Arc::new(HealthMonitor::new(Duration::from_secs(1)));
    monitor.add(dyn_origin(&fake));
    let task = monitor.spawn(Duration::from_secs(10));
    tokio::time::sleep(MS).await;
    task.stop();
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(fake.probes(), 1);

    let task = monitor.spawn(Duration::from_secs(10));
    tokio::time::sleep(MS).await;
    assert_eq!(fake.probes(), 2);
    drop(monitor);
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(task.is_finished());
    // The fake is no longer referenced by any monitor.
    assert_eq!(Arc::strong_count(&fake), 1);
}
