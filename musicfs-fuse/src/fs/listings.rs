//! Directory listings: what `lookup`, `getattr` and `readdir` are
//! answered from.
//!
//! Layer: part of the filesystem proper (see `fs.rs`), between the kernel
//! handlers and the origins' `list`. Invariants: metadata comes from
//! [`Listing`]s stored per directory in the index (so a library browses
//! offline), decoded ones kept in a bounded memo; a stale listing is served
//! while one background refresh per directory runs (after the origin's
//! queued read-ahead, `Cache::background_turn`); a failed refresh keeps
//! the old listing and is not retried for `listing_ttl` (at least a
//! second); an origin's root listing that comes back empty never replaces
//! a non-empty cached one (the NAS looks unmounted; only `musicfs forget`
//! drops a cached tree).

use std::collections::{HashMap, VecDeque};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use fuser::Errno;
use musicfs_cas::Listing;
use musicfs_origins::{
    DirEntry, DynOrigin, EntryKind, EntryMeta, OriginError, OriginId, OriginPath,
};
use tracing::{debug, info, warn};

use super::readahead;
use super::*;
use crate::errno;
use crate::inode::NodeKey;
use crate::{FuseError, Result};

/// Decoded listings kept in memory, so the `lookup` of every entry of a big
/// directory does not decode its whole listing again. The index stays the
/// source of truth; this only bounds memory, so eviction is first in, first
/// out.
pub(super) const MEMO_DIRS: usize = 4096;

/// A failed background refresh is not retried sooner than this, even with a
/// shorter `listing_ttl`.
pub(super) const MIN_REFRESH_RETRY: Duration = Duration::from_secs(1);

/// One directory's entries (files, directories and the symlinks the origin
/// chose to show), sorted by name bytes.
#[derive(Debug)]
pub(super) struct DirListing {
    pub(super) fetched_at_ns: u64,
    pub(super) entries: Vec<DirEntry>,
}

impl DirListing {
    pub(super) fn new(listing: Listing) -> Self {
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

    pub(super) fn get(&self, name: &OsStr) -> Option<&EntryMeta> {
        self.entry(name).map(|e| &e.meta)
    }

    pub(super) fn entry(&self, name: &OsStr) -> Option<&DirEntry> {
        self.entries
            .binary_search_by(|e| e.name.as_os_str().cmp(name))
            .ok()
            .map(|i| &self.entries[i])
    }

    pub(super) fn is_stale(&self, ttl: Duration) -> bool {
        let now = now_ns();
        let skew = duration_ns(CLOCK_SKEW);
        self.fetched_at_ns > now.saturating_add(skew)
            || now.saturating_sub(self.fetched_at_ns) > duration_ns(ttl)
    }
}

#[derive(Debug, Default)]
pub(super) struct Memo {
    pub(super) map: HashMap<NodeKey, Arc<DirListing>>,
    /// Insertion order; holds each key of `map` at least once (a removed
    /// key stays until its turn; popping it early only costs a decode).
    pub(super) order: VecDeque<NodeKey>,
}

impl Memo {
    pub(super) fn get(&self, key: &NodeKey) -> Option<Arc<DirListing>> {
        self.map.get(key).cloned()
    }

    /// Forgets `key` (its place in `order` goes when its turn comes).
    pub(super) fn remove(&mut self, key: &NodeKey) {
        self.map.remove(key);
    }

