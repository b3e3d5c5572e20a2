//! The chunk store's disk operations: writing a chunk through `tmp/` and
//! renaming it into place, verified and range reads, removal, probing and
//! flushing. Each runs on a blocking thread, registers itself with the
//! hung-disk watch (`super::watch`) for as long as it runs, and takes the
//! table lock only around in-memory updates, never across a system call.

use std::fs;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use tracing::{debug, info, warn};

use super::{blocking, ChunkStore, Inner, PROBE_INTERVAL};
use crate::index::{now_ns, ChunkRecord};
use crate::{CasError, ChunkId, Result};
impl Inner {
    pub(super) fn chunk_path(&self, id: &ChunkId) -> PathBuf {
        let hex = id.to_hex();
        self.chunks_dir.join(&hex[0..2]).join(&hex[2..4]).join(hex)
    }

    /// `Some(reason)` while a disk operation has run past the timeout.
    pub(super) fn not_answering(&self) -> Option<String> {
        self.watch.stuck_for().map(|ran| {
            format!(
                "the cache disk is not answering (an operation has waited {} s)",
                ran.as_secs()
            )
        })
    }

    pub(super) fn put_sync(&self, data: &[u8]) -> Result<ChunkId> {
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

    pub(super) fn write_chunk(&self, id: &ChunkId, data: &[u8]) -> std::io::Result<()> {
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

    pub(super) fn get_sync(&self, id: &ChunkId) -> Result<Bytes> {
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
    pub(super) fn forget(&self, id: &ChunkId, unlink: bool) {
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

    pub(super) fn disk_failed(&self, err: &std::io::Error) -> CasError {
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

    pub(super) fn unavailable(&self) -> CasError {
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
    pub(super) fn probe_sync(&self) -> bool {
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

    pub(super) fn probe_now(&self) -> bool {
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

    pub(super) fn flush_sync(&self) -> Result<()> {
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
    pub(super) fn read_range_sync(&self, id: &ChunkId, offset: u64, len: usize) -> Result<Vec<u8>> {
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
