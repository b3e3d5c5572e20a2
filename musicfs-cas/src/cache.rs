//! The cache the filesystem reads through.
//!
//! [`Cache::open_file`] binds a handle to one version of an origin file
//! (size, mtime, etag); every origin byte the handle serves or caches is of
//! that version, and a change found while it reads ends its reads with
//! [`CasError::OriginChanged`] (never bytes of two versions). Cached data
//! of any other version is not used.
//!
//! The cache's jobs, one file each, in the order a read passes them:
//! 1. `cache/read.rs`: where each piece of a read comes from (chunks, the
//!    ingest buffer, waiting for the ingest, the origin directly).
//! 2. `cache/chunks.rs`: verified chunk reads, re-fetch of damaged or
//!    evicted chunks, read-through when the cache disk fails.
//! 3. `cache/ingest.rs`: the background stream that caches a file as it is
//!    played (with the state diagram of an ingest).
//! 4. `cache/digest.rs`: the whole-file check of a first download against
//!    the digest the origin states.
//! 5. `cache/fetch.rs`: every origin read, bound to the handle's version.
//! 6. `cache/link.rs`: per origin, the order reads go out in (a user's
//!    read before read-ahead, read-ahead before verify) and the measured
//!    round trip and bandwidth that size the ingest's window.
//! 7. `cache/state.rs`: the state an open file shares between its handles.
//!
//! When the cache disk is unusable the ingest stops and reads are served by
//! the origin (passthrough); the store recovers by itself later.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use musicfs_origins::{DynOrigin, EntryMeta, OriginId, OriginPath};
use parking_lot::{Mutex, RwLock};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::index::{log_rebuild, Index, IndexOpenReport};
use crate::manifest::{ChunkRef, FileVersion, Manifest};
use crate::stats::CacheStats;
use crate::store::{ChunkStore, OpenReport, StoreConfig};
use crate::tree::TreeMemo;
use crate::{CasError, ChunkParams, Result};

mod chunks;
mod digest;
mod fetch;
mod ingest;
mod link;
mod read;
mod state;
#[cfg(test)]
mod tests;

use digest::WholeCheck;
use ingest::{run_ingest, IngestRunning};
pub use link::LinkEstimate;
use link::{Class, Link};
use state::{FileState, Ingest, IngestEvent, OpenFile, Slot};

/// Chunk hash trees kept in memory (2 KiB per MiB of chunk): 4096 cover
/// about 4 GiB of recently read music.
const TREES: usize = 4096;

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
    refetched_evicted: AtomicU64,
    refetched_corrupt: AtomicU64,
}

#[derive(Debug)]
struct CacheInner {
    config: CacheConfig,
    store: ChunkStore,
    origins: RwLock<HashMap<OriginId, DynOrigin>>,
    /// Per origin: the order of its reads and what was measured of it.
    links: Mutex<HashMap<OriginId, Arc<Link>>>,
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

/// A place at an origin's link for background work; see
/// [`Cache::background_turn`]. Frees it on drop.
#[derive(Debug)]
pub struct BackgroundTurn {
    _slot: link::Slot,
}

/// An open file; reads go through it. Dropping the last handle of a file
/// stops its ingest (the manifest so far stays in the index).
#[derive(Debug, Clone)]
pub struct FileHandle {
    file: Arc<OpenFile>,
    cache: Arc<CacheInner>,
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
                links: Mutex::new(HashMap::new()),
                open: Mutex::new(HashMap::new()),
                counters: Counters::default(),
                trees: Mutex::new(TreeMemo::new(TREES)),
                ingests: AtomicU64::new(0),
            }),
        };
        Ok((cache, report))
    }

    pub fn add_origin(&self, origin: DynOrigin) {
        let link = Link::new(origin.call_limit());
        self.inner.links.lock().insert(origin.id().clone(), link);
        self.inner
            .origins
            .write()
            .insert(origin.id().clone(), origin);
    }

    /// A turn for background work at `origin` (a listing refresh nobody
    /// waits for): it comes after every queued read-ahead, so a refresh
    /// never delays a stream, let alone a player's read. Hold it while the
    /// work's origin calls run.
    pub async fn background_turn(&self, origin: &OriginId) -> BackgroundTurn {
        BackgroundTurn {
            _slot: self.inner.link(origin).acquire(Class::Background).await,
        }
    }

    /// What the cache has measured of the link to `origin` so far.
    pub fn link_estimate(&self, origin: &OriginId) -> Option<LinkEstimate> {
        let link = self.inner.links.lock().get(origin).cloned();
        link.map(|l| l.estimate())
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
            // One whose download failed its check is done: a new open
            // downloads the file again.
            if file.version == version && file.state.lock().corrupt.is_none() {
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
        let whole = if manifest.is_complete() {
            None
        } else {
            o.whole_digest(path, &version)
                .map(|d| WholeCheck::new(d, manifest.covered() == 0))
        };
        let file = Arc::new(OpenFile {
            link: self.inner.link(origin),
            waiting: watch::channel(0).0,
            whole,
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
                corrupt: None,
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
            refetched_corrupt: c.refetched_corrupt.load(Ordering::Relaxed),
            refetched_evicted: c.refetched_evicted.load(Ordering::Relaxed),
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
    /// it against `id` and stores it: verify's repair, background work that
    /// yields to reads at the origin's link.
    pub(crate) async fn refetch_chunk(
        &self,
        origin: &DynOrigin,
        path: &OriginPath,
        version: &FileVersion,
        start: u64,
        chunk: ChunkRef,
    ) -> Result<Bytes> {
        self.inner
            .refetch_chunk(origin, path, version, start, chunk, Class::Background)
            .await
    }
}
