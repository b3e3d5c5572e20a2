//! Retries: the one place in MusicFS where an origin call is attempted again.
//!
//! Layer: a wrapper origin. Every [`Origin`] does exactly one attempt per
//! call; [`RetryOrigin`] wraps any origin and retries the calls whose error
//! says retrying can help ([`OriginError::is_retryable`]). Wrappers compose
//! (a timeout wrapper, a fault injector, a cache), and keeping retries in this
//! single layer means stacking them never multiplies them: wrap an origin
//! in `RetryOrigin` once, at the top of the stack that talks to the origin.
//!
//! Invariants:
//! - At most `max_attempts` attempts per call (at least one). The wait
//!   before attempt n+1 is drawn between half and all of
//!   `initial_backoff * 2^(n-1)` (capped at `max_backoff`): the jitter
//!   spreads out the retries of many readers that failed together, so a
//!   server coming back is not met by all of them at once.
//! - A [`OriginError::Throttled`] answer waits at least the server's
//!   `Retry-After` (capped by [`RetryOrigin::with_max_throttle_wait`]) and
//!   at least the backoff, which keeps doubling: a throttled origin is
//!   asked less often, not more.
//! - With [`RetryOrigin::with_deadline`], no wait is started that would end
//!   past the call's deadline: the last error is returned at once instead,
//!   so the caller hears "throttled" or "unavailable", not its own timeout.
//! - Permanent errors (missing file, wrong kind, permission, bad
//!   credentials, ...) return after the first attempt; after the last
//!   attempt the last error is returned.
//! - [`Origin::health`] is passed through untried-again: it is a probe of
//!   "right now", and the health monitor's next round is its retry.
//! - This layer sets no timeouts: a call that hangs is bounded by the caller
//!   (or a `TimeoutOrigin` below).

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use parking_lot::Mutex;
use tokio::time::Instant;

use crate::{
    DirEntry, DynOrigin, EntryMeta, FileVersion, Origin, OriginError, OriginId, OriginPath, Result,
};

/// How often and how patiently to retry.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Total attempts per call, the first included; 0 is treated as 1.
    pub max_attempts: u32,
    /// Wait before the second attempt; doubled before each later one.
    pub initial_backoff: Duration,
    /// Upper bound for any single wait.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
        }
    }
}

impl RetryPolicy {
    /// The wait after failed attempt number `attempt` (1-based).
    fn backoff(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1);
        let factor = 2u32.checked_pow(doublings).unwrap_or(u32::MAX);
        self.initial_backoff
            .checked_mul(factor)
            .unwrap_or(Duration::MAX)
            .min(self.max_backoff)
    }
}

/// An origin that retries its inner origin's retryable failures.
#[derive(Debug)]
pub struct RetryOrigin {
    inner: DynOrigin,
    policy: RetryPolicy,
    deadline: Option<Duration>,
    max_throttle_wait: Duration,
    rng: Mutex<fastrand::Rng>,
}

impl RetryOrigin {
    /// Default cap on how long one `Retry-After` is honoured.
    pub const DEFAULT_MAX_THROTTLE_WAIT: Duration = Duration::from_secs(30);

    pub fn new(inner: DynOrigin, policy: RetryPolicy) -> Self {
        RetryOrigin {
            inner,
            policy,
            deadline: None,
            max_throttle_wait: Self::DEFAULT_MAX_THROTTLE_WAIT,
            rng: Mutex::new(fastrand::Rng::new()),
        }
    }

    /// Each call, its waits included, fits in `deadline` (the caller's
    /// read timeout): a wait that would end later is not started.
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// A `Retry-After` longer than `cap` is waited for `cap` only.
    pub fn with_max_throttle_wait(mut self, cap: Duration) -> Self {
        self.max_throttle_wait = cap;
        self
    }

    pub fn policy(&self) -> &RetryPolicy {
        &self.policy
    }

    /// The wait after failed attempt `attempt` that ended in `err`.
    fn wait_after(&self, attempt: u32, err: &OriginError) -> Duration {
        let full = self.policy.backoff(attempt);
        // Between half and all of the backoff.
        let half = full / 2;
        let spread = (full - half).as_nanos().min(u128::from(u64::MAX)) as u64;
        let jittered = half + Duration::from_nanos(self.rng.lock().u64(0..=spread));
        match err {
            OriginError::Throttled {
                retry_after: Some(asked),
                ..
            } => jittered.max((*asked).min(self.max_throttle_wait)),
            _ => jittered,
        }
    }

