//! What each file inode was last seen as: the version its last open used
//! and when that version was last confirmed by the origin.
//!
//! Layer: filesystem state beside the listings. Two jobs rest on it:
//! - Freshness: an open re-checks the file on its origin when the newest
//!   thing known about it (its listing entry or its last check here) is
//!   older than [`crate::FsConfig::freshness`], so a new open never serves
//!   a version the origin replaced more than that long ago.
//! - Page cache: the kernel may keep a file's cached pages
//!   (`FOPEN_KEEP_CACHE`) only when this open's version equals the last
//!   one's.
//!
//! Invariants: bounded ([`SEEN_FILES`] inodes, oldest first out, which only
//! costs a re-check or the kernel's cached pages of a file not opened for a
//! long time); a version confirmed later always replaces an older one.

use std::collections::{HashMap, VecDeque};

use musicfs_origins::EntryMeta;

use crate::Ino;

/// Inodes remembered; a library of 200,000 tracks opened over weeks stays
/// at a few MB.
pub(crate) const SEEN_FILES: usize = 65_536;

/// One file as last seen.
#[derive(Debug, Clone)]
pub(crate) struct Seen {
    pub meta: EntryMeta,
    /// When the origin last confirmed `meta` (ns since the epoch); 0 when
    /// it must be checked again at the next open.
    pub checked_ns: u64,
    /// The version the last open handed to the kernel, for keep-cache.
    pub opened: Option<EntryMeta>,
}

#[derive(Debug, Default)]
pub(crate) struct SeenFiles {
    map: HashMap<Ino, Seen>,
    /// Insertion order; holds each key of `map` exactly once.
    order: VecDeque<Ino>,
}

impl SeenFiles {
    pub fn get(&self, ino: Ino) -> Option<&Seen> {
        self.map.get(&ino)
    }

    /// The origin confirmed `meta` for `ino` at `at_ns`. Ignored when a
    /// later confirmation is already known.
    pub fn confirmed(&mut self, ino: Ino, meta: EntryMeta, at_ns: u64) {
        match self.map.get_mut(&ino) {
            Some(seen) if seen.checked_ns > at_ns => {}
            Some(seen) => {
                seen.meta = meta;
                seen.checked_ns = at_ns;
            }
            None => self.insert(
                ino,
                Seen {
                    meta,
                    checked_ns: at_ns,
                    opened: None,
                },
            ),
        }
    }

    /// Records that `ino` is opened as `meta`; true when the previous open
    /// was the same version, so the kernel's cached pages of it are right.
    pub fn note_open(&mut self, ino: Ino, meta: &EntryMeta) -> bool {
        match self.map.get_mut(&ino) {
            Some(seen) => seen
                .opened
                .replace(meta.clone())
                .is_some_and(|previous| previous.same_version(meta)),
            None => {
                self.insert(
                    ino,
                    Seen {
                        meta: meta.clone(),
                        checked_ns: 0,
                        opened: Some(meta.clone()),
                    },
                );
                false
            }
        }
    }

    /// A read found `ino` changed on the origin: whatever is known of it
    /// must be checked again at the next open, and its pages not kept.
    pub fn distrust(&mut self, ino: Ino) {
        if let Some(seen) = self.map.get_mut(&ino) {
            seen.checked_ns = 0;
            seen.opened = None;
        }
    }

    /// The file is gone from the origin.
    pub fn remove(&mut self, ino: Ino) {
        // Left in `order`; `insert` skips keys no longer in the map.
        self.map.remove(&ino);
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.len()
    }

    fn insert(&mut self, ino: Ino, seen: Seen) {
        if self.map.insert(ino, seen).is_none() {
            self.order.push_back(ino);
        }
        while self.map.len() > SEEN_FILES || self.order.len() > 2 * SEEN_FILES {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            // A key removed and inserted again is in `order` twice; its
            // first place may drop it early, which only costs a re-check.
            self.map.remove(&oldest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use musicfs_origins::EntryKind;

    fn meta(size: u64, mtime: i64) -> EntryMeta {
        EntryMeta {
            kind: EntryKind::File,
            size,
            mtime_ns: Some(mtime),
            etag: None,
        }
    }

    #[test]
    fn keep_cache_only_for_an_unchanged_version() {
        let mut seen = SeenFiles::default();
        let ino = Ino(7);
        assert!(!seen.note_open(ino, &meta(10, 1)), "first open");
        assert!(seen.note_open(ino, &meta(10, 1)), "same version again");
        assert!(!seen.note_open(ino, &meta(10, 2)), "mtime changed");
        assert!(!seen.note_open(ino, &meta(11, 2)), "size changed");
        seen.distrust(ino);
        assert!(!seen.note_open(ino, &meta(11, 2)), "changed while read");
    }

    #[test]
    fn a_later_confirmation_wins() {
        let mut seen = SeenFiles::default();
        let ino = Ino(3);
        seen.confirmed(ino, meta(1, 1), 100);
        seen.confirmed(ino, meta(2, 2), 50);
        assert_eq!(seen.get(ino).unwrap().meta.size, 1);
        seen.confirmed(ino, meta(3, 3), 200);
        assert_eq!(seen.get(ino).unwrap().meta.size, 3);
        seen.distrust(ino);
        assert_eq!(seen.get(ino).unwrap().checked_ns, 0);
    }

    #[test]
    fn bounded() {
        let mut seen = SeenFiles::default();
        for i in 0..(SEEN_FILES as u64 + 100) {
            seen.note_open(Ino(i), &meta(i, 1));
        }
        assert_eq!(seen.len(), SEEN_FILES);
        assert!(seen.get(Ino(0)).is_none(), "oldest first out");
        assert!(seen.get(Ino(SEEN_FILES as u64 + 99)).is_some());
    }
}
