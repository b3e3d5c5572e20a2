//! The read path of a handle: where each piece of a read comes from.
//!
//! Layer: inside the cache (see `cache.rs`). A read of `[offset, end)` is
//! served piece by piece from the file's verified chunks (`chunks.rs`), the
//! ingest buffer, a wait for the ingest when the read continues the stream,
//! or the origin directly (a seek far ahead, a user read that never queues
//! behind read-ahead at the origin's link); each step is chosen under the
//! file's state lock, and chunks are pinned before it drops so eviction
//! cannot slip in between.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use musicfs_origins::OriginPath;
use tokio::sync::watch;

use crate::manifest::ChunkRef;
use crate::store::PinGuard;
use crate::{CasError, ChunkId, Result};

use super::link::Class;
use super::*;

/// A read starting this close past the ingest buffer, or past the furthest
/// read so far, continues the stream; otherwise it is a seek.
pub(super) const WAIT_WINDOW: u64 = 4 * 1024 * 1024;
/// A read that continues the stream waits for the ingest when it starts at
/// most this far past the ingest buffer (the kernel's read-ahead runs a few
/// MiB ahead of the reader), instead of reading the same bytes from the
/// origin a second time; further ahead (the ingest restarting far behind
/// after a failure) it reads from the origin, so it never stalls on a
/// catch-up.
pub(super) const STREAM_WINDOW: u64 = 16 * 1024 * 1024;

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
                        let (piece, fetched) = self.chunk_piece(start, chunk, from, to).await?;
                        out.extend_from_slice(&piece);
                        pos = start + to as u64;
                        let served = if fetched {
                            &self.cache.counters.origin_bytes
                        } else {
                            &self.cache.counters.hit_bytes
                        };
                        served.fetch_add((to - from) as u64, Ordering::Relaxed);
                    }
                }
                Step::Buffered(bytes) if out.is_empty() && pos + bytes.len() as u64 == end => {
                    // The whole read came from the ingest buffer (a cold
                    // read keeping up with the ingest): no second copy.
                    // Those bytes were read from the origin for this
                    // stream, so they are no hit.
                    self.cache
                        .counters
                        .origin_bytes
                        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    return Ok(bytes);
                }
                Step::Buffered(bytes) => {
                    pos += bytes.len() as u64;
                    self.cache
                        .counters
                        .origin_bytes
                        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    out.extend_from_slice(&bytes);
                }
                Step::Fail(e) => return Err(e),
                Step::Wait(mut rx) => {
                    // Err only if the sender is gone, which cannot happen
                    // while we hold the file; either way, look again.
                    let _ = rx.changed().await;
                }
                Step::Direct(upto) => {
                    let read = self
                        .cache
                        .origin_read(
                            &self.file.origin,
                            &self.file.path,
                            &self.file.version,
                            pos,
                            upto - pos,
                            Class::User,
                        )
                        .await;
                    self.file.stale_on_change(&self.cache, &read);
                    let data = read?;
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
    pub(super) fn next_step(&self, pos: u64, end: u64) -> Step {
        let mut st = self.file.state.lock();
        if let Some(corrupt) = st.corrupt {
            return Step::Fail(self.file.corrupt_error(corrupt));
        }
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
            // The ingest's ranges up to here are no longer read-ahead.
            self.file.waiting.send_if_modified(|w| {
                let further = end > *w;
                *w = (*w).max(end);
                further
            });
            let mut rx = self.file.progress.subscribe();
            rx.borrow_and_update();
            return Step::Wait(rx);
        }
        Step::Direct(end)
    }

    pub(super) fn maybe_start_ingest(&self, st: &mut FileState) {
        if st.stale
            || !st.ingest.can_start()
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
        st.ingest_event(IngestEvent::Started);
        let weak = Arc::downgrade(&self.file);
        let cache = self.cache.clone();
        let running = IngestRunning::new(&cache);
        tokio::spawn(async move {
            let _running = running;
            run_ingest(weak, cache).await;
        });
    }
}

pub(super) enum Step {
    Chunks(Vec<(u64, ChunkRef)>, PinGuard),
    Buffered(Bytes),
    Wait(watch::Receiver<u64>),
    Direct(u64),
    /// The file's download failed its whole-file check.
    Fail(CasError),
}
