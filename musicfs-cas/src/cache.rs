//! The cache the filesystem reads through.
//!
//! [`Cache::open_file`] binds a handle to one version of an origin file
//! (size, mtime, etag). Cached data of any other version is discarded, so a
//! file changed on the origin is never served from stale chunks.
//!
//! A read of `[offset, end)` is served, piece by piece, from:
//! 1. chunks in the file's manifest (verified; a corrupt or missing chunk is
//!    re-fetched by its own byte range and checked against its name). The
//!    first read of a chunk reads and hashes all of it; that also gives its
//!    hash tree ([`crate::tree`]), kept in memory, so later small reads of it
//!    (a seek) read and check only the 16 KiB groups they touch. The last
//!    few whole chunks a file read stay in memory with the open file, so the
//!    several kernel requests that fall in one chunk read and hash it once.
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
//! goes to the origin directly and does not drag the ingest along. A read
//! that continues the furthest read so far still counts as the stream even
//! when the kernel's read-ahead has run past the wait window, so a fast
//! reader keeps the ingest going and the file ends up fully cached.
//!
//! When the cache disk is unusable the ingest stops and reads are served by
//! the origin (passthrough); the store recovers by itself later.

use std::collections::{HashMap, VecDeque};
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
use crate::stats::CacheStats;
use crate::store::{ChunkStore, OpenReport, PinGuard, StoreConfig};
use crate::tree::{ChunkTree, TreeMemo};
use crate::{CasError, ChunkId, ChunkParams, Result};

/// First ingest request; doubles per request up to [`MAX_BLOCK`].
const FIRST_BLOCK: u64 = 128 * 1024;
const MAX_BLOCK: u64 = 2 * 1024 * 1024;
/// A read starting this close past the ingest buffer, or past the furthest
/// read so far, continues the stream; otherwise it is a seek.
const WAIT_WINDOW: u64 = 4 * 1024 * 1024;
/// A read that continues the stream waits for the ingest when it starts at
/// most this far past the ingest buffer (the kernel's read-ahead runs a few
/// MiB ahead of the reader), instead of reading the same bytes from the
/// origin a second time; further ahead (the ingest restarting far behind
/// after a failure) it reads from the origin, so it never stalls on a
/// catch-up.
const STREAM_WINDOW: u64 = 16 * 1024 * 1024;
/// After a failed ingest, reads go to the origin directly for this long
/// before the ingest is tried again.
const INGEST_RETRY_AFTER: Duration = Duration::from_secs(2);
/// Whole verified chunks an open file keeps after reading them: a kernel
/// request (128 KiB to 1 MiB) is smaller than a chunk (1 MiB on average),
/// and read-ahead has a few requests in flight at once.
const RECENT_CHUNKS: usize = 4;
/// Chunk hash trees kept in memory (2 KiB per MiB of chunk): 4096 cover
/// about 4 GiB of recently read music.
const TREES: usize = 4096;
/// A piece of a chunk at most this fraction of it is read through the
/// chunk's hash tree when that is known, instead of whole.
const SMALL_PIECE_DIVISOR: usize = 4;
/// Chunks one ingest stores at once while it reads on (see `run_ingest`).
const STORES_IN_FLIGHT: usize = 2;
/// How long a blocking reader waits for another one reading the same chunk
/// (a few ms on a working disk) before it declines.
const SLOT_WAIT: Duration = Duration::from_millis(500);

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
    trees: Mutex<TreeMemo>,
    /// Ingest tasks running (see [`Cache::wait_for_ingests`]).
    ingests: AtomicU64,
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
    /// The last chunks read whole, newest last. A reader on a FUSE thread
    /// fills a slot holding its lock, so concurrent requests that fall in
    /// one chunk read and hash it once (async readers do not hold it across
    /// their reads; they are the rare path for cached chunks).
    recent: Mutex<VecDeque<(ChunkId, Slot)>>,
}

