//! Verifying part of a chunk without hashing all of it.
//!
//! Layer: inside the cache, under [`crate::cache`]'s read path.
//!
//! A chunk's name is its BLAKE3 hash, and BLAKE3 is a Merkle tree over
//! 1 KiB blocks. Every subtree boundary above 16 KiB falls on a multiple of
//! 16 KiB, so the hash of a chunk is a function of the chaining values
//! ("CVs") of its aligned 16 KiB groups. A [`ChunkTree`] is those CVs,
//! computed from bytes that merged back to the chunk's name. With it, a read
//! of a few KiB of a cached chunk reads and hashes only the groups it
//! covers and compares their CVs with the tree's, instead of reading and
//! hashing the whole chunk (up to 4 MiB) for every 4 KiB.
//!
//! Invariants:
//! - A tree exists only for bytes whose group CVs merged to the chunk's
//!   name ([`ChunkTree::build`] returns `None` otherwise), so a group that
//!   matches its CV is exactly the chunk's bytes there: serving it keeps the
//!   cache's rule that no cached byte is served unverified.
//! - Trees live in memory only and are bounded ([`TreeMemo`]); losing one
//!   costs one full read of its chunk.
//! - A chunk of at most one group has no interior CVs: it is checked whole
//!   against its name.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use blake3::hazmat::{
    left_subtree_len, merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode,
};

use crate::ChunkId;

/// Bytes per verified group: 16 BLAKE3 blocks, enough for the SIMD hashing
/// to run at full width, small enough that a 4 KiB read hashes 16 KiB.
pub(crate) const GROUP: usize = 16 * 1024;

/// The CVs of one chunk's groups; see the module docs.
#[derive(Debug)]
pub(crate) struct ChunkTree {
    id: ChunkId,
    len: usize,
    /// One per group; empty for a chunk of a single group.
    cvs: Vec<ChainingValue>,
}

impl ChunkTree {
    /// Hashes `data` group by group; `Some` only when it is the chunk `id`.
    pub fn build(id: ChunkId, data: &[u8]) -> Option<Self> {
        if data.len() <= GROUP {
            return (ChunkId::of(data) == id).then_some(Self {
                id,
                len: data.len(),
                cvs: Vec::new(),
            });
        }
        let cvs: Vec<ChainingValue> = data
            .chunks(GROUP)
            .enumerate()
            .map(|(i, group)| group_cv(i * GROUP, group))
            .collect();
        let (left, right) = split(0, data.len());
        let root = merge_subtrees_root(
            &merge(&cvs, left.0, left.1),
            &merge(&cvs, right.0, right.1),
            Mode::Hash,
        );
        (root.as_bytes() == id.as_bytes()).then_some(Self {
            id,
            len: data.len(),
            cvs,
        })
    }

    pub fn id(&self) -> &ChunkId {
        &self.id
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// The group-aligned byte range `[start, end)` that covers `[from, to)`:
    /// what has to be read to check those bytes.
    pub fn aligned(&self, from: usize, to: usize) -> (usize, usize) {
        if self.cvs.is_empty() {
            return (0, self.len);
        }
        let start = from / GROUP * GROUP;
        let end = to.div_ceil(GROUP).saturating_mul(GROUP).min(self.len);
        (start, end)
    }

    /// True when `bytes`, read at `start` (a range from [`Self::aligned`]),
    /// are the chunk's bytes there.
    pub fn check(&self, start: usize, bytes: &[u8]) -> bool {
        if self.cvs.is_empty() {
            return start == 0 && bytes.len() == self.len && ChunkId::of(bytes) == self.id;
        }
        if start / GROUP * GROUP != start || start.saturating_add(bytes.len()) > self.len {
            return false;
        }
        let end = start + bytes.len();
        // Every group but the chunk's last is whole.
        if end / GROUP * GROUP != end && end != self.len {
            return false;
        }
        bytes.chunks(GROUP).enumerate().all(|(i, group)| {
            let at = start + i * GROUP;
            self.cvs.get(at / GROUP) == Some(&group_cv(at, group))
        })
    }
}

fn group_cv(offset: usize, group: &[u8]) -> ChainingValue {
    blake3::Hasher::new()
        .set_input_offset(offset as u64)
        .update(group)
        .finalize_non_root()
}

/// The two children `(start, len)` of the subtree `[start, start + len)`,
/// `len > GROUP`.
fn split(start: usize, len: usize) -> ((usize, usize), (usize, usize)) {
    let left = left_subtree_len(len as u64) as usize;
    ((start, left), (start + left, len - left))
}

/// The non-root CV of the subtree `[start, start + len)`, from group CVs.
fn merge(cvs: &[ChainingValue], start: usize, len: usize) -> ChainingValue {
    if len <= GROUP {
        return cvs[start / GROUP];
    }
    let (left, right) = split(start, len);
    merge_subtrees_non_root(
        &merge(cvs, left.0, left.1),
        &merge(cvs, right.0, right.1),
        Mode::Hash,
    )
}

/// Trees of recently read chunks, bounded; first in, first out.
#[derive(Debug)]
pub(crate) struct TreeMemo {
    capacity: usize,
    map: HashMap<ChunkId, Arc<ChunkTree>>,
    /// Insertion order; holds each key of `map` exactly once.
    order: VecDeque<ChunkId>,
}

impl TreeMemo {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            map: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    pub fn get(&self, id: &ChunkId) -> Option<Arc<ChunkTree>> {
        self.map.get(id).cloned()
    }

