//! Directory streams: `opendir`, `readdir` and `releasedir`.
//!
//! Layer: part of the filesystem proper (see `fs.rs`). A stream is a
//! snapshot taken at `opendir`, so a listing refresh in the middle of a
//! long `readdir` cannot skip or repeat entries. Each `opendir` starts the
//! read-ahead of the directory's subdirectories (`readahead.rs`).

use std::ffi::OsString;
use std::sync::Arc;

use fuser::{
    Errno, FileHandle as Fh, FileType, FopenFlags, INodeNo, ReplyDirectory, ReplyEmpty, ReplyOpen,
};
use musicfs_origins::OriginPath;

use super::*;
use crate::attr;
use crate::inode::{Node, NodeKey};
use crate::Ino;

/// One entry of a directory stream snapshot.
#[derive(Debug)]
pub(super) struct DirItem {
    pub(super) ino: Ino,
    pub(super) kind: FileType,
    pub(super) name: OsString,
}

impl Inner {
    /// Stores a directory stream snapshot; returns its handle.
    pub(super) fn open_dir_snapshot(&self, items: Vec<DirItem>) -> u64 {
        let fh = self.next_fh();
        self.dirs.lock().insert(fh, Arc::from(items));
        fh
    }
}

impl MusicFs {
    pub(super) fn on_opendir(&self, ino: INodeNo, reply: ReplyOpen) {
        let key = match self.node(ino) {
            None => return reply.error(Errno::ENOENT),
            Some(Node::Root) => {
                let mut items = vec![dot(".", Ino::ROOT), dot("..", Ino::ROOT)];
                for origin in &self.inner.origins {
                    let key = NodeKey {
                        origin: origin.id().clone(),
                        path: OriginPath::root(),
                    };
                    items.push(DirItem {
                        ino: self.inner.inodes.ino_of(&key),
                        kind: FileType::Directory,
                        name: origin.id().as_str().into(),
                    });
                }
                let fh = self.inner.open_dir_snapshot(items);
                return reply.opened(Fh(fh), FopenFlags::empty());
            }
            Some(Node::Entry(key)) => key,
        };
        let ino = Ino::from(ino);
        self.with_listing(key.clone(), move |inner, listed| {
            let listing = match listed {
                Ok(l) => l,
                Err(e) => return reply.error(e),
            };
            let parent = match key.path.parent() {
                None => Ino::ROOT,
                Some(path) => inner.inodes.ino_of(&NodeKey {
                    origin: key.origin.clone(),
                    path,
                }),
            };
            let mut items = Vec::with_capacity(listing.entries.len() + 2);
            items.push(dot(".", ino));
            items.push(dot("..", parent));
            for entry in &listing.entries {
                // Names from an origin are single components; one that is
                // not cannot be looked up, so it is not listed either.
                let Ok(path) = key.path.join(&entry.name) else {
                    continue;
                };
                let entry_key = NodeKey {
                    origin: key.origin.clone(),
                    path,
                };
                items.push(DirItem {
                    ino: inner.entry_ino(&entry_key, &entry.meta),
                    kind: attr::file_type(entry.meta.kind),
                    name: entry.name.clone(),
                });
            }
            let fh = inner.open_dir_snapshot(items);
            reply.opened(Fh(fh), FopenFlags::empty());
            // A walker opens the subdirectories next: list them ahead.
            inner.read_ahead_below(&key, listing);
        });
    }

    pub(super) fn on_readdir(&self, fh: Fh, offset: u64, mut reply: ReplyDirectory) {
        let items = self.inner.dirs.lock().get(&fh.0).cloned();
        let Some(items) = items else {
            reply.error(Errno::EBADF);
            return;
        };
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, item) in items.iter().enumerate().skip(start) {
            // The offset of an entry is where the next call resumes.
            if reply.add(item.ino.into(), i as u64 + 1, item.kind, &item.name) {
                break;
            }
        }
        reply.ok();
    }

    pub(super) fn on_releasedir(&self, fh: Fh, reply: ReplyEmpty) {
        let snapshot = self.inner.dirs.lock().remove(&fh.0);
        drop(snapshot);
        reply.ok();
    }
}

pub(super) fn dot(name: &str, ino: Ino) -> DirItem {
    DirItem {
        ino,
        kind: FileType::Directory,
        name: name.into(),
    }
}
