//! The cache the filesystem reads through.
//!
//! [`Cache::open_file`] binds a handle to one version of an origin file
//! (size, mtime, etag). Cached data of any other version is discarded, so a
//! file changed on the origin is never served from stale chunks.
//!
//! A read of `[offset, end)` is served, piece by piece, from:
//! 1. chunks in the file's manifest (verified; a corrupt or missing chunk is
//!    re-fetched by its own byte range and checked against its name),
//! 2. the ingest buffer: bytes already read from the origin but not yet cut
//!    into chunks,
//! 3. the origin directly, for bytes past the ingest buffer.
//!
//! Ingest: chunk boundaries need the bytes in order, so each open file has
//! at most one background ingest that reads the origin sequentially in
//! growing blocks (128 KiB first, so a cold first read costs about one small
//! origin request), cuts chunks, stores them and extends the manifest. It
//! runs `readahead` bytes ahead of the furthest sequential read and then
//! pauses, so playing the first seconds of a track never downloads the
//! whole track. A read just past the ingest buffer waits for the ingest
//! instead of fetching the same bytes again, so concurrent readers of one
//! cold file share one stream of origin reads; a read far ahead (a seek)
//! goes to the origin directly and does not drag the ingest along.
//!
//! When the cache disk is unusable the ingest stops and reads are served by
//! the origin (passthrough); the store recovers by itself later.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use musicfs_origins::{DynOrigin, EntryMeta, OriginId, OriginPath};
use parking_lot::{Mutex, RwLock};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::index::{log_rebuild, Index, IndexOpenReport};
use crate::manifest::{ChunkRef, FileVersion, Manifest};
use crate::store::{ChunkStore, OpenReport, PinGuard, StoreConfig};
use crate::{CasError, ChunkId, ChunkParams, Result};

/// First ingest request; doubles per request up to [`MAX_BLOCK`].
const FIRST_BLOCK: u64 = 128 * 1024;
const MAX_BLOCK: u64 = 2 * 1024 * 1024;
/// A read starting this close past the ingest buffer waits for the ingest.
const WAIT_WINDOW: u64 = 4 * 1024 * 1024;
/// After a failed ingest, reads go to the origin directly for this long
/// before the ingest is tried again.
const INGEST_RETRY_AFTER: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub dir: PathBuf,
    pub max_size: u64,
    pub chunk_params: ChunkParams,
    /// How far the ingest runs ahead of the furthest sequential read.
    pub readahead: u64,
    /// Bound on each origin call the cache makes.
    pub origin_timeout: Duration,
    /// Chunk files open at once; 0 derives it from RLIMIT_NOFILE.
    pub max_open_files: usize,
}

impl CacheConfig {
    pub fn new(dir: impl Into<PathBuf>, max_size: u64) -> Self {
        Self {
            dir: dir.into(),
            max_size,
            chunk_params: ChunkParams::default(),
            readahead: 16 << 20,
            origin_timeout: Duration::from_secs(30),
            max_open_files: 0,
        }
    }
}

/// What opening the cache found and healed.
#[derive(Debug, Clone, Default)]
pub struct CacheOpenReport {
    pub index: IndexOpenReport,
    pub store: OpenReport,
}

/// A snapshot for `musicfs status`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub size: u64,
    pub max_size: u64,
    pub chunks: u64,
    pub manifests: u64,
    /// Bytes served from chunks or the ingest buffer.
    pub hit_bytes: u64,
    /// Bytes served by direct origin reads (cold seeks, passthrough).
    pub origin_bytes: u64,
    /// Bytes the ingest read from origins.
    pub ingested_bytes: u64,
    pub refetched_chunks: u64,
    pub corrupt_chunks: u64,
    pub missing_chunks: u64,
    pub evicted_chunks: u64,
    pub open_files: u64,
    pub degraded: Option<String>,
}

#[derive(Debug, Default)]
struct Counters {
    hit_bytes: AtomicU64,
    origin_bytes: AtomicU64,
    ingested_bytes: AtomicU64,
    refetched: AtomicU64,
}