    pub fn put(&mut self, tree: Arc<ChunkTree>) {
        if self.map.insert(tree.id, tree.clone()).is_none() {
            self.order.push_back(tree.id);
            while self.map.len() > self.capacity {
                let Some(oldest) = self.order.pop_front() else {
                    break;
                };
                self.map.remove(&oldest);
            }
        }
    }

    /// Forgets a chunk whose file turned out damaged.
    pub fn remove(&mut self, id: &ChunkId) {
        if self.map.remove(id).is_some() {
            self.order.retain(|x| x != id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn noise(len: usize, mut seed: u64) -> Vec<u8> {
        (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect()
    }

    #[test]
    fn edge_lengths_build_and_check() {
        for len in [
            0,
            1,
            1024,
            GROUP - 1,
            GROUP,
            GROUP + 1,
            2 * GROUP,
            3 * GROUP + 5,
            256 * 1024,
            1 << 20,
            (4 << 20) - 3,
        ] {
            let data = noise(len, len as u64 | 1);
            let id = ChunkId::of(&data);
            let tree = ChunkTree::build(id, &data).unwrap_or_else(|| panic!("len {len}"));
            let (a, b) = tree.aligned(len / 3, len - len / 4);
            assert!(a <= len / 3 && b >= len - len / 4 && b <= len, "len {len}");
            assert!(tree.check(a, &data[a..b]), "len {len}");
        }
    }

    #[test]
    fn wrong_bytes_never_pass() {
        let data = noise(1 << 20, 9);
        let id = ChunkId::of(&data);
        let mut bad = data.clone();
        bad[700_000] ^= 1;
        assert!(ChunkTree::build(id, &bad).is_none(), "corrupt chunk built");
        assert!(ChunkTree::build(ChunkId::of(b"other"), &data).is_none());

        let tree = ChunkTree::build(id, &data).unwrap();
        let (a, b) = tree.aligned(699_000, 701_000);
        assert!(tree.check(a, &data[a..b]));
        assert!(!tree.check(a, &bad[a..b]), "flipped bit passed");
        // Right bytes at the wrong place, and ranges that are not aligned.
        assert!(!tree.check(a + GROUP, &data[a..b]));
        assert!(!tree.check(a + 1, &data[a + 1..b]));
        assert!(!tree.check(a, &data[a..b - 1]));

        let small = noise(5000, 3);
        let t = ChunkTree::build(ChunkId::of(&small), &small).unwrap();
        assert_eq!(t.aligned(10, 20), (0, 5000));
        assert!(t.check(0, &small));
        assert!(!t.check(0, &small[..4999]));
    }

    #[test]
    fn memo_is_bounded() {
        let mut m = TreeMemo::new(3);
        let ids: Vec<_> = (0..5u8)
            .map(|i| {
                let data = vec![i; 10];
                let id = ChunkId::of(&data);
                m.put(Arc::new(ChunkTree::build(id, &data).unwrap()));
                id
            })
            .collect();
        assert!(m.get(&ids[0]).is_none());
        assert!(m.get(&ids[4]).is_some());
        m.remove(&ids[4]);
        assert!(m.get(&ids[4]).is_none());
        assert_eq!(m.order.len(), m.map.len());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        /// The group CVs merge to exactly BLAKE3's hash for any length, and
        /// every aligned sub-range of the right bytes checks.
        #[test]
        fn tree_matches_blake3(len in 0usize..600_000, seed in any::<u64>(), a in 0.0f64..1.0, b in 0.0f64..1.0) {
            let data = noise(len, seed | 1);
            let tree = ChunkTree::build(ChunkId::of(&data), &data);
            prop_assert!(tree.is_some());
            let tree = tree.unwrap();
            let (x, y) = ((a * len as f64) as usize, (b * len as f64) as usize);
            let (from, to) = (x.min(y), x.max(y));
            let (s, e) = tree.aligned(from, to);
            prop_assert!(s <= from && e >= to && e <= len);
            prop_assert!(tree.check(s, &data[s..e]));
        }
    }
}
