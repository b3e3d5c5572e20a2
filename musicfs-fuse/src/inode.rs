//! Inode numbers: which (origin, path) — and for a file, which version of
//! it — a kernel inode number means.
//!
//! Layer: inside the filesystem, below the request handlers.
//!
//! Invariants:
//! - Inode 1 is the mount root; every other number names exactly one
//!   (origin, path) for a directory or symlink, or one (origin, path,
//!   version) for a file, and is handed out the first time it is seen.
//! - A file gets one number per version. The kernel keeps one page cache
//!   and one size per inode; two versions of a track sharing an inode would
//!   let a handle of the old version read pages the new one filled, or stop
//!   at the new one's size. With a number per version, an inode's pages and
//!   attributes are always of its one version, and a changed file is a new
//!   inode that the next `lookup` hands out (an `open` of the outdated one
//!   answers `ESTALE`, after which the kernel looks the name up again).
//! - A number is never reused or re-pointed while mounted, so the kernel
//!   can never confuse two files. `forget` is therefore ignored: entries
//!   stay until unmount. That costs one path per entry ever looked up, which
//!   a music library (tens of thousands of files) affords easily, and it is
//!   what makes `st_ino` stable for `find`, `rsync` and players that key
//!   their databases on it.

use std::collections::HashMap;
use std::fmt;

use fuser::INodeNo;
use musicfs_origins::{FileVersion, OriginId, OriginPath};
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

/// An inode's identity: the entry, and for a file the version.
type Id = (NodeKey, Option<FileVersion>);

#[derive(Debug, Default)]
struct Table {
    by_key: HashMap<Id, Ino>,
    /// `nodes[i]` is inode `i + Ino::FIRST`.
    nodes: Vec<Id>,
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

    /// The number of the directory or symlink `key`, allocating one on
    /// first sight.
    pub fn ino_of(&self, key: &NodeKey) -> Ino {
        self.ino_of_id((key.clone(), None))
    }

    /// The number of `version` of the file `key`, allocating one on first
    /// sight.
    pub fn ino_of_file(&self, key: &NodeKey, version: FileVersion) -> Ino {
        self.ino_of_id((key.clone(), Some(version)))
    }

    fn ino_of_id(&self, id: Id) -> Ino {
        if let Some(&ino) = self.table.read().by_key.get(&id) {
            return ino;
        }
        let mut table = self.table.write();
        // Another thread may have allocated it between the two locks.
        if let Some(&ino) = table.by_key.get(&id) {
            return ino;
        }
        let ino = Ino(table.nodes.len() as u64 + Ino::FIRST);
        table.nodes.push(id.clone());
        table.by_key.insert(id, ino);
        ino
    }

    /// The file version `ino` stands for; `None` for a directory, a
    /// symlink, the root or an unknown number.
    pub fn version(&self, ino: Ino) -> Option<FileVersion> {
        let index = usize::try_from(ino.0.checked_sub(Ino::FIRST)?).ok()?;
        self.table.read().nodes.get(index)?.1.clone()
    }

    /// What `ino` stands for, or `None` for a number this mount never gave
    /// out.
    pub fn node(&self, ino: Ino) -> Option<Node> {
        if ino == Ino::ROOT {
            return Some(Node::Root);
        }
        let index = usize::try_from(ino.0.checked_sub(Ino::FIRST)?).ok()?;
        self.table
            .read()
            .nodes
            .get(index)
            .map(|(key, _)| Node::Entry(key.clone()))
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

    #[test]
    fn each_version_of_a_file_is_an_inode_of_its_own() {
        let t = InodeTable::new();
        let v = |size| FileVersion {
            size,
            mtime_ns: Some(1),
            etag: None,
        };
        let k = key("o", "a.flac");
        let one = t.ino_of_file(&k, v(1));
        let two = t.ino_of_file(&k, v(2));
        assert_ne!(one, two);
        assert_eq!(t.ino_of_file(&k, v(1)), one, "stable per version");
        assert_eq!(t.node(one), t.node(two));
        assert_eq!(t.version(one), Some(v(1)));
        assert_eq!(t.version(two), Some(v(2)));
        assert_eq!(t.version(t.ino_of(&key("o", ""))), None);
    }
}