#[derive(Debug)]
struct CacheInner {
    config: CacheConfig,
    store: ChunkStore,
    origins: RwLock<HashMap<OriginId, DynOrigin>>,
    open: Mutex<HashMap<(OriginId, OriginPath), Weak<OpenFile>>>,
    counters: Counters,
}

/// The chunk cache; cheap to clone.
#[derive(Debug, Clone)]
pub struct Cache {
    inner: Arc<CacheInner>,
}

/// An open file; reads go through it. Dropping the last handle of a file
/// stops its ingest (the manifest so far stays in the index).
#[derive(Debug, Clone)]
pub struct FileHandle {
    file: Arc<OpenFile>,
    cache: Arc<CacheInner>,
}

#[derive(Debug)]
struct OpenFile {
    origin: DynOrigin,
    path: OriginPath,
    version: FileVersion,
    state: Mutex<FileState>,
    progress: watch::Sender<u64>,
}

#[derive(Debug)]
struct FileState {
    manifest: Manifest,
    /// Bytes `[manifest.covered(), manifest.covered() + tail.len())`.
    tail: BytesMut,
    want_until: u64,
    ingest: Ingest,
    /// The origin no longer has this version: never persist or extend the
    /// manifest again.
    stale: bool,
}

#[derive(Debug)]
enum Ingest {
    Idle,
    Running,
    Failed {
        at: Instant,
    },
    /// Chunks could not be stored; restarts once the store is healthy.
    Stopped,
    Done,
}

impl FileState {
    fn buffered_end(&self) -> u64 {
        self.manifest.covered() + self.tail.len() as u64
    }
}

impl Cache {
    /// Opens (creating if needed) the cache in `config.dir`, healing crash
    /// leftovers and a damaged index on the way.
    pub async fn open(config: CacheConfig) -> Result<(Self, CacheOpenReport)> {
        config.chunk_params.validate()?;
        let dir = config.dir.clone();
        let store_config = StoreConfig {
            dir: dir.clone(),
            max_size: config.max_size,
            low_watermark_pct: 90,
            max_chunk: u64::from(config.chunk_params.max),
            max_open_files: config.max_open_files,
        };
        let (store, report) = tokio::task::spawn_blocking(move || -> Result<_> {
            if let Err(e) = std::fs::create_dir_all(&dir) {
                warn!(dir = %dir.display(), error = %e, "cannot create the cache directory");
            }
            let (index, index_report) = Index::open(&dir.join("index.sled"))?;
            log_rebuild(&index_report);
            let (store, store_report) = ChunkStore::open(store_config, index)?;
            Ok((
                store,
                CacheOpenReport {
                    index: index_report,
                    store: store_report,
                },
            ))
        })
        .await
        .map_err(|e| CasError::CacheUnavailable {
            reason: format!("opening the cache failed: {e}"),
        })??;
        let cache = Cache {
            inner: Arc::new(CacheInner {
                config,
                store,
                origins: RwLock::new(HashMap::new()),
                open: Mutex::new(HashMap::new()),
                counters: Counters::default(),
            }),
        };
        Ok((cache, report))
    }

    pub fn add_origin(&self, origin: DynOrigin) {
        self.inner
            .origins
            .write()
            .insert(origin.id().clone(), origin);
    }

    pub fn origin(&self, id: &OriginId) -> Option<DynOrigin> {
        self.inner.origins.read().get(id).cloned()
    }

    pub fn store(&self) -> &ChunkStore {
        &self.inner.store
    }

    pub fn index(&self) -> &Index {
        self.inner.store.index()
    }

    pub fn config(&self) -> &CacheConfig {
        &self.inner.config
    }

