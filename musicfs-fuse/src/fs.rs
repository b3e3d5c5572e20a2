//! The request handlers: what each kernel request does.
//!
//! Layer: the filesystem proper, between fuser (below: kernel requests on a
//! few worker threads) and the cache and origins (above: async).
//!
//! Invariants:
//! - A FUSE worker thread never waits on an origin. A request that can be
//!   answered from memory, the index or the cache disk is answered on the
//!   worker thread (a read of a fully cached file whose verified chunks are
//!   at hand, see `FileHandle::read_cached_blocking`); one that needs the
//!   origin (a listing never fetched) or the rest of the cache's read path
//!   runs as a task on the tokio runtime and replies from there, bounded by
//!   `read_timeout`. fuser replies are `Send`, and a reply that
//!   is dropped unsent (a task cancelled at shutdown) answers `EIO`, so no
//!   request is left hanging in the kernel.
//! - Metadata comes from [`Listing`]s stored per directory in the index.
//!   An entry's attributes are the ones its parent's listing holds, so one
//!   origin `list` serves `readdir`, `lookup` and `getattr` of everything in
//!   a directory, and all of it works while the origin is down.
//! - A stale listing is served as is while one background refresh per
//!   directory runs; a failed refresh keeps the old listing (an unreachable
//!   origin must not empty the library) and is not retried for
//!   `listing_ttl` (at least a second), so a dead origin is not hammered.
//!   Only a request about a name the listing lacks may list again first,
//!   when the listing is older than the freshness bound (see `fresh`).
//! - Directory streams are snapshots taken at `opendir`, so a refresh in the
//!   middle of a long `readdir` cannot skip or repeat entries.
//! - Names are bytes: the kernel's `OsStr` is matched against the origin's
//!   names byte for byte, UTF-8 or not.
//! - A symlink is shown when its origin listed it (origins list only the
//!   ones whose target resolves inside their root) and `readlink` answers
//!   the target the listing holds, checked then by the origin, so it is as
//!   fresh as the listing; an origin that lists no targets is asked on each
//!   `readlink`. Whatever its source, a target that is absolute or climbs
//!   above the origin's directory as written is never handed to the kernel.
//! - `open` pins the version from the cached listing (the cache serves only
//!   that version's chunks), and keeps the kernel page cache
//!   (`FOPEN_KEEP_CACHE`) only when that version equals the one of the
//!   previous open of the inode in this mount.

use std::collections::{HashMap, VecDeque};
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, CopyFileRangeFlags, Errno, FileHandle as Fh, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use musicfs_cas::{Cache, CasError, FileHandle, Listing};
use musicfs_origins::{
    DirEntry, DynOrigin, EntryKind, EntryMeta, HealthMonitor, OriginError, OriginId, OriginPath,
};
use parking_lot::{Mutex, RwLock};
use tokio::runtime::Handle;
use tracing::{debug, info, warn};

use crate::attr::{self, Owner, BLOCK_SIZE};
use crate::errno;
use crate::inode::{InodeTable, Node, NodeKey};
use crate::versions::SeenFiles;
use crate::{FsConfig, FuseError, Ino, Result};

mod fresh;
mod quiet;

/// Decoded listings kept in memory, so the `lookup` of every entry of a big
/// directory does not decode its whole listing again. The index stays the
/// source of truth; this only bounds memory, so eviction is first in, first
/// out.
const MEMO_DIRS: usize = 4096;

/// A failed background refresh is not retried sooner than this, even with a
/// shorter `listing_ttl`.
const MIN_REFRESH_RETRY: Duration = Duration::from_secs(1);

/// A listing stamped further than this in the future means the wall clock
/// went back; it is treated as stale rather than fresh for a long time.
const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// The longest name `statfs` reports; names come from the origins, which
/// live on filesystems with this limit.
const NAME_MAX: u32 = 255;

/// How long after the last open file closes the memory freed by its reads
/// is handed back to the kernel (the ingest may still be storing its last
/// chunks for a moment).
const TRIM_AFTER: Duration = Duration::from_secs(2);

/// The MusicFS filesystem; hand it to [`crate::mount`].
pub struct MusicFs {
    inner: Arc<Inner>,
}

impl fmt::Debug for MusicFs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MusicFs")
            .field("origins", &self.inner.origins.len())
            .field("config", &self.inner.config)
            .field("inodes", &self.inner.inodes.len())
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct Inner {
    cache: Cache,
    /// Sorted by id: the order of the mount root's listing.
    origins: Vec<DynOrigin>,
    by_id: HashMap<OriginId, DynOrigin>,
    config: FsConfig,
    rt: Handle,
    owner: Owner,
    /// The mtime of the directories MusicFS makes up.
    started: SystemTime,
    inodes: InodeTable,
    memo: Mutex<Memo>,
    /// Directories with a background refresh started at the given time
    /// (running, or failed and waiting out its retry delay).
    refreshing: Mutex<HashMap<NodeKey, Instant>>,
    /// What each origin's root directory looked like at preflight.
    root_meta: RwLock<HashMap<OriginId, EntryMeta>>,
    files: Mutex<HashMap<u64, OpenFile>>,
    dirs: Mutex<HashMap<u64, Arc<[DirItem]>>>,
    /// What each file was last opened as and confirmed to be (freshness,
    /// `KEEP_CACHE`).
    seen: Mutex<SeenFiles>,
    /// Origins with a freshness check that has not answered in time, since
    /// when (see `fresh`).
    unanswered: Mutex<HashMap<OriginId, Instant>>,
    /// The origins' health, when the caller runs a monitor.
    health: RwLock<Option<Arc<HealthMonitor>>>,
    /// Tells the kernel to drop cached attributes; set once mounted.
    notifier: Arc<OnceLock<fuser::Notifier>>,
    next_fh: AtomicU64,
    /// A hand-back of freed memory is pending (see [`TRIM_AFTER`]).
    trim_pending: AtomicBool,
    /// Files whose last origin read timed out, and when (see
    /// [`RETRY_BUDGET`]).
    timed_out: Mutex<HashMap<Ino, Instant>>,
}