#[derive(Debug)]
struct FileState {
    manifest: Manifest,
    /// Chunks cut and being stored, in file order, right after
    /// `manifest.covered()`; each joins the manifest once stored. Readers
    /// are served from them meanwhile.
    cut: VecDeque<Bytes>,
    /// Sum of the lengths in `cut`.
    cut_len: u64,
    /// Bytes read from the origin and not cut yet, right after `cut`.
    tail: BytesMut,
    want_until: u64,
    /// End of the furthest read that continued the stream.
    read_end: u64,
    /// End of the reads waiting for the very next bytes of the ingest: its
    /// next origin read covers them, so they cost one round trip.
    need_end: u64,
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
        self.manifest.covered() + self.cut_len + self.tail.len() as u64
    }

    /// The buffered bytes from `pos` (which must lie in
    /// `[manifest.covered(), buffered_end())`) up to `end` at most: a slice
    /// of a cut chunk (no copy) or a copy out of the uncut tail.
    fn buffered(&self, pos: u64, end: u64) -> Bytes {
        let mut start = self.manifest.covered();
        for chunk in &self.cut {
            let chunk_end = start + chunk.len() as u64;
            if pos < chunk_end {
                let from = (pos - start) as usize;
                let to = (end.min(chunk_end) - start) as usize;
                return chunk.slice(from..to);
            }
            start = chunk_end;
        }
        let from = (pos - start) as usize;
        let to = ((end - start) as usize).min(self.tail.len());
        Bytes::copy_from_slice(&self.tail[from..to])
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
            // Well inside the read timeout, so a read that meets a hung
            // cache disk still has time to go to the origin.
            disk_timeout: (config.origin_timeout / 4)
                .clamp(Duration::from_secs(1), Duration::from_secs(5)),
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
                trees: Mutex::new(TreeMemo::new(TREES)),
                ingests: AtomicU64::new(0),
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
                cut: VecDeque::new(),
                cut_len: 0,
                tail: BytesMut::new(),
                want_until: 0,
                read_end: 0,
                need_end: 0,
                ingest,
                stale: false,
            }),
            progress: watch::channel(0).0,
            recent: Mutex::new(VecDeque::new()),
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
            index_bytes: s.index_size(),
            max_size: s.max_size(),
            chunks: s.chunk_count(),
            manifests: self.index().manifest_count() as u64,
            hit_bytes: c.hit_bytes.load(Ordering::Relaxed),
            origin_bytes: c.origin_bytes.load(Ordering::Relaxed),
            ingested_bytes: c.ingested_bytes.load(Ordering::Relaxed),
            refetched_chunks: c.refetched.load(Ordering::Relaxed),
            // Split by cause in the read path (the lead's part of issue 9).
            refetched_corrupt: 0,
            refetched_evicted: 0,
            corrupt_chunks: sc.corrupt.load(Ordering::Relaxed),
            missing_chunks: sc.missing.load(Ordering::Relaxed),
            evicted_chunks: sc.evicted_chunks.load(Ordering::Relaxed),
            evicted_bytes: sc.evicted_bytes.load(Ordering::Relaxed),
            open_files: self
                .inner
                .open
                .lock()
                .values()
                .filter(|w| w.strong_count() > 0)
                .count() as u64,
            degraded: s.degraded(),
            reconciling: s.reconciling(),
        }
    }

    /// Waits, at most `limit`, until no ingest runs; true if none does.
    /// After the last file closes, an ingest still stores the bytes it has
    /// already read (the end of a track read to its end); waiting for that
    /// before shutting down keeps them cached. An ingest still waiting on
    /// its origin ends by itself as its file is closed.
    pub async fn wait_for_ingests(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while self.inner.ingests.load(Ordering::Acquire) > 0 {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
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
                        let from = (pos - start) as usize;
                        let to = (end.min(start + u64::from(chunk.len)) - start) as usize;
                        let piece = self.chunk_piece(start, chunk, from, to).await?;
                        out.extend_from_slice(&piece);
                        pos = start + to as u64;
                        self.cache
                            .counters
                            .hit_bytes
                            .fetch_add((to - from) as u64, Ordering::Relaxed);
                    }
                }
                Step::Buffered(bytes) if out.is_empty() && pos + bytes.len() as u64 == end => {
                    // The whole read came from the ingest buffer (a cold
                    // read keeping up with the ingest): no second copy.
                    self.cache
                        .counters
                        .hit_bytes
                        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    return Ok(bytes);
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
        // Continuing the furthest read (or the ingest): the stream. It
        // extends the ingest even when the kernel's read-ahead is further
        // ahead of the ingest than the wait window, so a fast reader keeps
        // the ingest going instead of leaving it behind.
        let streaming = pos <= buffered_end.max(st.read_end).saturating_add(WAIT_WINDOW);
        if streaming {
            st.read_end = st.read_end.max(end);
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
            return Step::Buffered(st.buffered(pos, end));
        }
        if streaming
            && pos <= buffered_end.saturating_add(STREAM_WINDOW)
            && matches!(st.ingest, Ingest::Running)
        {
            if pos <= buffered_end {
                st.need_end = st.need_end.max(end);
            }
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
        let running = IngestRunning::new(&cache);
        tokio::spawn(async move {
            let _running = running;
            run_ingest(weak, cache).await;
        });
    }

    /// Bytes `[from, to)` of a cached chunk that starts at `start` in the
    /// file, verified: from the file's recent chunks, else (a small piece of
    /// a chunk whose tree is known) a range read checked against the tree,
    /// else a whole-chunk read, which is kept in the recent chunks.
    async fn chunk_piece(
        &self,
        start: u64,
        chunk: ChunkRef,
        from: usize,
        to: usize,
    ) -> Result<Bytes> {
        let slot = match self.recent_or_tree(chunk, from, to) {
            Source::Recent(slot) => Some(slot),
            Source::Tree(tree) => {
                let (a, b) = tree.aligned(from, to);
                let read = self.cache.store.read_unverified(chunk.id, a as u64, b - a);
                if let Some(piece) = self.checked_piece(&tree, from, to, read.await) {
                    return Ok(piece);
                }
                // The range did not check: the whole-chunk path finds out
                // what is wrong with the chunk and repairs it.
                None
            }
        };
        let held = slot.as_ref().and_then(|s| s.lock().clone());
        let whole = match held {
            Some(whole) => whole,
            None => {
                let whole = self.whole_chunk(start, chunk).await?;
                if let Some(slot) = slot {
                    *slot.lock() = Some(whole.clone());
                }
                whole
            }
        };
        if whole.len() < to {
            // A re-fetch serves the manifest's bytes or fails, so this
            // cannot happen; an error is still better than a panic.
            return Err(CasError::ChunkCorrupt {
                id: chunk.id,
                actual: ChunkId::of(&whole),
            });
        }
        Ok(whole.slice(from..to))
    }

    /// Where a piece of a chunk comes from: the file's recent chunks (a
    /// slot that is filled, or that the caller fills), or a range read
    /// checked against the chunk's tree (a small piece of a chunk whose
    /// tree is known).
    fn recent_or_tree(&self, chunk: ChunkRef, from: usize, to: usize) -> Source {
        let mut recent = self.file.recent.lock();
        if let Some((_, slot)) = recent.iter().find(|(id, _)| *id == chunk.id) {
            return Source::Recent(Arc::clone(slot));
        }
        let tree = self.cache.trees.lock().get(&chunk.id);
        if let Some(tree) = tree {
            if tree.len() == chunk.len as usize && to - from <= tree.len() / SMALL_PIECE_DIVISOR {
                return Source::Tree(tree);
            }
        }
        let slot = Slot::default();
        recent.push_back((chunk.id, Arc::clone(&slot)));
        if recent.len() > RECENT_CHUNKS {
            recent.pop_front();
        }
        Source::Recent(slot)
    }

    /// `[from, to)` out of the tree-aligned range `read` of a chunk, when
    /// the range read worked and checks; a range that does not check drops
    /// the tree (the whole-chunk path then finds and repairs the damage).
    fn checked_piece(
        &self,
        tree: &ChunkTree,
        from: usize,
        to: usize,
        read: Result<Vec<u8>>,
    ) -> Option<Bytes> {
        let (a, b) = tree.aligned(from, to);
        let bytes = read.ok()?;
        if bytes.len() == b - a && tree.check(a, &bytes) {
            return Some(Bytes::from(bytes).slice(from - a..to - a));
        }
        self.cache.trees.lock().remove(tree.id());
        None
    }

    /// The bytes `[offset, offset + len)` (fewer at the end of the file)
    /// when they can be served right here, without the origin or the async
    /// runtime: the file is fully cached and each piece comes from the
    /// file's recent chunks or from the cache disk (read on this thread,
    /// blocking) checked against its chunk's tree or name. `None` when
    /// anything else is needed (part of the file not cached, a chunk
    /// missing or damaged, no fd to spare, a failing disk): the caller then
    /// uses [`FileHandle::read`], which handles all of it. Lets the
    /// filesystem answer reads of cached tracks on its own threads, without
    /// handing each one to the runtime and back.
    pub fn read_cached_blocking(&self, offset: u64, len: u64) -> Option<Bytes> {
        let size = self.file.version.size;
        if offset >= size || len == 0 {
            return Some(Bytes::new());
        }
        let end = offset.saturating_add(len).min(size);
        let (chunks, _pin) = {
            let st = self.file.state.lock();
            if st.stale || !st.manifest.is_complete() {
                return None;
            }
            let chunks = st.manifest.chunks_in(offset, end - offset);
            let ids: Vec<ChunkId> = chunks.iter().map(|(_, c)| c.id).collect();
            let pin = self.cache.store.pin(&ids);
            (chunks, pin)
        };
        // Last chunk first: with several kernel requests in flight, each
        // one then reads the chunk its end falls in (which the next request
        // also needs) while the others do the same with theirs, instead of
        // all queueing on the slot of the chunk they share.
        let mut pieces = Vec::with_capacity(chunks.len());
        for &(start, chunk) in chunks.iter().rev() {
            let from = offset.saturating_sub(start) as usize;
            let to = (end.min(start + u64::from(chunk.len)) - start) as usize;
            pieces.push(self.chunk_piece_blocking(chunk, from, to)?);
        }
        pieces.reverse();
        self.cache
            .counters
            .hit_bytes
            .fetch_add(end - offset, Ordering::Relaxed);
        // One piece (most reads) is served as is, without a copy.
        if pieces.len() == 1 {
            return pieces.pop();
        }
        let mut out = BytesMut::with_capacity((end - offset) as usize);
        for piece in pieces {
            out.extend_from_slice(&piece);
        }
        Some(out.freeze())
    }

    /// [`Self::chunk_piece`] without the runtime; `None` for anything but
    /// the happy path.
    fn chunk_piece_blocking(&self, chunk: ChunkRef, from: usize, to: usize) -> Option<Bytes> {
        let slot = match self.recent_or_tree(chunk, from, to) {
            Source::Recent(slot) => slot,
            Source::Tree(tree) => {
                let (a, b) = tree.aligned(from, to);
                let read = self
                    .cache
                    .store
                    .read_unverified_now(chunk.id, a as u64, b - a);
                return self.checked_piece(&tree, from, to, read);
            }
        };
        // Held while reading: another request for this chunk waits here for
        // the bytes instead of reading and hashing them too; but not for
        // long, so a reader stuck on a cache disk that stopped answering
        // cannot pin the other FUSE threads behind it (they take the async
        // path, which is bounded).
        let mut held = slot.try_lock_for(SLOT_WAIT)?;
        if let Some(whole) = held.as_ref() {
            return (whole.len() >= to).then(|| whole.slice(from..to));
        }
        let len = chunk.len as usize;
        // One byte more than the chunk: a longer file is damaged too.
        let data = self
            .cache
            .store
            .read_unverified_now(chunk.id, 0, len + 1)
            .ok()?;
        if data.len() != len {
            return None;
        }
        let tree = ChunkTree::build(chunk.id, &data)?;
        self.cache.trees.lock().put(Arc::new(tree));
        let whole = Bytes::from(data);
        *held = Some(whole.clone());
        Some(whole.slice(from..to))
    }

    /// A whole verified chunk, hashed once: read, checked through its tree
    /// (which is kept for later range reads). Anything amiss (missing,
    /// damaged, unreadable, a failing disk) goes to [`Self::chunk_bytes`],
    /// which removes and re-fetches or reads through.
    async fn whole_chunk(&self, start: u64, chunk: ChunkRef) -> Result<Bytes> {
        let len = chunk.len as usize;
        // One byte more than the chunk: a longer file is damaged too.
        if let Ok(data) = self.cache.store.read_unverified(chunk.id, 0, len + 1).await {
            if data.len() == len {
                if let Some(tree) = ChunkTree::build(chunk.id, &data) {
                    self.cache.trees.lock().put(Arc::new(tree));
                    return Ok(Bytes::from(data));
                }
            }
        }
        self.cache.trees.lock().remove(&chunk.id);
        self.chunk_bytes(start, chunk).await
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
            st.cut.clear();
            st.cut_len = 0;
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

/// A whole verified chunk in an open file's recent chunks, once read.
type Slot = Arc<Mutex<Option<Bytes>>>;

/// Where a piece of a cached chunk is read from.
enum Source {
    /// A whole chunk in the file's recent chunks (filled, or to fill).
    Recent(Slot),
    /// A range of the chunk file, checked against this tree.
    Tree(Arc<ChunkTree>),
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

/// Counts one running ingest in [`CacheInner::ingests`] while it lives, so
/// the count drops however the task ends (done, failed, cancelled).
struct IngestRunning(Arc<CacheInner>);

impl IngestRunning {
    fn new(cache: &Arc<CacheInner>) -> Self {
        cache.ingests.fetch_add(1, Ordering::AcqRel);
        Self(Arc::clone(cache))
    }
}

impl Drop for IngestRunning {
    fn drop(&mut self) {
        self.0.ingests.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A chunk cut from the front of the ingest buffer and being stored.
type Storing = (tokio::task::JoinHandle<Result<ChunkId>>, usize);

/// What the ingest does next.
enum IngestStep {
    /// Store this chunk, cut from the buffer.
    Store(Bytes),
    /// Wait for the oldest store and add it to the manifest.
    Land,
    /// Read `(from, len)` from the origin.
    Read(u64, u64),
}

/// The ingest loop of one open file; see the module docs.
///
/// Three stages overlap: reading the origin, cutting chunks, and storing
/// them (writing a chunk file is the slowest step). Up to
/// [`STORES_IN_FLIGHT`] chunks are stored at once while the loop reads on;
/// they join the manifest strictly in file order, and their bytes stay in
/// the buffer (serving readers) until they have.
async fn run_ingest(weak: Weak<OpenFile>, cache: Arc<CacheInner>) {
    let params = cache.config.chunk_params;
    let mut block = FIRST_BLOCK;
    let mut storing: VecDeque<Storing> = VecDeque::new();
    // The file is kept alive between steps that only store what is already
    // buffered, so bytes read from the origin get cached even when the
    // reader closes the file right after reading them (the end of a track);
    // it is let go only across origin reads.
    let mut held: Option<Arc<OpenFile>> = None;
    if let Some(file) = weak.upgrade() {
        // Chunks cut by an earlier run that stopped before they were
        // stored: store them first (again; one already stored dedups).
        let cut: Vec<Bytes> = file.state.lock().cut.iter().cloned().collect();
        for chunk in cut {
            storing.push_back(spawn_store(&cache, chunk));
        }
        held = Some(file);
    }
    loop {
        let Some(file) = held.take().or_else(|| weak.upgrade()) else {
            return;
        };
        let size = file.version.size;
        while storing.front().is_some_and(|(h, _)| h.is_finished()) {
            if let Some(done) = storing.pop_front() {
                if !land(&file, &cache, done).await {
                    return;
                }
            }
        }
        // Decided under the lock readers extend `want_until` under, so no
        // read is left waiting for an ingest that went idle.
        let next = {
            let mut st = file.state.lock();
            let buffered_end = st.buffered_end();
            let eof = buffered_end == size;
            let uncut = st.tail.len();
            // Exactly when `next_cut` has an answer.
            let cuttable = !st.stale && (uncut >= params.max as usize || (eof && uncut > 0));
            if cuttable && storing.len() < STORES_IN_FLIGHT {
                let n = params.next_cut(&st.tail, eof).unwrap_or(uncut);
                // Copied out so the tail's buffer is reused for the next
                // origin reads instead of growing.
                let chunk = Bytes::copy_from_slice(&st.tail[..n]);
                st.tail.advance(n);
                st.cut_len += n as u64;
                st.cut.push_back(chunk.clone());
                IngestStep::Store(chunk)
            } else if cuttable
                || (!storing.is_empty() && (st.stale || buffered_end >= st.want_until || eof))
            {
                // Storing is the bottleneck (reading on would only grow the
                // buffer), or there is nothing else to do.
                IngestStep::Land
            } else if !st.stale && !eof && buffered_end < st.want_until {
                // At least what the reads waiting for the next bytes asked
                // for (up to the largest block), so a first read costs one
                // origin round trip; not what read-ahead further out asked
                // for, which would only delay the first bytes.
                let asked = st.need_end.saturating_sub(buffered_end).min(MAX_BLOCK);
                IngestStep::Read(buffered_end, block.max(asked).min(size - buffered_end))
            } else if eof && st.tail.is_empty() && st.cut.is_empty() {
                st.ingest = Ingest::Done;
                drop(st);
                debug!(path = %file.path, "file fully cached");
                file.progress.send_modify(|v| *v += 1);
                return;
            } else {
                st.ingest = if st.stale {
                    Ingest::Failed { at: Instant::now() }
                } else {
                    Ingest::Idle
                };
                return;
            }
        };
        let (from, len) = match next {
            IngestStep::Store(chunk) => {
                storing.push_back(spawn_store(&cache, chunk));
                held = Some(file);
                continue;
            }
            IngestStep::Land => {
                if let Some(oldest) = storing.pop_front() {
                    if !land(&file, &cache, oldest).await {
                        return;
                    }
                }
                held = Some(file);
                continue;
            }
            IngestStep::Read(from, len) => (from, len),
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
                {
                    let mut st = file.state.lock();
                    // A change found meanwhile emptied the buffer: these
                    // bytes belong to the old version and nowhere in it.
                    if st.stale || st.buffered_end() != from {
                        st.ingest = Ingest::Failed { at: Instant::now() };
                        drop(st);
                        file.progress.send_modify(|v| *v += 1);
                        return;
                    }
                    append(&mut st.tail, &data, params.max as usize);
                }
                file.progress.send_modify(|v| *v += 1);
                block = (block * 2).min(MAX_BLOCK);
                // The reader may close as soon as it has these bytes; they
                // are stored all the same.
                held = Some(file);
                // Let the reader just woken run before cutting and reading
                // on: an origin that answers at once (memory, page cache)
                // would otherwise keep this worker busy for the whole
                // read-ahead while the first bytes wait in the queue.
                tokio::task::yield_now().await;
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

/// Appends an origin block to the uncut tail within a fixed-size buffer.
/// `BytesMut` would rather double its buffer than move live bytes that
/// outnumber the consumed ones in front of them, and then each open file
/// being ingested would hold tens of MiB. The ingest reads only while less
/// than `max_chunk` is uncut, so the tail never needs more than
/// `max_chunk + 2 * MAX_BLOCK`; when that is full, the live bytes move to a
/// fresh buffer of that size (at most `max_chunk` bytes copied, about once
/// per two blocks).
fn append(tail: &mut BytesMut, data: &[u8], max_chunk: usize) {
    if tail.capacity() - tail.len() < data.len() {
        let want = max_chunk + 2 * MAX_BLOCK as usize;
        let mut fresh = BytesMut::with_capacity(want.max(tail.len() + data.len()));
        fresh.extend_from_slice(tail);
        *tail = fresh;
    }
    tail.extend_from_slice(data);
}

fn spawn_store(cache: &CacheInner, chunk: Bytes) -> Storing {
    let len = chunk.len();
    let store = cache.store.clone();
    (tokio::spawn(async move { store.put(chunk).await }), len)
}

/// Waits for the oldest chunk store and appends the chunk to the manifest
/// (persisting it), dropping it from the cut chunks. False when the ingest
/// must stop: the store failed (the state says how), or the file went
/// stale.
async fn land(file: &OpenFile, cache: &CacheInner, (store, len): Storing) -> bool {
    let stored = match store.await {
        Ok(r) => r,
        Err(e) => Err(CasError::CacheUnavailable {
            reason: format!("a chunk store task failed: {e}"),
        }),
    };
    let id = match stored {
        Ok(id) => id,
        Err(e) => {
            // Passthrough from here: the buffered bytes keep serving
            // readers, everything past them comes from the origin.
            debug!(path = %file.path, error = %e, "cannot store chunks; ingest stops");
            file.state.lock().ingest = match e {
                CasError::CacheUnavailable { .. } => Ingest::Stopped,
                _ => Ingest::Failed { at: Instant::now() },
            };
            file.progress.send_modify(|v| *v += 1);
            return false;
        }
    };
    let snapshot = {
        let mut st = file.state.lock();
        if st.stale || st.cut.front().map(Bytes::len) != Some(len) {
            st.ingest = Ingest::Failed { at: Instant::now() };
            drop(st);
            file.progress.send_modify(|v| *v += 1);
            return false;
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
            return false;
        }
        st.cut.pop_front();
        st.cut_len -= len as u64;
        st.manifest.clone()
    };
    if let Err(e) = cache
        .store
        .index()
        .put_manifest(file.origin.id(), &file.path, &snapshot)
    {
        debug!(error = %e, "could not persist the manifest");
    }
    file.progress.send_modify(|v| *v += 1);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use musicfs_origins::Origin;
    use musicfs_test_utils::{pseudo_random_bytes, Fault, FaultyOrigin, MemOrigin, Ops};

    const MIB: u64 = 1 << 20;
    const TRACK: &str = "Album/01 - Track.flac";

    fn path() -> OriginPath {
        OriginPath::new(TRACK).unwrap()
    }

    /// A cache over one in-memory track of `len` pseudo-random bytes,
    /// behind a FaultyOrigin (no fault yet).
    async fn setup(dir: &std::path::Path, len: usize) -> (Cache, Arc<FaultyOrigin>, Bytes) {
        let data = Bytes::from(pseudo_random_bytes(len, 7));
        let mem = MemOrigin::new(OriginId::new("lib").unwrap());
        mem.put(TRACK, data.clone());
        let faulty = FaultyOrigin::new(mem);
        let (cache, _) = Cache::open(CacheConfig::new(dir, 1 << 30)).await.unwrap();
        cache.add_origin(faulty.clone());
        (cache, faulty, data)
    }

    async fn open(cache: &Cache, origin: &Arc<FaultyOrigin>) -> FileHandle {
        let meta = origin.stat(&path()).await.unwrap();
        cache.open_file(origin.id(), &path(), &meta).await.unwrap()
    }

    /// Waits (bounded) until the track's manifest covers the whole file.
    async fn wait_complete(cache: &Cache, origin: &Arc<FaultyOrigin>) -> Manifest {
        for _ in 0..500 {
            if let Some(m) = cache.index().manifest(origin.id(), &path()).unwrap() {
                if m.is_complete() {
                    return m;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the track never became fully cached");
    }

    /// Reads the whole track sequentially in 1 MiB reads.
    async fn read_through(h: &FileHandle, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        while (out.len() as u64) < h.size() {
            out.extend_from_slice(&h.read(out.len() as u64, MIB).await.unwrap());
        }
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_track_read_to_the_end_and_closed_at_once_is_fully_cached() {
        let dir = tempfile::tempdir().unwrap();
        let len = 13 * MIB as usize + 12_345;
        let (cache, origin, data) = setup(dir.path(), len).await;
        let h = open(&cache, &origin).await;
        assert_eq!(read_through(&h, len).await, data);
        // The last bytes were served from the ingest buffer; closing must
        // not lose them.
        drop(h);
        let m = wait_complete(&cache, &origin).await;
        assert_eq!(m.covered(), len as u64);
        assert_eq!(origin.stats().bytes_served, len as u64, "read twice");
    }

    /// The kernel's read-ahead sends requests several MiB past what a
    /// reader consumed; when the ingest lags, those land past the wait
    /// window. They must not leave the ingest behind: the file still ends
    /// up fully cached.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_that_run_ahead_of_the_ingest_keep_it_going() {
        let dir = tempfile::tempdir().unwrap();
        let len = 40 * MIB as usize;
        let (cache, origin, data) = setup(dir.path(), len).await;
        origin.set_fault_on(Ops::READ, Fault::TimeoutMs(5));
        let h = open(&cache, &origin).await;
        // Windows of 8 concurrent 1 MiB requests, each window starting
        // where the previous one ended.
        let mut off = 0u64;
        while off < len as u64 {
            let reads: Vec<_> = (0..8)
                .map(|i| {
                    let h = h.clone();
                    tokio::spawn(async move { (off + i * MIB, h.read(off + i * MIB, MIB).await) })
                })
                .collect();
            for r in reads {
                let (at, got) = r.await.unwrap();
                let got = got.unwrap();
                let at = at as usize;
                assert_eq!(&got[..], &data[at.min(len)..(at + MIB as usize).min(len)]);
            }
            off += 8 * MIB;
        }
        wait_complete(&cache, &origin).await;
        drop(h);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cached_reads_without_the_runtime_serve_exact_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let len = 9 * MIB as usize + 777;
        let (cache, origin, data) = setup(dir.path(), len).await;
        let h = open(&cache, &origin).await;
        // Partly cached: the blocking path declines, the async one serves.
        h.read(0, 64 * 1024).await.unwrap();
        assert!(h.read_cached_blocking(0, 4096).is_none());
        read_through(&h, len).await;
        drop(h);
        wait_complete(&cache, &origin).await;

        let h = open(&cache, &origin).await;
        origin.reset_stats();
        let (a, b) = (h.clone(), data.clone());
        tokio::task::spawn_blocking(move || {
            // Whole 1 MiB requests (building trees), then small reads at
            // odd places (served through the trees), and the end of file.
            for off in (0..len as u64).step_by(MIB as usize) {
                let got = a.read_cached_blocking(off, MIB).unwrap();
                let off = off as usize;
                assert_eq!(&got[..], &b[off..(off + MIB as usize).min(len)]);
            }
            for off in [0u64, 4095, 1_000_001, 5 * MIB - 3, len as u64 - 10] {
                let got = a.read_cached_blocking(off, 4096).unwrap();
                let off = off as usize;
                assert_eq!(&got[..], &b[off..(off + 4096).min(len)]);
            }
            assert!(a.read_cached_blocking(len as u64, 10).unwrap().is_empty());
        })
        .await
        .unwrap();
        assert_eq!(
            origin.stats().read_calls,
            0,
            "a cached read asked the origin"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_damaged_chunk_is_never_served_from_its_tree_and_gets_repaired() {
        let dir = tempfile::tempdir().unwrap();
        let len = 9 * MIB as usize;
        let (cache, origin, data) = setup(dir.path(), len).await;
        let h = open(&cache, &origin).await;
        read_through(&h, len).await;
        drop(h);
        let m = wait_complete(&cache, &origin).await;
        let (start, victim) = (m.chunks()[0].len as usize, m.chunks()[1]);
        // Trees of every chunk are built by reading them whole once.
        let h = open(&cache, &origin).await;
        read_through(&h, len).await;
        drop(h);

        let file = cache.store().chunk_path(&victim.id);
        let mut bytes = std::fs::read(&file).unwrap();
        bytes[100_000] ^= 0x40;
        std::fs::write(&file, &bytes).unwrap();

        let h = open(&cache, &origin).await;
        let hit = (start + 100_000) as u64;
        let b = h.clone();
        // Groups of the chunk away from the damage still check; the one
        // with the damage does not, and then the chunk is distrusted whole.
        let (intact, damaged, after) = tokio::task::spawn_blocking(move || {
            (
                b.read_cached_blocking(hit + 200_000, 4096),
                b.read_cached_blocking(hit - 10, 20),
                b.read_cached_blocking(hit + 200_000, 4096),
            )
        })
        .await
        .unwrap();
        let at = (hit + 200_000) as usize;
        assert_eq!(intact.as_deref(), Some(&data[at..at + 4096]));
        assert!(damaged.is_none(), "bytes of a damaged chunk were served");
        assert!(after.is_none(), "a chunk known damaged was served");
        // The async path re-fetches the chunk and serves the right bytes.
        let got = h.read(hit - 10, 20).await.unwrap();
        assert_eq!(&got[..], &data[hit as usize - 10..hit as usize + 10]);
        assert_eq!(cache.stats().refetched_chunks, 1);
        assert_eq!(
            ChunkId::of(&std::fs::read(&file).unwrap()),
            victim.id,
            "chunk healed on disk"
        );
    }
}
