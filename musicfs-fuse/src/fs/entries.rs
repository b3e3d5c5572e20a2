//! Names and attributes: `lookup`, `getattr` and `readlink`.
//!
//! Layer: part of the filesystem proper (see `fs.rs`). Names are bytes: the
//! kernel's `OsStr` is matched against the origin's names byte for byte.
//! An entry's attributes are the newer of its parent's listing entry and
//! what an open last confirmed (`fresh.rs`). A symlink's target comes from
//! the listing (checked by the origin when listed) or, when the listing
//! has none, from the origin; a target that is absolute or climbs above the
//! origin's directory is never handed to the kernel.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;

use fuser::{Errno, Generation, INodeNo, ReplyAttr, ReplyData, ReplyEntry};
use musicfs_origins::{EntryKind, EntryMeta, FileVersion};
use tracing::{debug, warn};

use super::*;
use crate::attr;
use crate::errno;
use crate::inode::{Node, NodeKey};
use crate::Ino;

impl MusicFs {
    pub(super) fn on_lookup(&self, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let ttl = self.inner.config.kernel_ttl;
        match self.node(parent) {
            None => reply.error(Errno::ENOENT),
            Some(Node::Root) => match self.inner.origin_root_key(name) {
                Some(key) => {
                    let ino = self.inner.inodes.ino_of(&key);
                    let meta = self.inner.origin_root_meta(&key.origin);
                    let attr = attr::entry_attr(ino, &meta, self.inner.owner);
                    reply.entry(&ttl, &attr, Generation(0));
                }
                None => reply.error(Errno::ENOENT),
            },
            Some(Node::Entry(dir)) => {
                let Ok(path) = dir.path.join(name) else {
                    reply.error(Errno::ENOENT);
                    return;
                };
                let name = name.to_owned();
                let origin = dir.origin.clone();
                self.with_listing_of(dir, name.clone(), move |inner, listed| {
                    let fetched_at_ns = listed.as_ref().map_or(0, |l| l.fetched_at_ns);
                    match listed.and_then(|l| l.get(&name).cloned().ok_or(Errno::ENOENT)) {
                        Ok(listed) => {
                            let key = NodeKey { origin, path };
                            let (meta, _) = inner.newest(&key, listed, fetched_at_ns);
                            let ino = inner.entry_ino(&key, &meta);
                            let attr = attr::entry_attr(ino, &meta, inner.owner);
                            reply.entry(&ttl, &attr, Generation(0));
                        }
                        Err(e) => reply.error(e),
                    }
                });
            }
        }
    }

    pub(super) fn on_getattr(&self, ino: INodeNo, reply: ReplyAttr) {
        let ttl = self.inner.config.kernel_ttl;
        match self.node(ino) {
            None => reply.error(Errno::ENOENT),
            Some(Node::Root) => reply.attr(&ttl, &self.inner.root_attr()),
            Some(Node::Entry(key)) => {
                let ino = Ino::from(ino);
                // A file's inode is one version of it: its attributes are
                // that version's whatever the listing says now (a newer
                // version is another inode; a deleted file still open
                // keeps reading its version, or ends with ESTALE).
                if let Some(version) = self.inner.inodes.version(ino) {
                    let attr = attr::entry_attr(ino, &version_meta(&version), self.inner.owner);
                    reply.attr(&ttl, &attr);
                    return;
                }
                self.with_meta(key, move |inner, meta| match meta {
                    Ok(meta) => reply.attr(&ttl, &attr::entry_attr(ino, &meta, inner.owner)),
                    Err(e) => reply.error(e),
                });
            }
        }
    }

    pub(super) fn on_readlink(&self, ino: INodeNo, reply: ReplyData) {
        let key = match self.node(ino) {
            None => return reply.error(Errno::ENOENT),
            Some(Node::Root) => return reply.error(Errno::EINVAL),
            Some(Node::Entry(key)) => key,
        };
        let (Some(parent), Some(name)) = (key.path.parent(), key.path.file_name()) else {
            // An origin's root is a directory.
            return reply.error(Errno::EINVAL);
        };
        let name = name.to_owned();
        let dir = NodeKey {
            origin: key.origin.clone(),
            path: parent,
        };
        let ino = Ino::from(ino);
        self.with_listing(dir, move |inner, listed| {
            let entry = match listed.and_then(|l| l.entry(&name).cloned().ok_or(Errno::ENOENT)) {
                Ok(entry) if entry.meta.kind == EntryKind::Symlink => entry,
                Ok(_) => return reply.error(Errno::EINVAL),
                Err(e) => return reply.error(e),
            };
            if let Some(target) = entry.link_target {
                return reply_link(&key, &target, reply);
            }
            let Some(origin) = inner.by_id.get(&key.origin).cloned() else {
                return reply.error(Errno::ENOENT);
            };
            let inner = Arc::clone(inner);
            let timeout = inner.config.read_timeout;
            inner.rt.clone().spawn(async move {
                match tokio::time::timeout(timeout, origin.read_link(&key.path)).await {
                    Ok(Ok(target)) => reply_link(&key, &target, reply),
                    Ok(Err(e)) => {
                        debug!(origin = %key.origin, path = %key.path, error = %e, "cannot read a symlink");
                        if e.is_not_found() {
                            // Hidden or gone now: the listing is out of date.
                            inner.file_changed(ino);
                        }
                        reply.error(errno::of_origin(&e));
                    }
                    Err(_) => {
                        warn!(origin = %key.origin, path = %key.path, ?timeout, "readlink timed out; the origin may be hung");
                        reply.error(Errno::EIO);
                    }
                }
            });
        });
    }
}

/// Answers a `readlink` of `key` with `target`, unless the target could
/// lead the kernel out of the origin's directory (see the module docs).
pub(super) fn reply_link(key: &NodeKey, target: &Path, reply: ReplyData) {
    if key.path.lexical_link_target(target).is_some() {
        reply.data(target.as_os_str().as_bytes());
    } else {
        warn!(origin = %key.origin, path = %key.path, ?target, "not serving a symlink target that is absolute or leaves the origin");
        reply.error(Errno::ENOENT);
    }
}

/// The attributes of one version of a file.
pub(super) fn version_meta(version: &FileVersion) -> EntryMeta {
    EntryMeta {
        kind: EntryKind::File,
        size: version.size,
        mtime_ns: version.mtime_ns,
        etag: version.etag.clone(),
    }
}