    async fn retry<T, F, Fut>(&self, op: &'static str, path: &OriginPath, mut call: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let max_attempts = self.policy.max_attempts.max(1);
        let started = Instant::now();
        let mut attempt = 1;
        loop {
            match call().await {
                Err(err) if err.is_retryable() && attempt < max_attempts => {
                    let wait = self.wait_after(attempt, &err);
                    if let Some(deadline) = self.deadline {
                        if started.elapsed() + wait >= deadline {
                            tracing::debug!(
                                origin = %self.inner.id(),
                                op,
                                %path,
                                attempt,
                                ?wait,
                                error = %err,
                                "not retrying: the wait would pass the call's deadline"
                            );
                            return Err(err);
                        }
                    }
                    tracing::debug!(
                        origin = %self.inner.id(),
                        op,
                        %path,
                        attempt,
                        max_attempts,
                        ?wait,
                        error = %err,
                        "retrying origin call"
                    );
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                result => return result,
            }
        }
    }
}

#[async_trait]
impl Origin for RetryOrigin {
    fn id(&self) -> &OriginId {
        self.inner.id()
    }

    fn wrapped(&self) -> Option<&DynOrigin> {
        Some(&self.inner)
    }

    async fn list(&self, path: &OriginPath) -> Result<Vec<DirEntry>> {
        self.retry("list", path, || self.inner.list(path)).await
    }

    async fn stat(&self, path: &OriginPath) -> Result<EntryMeta> {
        self.retry("stat", path, || self.inner.stat(path)).await
    }

    async fn read_range(
        &self,
        path: &OriginPath,
        version: &FileVersion,
        offset: u64,
        len: u64,
    ) -> Result<Bytes> {
        self.retry("read", path, || {
            self.inner.read_range(path, version, offset, len)
        })
        .await
    }

    async fn health(&self) -> Result<()> {
        self.inner.health().await
    }

