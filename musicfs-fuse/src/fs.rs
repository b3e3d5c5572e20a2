//! The filesystem proper: what each kernel request does, one job a file.
//!
//! Layer: between fuser (below: kernel requests on a few worker threads)
//! and the cache and origins (above: async). This file holds the state the
//! jobs share ([`MusicFs`], `Inner`); the jobs are:
//! - `fs/kernel.rs`: the `Filesystem` impl, one thin method per request
//!   (write-like ones `EROFS`, unsupported ones quiet via `fs/quiet.rs`);
//! - `fs/entries.rs`: `lookup`, `getattr`, `readlink`;
//! - `fs/listings.rs`: cached directory listings, their refresh, preflight;
//! - `fs/readahead.rs`: listing read-ahead below a directory a user opened;
//! - `fs/dirs.rs`: directory streams;
//! - `fs/files.rs`: `open`, `read`, `release`;
//! - `fs/fresh.rs`: which version an open binds to (the staleness bound);
//! - `../errno.rs`: the one errno table; `../versions.rs`: what each file
//!   was last opened as.
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
//! - An origin's root listing that comes back empty never replaces a
//!   non-empty cached one: an emptied root is a NAS that looks unmounted
//!   (the origins' `RootGuard` says so first; this is the same rule for
//!   origins without one), and only `musicfs forget` drops a cached tree.
//! - Directory streams are snapshots taken at `opendir`, so a refresh in the
//!   middle of a long `readdir` cannot skip or repeat entries.
//! - An `opendir` lists the directory's subdirectories ahead, in the
//!   background, bounded in width, depth and distance ahead of the user
//!   (`fs/readahead.rs`); a user's request never waits for a read-ahead
//!   slot.
//! - Names are bytes: the kernel's `OsStr` is matched against the origin's
//!   names byte for byte, UTF-8 or not.
//! - A symlink is shown when its origin listed it (origins list only the
//!   ones whose target resolves inside their root) and `readlink` answers
//!   the target the listing holds, checked then by the origin, so it is as
//!   fresh as the listing; an origin that lists no targets is asked on each
//!   `readlink`. Whatever its source, a target that is absolute or climbs
//!   above the origin's directory as written is never handed to the kernel.
//! - `open` binds the handle to one version: the cached one while it is
//!   fresher than `freshness` (or the origin is down), else the one the
//!   origin confirms (`fs/fresh.rs`; a cold file's first read runs beside
//!   that check, so it costs no round trip of its own, and is kept only if
//!   the check confirms its version); the cache then serves only that
//!   version's bytes. The inode it opens is that version's own (see the
//!   inode module), so the kernel's page cache of it is always right and
//!   is kept (`FOPEN_KEEP_CACHE`); an open of an outdated version's inode
//!   answers `ESTALE` and the kernel looks the name up again.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, CopyFileRangeFlags, Filesystem, INodeNo, InitFlags, KernelConfig, RenameFlags,
    ReplyCreate, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use musicfs_cas::Cache;
use musicfs_origins::{DynOrigin, EntryKind, EntryMeta, HealthMonitor, OriginId, OriginPath};
use parking_lot::{Mutex, RwLock};
use tokio::runtime::Handle;
use tracing::warn;

use crate::attr::{self, Owner, BLOCK_SIZE};
use crate::inode::{InodeTable, Node, NodeKey};
use crate::versions::SeenFiles;
use crate::{FsConfig, Ino};

mod control;
mod dirs;
mod entries;
mod files;
mod fresh;
mod kernel;
mod listings;
mod quiet;
mod readahead;
#[cfg(test)]
mod tests;

pub use control::{FsControl, ScanProgress};
use dirs::DirItem;
use files::OpenFile;
use listings::Memo;
use readahead::ReadAhead;

/// A listing stamped further than this in the future means the wall clock
/// went back; it is treated as stale rather than fresh for a long time.
const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// The longest name `statfs` reports; names come from the origins, which
/// live on filesystems with this limit.
const NAME_MAX: u32 = 255;

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

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
    /// The version of each file the origin last confirmed, and when
    /// (freshness).
    seen: Mutex<SeenFiles>,
    /// Origins with a freshness check that has not answered in time, since
    /// when (see `fresh`).
    unanswered: Mutex<HashMap<OriginId, Instant>>,
    /// The origins' health, when the caller runs a monitor.
    health: RwLock<Option<Arc<HealthMonitor>>>,
    /// Origins with a question waiting for their answer, since when (see
    /// `fresh`).
    waiting: Mutex<HashMap<OriginId, tokio::time::Instant>>,
    next_fh: AtomicU64,
    /// A hand-back of freed memory is pending (see [`TRIM_AFTER`]).
    trim_pending: AtomicBool,
    /// Files whose last origin read timed out, and when (see
    /// [`RETRY_BUDGET`]).
    timed_out: Mutex<HashMap<Ino, Instant>>,
    /// Listings read ahead of the user.
    read_ahead: ReadAhead,
}

impl Inner {
    fn next_fh(&self) -> u64 {
        self.next_fh.fetch_add(1, Ordering::Relaxed)
    }

    /// The inode of an entry: for a file, of its version (see the inode
    /// module).
    fn entry_ino(&self, key: &NodeKey, meta: &EntryMeta) -> Ino {
        match meta.kind {
            EntryKind::File => self.inodes.ino_of_file(key, meta.version()),
            EntryKind::Dir | EntryKind::Symlink => self.inodes.ino_of(key),
        }
    }

    /// The tracks a path of the music view stands for; `None` when `first`
    /// is not the view (there is no view yet: it comes with the tag scan).
    fn view_resolve(
        &self,
        _first: &std::ffi::OsStr,
        _rest: &[&std::ffi::OsStr],
    ) -> Option<Vec<(OriginId, OriginPath)>> {
        None
    }

    fn scan_progress(&self) -> ScanProgress {
        ScanProgress::default()
    }

    fn root_attr(&self) -> fuser::FileAttr {
        attr::dir_attr(Ino::ROOT, 0, self.started, self.owner)
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
                waiting: Mutex::new(HashMap::new()),
                next_fh: AtomicU64::new(1),
                trim_pending: AtomicBool::new(false),
                timed_out: Mutex::new(HashMap::new()),
                read_ahead: ReadAhead::default(),
            }),
        }
    }

    /// Lets opens skip their freshness check while `monitor` says an origin
    /// is down (see `fresh`).
    pub fn set_health(&self, monitor: Arc<HealthMonitor>) {
        *self.inner.health.write() = Some(monitor);
    }

    fn node(&self, ino: INodeNo) -> Option<Node> {
        self.inner.inodes.node(Ino::from(ino))
    }
}
