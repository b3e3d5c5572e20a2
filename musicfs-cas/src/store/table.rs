//! The chunk store's in-memory table: what chunk files exist, their sizes,
//! their access times in least-recently-used order, and the pins of reads
//! in flight.
//!
//! Invariants:
//! - `total` is the sum of the sizes in `entries`; `lru` holds exactly one
//!   `(order_ns, id)` per entry.
//! - The table is only ever locked for in-memory work: no disk operation
//!   runs under its lock, so a read that pins chunks never waits for the
//!   disk (or for an eviction's unlinks, or for a disk that hangs).
//! - Victims come from the front of `lru` (oldest access first), so
//!   choosing them costs the victims' number, not the table's size.

use std::collections::{BTreeSet, HashMap, HashSet};

use crate::index::now_ns;
use crate::ChunkId;

#[derive(Debug, Clone, Copy)]
pub(crate) struct Entry {
    pub size: u64,
    /// Last access; persisted to the index at flush.
    pub atime_ns: u64,
    /// The key of this entry in the LRU order.
    order_ns: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Table {
    entries: HashMap<ChunkId, Entry>,
    lru: BTreeSet<(u64, ChunkId)>,
    total: u64,
    pub pins: HashMap<ChunkId, u32>,
    /// Entries whose access time changed since the last flush.
    pub dirty: HashSet<ChunkId>,
    /// Chosen for removal (out of `entries`), file not unlinked yet. A put
    /// of one of these claims it back by removing it from this set; the
    /// unlink is then skipped (see `store::evict`).
    pub evicting: HashSet<ChunkId>,
    /// Chunks whose files are being unlinked right now; a put of one waits
    /// for the unlink before renaming its new file into place.
    pub unlinking: HashSet<ChunkId>,
    /// True until the background reconcile has merged the chunk files found
    /// on disk (see `store::reconcile`).
    pub loading: bool,
    /// Chunks removed while loading, which the merge must not add back.
    pub removed_while_loading: HashSet<ChunkId>,
}

impl Table {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn contains(&self, id: &ChunkId) -> bool {
        self.entries.contains_key(id)
    }

    pub fn get(&self, id: &ChunkId) -> Option<Entry> {
        self.entries.get(id).copied()
    }

    pub fn ids(&self) -> impl Iterator<Item = &ChunkId> {
        self.entries.keys()
    }

    /// Adds (or replaces) the entry of `id`.
    pub fn insert(&mut self, id: ChunkId, size: u64, atime_ns: u64) {
        self.remove_entry(&id);
        self.entries.insert(
            id,
            Entry {
                size,
                atime_ns,
                order_ns: atime_ns,
            },
        );
        self.lru.insert((atime_ns, id));
        self.total += size;
    }

    /// Removes the entry of `id`, remembering the removal while loading.
    pub fn remove(&mut self, id: &ChunkId) -> Option<Entry> {
        if self.loading {
            self.removed_while_loading.insert(*id);
        }
        self.remove_entry(id)
    }

    fn remove_entry(&mut self, id: &ChunkId) -> Option<Entry> {
        let e = self.entries.remove(id)?;
        self.lru.remove(&(e.order_ns, *id));
        self.total -= e.size;
        self.dirty.remove(id);
        Some(e)
    }

    /// Records an access to `id` now.
    pub fn touch(&mut self, id: &ChunkId) {
        let now = now_ns();
        let Some(e) = self.entries.get_mut(id) else {
            return;
        };
        e.atime_ns = now;
        self.dirty.insert(*id);
        if now != e.order_ns {
            self.lru.remove(&(e.order_ns, *id));
            e.order_ns = now;
            self.lru.insert((now, *id));
        }
    }

    /// Takes up to `max` of the least recently used unpinned entries out of
    /// the table, stopping once they add up to `need` bytes. They go into
    /// `evicting`, for the caller to unlink outside the lock.
    pub fn take_victims(&mut self, need: u64, max: usize) -> Vec<(ChunkId, Entry)> {
        let mut chosen = Vec::new();
        let mut bytes = 0;
        for &(_, id) in &self.lru {
            if bytes >= need || chosen.len() >= max {
                break;
            }
            if self.pins.contains_key(&id) {
                continue;
            }
            if let Some(e) = self.entries.get(&id) {
                bytes += e.size;
                chosen.push(id);
            }
        }
        let mut out = Vec::with_capacity(chosen.len());
        for id in chosen {
            if let Some(e) = self.remove(&id) {
                self.evicting.insert(id);
                out.push((id, e));
            }
        }
        out
    }

    /// Puts back an entry whose file could not be removed, so the size
    /// keeps matching the disk.
    pub fn restore(&mut self, id: ChunkId, e: Entry) {
        if !self.entries.contains_key(&id) {
            self.insert(id, e.size, e.atime_ns);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn victims_are_oldest_first_skip_pins_and_keep_the_total() {
        let mut t = Table::default();
        let ids: Vec<ChunkId> = (0u8..5).map(|i| ChunkId::of(&[i])).collect();
        for (i, id) in ids.iter().enumerate() {
            t.insert(*id, 10, 1_000 + i as u64);
        }
        t.pins.insert(ids[0], 1);
        let v = t.take_victims(15, 100);
        let got: Vec<ChunkId> = v.iter().map(|(id, _)| *id).collect();
        assert_eq!(got, vec![ids[1], ids[2]]);
        assert_eq!(t.total(), 30);
        assert_eq!(t.len(), 3);
        assert!(t.evicting.contains(&ids[1]));
        t.touch(&ids[3]);
        let v = t.take_victims(10, 100);
        assert_eq!(v[0].0, ids[4], "a touched entry moved to the back");
        assert_eq!(t.total(), 20);
        t.restore(v[0].0, v[0].1);
        assert_eq!(t.total(), 30);
    }
}
