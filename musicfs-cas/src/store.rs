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
//! - `current_size` is the sum of the chunk files in the shard tree; it is
//!   computed by a recursive scan at open and kept current by every put and
//!   removal. When it passes `max_size`, least-recently-used chunks are
//!   removed down to the low watermark, skipping every pinned chunk (a read
//!   in flight pins the chunks it needs).
//! - Renames into place and evictions' unlinks happen under the table lock,
//!   so an eviction can never delete a chunk that a concurrent put has just
//!   re-created.
//! - At most `max_open_files` chunk files are open at once; the rest queue,
//!   and an operation that still meets `EMFILE` waits for fds to free up
//!   (up to [`fds::FD_WAIT`]) rather than failing the read.
//! - When the disk fails (read-only, full after eviction, I/O errors, the
//!   directory gone and not re-creatable) the store turns *degraded*: puts
//!   are refused with [`CasError::CacheUnavailable`] so callers serve from the
//!   origin. Every few seconds a put probes the disk, and the store recovers
//!   by itself when the probe succeeds.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use musicfs_origins::fds;
use parking_lot::Mutex;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use crate::index::{now_ns, ChunkRecord, Index};
use crate::{CasError, ChunkId, Result};

/// How long a degraded store waits between probes of the disk.
const PROBE_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// The cache directory; the store uses `chunks/` and `tmp/` inside it.
    pub dir: PathBuf,
    /// Eviction starts when the chunk files pass this many bytes.
    pub max_size: u64,
    /// Eviction stops at this percentage of `max_size`.
    pub low_watermark_pct: u8,
    /// Larger puts are refused: no chunk can be larger than FastCDC's max.
    pub max_chunk: u64,
    /// Chunk files open at once; 0 picks a quarter of RLIMIT_NOFILE (8..=256).
    pub max_open_files: usize,
}

impl StoreConfig {
    pub fn new(dir: impl Into<PathBuf>, max_size: u64) -> Self {
        Self {
            dir: dir.into(),
            max_size,
            low_watermark_pct: 90,
            max_chunk: 4 << 20,
            max_open_files: 0,
        }
    }
}

/// What the store's open found and fixed.
#[derive(Debug, Clone, Default)]
pub struct OpenReport {
    pub chunks: u64,
    pub bytes: u64,
    pub temp_files_removed: u64,
    pub stray_files_removed: u64,
    pub index_entries_dropped: u64,
    pub index_entries_added: u64,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    size: u64,
    atime_ns: u64,
}

#[derive(Debug, Default)]
struct Table {
    entries: HashMap<ChunkId, Entry>,
    pins: HashMap<ChunkId, u32>,
    total: u64,
    dirty: HashSet<ChunkId>,
}

impl Table {
    fn insert(&mut self, id: ChunkId, size: u64) {
        let e = Entry {
            size,
            atime_ns: now_ns(),
        };
        if let Some(old) = self.entries.insert(id, e) {
            self.total -= old.size;
        }
        self.total += size;
    }

    fn remove(&mut self, id: &ChunkId) -> Option<Entry> {
        let e = self.entries.remove(id)?;
        self.total -= e.size;
        self.dirty.remove(id);
        Some(e)
    }
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
    max_size: u64,
    low_water: u64,
    max_chunk: u64,
    index: Index,
    table: Mutex<Table>,
    io: Arc<Semaphore>,
    disk: DiskState,
    counters: StoreCounters,
    tmp_seq: AtomicU64,
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
    /// Opens the store: cleans crash leftovers, scans the shard tree, and
    /// reconciles `index` with the files found (the files win).
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
        report.temp_files_removed = clean_dir(&tmp_dir);