/// How long a read of a file whose previous read timed out less than
/// `read_timeout` ago may wait for the origin. After a failed readahead the
/// kernel retries the first page on its own; without this, a buffered read
/// from a hung origin would report EIO only after twice the read timeout.
const RETRY_BUDGET: Duration = Duration::from_millis(250);

#[derive(Debug)]
struct OpenFile {
    ino: Ino,
    handle: FileHandle,
    /// The version the handle is bound to.
    meta: EntryMeta,
}

/// One entry of a directory stream snapshot.
#[derive(Debug)]
struct DirItem {
    ino: Ino,
    kind: FileType,
    name: OsString,
}

/// One directory's entries (files, directories and the symlinks the origin
/// chose to show), sorted by name bytes.
#[derive(Debug)]
struct DirListing {
    fetched_at_ns: u64,
    entries: Vec<DirEntry>,
}

impl DirListing {
    fn new(listing: Listing) -> Self {
        let mut entries = listing.entries;
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        // An origin never lists a name twice; if one did, the first wins,
        // as for a lookup.
        entries.dedup_by(|b, a| a.name == b.name);
        Self {
            fetched_at_ns: listing.fetched_at_ns,
            entries,
        }
    }

    fn get(&self, name: &OsStr) -> Option<&EntryMeta> {
        self.entry(name).map(|e| &e.meta)
    }

    fn entry(&self, name: &OsStr) -> Option<&DirEntry> {
        self.entries
            .binary_search_by(|e| e.name.as_os_str().cmp(name))
            .ok()
            .map(|i| &self.entries[i])
    }

    fn is_stale(&self, ttl: Duration) -> bool {
        let now = now_ns();
        let skew = duration_ns(CLOCK_SKEW);
        self.fetched_at_ns > now.saturating_add(skew)
            || now.saturating_sub(self.fetched_at_ns) > duration_ns(ttl)
    }
}

#[derive(Debug, Default)]
struct Memo {
    map: HashMap<NodeKey, Arc<DirListing>>,
    /// Insertion order; holds each key of `map` exactly once.
    order: VecDeque<NodeKey>,
}

impl Memo {
    fn get(&self, key: &NodeKey) -> Option<Arc<DirListing>> {
        self.map.get(key).cloned()
    }

    fn put(&mut self, key: NodeKey, listing: Arc<DirListing>) {
        if self.map.insert(key.clone(), listing).is_none() {
            self.order.push_back(key);
            while self.map.len() > MEMO_DIRS {
                let Some(oldest) = self.order.pop_front() else {
                    break;
                };
                self.map.remove(&oldest);
            }
        }
    }
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

type Listed = std::result::Result<Arc<DirListing>, Errno>;
type Meta = std::result::Result<EntryMeta, Errno>;
/// An entry's metadata and when its origin gave it (ns since the epoch).
type Entry = std::result::Result<(EntryMeta, u64), Errno>;

impl Inner {
    /// The listing of `dir` from memory or the index, starting a background
    /// refresh when it is stale; `None` when it was never fetched.
    fn cached_listing(self: &Arc<Self>, dir: &NodeKey) -> Option<Arc<DirListing>> {
        let memo = self.memo.lock().get(dir);
        let listing = match memo {
            Some(l) => l,
            None => match self.cache.index().listing(&dir.origin, &dir.path) {
                Ok(Some(l)) => {
                    let l = Arc::new(DirListing::new(l));
                    self.memo.lock().put(dir.clone(), Arc::clone(&l));
                    l
                }
                Ok(None) => return None,
                Err(e) => {
                    warn!(origin = %dir.origin, dir = %dir.path, error = %e, "cannot read the cached listing; asking the origin");
                    return None;
                }
            },
        };
        if listing.is_stale(self.config.listing_ttl) {
            self.refresh_in_background(dir);
        }
        Some(listing)
    }

    /// Starts one refresh of `dir` unless one is running or failed recently.
    fn refresh_in_background(self: &Arc<Self>, dir: &NodeKey) {
        let retry_after = self.config.listing_ttl.max(MIN_REFRESH_RETRY);
        {
            let mut refreshing = self.refreshing.lock();
            let now = Instant::now();
            if let Some(started) = refreshing.get(dir) {
                if now.duration_since(*started) < retry_after {
                    return;
                }
            }
            refreshing.insert(dir.clone(), now);
        }
        let inner = Arc::clone(self);
        let dir = dir.clone();
        self.rt.spawn(async move {
            match inner.list_origin(&dir).await {
                Ok(l) => {
                    debug!(origin = %dir.origin, dir = %dir.path, entries = l.entries.len(), "listing refreshed")
                }
                Err(e) => {
                    info!(origin = %dir.origin, dir = %dir.path, error = %e, "cannot refresh a listing; serving the cached one")
                }
            }
        });
    }

