//! The ingest: one ordered background stream per open file that reads the
//! origin, cuts chunks, stores them and extends the manifest.
//!
//! Layer: inside the cache (see `cache.rs`). Chunk boundaries need the
//! bytes in order, so each open file has at most one ingest. It reads the
//! origin sequentially in growing blocks (128 KiB first, so a cold first
//! read costs about one small origin request), runs `readahead` bytes ahead
//! of the furthest sequential read and then pauses, so playing the first
//! seconds of a track never downloads the whole track. Every read is of the
//! handle's version; a change found on the way makes the file stale and
//! ends the ingest, and a completed file is checked once more.
//!
//! The states of an ingest ([`Ingest`], changed only by [`Ingest::on`]):
//!
//! ```text
//!                 Started                     Finished
//!   Idle ─────────────────────► Running ─────────────────► Done
//!    ▲  ◄──────────────────────  │   │
//!    │         Paused             │   │ StoreDown (cache disk refused a chunk)
//!    │                            │   ▼
//!    │                            │  Stopped ──Started (store healthy again)──► Running
//!    │                            │ Failed (origin read failed, file changed,
//!    │                            ▼         chunk did not fit; from any state)
//!    └──────────── Failed{at} ──Started (INGEST_RETRY_AFTER later)──► Running
//! ```
//!
//! Readers extend `want_until` under the state lock the loop decides
//! under, so no read is left waiting for an ingest that went idle.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use bytes::{Buf, Bytes, BytesMut};
use tracing::{debug, info, warn};

use crate::manifest::ChunkRef;
use crate::{CasError, ChunkId, Result};

use super::*;

/// First ingest request; doubles per request up to [`MAX_BLOCK`].
pub(super) const FIRST_BLOCK: u64 = 128 * 1024;
pub(super) const MAX_BLOCK: u64 = 2 * 1024 * 1024;

/// Chunks one ingest stores at once while it reads on (see `run_ingest`).
pub(super) const STORES_IN_FLIGHT: usize = 2;

/// Counts one running ingest in [`CacheInner::ingests`] while it lives, so
/// the count drops however the task ends (done, failed, cancelled).
pub(super) struct IngestRunning(Arc<CacheInner>);

impl IngestRunning {
    pub(super) fn new(cache: &Arc<CacheInner>) -> Self {
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
pub(super) type Storing = (tokio::task::JoinHandle<Result<ChunkId>>, usize);

/// What the ingest does next.
pub(super) enum IngestStep {
    /// Store this chunk, cut from the buffer.
    Store(Bytes),
    /// Wait for the oldest store and add it to the manifest.
    Land,
    /// Read `(from, len)` from the origin.
    Read(u64, u64),
    /// The whole file is cached: check its version once more, then end.
    Finished,
}

/// The ingest loop of one open file; see the module docs.
///
/// Three stages overlap: reading the origin, cutting chunks, and storing
/// them (writing a chunk file is the slowest step). Up to
/// [`STORES_IN_FLIGHT`] chunks are stored at once while the loop reads on;
/// they join the manifest strictly in file order, and their bytes stay in
/// the buffer (serving readers) until they have.
pub(super) async fn run_ingest(weak: Weak<OpenFile>, cache: Arc<CacheInner>) {
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
                st.ingest_event(IngestEvent::Finished);
                drop(st);
                debug!(path = %file.path, "file fully cached");
                file.progress.send_modify(|v| *v += 1);
                IngestStep::Finished
            } else {
                let stale = st.stale;
                st.ingest_event(if stale {
                    IngestEvent::Failed
                } else {
                    IngestEvent::Paused
                });
                drop(st);
                if stale {
                    // A reader may have started waiting after the change
                    // was announced, while this ingest still ran: it must
                    // see that the ingest is over. (Pausing needs no word:
                    // no reader waits while nothing more is wanted.)
                    file.progress.send_modify(|v| *v += 1);
                }
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
            IngestStep::Finished => {
                recheck_version(&file, &cache).await;
                return;
            }
        };
        let origin = file.origin.clone();
        let path = file.path.clone();
        let version = file.version.clone();
        // Do not keep the file alive across a possibly long origin call.
        drop(file);
        let read = cache.origin_read(&origin, &path, &version, from, len).await;
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
                        st.ingest_event(IngestEvent::Failed);
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
            Err(CasError::OriginChanged { reason, .. }) => {
                // Failed first: going stale wakes the waiting readers, who
                // must then find no ingest to wait for.
                file.state.lock().ingest_event(IngestEvent::Failed);
                file.go_stale(&cache, &reason);
                return;
            }
            Err(e) => {
                warn!(path = %path, error = %e, "ingest read failed; reads go to the origin directly for now");
                file.state.lock().ingest_event(IngestEvent::Failed);
                file.progress.send_modify(|v| *v += 1);
                return;
            }
        }
    }
}

/// The ingest has cached a whole file: one more look at the origin's
/// version. Every block was read conditionally on the version already; this
/// also catches an origin that cannot check versions on reads. A changed
/// version only drops the stored manifest, so no later open uses it; this
/// handle's bytes all came from its own version and stay valid for it.
pub(super) async fn recheck_version(file: &OpenFile, cache: &CacheInner) {
    let stat = file.origin.stat(&file.path);
    match tokio::time::timeout(cache.config.origin_timeout, stat).await {
        Ok(Ok(meta)) if !file.version.matches(&meta) => {
            info!(path = %file.path, cached = %file.version, now = %meta.version(), "file changed on the origin while it was cached; its cached copy will not be used again");
            cache.drop_manifest(file.origin.id(), &file.path, &file.version);
        }
        Ok(Err(e)) if e.is_not_found() => {
            cache.drop_manifest(file.origin.id(), &file.path, &file.version);
        }
        // Unchanged, or the origin cannot say right now: keep it.
        _ => {}
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
pub(super) fn append(tail: &mut BytesMut, data: &[u8], max_chunk: usize) {
    if tail.capacity() - tail.len() < data.len() {
        let want = max_chunk + 2 * MAX_BLOCK as usize;
        let mut fresh = BytesMut::with_capacity(want.max(tail.len() + data.len()));
        fresh.extend_from_slice(tail);
        *tail = fresh;
    }
    tail.extend_from_slice(data);
}

pub(super) fn spawn_store(cache: &CacheInner, chunk: Bytes) -> Storing {
    let len = chunk.len();
    let store = cache.store.clone();
    (tokio::spawn(async move { store.put(chunk).await }), len)
}

/// Waits for the oldest chunk store and appends the chunk to the manifest
/// (persisting it), dropping it from the cut chunks. False when the ingest
/// must stop: the store failed (the state says how), or the file went
/// stale.
pub(super) async fn land(file: &OpenFile, cache: &CacheInner, (store, len): Storing) -> bool {
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
            file.state.lock().ingest_event(match e {
                CasError::CacheUnavailable { .. } => IngestEvent::StoreDown,
                _ => IngestEvent::Failed,
            });
            file.progress.send_modify(|v| *v += 1);
            return false;
        }
    };
    let snapshot = {
        let mut st = file.state.lock();
        if st.stale || st.cut.front().map(Bytes::len) != Some(len) {
            st.ingest_event(IngestEvent::Failed);
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
            st.ingest_event(IngestEvent::Failed);
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