        let mut found = Vec::new();
        scan_shards(&chunks_dir, 0, &mut found, &mut report.stray_files_removed);
        let mut table = Table::default();
        let recorded: HashMap<ChunkId, ChunkRecord> = index.chunk_records()?.into_iter().collect();
        for (id, size, mtime_ns) in found {
            let atime_ns = match recorded.get(&id) {
                Some(rec) => rec.atime_ns,
                None => {
                    report.index_entries_added += 1;
                    let _ = index.put_chunk(
                        &id,
                        ChunkRecord {
                            size,
                            atime_ns: mtime_ns,
                        },
                    );
                    mtime_ns
                }
            };
            table.entries.insert(id, Entry { size, atime_ns });
            table.total += size;
        }
        for id in recorded.keys() {
            if !table.entries.contains_key(id) {
                report.index_entries_dropped += 1;
                let _ = index.remove_chunk(id);
            }
        }
        report.chunks = table.entries.len() as u64;
        report.bytes = table.total;
        if report.temp_files_removed
            + report.stray_files_removed
            + report.index_entries_dropped
            + report.index_entries_added
            > 0
        {
            info!(?report, "cache opened; healed leftovers");
        }

        let max_open = if config.max_open_files == 0 {
            default_max_open_files()
        } else {
            config.max_open_files
        };
        let low_water = config.max_size / 100 * u64::from(config.low_watermark_pct.min(100));
        let store = ChunkStore {
            inner: Arc::new(Inner {
                chunks_dir,
                tmp_dir,
                max_size: config.max_size,
                low_water,
                max_chunk: config.max_chunk,
                index,
                table: Mutex::new(table),
                io: Arc::new(Semaphore::new(max_open)),
                disk,
                counters: StoreCounters::default(),
                tmp_seq: AtomicU64::new(0),
            }),
        };
        store.inner.evict_if_needed();
        Ok((store, report))
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

    pub fn current_size(&self) -> u64 {
        self.inner.table.lock().total
    }

    pub fn max_size(&self) -> u64 {
        self.inner.max_size
    }

    pub fn chunk_count(&self) -> u64 {
        self.inner.table.lock().entries.len() as u64
    }

    pub fn contains(&self, id: &ChunkId) -> bool {
        self.inner.table.lock().entries.contains_key(id)
    }

    pub fn ids(&self) -> Vec<ChunkId> {
        self.inner.table.lock().entries.keys().copied().collect()
    }

    pub fn counters(&self) -> &StoreCounters {
        &self.inner.counters
    }

    /// `Some(reason)` while the cache disk is unusable.
    pub fn degraded(&self) -> Option<String> {
        if self.inner.disk.degraded.load(Ordering::SeqCst) {
            Some(self.inner.disk.reason.lock().clone().unwrap_or_default())
        } else {
            None
        }
    }

    /// True when the store is degraded and the probe interval has passed.
    pub fn probe_due(&self) -> bool {
        self.inner.disk.degraded.load(Ordering::SeqCst)
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
        let permit = self.acquire_io().await?;
        blocking(move || {
            let _permit = permit;
            out_of_fds_waited(|| inner.put_sync(&data))
        })
        .await
    }

