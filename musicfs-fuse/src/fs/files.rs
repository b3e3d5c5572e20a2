//! Open files: `open`, `read` and `release`.
//!
//! Layer: part of the filesystem proper (see `fs.rs`), over the cache's
//! file handles. Invariants: `open` binds the handle to the version
//! `fresh.rs` chose, which must be the version of the inode opened (else
//! `ESTALE`: the kernel looks the name up again and gets the new version's
//! inode), and keeps the kernel page cache, which is that version's; a
//! read of a fully
//! cached file is answered on the FUSE thread, any other runs as a task
//! bounded by `read_timeout` (`EIO` when it expires), so a read stuck on a
//! hung origin holds no FUSE thread; errors become errnos only through
//! `errno.rs`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuser::{
    Errno, FileHandle as Fh, FopenFlags, INodeNo, OpenAccMode, OpenFlags, ReplyData, ReplyEmpty,
    ReplyOpen,
};
use musicfs_cas::{CasError, FileHandle};
use musicfs_origins::EntryKind;
use tracing::{debug, info, warn};

use super::*;
use crate::errno;
use crate::inode::Node;
use crate::Ino;

/// How long a read of a file whose previous read timed out less than
/// `read_timeout` ago may wait for the origin. After a failed readahead the
/// kernel retries the first page on its own; without this, a buffered read
/// from a hung origin would report EIO only after twice the read timeout.
pub(super) const RETRY_BUDGET: Duration = Duration::from_millis(250);

/// How long after the last open file closes the memory freed by its reads
/// is handed back to the kernel (the ingest may still be storing its last
/// chunks for a moment).
pub(super) const TRIM_AFTER: Duration = Duration::from_secs(2);

#[derive(Debug)]
pub(super) struct OpenFile {
    pub(super) ino: Ino,
    pub(super) handle: FileHandle,
}

impl Inner {
    /// After a read found the file changed on the origin: refresh its
    /// directory now rather than when the listing expires, so the next open
    /// sees the new version instead of failing again.
    pub(super) fn file_changed(self: &Arc<Self>, ino: Ino) {
        if let Some(Node::Entry(key)) = self.inodes.node(ino) {
            self.seen.lock().distrust(&key);
            self.refresh_parent(&key);
        }
    }

    /// Once no file is open (checked again after [`TRIM_AFTER`]), hands the
    /// memory freed by reads back to the kernel. A full-speed cold read
    /// buffers several MiB per file, in buffers allocated and freed on many
    /// threads; glibc keeps such memory in per-thread arenas, so without
    /// this the daemon would stay at its peak size after a burst.
    /// How long a read of `ino` may wait: the read timeout, or only
    /// [`RETRY_BUDGET`] right after one of its reads timed out.
    pub(super) fn read_budget(&self, ino: Ino) -> Duration {
        let timeout = self.config.read_timeout;
        let mut timed_out = self.timed_out.lock();
        match timed_out.get(&ino) {
            Some(at) if at.elapsed() < timeout => timeout.min(RETRY_BUDGET),
            Some(_) => {
                timed_out.remove(&ino);
                timeout
            }
            None => timeout,
        }
    }

    pub(super) fn trim_when_idle(self: &Arc<Self>) {
        if self.trim_pending.swap(true, Ordering::AcqRel) {
            return;
        }
        let inner = Arc::clone(self);
        self.rt.spawn(async move {
            tokio::time::sleep(TRIM_AFTER).await;
            inner.trim_pending.store(false, Ordering::Release);
            if inner.files.lock().is_empty() {
                let _ = tokio::task::spawn_blocking(release_freed_memory).await;
            }
        });
    }
}