    /// Opens `path` of `origin` as the version `meta` describes (from a
    /// fresh or cached stat). Cached data of another version is dropped.
    pub async fn open_file(
        &self,
        origin: &OriginId,
        path: &OriginPath,
        meta: &EntryMeta,
    ) -> Result<FileHandle> {
        let o = self.origin(origin).ok_or_else(|| CasError::UnknownOrigin {
            origin: origin.clone(),
        })?;
        let version = FileVersion::of(meta);
        let key = (origin.clone(), path.clone());
        // One lock over lookup and insert: two opens of one file must share
        // one OpenFile (and so one ingest).
        let mut open = self.inner.open.lock();
        if let Some(file) = open.get(&key).and_then(Weak::upgrade) {
            if file.version == version {
                return Ok(FileHandle {
                    file,
                    cache: self.inner.clone(),
                });
            }
            // An older version is still open: it must not write its manifest
            // over the new one's.
            file.state.lock().stale = true;
        }
        let manifest = match self.index().manifest(origin, path) {
            Ok(Some(m)) if m.version == version => m,
            Ok(Some(m)) => {
                info!(%origin, %path, old = ?m.version, new = ?version, "file changed on the origin; its cached chunks are no longer used");
                let _ = self.index().remove_manifest(origin, path);
                Manifest::new(version.clone())
            }
            Ok(None) => Manifest::new(version.clone()),
            Err(e) => {
                warn!(%origin, %path, error = %e, "cannot read the manifest; reading without it");
                Manifest::new(version.clone())
            }
        };
        let ingest = if manifest.is_complete() {
            Ingest::Done
        } else {
            Ingest::Idle
        };
        let file = Arc::new(OpenFile {
            origin: o,
            path: path.clone(),
            version,
            state: Mutex::new(FileState {
                manifest,
                tail: BytesMut::new(),
                want_until: 0,
                ingest,
                stale: false,
            }),
            progress: watch::channel(0).0,
        });
        open.retain(|_, w| w.strong_count() > 0);
        open.insert(key, Arc::downgrade(&file));
        Ok(FileHandle {
            file,
            cache: self.inner.clone(),
        })
    }

    pub fn stats(&self) -> CacheStats {
        let s = &self.inner.store;
        let c = &self.inner.counters;
        let sc = s.counters();
        CacheStats {
            size: s.current_size(),
            max_size: s.max_size(),
            chunks: s.chunk_count(),
            manifests: self.index().manifest_count() as u64,
            hit_bytes: c.hit_bytes.load(Ordering::Relaxed),
            origin_bytes: c.origin_bytes.load(Ordering::Relaxed),
            ingested_bytes: c.ingested_bytes.load(Ordering::Relaxed),
            refetched_chunks: c.refetched.load(Ordering::Relaxed),
            corrupt_chunks: sc.corrupt.load(Ordering::Relaxed),
            missing_chunks: sc.missing.load(Ordering::Relaxed),
            evicted_chunks: sc.evicted_chunks.load(Ordering::Relaxed),
            open_files: self
                .inner
                .open
                .lock()
                .values()
                .filter(|w| w.strong_count() > 0)
                .count() as u64,
            degraded: s.degraded(),
        }
    }

    /// Persists access times and the index (call on shutdown).
    pub async fn flush(&self) -> Result<()> {
        self.inner.store.flush().await
    }

    /// Checks every chunk and manifest; with `repair`, fixes what it finds
    /// (see [`crate::verify`]).
    pub async fn verify(&self, repair: bool) -> Result<crate::VerifyReport> {
        crate::verify::run(self, repair).await
    }

    /// Re-fetches one chunk of a file from its origin by byte range, checks
    /// it against `id` and stores it (verify's repair uses this too).
    pub(crate) async fn refetch_chunk(
        &self,
        origin: &DynOrigin,
        path: &OriginPath,
        version: &FileVersion,
        start: u64,
        chunk: ChunkRef,
    ) -> Result<Bytes> {
        self.inner
            .refetch_chunk(origin, path, version, start, chunk)
            .await
    }
}

impl FileHandle {
    pub fn size(&self) -> u64 {
        self.file.version.size
    }

    pub fn path(&self) -> &OriginPath {
        &self.file.path
    }

