//! Inode numbers: which (origin, path) a kernel inode number means.
//!
//! Layer: inside the filesystem, below the request handlers.
//!
//! Invariants:
//! - Inode 1 is the mount root; every other number names exactly one
//!   (origin, path) and is handed out the first time that pair is seen.
//! - A number is never reused or re-pointed while mounted, so the kernel
//!   can never confuse two files. `forget` is therefore ignored: entries
//!   stay until unmount. That costs one path per entry ever looked up, which
//!   a music library (tens of thousands of files) affords easily, and it is
//!   what makes `st_ino` stable for `find`, `rsync` and players that key
//!   their databases on it.

use std::collections::HashMap;
use std::fmt;

use fuser::INodeNo;
use musicfs_origins::{OriginId, OriginPath};
use parking_lot::RwLock;

/// A kernel inode number of this mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ino(pub u64);

impl Ino {
    /// The mount root, which lists the origins.
    pub const ROOT: Ino = Ino(1);

    /// The first number handed out to an origin entry.
    const FIRST: u64 = 2;
}

impl fmt::Display for Ino {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl From<INodeNo> for Ino {
    fn from(ino: INodeNo) -> Self {
        Ino(ino.0)
    }
}

impl From<Ino> for INodeNo {
    fn from(ino: Ino) -> Self {
        INodeNo(ino.0)
    }
}

/// An entry of some origin; the origin's root directory has the root path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct NodeKey {
    pub origin: OriginId,
    pub path: OriginPath,
}

/// What an inode number stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Node {
    Root,
    Entry(NodeKey),
}

#[derive(Debug, Default)]
struct Table {
    by_key: HashMap<NodeKey, Ino>,
    /// `nodes[i]` is inode `i + Ino::FIRST`.
    nodes: Vec<NodeKey>,
}

/// The two-way map between inode numbers and (origin, path).
#[derive(Debug, Default)]
pub(crate) struct InodeTable {
    table: RwLock<Table>,
}

impl InodeTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// The number of `key`, allocating one on first sight.
    pub fn ino_of(&self, key: &NodeKey) -> Ino {
        if let Some(&ino) = self.table.read().by_key.get(key) {
            return ino;
        }
        let mut table = self.table.write();
        // Another thread may have allocated it between the two locks.
        if let Some(&ino) = table.by_key.get(key) {
            return ino;
        }
        let ino = Ino(table.nodes.len() as u64 + Ino::FIRST);
        table.nodes.push(key.clone());
        table.by_key.insert(key.clone(), ino);
        ino
    }

    /// What `ino` stands for, or `None` for a number this mount never gave
    /// out.
    pub fn node(&self, ino: Ino) -> Option<Node> {
        if ino == Ino::ROOT {
            return Some(Node::Root);
        }
        let index = usize::try_from(ino.0.checked_sub(Ino::FIRST)?).ok()?;
        self.table.read().nodes.get(index).cloned().map(Node::Entry)
    }

    /// Inodes known, the root included.
    pub fn len(&self) -> u64 {
        self.table.read().nodes.len() as u64 + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(origin: &str, path: &str) -> NodeKey {
        NodeKey {
            origin: OriginId::new(origin).unwrap(),
            path: OriginPath::new(path).unwrap(),
        }
    }

    #[test]
    fn numbers_are_stable_and_distinct() {
        let t = InodeTable::new();
        assert_eq!(t.node(Ino::ROOT), Some(Node::Root));
        let a = t.ino_of(&key("o", ""));
        let b = t.ino_of(&key("o", "x/y.flac"));
        let c = t.ino_of(&key("p", "x/y.flac"));
        assert_eq!(a, Ino(2));
        assert_ne!(b, c);
        assert_eq!(t.ino_of(&key("o", "x/y.flac")), b);
        assert_eq!(t.node(b), Some(Node::Entry(key("o", "x/y.flac"))));
        assert_eq!(t.node(Ino(0)), None);
        assert_eq!(t.node(Ino(99)), None);
        assert_eq!(t.len(), 4);
    }
}
