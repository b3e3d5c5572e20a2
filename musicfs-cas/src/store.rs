//! The chunk store: one verified file per chunk on the cache disk.
//!
//! Layout under the cache directory:
//! - `chunks/aa/bb/<64-hex>`: a chunk, named by the BLAKE3 digest of its
//!   bytes, sharded by the first two bytes of the digest.
//! - `tmp/`: chunks being written. A write goes to a fresh temp file and is
//!   renamed into place, so a crash never leaves a partial chunk under a
//!   final name. Whatever is in `tmp/` at open was left by a crash and is
//!   removed.
//!
//! Invariants:
//! - Bytes are only returned by [`ChunkStore::get`] after they hash to the
//!   chunk's name. Chunk writes are not fsynced: a chunk torn by power loss
//!   fails that check, is removed, and is fetched again.
//! - Opening is quick at any size: the shard tree is scanned and the index
//!   reconciled with it by a background thread ([`reconcile`]); reads are
//!   correct meanwhile, and [`ChunkStore::reconciled`] waits for it.
//! - `current_size` is the sum of the chunk files the table knows: the
//!   reconcile adds the files it finds, and every put and removal keeps it
//!   current. When the chunks plus the index's disk use pass `max_size`,
//!   least-recently-used chunks are removed down to the low watermark,
//!   skipping every pinned chunk (a read in flight pins the chunks it
//!   needs). Victims are taken from an LRU order a batch at a time under
//!   the table lock and unlinked outside it ([`evict`]), so a read that
//!   pins chunks never waits for an eviction's unlinks.
//! - No disk operation runs under the table lock. A put and an eviction of
//!   the same chunk hand over through the table (`evicting`/`unlinking`):
//!   an eviction never deletes a file that a concurrent put has just
//!   renamed into place.
//! - At most `max_open_files` chunk files are open at once; the rest queue,
//!   and an operation that still meets `EMFILE` waits for fds to free up
//!   (up to [`fds::FD_WAIT`]) rather than failing the read.
//! - When the disk fails (read-only, full after eviction, I/O errors, the
//!   directory gone and not re-creatable) the store turns *degraded*: puts
//!   are refused with [`CasError::CacheUnavailable`] so callers serve from the
//!   origin. Every few seconds a put probes the disk, and the store recovers
//!   by itself when the probe succeeds.
//! - When the disk stops answering (an operation runs past `disk_timeout`,
//!   [`watch`]) the store is degraded too and refuses disk work at once
//!   until the stuck operations return; async operations are bounded by
//!   the same timeout.

mod disk;
mod evict;
pub(crate) mod reconcile;
mod table;
mod watch;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use musicfs_origins::fds;
use parking_lot::{Condvar, Mutex};
use tokio::sync::Semaphore;
use tracing::{info, warn};

use crate::index::Index;
use crate::{CasError, ChunkId, Result};
use reconcile::Stop;
use table::Table;
use watch::DiskWatch;

pub use reconcile::UPKEEP_EVERY;

/// How long a degraded store waits between probes of the disk.
const PROBE_INTERVAL: Duration = Duration::from_secs(5);
/// Reads the FUSE threads may have on the cache disk at once (the rest
/// take the async path, which is bounded by the disk timeout): a disk that
/// hangs can pin at most this many of them before the store notices.
const BLOCKING_READERS: usize = 2;

#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// The cache directory; the store uses `chunks/` and `tmp/` inside it.
    pub dir: PathBuf,
    /// Eviction starts when the chunk files and the index pass this many
    /// bytes.
    pub max_size: u64,
    /// Eviction stops at this percentage of `max_size`.
    pub low_watermark_pct: u8,
    /// Larger puts are refused: no chunk can be larger than FastCDC's max.
    pub max_chunk: u64,
    /// Chunk files open at once; 0 picks a quarter of RLIMIT_NOFILE (8..=256).
    pub max_open_files: usize,
    /// A chunk-file operation running longer than this means the cache
    /// disk is not answering (see the module docs).
    pub disk_timeout: Duration,
}

impl StoreConfig {
    pub fn new(dir: impl Into<PathBuf>, max_size: u64) -> Self {
        Self {
            dir: dir.into(),
            max_size,
            low_watermark_pct: 90,
            max_chunk: 4 << 20,
            max_open_files: 0,
            disk_timeout: Duration::from_secs(5),
        }
    }
}

/// What the store's open and its background reconcile found and fixed.
#[derive(Debug, Clone, Default)]
pub struct OpenReport {
    pub chunks: u64,
    pub bytes: u64,
    pub temp_files_removed: u64,
    pub stray_files_removed: u64,
    pub index_entries_dropped: u64,
    pub index_entries_added: u64,
}

