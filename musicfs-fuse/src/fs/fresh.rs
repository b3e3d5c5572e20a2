//! Freshness with a bound: which version of a file an open binds to.
//!
//! Layer: part of the filesystem proper (see `fs.rs`), between the cached
//! listings and `Cache::open_file`.
//!
//! Invariants:
//! - A new open on a healthy origin never binds to a version that the
//!   origin replaced more than [`crate::FsConfig::freshness`] ago: when the
//!   newest thing known about the file (its listing entry, or its last check
//!   here) is older than that, the open asks the origin (`stat`) first. A
//!   deleted file is `ENOENT`, a file that became a directory `EISDIR`, and
//!   the parent's listing is refreshed so that `ls` agrees soon after.
//! - That check costs no round trip of its own on a cold file: the first
//!   read of the version the open expects starts beside it (an early read,
//!   [`FIRST_READ`] bytes through the cache, which starts the file's
//!   ingest), so the player's first bytes arrive one origin round trip
//!   after the open, not two. The read is bound to that version (the
//!   origin answers `Changed` for any other), and its handle is used only
//!   when the check confirms the same version; otherwise it is dropped,
//!   and what it fetched is of a version nobody binds to. So the check
//!   still decides, and no byte of the wrong version is ever served. It
//!   starts only when the index holds no manifest of another version (one
//!   the check may yet confirm, and which opening the listed version would
//!   drop).
//! - A hung or down NAS never slows an open of a cached track by more than
//!   [`crate::FsConfig::revalidate_wait`], once (opens at the same time wait
//!   together, not in turn): the check is skipped while
//!   the health monitor says the origin is unhealthy or while an earlier
//!   check of it is still unanswered; a check that does not answer in time
//!   is left running (so the health monitor sees the hang) and the open
//!   binds to the cached version.
//! - A fault (timeout, unreachable origin) or refused credentials (a
//!   revoked key, an expired token: nothing about the file) are never taken
//!   as an answer: the cached version is served. Only definite answers (not
//!   found, wrong kind, a file's permission) change what an open gets.
//! - The same bound holds for a name a listing lacks: a lookup, open or
//!   `getattr` that would answer `ENOENT` from a listing older than the
//!   bound lists the directory again first (under the same wait and health
//!   rules), so a file deleted and recreated on the origin, or a new one,
//!   is found by name within the bound rather than when the listing
//!   expires.
//!
//! A change that keeps size and mtime (`touch -r` after a rewrite) cannot
//! be seen this way; only hashing the file could (see the runbook).

use std::sync::Arc;

use fuser::Errno;
use musicfs_cas::FileHandle;
use musicfs_origins::{EntryKind, EntryMeta, FileVersion, OriginError};
use tracing::{debug, info, warn};

use super::listings::DirListing;
use super::{duration_ns, now_ns, Inner, CLOCK_SKEW};
use crate::errno;
use crate::inode::NodeKey;

/// What an early read asks for: the kernel's first request of a file a
/// player starts (its initial read-ahead window), and the size of the
/// ingest's first origin request.
pub(super) const FIRST_READ: u64 = 128 << 10;

impl Inner {
    /// A handle of `key` bound to `version` (the version of the inode being
    /// opened), given the entry its parent's listing holds (`listed`,
    /// fetched at `listed_ns`): checked with the origin when that is older
    /// than the freshness bound, with the first read started beside the
    /// check (see the module docs). `ESTALE` when the file is another
    /// version now: the kernel looks the name up again and gets the new
    /// version's inode.
    pub(super) async fn open_bound(
        self: &Arc<Self>,
        key: &NodeKey,
        listed: EntryMeta,
        listed_ns: u64,
        version: &FileVersion,
    ) -> std::result::Result<FileHandle, Errno> {
        let (meta, known_ns) = self.newest(key, listed, listed_ns);
        let meta = if self.within_freshness(known_ns) || !self.may_ask(key) {
            meta
        } else {
            let early = self.start_early_read(key, &meta, version).await;
            let meta = self.confirm(key, meta).await?;
            match early {
                Some(handle) if meta.version() == *version => return Ok(handle),
                _ => meta,
            }
        };
        if meta.version() != *version {
            debug!(origin = %key.origin, path = %key.path, "open of an outdated version; the kernel looks the name up again");
            return Err(Errno::ESTALE);
        }
        self.cache
            .open_file(&key.origin, &key.path, &meta)
            .await
            .map_err(|e| {
                warn!(origin = %key.origin, path = %key.path, error = %e, "cannot open a file");
                errno::of_cas(&e)
            })
    }

