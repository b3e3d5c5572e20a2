//! Open-file state: one [`OpenFile`] per open version of an origin file,
//! shared by all its handles, and what it buffers while the ingest runs.
//!
//! Layer: inside the cache (see `cache.rs`). Invariants: the manifest
//! covers a prefix of the file ending on a chunk boundary, and `cut` then
//! `tail` hold exactly the bytes right after it, in order; `stale` is set
//! once and never cleared (the origin no longer has this version, or the
//! download failed its whole-file check); the ingest's state changes only
//! through [`Ingest::on`].

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use musicfs_origins::{DynOrigin, OriginPath, WholeDigest};
use parking_lot::Mutex;
use tokio::sync::watch;
use tracing::{debug, info};

use crate::manifest::{FileVersion, Manifest};
use crate::{CasError, ChunkId, Result};

use super::digest::WholeCheck;
use super::link::Link;
use super::*;

/// After a failed ingest, reads go to the origin directly for this long
/// before the ingest is tried again.
pub(super) const INGEST_RETRY_AFTER: Duration = Duration::from_secs(2);

#[derive(Debug)]
pub(super) struct OpenFile {
    pub(super) origin: DynOrigin,
    pub(super) path: OriginPath,
    pub(super) version: FileVersion,
    pub(super) state: Mutex<FileState>,
    pub(super) progress: watch::Sender<u64>,
    /// The origin's link, which the ingest's reads go out through.
    pub(super) link: Arc<Link>,
    /// The end of the furthest read waiting on the ingest: the ingest's
    /// ranges before it are user reads, not read-ahead (`link.rs`).
    pub(super) waiting: watch::Sender<u64>,
    /// The digest a download of this version must have, where the origin
    /// states one (`digest.rs`).
    pub(super) whole: Option<WholeCheck>,
    /// The last chunks read whole, newest last. A reader on a FUSE thread
    /// fills a slot holding its lock, so concurrent requests that fall in
    /// one chunk read and hash it once (async readers do not hold it across
    /// their reads; they are the rare path for cached chunks).
    pub(super) recent: Mutex<VecDeque<(ChunkId, Slot)>>,
}

#[derive(Debug)]
pub(super) struct FileState {
    pub(super) manifest: Manifest,
    /// Chunks cut and being stored, in file order, right after
    /// `manifest.covered()`; each joins the manifest once stored. Readers
    /// are served from them meanwhile.
    pub(super) cut: VecDeque<Bytes>,
    /// Sum of the lengths in `cut`.
    pub(super) cut_len: u64,
    /// Bytes read from the origin and not cut yet, right after `cut`.
    pub(super) tail: BytesMut,
    pub(super) want_until: u64,
    /// End of the furthest read that continued the stream.
    pub(super) read_end: u64,
    /// End of the reads waiting for the very next bytes of the ingest: its
    /// next origin read covers them, so they cost one round trip.
    pub(super) need_end: u64,
    pub(super) ingest: Ingest,
    /// Never persist or extend the manifest again: the origin no longer
    /// has this version, or its download failed the whole-file check.
    pub(super) stale: bool,
    /// The download failed the whole-file check (digest expected, digest
    /// got): every read of this open file fails with
    /// [`CasError::OriginCorrupt`]; a new open downloads it again.
    pub(super) corrupt: Option<(WholeDigest, WholeDigest)>,
}

/// Where a file's ingest is; see the state diagram in the ingest module.
#[derive(Debug)]
pub(super) enum Ingest {
    /// Not running: nothing was wanted past what is buffered, or not yet.
    Idle,
    Running,
    /// An origin read failed, the file went stale or a chunk did not fit:
    /// reads go to the origin directly until [`INGEST_RETRY_AFTER`].
    Failed {
        at: Instant,
    },
    /// Chunks could not be stored; restarts once the store is healthy.
    Stopped,
    /// The whole file is in the manifest.
    Done,
}