#[derive(Debug, Default)]
struct DiskState {
    degraded: AtomicBool,
    reason: Mutex<Option<String>>,
    last_failure: Mutex<Option<Instant>>,
}

/// Counters for `musicfs status`.
#[derive(Debug, Default)]
pub struct StoreCounters {
    pub puts: AtomicU64,
    pub dedup_hits: AtomicU64,
    pub gets: AtomicU64,
    pub corrupt: AtomicU64,
    pub missing: AtomicU64,
    pub evicted_chunks: AtomicU64,
    pub evicted_bytes: AtomicU64,
}

#[derive(Debug)]
struct Inner {
    chunks_dir: PathBuf,
    tmp_dir: PathBuf,
    /// `None` for an index that does not live in the cache dir.
    index_path: Option<PathBuf>,
    max_size: u64,
    low_water: u64,
    max_chunk: u64,
    index: Index,
    table: Mutex<Table>,
    /// Signalled when an eviction's unlink ends (a put may wait for it).
    unlinked: Condvar,
    io: Arc<Semaphore>,
    blocking_readers: Arc<Semaphore>,
    disk: DiskState,
    watch: DiskWatch,
    counters: StoreCounters,
    tmp_seq: AtomicU64,
    /// Disk use of the index, measured by upkeep.
    index_bytes: AtomicU64,
    /// Only one eviction at a time.
    evicting: Mutex<()>,
    reconciled: tokio::sync::watch::Sender<Option<OpenReport>>,
    stop: Arc<Stop>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.stop();
    }
}

/// A cheap, clonable handle to the chunk store.
#[derive(Debug, Clone)]
pub struct ChunkStore {
    inner: Arc<Inner>,
}

/// Keeps chunks safe from eviction while a read uses them.
#[derive(Debug)]
pub struct PinGuard {
    store: ChunkStore,
    ids: Vec<ChunkId>,
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        let mut t = self.store.inner.table.lock();
        for id in &self.ids {
            if let Some(n) = t.pins.get_mut(id) {
                *n -= 1;
                if *n == 0 {
                    t.pins.remove(id);
                }
            }
        }
    }
}

impl ChunkStore {
    /// Opens the store: empties `tmp/` and starts the background reconcile
    /// of the shard tree with `index` (the files win; see [`reconcile`]).
    /// Returns at once, with what was cleaned so far.
    pub fn open(config: StoreConfig, index: Index) -> Result<(Self, OpenReport)> {
        if config.max_size == 0 {
            return Err(CasError::InvalidConfig {
                reason: "the cache size limit must be larger than 0".into(),
            });
        }
        let chunks_dir = config.dir.join("chunks");
        let tmp_dir = config.dir.join("tmp");
        let mut report = OpenReport::default();
        let disk = DiskState::default();
        for d in [&chunks_dir, &tmp_dir] {
            if let Err(e) = fs::create_dir_all(d) {
                warn!(dir = %d.display(), error = %e, "cannot create cache directory; running degraded");
                disk.degraded.store(true, Ordering::SeqCst);
                *disk.reason.lock() = Some(format!("cannot create {}: {e}", d.display()));
                *disk.last_failure.lock() = Some(Instant::now());
            }
        }
        report.temp_files_removed = reconcile::clean_dir(&tmp_dir);
        if report.temp_files_removed > 0 {
            info!(
                removed = report.temp_files_removed,
                "removed temp files left by a crash"
            );
        }
        let max_open = if config.max_open_files == 0 {
            default_max_open_files()
        } else {
            config.max_open_files
        };
        let low_water = config.max_size / 100 * u64::from(config.low_watermark_pct.min(100));
        let index_path = config.dir.join("index.sled");
        let mut table = Table::default();
        table.loading = true;
        let inner = Arc::new(Inner {
            chunks_dir,
            tmp_dir,
            index_path: index_path.is_dir().then_some(index_path),
            max_size: config.max_size,
            low_water,
            max_chunk: config.max_chunk,
            index,
            table: Mutex::new(table),
            unlinked: Condvar::new(),
            io: Arc::new(Semaphore::new(max_open)),
            blocking_readers: Arc::new(Semaphore::new(BLOCKING_READERS)),
            disk,
            watch: DiskWatch::new(config.disk_timeout),
            counters: StoreCounters::default(),
            tmp_seq: AtomicU64::new(0),
            index_bytes: AtomicU64::new(0),
            evicting: Mutex::new(()),
            reconciled: tokio::sync::watch::channel(None).0,
            stop: Arc::new(Stop::default()),
        });
        reconcile::spawn(&inner);
        Ok((ChunkStore { inner }, report))
    }