    /// Bytes `[offset, offset+len)` of the file, fewer only at its end.
    pub async fn read(&self, offset: u64, len: u64) -> Result<Bytes> {
        let size = self.file.version.size;
        if offset >= size || len == 0 {
            return Ok(Bytes::new());
        }
        let end = offset.saturating_add(len).min(size);
        let mut out = BytesMut::with_capacity((end - offset) as usize);
        let mut pos = offset;
        while pos < end {
            match self.next_step(pos, end) {
                Step::Chunks(chunks, _pin) => {
                    for (start, chunk) in chunks {
                        let data = self.chunk_bytes(start, chunk).await?;
                        let from = (pos - start) as usize;
                        let to = (end.min(start + u64::from(chunk.len)) - start) as usize;
                        out.extend_from_slice(&data[from..to]);
                        pos = start + to as u64;
                        self.cache
                            .counters
                            .hit_bytes
                            .fetch_add((to - from) as u64, Ordering::Relaxed);
                    }
                }
                Step::Buffered(bytes) => {
                    pos += bytes.len() as u64;
                    self.cache
                        .counters
                        .hit_bytes
                        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    out.extend_from_slice(&bytes);
                }
                Step::Wait(mut rx) => {
                    // Err only if the sender is gone, which cannot happen
                    // while we hold the file; either way, look again.
                    let _ = rx.changed().await;
                }
                Step::Direct(upto) => {
                    let data = self
                        .cache
                        .origin_read(&self.file.origin, &self.file.path, size, pos, upto - pos)
                        .await?;
                    self.cache
                        .counters
                        .origin_bytes
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                    pos = upto;
                    out.extend_from_slice(&data);
                }
            }
        }
        Ok(out.freeze())
    }

    /// Decides where the bytes at `pos` come from, under the state lock.
    fn next_step(&self, pos: u64, end: u64) -> Step {
        let mut st = self.file.state.lock();
        let covered = st.manifest.covered();
        let buffered_end = st.buffered_end();
        let sequential = pos <= buffered_end.saturating_add(WAIT_WINDOW);
        if sequential {
            let want = end.saturating_add(self.cache.config.readahead);
            if want > st.want_until {
                st.want_until = want;
            }
            self.maybe_start_ingest(&mut st);
        }
        if pos < covered {
            let chunks = st.manifest.chunks_in(pos, end.min(covered) - pos);
            // Pinned before the lock drops, so eviction cannot slip in
            // between choosing the chunks and reading them.
            let ids: Vec<ChunkId> = chunks.iter().map(|(_, c)| c.id).collect();
            let pin = self.cache.store.pin(&ids);
            return Step::Chunks(chunks, pin);
        }
        if pos < buffered_end {
            let from = (pos - covered) as usize;
            let to = (end.min(buffered_end) - covered) as usize;
            return Step::Buffered(Bytes::copy_from_slice(&st.tail[from..to]));
        }
        if sequential && matches!(st.ingest, Ingest::Running) {
            let mut rx = self.file.progress.subscribe();
            rx.borrow_and_update();
            return Step::Wait(rx);
        }
        Step::Direct(end)
    }

    fn maybe_start_ingest(&self, st: &mut FileState) {
        let startable = match st.ingest {
            Ingest::Idle | Ingest::Stopped => true,
            Ingest::Failed { at } => at.elapsed() >= INGEST_RETRY_AFTER,
            Ingest::Running | Ingest::Done => false,
        };
        if st.stale
            || !startable
            || st.buffered_end() >= st.want_until
            || st.buffered_end() >= self.file.version.size
        {
            return;
        }
        if self.cache.store.degraded().is_some() {
            // Passthrough. Reads drive the store's recovery: a probe every
            // few seconds, and the ingest resumes once the disk works.
            if self.cache.store.probe_due() {
                let store = self.cache.store.clone();
                tokio::spawn(async move { store.probe().await });
            }
            return;
        }
        st.ingest = Ingest::Running;
        let weak = Arc::downgrade(&self.file);
        let cache = self.cache.clone();
        tokio::spawn(async move { run_ingest(weak, cache).await });
    }