/// What happened to an ingest; [`Ingest::on`] says where it goes next.
#[derive(Debug, Clone, Copy)]
pub(super) enum IngestEvent {
    /// A reader wanted bytes and the ingest could start (see
    /// [`Ingest::can_start`]).
    Started,
    /// Nothing more is wanted for now.
    Paused,
    /// The last chunk joined the manifest.
    Finished,
    /// An origin read failed, the file changed, or a chunk did not fit.
    Failed,
    /// The cache disk refused a chunk.
    StoreDown,
}

impl Ingest {
    /// The one place an ingest's state changes (the diagram in the ingest
    /// module). Events that make no sense in a state leave it as it is.
    pub(super) fn on(self, event: IngestEvent) -> Ingest {
        use IngestEvent as E;
        match (self, event) {
            (_, E::Failed) => Ingest::Failed { at: Instant::now() },
            (Ingest::Idle | Ingest::Stopped | Ingest::Failed { .. }, E::Started) => Ingest::Running,
            (Ingest::Running, E::Paused) => Ingest::Idle,
            (Ingest::Running, E::Finished) => Ingest::Done,
            (Ingest::Running, E::StoreDown) => Ingest::Stopped,
            (state, event) => {
                debug!(?state, ?event, "ingest event ignored in this state");
                state
            }
        }
    }

    /// Whether a reader may start the ingest now.
    pub(super) fn can_start(&self) -> bool {
        match self {
            Ingest::Idle | Ingest::Stopped => true,
            Ingest::Failed { at } => at.elapsed() >= INGEST_RETRY_AFTER,
            Ingest::Running | Ingest::Done => false,
        }
    }
}

impl FileState {
    pub(super) fn ingest_event(&mut self, event: IngestEvent) {
        self.ingest = std::mem::replace(&mut self.ingest, Ingest::Idle).on(event);
    }

    pub(super) fn buffered_end(&self) -> u64 {
        self.manifest.covered() + self.cut_len + self.tail.len() as u64
    }

    /// The buffered bytes from `pos` (which must lie in
    /// `[manifest.covered(), buffered_end())`) up to `end` at most: a slice
    /// of a cut chunk (no copy) or a copy out of the uncut tail.
    pub(super) fn buffered(&self, pos: u64, end: u64) -> Bytes {
        let mut start = self.manifest.covered();
        for chunk in &self.cut {
            let chunk_end = start + chunk.len() as u64;
            if pos < chunk_end {
                let from = (pos - start) as usize;
                let to = (end.min(chunk_end) - start) as usize;
                return chunk.slice(from..to);
            }
            start = chunk_end;
        }
        let from = (pos - start) as usize;
        let to = ((end - start) as usize).min(self.tail.len());
        Bytes::copy_from_slice(&self.tail[from..to])
    }
}

impl OpenFile {
    /// After the origin showed that it no longer has this version (a
    /// change caught by the origin's version check, or a chunk that no
    /// longer hashes to its name), this open file neither serves, extends
    /// nor persists its manifest again: every later read of it goes to the
    /// origin, which refuses the old version, so the handle ends with
    /// [`CasError::OriginChanged`] instead of stitching new bytes onto old
    /// ones. The stored manifest of this version is dropped too.
    pub(super) fn stale_on_change<T>(&self, cache: &CacheInner, r: &Result<T>) {
        if let Err(CasError::OriginChanged { reason, .. }) = r {
            self.go_stale(cache, reason);
        }
    }

    pub(super) fn go_stale(&self, cache: &CacheInner, reason: &str) {
        let mut st = self.state.lock();
        let first = !st.stale;
        st.stale = true;
        st.manifest = Manifest::new(self.version.clone());
        st.cut.clear();
        st.cut_len = 0;
        st.tail.clear();
        drop(st);
        self.recent.lock().clear();
        cache.drop_manifest(self.origin.id(), &self.path, &self.version);
        if first {
            info!(origin = %self.origin.id(), path = %self.path, reason, "file changed on the origin while open; its readers get an error, new opens read the new version");
        }
        self.progress.send_modify(|v| *v += 1);
    }
}

impl Drop for OpenFile {
    fn drop(&mut self) {
        self.origin.release(&self.path, &self.version);
    }
}

/// A whole verified chunk in an open file's recent chunks, once read.
pub(super) type Slot = Arc<Mutex<Option<Bytes>>>;