    /// Lists `dir` on its origin (bounded by `read_timeout`) and stores the
    /// result in the index and memory.
    async fn list_origin(
        &self,
        dir: &NodeKey,
    ) -> std::result::Result<Arc<DirListing>, OriginError> {
        let Some(origin) = self.by_id.get(&dir.origin) else {
            // Keys are only ever made from configured origins.
            return Err(OriginError::NotFound {
                origin: dir.origin.clone(),
                path: dir.path.to_string(),
            });
        };
        let fetched_at_ns = now_ns();
        let timeout = self.config.read_timeout;
        let entries = match tokio::time::timeout(timeout, origin.list(&dir.path)).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(OriginError::Timeout {
                    origin: dir.origin.clone(),
                    timeout,
                })
            }
        };
        Ok(self.store_listing(
            dir,
            Listing {
                fetched_at_ns,
                entries,
            },
        ))
    }

    fn store_listing(&self, dir: &NodeKey, listing: Listing) -> Arc<DirListing> {
        // A cold fetch and a refresh of one directory may overlap; the
        // answer the origin gave last must win, whichever arrives last.
        if let Some(newer) = self.memo.lock().get(dir) {
            if newer.fetched_at_ns > listing.fetched_at_ns {
                return newer;
            }
        }
        if let Err(e) = self
            .cache
            .index()
            .put_listing(&dir.origin, &dir.path, &listing)
        {
            // Still served from memory; only offline use loses it.
            warn!(origin = %dir.origin, dir = %dir.path, error = %e, "cannot store a listing in the index");
        }
        let l = Arc::new(DirListing::new(listing));
        self.memo.lock().put(dir.clone(), Arc::clone(&l));
        self.refreshing.lock().remove(dir);
        l
    }

    /// The listing of `dir`, asking the origin when nothing is cached.
    async fn listing(self: &Arc<Self>, dir: &NodeKey) -> Listed {
        if let Some(l) = self.cached_listing(dir) {
            return Ok(l);
        }
        self.list_origin(dir).await.map_err(|e| {
            let errno = errno::of_origin(&e);
            if errno::is_fault(errno) {
                warn!(origin = %dir.origin, dir = %dir.path, error = %e, "cannot list a directory that is not cached");
            } else {
                debug!(origin = %dir.origin, dir = %dir.path, error = %e, "cannot list a directory");
            }
            errno
        })
    }

    /// What MusicFS shows for an origin's root directory.
    fn origin_root_meta(&self, origin: &OriginId) -> EntryMeta {
        if let Some(meta) = self.root_meta.read().get(origin) {
            return meta.clone();
        }
        let started_ns = self
            .started
            .duration_since(UNIX_EPOCH)
            .ok()
            .and_then(|d| i64::try_from(d.as_nanos()).ok());
        EntryMeta {
            kind: EntryKind::Dir,
            size: 0,
            mtime_ns: started_ns,
            etag: None,
        }
    }

    /// Stores a directory stream snapshot; returns its handle.
    fn open_dir_snapshot(&self, items: Vec<DirItem>) -> u64 {
        let fh = self.next_fh();
        self.dirs.lock().insert(fh, Arc::from(items));
        fh
    }

    /// After a read found the file changed on the origin: refresh its
    /// directory now rather than when the listing expires, so the next open
    /// sees the new version instead of failing again.
    fn file_changed(self: &Arc<Self>, ino: Ino) {
        self.seen.lock().distrust(ino);
        if let Some(Node::Entry(key)) = self.inodes.node(ino) {
            self.refresh_parent(&key);
        }
    }

    /// Drops the kernel's cached attributes of `ino` (not its pages: that
    /// would wait on page locks of reads in flight, which wait on us;
    /// `FUSE_AUTO_INVAL_DATA` drops pages once the new attributes differ).
    fn forget_attributes(&self, ino: Ino) {
        if let Some(notifier) = self.notifier.get() {
            if let Err(e) = notifier.inval_inode(ino.into(), -1, 0) {
                // ENOENT: the kernel has no such inode cached; nothing to do.
                if e.raw_os_error() != Some(libc::ENOENT) {
                    debug!(%ino, error = %e, "cannot invalidate cached attributes");
                }
            }
        }
    }

    fn next_fh(&self) -> u64 {
        self.next_fh.fetch_add(1, Ordering::Relaxed)
    }

    /// Once no file is open (checked again after [`TRIM_AFTER`]), hands the
    /// memory freed by reads back to the kernel. A full-speed cold read
    /// buffers several MiB per file, in buffers allocated and freed on many
    /// threads; glibc keeps such memory in per-thread arenas, so without
    /// this the daemon would stay at its peak size after a burst.
    /// How long a read of `ino` may wait: the read timeout, or only
    /// [`RETRY_BUDGET`] right after one of its reads timed out.
    fn read_budget(&self, ino: Ino) -> Duration {
        let timeout = self.config.read_timeout;
        let mut timed_out = self.timed_out.lock();
        match timed_out.get(&ino) {
            Some(at) if at.elapsed() < timeout => timeout.min(RETRY_BUDGET),
            Some(_) => {
                timed_out.remove(&ino);
                timeout
            }
            None => timeout,
        }
    }

    fn trim_when_idle(self: &Arc<Self>) {
        if self.trim_pending.swap(true, Ordering::AcqRel) {
            return;
        }
        let inner = Arc::clone(self);
        self.rt.spawn(async move {
            tokio::time::sleep(TRIM_AFTER).await;
            inner.trim_pending.store(false, Ordering::Release);
            if inner.files.lock().is_empty() {
                let _ = tokio::task::spawn_blocking(release_freed_memory).await;
            }
        });
    }

    /// Records that `ino` is opened as `meta`; true when the previous open
    /// in this mount was the same version, so the kernel's cached pages of
    /// it are still right.
    /// The version an open handle of `ino` is bound to: handle `fh` when
    /// it is one, else any.
    fn opened_meta(&self, ino: Ino, fh: Option<Fh>) -> Option<EntryMeta> {
        let files = self.files.lock();
        fh.and_then(|fh| files.get(&fh.0))
            .filter(|f| f.ino == ino)
            .or_else(|| files.values().find(|f| f.ino == ino))
            .map(|f| f.meta.clone())
    }

    fn note_open(&self, ino: Ino, meta: &EntryMeta) -> bool {
        self.seen.lock().note_open(ino, meta)
    }

    fn root_attr(&self) -> fuser::FileAttr {
        attr::dir_attr(Ino::ROOT, 0, self.started, self.owner)
    }

    fn origin_root_key(&self, name: &OsStr) -> Option<NodeKey> {
        self.origins
            .iter()
            .find(|o| o.id().as_str().as_bytes() == name.as_bytes())
            .map(|o| NodeKey {
                origin: o.id().clone(),
                path: OriginPath::root(),
            })
    }

    /// Answers one origin of [`MusicFs::preflight`]: Ok when it lists its
    /// root, or when it does not but a root listing is cached.
    async fn probe(
        &self,
        origin: DynOrigin,
        probe_timeout: Duration,
    ) -> std::result::Result<(), String> {
        let id = origin.id().clone();
        let root = OriginPath::root();
        let key = NodeKey {
            origin: id.clone(),
            path: root.clone(),
        };
        let deadline = tokio::time::Instant::now() + probe_timeout;
        let fetched_at_ns = now_ns();
        let reason = match tokio::time::timeout_at(deadline, origin.list(&root)).await {
            Ok(Ok(entries)) => {
                let count = entries.len();
                self.store_listing(
                    &key,
                    Listing {
                        fetched_at_ns,
                        entries,
                    },
                );
                // The root's own mtime, best effort within the same budget.
                if let Ok(Ok(meta)) = tokio::time::timeout_at(deadline, origin.stat(&root)).await {
                    if meta.kind == EntryKind::Dir {
                        self.root_meta.write().insert(id.clone(), meta);
                    }
                }
                info!(origin = %id, entries = count, "origin answers");
                return Ok(());
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => OriginError::Timeout {
                origin: id.clone(),
                timeout: probe_timeout,
            }
            .to_string(),
        };
        match self.cache.index().listing(&id, &root) {
            Ok(Some(_)) => {
                warn!(origin = %id, %reason, "origin is unavailable; serving its cached listings and files until it answers");
                Ok(())
            }
            Ok(None) => Err(reason),
            Err(e) => Err(format!(
                "{reason}; the cached listing cannot be read either: {e}"
            )),
        }
    }
}