    /// Waits for the background reconcile that follows every open, and
    /// returns what it found and fixed.
    pub async fn reconciled(&self) -> OpenReport {
        let mut rx = self.inner.reconciled.subscribe();
        // Err only if the sender is gone, and it lives in `inner`, which we
        // hold.
        let report = match rx.wait_for(Option::is_some).await {
            Ok(r) => r.clone().unwrap_or_default(),
            Err(_) => OpenReport::default(),
        };
        report
    }

    /// True while the background reconcile has not finished.
    pub fn reconciling(&self) -> bool {
        self.inner.reconciled.borrow().is_none()
    }

    pub fn index(&self) -> &Index {
        &self.inner.index
    }

    pub fn chunks_dir(&self) -> &Path {
        &self.inner.chunks_dir
    }

    /// Where the chunk named `id` lives.
    pub fn chunk_path(&self, id: &ChunkId) -> PathBuf {
        self.inner.chunk_path(id)
    }

    /// Bytes of the chunk files.
    pub fn current_size(&self) -> u64 {
        self.inner.table.lock().total()
    }

    /// Disk use of the index, as last measured (every [`UPKEEP_EVERY`]).
    pub fn index_size(&self) -> u64 {
        self.inner.index_bytes.load(Ordering::Relaxed)
    }

    pub fn max_size(&self) -> u64 {
        self.inner.max_size
    }

    pub fn chunk_count(&self) -> u64 {
        self.inner.table.lock().len() as u64
    }

    pub fn contains(&self, id: &ChunkId) -> bool {
        self.inner.table.lock().contains(id)
    }

    pub fn ids(&self) -> Vec<ChunkId> {
        self.inner.table.lock().ids().copied().collect()
    }

    pub fn counters(&self) -> &StoreCounters {
        &self.inner.counters
    }

    /// `Some(reason)` while the cache disk is unusable or not answering.
    pub fn degraded(&self) -> Option<String> {
        if let Some(reason) = self.inner.not_answering() {
            return Some(reason);
        }
        if self.inner.disk.degraded.load(Ordering::SeqCst) {
            Some(self.inner.disk.reason.lock().clone().unwrap_or_default())
        } else {
            None
        }
    }

    /// True while a disk operation has run past the disk timeout.
    pub fn not_answering(&self) -> bool {
        self.inner.watch.stuck_for().is_some()
    }

    /// True when the store is degraded and the probe interval has passed
    /// (never while the disk is not answering: a probe would hang too).
    pub fn probe_due(&self) -> bool {
        self.inner.disk.degraded.load(Ordering::SeqCst)
            && !self.not_answering()
            && !self
                .inner
                .disk
                .last_failure
                .lock()
                .is_some_and(|t| t.elapsed() < PROBE_INTERVAL)
    }

    /// Pins `ids` against eviction until the guard drops.
    pub fn pin(&self, ids: &[ChunkId]) -> PinGuard {
        let mut t = self.inner.table.lock();
        for id in ids {
            *t.pins.entry(*id).or_insert(0) += 1;
        }
        PinGuard {
            store: self.clone(),
            ids: ids.to_vec(),
        }
    }

    /// Stores `data` as a chunk and returns its id. Storing a chunk that is
    /// already present only refreshes its access time.
    pub async fn put(&self, data: Bytes) -> Result<ChunkId> {
        let size = data.len() as u64;
        if size > self.inner.max_chunk {
            return Err(CasError::ChunkTooLarge {
                size,
                max: self.inner.max_chunk,
            });
        }
        let inner = self.inner.clone();
        let id = self
            .bounded(
                move |inner| out_of_fds_waited(|| inner.put_sync(&data)),
                inner,
            )
            .await?;
        // Outside the bounded operation: a large eviction may take longer
        // than the disk timeout without anything being wrong. The put's
        // caller waits for it (so the cache is within its limit when the
        // put returns) unless the disk stops answering meanwhile.
        if self.inner.over_limit() {
            let inner = self.inner.clone();
            let evict = blocking(move || {
                inner.evict_if_needed();
                Ok(())
            });
            let _ = tokio::time::timeout(self.inner.watch.timeout(), evict).await;
        }
        Ok(id)
    }

    /// Reads and verifies the chunk `id`. A corrupt file is removed; a
    /// missing or corrupt chunk is forgotten so the caller can re-fetch it.
    pub async fn get(&self, id: ChunkId) -> Result<Bytes> {
        let inner = self.inner.clone();
        self.bounded(
            move |inner| out_of_fds_waited(|| inner.get_sync(&id)),
            inner,
        )
        .await
    }

    /// Removes a chunk and its record (verify's repair, tests).
    pub async fn remove(&self, id: ChunkId) -> Result<()> {
        let inner = self.inner.clone();
        blocking(move || {
            inner.forget(&id, true);
            Ok(())
        })
        .await
    }