impl MusicFs {
    pub(super) fn on_open(&self, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.acc_mode() != OpenAccMode::O_RDONLY || flags.0 & libc::O_TRUNC != 0 {
            reply.error(Errno::EROFS);
            return;
        }
        let key = match self.node(ino) {
            None => return reply.error(Errno::ENOENT),
            Some(Node::Root) => return reply.error(Errno::EISDIR),
            Some(Node::Entry(key)) => key,
        };
        let ino = Ino::from(ino);
        // The version this inode stands for (see the inode module).
        let Some(version) = self.inner.inodes.version(ino) else {
            return reply.error(Errno::EISDIR);
        };
        self.with_entry(key.clone(), move |inner, entry| {
            let (listed, listed_ns) = match entry {
                Ok((meta, _)) if meta.kind != EntryKind::File => return reply.error(Errno::EISDIR),
                Ok(entry) => entry,
                Err(e) => return reply.error(e),
            };
            let inner = Arc::clone(inner);
            // Async from here: the freshness check may ask the origin, and
            // open_file reads the manifest.
            inner.rt.clone().spawn(async move {
                match inner.open_bound(&key, listed, listed_ns, &version).await {
                    Ok(handle) => {
                        let fh = inner.next_fh();
                        inner.files.lock().insert(fh, OpenFile { ino, handle });
                        // The inode is this one version, so the pages the
                        // kernel cached for it are always right.
                        reply.opened(Fh(fh), FopenFlags::FOPEN_KEEP_CACHE);
                    }
                    Err(e) => reply.error(e),
                }
            });
        });
    }

    pub(super) fn on_read(&self, ino: INodeNo, fh: Fh, offset: u64, size: u32, reply: ReplyData) {
        let handle = self.inner.files.lock().get(&fh.0).map(|f| f.handle.clone());
        let Some(handle) = handle else {
            reply.error(Errno::EBADF);
            return;
        };
        // A fully cached file is answered right here when its verified
        // chunks are at hand (in memory or on the cache disk): no origin is
        // involved, and the hand-off to the runtime and back would cost
        // more than the read itself.
        if let Some(data) = handle.read_cached_blocking(offset, u64::from(size)) {
            reply.data(&data);
            return;
        }
        let ino = Ino::from(ino);
        let timeout = self.inner.read_budget(ino);
        let inner = Arc::clone(&self.inner);
        // Every read is its own task: one stuck on a hung origin holds no
        // FUSE thread and delays no other read.
        self.inner.rt.spawn(async move {
            match tokio::time::timeout(timeout, handle.read(offset, u64::from(size))).await {
                Ok(Ok(data)) => {
                    inner.timed_out.lock().remove(&ino);
                    reply.data(&data)
                }
                Ok(Err(e)) => {
                    let errno = errno::of_cas(&e);
                    if matches!(e, CasError::OriginChanged { .. }) {
                        info!(%ino, path = %handle.path(), error = %e, "file changed on the origin while open; this handle ends with ESTALE");
                        inner.file_changed(ino);
                    } else {
                        warn!(%ino, offset, size, path = %handle.path(), error = %e, "read failed");
                    }
                    reply.error(errno);
                }
                Err(_) => {
                    warn!(%ino, offset, size, path = %handle.path(), ?timeout, "read timed out; the origin may be hung");
                    inner.timed_out.lock().insert(ino, Instant::now());
                    reply.error(Errno::EIO);
                }
            }
        });
    }

    pub(super) fn on_release(&self, fh: Fh, reply: ReplyEmpty) {
        let file = self.inner.files.lock().remove(&fh.0);
        if let Some(file) = &file {
            debug!(ino = %file.ino, path = %file.handle.path(), "released");
        }
        // Dropped outside the lock: the last handle of a file stops its
        // ingest.
        drop(file);
        reply.ok();
        if self.inner.files.lock().is_empty() {
            self.inner.trim_when_idle();
        }
    }
}

/// Returns the allocator's free memory to the kernel (glibc only; other
/// allocators return it by themselves or not at all).
pub(super) fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointers from us, only walks glibc's own
    // free lists under its locks, and may be called from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}