    /// A verified chunk, re-fetched from the origin when the cached copy is
    /// damaged or gone, or read through when the cache disk fails.
    async fn chunk_bytes(&self, start: u64, chunk: ChunkRef) -> Result<Bytes> {
        match self.cache.store.get(chunk.id).await {
            Ok(b) => Ok(b),
            Err(e) if e.is_refetchable() => {
                warn!(chunk = %chunk.id, path = %self.file.path, error = %e, "re-fetching chunk from the origin");
                let r = self
                    .cache
                    .refetch_chunk(
                        &self.file.origin,
                        &self.file.path,
                        &self.file.version,
                        start,
                        chunk,
                    )
                    .await;
                self.mark_stale_on_change(&r);
                r
            }
            Err(
                e @ (CasError::Io { .. }
                | CasError::TooManyOpenFiles { .. }
                | CasError::CacheUnavailable { .. }),
            ) => {
                debug!(chunk = %chunk.id, error = %e, "cache read failed; reading the chunk from the origin");
                let data = self
                    .cache
                    .origin_read(
                        &self.file.origin,
                        &self.file.path,
                        self.file.version.size,
                        start,
                        u64::from(chunk.len),
                    )
                    .await?;
                let checked = self
                    .cache
                    .check_chunk(&self.file.origin, &self.file.path, chunk, &data)
                    .map(|()| data);
                self.mark_stale_on_change(&checked);
                checked
            }
            Err(e) => Err(e),
        }
    }

    /// After the origin showed other bytes than the manifest's, this open
    /// file must neither serve nor persist the old manifest again.
    fn mark_stale_on_change<T>(&self, r: &Result<T>) {
        if let Err(CasError::OriginChanged { .. }) = r {
            let mut st = self.file.state.lock();
            st.stale = true;
            st.manifest = Manifest::new(self.file.version.clone());
            st.tail.clear();
            drop(st);
            let _ = self
                .cache
                .store
                .index()
                .remove_manifest(self.file.origin.id(), &self.file.path);
            self.file.progress.send_modify(|v| *v += 1);
        }
    }
}

enum Step {
    Chunks(Vec<(u64, ChunkRef)>, PinGuard),
    Buffered(Bytes),
    Wait(watch::Receiver<u64>),
    Direct(u64),
}

impl CacheInner {
    /// One bounded origin read that must return exactly the bytes asked for
    /// (clipped to the file's size): anything shorter means the file changed.
    async fn origin_read(
        &self,
        origin: &DynOrigin,
        path: &OriginPath,
        size: u64,
        offset: u64,
        len: u64,
    ) -> Result<Bytes> {
        let expect = len.min(size.saturating_sub(offset));
        let timeout = self.config.origin_timeout;
        let data =
            match tokio::time::timeout(timeout, origin.read_range(path, offset, expect)).await {
                Ok(r) => r?,
                Err(_) => {
                    return Err(CasError::OriginTimeout {
                        origin: origin.id().clone(),
                        path: path.to_string(),
                        timeout,
                    })
                }
            };
        if data.len() as u64 != expect {
            return Err(CasError::OriginChanged {
                origin: origin.id().clone(),
                path: path.to_string(),
                reason: format!("asked for {expect} bytes at {offset}, got {}", data.len()),
            });
        }
        Ok(data)
    }

    fn check_chunk(
        &self,
        origin: &DynOrigin,
        path: &OriginPath,
        chunk: ChunkRef,
        data: &[u8],
    ) -> Result<()> {
        let actual = ChunkId::of(data);
        if actual == chunk.id {
            return Ok(());
        }
        // The origin now has other bytes where the chunk was: the cached
        // manifest describes a version that is gone.
        let _ = self.store.index().remove_manifest(origin.id(), path);
        Err(CasError::OriginChanged {
            origin: origin.id().clone(),
            path: path.to_string(),
            reason: format!(
                "chunk {} re-read from the origin hashes to {actual}",
                chunk.id
            ),
        })
    }

    async fn refetch_chunk(
        &self,
        origin: &DynOrigin,
        path: &OriginPath,
        version: &FileVersion,
        start: u64,
        chunk: ChunkRef,
    ) -> Result<Bytes> {
        self.counters.refetched.fetch_add(1, Ordering::Relaxed);
        let data = if origin.supports_range_reads() {
            self.origin_read(origin, path, version.size, start, u64::from(chunk.len))
                .await?
        } else {
            // The whole file is what such an origin costs anyway: store all
            // of it, so the file's next missing chunk is no new fetch.
            let whole = self
                .origin_read(origin, path, version.size, 0, version.size)
                .await?;
            let end = start + u64::from(chunk.len);
            if end > whole.len() as u64 {
                return Err(CasError::OriginChanged {
                    origin: origin.id().clone(),
                    path: path.to_string(),
                    reason: "file is shorter than its manifest".into(),
                });
            }
            let mut pos = 0;
            for n in self.config.chunk_params.cut_all(&whole) {
                if pos as u64 != start {
                    let _ = self.store.put(whole.slice(pos..pos + n)).await;
                }
                pos += n;
            }
            whole.slice(start as usize..end as usize)
        };
        self.check_chunk(origin, path, chunk, &data)?;
        match self.store.put(data.clone()).await {
            Ok(_) | Err(CasError::CacheUnavailable { .. }) => {}
            Err(e) => debug!(error = %e, "could not store the re-fetched chunk"),
        }
        Ok(data)
    }
}