    /// A handle of `meta`, the version an open expects, with its first
    /// read started; `None` when `meta` is not `version` (the open answers
    /// `ESTALE` whatever the check says), empty, or the index holds a
    /// manifest of another version. The handle is opened before the check
    /// is asked, so that it can never be opened after the open of a newer
    /// version the check leads to (opening an older version after a newer
    /// one would make the newer one's file stale).
    async fn start_early_read(
        self: &Arc<Self>,
        key: &NodeKey,
        meta: &EntryMeta,
        version: &FileVersion,
    ) -> Option<FileHandle> {
        if meta.version() != *version || meta.size == 0 {
            return None;
        }
        match self.cache.index().manifest(&key.origin, &key.path) {
            Ok(None) => {}
            Ok(Some(m)) if m.version == *version => {}
            // Another version's chunks, or an index that cannot say: the
            // open goes the plain way.
            Ok(Some(_)) | Err(_) => return None,
        }
        let handle = match self.cache.open_file(&key.origin, &key.path, meta).await {
            Ok(handle) => handle,
            // The open after the check tries again and reports it.
            Err(e) => {
                debug!(origin = %key.origin, path = %key.path, error = %e, "cannot open a file for its early read");
                return None;
            }
        };
        let reader = handle.clone();
        let timeout = self.config.read_timeout;
        let key = key.clone();
        self.rt.spawn(async move {
            // The bytes land in the file's ingest, where the player's
            // first read finds them; this handle keeps the ingest going
            // until they are in. An error here (the file changed: the
            // check decides) is the open's to find, not this task's.
            match tokio::time::timeout(timeout, reader.read(0, FIRST_READ)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    debug!(origin = %key.origin, path = %key.path, error = %e, "the early read of a file failed")
                }
                Err(_) => {
                    debug!(origin = %key.origin, path = %key.path, ?timeout, "the early read of a file timed out")
                }
            }
        });
        Some(handle)
    }

    /// The version of `key` the origin says it has now, for an open that
    /// knows `meta` (older than the bound); `meta` when the origin cannot
    /// answer in time (see the module docs).
    async fn confirm(
        self: &Arc<Self>,
        key: &NodeKey,
        meta: EntryMeta,
    ) -> std::result::Result<EntryMeta, Errno> {
        let Some(origin) = self.by_id.get(&key.origin).cloned() else {
            return Ok(meta);
        };
        let inner = Arc::clone(self);
        let task_key = key.clone();
        // A task of its own, so that an answer arriving after the wait
        // below still lands, and a hang goes on being seen by the health
        // monitor's watch.
        let check = self.rt.spawn(async move {
            let asked_ns = now_ns();
            let answer =
                tokio::time::timeout(inner.config.read_timeout, origin.stat(&task_key.path)).await;
            inner.answered(&task_key.origin);
            match answer {
                Ok(Ok(now)) => {
                    inner
                        .seen
                        .lock()
                        .confirmed(&task_key, now.clone(), asked_ns);
                    Ok(now)
                }
                Ok(Err(e)) => {
                    if e.is_not_found() {
                        inner.seen.lock().remove(&task_key);
                    }
                    Err(e)
                }
                Err(_) => Err(OriginError::Timeout {
                    origin: task_key.origin.clone(),
                    timeout: inner.config.read_timeout,
                }),
            }
        });
        let deadline = self.wait_deadline(&key.origin);
        let answer = match tokio::time::timeout_at(deadline, check).await {
            Ok(Ok(answer)) => answer,
            // The task panicked or was cancelled at shutdown.
            Ok(Err(_)) => return Ok(meta),
            Err(_) => {
                info!(origin = %key.origin, path = %key.path, wait = ?self.config.revalidate_wait, "the origin did not confirm a file in time; opening the cached version");
                self.unanswered
                    .lock()
                    .insert(key.origin.clone(), std::time::Instant::now());
                return Ok(meta);
            }
        };
        match answer {
            Ok(now) if now.kind == EntryKind::File => {
                if !now.same_version(&meta) {
                    debug!(origin = %key.origin, path = %key.path, old = ?meta, new = ?now, "file changed on the origin; opening the new version");
                    self.refresh_parent(key);
                }
                Ok(now)
            }
            Ok(_) => {
                self.refresh_parent(key);
                Err(Errno::EISDIR)
            }
            Err(e) => {
                let errno = errno::of_origin(&e);
                // Credentials refused (a revoked key, an expired token) say
                // nothing about the file: like a fault, the cached version
                // is served, and only what is not cached fails (EACCES).
                if errno::is_fault(errno) || matches!(e, OriginError::AccessDenied { .. }) {
                    debug!(origin = %key.origin, path = %key.path, error = %e, "cannot confirm a file; opening the cached version");
                    Ok(meta)
                } else {
                    self.refresh_parent(key);
                    Err(errno)
                }
            }
        }
    }

    /// Until when a request may wait for an answer of `origin`: at most
    /// `revalidate_wait` after the oldest question to it still waiting, so
    /// that many opens at once behind a hung NAS wait that long together,
    /// not one after another.
    fn wait_deadline(&self, origin: &musicfs_origins::OriginId) -> tokio::time::Instant {
        let mut waiting = self.waiting.lock();
        let since = *waiting
            .entry(origin.clone())
            .or_insert_with(tokio::time::Instant::now);
        since + self.config.revalidate_wait
    }

    /// `origin` answered a question: nobody waits on it any more.
    fn answered(&self, origin: &musicfs_origins::OriginId) {
        self.unanswered.lock().remove(origin);
        self.waiting.lock().remove(origin);
    }

    /// Whether something the origin said at `known_ns` (wall clock) may
    /// still be served without asking again.
    fn within_freshness(&self, known_ns: u64) -> bool {
        let now = now_ns();
        known_ns <= now.saturating_add(duration_ns(CLOCK_SKEW))
            && now.saturating_sub(known_ns) <= duration_ns(self.config.freshness)
    }

    /// Whether a lookup that `listed` cannot answer must list `dir` again
    /// before saying `ENOENT` (see [`Self::relist`]).
    pub(super) fn must_relist(&self, dir: &NodeKey, listed: &DirListing) -> bool {
        !self.within_freshness(listed.fetched_at_ns) && self.may_ask(dir)
    }

    /// `dir` listed on its origin now, waiting at most `revalidate_wait`;
    /// `listed` when the origin does not answer in time or cannot list it.
    /// A listing that arrives after the wait is still stored.
    pub(super) async fn relist(
        self: &Arc<Self>,
        dir: &NodeKey,
        listed: Arc<DirListing>,
    ) -> Arc<DirListing> {
        let inner = Arc::clone(self);
        let task_dir = dir.clone();
        let list = self.rt.spawn(async move {
            let answer = inner.list_origin(&task_dir).await;
            inner.answered(&task_dir.origin);
            answer
        });
        let deadline = self.wait_deadline(&dir.origin);
        match tokio::time::timeout_at(deadline, list).await {
            Ok(Ok(Ok(fresh))) => fresh,
            Ok(Ok(Err(e))) => {
                debug!(origin = %dir.origin, dir = %dir.path, error = %e, "cannot list a directory again; answering from the cached listing");
                listed
            }
            // The task panicked or was cancelled at shutdown.
            Ok(Err(_)) => listed,
            Err(_) => {
                info!(origin = %dir.origin, dir = %dir.path, wait = ?self.config.revalidate_wait, "the origin did not list a directory in time; answering from the cached listing");
                self.unanswered
                    .lock()
                    .insert(dir.origin.clone(), std::time::Instant::now());
                listed
            }
        }
    }

    /// The newer of a listing entry and what an open here last confirmed,
    /// with the time it was known.
    pub(super) fn newest(
        &self,
        key: &NodeKey,
        listed: EntryMeta,
        listed_ns: u64,
    ) -> (EntryMeta, u64) {
        match self.seen.lock().get(key) {
            Some(seen) if seen.checked_ns > listed_ns => (seen.meta.clone(), seen.checked_ns),
            _ => (listed, listed_ns),
        }
    }

    /// Whether an open may wait for the origin: not while the health
    /// monitor says it is down, nor while an earlier check of it is still
    /// unanswered.
    pub(super) fn may_ask(&self, key: &NodeKey) -> bool {
        if self.unanswered.lock().contains_key(&key.origin) {
            return false;
        }
        let health = self.health.read();
        !health
            .as_ref()
            .and_then(|h| h.status(&key.origin))
            .is_some_and(|s| s.state == musicfs_origins::HealthState::Unhealthy)
    }

    /// Refreshes the listing `key` is in, now rather than when it expires.
    pub(super) fn refresh_parent(self: &Arc<Self>, key: &NodeKey) {
        if let Some(parent) = key.path.parent() {
            self.refresh_in_background(&NodeKey {
                origin: key.origin.clone(),
                path: parent,
            });
        }
    }
}
