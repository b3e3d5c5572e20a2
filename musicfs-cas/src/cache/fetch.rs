//! Origin fetches of the cache: every origin byte it reads is of one
//! version.
//!
//! Layer: inside the cache (see `cache.rs`), the only place it calls
//! `Origin::read_range`. Each call is bounded by the origin timeout, asks
//! for the handle's version (the origin refuses another one with
//! `Changed`, which becomes [`CasError::OriginChanged`]), and must return
//! exactly the bytes asked for; a re-fetched chunk must hash to its name.
//! Every read takes a place at the origin's link first (`link.rs`), by who
//! waits for it, and reports how long it took to the link's estimates.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use musicfs_origins::{DynOrigin, OriginError, OriginId, OriginPath};
use tracing::debug;

use crate::manifest::{ChunkRef, FileVersion};
use crate::{CasError, ChunkId, Result};

use super::link::{Class, Link, Slot};
use super::*;

impl CacheInner {
    /// The origin's link; a fresh one for an origin added without one.
    pub(super) fn link(&self, origin: &OriginId) -> Arc<Link> {
        Arc::clone(
            self.links
                .lock()
                .entry(origin.clone())
                .or_insert_with(|| Link::new(None)),
        )
    }

    /// Drops the stored manifest of `path` if it belongs to `version`: a
    /// newer version's manifest (written by a later open) stays.
    pub(super) fn drop_manifest(
        &self,
        origin: &OriginId,
        path: &OriginPath,
        version: &FileVersion,
    ) {
        let index = self.store.index();
        if let Ok(Some(m)) = index.manifest(origin, path) {
            if m.version == *version {
                let _ = index.remove_manifest(origin, path);
            }
        }
    }

    /// One bounded origin read of `class` that must return exactly the
    /// bytes asked for (clipped to the file's size): anything shorter means
    /// the file changed. Waits for a place at the origin's link first
    /// (`link.rs`; a user read never waits there).
    pub(super) async fn origin_read(
        &self,
        origin: &DynOrigin,
        path: &OriginPath,
        version: &FileVersion,
        offset: u64,
        len: u64,
        class: Class,
    ) -> Result<Bytes> {
        let slot = self.link(origin.id()).acquire(class).await;
        self.read_in_slot(&slot, origin, path, version, offset, len)
            .await
    }

    /// [`Self::origin_read`] with its place at the link already taken.
    pub(super) async fn read_in_slot(
        &self,
        slot: &Slot,
        origin: &DynOrigin,
        path: &OriginPath,
        version: &FileVersion,
        offset: u64,
        len: u64,
    ) -> Result<Bytes> {
        let expect = len.min(version.size.saturating_sub(offset));
        let timeout = self.config.origin_timeout;
        let sent = slot.link().sent();
        let read = origin.read_range(path, version, offset, expect);
        let data = match tokio::time::timeout(timeout, read).await {
            Ok(Ok(data)) => data,
            Ok(Err(OriginError::Changed {
                origin,
                path,
                reason,
            })) => {
                return Err(CasError::OriginChanged {
                    origin,
                    path,
                    reason,
                })
            }
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => {
                return Err(CasError::OriginTimeout {
                    origin: origin.id().clone(),
                    path: path.to_string(),
                    timeout,
                })
            }
        };
        if data.len() as u64 != expect {
            return Err(CasError::OriginChanged {
                origin: origin.id().clone(),
                path: path.to_string(),
                reason: format!("asked for {expect} bytes at {offset}, got {}", data.len()),
            });
        }
        slot.link().completed(sent, expect);
        Ok(data)
    }

    pub(super) fn check_chunk(
        &self,
        origin: &DynOrigin,
        path: &OriginPath,
        version: &FileVersion,
        chunk: ChunkRef,
        data: &[u8],
    ) -> Result<()> {
        let actual = ChunkId::of(data);
        if actual == chunk.id {
            return Ok(());
        }
        // The origin now has other bytes where the chunk was, under the
        // same version (a change that kept size and mtime): the cached
        // manifest describes bytes that are gone.
        self.drop_manifest(origin.id(), path, version);
        Err(CasError::OriginChanged {
            origin: origin.id().clone(),
            path: path.to_string(),
            reason: format!(
                "chunk {} re-read from the origin hashes to {actual}",
                chunk.id
            ),
        })
    }

    pub(super) async fn refetch_chunk(
        &self,
        origin: &DynOrigin,
        path: &OriginPath,
        version: &FileVersion,
        start: u64,
        chunk: ChunkRef,
        class: Class,
    ) -> Result<Bytes> {
        self.counters.refetched.fetch_add(1, Ordering::Relaxed);
        let data = if origin.supports_range_reads() {
            self.origin_read(origin, path, version, start, u64::from(chunk.len), class)
                .await?
        } else {
            // The whole file is what such an origin costs anyway: store all
            // of it, so the file's next missing chunk is no new fetch.
            let whole = self
                .origin_read(origin, path, version, 0, version.size, class)
                .await?;
            let end = start + u64::from(chunk.len);
            if end > whole.len() as u64 {
                return Err(CasError::OriginChanged {
                    origin: origin.id().clone(),
                    path: path.to_string(),
                    reason: "file is shorter than its manifest".into(),
                });
            }
            let mut pos = 0;
            for n in self.config.chunk_params.cut_all(&whole) {
                if pos as u64 != start {
                    let _ = self.store.put(whole.slice(pos..pos + n)).await;
                }
                pos += n;
            }
            whole.slice(start as usize..end as usize)
        };
        self.check_chunk(origin, path, version, chunk, &data)?;
        match self.store.put(data.clone()).await {
            Ok(_) | Err(CasError::CacheUnavailable { .. }) => {}
            Err(e) => debug!(error = %e, "could not store the re-fetched chunk"),
        }
        Ok(data)
    }
}