/// The ingest loop of one open file; see the module docs.
async fn run_ingest(weak: Weak<OpenFile>, cache: Arc<CacheInner>) {
    let params = cache.config.chunk_params;
    let mut block = FIRST_BLOCK;
    loop {
        let Some(file) = weak.upgrade() else { return };
        let size = file.version.size;
        // Cut and store every chunk the buffer can give.
        loop {
            let (chunk, eof) = {
                let st = file.state.lock();
                let eof = st.buffered_end() == size;
                match params.next_cut(&st.tail, eof) {
                    Some(n) => (Bytes::copy_from_slice(&st.tail[..n]), eof),
                    None => break,
                }
            };
            let len = chunk.len();
            match cache.store.put(chunk).await {
                Ok(id) => {
                    let snapshot = {
                        let mut st = file.state.lock();
                        if st.stale {
                            st.ingest = Ingest::Failed { at: Instant::now() };
                            return;
                        }
                        let pushed = st.manifest.push(ChunkRef {
                            id,
                            len: len as u32,
                        });
                        if let Err(e) = pushed {
                            warn!(path = %file.path, error = %e, "ingest produced an impossible chunk; stopping");
                            st.ingest = Ingest::Failed { at: Instant::now() };
                            drop(st);
                            file.progress.send_modify(|v| *v += 1);
                            return;
                        }
                        st.tail.advance(len);
                        st.manifest.clone()
                    };
                    if let Err(e) =
                        cache
                            .store
                            .index()
                            .put_manifest(file.origin.id(), &file.path, &snapshot)
                    {
                        debug!(error = %e, "could not persist the manifest");
                    }
                    file.progress.send_modify(|v| *v += 1);
                }
                Err(e) => {
                    // Passthrough from here: the buffered bytes keep serving
                    // readers, everything past them comes from the origin.
                    debug!(path = %file.path, error = %e, eof, "cannot store chunks; ingest stops");
                    file.state.lock().ingest = match e {
                        CasError::CacheUnavailable { .. } => Ingest::Stopped,
                        _ => Ingest::Failed { at: Instant::now() },
                    };
                    file.progress.send_modify(|v| *v += 1);
                    return;
                }
            }
        }
        let (from, len) = {
            let mut st = file.state.lock();
            let buffered_end = st.buffered_end();
            if buffered_end >= size && st.tail.is_empty() {
                st.ingest = Ingest::Done;
                drop(st);
                debug!(path = %file.path, "file fully cached");
                file.progress.send_modify(|v| *v += 1);
                return;
            }
            if buffered_end >= st.want_until {
                st.ingest = Ingest::Idle;
                return;
            }
            (buffered_end, block.min(size - buffered_end))
        };
        let origin = file.origin.clone();
        let path = file.path.clone();
        // Do not keep the file alive across a possibly long origin call.
        drop(file);
        let read = cache.origin_read(&origin, &path, size, from, len).await;
        let Some(file) = weak.upgrade() else { return };
        match read {
            Ok(data) => {
                cache
                    .counters
                    .ingested_bytes
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                file.state.lock().tail.extend_from_slice(&data);
                file.progress.send_modify(|v| *v += 1);
                block = (block * 2).min(MAX_BLOCK);
            }
            Err(e) => {
                warn!(path = %path, error = %e, "ingest read failed; reads go to the origin directly for now");
                file.state.lock().ingest = Ingest::Failed { at: Instant::now() };
                file.progress.send_modify(|v| *v += 1);
                return;
            }
        }
    }
}