    /// Reads and verifies the chunk `id`. A corrupt file is removed; a
    /// missing or corrupt chunk is forgotten so the caller can re-fetch it.
    pub async fn get(&self, id: ChunkId) -> Result<Bytes> {
        let inner = self.inner.clone();
        let permit = self.acquire_io().await?;
        blocking(move || {
            let _permit = permit;
            out_of_fds_waited(|| inner.get_sync(&id))
        })
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

    fn put_sync(&self, data: &[u8]) -> Result<ChunkId> {
        let id = ChunkId::of(data);
        let known = self.table.lock().entries.contains_key(&id);
        // A listed chunk whose file is gone must be written again, not
        // counted as a dedup hit (one stat per hit is cheap next to a write).
        if known && self.chunk_path(&id).exists() {
            if let Some(e) = self.table.lock().entries.get_mut(&id) {
                e.atime_ns = now_ns();
            }
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
                let need = (data.len() as u64).max(self.table.lock().total / 10);
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
        self.evict_if_needed();
        Ok(id)
    }

    fn write_chunk(&self, id: &ChunkId, data: &[u8]) -> std::io::Result<()> {
        let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .tmp_dir
            .join(format!("{}.{}.{seq}.tmp", id.to_hex(), std::process::id()));
        let write = |tmp: &Path| -> std::io::Result<()> {
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
        if let Some(parent) = path.parent() {
            if let Err(e) = fs::create_dir_all(parent) {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        }
        let mut t = self.table.lock();
        if let Err(e) = fs::rename(&tmp, &path) {
            drop(t);
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        t.insert(*id, data.len() as u64);
        Ok(())
    }

    fn get_sync(&self, id: &ChunkId) -> Result<Bytes> {
        self.counters.gets.fetch_add(1, Ordering::Relaxed);
        let path = self.chunk_path(id);
        let data = match fs::read(&path) {
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
        let mut t = self.table.lock();
        if let Some(e) = t.entries.get_mut(id) {
            e.atime_ns = now_ns();
            t.dirty.insert(*id);
        }
        Ok(Bytes::from(data))
    }

    /// Drops a chunk from the table and index, and its file when asked.
    /// Drops a chunk from the table and index, removing its file when
    /// `unlink` (else only if the file is really gone: a concurrent put may
    /// have just re-created it). An entry whose file cannot be removed stays
    /// counted, so the size keeps matching the disk.
    fn forget(&self, id: &ChunkId, unlink: bool) {
        let path = self.chunk_path(id);
        let mut t = self.table.lock();
        let gone = if unlink {
            match fs::remove_file(&path) {
                Ok(()) => true,
                Err(e) => e.kind() == ErrorKind::NotFound,
            }
        } else {
            !path.exists()
        };
        if !gone {
            return;
        }
        t.remove(id);
        drop(t);
        let _ = self.index.remove_chunk(id);
    }

    fn evict_if_needed(&self) {
        let total = self.table.lock().total;
        if total > self.max_size {
            let freed = self.evict_bytes(total - self.low_water);
            debug!(freed, "evicted down to the low watermark");
        }
    }

    /// Removes least-recently-used unpinned chunks until `need` bytes are
    /// freed or nothing evictable is left. Returns the bytes freed.
    fn evict_bytes(&self, need: u64) -> u64 {
        let mut t = self.table.lock();
        let mut candidates: Vec<(u64, ChunkId, u64)> = t
            .entries
            .iter()
            .filter(|(id, _)| !t.pins.contains_key(id))
            .map(|(id, e)| (e.atime_ns, *id, e.size))
            .collect();
        candidates.sort_unstable();
        let mut freed = 0;
        let mut victims = Vec::new();
        for (_, id, size) in candidates {
            if freed >= need {
                break;
            }
            match fs::remove_file(self.chunk_path(&id)) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => {
                    warn!(chunk = %id, error = %e, "cannot evict chunk");
                    continue;
                }
            }
            t.remove(&id);
            freed += size;
            victims.push(id);
        }
        drop(t);
        for id in &victims {
            let _ = self.index.remove_chunk(id);
        }
        self.counters
            .evicted_chunks
            .fetch_add(victims.len() as u64, Ordering::Relaxed);
        self.counters
            .evicted_bytes
            .fetch_add(freed, Ordering::Relaxed);
        freed
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
        let dirty: Vec<(ChunkId, Entry)> = {
            let mut t = self.table.lock();
            let ids: Vec<ChunkId> = t.dirty.drain().collect();
            ids.into_iter()
                .filter_map(|id| t.entries.get(&id).map(|e| (id, *e)))
                .collect()
        };
        for (id, e) in dirty {
            self.index.put_chunk(
                &id,
                ChunkRecord {
                    size: e.size,
                    atime_ns: e.atime_ns,
                },
            )?;
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
        let permit = self.acquire_io().await?;
        blocking(move || {
            let _permit = permit;
            inner.read_range_sync(&id, offset, len)
        })
        .await
    }

    /// [`ChunkStore::read_unverified`] on the calling thread, for callers
    /// that are not async (the filesystem's fast path for cached reads).
    /// Never waits for the fd budget: with no file to spare it fails, and
    /// the caller takes the async path, which queues.
    pub(crate) fn read_unverified_now(
        &self,
        id: ChunkId,
        offset: u64,
        len: usize,
    ) -> Result<Vec<u8>> {
        let _permit =
            self.inner
                .io
                .clone()
                .try_acquire_owned()
                .map_err(|_| CasError::TooManyOpenFiles {
                    path: self.inner.chunks_dir.clone(),
                })?;
        self.inner.read_range_sync(&id, offset, len)
    }
}

impl Inner {
    fn read_range_sync(&self, id: &ChunkId, offset: u64, len: usize) -> Result<Vec<u8>> {
        use std::io::{Read, Seek, SeekFrom};
        let path = self.chunk_path(id);
        let mut buf = Vec::with_capacity(len);
        fs::File::open(&path)
            .and_then(|mut f| {
                f.seek(SeekFrom::Start(offset))?;
                f.take(len as u64).read_to_end(&mut buf)
            })
            .map_err(|e| CasError::io(&path, e))?;
        self.counters.gets.fetch_add(1, Ordering::Relaxed);
        let mut t = self.table.lock();
        if let Some(e) = t.entries.get_mut(id) {
            e.atime_ns = now_ns();
            t.dirty.insert(*id);
        }
        Ok(buf)
    }
}

/// Removes every file in `dir` (temp files left by a crash); returns how many.
fn clean_dir(dir: &Path) -> u64 {
    let Ok(rd) = fs::read_dir(dir) else { return 0 };
    let mut n = 0;
    for entry in rd.flatten() {
        let p = entry.path();
        let removed = if p.is_dir() {
            fs::remove_dir_all(&p)
        } else {
            fs::remove_file(&p)
        };
        if removed.is_ok() {
            n += 1;
        }
    }
    n
}

/// Recursively collects `(id, size, mtime_ns)` of chunk files under the
/// shard tree. Anything else found there (temp files, wrong names, files in
/// the wrong shard) is removed: only the store writes here.
fn scan_shards(dir: &Path, depth: usize, out: &mut Vec<(ChunkId, u64, u64)>, strays: &mut u64) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for entry in rd.flatten() {
        let path = entry.path();
        let Ok(meta) = entry.metadata() else { continue };
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if meta.is_dir() {
            if depth < 2 && name.len() == 2 {
                scan_shards(&path, depth + 1, out, strays);
            } else {
                warn!(path = %path.display(), "removing a stray directory from the chunk tree");
                let _ = fs::remove_dir_all(&path);
                *strays += 1;
            }
            continue;
        }
        let in_right_shard = depth == 2
            && dir
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .as_deref()
                == name.get(2..4)
            && dir
                .parent()
                .and_then(|p| p.file_name())
                .map(|s| s.to_string_lossy().into_owned())
                .as_deref()
                == name.get(0..2);
        match ChunkId::from_hex(&name) {
            Some(id) if in_right_shard && meta.is_file() => {
                use std::os::unix::fs::MetadataExt;
                let mtime_ns =
                    (meta.mtime().max(0) as u64) * 1_000_000_000 + meta.mtime_nsec().max(0) as u64;
                out.push((id, meta.len(), mtime_ns));
            }
            _ => {
                warn!(path = %path.display(), "removing a stray file from the chunk tree");
                let _ = fs::remove_file(&path);
                *strays += 1;
            }
        }
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

    fn open(dir: &Path, max: u64) -> ChunkStore {
        ChunkStore::open(StoreConfig::new(dir, max), Index::temporary().unwrap())
            .unwrap()
            .0
    }

    #[tokio::test]
    async fn put_get_round_trip_and_dedup() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), 1 << 20);
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
        let s = open(dir.path(), 100 << 20);
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
        let s = open(dir.path(), 10 * 1024);
        let mut ids = Vec::new();
        for i in 0..10u8 {
            ids.push(s.put(Bytes::from(vec![i; 1024])).await.unwrap());
        }
        assert_eq!(s.current_size(), 10 * 1024);
        // Touch chunk 0 so chunk 1 is the oldest; pin chunk 2.
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
    }

    #[tokio::test]
    async fn corrupt_and_missing_chunks_are_reported_and_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), 1 << 20);
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
            let s = open(dir.path(), 1 << 20);
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
        assert_eq!(report.stray_files_removed, 1);
        assert_eq!(report.index_entries_added, 1);
        assert!(s.contains(&id));
        assert_eq!(s.index().chunk_count(), 1);
        assert_eq!(s.current_size(), 4);
    }
}
