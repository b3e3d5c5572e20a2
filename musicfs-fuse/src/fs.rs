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
//! - Directory streams are snapshots taken at `opendir`, so a refresh in the
//!   middle of a long `readdir` cannot skip or repeat entries.
//! - `open` pins the version from the cached listing (the cache serves only
//!   that version's chunks), and keeps the kernel page cache
//!   (`FOPEN_KEEP_CACHE`) only when that version equals the one of the
//!   previous open of the inode in this mount.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsStr;
use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, CopyFileRangeFlags, Errno, FileHandle as Fh, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use musicfs_cas::{Cache, CasError, FileHandle, Listing};
use musicfs_origins::{
    DirEntry, DynOrigin, EntryKind, EntryMeta, OriginError, OriginId, OriginPath,
};
use parking_lot::{Mutex, RwLock};
use tokio::runtime::Handle;
use tracing::{debug, info, warn};

use crate::attr::{self, Owner, BLOCK_SIZE};
use crate::inode::{InodeTable, Node, NodeKey};
use crate::{FsConfig, FuseError, Ino, Result};

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
    /// The version each file inode was last opened as, for `KEEP_CACHE`.
    opened: Mutex<HashMap<Ino, EntryMeta>>,
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
}

/// One entry of a directory stream snapshot.
#[derive(Debug)]
struct DirItem {
    ino: Ino,
    kind: FileType,
    name: String,
}

/// One directory's visible entries (files and directories; symlinks are
/// dropped here, which is what hides them everywhere), sorted by name.
#[derive(Debug)]
struct DirListing {
    fetched_at_ns: u64,
    entries: Vec<DirEntry>,
}

impl DirListing {
    fn new(listing: Listing) -> Self {
        let mut entries: Vec<DirEntry> = listing
            .entries
            .into_iter()
            .filter(|e| e.meta.kind != EntryKind::Symlink)
            .collect();
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        // An origin never lists a name twice; if one did, the first wins,
        // as for a lookup.
        entries.dedup_by(|b, a| a.name == b.name);
        Self {
            fetched_at_ns: listing.fetched_at_ns,
            entries,
        }
    }