    pub(super) fn put(&mut self, key: NodeKey, listing: Arc<DirListing>) {
        if self.map.insert(key.clone(), listing).is_none() {
            self.order.push_back(key);
            while self.map.len() > MEMO_DIRS || self.order.len() > 2 * MEMO_DIRS {
                let Some(oldest) = self.order.pop_front() else {
                    break;
                };
                self.map.remove(&oldest);
            }
        }
    }
}

pub(super) type Listed = std::result::Result<Arc<DirListing>, Errno>;
pub(super) type Meta = std::result::Result<EntryMeta, Errno>;
/// An entry's metadata and when its origin gave it (ns since the epoch).
pub(super) type Entry = std::result::Result<(EntryMeta, u64), Errno>;

impl Inner {
    /// The listing of `dir` from memory or the index, starting a background
    /// refresh when it is stale; `None` when it was never fetched.
    pub(super) fn cached_listing(self: &Arc<Self>, dir: &NodeKey) -> Option<Arc<DirListing>> {
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
    pub(super) fn refresh_in_background(self: &Arc<Self>, dir: &NodeKey) {
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
            // After the origin's queued read-ahead (and so after any
            // player's read); a refresh that gets no turn within the read
            // timeout is left for the next lookup, the cached listing
            // serving meanwhile.
            let turn = inner.cache.background_turn(&dir.origin);
            let Ok(_turn) = tokio::time::timeout(inner.config.read_timeout, turn).await else {
                debug!(origin = %dir.origin, dir = %dir.path, "listing refresh deferred: the origin is busy with reads");
                inner.refreshing.lock().remove(&dir);
                return;
            };
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
    pub(super) async fn list_origin(
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
        self.refuse_emptied_root(dir, &entries)?;
        Ok(self.store_listing(
            dir,
            Listing {
                fetched_at_ns,
                entries,
            },
        ))
    }

    /// An empty listing of an origin's root while the cache holds a
    /// non-empty one is an error (the origin looks unmounted), so that it is
    /// never stored over the cached tree.
    pub(super) fn refuse_emptied_root(
        &self,
        dir: &NodeKey,
        entries: &[DirEntry],
    ) -> std::result::Result<(), OriginError> {
        if !dir.path.is_root() || !entries.is_empty() {
            return Ok(());
        }
        let memo = self.memo.lock().get(dir).map(|l| l.entries.len());
        let held = match memo {
            Some(n) => n,
            None => match self.cache.index().listing(&dir.origin, &dir.path) {
                Ok(Some(l)) => l.entries.len(),
                _ => 0,
            },
        };
        if held == 0 {
            return Ok(());
        }
        Err(OriginError::Unavailable {
            origin: dir.origin.clone(),
            reason: format!(
                "its root lists empty but the cache holds {held} entries for it: it looks \
                 unmounted; the cached tree is served until it is back"
            ),
        })
    }

    pub(super) fn store_listing(&self, dir: &NodeKey, listing: Listing) -> Arc<DirListing> {
        // A cold fetch and a refresh of one directory may overlap; the
        // answer the origin gave last must win, whichever arrives last.
        if let Some(newer) = self.memo.lock().get(dir) {
            if newer.fetched_at_ns > listing.fetched_at_ns {
                return newer;
            }
        }
        let previous = self.memo.lock().get(dir).or_else(|| {
            let stored = self.cache.index().listing(&dir.origin, &dir.path).ok()??;
            Some(Arc::new(DirListing::new(stored)))
        });
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
        if let Some(previous) = previous {
            self.collect_vanished(dir, &previous, &l);
        }
        l
    }

    /// Drops what the index holds for entries of `dir` that `previous`
    /// listed and `now` does not: the manifest of a file gone from the
    /// origin, the listings and manifests of a directory tree gone from it.
    /// Only a successful listing gets here (an unreachable or unmounted
    /// origin never does), so this is a definite answer. Chunks are not
    /// touched: they may serve other files and age out by LRU.
    fn collect_vanished(&self, dir: &NodeKey, previous: &DirListing, now: &DirListing) {
        let index = self.cache.index();
        for entry in &previous.entries {
            if now.entry(&entry.name).is_some() {
                continue;
            }
            let Ok(path) = dir.path.join(&entry.name) else {
                continue;
            };
            let key = NodeKey {
                origin: dir.origin.clone(),
                path,
            };
            let dropped = match entry.meta.kind {
                EntryKind::File => index.forget_file(&key.origin, &key.path).map(|()| 1),
                EntryKind::Dir => {
                    self.memo.lock().remove(&key);
                    index.forget_tree(&key.origin, &key.path)
                }
                EntryKind::Symlink => Ok(0),
            };
            self.seen.lock().remove(&key);
            match dropped {
                Ok(n) => {
                    debug!(origin = %key.origin, path = %key.path, records = n, "gone from the origin; its cached records are dropped")
                }
                Err(e) => {
                    debug!(origin = %key.origin, path = %key.path, error = %e, "cannot drop the records of an entry gone from the origin")
                }
            }
        }
    }

    /// The listing of `dir`, asking the origin when nothing is cached, all
    /// within `read_timeout`. One origin listing of a directory runs at a
    /// time: a request that finds one running (a user's, or read ahead, see
    /// `readahead.rs`) waits for its outcome instead of asking again.
    pub(super) async fn listing(self: &Arc<Self>, dir: &NodeKey) -> Listed {
        if let Some(l) = self.cached_listing(dir) {
            return Ok(l);
        }
        let timeout = self.config.read_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let lead = match self.read_ahead.join_or_lead(dir) {
            Err(lead) => {
                // Stored by a listing that ended since the look above?
                if let Some(l) = self.cached_listing(dir) {
                    let listed = Ok(l);
                    lead.done(&listed);
                    return listed;
                }
                Some(lead)
            }
            Ok(running) => {
                match tokio::time::timeout_at(deadline, readahead::outcome(running)).await {
                    Ok(Some(Ok(l))) => return Ok(l),
                    Ok(Some(Err(errno))) if !errno::is_fault(errno) => return Err(errno),
                    // It met a fault, or ended without an answer: ask for
                    // ourselves, in what is left of the time.
                    Ok(_) => None,
                    Err(_) => {
                        warn!(origin = %dir.origin, dir = %dir.path, ?timeout, "cannot list a directory that is not cached: no answer in time; the origin may be hung");
                        return Err(Errno::EIO);
                    }
                }
            }
        };
        let listed = match tokio::time::timeout_at(deadline, self.list_origin(dir)).await {
            Ok(listed) => listed,
            Err(_) => Err(OriginError::Timeout {
                origin: dir.origin.clone(),
                timeout,
            }),
        };
        let listed = listed.map_err(|e| {
            let errno = errno::of_origin(&e);
            if errno::is_fault(errno) {
                warn!(origin = %dir.origin, dir = %dir.path, error = %e, "cannot list a directory that is not cached");
            } else {
                debug!(origin = %dir.origin, dir = %dir.path, error = %e, "cannot list a directory");
            }
            errno
        });
        if let Some(lead) = lead {
            lead.done(&listed);
        }
        listed
    }

    /// What MusicFS shows for an origin's root directory.
    pub(super) fn origin_root_meta(&self, origin: &OriginId) -> EntryMeta {
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

    pub(super) fn origin_root_key(&self, name: &OsStr) -> Option<NodeKey> {
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
    pub(super) async fn probe(
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
        let listed = match tokio::time::timeout_at(deadline, origin.list(&root)).await {
            Ok(Ok(entries)) => self.refuse_emptied_root(&key, &entries).map(|()| entries),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(OriginError::Timeout {
                origin: id.clone(),
                timeout: probe_timeout,
            }),
        };
        let reason = match listed {
            Ok(entries) => {
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
            Err(e) => e.to_string(),
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
    pub(super) fn with_listing<F>(&self, dir: NodeKey, f: F)
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
    pub(super) fn with_listing_of<F>(&self, dir: NodeKey, name: OsString, f: F)
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

    /// Runs `f` with the metadata of `key`: the newer of its parent's
    /// listing entry and what an open last confirmed (or made up, for an
    /// origin's root).
    pub(super) fn with_meta<F>(&self, key: NodeKey, f: F)
    where
        F: FnOnce(&Arc<Inner>, Meta) + Send + 'static,
    {
        self.with_entry(key, move |inner, entry| {
            f(inner, entry.map(|(meta, _)| meta))
        });
    }

    /// [`Self::with_meta`] with the time the metadata was known.
    pub(super) fn with_entry<F>(&self, key: NodeKey, f: F)
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
            origin: key.origin.clone(),
            path: parent,
        };
        self.with_listing_of(dir, name.clone(), move |inner, listed| {
            let entry = listed.and_then(|l| {
                let meta = l.get(&name).cloned().ok_or(Errno::ENOENT)?;
                Ok(inner.newest(&key, meta, l.fetched_at_ns))
            });
            f(inner, entry);
        });
    }
}
