//! The ingest: one ordered background stream per open file that reads the
//! origin, cuts chunks, stores them and extends the manifest.
//!
//! Layer: inside the cache (see `cache.rs`). Chunk boundaries need the
//! bytes in order, so each open file has at most one ingest. It reads the
//! origin in consecutive ranges of growing size (128 KiB first, so a cold
//! first read costs about one small origin request, doubling to 2 MiB),
//! with several ranges in flight at once over a long link: about
//! bandwidth × round trip of the origin's link (`link.rs`), at most
//! 8 ranges and 16 MiB (`link.rs`). Their answers are consumed strictly
//! in file order. It runs `readahead` bytes ahead of the furthest
//! sequential read (no range is asked for past that) and then pauses, so
//! playing the first seconds of a track never downloads the whole track.
//! A range a reader waits for goes out as a user read; the rest is
//! read-ahead, which yields to user reads at the origin's link. Every read
//! is of the handle's version; a change found on the way makes the file
//! stale and ends the ingest, dropping the ranges still in flight, so no
//! bytes of two versions are ever combined. A completed file is checked
//! against the origin's whole-file digest where it states one (`digest.rs`)
//! and its version is checked once more.
//!
//! The states of an ingest ([`Ingest`], changed only by [`Ingest::on`]):
//!
//! ```text
//!                 Started                     Finished
//!   Idle ─────────────────────► Running ─────────────────► Done
//!    ▲  ◄──────────────────────  │   │    (then the whole-file check:
//!    │         Paused             │   │     a mismatch drops the download
//!    │                            │   │     and fails the file's reads)
//!    │                            │   │ StoreDown (cache disk refused a chunk)
//!    │                            │   ▼
//!    │                            │  Stopped ──Started (store healthy again)──► Running
//!    │                            │ Failed (origin read failed, file changed,
//!    │                            ▼         chunk did not fit; from any state;
//!    │                                      the ranges in flight are dropped)
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

use super::link::{Class, MAX_REQUESTS};
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

/// One origin range in flight. Dropping it cancels the read (the ingest
/// ended: nothing will consume its bytes).
pub(super) struct Fetch {
    from: u64,
    len: u64,
    task: tokio::task::JoinHandle<Result<Bytes>>,
}

impl Drop for Fetch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the ingest does next.
pub(super) enum IngestStep {
    /// Store this chunk, cut from the buffer.
    Store(Bytes),
    /// Wait for the oldest store and add it to the manifest.
    Land,
    /// Ask the origin for `(from, len)`, as a read of this class.
    Issue(u64, u64, Class),
    /// Wait for the oldest range in flight (or the oldest store, whichever
    /// is first) and take it in.
    Consume,
    /// The whole file is cached: check it, then end.
    Finished,
    /// Nothing more is wanted for now, or the file went stale: the state
    /// says which; the run ends.
    End,
}

/// What came back first while consuming.
enum Arrived {
    Range(Result<Bytes>),
    Stored(Result<ChunkId>),
}

