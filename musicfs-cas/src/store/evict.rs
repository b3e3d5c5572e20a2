//! Eviction without stalling readers.
//!
//! Victims are taken from the table's LRU order [`VICTIM_BATCH`] at a time
//! (a few microseconds under the table lock, whatever the table's size),
//! and their files are unlinked with the lock released, so a read that
//! pins chunks (which needs the lock) waits at most for one batch to be
//! chosen, never for the disk.
//!
//! A chunk chosen for eviction may be put again before its file is gone (a
//! track played again at that moment). The hand-over, all under the table
//! lock:
//! - a victim sits in `evicting` from the moment it leaves the table;
//! - the unlink of a victim first takes it out of `evicting` and marks it
//!   `unlinking`; a victim no longer in `evicting` was claimed by a put and
//!   is skipped;
//! - a put, before renaming its file into place, waits while the chunk is
//!   `unlinking` and then takes it out of `evicting` (claiming it).
//!
//! So an unlink either happens wholly before the put's rename or not at
//! all, and a freshly put chunk is never deleted.

use std::fs;
use std::io::ErrorKind;
use std::sync::atomic::Ordering;

use tracing::{debug, warn};

use super::Inner;
use crate::ChunkId;

/// Victims chosen per lock.
const VICTIM_BATCH: usize = 256;

impl Inner {
    /// True when the chunks and the index pass the limit.
    pub(super) fn over_limit(&self) -> bool {
        self.table.lock().total() + self.index_bytes.load(Ordering::Relaxed) > self.max_size
    }

    /// Evicts down to the low watermark when the chunks and the index pass
    /// the limit. Waits for the background reconcile: before it, the table
    /// holds only part of the chunks, the wrong ones to choose from.
    pub(super) fn evict_if_needed(&self) {
        let (total, loading) = {
            let t = self.table.lock();
            (t.total(), t.loading)
        };
        let used = total + self.index_bytes.load(Ordering::Relaxed);
        if loading || used <= self.max_size {
            return;
        }
        let Some(_one) = self.evicting.try_lock() else {
            // Another thread is evicting already.
            return;
        };
        let freed = self.evict_bytes(used - self.low_water);
        debug!(freed, "evicted down to the low watermark");
    }

    /// Removes least-recently-used unpinned chunks until `need` bytes are
    /// freed or nothing evictable is left. Returns the bytes freed.
    pub(super) fn evict_bytes(&self, need: u64) -> u64 {
        let mut freed = 0;
        let mut evicted = 0u64;
        while freed < need {
            let batch = self.table.lock().take_victims(need - freed, VICTIM_BATCH);
            if batch.is_empty() {
                break;
            }
            let mut gone = Vec::with_capacity(batch.len());
            for (id, entry) in batch {
                match self.unlink_victim(&id) {
                    Some(Ok(())) => {
                        freed += entry.size;
                        gone.push(id);
                    }
                    // Claimed by a put: it lives on, counted by the put.
                    None => {}
                    Some(Err(e)) => {
                        warn!(chunk = %id, error = %e, "cannot evict chunk");
                        self.table.lock().restore(id, entry);
                        // The same file would be chosen again at once.
                        self.counters
                            .evicted_chunks
                            .fetch_add(evicted, Ordering::Relaxed);
                        self.counters
                            .evicted_bytes
                            .fetch_add(freed, Ordering::Relaxed);
                        return freed;
                    }
                }
            }
            evicted += gone.len() as u64;
            for id in &gone {
                let _ = self.index.remove_chunk(id);
            }
        }
        self.counters
            .evicted_chunks
            .fetch_add(evicted, Ordering::Relaxed);
        self.counters
            .evicted_bytes
            .fetch_add(freed, Ordering::Relaxed);
        freed
    }

    /// Unlinks the file of a chunk that is in `evicting`; `None` when a
    /// put claimed it first. A file already gone counts as removed.
    pub(super) fn unlink_victim(&self, id: &ChunkId) -> Option<std::io::Result<()>> {
        {
            let mut t = self.table.lock();
            if !t.evicting.remove(id) {
                return None;
            }
            t.unlinking.insert(*id);
        }
        let removed = {
            let _op = self.watch.start();
            match fs::remove_file(self.chunk_path(id)) {
                Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
                other => other,
            }
        };
        self.table.lock().unlinking.remove(id);
        self.unlinked.notify_all();
        Some(removed)
    }

    /// Before a put renames the chunk `id` into place: waits for an unlink
    /// of it in progress, and claims it back from eviction.
    pub(super) fn claim_for_put(&self, id: &ChunkId) {
        let mut t = self.table.lock();
        while t.unlinking.contains(id) {
            self.unlinked.wait(&mut t);
        }
        t.evicting.remove(id);
    }
}
