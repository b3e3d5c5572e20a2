//! Verified chunk reads: every cached byte is checked before it is served.
//!
//! Layer: inside the cache (see `cache.rs`), between the read path and the
//! chunk store. The first read of a chunk reads and hashes all of it; that
//! also gives its hash tree ([`crate::tree`]), kept in memory, so later
//! small reads of it (a seek) read and check only the 16 KiB groups they
//! touch. The last few whole chunks a file read stay in memory with the
//! open file, so the several kernel requests that fall in one chunk read
//! and hash it once. A chunk that is missing or damaged is re-fetched by
//! its own byte range of the handle's version and checked against its
//! name; a failing cache disk is read through.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tracing::{debug, warn};

use crate::manifest::ChunkRef;
use crate::tree::ChunkTree;
use crate::{CasError, ChunkId, Result};

use super::link::Class;
use super::*;

/// Whole verified chunks an open file keeps after reading them: a kernel
/// request (128 KiB to 1 MiB) is smaller than a chunk (1 MiB on average),
/// and read-ahead has a few requests in flight at once.
pub(super) const RECENT_CHUNKS: usize = 4;
/// How long a blocking reader waits for another one reading the same chunk
/// (a few ms on a working disk) before it declines.
pub(super) const SLOT_WAIT: Duration = Duration::from_millis(500);
/// A piece of a chunk at most this fraction of it is read through the
/// chunk's hash tree when that is known, instead of whole.
pub(super) const SMALL_PIECE_DIVISOR: usize = 4;

impl FileHandle {
    /// Bytes `[from, to)` of a cached chunk that starts at `start` in the
    /// file, verified: from the file's recent chunks, else (a small piece of
    /// a chunk whose tree is known) a range read checked against the tree,
    /// else a whole-chunk read, which is kept in the recent chunks. True
    /// beside the bytes when they had to come from the origin.
    pub(super) async fn chunk_piece(
        &self,
        start: u64,
        chunk: ChunkRef,
        from: usize,
        to: usize,
    ) -> Result<(Bytes, bool)> {
        let slot = match self.recent_or_tree(chunk, from, to) {
            Source::Recent(slot) => Some(slot),
            Source::Tree(tree) => {
                let (a, b) = tree.aligned(from, to);
                let read = self.cache.store.read_unverified(chunk.id, a as u64, b - a);
                if let Some(piece) = self.checked_piece(&tree, from, to, read.await) {
                    return Ok((piece, false));
                }
                // The range did not check: the whole-chunk path finds out
                // what is wrong with the chunk and repairs it.
                None
            }
        };
        let held = slot.as_ref().and_then(|s| s.lock().clone());
        let (whole, fetched) = match held {
            Some(whole) => (whole, false),
            None => {
                let (whole, fetched) = self.whole_chunk(start, chunk).await?;
                if let Some(slot) = slot {
                    *slot.lock() = Some(whole.clone());
                }
                (whole, fetched)
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
        Ok((whole.slice(from..to), fetched))
    }

    /// Where a piece of a chunk comes from: the file's recent chunks (a
    /// slot that is filled, or that the caller fills), or a range read
    /// checked against the chunk's tree (a small piece of a chunk whose
    /// tree is known).
    pub(super) fn recent_or_tree(&self, chunk: ChunkRef, from: usize, to: usize) -> Source {
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
    pub(super) fn checked_piece(
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
    pub(super) fn chunk_piece_blocking(
        &self,
        chunk: ChunkRef,
        from: usize,
        to: usize,
    ) -> Option<Bytes> {
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
    pub(super) async fn whole_chunk(&self, start: u64, chunk: ChunkRef) -> Result<(Bytes, bool)> {
        let len = chunk.len as usize;
        // One byte more than the chunk: a longer file is damaged too.
        if let Ok(data) = self.cache.store.read_unverified(chunk.id, 0, len + 1).await {
            if data.len() == len {
                if let Some(tree) = ChunkTree::build(chunk.id, &data) {
                    self.cache.trees.lock().put(Arc::new(tree));
                    return Ok((Bytes::from(data), false));
                }
            }
        }
        self.cache.trees.lock().remove(&chunk.id);
        self.chunk_bytes(start, chunk).await
    }

    /// A verified chunk, re-fetched from the origin when the cached copy is
    /// damaged or gone, or read through when the cache disk fails; true
    /// beside the bytes when they came from the origin.
    ///
    /// A chunk the store no longer knows was evicted: fetching it again is
    /// ordinary work (debug). A chunk it knew that turns out missing or
    /// damaged is damage to the cache disk (WARN).
    pub(super) async fn chunk_bytes(&self, start: u64, chunk: ChunkRef) -> Result<(Bytes, bool)> {
        let known = self.cache.store.contains(&chunk.id);
        match self.cache.store.get(chunk.id).await {
            Ok(b) => Ok((b, false)),
            Err(e) if e.is_refetchable() => {
                let counters = &self.cache.counters;
                if !known && matches!(e, CasError::ChunkMissing { .. }) {
                    debug!(chunk = %chunk.id, path = %self.file.path, "chunk was evicted; fetching it again");
                    counters.refetched_evicted.fetch_add(1, Ordering::Relaxed);
                } else {
                    warn!(chunk = %chunk.id, path = %self.file.path, error = %e, "cached chunk is damaged; re-fetching it from the origin");
                    counters.refetched_corrupt.fetch_add(1, Ordering::Relaxed);
                }
                let r = self
                    .cache
                    .refetch_chunk(
                        &self.file.origin,
                        &self.file.path,
                        &self.file.version,
                        start,
                        chunk,
                        Class::User,
                    )
                    .await;
                self.file.stale_on_change(&self.cache, &r);
                r.map(|b| (b, true))
            }
            Err(
                e @ (CasError::Io { .. }
                | CasError::TooManyOpenFiles { .. }
                | CasError::CacheUnavailable { .. }),
            ) => {
                debug!(chunk = %chunk.id, error = %e, "cache read failed; reading the chunk from the origin");
                let read = self
                    .cache
                    .origin_read(
                        &self.file.origin,
                        &self.file.path,
                        &self.file.version,
                        start,
                        u64::from(chunk.len),
                        Class::User,
                    )
                    .await;
                let checked = read.and_then(|data| {
                    self.cache
                        .check_chunk(
                            &self.file.origin,
                            &self.file.path,
                            &self.file.version,
                            chunk,
                            &data,
                        )
                        .map(|()| data)
                });
                self.file.stale_on_change(&self.cache, &checked);
                checked.map(|b| (b, true))
            }
            Err(e) => Err(e),
        }
    }
}

/// Where a piece of a cached chunk is read from.
pub(super) enum Source {
    /// A whole chunk in the file's recent chunks (filled, or to fill).
    Recent(Slot),
    /// A range of the chunk file, checked against this tree.
    Tree(Arc<ChunkTree>),
}
