//! File attributes as the kernel sees them.
//!
//! Layer: inside the filesystem; pure functions from origin metadata to
//! `stat` fields.
//!
//! Invariants: sizes, kinds and mtimes are the origin's, unchanged (atime and
//! ctime are the mtime, since MusicFS cannot know better); modes say
//! read-only (0444 files, 0555 directories) whatever the origin's are, since
//! nothing here is writable; symlinks are 0777 like every symlink on Linux
//! (their mode is never checked) and their size is the served target's
//! length; owner is the user who mounted.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{FileAttr, FileType};
use musicfs_origins::{EntryKind, EntryMeta};

use crate::Ino;

/// Block size reported by `stat` and `statfs`: the cache's first ingest
/// request, so tools that size their reads by it ask in useful pieces.
pub(crate) const BLOCK_SIZE: u32 = 128 * 1024;

/// Who owns every entry: the mounting user.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Owner {
    pub uid: u32,
    pub gid: u32,
}

impl Owner {
    pub fn current() -> Self {
        // SAFETY: getuid and getgid take no arguments, touch no memory of
        // ours and cannot fail (POSIX: "always successful").
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        Owner { uid, gid }
    }
}

/// `mtime_ns` as a time; an origin without mtimes gives the epoch, which is
/// stable across mounts (a changing time would make the kernel drop its page
/// cache for nothing).
pub(crate) fn time_of(mtime_ns: Option<i64>) -> SystemTime {
    match mtime_ns {
        Some(ns) if ns >= 0 => UNIX_EPOCH + Duration::from_nanos(ns.unsigned_abs()),
        Some(ns) => UNIX_EPOCH
            .checked_sub(Duration::from_nanos(ns.unsigned_abs()))
            .unwrap_or(UNIX_EPOCH),
        None => UNIX_EPOCH,
    }
}

/// The kernel's file type for an entry.
pub(crate) fn file_type(kind: EntryKind) -> FileType {
    match kind {
        EntryKind::Dir => FileType::Directory,
        EntryKind::File => FileType::RegularFile,
        EntryKind::Symlink => FileType::Symlink,
    }
}

/// Attributes of an origin entry.
pub(crate) fn entry_attr(ino: Ino, meta: &EntryMeta, owner: Owner) -> FileAttr {
    let kind = file_type(meta.kind);
    build(ino, kind, meta.size, time_of(meta.mtime_ns), owner)
}

/// Attributes of a directory MusicFS makes up (the root, an origin's root).
pub(crate) fn dir_attr(ino: Ino, size: u64, mtime: SystemTime, owner: Owner) -> FileAttr {
    build(ino, FileType::Directory, size, mtime, owner)
}

fn build(ino: Ino, kind: FileType, size: u64, mtime: SystemTime, owner: Owner) -> FileAttr {
    let (perm, nlink) = match kind {
        FileType::Directory => (0o555, 2),
        FileType::Symlink => (0o777, 1),
        _ => (0o444, 1),
    };
    FileAttr {
        ino: ino.into(),
        size,
        blocks: size.div_ceil(512),
        atime: mtime,
        mtime,
        ctime: mtime,
        crtime: mtime,
        kind,
        perm,
        nlink,
        uid: owner.uid,
        gid: owner.gid,
        rdev: 0,
        blksize: BLOCK_SIZE,
        flags: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_and_dirs_are_read_only_with_origin_sizes_and_times() {
        let owner = Owner { uid: 7, gid: 8 };
        let meta = EntryMeta {
            kind: EntryKind::File,
            size: 1025,
            mtime_ns: Some(1_700_000_000_123_456_789),
            etag: None,
        };
        let a = entry_attr(Ino(5), &meta, owner);
        assert_eq!(a.ino, fuser::INodeNo(5));
        assert_eq!((a.perm, a.nlink, a.blocks, a.size), (0o444, 1, 3, 1025));
        assert_eq!((a.uid, a.gid, a.blksize), (7, 8, BLOCK_SIZE));
        assert_eq!(
            a.mtime.duration_since(UNIX_EPOCH).unwrap(),
            Duration::new(1_700_000_000, 123_456_789)
        );
        assert_eq!(a.atime, a.mtime);
        assert_eq!(a.ctime, a.mtime);

        let dir = EntryMeta {
            kind: EntryKind::Dir,
            ..meta
        };
        let d = entry_attr(Ino(6), &dir, owner);
        assert_eq!((d.kind, d.perm, d.nlink), (FileType::Directory, 0o555, 2));

        let link = EntryMeta {
            kind: EntryKind::Symlink,
            size: 12,
            ..dir
        };
        let l = entry_attr(Ino(7), &link, owner);
        assert_eq!((l.kind, l.perm, l.size), (FileType::Symlink, 0o777, 12));
    }

    #[test]
    fn times_before_the_epoch_and_missing_times() {
        assert_eq!(time_of(None), UNIX_EPOCH);
        assert_eq!(
            time_of(Some(-1_000_000_000)),
            UNIX_EPOCH - Duration::from_secs(1)
        );
    }
}
