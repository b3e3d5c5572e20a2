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

mod evict;
pub(crate) mod reconcile;
mod table;
mod watch;

use std::fs;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use musicfs_origins::fds;
use parking_lot::{Condvar, Mutex};
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use crate::index::{now_ns, ChunkRecord, Index};
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

impl Inner {
    fn chunk_path(&self, id: &ChunkId) -> PathBuf {
        let hex = id.to_hex();
        self.chunks_dir.join(&hex[0..2]).join(&hex[2..4]).join(hex)
    }

    /// `Some(reason)` while a disk operation has run past the timeout.
    fn not_answering(&self) -> Option<String> {
        self.watch.stuck_for().map(|ran| {
            format!(
                "the cache disk is not answering (an operation has waited {} s)",
                ran.as_secs()
            )
        })
    }

    fn put_sync(&self, data: &[u8]) -> Result<ChunkId> {
        let id = ChunkId::of(data);
        let known = self.table.lock().contains(&id);
        // A listed chunk whose file is gone must be written again, not
        // counted as a dedup hit (one stat per hit is cheap next to a write).
        if known && {
            let _op = self.watch.start();
            self.chunk_path(&id).exists()
        } {
            self.table.lock().touch(&id);
            self.counters.dedup_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(id);
        }
        if self.disk.degraded.load(Ordering::SeqCst) && !self.probe_sync() {
            return Err(self.unavailable());
        }
        match self.write_chunk(&id, data) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                // Make room first: a full disk is the cache's own doing more
                // often than not.
                let need = (data.len() as u64).max(self.table.lock().total() / 10);
                let freed = self.evict_bytes(need);
                warn!(freed, "cache disk full; evicted chunks to make room");
                if let Err(e) = self.write_chunk(&id, data) {
                    return Err(self.disk_failed(&e));
                }
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE)) => {
                return Err(CasError::io(&self.tmp_dir, e));
            }
            Err(e) => return Err(self.disk_failed(&e)),
        }
        let size = data.len() as u64;
        let rec = ChunkRecord {
            size,
            atime_ns: now_ns(),
        };
        if let Err(e) = self.index.put_chunk(&id, rec) {
            // The file is the truth; the record is re-added at next open.
            debug!(error = %e, "could not record chunk in the index");
        }
        self.counters.puts.fetch_add(1, Ordering::Relaxed);
        Ok(id)
    }

    fn write_chunk(&self, id: &ChunkId, data: &[u8]) -> std::io::Result<()> {
        let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .tmp_dir
            .join(format!("{}.{}.{seq}.tmp", id.to_hex(), std::process::id()));
        let write = |tmp: &Path| -> std::io::Result<()> {
            let _op = self.watch.start();
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(tmp)?;
            f.write_all(data)
        };
        if let Err(e) = write(&tmp) {
            let _ = fs::remove_file(&tmp);
            if e.kind() != ErrorKind::NotFound {
                return Err(e);
            }
            // The cache directory was removed under us: re-create it.
            fs::create_dir_all(&self.tmp_dir)?;
            if let Err(e) = write(&tmp) {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        }
        let path = self.chunk_path(id);
        let _op = self.watch.start();
        if let Some(parent) = path.parent() {
            if let Err(e) = fs::create_dir_all(parent) {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        }
        self.claim_for_put(id);
        if let Err(e) = fs::rename(&tmp, &path) {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        self.table.lock().insert(*id, data.len() as u64, now_ns());
        Ok(())
    }

    fn get_sync(&self, id: &ChunkId) -> Result<Bytes> {
        self.counters.gets.fetch_add(1, Ordering::Relaxed);
        let path = self.chunk_path(id);
        let read = {
            let _op = self.watch.start();
            fs::read(&path)
        };
        let data = match read {
            Ok(d) => d,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                self.counters.missing.fetch_add(1, Ordering::Relaxed);
                self.forget(id, false);
                return Err(CasError::ChunkMissing { id: *id });
            }
            Err(e) => {
                // One unreadable chunk (EIO) is dropped and fetched again;
                // the disk is declared dead only when writes fail too.
                if e.raw_os_error() == Some(libc::EIO) {
                    warn!(chunk = %id, error = %e, "unreadable chunk file dropped");
                    self.forget(id, true);
                }
                return Err(CasError::io(path, e));
            }
        };
        let actual = ChunkId::of(&data);
        if actual != *id {
            self.counters.corrupt.fetch_add(1, Ordering::Relaxed);
            warn!(chunk = %id, %actual, "corrupt chunk file removed");
            self.forget(id, true);
            return Err(CasError::ChunkCorrupt { id: *id, actual });
        }
        self.table.lock().touch(id);
        Ok(Bytes::from(data))
    }

    /// Drops a chunk from the table and index, removing its file when
    /// `unlink`; without `unlink` only if the file is really gone (a
    /// concurrent put may have just re-created it). A file that cannot be
    /// removed stays counted, so the size keeps matching the disk.
    fn forget(&self, id: &ChunkId, unlink: bool) {
        if unlink {
            let entry = {
                let mut t = self.table.lock();
                let e = t.remove(id);
                t.evicting.insert(*id);
                e
            };
            if let Some(Err(e)) = self.unlink_victim(id) {
                debug!(chunk = %id, error = %e, "cannot remove chunk file");
                if let Some(e) = entry {
                    self.table.lock().restore(*id, e);
                }
                return;
            }
        } else {
            let entry = self.table.lock().remove(id);
            let exists = {
                let _op = self.watch.start();
                self.chunk_path(id).exists()
            };
            if exists {
                let mut t = self.table.lock();
                match entry {
                    Some(e) => t.restore(*id, e),
                    // Not merged yet: let the reconcile add it.
                    None => {
                        t.removed_while_loading.remove(id);
                    }
                }
                return;
            }
        }
        let _ = self.index.remove_chunk(id);
    }

    fn disk_failed(&self, err: &std::io::Error) -> CasError {
        let reason = match err.raw_os_error() {
            Some(libc::EROFS) => "the cache disk is read-only".to_owned(),
            Some(libc::ENOSPC) => "the cache disk is full even after eviction".to_owned(),
            Some(libc::EDQUOT) => "the disk quota for the cache is exhausted".to_owned(),
            Some(libc::EIO) => "the cache disk reports I/O errors".to_owned(),
            _ => format!("cache write failed: {err}"),
        };
        let was = self.disk.degraded.swap(true, Ordering::SeqCst);
        *self.disk.last_failure.lock() = Some(Instant::now());
        if !was {
            warn!(%reason, "cache disk unusable; serving reads straight from the origins until it recovers");
        }
        *self.disk.reason.lock() = Some(reason);
        self.unavailable()
    }

    fn unavailable(&self) -> CasError {
        CasError::CacheUnavailable {
            reason: self
                .disk
                .reason
                .lock()
                .clone()
                .unwrap_or_else(|| "unknown".into()),
        }
    }

    /// When degraded and a probe is due, writes a probe file; clears the
    /// degraded state if that works. Returns whether the disk is usable.
    fn probe_sync(&self) -> bool {
        if !self.disk.degraded.load(Ordering::SeqCst) {
            return true;
        }
        {
            let mut last = self.disk.last_failure.lock();
            if last.is_some_and(|t| t.elapsed() < PROBE_INTERVAL) {
                return false;
            }
            *last = Some(Instant::now());
        }
        self.probe_now()
    }

    fn probe_now(&self) -> bool {
        let probe = self
            .tmp_dir
            .join(format!("probe.{}.tmp", std::process::id()));
        let _op = self.watch.start();
        let ok = fs::create_dir_all(&self.tmp_dir)
            .and_then(|_| fs::create_dir_all(&self.chunks_dir))
            .and_then(|_| fs::write(&probe, b"musicfs probe"))
            .and_then(|_| fs::remove_file(&probe));
        match ok {
            Ok(()) => {
                self.disk.degraded.store(false, Ordering::SeqCst);
                *self.disk.reason.lock() = None;
                info!("cache disk works again; caching resumed");
                true
            }
            Err(e) => {
                debug!(error = %e, "cache disk probe failed");
                *self.disk.last_failure.lock() = Some(Instant::now());
                false
            }
        }
    }

    fn flush_sync(&self) -> Result<()> {
        let dirty: Vec<(ChunkId, u64, u64)> = {
            let mut t = self.table.lock();
            let ids: Vec<ChunkId> = t.dirty.drain().collect();
            ids.into_iter()
                .filter_map(|id| t.get(&id).map(|e| (id, e.size, e.atime_ns)))
                .collect()
        };
        for (id, size, atime_ns) in dirty {
            self.index.put_chunk(&id, ChunkRecord { size, atime_ns })?;
        }
        self.index.flush()
    }
}

impl ChunkStore {
    /// Forces a probe regardless of the probe interval (tests, `doctor`).
    pub async fn probe_now(&self) -> bool {
        let inner = self.inner.clone();
        blocking(move || Ok(inner.probe_now()))
            .await
            .unwrap_or(false)
    }
}

impl ChunkStore {
    /// Up to `len` bytes at `offset` of the chunk file `id` (fewer at its
    /// end), NOT verified. Only for the cache's tree-checked reads
    /// (`crate::tree`), which check the bytes against the chunk's hash tree
    /// or name before serving them and go through [`ChunkStore::get`]
    /// (which handles damaged and missing chunks) when they do not match.
    /// Counts as an access for eviction, and as an open file for the fd
    /// budget.
    pub(crate) async fn read_unverified(
        &self,
        id: ChunkId,
        offset: u64,
        len: usize,
    ) -> Result<Vec<u8>> {
        let inner = self.inner.clone();
        self.bounded(move |inner| inner.read_range_sync(&id, offset, len), inner)
            .await
    }

    /// [`ChunkStore::read_unverified`] on the calling thread, for callers
    /// that are not async (the filesystem's fast path for cached reads).
    /// Never waits: with no fd or blocking-reader slot to spare, or while
    /// the disk is not answering, it fails, and the caller takes the async
    /// path, which queues and is bounded by the disk timeout. At most
    /// [`BLOCKING_READERS`] callers are in here at once, so a disk that
    /// hangs pins at most that many of the caller's threads.
    pub(crate) fn read_unverified_now(
        &self,
        id: ChunkId,
        offset: u64,
        len: usize,
    ) -> Result<Vec<u8>> {
        if let Some(reason) = self.inner.not_answering() {
            return Err(CasError::CacheUnavailable { reason });
        }
        let busy = || CasError::TooManyOpenFiles {
            path: self.inner.chunks_dir.clone(),
        };
        let _reader = self
            .inner
            .blocking_readers
            .clone()
            .try_acquire_owned()
            .map_err(|_| busy())?;
        let _permit = self
            .inner
            .io
            .clone()
            .try_acquire_owned()
            .map_err(|_| busy())?;
        self.inner.read_range_sync(&id, offset, len)
    }
}

impl Inner {
    fn read_range_sync(&self, id: &ChunkId, offset: u64, len: usize) -> Result<Vec<u8>> {
        use std::io::{Read, Seek, SeekFrom};
        let path = self.chunk_path(id);
        let mut buf = Vec::with_capacity(len);
        {
            let _op = self.watch.start();
            fs::File::open(&path)
                .and_then(|mut f| {
                    f.seek(SeekFrom::Start(offset))?;
                    f.take(len as u64).read_to_end(&mut buf)
                })
                .map_err(|e| CasError::io(&path, e))?;
        }
        self.counters.gets.fetch_add(1, Ordering::Relaxed);
        self.table.lock().touch(id);
        Ok(buf)
    }
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
mod tests {
    use super::*;

    async fn open(dir: &Path, max: u64) -> ChunkStore {
        let s = ChunkStore::open(StoreConfig::new(dir, max), Index::temporary().unwrap())
            .unwrap()
            .0;
        s.reconciled().await;
        s
    }

    #[tokio::test]
    async fn put_get_round_trip_and_dedup() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), 1 << 20).await;
        let id = s.put(Bytes::from_static(b"chunk one")).await.unwrap();
        assert_eq!(id, ChunkId::of(b"chunk one"));
        assert!(s.chunk_path(&id).exists());
        assert_eq!(s.get(id).await.unwrap(), Bytes::from_static(b"chunk one"));
        s.put(Bytes::from_static(b"chunk one")).await.unwrap();
        assert_eq!(s.chunk_count(), 1);
        assert_eq!(s.current_size(), 9);
        assert_eq!(s.counters().dedup_hits.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn oversized_chunks_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), 100 << 20).await;
        let err = s
            .put(Bytes::from(vec![0u8; (4 << 20) + 1]))
            .await
            .unwrap_err();
        assert!(matches!(err, CasError::ChunkTooLarge { .. }), "{err}");
        assert_eq!(s.chunk_count(), 0);
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn eviction_is_lru_and_skips_pinned_chunks() {
        let dir = tempfile::tempdir().unwrap();
        // 10 KiB limit, 9 KiB low watermark, 1 KiB chunks.
        let s = open(dir.path(), 10 * 1024).await;
        let mut ids = Vec::new();
        for i in 0..10u8 {
            ids.push(s.put(Bytes::from(vec![i; 1024])).await.unwrap());
        }
        assert_eq!(s.current_size(), 10 * 1024);
        // Touch chunk 0 so chunk 1 is the oldest; pin chunk 1.
        s.get(ids[0]).await.unwrap();
        let pin = s.pin(&[ids[1]]);
        s.put(Bytes::from(vec![100u8; 1024])).await.unwrap();
        assert!(s.current_size() <= 10 * 1024 * 90 / 100 + 1024);
        assert!(s.contains(&ids[0]), "recently read chunk evicted");
        assert!(s.contains(&ids[1]), "pinned chunk evicted");
        assert!(!s.contains(&ids[2]), "oldest unpinned chunk kept");
        assert!(!s.chunk_path(&ids[2]).exists());
        drop(pin);
        assert_eq!(s.current_size(), disk_usage(&dir.path().join("chunks")));
        // 11 KiB down to 9 KiB (90 % of 10 KiB): three 1 KiB chunks.
        assert_eq!(s.counters().evicted_chunks.load(Ordering::Relaxed), 3);
    }

    /// A chunk chosen for eviction and put again before its unlink keeps
    /// its new file, counted once.
    #[tokio::test]
    async fn a_put_claims_back_a_chunk_chosen_for_eviction() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), 1 << 20).await;
        let data = Bytes::from(vec![7u8; 4096]);
        let id = s.put(data.clone()).await.unwrap();
        let victims = s.inner.table.lock().take_victims(1, 10);
        assert_eq!(victims.len(), 1);
        assert!(!s.contains(&id));
        // Not known to the table any more: this put writes the file again.
        s.put(data.clone()).await.unwrap();
        assert!(
            s.inner.unlink_victim(&id).is_none(),
            "unlinked a claimed chunk"
        );
        assert_eq!(s.get(id).await.unwrap(), data);
        assert_eq!(s.current_size(), 4096);
    }

    #[tokio::test]
    async fn corrupt_and_missing_chunks_are_reported_and_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), 1 << 20).await;
        let a = s.put(Bytes::from_static(b"aaaa")).await.unwrap();
        let b = s.put(Bytes::from_static(b"bbbb")).await.unwrap();
        fs::write(s.chunk_path(&a), b"aaab").unwrap();
        fs::remove_file(s.chunk_path(&b)).unwrap();
        assert!(matches!(s.get(a).await, Err(CasError::ChunkCorrupt { .. })));
        assert!(!s.chunk_path(&a).exists(), "corrupt file left behind");
        assert!(matches!(s.get(b).await, Err(CasError::ChunkMissing { .. })));
        assert_eq!(s.chunk_count(), 0);
        assert_eq!(s.current_size(), 0);
    }

    #[tokio::test]
    async fn open_heals_crash_leftovers_and_rebuilds_records() {
        let dir = tempfile::tempdir().unwrap();
        let id;
        {
            let s = open(dir.path(), 1 << 20).await;
            id = s.put(Bytes::from_static(b"kept")).await.unwrap();
        }
        fs::write(dir.path().join("tmp").join("half-written.tmp"), b"par").unwrap();
        fs::write(dir.path().join("chunks").join("junk"), b"x").unwrap();
        // A fresh (empty) index: the chunk files are the truth.
        let (s, report) = ChunkStore::open(
            StoreConfig::new(dir.path(), 1 << 20),
            Index::temporary().unwrap(),
        )
        .unwrap();
        assert_eq!(report.temp_files_removed, 1);
        let report = s.reconciled().await;
        assert_eq!(report.stray_files_removed, 1);
        assert_eq!(report.index_entries_added, 1);
        assert!(s.contains(&id));
        assert_eq!(s.index().chunk_count(), 1);
        assert_eq!(s.current_size(), 4);
    }

    /// Reads and puts made before the background reconcile ends are right,
    /// and the merge neither loses nor double-counts them.
    #[tokio::test]
    async fn reads_and_puts_during_the_reconcile_are_right_and_counted_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut ids = Vec::new();
        {
            let s = open(dir.path(), 1 << 20).await;
            for i in 0..50u8 {
                ids.push(s.put(Bytes::from(vec![i; 100])).await.unwrap());
            }
        }
        let (s, _) = ChunkStore::open(
            StoreConfig::new(dir.path(), 1 << 20),
            Index::temporary().unwrap(),
        )
        .unwrap();
        // Whether or not the scan has got to them yet:
        assert_eq!(s.get(ids[3]).await.unwrap(), Bytes::from(vec![3u8; 100]));
        s.put(Bytes::from(vec![200u8; 100])).await.unwrap();
        s.put(Bytes::from(vec![4u8; 100])).await.unwrap();
        fs::remove_file(s.chunk_path(&ids[5])).unwrap();
        assert!(s.get(ids[5]).await.is_err());
        let report = s.reconciled().await;
        assert!(!s.reconciling());
        assert_eq!(s.chunk_count(), 50, "{report:?}");
        assert_eq!(s.current_size(), 50 * 100);
        assert_eq!(s.current_size(), disk_usage(&dir.path().join("chunks")));
        assert!(!s.contains(&ids[5]));
    }

    /// A disk that stops answering: the first operation to meet the hang
    /// waits at most the disk timeout; then the store is degraded and
    /// refuses disk work at once, and recovers when the stuck call returns.
    /// (The hang is injected: every disk operation first waits.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hung_disk_is_noticed_bypassed_and_recovered_from() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = StoreConfig::new(dir.path(), 1 << 20);
        config.disk_timeout = Duration::from_millis(200);
        let (s, _) = ChunkStore::open(config, Index::temporary().unwrap()).unwrap();
        s.reconciled().await;
        let id = s.put(Bytes::from_static(b"cached")).await.unwrap();
        s.inject_disk_hang(true);
        // Released however the test ends, so a failed assertion fails the
        // test instead of hanging the runtime's shutdown.
        struct Unhang(ChunkStore);
        impl Drop for Unhang {
            fn drop(&mut self) {
                self.0.inject_disk_hang(false);
            }
        }
        let _unhang = Unhang(s.clone());
        let err = s.get(id).await.unwrap_err();
        assert!(matches!(err, CasError::CacheUnavailable { .. }), "{err}");
        // The timed-out read is still stuck on the disk: that is the sign.
        assert!(s.not_answering());
        let why = s.degraded().unwrap();
        assert!(why.contains("not answering"), "{why}");
        // Now refused at once, on both paths, without touching the disk.
        assert!(matches!(
            s.read_unverified_now(id, 0, 6),
            Err(CasError::CacheUnavailable { .. })
        ));
        assert!(matches!(
            s.put(Bytes::from_static(b"new")).await,
            Err(CasError::CacheUnavailable { .. })
        ));
        // The disk answers again: the stuck read returns, the store is
        // healthy without anyone probing it.
        s.inject_disk_hang(false);
        let deadline = Instant::now() + Duration::from_secs(60);
        while s.not_answering() {
            assert!(Instant::now() < deadline, "never recovered");
            tokio::task::yield_now().await;
        }
        assert_eq!(s.degraded(), None);
        assert_eq!(s.get(id).await.unwrap(), Bytes::from_static(b"cached"));
    }

    #[tokio::test]
    async fn manifests_without_any_stored_chunk_are_swept() {
        use crate::manifest::{ChunkRef, FileVersion, Manifest};
        use musicfs_origins::{OriginId, OriginPath};
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), 1 << 20).await;
        let kept = s.put(Bytes::from_static(b"kept")).await.unwrap();
        let o = OriginId::new("lib").unwrap();
        let manifest = |ids: &[ChunkId]| {
            let mut m = Manifest::new(FileVersion {
                size: 4 * ids.len() as u64,
                mtime_ns: Some(1),
                etag: None,
            });
            for id in ids {
                m.push(ChunkRef { id: *id, len: 4 }).unwrap();
            }
            m
        };
        let gone = ChunkId::of(b"gone");
        let (a, b) = (OriginPath::new("a").unwrap(), OriginPath::new("b").unwrap());
        s.index()
            .put_manifest(&o, &a, &manifest(&[gone, kept]))
            .unwrap();
        s.index().put_manifest(&o, &b, &manifest(&[gone])).unwrap();
        assert_eq!(s.index().manifest_count(), 2);
        assert_eq!(s.sweep_manifests().await, 1);
        assert!(s.index().manifest(&o, &a).unwrap().is_some());
        assert!(s.index().manifest(&o, &b).unwrap().is_none());
        assert_eq!(s.index().manifest_count(), 1);
    }

    /// The index's disk use counts against the cache size.
    #[tokio::test]
    async fn eviction_keeps_chunks_and_index_within_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let (index, _) = Index::open(&dir.path().join("index.sled")).unwrap();
        index.flush().unwrap();
        let index_bytes = reconcile::dir_blocks(&dir.path().join("index.sled"));
        assert!(index_bytes > 0);
        // Room for the index (with slack for its growth) and 64 KiB.
        let limit = index_bytes + (1 << 20) + 64 * 1024;
        let (s, _) = ChunkStore::open(StoreConfig::new(dir.path(), limit), index).unwrap();
        s.reconciled().await;
        for i in 0..60u8 {
            s.put(Bytes::from(vec![i; 1024])).await.unwrap();
        }
        s.index().flush().unwrap();
        s.upkeep_now().await;
        assert!(s.index_size() > 0);
        assert!(
            s.current_size() + s.index_size() <= limit,
            "{} + {} > {limit}",
            s.current_size(),
            s.index_size()
        );
    }
}