    fn get(&self, name: &str) -> Option<&EntryMeta> {
        self.entries
            .binary_search_by(|e| e.name.as_str().cmp(name))
            .ok()
            .map(|i| &self.entries[i].meta)
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

/// The errno a failed origin call becomes.
fn errno_of(err: &OriginError) -> Errno {
    match err {
        e if e.is_not_found() => Errno::ENOENT,
        OriginError::WrongKind { .. } => Errno::ENOTDIR,
        _ => Errno::EIO,
    }
}

type Listed = std::result::Result<Arc<DirListing>, Errno>;
type Meta = std::result::Result<EntryMeta, Errno>;

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
            let errno = errno_of(&e);
            if errno == Errno::EIO {
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
        if let Some(Node::Entry(key)) = self.inodes.node(ino) {
            if let Some(parent) = key.path.parent() {
                self.refresh_in_background(&NodeKey {
                    origin: key.origin,
                    path: parent,
                });
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
    fn note_open(&self, ino: Ino, meta: &EntryMeta) -> bool {
        self.opened
            .lock()
            .insert(ino, meta.clone())
            .is_some_and(|previous| previous.same_version(meta))
    }

    fn root_attr(&self) -> fuser::FileAttr {
        attr::dir_attr(Ino::ROOT, 0, self.started, self.owner)
    }

    fn origin_root_key(&self, name: &str) -> Option<NodeKey> {
        self.origins
            .iter()
            .find(|o| o.id().as_str() == name)
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
                opened: Mutex::new(HashMap::new()),
                next_fh: AtomicU64::new(1),
                trim_pending: AtomicBool::new(false),
                timed_out: Mutex::new(HashMap::new()),
            }),
        }
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

    /// Runs `f` with the metadata of `key`, from its parent's listing (or
    /// made up, for an origin's root).
    fn with_meta<F>(&self, key: NodeKey, f: F)
    where
        F: FnOnce(&Arc<Inner>, Meta) + Send + 'static,
    {
        let (Some(parent), Some(name)) = (key.path.parent(), key.path.file_name()) else {
            let meta = self.inner.origin_root_meta(&key.origin);
            f(&self.inner, Ok(meta));
            return;
        };
        let name = name.to_owned();
        let dir = NodeKey {
            origin: key.origin,
            path: parent,
        };
        self.with_listing(dir, move |inner, listed| {
            let meta = listed.and_then(|l| l.get(&name).cloned().ok_or(Errno::ENOENT));
            f(inner, meta);
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
        // Names come from origins as UTF-8; no other name can exist here.
        let Some(name) = name.to_str() else {
            reply.error(Errno::ENOENT);
            return;
        };
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
                self.with_listing(dir, move |inner, listed| {
                    match listed.and_then(|l| l.get(&name).cloned().ok_or(Errno::ENOENT)) {
                        Ok(meta) => {
                            let ino = inner.inodes.ino_of(&NodeKey { origin, path });
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

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<Fh>, reply: ReplyAttr) {
        let ttl = self.inner.config.kernel_ttl;
        match self.node(ino) {
            None => reply.error(Errno::ENOENT),
            Some(Node::Root) => reply.attr(&ttl, &self.inner.root_attr()),
            Some(Node::Entry(key)) => {
                let ino = Ino::from(ino);
                self.with_meta(key, move |inner, meta| match meta {
                    Ok(meta) => reply.attr(&ttl, &attr::entry_attr(ino, &meta, inner.owner)),
                    Err(e) => reply.error(e),
                });
            }
        }
    }

    fn readlink(&self, _req: &Request, _ino: INodeNo, reply: ReplyData) {
        // Symlinks are never shown, so nothing here is one.
        reply.error(Errno::EINVAL);
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
        self.with_meta(key.clone(), move |inner, meta| {
            let meta = match meta {
                Ok(meta) if meta.kind == EntryKind::File => meta,
                Ok(_) => return reply.error(Errno::EISDIR),
                Err(e) => return reply.error(e),
            };
            let inner = Arc::clone(inner);
            // open_file is async (it reads the manifest), so it runs as a
            // task even when the metadata was at hand.
            inner.rt.clone().spawn(async move {
                match inner.cache.open_file(&key.origin, &key.path, &meta).await {
                    Ok(handle) => {
                        let keep = inner.note_open(ino, &meta);
                        let fh = inner.next_fh();
                        inner.files.lock().insert(fh, OpenFile { ino, handle });
                        let flags = if keep {
                            FopenFlags::FOPEN_KEEP_CACHE
                        } else {
                            FopenFlags::empty()
                        };
                        reply.opened(Fh(fh), flags);
                    }
                    Err(e) => {
                        warn!(%ino, origin = %key.origin, path = %key.path, error = %e, "cannot open a file");
                        reply.error(Errno::EIO);
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
                    warn!(%ino, offset, size, path = %handle.path(), error = %e, "read failed");
                    if matches!(e, CasError::OriginChanged { .. }) {
                        inner.file_changed(ino);
                    }
                    reply.error(Errno::EIO);
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
                        name: origin.id().as_str().to_owned(),
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
        // O(1): two figures the store keeps current, no index walk (`df`
        // and file managers call this often).
        let store = self.inner.cache.store();
        let used = store.current_size() + store.index_size();
        let bs = u64::from(BLOCK_SIZE);
        let blocks = store.max_size() / bs;
        let free = store.max_size().saturating_sub(used) / bs;
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
        name: name.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, kind: EntryKind) -> DirEntry {
        DirEntry {
            name: name.to_owned(),
            meta: EntryMeta {
                kind,
                size: 1,
                mtime_ns: Some(1),
                etag: None,
            },
        }
    }

    #[test]
    fn listings_hide_symlinks_and_find_names() {
        let l = DirListing::new(Listing {
            fetched_at_ns: now_ns(),
            entries: vec![
                entry("b.flac", EntryKind::File),
                entry("link", EntryKind::Symlink),
                entry("Björk — 世界", EntryKind::Dir),
                entry("a.mp3", EntryKind::File),
            ],
        });
        let names: Vec<_> = l.entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["Björk — 世界", "a.mp3", "b.flac"]);
        assert!(l.get("link").is_none());
        assert_eq!(l.get("a.mp3").map(|m| m.kind), Some(EntryKind::File));
        assert!(l.get("missing").is_none());
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

    #[test]
    fn origin_errors_become_errnos() {
        let origin = OriginId::new("o").unwrap();
        let nf = OriginError::NotFound {
            origin: origin.clone(),
            path: "x".into(),
        };
        assert_eq!(errno_of(&nf), Errno::ENOENT);
        let down = OriginError::Unavailable {
            origin,
            reason: "down".into(),
        };
        assert_eq!(errno_of(&down), Errno::EIO);
    }
}