/// The ingest loop of one open file; see the module docs.
///
/// Four stages overlap: the origin ranges in flight, consuming their
/// answers in order, cutting chunks, and storing them (writing a chunk file
/// is the slowest local step). Up to [`STORES_IN_FLIGHT`] chunks are stored
/// at once; they join the manifest strictly in file order, and their bytes
/// stay in the buffer (serving readers) until they have.
pub(super) async fn run_ingest(weak: Weak<OpenFile>, cache: Arc<CacheInner>) {
    let mut block = FIRST_BLOCK;
    let mut storing: VecDeque<Storing> = VecDeque::new();
    // In file order, the first starting at the end of the buffer.
    let mut fetches: VecDeque<Fetch> = VecDeque::new();
    // The file is kept alive between steps that only store what is already
    // buffered, so bytes read from the origin get cached even when the
    // reader closes the file right after reading them (the end of a track);
    // it is let go only while waiting for the origin.
    let Some(file) = weak.upgrade() else { return };
    let _on_link = file.link.ingest_running();
    // Chunks cut by an earlier run that stopped before they were stored:
    // store them first (again; one already stored dedups).
    let cut: Vec<Bytes> = file.state.lock().cut.iter().cloned().collect();
    for chunk in cut {
        storing.push_back(spawn_store(&cache, chunk));
    }
    let mut held = Some(file);
    loop {
        let Some(file) = held.take().or_else(|| weak.upgrade()) else {
            return;
        };
        while storing.front().is_some_and(|(h, _)| h.is_finished()) {
            if let Some(done) = storing.pop_front() {
                if !land(&file, &cache, done).await {
                    return;
                }
            }
        }
        match decide(&file, &cache, &storing, &fetches, block) {
            IngestStep::Store(chunk) => {
                storing.push_back(spawn_store(&cache, chunk));
                held = Some(file);
            }
            IngestStep::Land => {
                if let Some(oldest) = storing.pop_front() {
                    if !land(&file, &cache, oldest).await {
                        return;
                    }
                }
                held = Some(file);
            }
            IngestStep::Issue(from, len, class)
                if fetches.is_empty() && file.link.window() <= len =>
            {
                // The only range the window allows in flight: read it right
                // here, so an origin that answers at once (local disk,
                // memory) costs no hand-off between tasks.
                block = (block * 2).min(MAX_BLOCK);
                let range = fetch_range(&cache, &file, from, len, class);
                // Do not keep the file alive across a possibly long wait.
                drop(file);
                let read = range.await;
                let Some(file) = weak.upgrade() else { return };
                if !take_in(&file, &cache, from, read) {
                    return;
                }
                held = Some(file);
                // As after any range taken in (see below).
                tokio::task::yield_now().await;
            }
            IngestStep::Issue(from, len, class) => {
                let task = tokio::spawn(fetch_range(&cache, &file, from, len, class));
                fetches.push_back(Fetch { from, len, task });
                block = (block * 2).min(MAX_BLOCK);
                held = Some(file);
            }
            IngestStep::Consume => {
                // Do not keep the file alive across a possibly long wait.
                drop(file);
                let Some(front) = fetches.front_mut() else {
                    continue;
                };
                let arrived = match storing.front_mut() {
                    Some((store, _)) => tokio::select! {
                        r = &mut front.task => Arrived::Range(joined_range(r)),
                        s = store => Arrived::Stored(joined_store(s)),
                    },
                    None => Arrived::Range(joined_range((&mut front.task).await)),
                };
                let Some(file) = weak.upgrade() else { return };
                match arrived {
                    Arrived::Stored(stored) => {
                        if let Some((_, len)) = storing.pop_front() {
                            if !landed(&file, &cache, stored, len) {
                                return;
                            }
                        }
                        held = Some(file);
                    }
                    Arrived::Range(read) => {
                        let Some(fetch) = fetches.pop_front() else {
                            return;
                        };
                        if !take_in(&file, &cache, fetch.from, read) {
                            return;
                        }
                        // The reader may close as soon as it has these
                        // bytes; they are stored all the same.
                        held = Some(file);
                        // Let the reader just woken run before cutting and
                        // reading on: an origin that answers at once
                        // (memory, page cache) would otherwise keep this
                        // worker busy for the whole read-ahead while the
                        // first bytes wait in the queue.
                        tokio::task::yield_now().await;
                    }
                }
            }
            IngestStep::Finished => {
                if digest::finish(&file, &cache).await {
                    recheck_version(&file, &cache).await;
                }
                return;
            }
            IngestStep::End => return,
        }
    }
}

/// The next step, decided under the lock readers extend `want_until`
/// under, so no read is left waiting for an ingest that went idle.
fn decide(
    file: &OpenFile,
    cache: &CacheInner,
    storing: &VecDeque<Storing>,
    fetches: &VecDeque<Fetch>,
    block: u64,
) -> IngestStep {
    let params = cache.config.chunk_params;
    let size = file.version.size;
    let mut st = file.state.lock();
    let buffered_end = st.buffered_end();
    let issued_end = fetches.back().map_or(buffered_end, |f| f.from + f.len);
    let eof = buffered_end == size;
    let uncut = st.tail.len();
    // Exactly when `next_cut` has an answer.
    let cuttable = !st.stale && (uncut >= params.max as usize || (eof && uncut > 0));
    let in_flight = issued_end - buffered_end;
    let may_issue = !st.stale
        && issued_end < size
        && issued_end < st.want_until
        && (fetches.is_empty() || (fetches.len() < MAX_REQUESTS && in_flight < file.link.window()));
    if cuttable && storing.len() < STORES_IN_FLIGHT {
        let n = params.next_cut(&st.tail, eof).unwrap_or(uncut);
        // Copied out so the tail's buffer is reused for the next origin
        // reads instead of growing.
        let chunk = Bytes::copy_from_slice(&st.tail[..n]);
        st.tail.advance(n);
        st.cut_len += n as u64;
        st.cut.push_back(chunk.clone());
        IngestStep::Store(chunk)
    } else if cuttable || (!storing.is_empty() && st.stale) {
        // Storing is the bottleneck (taking in more would only grow the
        // buffer); or the file went stale, which landing finds out.
        IngestStep::Land
    } else if may_issue {
        let len = if fetches.is_empty() {
            // At least what the reads waiting for the next bytes asked for
            // (up to the largest block), so a first read costs one origin
            // round trip; not what read-ahead further out asked for, which
            // would only delay the first bytes.
            let asked = st.need_end.saturating_sub(buffered_end).min(MAX_BLOCK);
            block.max(asked)
        } else {
            block
        };
        let len = len.min(size - issued_end);
        let class = if *file.waiting.borrow() > issued_end {
            Class::User
        } else {
            Class::ReadAhead
        };
        IngestStep::Issue(issued_end, len, class)
    } else if !fetches.is_empty() {
        IngestStep::Consume
    } else if !storing.is_empty() {
        IngestStep::Land
    } else if eof && !st.stale && st.tail.is_empty() && st.cut.is_empty() {
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
            // A reader may have started waiting after the change was
            // announced, while this ingest still ran: it must see that the
            // ingest is over. (Pausing needs no word: no reader waits while
            // nothing more is wanted.)
            file.progress.send_modify(|v| *v += 1);
        }
        IngestStep::End
    }
}

