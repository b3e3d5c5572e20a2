//! Bounds on an origin's calls: how many run at once, and how long one
//! attempt may take.
//!
//! Layer: wrapper origins, meant for origins behind a network (issue 10's
//! S3, SFTP and WebDAV), usable over any origin. The intended stack, top
//! down: `RetryOrigin` → [`TimeoutOrigin`] → [`LimitOrigin`] → the origin,
//! so that every attempt has its own timeout (a hung connection is given
//! up and the retry runs on a fresh call) and waits for a connection slot
//! inside that timeout.
//!
//! Invariants:
//! - [`LimitOrigin`] never has more than its limit of `list`, `stat`,
//!   `read_range` and `read_link` calls in the inner origin; further calls
//!   queue in arrival order (tokio's semaphore is fair). `health` is not
//!   queued: a probe must see a hung origin as hung, not as busy.
//!   It states its limit ([`Origin::call_limit`]), so the cache keeps its
//!   read-ahead below it and a player's read is not queued behind it.
//! - [`TimeoutOrigin`] ends every call that takes longer than its timeout
//!   with [`OriginError::Timeout`], which is retryable and never "not
//!   found". It does not retry.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::Semaphore;

use crate::{
    DirEntry, DynOrigin, EntryMeta, FileVersion, Origin, OriginError, OriginId, OriginPath, Result,
};

/// At most `limit` calls in the inner origin at once (a connection pool's
/// size, a server's allowance).
#[derive(Debug)]
pub struct LimitOrigin {
    inner: DynOrigin,
    slots: Arc<Semaphore>,
    limit: usize,
}

impl LimitOrigin {
    /// `limit` is clamped to at least 1 (0 would make every call wait
    /// forever).
    pub fn new(inner: DynOrigin, limit: usize) -> Self {
        let limit = limit.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            inner,
            slots: Arc::new(Semaphore::new(limit)),
            limit,
        }
    }

    /// Calls in the inner origin right now.
    pub fn in_flight(&self) -> usize {
        self.limit - self.slots.available_permits()
    }

    async fn limited<T>(&self, call: impl Future<Output = Result<T>>) -> Result<T> {
        let _slot = self
            .slots
            .acquire()
            .await
            // Private and never closed; a typed error beats a panic anyway.
            .map_err(|_| OriginError::Unavailable {
                origin: self.inner.id().clone(),
                reason: "the origin's connection slots were closed".into(),
            })?;
        call.await
    }
}

#[async_trait]
impl Origin for LimitOrigin {
    fn id(&self) -> &OriginId {
        self.inner.id()
    }

    fn wrapped(&self) -> Option<&DynOrigin> {
        Some(&self.inner)
    }

    async fn list(&self, path: &OriginPath) -> Result<Vec<DirEntry>> {
        self.limited(self.inner.list(path)).await
    }

    async fn stat(&self, path: &OriginPath) -> Result<EntryMeta> {
        self.limited(self.inner.stat(path)).await
    }

    async fn read_range(
        &self,
        path: &OriginPath,
        version: &FileVersion,
        offset: u64,
        len: u64,
    ) -> Result<Bytes> {
        self.limited(self.inner.read_range(path, version, offset, len))
            .await
    }

    async fn read_link(&self, path: &OriginPath) -> Result<PathBuf> {
        self.limited(self.inner.read_link(path)).await
    }

    async fn health(&self) -> Result<()> {
        self.inner.health().await
    }

    /// Its own limit, or the inner origin's when that is tighter.
    fn call_limit(&self) -> Option<usize> {
        Some(
            self.inner
                .call_limit()
                .map_or(self.limit, |l| l.min(self.limit)),
        )
    }
}

/// Every call of the inner origin bounded by `timeout`.
#[derive(Debug)]
pub struct TimeoutOrigin {
    inner: DynOrigin,
    timeout: Duration,
}

impl TimeoutOrigin {
    pub fn new(inner: DynOrigin, timeout: Duration) -> Self {
        Self { inner, timeout }
    }

    async fn bounded<T>(&self, call: impl Future<Output = Result<T>>) -> Result<T> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(OriginError::Timeout {
                origin: self.inner.id().clone(),
                timeout: self.timeout,
            }),
        }
    }
}

#[async_trait]
impl Origin for TimeoutOrigin {
    fn id(&self) -> &OriginId {
        self.inner.id()
    }

    fn wrapped(&self) -> Option<&DynOrigin> {
        Some(&self.inner)
    }

    async fn list(&self, path: &OriginPath) -> Result<Vec<DirEntry>> {
        self.bounded(self.inner.list(path)).await
    }

    async fn stat(&self, path: &OriginPath) -> Result<EntryMeta> {
        self.bounded(self.inner.stat(path)).await
    }

    async fn read_range(
        &self,
        path: &OriginPath,
        version: &FileVersion,
        offset: u64,
        len: u64,
    ) -> Result<Bytes> {
        self.bounded(self.inner.read_range(path, version, offset, len))
            .await
    }

    async fn read_link(&self, path: &OriginPath) -> Result<PathBuf> {
        self.bounded(self.inner.read_link(path)).await
    }

