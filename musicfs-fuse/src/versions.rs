//! Which version of each file the origin last confirmed, and when.
//!
//! Layer: filesystem state beside the listings. The staleness bound rests
//! on it: an open re-checks a file on its origin when the newest thing
//! known about it (its listing entry, or its last check here) is older than
//! [`crate::FsConfig::freshness`], so a new open never serves a version the
//! origin replaced more than that long ago; a check's answer is kept here
//! so that the next lookups and opens use it until the listing catches up.
//!
//! Invariants: bounded ([`SEEN_FILES`] files, oldest first out, which only
//! costs a re-check); a version confirmed later always replaces an older
//! one.

use std::collections::{HashMap, VecDeque};

use musicfs_origins::EntryMeta;

use crate::inode::NodeKey;

/// Files remembered; a library of 200,000 tracks opened over weeks stays
/// at a few MB.
pub(crate) const SEEN_FILES: usize = 65_536;

/// One file as last confirmed.
#[derive(Debug, Clone)]
pub(crate) struct Seen {
    pub meta: EntryMeta,
    /// When the origin last confirmed `meta` (ns since the epoch); 0 when
    /// it must be checked again at the next open.
    pub checked_ns: u64,
}

#[derive(Debug, Default)]
pub(crate) struct SeenFiles {
    map: HashMap<NodeKey, Seen>,
    /// Insertion order; holds each key of `map` at least once.
    order: VecDeque<NodeKey>,
}

impl SeenFiles {
    pub fn get(&self, key: &NodeKey) -> Option<&Seen> {
        self.map.get(key)
    }

    /// The origin confirmed `meta` for `key` at `at_ns`. Ignored when a
    /// later confirmation is already known.
    pub fn confirmed(&mut self, key: &NodeKey, meta: EntryMeta, at_ns: u64) {
        match self.map.get_mut(key) {
            Some(seen) if seen.checked_ns > at_ns => {}
            Some(seen) => {
                seen.meta = meta;
                seen.checked_ns = at_ns;
            }
            None => {
                self.map.insert(
                    key.clone(),
                    Seen {
                        meta,
                        checked_ns: at_ns,
                    },
                );
                self.order.push_back(key.clone());
                self.trim();
            }
        }
    }

    /// A read found `key` changed on the origin: what is known of it must
    /// be checked again at the next open.
    pub fn distrust(&mut self, key: &NodeKey) {
        if let Some(seen) = self.map.get_mut(key) {
            seen.checked_ns = 0;
        }
    }

    /// The file is gone from the origin.
    pub fn remove(&mut self, key: &NodeKey) {
        // Left in `order`; `trim` pops it in its turn.
        self.map.remove(key);
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.len()
    }

    fn trim(&mut self) {
        while self.map.len() > SEEN_FILES || self.order.len() > 2 * SEEN_FILES {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            // A key removed and confirmed again is in `order` twice; its
            // first place may drop it early, which only costs a re-check.
            self.map.remove(&oldest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use musicfs_origins::{EntryKind, OriginId, OriginPath};

    fn meta(size: u64, mtime: i64) -> EntryMeta {
        EntryMeta {
            kind: EntryKind::File,
            size,
            mtime_ns: Some(mtime),
            etag: None,
        }
    }

    fn key(i: u64) -> NodeKey {
        NodeKey {
            origin: OriginId::new("o").unwrap(),
            path: OriginPath::new(&format!("{i}.flac")).unwrap(),
        }
    }

    #[test]
    fn a_later_confirmation_wins() {
        let mut seen = SeenFiles::default();
        let k = key(3);
        seen.confirmed(&k, meta(1, 1), 100);
        seen.confirmed(&k, meta(2, 2), 50);
        assert_eq!(seen.get(&k).unwrap().meta.size, 1);
        seen.confirmed(&k, meta(3, 3), 200);
        assert_eq!(seen.get(&k).unwrap().meta.size, 3);
        seen.distrust(&k);
        assert_eq!(seen.get(&k).unwrap().checked_ns, 0);
        seen.remove(&k);
        assert!(seen.get(&k).is_none());
    }

    #[test]
    fn bounded() {
        let mut seen = SeenFiles::default();
        for i in 0..(SEEN_FILES as u64 + 100) {
            seen.confirmed(&key(i), meta(i, 1), 1);
        }
        assert_eq!(seen.len(), SEEN_FILES);
        assert!(seen.get(&key(0)).is_none(), "oldest first out");
        assert!(seen.get(&key(SEEN_FILES as u64 + 99)).is_some());
    }
}