impl MusicFs {
    /// A filesystem over `origins` (shown in the root sorted by id; a
    /// repeated id keeps its first origin), reading through `cache` and
    /// running its async work on `runtime`. Does no I/O. The origins are
    /// also registered with the cache, which needs them to fetch.
    pub fn new(cache: Cache, origins: Vec<DynOrigin>, config: FsConfig, runtime: Handle) -> Self {
        let mut by_id: HashMap<OriginId, DynOrigin> = HashMap::new();
        let mut unique: Vec<DynOrigin> = Vec::new();
        for origin in origins {
            let id = origin.id().clone();
            if by_id.contains_key(&id) {
                warn!(origin = %id, "origin configured twice; using the first one");
                continue;
            }
            cache.add_origin(Arc::clone(&origin));
            by_id.insert(id, Arc::clone(&origin));
            unique.push(origin);
        }
        unique.sort_by(|a, b| a.id().cmp(b.id()));
        let inodes = InodeTable::new();
        // Origins get the first numbers, in root order.
        for origin in &unique {
            inodes.ino_of(&NodeKey {
                origin: origin.id().clone(),
                path: OriginPath::root(),
            });
        }
        MusicFs {
            inner: Arc::new(Inner {
                cache,
                origins: unique,
                by_id,
                config,
                rt: runtime,
                owner: Owner::current(),
                started: SystemTime::now(),
                inodes,
                memo: Mutex::new(Memo::default()),
                refreshing: Mutex::new(HashMap::new()),
                root_meta: RwLock::new(HashMap::new()),
                files: Mutex::new(HashMap::new()),
                dirs: Mutex::new(HashMap::new()),
                seen: Mutex::new(SeenFiles::default()),
                unanswered: Mutex::new(HashMap::new()),
                health: RwLock::new(None),
                notifier: Arc::new(OnceLock::new()),
                next_fh: AtomicU64::new(1),
                trim_pending: AtomicBool::new(false),
                timed_out: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Where [`crate::mount`] puts the session's notifier.
    pub(crate) fn notifier_slot(&self) -> Arc<OnceLock<fuser::Notifier>> {
        Arc::clone(&self.inner.notifier)
    }

    /// Lets opens skip their freshness check while `monitor` says an origin
    /// is down (see `fresh`).
    pub fn set_health(&self, monitor: Arc<HealthMonitor>) {
        *self.inner.health.write() = Some(monitor);
    }

    /// For each origin (all at once): list its root, bounded by
    /// `probe_timeout`, and store the listing in the index. An origin that
    /// fails but has a cached root listing is fine (it is served from the
    /// cache; logged as a warning). Fails with
    /// [`FuseError::OriginUnavailable`] naming the first origin, in root
    /// order, that is down with nothing cached.
    pub async fn preflight(&self, probe_timeout: Duration) -> Result<()> {
        let probes: Vec<_> = self
            .inner
            .origins
            .iter()
            .map(|origin| {
                let inner = Arc::clone(&self.inner);
                let origin = Arc::clone(origin);
                let id = origin.id().clone();
                let task = self
                    .inner
                    .rt
                    .spawn(async move { inner.probe(origin, probe_timeout).await });
                (id, task)
            })
            .collect();
        let mut first_down = None;
        // Every probe is awaited, so none is left running after we return.
        for (origin, task) in probes {
            let outcome = match task.await {
                Ok(r) => r,
                Err(e) => Err(format!("the probe did not finish: {e}")),
            };
            if let Err(reason) = outcome {
                if first_down.is_none() {
                    first_down = Some(FuseError::OriginUnavailable { origin, reason });
                }
            }
        }
        first_down.map_or(Ok(()), Err)
    }

    /// Runs `f` with the listing of `dir`: right here when it is cached,
    /// else in a task once the origin answered.
    fn with_listing<F>(&self, dir: NodeKey, f: F)
    where
        F: FnOnce(&Arc<Inner>, Listed) + Send + 'static,
    {
        if let Some(l) = self.inner.cached_listing(&dir) {
            f(&self.inner, Ok(l));
            return;
        }
        let inner = Arc::clone(&self.inner);
        self.inner.rt.spawn(async move {
            let listed = inner.listing(&dir).await;
            f(&inner, listed);
        });
    }

    /// [`Self::with_listing`] for a request about `name` in `dir`: a
    /// listing that lacks it and is older than the freshness bound is
    /// fetched again first, so a file (re)created on the origin is found
    /// within the bound (see `fresh`).
    fn with_listing_of<F>(&self, dir: NodeKey, name: OsString, f: F)
    where
        F: FnOnce(&Arc<Inner>, Listed) + Send + 'static,
    {
        self.with_listing(dir.clone(), move |inner, listed| match listed {
            Ok(l) if l.get(&name).is_none() && inner.must_relist(&dir, &l) => {
                let inner = Arc::clone(inner);
                inner.rt.clone().spawn(async move {
                    let l = inner.relist(&dir, l).await;
                    f(&inner, Ok(l));
                });
            }
            listed => f(inner, listed),
        });
    }

    /// Runs `f` with the metadata of `key` (inode `ino`): the newer of its
    /// parent's listing entry and what an open last confirmed (or made up,
    /// for an origin's root).
    fn with_meta<F>(&self, ino: Ino, key: NodeKey, f: F)
    where
        F: FnOnce(&Arc<Inner>, Meta) + Send + 'static,
    {
        self.with_entry(ino, key, move |inner, entry| {
            f(inner, entry.map(|(meta, _)| meta))
        });
    }

    /// [`Self::with_meta`] with the time the metadata was known.
    fn with_entry<F>(&self, ino: Ino, key: NodeKey, f: F)
    where
        F: FnOnce(&Arc<Inner>, Entry) + Send + 'static,
    {
        let (Some(parent), Some(name)) = (key.path.parent(), key.path.file_name()) else {
            let meta = self.inner.origin_root_meta(&key.origin);
            f(&self.inner, Ok((meta, now_ns())));
            return;
        };
        let name = name.to_owned();
        let dir = NodeKey {
            origin: key.origin,
            path: parent,
        };
        self.with_listing_of(dir, name.clone(), move |inner, listed| {
            let entry = listed.and_then(|l| {
                let meta = l.get(&name).cloned().ok_or(Errno::ENOENT)?;
                Ok(inner.newest(ino, meta, l.fetched_at_ns))
            });
            f(inner, entry);
        });
    }

    fn node(&self, ino: INodeNo) -> Option<Node> {
        self.inner.inodes.node(Ino::from(ino))
    }
}

impl Filesystem for MusicFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // As much readahead as the kernel allows: players read sequentially,
        // and each request costs a round trip through this process.
        if let Err(max) = config.set_max_readahead(u32::MAX) {
            let _ = config.set_max_readahead(max);
        }
        // Room for readahead of several files at once (fuser's default 16).
        let _ = config.set_max_background(64);
        // Lookups and readdirs of one directory need not queue behind each
        // other; a cold one may wait on the origin.
        let _ = config.add_capabilities(InitFlags::FUSE_PARALLEL_DIROPS);
        // Drop cached pages when a refresh shows a changed mtime or size.
        let _ = config.add_capabilities(InitFlags::FUSE_AUTO_INVAL_DATA);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let ttl = self.inner.config.kernel_ttl;
        match self.node(parent) {
            None => reply.error(Errno::ENOENT),
            Some(Node::Root) => match self.inner.origin_root_key(name) {
                Some(key) => {
                    let ino = self.inner.inodes.ino_of(&key);
                    let meta = self.inner.origin_root_meta(&key.origin);
                    let attr = attr::entry_attr(ino, &meta, self.inner.owner);
                    reply.entry(&ttl, &attr, Generation(0));
                }
                None => reply.error(Errno::ENOENT),
            },
            Some(Node::Entry(dir)) => {
                let Ok(path) = dir.path.join(name) else {
                    reply.error(Errno::ENOENT);
                    return;
                };
                let name = name.to_owned();
                let origin = dir.origin.clone();
                self.with_listing_of(dir, name.clone(), move |inner, listed| {
                    let fetched_at_ns = listed.as_ref().map_or(0, |l| l.fetched_at_ns);
                    match listed.and_then(|l| l.get(&name).cloned().ok_or(Errno::ENOENT)) {
                        Ok(listed) => {
                            let ino = inner.inodes.ino_of(&NodeKey { origin, path });
                            let (meta, _) = inner.newest(ino, listed, fetched_at_ns);
                            let attr = attr::entry_attr(ino, &meta, inner.owner);
                            reply.entry(&ttl, &attr, Generation(0));
                        }
                        Err(e) => reply.error(e),
                    }
                });
            }
        }
    }

    fn forget(&self, _req: &Request, _ino: INodeNo, _nlookup: u64) {
        // Inode numbers live until unmount (see the inode module).
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<Fh>, reply: ReplyAttr) {
        let ttl = self.inner.config.kernel_ttl;
        match self.node(ino) {
            None => reply.error(Errno::ENOENT),
            Some(Node::Root) => reply.attr(&ttl, &self.inner.root_attr()),
            Some(Node::Entry(key)) => {
                let ino = Ino::from(ino);
                self.with_meta(ino, key, move |inner, meta| match meta {
                    Ok(meta) => reply.attr(&ttl, &attr::entry_attr(ino, &meta, inner.owner)),
                    // Deleted on the origin, but still open here: the
                    // kernel checks attributes before a read (and fstat
                    // asks too), and ENOENT would fail the read, which the
                    // handle's version can still answer (bytes, or ESTALE).
                    Err(Errno::ENOENT) => match inner.opened_meta(ino, fh) {
                        Some(meta) => reply.attr(&ttl, &attr::entry_attr(ino, &meta, inner.owner)),
                        None => reply.error(Errno::ENOENT),
                    },
                    Err(e) => reply.error(e),
                });
            }
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let key = match self.node(ino) {
            None => return reply.error(Errno::ENOENT),
            Some(Node::Root) => return reply.error(Errno::EINVAL),
            Some(Node::Entry(key)) => key,
        };
        let (Some(parent), Some(name)) = (key.path.parent(), key.path.file_name()) else {
            // An origin's root is a directory.
            return reply.error(Errno::EINVAL);
        };
        let name = name.to_owned();
        let dir = NodeKey {
            origin: key.origin.clone(),
            path: parent,
        };
        let ino = Ino::from(ino);
        self.with_listing(dir, move |inner, listed| {
            let entry = match listed.and_then(|l| l.entry(&name).cloned().ok_or(Errno::ENOENT)) {
                Ok(entry) if entry.meta.kind == EntryKind::Symlink => entry,
                Ok(_) => return reply.error(Errno::EINVAL),
                Err(e) => return reply.error(e),
            };
            if let Some(target) = entry.link_target {
                return reply_link(&key, &target, reply);
            }
            let Some(origin) = inner.by_id.get(&key.origin).cloned() else {
                return reply.error(Errno::ENOENT);
            };
            let inner = Arc::clone(inner);
            let timeout = inner.config.read_timeout;
            inner.rt.clone().spawn(async move {
                match tokio::time::timeout(timeout, origin.read_link(&key.path)).await {
                    Ok(Ok(target)) => reply_link(&key, &target, reply),
                    Ok(Err(e)) => {
                        debug!(origin = %key.origin, path = %key.path, error = %e, "cannot read a symlink");
                        if e.is_not_found() {
                            // Hidden or gone now: the listing is out of date.
                            inner.file_changed(ino);
                        }
                        reply.error(errno::of_origin(&e));
                    }
                    Err(_) => {
                        warn!(origin = %key.origin, path = %key.path, ?timeout, "readlink timed out; the origin may be hung");
                        reply.error(Errno::EIO);
                    }
                }
            });
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.acc_mode() != OpenAccMode::O_RDONLY || flags.0 & libc::O_TRUNC != 0 {
            reply.error(Errno::EROFS);
            return;
        }
        let key = match self.node(ino) {
            None => return reply.error(Errno::ENOENT),
            Some(Node::Root) => return reply.error(Errno::EISDIR),
            Some(Node::Entry(key)) => key,
        };
        let ino = Ino::from(ino);
        self.with_entry(ino, key.clone(), move |inner, entry| {
            let (listed, listed_ns) = match entry {
                Ok((meta, _)) if meta.kind != EntryKind::File => return reply.error(Errno::EISDIR),
                Ok(entry) => entry,
                Err(e) => return reply.error(e),
            };
            let inner = Arc::clone(inner);
            // Async from here: the freshness check may ask the origin, and
            // open_file reads the manifest.
            inner.rt.clone().spawn(async move {
                let meta = match inner.fresh_meta(ino, &key, listed.clone(), listed_ns).await {
                    Ok(meta) => meta,
                    Err(e) => return reply.error(e),
                };
                match inner.cache.open_file(&key.origin, &key.path, &meta).await {
                    Ok(handle) => {
                        let keep = inner.note_open(ino, &meta);
                        let fh = inner.next_fh();
                        inner.files.lock().insert(
                            fh,
                            OpenFile {
                                ino,
                                handle,
                                meta: meta.clone(),
                            },
                        );
                        let flags = if keep {
                            FopenFlags::FOPEN_KEEP_CACHE
                        } else {
                            // The kernel may still hold attributes of an
                            // older version (they live `kernel_ttl`) and
                            // would cut reads of a grown file at the old
                            // size: make it ask again before the first
                            // read. Sent before the reply, so it lands
                            // before any read of this open.
                            inner.forget_attributes(ino);
                            FopenFlags::empty()
                        };
                        reply.opened(Fh(fh), flags);
                    }
                    Err(e) => {
                        warn!(%ino, origin = %key.origin, path = %key.path, error = %e, "cannot open a file");
                        reply.error(errno::of_cas(&e));
                    }
                }
            });
        });
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: Fh,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let handle = self.inner.files.lock().get(&fh.0).map(|f| f.handle.clone());
        let Some(handle) = handle else {
            reply.error(Errno::EBADF);
            return;
        };
        // A fully cached file is answered right here when its verified
        // chunks are at hand (in memory or on the cache disk): no origin is
        // involved, and the hand-off to the runtime and back would cost
        // more than the read itself.
        if let Some(data) = handle.read_cached_blocking(offset, u64::from(size)) {
            reply.data(&data);
            return;
        }
        let ino = Ino::from(ino);
        let timeout = self.inner.read_budget(ino);
        let inner = Arc::clone(&self.inner);
        // Every read is its own task: one stuck on a hung origin holds no
        // FUSE thread and delays no other read.
        self.inner.rt.spawn(async move {
            match tokio::time::timeout(timeout, handle.read(offset, u64::from(size))).await {
                Ok(Ok(data)) => {
                    inner.timed_out.lock().remove(&ino);
                    reply.data(&data)
                }
                Ok(Err(e)) => {
                    let errno = errno::of_cas(&e);
                    if matches!(e, CasError::OriginChanged { .. }) {
                        info!(%ino, path = %handle.path(), error = %e, "file changed on the origin while open; this handle ends with ESTALE");
                        inner.file_changed(ino);
                    } else {
                        warn!(%ino, offset, size, path = %handle.path(), error = %e, "read failed");
                    }
                    reply.error(errno);
                }
                Err(_) => {
                    warn!(%ino, offset, size, path = %handle.path(), ?timeout, "read timed out; the origin may be hung");
                    inner.timed_out.lock().insert(ino, Instant::now());
                    reply.error(Errno::EIO);
                }
            }
        });
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: Fh, _owner: LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: Fh,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let file = self.inner.files.lock().remove(&fh.0);
        if let Some(file) = &file {
            debug!(ino = %file.ino, path = %file.handle.path(), "released");
        }
        // Dropped outside the lock: the last handle of a file stops its
        // ingest.
        drop(file);
        reply.ok();
        if self.inner.files.lock().is_empty() {
            self.inner.trim_when_idle();
        }
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: Fh, _datasync: bool, reply: ReplyEmpty) {
        // Nothing is ever written, so everything is already "on disk".
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let key = match self.node(ino) {
            None => return reply.error(Errno::ENOENT),
            Some(Node::Root) => {
                let mut items = vec![dot(".", Ino::ROOT), dot("..", Ino::ROOT)];
                for origin in &self.inner.origins {
                    let key = NodeKey {
                        origin: origin.id().clone(),
                        path: OriginPath::root(),
                    };
                    items.push(DirItem {
                        ino: self.inner.inodes.ino_of(&key),
                        kind: FileType::Directory,
                        name: origin.id().as_str().into(),
                    });
                }
                let fh = self.inner.open_dir_snapshot(items);
                return reply.opened(Fh(fh), FopenFlags::empty());
            }
            Some(Node::Entry(key)) => key,
        };
        let ino = Ino::from(ino);
        self.with_listing(key.clone(), move |inner, listed| {
            let listing = match listed {
                Ok(l) => l,
                Err(e) => return reply.error(e),
            };
            let parent = match key.path.parent() {
                None => Ino::ROOT,
                Some(path) => inner.inodes.ino_of(&NodeKey {
                    origin: key.origin.clone(),
                    path,
                }),
            };
            let mut items = Vec::with_capacity(listing.entries.len() + 2);
            items.push(dot(".", ino));
            items.push(dot("..", parent));
            for entry in &listing.entries {
                // Names from an origin are single components; one that is
                // not cannot be looked up, so it is not listed either.
                let Ok(path) = key.path.join(&entry.name) else {
                    continue;
                };
                items.push(DirItem {
                    ino: inner.inodes.ino_of(&NodeKey {
                        origin: key.origin.clone(),
                        path,
                    }),
                    kind: attr::file_type(entry.meta.kind),
                    name: entry.name.clone(),
                });
            }
            let fh = inner.open_dir_snapshot(items);
            reply.opened(Fh(fh), FopenFlags::empty());
        });
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: Fh,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let items = self.inner.dirs.lock().get(&fh.0).cloned();
        let Some(items) = items else {
            reply.error(Errno::EBADF);
            return;
        };
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, item) in items.iter().enumerate().skip(start) {
            // The offset of an entry is where the next call resumes.
            if reply.add(item.ino.into(), i as u64 + 1, item.kind, &item.name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: Fh,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        let snapshot = self.inner.dirs.lock().remove(&fh.0);
        drop(snapshot);
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: Fh, _datasync: bool, reply: ReplyEmpty) {
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let stats = self.inner.cache.stats();
        let bs = u64::from(BLOCK_SIZE);
        let blocks = stats.max_size / bs;
        let free = stats.max_size.saturating_sub(stats.size) / bs;
        reply.statfs(
            blocks,
            free,
            free,
            self.inner.inodes.len(),
            0,
            BLOCK_SIZE,
            NAME_MAX,
            BLOCK_SIZE,
        );
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: Fh,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        quiet::ioctl(reply);
    }

    fn poll(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: Fh,
        _ph: fuser::PollNotifier,
        _events: fuser::PollEvents,
        _flags: fuser::PollFlags,
        reply: fuser::ReplyPoll,
    ) {
        quiet::poll(reply);
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: Fh,
        _offset: i64,
        _whence: i32,
        reply: fuser::ReplyLseek,
    ) {
        quiet::lseek(reply);
    }

    fn getlk(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: Fh,
        _lock_owner: LockOwner,
        _start: u64,
        _end: u64,
        _typ: i32,
        _pid: u32,
        reply: fuser::ReplyLock,
    ) {
        quiet::getlk(reply);
    }

    fn setlk(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: Fh,
        _lock_owner: LockOwner,
        _start: u64,
        _end: u64,
        _typ: i32,
        _pid: u32,
        _sleep: bool,
        reply: ReplyEmpty,
    ) {
        quiet::setlk(reply);
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        if mask.contains(AccessFlags::W_OK) {
            reply.error(Errno::EROFS);
        } else if self.node(ino).is_none() {
            reply.error(Errno::ENOENT);
        } else {
            reply.ok();
        }
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        // No extended attributes; ENOSYS makes the kernel stop asking.
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    // Everything below would change the tree: read-only, always.

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<Fh>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _link_name: &OsStr,
        _target: &Path,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: Fh,
        _offset: u64,
        _data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        reply.error(Errno::EROFS);
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: Fh,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        _fh_in: Fh,
        _offset_in: u64,
        _ino_out: INodeNo,
        _fh_out: Fh,
        _offset_out: u64,
        _len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }
}

/// Returns the allocator's free memory to the kernel (glibc only; other
/// allocators return it by themselves or not at all).
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointers from us, only walks glibc's own
    // free lists under its locks, and may be called from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn dot(name: &str, ino: Ino) -> DirItem {
    DirItem {
        ino,
        kind: FileType::Directory,
        name: name.into(),
    }
}

/// Answers a `readlink` of `key` with `target`, unless the target could
/// lead the kernel out of the origin's directory (see the module docs).
fn reply_link(key: &NodeKey, target: &Path, reply: ReplyData) {
    if key.path.lexical_link_target(target).is_some() {
        reply.data(target.as_os_str().as_bytes());
    } else {
        warn!(origin = %key.origin, path = %key.path, ?target, "not serving a symlink target that is absolute or leaves the origin");
        reply.error(Errno::ENOENT);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, kind: EntryKind) -> DirEntry {
        DirEntry::new(
            name,
            EntryMeta {
                kind,
                size: 1,
                mtime_ns: Some(1),
                etag: None,
            },
        )
    }

    #[test]
    fn listings_keep_symlinks_and_find_names_by_bytes() {
        let latin1 = OsStr::from_bytes(b"Bj\xf6rk");
        let l = DirListing::new(Listing {
            fetched_at_ns: now_ns(),
            entries: vec![
                entry("b.flac", EntryKind::File),
                entry("link", EntryKind::Symlink),
                DirEntry::new(latin1, entry("", EntryKind::Dir).meta),
                entry("Björk — 世界", EntryKind::Dir),
                entry("a.mp3", EntryKind::File),
            ],
        });
        let names: Vec<&[u8]> = l.entries.iter().map(|e| e.name.as_bytes()).collect();
        assert_eq!(
            names,
            [
                "Björk — 世界".as_bytes(),
                b"Bj\xf6rk",
                b"a.mp3",
                b"b.flac",
                b"link"
            ]
        );
        assert_eq!(
            l.get(OsStr::new("link")).map(|m| m.kind),
            Some(EntryKind::Symlink)
        );
        assert_eq!(l.get(latin1).map(|m| m.kind), Some(EntryKind::Dir));
        // The UTF-8 spelling is another name.
        assert!(l.get(OsStr::new("Björk")).is_none());
        assert_eq!(
            l.get(OsStr::new("a.mp3")).map(|m| m.kind),
            Some(EntryKind::File)
        );
        assert!(l.get(OsStr::new("missing")).is_none());
        assert!(!l.is_stale(Duration::from_secs(60)));
    }

    #[test]
    fn old_and_future_listings_are_stale() {
        let mut old = DirListing::new(Listing {
            fetched_at_ns: now_ns() - 120_000_000_000,
            entries: Vec::new(),
        });
        assert!(old.is_stale(Duration::from_secs(60)));
        assert!(!old.is_stale(Duration::from_secs(600)));
        old.fetched_at_ns = now_ns() + 3_600_000_000_000;
        assert!(old.is_stale(Duration::from_secs(600)));
    }

    #[test]
    fn memo_is_bounded() {
        let mut memo = Memo::default();
        for i in 0..MEMO_DIRS + 10 {
            let key = NodeKey {
                origin: OriginId::new("o").unwrap(),
                path: OriginPath::new(&format!("d{i}")).unwrap(),
            };
            memo.put(
                key,
                Arc::new(DirListing::new(Listing {
                    fetched_at_ns: 0,
                    entries: Vec::new(),
                })),
            );
        }
        assert_eq!(memo.map.len(), MEMO_DIRS);
        assert_eq!(memo.order.len(), MEMO_DIRS);
    }

    #[test]
    fn keep_cache_only_for_an_unchanged_version() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (cache, _) = rt
            .block_on(Cache::open(musicfs_cas::CacheConfig::new(
                dir.path(),
                1 << 20,
            )))
            .unwrap();
        let fs = MusicFs::new(cache, Vec::new(), FsConfig::default(), rt.handle().clone());
        let v1 = entry("a", EntryKind::File).meta;
        let v2 = EntryMeta {
            size: 2,
            ..v1.clone()
        };
        assert!(!fs.inner.note_open(Ino(5), &v1), "first open");
        assert!(fs.inner.note_open(Ino(5), &v1), "same version");
        assert!(!fs.inner.note_open(Ino(5), &v2), "changed");
        assert!(fs.inner.note_open(Ino(5), &v2));
        assert!(!fs.inner.note_open(Ino(6), &v2), "another file");
    }
}