    async fn health(&self) -> Result<()> {
        self.bounded(self.inner.health()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{EntryKind, RetryOrigin, RetryPolicy};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::time::Instant;

    /// An origin whose calls take `delay` (virtual time), or hang for the
    /// first `hang_first` calls, counting how many run at once.
    #[derive(Debug)]
    struct Slow {
        id: OriginId,
        delay: Duration,
        hang_first: AtomicUsize,
        running: AtomicUsize,
        most: AtomicUsize,
        calls: AtomicUsize,
    }

    impl Slow {
        fn new(delay: Duration, hang_first: usize) -> Arc<Self> {
            Arc::new(Self {
                id: OriginId::new("remote").unwrap(),
                delay,
                hang_first: AtomicUsize::new(hang_first),
                running: AtomicUsize::new(0),
                most: AtomicUsize::new(0),
                calls: AtomicUsize::new(0),
            })
        }

        async fn call(&self) -> Result<()> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(now, Ordering::SeqCst);
            let hang = self
                .hang_first
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if hang {
                // Like a connection that stopped answering; dropping the
                // future (a timeout) must still count it as finished.
                let _guard = Finish(&self.running);
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(self.delay).await;
            self.running.fetch_sub(1, Ordering::SeqCst);
            Ok(())
        }
    }

    struct Finish<'a>(&'a AtomicUsize);

    impl Drop for Finish<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }

    #[async_trait]
    impl Origin for Slow {
        fn id(&self) -> &OriginId {
            &self.id
        }
        async fn list(&self, _: &OriginPath) -> Result<Vec<DirEntry>> {
            self.call().await.map(|()| Vec::new())
        }
        async fn stat(&self, _: &OriginPath) -> Result<EntryMeta> {
            self.call().await.map(|()| EntryMeta {
                kind: EntryKind::File,
                size: 4,
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
            self.call().await.map(|()| Bytes::from_static(b"flac"))
        }
        async fn health(&self) -> Result<()> {
            self.call().await
        }
        fn whole_digest(&self, _: &OriginPath, _: &FileVersion) -> Option<crate::WholeDigest> {
            Some(crate::WholeDigest::Md5([9; 16]))
        }
    }

    fn version() -> FileVersion {
        FileVersion {
            size: 4,
            mtime_ns: None,
            etag: None,
        }
    }

    fn path() -> OriginPath {
        OriginPath::new("a.flac").unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn no_more_than_the_limit_run_at_once_and_all_complete() {
        let slow = Slow::new(Duration::from_millis(100), 0);
        let limited = Arc::new(LimitOrigin::new(slow.clone(), 3));
        let start = Instant::now();
        let reads: Vec<_> = (0..10)
            .map(|_| {
                let o = Arc::clone(&limited);
                tokio::spawn(async move { o.read_range(&path(), &version(), 0, 4).await })
            })
            .collect();
        for r in reads {
            assert_eq!(&r.await.unwrap().unwrap()[..], b"flac");
        }
        assert_eq!(slow.most.load(Ordering::SeqCst), 3);
        // Ten calls, three at a time, 100 ms each: four rounds.
        assert_eq!(start.elapsed(), Duration::from_millis(400));
        assert_eq!(limited.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn health_is_not_queued_behind_busy_slots() {
        let slow = Slow::new(Duration::from_millis(100), 1);
        let limited = Arc::new(LimitOrigin::new(slow.clone(), 1));
        let o = Arc::clone(&limited);
        // The only slot is taken by a call that hangs.
        let hung = tokio::spawn(async move { o.stat(&path()).await });
        tokio::task::yield_now().await;
        assert_eq!(limited.in_flight(), 1);
        let start = Instant::now();
        limited.health().await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(100));
        hung.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn each_attempt_has_its_own_timeout_and_a_hung_one_is_retried() {
        // The first call hangs (a dead connection); the retry gets a fresh
        // call that answers.
        let slow = Slow::new(Duration::from_millis(50), 1);
        let stack = RetryOrigin::new(
            Arc::new(TimeoutOrigin::new(
                Arc::new(LimitOrigin::new(slow.clone(), 2)),
                Duration::from_secs(2),
            )),
            RetryPolicy {
                max_attempts: 2,
                initial_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(1),
            },
        );
        let start = Instant::now();
        let data = stack.read_range(&path(), &version(), 0, 4).await.unwrap();
        assert_eq!(&data[..], b"flac");
        assert_eq!(slow.calls.load(Ordering::SeqCst), 2);
        // 2 s timeout + 50 to 100 ms backoff (jittered) + 50 ms answer.
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(2100) && took <= Duration::from_millis(2150),
            "took {took:?}"
        );
        assert_eq!(
            slow.running.load(Ordering::SeqCst),
            0,
            "the hung call was let go"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_timeout_is_retryable_and_never_not_found() {
        let slow = Slow::new(Duration::from_millis(50), usize::MAX);
        let bounded = TimeoutOrigin::new(slow, Duration::from_secs(1));
        let err = bounded.stat(&path()).await.unwrap_err();
        assert!(matches!(err, OriginError::Timeout { .. }), "{err}");
        assert!(err.is_retryable());
        assert!(!err.is_not_found());
        assert!(bounded.health().await.is_err());
    }

    #[test]
    fn a_stack_passes_on_the_digest_and_its_tightest_call_limit() {
        let slow = Slow::new(Duration::from_millis(1), 0);
        assert_eq!(slow.call_limit(), None);
        let stack = RetryOrigin::new(
            Arc::new(TimeoutOrigin::new(
                Arc::new(LimitOrigin::new(Arc::new(LimitOrigin::new(slow, 3)), 8)),
                Duration::from_secs(2),
            )),
            RetryPolicy::default(),
        );
        assert_eq!(stack.call_limit(), Some(3));
        assert_eq!(
            stack.whole_digest(&path(), &version()),
            Some(crate::WholeDigest::Md5([9; 16]))
        );
    }
}