    /// Tries the disk now if it is degraded; returns true when it is usable.
    pub async fn probe(&self) -> bool {
        let inner = self.inner.clone();
        blocking(move || Ok(inner.probe_sync()))
            .await
            .unwrap_or(false)
    }

    /// Persists access times and the index.
    pub async fn flush(&self) -> Result<()> {
        let inner = self.inner.clone();
        blocking(move || inner.flush_sync()).await
    }

    /// Runs eviction now if the store is over its limit.
    pub async fn evict_if_needed(&self) {
        let inner = self.inner.clone();
        let _ = blocking(move || {
            inner.evict_if_needed();
            Ok(())
        })
        .await;
    }

    /// Measures the index's disk use and evicts if the chunks and the
    /// index together pass the limit (what upkeep does every
    /// [`UPKEEP_EVERY`]).
    pub async fn upkeep_now(&self) {
        let inner = self.inner.clone();
        let _ = blocking(move || {
            let bytes = inner.index_path.as_deref().map_or(0, reconcile::dir_blocks);
            inner.index_bytes.store(bytes, Ordering::Relaxed);
            inner.evict_if_needed();
            Ok(())
        })
        .await;
    }

    /// Drops the manifests none of whose chunks are stored any more (their
    /// files were evicted); upkeep does this every few minutes after
    /// evictions. Returns how many were dropped.
    pub async fn sweep_manifests(&self) -> u64 {
        let inner = self.inner.clone();
        blocking(move || Ok(inner.sweep_manifests()))
            .await
            .unwrap_or(0)
    }

    /// Test hook: while `hang` is true every cache-disk operation blocks,
    /// as on a disk that stopped answering (a dead NFS server); the
    /// operations go on when it is set back to false.
    #[doc(hidden)]
    pub fn inject_disk_hang(&self, hang: bool) {
        self.inner.watch.set_hang(hang);
    }

    /// Runs `op` on the blocking pool with an fd slot, bounded by the disk
    /// timeout; refused at once while the disk is not answering.
    async fn bounded<T: Send + 'static>(
        &self,
        op: impl FnOnce(&Inner) -> Result<T> + Send + 'static,
        inner: Arc<Inner>,
    ) -> Result<T> {
        if let Some(reason) = self.inner.not_answering() {
            return Err(CasError::CacheUnavailable { reason });
        }
        let limit = self.inner.watch.timeout();
        let work = async move {
            let permit = self.acquire_io().await?;
            blocking(move || {
                let _permit = permit;
                op(&inner)
            })
            .await
        };
        match tokio::time::timeout(limit, work).await {
            Ok(r) => r,
            Err(_) => Err(CasError::CacheUnavailable {
                reason: format!("the cache disk did not answer within {limit:?}"),
            }),
        }
    }

    async fn acquire_io(&self) -> Result<tokio::sync::OwnedSemaphorePermit> {
        self.inner
            .io
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| CasError::CacheUnavailable {
                reason: "the chunk store is shutting down".into(),
            })
    }
}

/// Retries a chunk-file operation while the process is out of fds, holding
/// the caller's I/O slot, so a burst of readers queues instead of failing.
fn out_of_fds_waited<T>(op: impl FnMut() -> Result<T>) -> Result<T> {
    fds::retry_while_exhausted(fds::FD_WAIT, op, |e| {
        matches!(e, CasError::TooManyOpenFiles { .. })
    })
}

/// Runs blocking filesystem work off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| CasError::CacheUnavailable {
            reason: format!("cache I/O task failed: {e}"),
        })?
}

/// A quarter of the soft fd limit, between 8 and 256: the rest is left to
/// origins, FUSE and sled. The daemon sets an exact share instead
/// ([`fds::FdBudget`]); this default serves library users and tests.
pub fn default_max_open_files() -> usize {
    match fds::soft_limit() {
        Some(limit) => usize::try_from(limit / 4).unwrap_or(256).clamp(8, 256),
        None => 64,
    }
}

/// Bytes in files under `dir`, recursively, skipping `index.sled*` (what the
/// chunk tree costs on disk, for `status` and the size-accounting tests).
pub fn disk_usage(dir: &Path) -> u64 {
    let Ok(rd) = fs::read_dir(dir) else { return 0 };
    let mut total = 0;
    for entry in rd.flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_dir() {
            if !entry
                .file_name()
                .to_string_lossy()
                .starts_with("index.sled")
            {
                total += disk_usage(&entry.path());
            }
        } else if meta.is_file() {
            total += meta.len();
        }
    }
    total
}

#[cfg(test)]
mod tests;