    async fn read_link(&self, path: &OriginPath) -> Result<PathBuf> {
        self.retry("readlink", path, || self.inner.read_link(path))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{EntryKind, OriginError};
    use std::collections::VecDeque;
    use std::sync::Arc;
    use tokio::time::Instant;

    fn version() -> FileVersion {
        FileVersion {
            size: 7,
            mtime_ns: None,
            etag: None,
        }
    }

    /// Builds the error for the given attempt number (1-based).
    type Failure = fn(&OriginId, u32) -> OriginError;

    /// Answers each call with the next scripted failure, then succeeds;
    /// records when each attempt started.
    #[derive(Debug)]
    struct Scripted {
        id: OriginId,
        failures: parking_lot::Mutex<VecDeque<Failure>>,
        attempts: parking_lot::Mutex<Vec<Instant>>,
        range_reads: bool,
    }

    fn unavailable(origin: &OriginId, attempt: u32) -> OriginError {
        OriginError::Unavailable {
            origin: origin.clone(),
            reason: format!("attempt {attempt} failed"),
        }
    }

    fn not_found(origin: &OriginId, _: u32) -> OriginError {
        OriginError::NotFound {
            origin: origin.clone(),
            path: "/a.flac".into(),
        }
    }

    impl Scripted {
        fn new(failures: Vec<Failure>) -> Arc<Scripted> {
            Arc::new(Scripted {
                id: OriginId::new("nas").unwrap(),
                failures: parking_lot::Mutex::new(failures.into()),
                attempts: parking_lot::Mutex::new(Vec::new()),
                range_reads: false,
            })
        }

        fn attempt(&self) -> Result<()> {
            let mut attempts = self.attempts.lock();
            attempts.push(Instant::now());
            let number = attempts.len() as u32;
            match self.failures.lock().pop_front() {
                Some(fail) => Err(fail(&self.id, number)),
                None => Ok(()),
            }
        }

        fn gaps(&self) -> Vec<Duration> {
            let attempts = self.attempts.lock();
            attempts.windows(2).map(|w| w[1] - w[0]).collect()
        }

        fn count(&self) -> usize {
            self.attempts.lock().len()
        }
    }

    #[async_trait]
    impl Origin for Scripted {
        fn id(&self) -> &OriginId {
            &self.id
        }
        async fn list(&self, _: &OriginPath) -> Result<Vec<DirEntry>> {
            self.attempt().map(|()| Vec::new())
        }
        async fn stat(&self, _: &OriginPath) -> Result<EntryMeta> {
            self.attempt().map(|()| EntryMeta {
                kind: EntryKind::File,
                size: 7,
                mtime_ns: None,
                etag: None,
            })
        }
        async fn read_range(
            &self,
            _: &OriginPath,
            _: &FileVersion,
            _: u64,
            _: u64,
        ) -> Result<Bytes> {
            self.attempt().map(|()| Bytes::from_static(b"flac"))
        }
        async fn health(&self) -> Result<()> {
            self.attempt()
        }
        fn supports_range_reads(&self) -> bool {
            self.range_reads
        }
    }

    fn wrap(inner: &Arc<Scripted>, policy: RetryPolicy) -> RetryOrigin {
        RetryOrigin::new(Arc::clone(inner) as DynOrigin, policy)
    }

    fn path() -> OriginPath {
        OriginPath::new("a.flac").unwrap()
    }

    const MS: Duration = Duration::from_millis(1);

    /// Each gap is between half and all of its full backoff.
    fn assert_within(gaps: &[Duration], full: &[Duration]) {
        assert_eq!(gaps.len(), full.len(), "{gaps:?}");
        for (gap, full) in gaps.iter().zip(full) {
            assert!(
                *gap >= *full / 2 && gap <= full,
                "gap {gap:?} outside [{:?}, {full:?}] in {gaps:?}",
                *full / 2
            );
        }
    }

    fn throttled(origin: &OriginId, _: u32) -> OriginError {
        OriginError::Throttled {
            origin: origin.clone(),
            reason: "HTTP 503: SlowDown".into(),
            retry_after: Some(Duration::from_secs(3)),
        }
    }

    fn throttled_no_hint(origin: &OriginId, _: u32) -> OriginError {
        OriginError::Throttled {
            origin: origin.clone(),
            reason: "HTTP 429".into(),
            retry_after: None,
        }
    }

    fn access_denied(origin: &OriginId, _: u32) -> OriginError {
        OriginError::AccessDenied {
            origin: origin.clone(),
            reason: "HTTP 403: SignatureDoesNotMatch".into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_is_jittered_so_failed_readers_do_not_return_together() {
        let mut first_gaps = Vec::new();
        for _ in 0..20 {
            let inner = Scripted::new(vec![unavailable]);
            wrap(&inner, RetryPolicy::default())
                .stat(&path())
                .await
                .unwrap();
            let gaps = inner.gaps();
            assert_within(&gaps, &[100 * MS]);
            first_gaps.push(gaps[0]);
        }
        first_gaps.sort();
        first_gaps.dedup();
        assert!(
            first_gaps.len() > 5,
            "20 retries waited only {first_gaps:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn throttling_waits_for_retry_after_and_keeps_backing_off() {
        let policy = RetryPolicy {
            max_attempts: 4,
            initial_backoff: Duration::from_secs(2),
            max_backoff: Duration::from_secs(10),
        };
        let inner = Scripted::new(vec![throttled; 3]);
        wrap(&inner, policy.clone()).stat(&path()).await.unwrap();
        let gaps = inner.gaps();
        // Retry-After 3 s is honoured; the doubled backoff takes over once
        // it is longer (8 s at most after the third failure).
        assert!(
            gaps[0] >= Duration::from_secs(3) && gaps[0] <= Duration::from_secs(3),
            "{gaps:?}"
        );
        assert!(
            gaps[1] >= Duration::from_secs(3) && gaps[1] <= Duration::from_secs(4),
            "{gaps:?}"
        );
        assert!(
            gaps[2] >= Duration::from_secs(4) && gaps[2] <= Duration::from_secs(8),
            "{gaps:?}"
        );

        // Without a hint, throttling backs off like any transient failure.
        let inner = Scripted::new(vec![throttled_no_hint]);
        wrap(&inner, policy.clone()).stat(&path()).await.unwrap();
        assert_within(&inner.gaps(), &[Duration::from_secs(2)]);

        // A Retry-After past the cap is waited for the cap.
        let inner = Scripted::new(vec![throttled]);
        let capped = wrap(
            &inner,
            RetryPolicy {
                initial_backoff: 10 * MS,
                ..policy
            },
        )
        .with_max_throttle_wait(Duration::from_secs(1));
        capped.stat(&path()).await.unwrap();
        assert_eq!(inner.gaps(), [Duration::from_secs(1)]);
    }

    #[tokio::test(start_paused = true)]
    async fn no_wait_is_started_past_the_deadline() {
        // Retry-After 3 s does not fit a 2 s read timeout: the caller hears
        // "throttled" at once instead of its own timeout later.
        let inner = Scripted::new(vec![throttled, throttled]);
        let origin = wrap(&inner, RetryPolicy::default()).with_deadline(Duration::from_secs(2));
        let start = Instant::now();
        let err = origin
            .read_range(&path(), &version(), 0, 4)
            .await
            .unwrap_err();
        assert!(matches!(err, OriginError::Throttled { .. }), "{err}");
        assert_eq!(inner.count(), 1);
        assert_eq!(start.elapsed(), Duration::ZERO);

        // Short waits that fit are still taken.
        let inner = Scripted::new(vec![unavailable, unavailable]);
        let origin = wrap(&inner, RetryPolicy::default()).with_deadline(Duration::from_secs(2));
        origin.read_range(&path(), &version(), 0, 4).await.unwrap();
        assert_eq!(inner.count(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn bad_credentials_are_not_retried() {
        let inner = Scripted::new(vec![access_denied, unavailable]);
        let err = wrap(&inner, RetryPolicy::default())
            .list(&OriginPath::root())
            .await
            .unwrap_err();
        assert!(matches!(err, OriginError::AccessDenied { .. }), "{err}");
        assert_eq!(inner.count(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn retryable_failures_are_retried_with_exponential_backoff() {
        let inner = Scripted::new(vec![unavailable, unavailable]);
        let origin = wrap(&inner, RetryPolicy::default());
        let start = Instant::now();
        let data = origin.read_range(&path(), &version(), 0, 4).await.unwrap();
        let took = start.elapsed();
        assert_eq!(&data[..], b"flac");
        assert_eq!(inner.count(), 3);
        assert_within(&inner.gaps(), &[100 * MS, 200 * MS]);
        assert!(took >= 150 * MS && took <= 300 * MS, "took {took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn list_and_stat_are_retried_too() {
        let inner = Scripted::new(vec![unavailable]);
        let origin = wrap(&inner, RetryPolicy::default());
        assert_eq!(origin.stat(&path()).await.unwrap().size, 7);
        assert_eq!(inner.count(), 2);

        let inner = Scripted::new(vec![unavailable]);
        let origin = wrap(&inner, RetryPolicy::default());
        assert!(origin.list(&OriginPath::root()).await.unwrap().is_empty());
        assert_eq!(inner.count(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_errors_return_after_one_attempt() {
        let inner = Scripted::new(vec![not_found, unavailable]);
        let origin = wrap(&inner, RetryPolicy::default());
        let start = Instant::now();
        let err = origin.stat(&path()).await.unwrap_err();
        assert!(err.is_not_found(), "{err}");
        assert_eq!(inner.count(), 1);
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn exhausted_attempts_return_the_last_error() {
        let inner = Scripted::new(vec![unavailable; 5]);
        let origin = wrap(&inner, RetryPolicy::default());
        let start = Instant::now();
        let err = origin
            .read_range(&path(), &version(), 0, 4)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("attempt 3 failed"), "{err}");
        assert!(err.is_retryable());
        assert_eq!(inner.count(), 3);
        let took = start.elapsed();
        assert!(took >= 150 * MS && took <= 300 * MS, "took {took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_is_capped_and_zero_attempts_means_one() {
        let policy = RetryPolicy {
            max_attempts: 5,
            initial_backoff: 100 * MS,
            max_backoff: 250 * MS,
        };
        let inner = Scripted::new(vec![unavailable; 4]);
        wrap(&inner, policy).stat(&path()).await.unwrap();
        assert_within(&inner.gaps(), &[100 * MS, 200 * MS, 250 * MS, 250 * MS]);

        let policy = RetryPolicy {
            max_attempts: 0,
            ..RetryPolicy::default()
        };
        let inner = Scripted::new(vec![unavailable]);
        assert!(wrap(&inner, policy).stat(&path()).await.is_err());
        assert_eq!(inner.count(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn health_is_not_retried_and_the_rest_delegates() {
        let inner = Scripted::new(vec![unavailable]);
        let origin = wrap(&inner, RetryPolicy::default());
        assert!(origin.health().await.is_err());
        assert_eq!(inner.count(), 1);
        assert_eq!(origin.id(), &inner.id);
        assert!(!origin.supports_range_reads());
    }

    #[test]
    fn backoff_never_overflows() {
        let policy = RetryPolicy {
            max_attempts: u32::MAX,
            initial_backoff: Duration::from_secs(u64::MAX / 2),
            max_backoff: Duration::from_secs(2),
        };
        assert_eq!(policy.backoff(1), Duration::from_secs(2));
        assert_eq!(policy.backoff(u32::MAX), Duration::from_secs(2));
        let default = RetryPolicy::default();
        assert_eq!(default.backoff(1), 100 * MS);
        assert_eq!(default.backoff(6), Duration::from_secs(2));
    }
}