/// Reads `(from, len)` of the file's version from the origin; holds
/// nothing of the file. A read-ahead range waits for a place at the
/// origin's link, and goes out as a user read once a reader waits for its
/// bytes.
fn fetch_range(
    cache: &Arc<CacheInner>,
    file: &OpenFile,
    from: u64,
    len: u64,
    class: Class,
) -> impl std::future::Future<Output = Result<Bytes>> + Send + 'static {
    let cache = Arc::clone(cache);
    let link = Arc::clone(&file.link);
    let waiting = file.waiting.subscribe();
    let origin = file.origin.clone();
    let path = file.path.clone();
    let version = file.version.clone();
    async move {
        let slot = match class {
            Class::ReadAhead => link.acquire_readahead(waiting, from).await,
            class => link.acquire(class).await,
        };
        cache
            .read_in_slot(&slot, &origin, &path, &version, from, len)
            .await
    }
}

fn joined_range(r: std::result::Result<Result<Bytes>, tokio::task::JoinError>) -> Result<Bytes> {
    r.unwrap_or_else(|e| {
        Err(CasError::CacheUnavailable {
            reason: format!("an origin read task failed: {e}"),
        })
    })
}

fn joined_store(
    r: std::result::Result<Result<ChunkId>, tokio::task::JoinError>,
) -> Result<ChunkId> {
    r.unwrap_or_else(|e| {
        Err(CasError::CacheUnavailable {
            reason: format!("a chunk store task failed: {e}"),
        })
    })
}

/// Takes the answer for the oldest range in: appends it to the buffer
/// (waking the readers), feeds the whole-file check. False when the ingest
/// must stop (the state says why); the ranges still in flight are then
/// dropped with it.
fn take_in(file: &OpenFile, cache: &CacheInner, from: u64, read: Result<Bytes>) -> bool {
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
                    return false;
                }
                append(&mut st.tail, &data, cache.config.chunk_params.max as usize);
            }
            file.progress.send_modify(|v| *v += 1);
            // After the readers are woken: they need not wait for it.
            if let Some(check) = &file.whole {
                check.feed(from, &data);
            }
            true
        }
        Err(CasError::OriginChanged { reason, .. }) => {
            // Failed first: going stale wakes the waiting readers, who
            // must then find no ingest to wait for.
            file.state.lock().ingest_event(IngestEvent::Failed);
            file.go_stale(cache, &reason);
            false
        }
        Err(e) => {
            warn!(path = %file.path, error = %e, "ingest read failed; reads go to the origin directly for now");
            file.state.lock().ingest_event(IngestEvent::Failed);
            file.progress.send_modify(|v| *v += 1);
            false
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
/// being ingested would hold tens of MiB. The ingest takes answers in only
/// while less than `max_chunk` is uncut, so the tail never needs more than
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

/// Waits for the oldest chunk store and lands it (see [`landed`]).
pub(super) async fn land(file: &OpenFile, cache: &CacheInner, (store, len): Storing) -> bool {
    landed(file, cache, joined_store(store.await), len)
}

/// Appends a stored chunk to the manifest (persisting it), dropping it
/// from the cut chunks. False when the ingest must stop: the store failed
/// (the state says how), or the file went stale. A manifest that covers
/// the whole file of an origin that states a digest is persisted only
/// after the whole-file check (`digest.rs`).
pub(super) fn landed(
    file: &OpenFile,
    cache: &CacheInner,
    stored: Result<ChunkId>,
    len: usize,
) -> bool {
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
    let checked_later = file.whole.is_some() && snapshot.is_complete();
    if !checked_later {
        if let Err(e) = cache
            .store
            .index()
            .put_manifest(file.origin.id(), &file.path, &snapshot)
        {
            debug!(error = %e, "could not persist the manifest");
        }
    }
    file.progress.send_modify(|v| *v += 1);
    true
}
