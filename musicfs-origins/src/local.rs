//! The local-directory origin: a directory tree on this machine, usually a
//! NAS mount.
//!
//! Layer: bottom (an [`Origin`] implementation). It does exactly one attempt
//! per call; retries and timeouts belong to the callers and wrappers above.
//!
//! Invariants:
//! - No filesystem call ever runs on a tokio worker thread. Each one runs in
//!   `spawn_blocking` while holding an owned permit of this origin's own
//!   semaphore, and the permit lives inside the blocking closure. A dead NAS
//!   can therefore pin at most `max_blocking` blocking-pool threads: a caller
//!   that gives up (drops its future on timeout) does not free the slot, the
//!   syscall returning does. Further callers queue on the semaphore, not on
//!   new threads, and other origins have their own semaphores.
//! - Nothing outside the root is ever reached. [`OriginPath`] already rules
//!   out `..`; here every intermediate component is checked with `lstat`, and
//!   a symlink there is refused with [`OriginError::OutsideRoot`] (even one
//!   pointing inside the root: the kernel resolves links through the mount,
//!   so no path MusicFS is asked for crosses one). A final symlink is
//!   reported as [`EntryKind::Symlink`] with the target to serve when it
//!   resolves inside the root, and hidden otherwise (see the `links` module
//!   for the rules, including absolute targets); it is never opened:
//!   reading or listing it is [`OriginError::WrongKind`], because it is not
//!   a file or directory to us, whatever it points at. Files are opened with
//!   `O_NOFOLLOW` so a symlink swapped in after the check is still refused.
//! - Names are the directory's bytes, UTF-8 or not.
//! - Only regular files, directories and symlinks exist. FIFOs, sockets and
//!   devices are left out of listings and refused by `stat`/`read_range`,
//!   because opening a FIFO blocks until a writer appears, which would pin a
//!   blocking slot forever.
//! - `new` does no I/O: the NAS may be down when MusicFS starts.
//!
//! The component walk and the open are not atomic: whoever can write into the
//! library can swap a directory for a symlink between the two. That is
//! accepted: such a writer can already put any content in the library.

use std::collections::VecDeque;
use std::fs::{self, File, Metadata, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::Semaphore;

use crate::{
    fds, DirEntry, EntryKind, EntryMeta, FileVersion, Origin, OriginError, OriginId, OriginPath,
    Result,
};

mod links;

/// An origin backed by a local (or locally mounted) directory.
#[derive(Debug)]
pub struct LocalOrigin {
    fs: Fs,
    max_blocking: usize,
    slots: Arc<Semaphore>,
}

impl LocalOrigin {
    /// Default number of blocking-pool threads one origin may occupy.
    pub const DEFAULT_MAX_BLOCKING: usize = 32;

    /// An origin rooted at `root`. Does no I/O; a missing root shows up as
    /// errors from the calls and from [`Origin::health`].
    pub fn new(id: OriginId, root: impl Into<PathBuf>) -> LocalOrigin {
        let root: PathBuf = root.into();
        let n = Self::DEFAULT_MAX_BLOCKING;
        LocalOrigin {
            fs: Fs {
                id,
                root: Arc::from(root),
                kept: Arc::new(Mutex::new(Kept::new(n / 2))),
            },
            max_blocking: n,
            slots: Arc::new(Semaphore::new(n - n / 2)),
        }
    }

    /// Caps the fds this origin holds at once at `n`: half of them kept
    /// open for files being read, the other half for the blocking-pool
    /// threads it may occupy at once (and so the threads a hung mount can
    /// pin). Clamped to at least 1, since 0 would make every call wait
    /// forever; with 1, no descriptor is kept.
    pub fn with_max_blocking(mut self, n: usize) -> Self {
        let n = n.clamp(1, Semaphore::MAX_PERMITS);
        self.max_blocking = n;
        self.fs.kept = Arc::new(Mutex::new(Kept::new(n / 2)));
        self.slots = Arc::new(Semaphore::new(n - n / 2));
        self
    }

    /// Descriptors kept open for files being read right now.
    pub fn kept_files(&self) -> usize {
        self.fs.kept.lock().len()
    }

    pub fn root(&self) -> &Path {
        &self.fs.root
    }

    pub fn max_blocking(&self) -> usize {
        self.max_blocking
    }

    /// Runs `f` on the blocking pool while holding one of this origin's slots
    /// (and so at most one of its fds).
    async fn blocking<T, F>(&self, op: &'static str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: Fn(&Fs) -> Result<T> + Send + 'static,
    {
        let permit = Arc::clone(&self.slots)
            .acquire_owned()
            .await
            // The semaphore is private and never closed, but a typed error
            // beats a panic if that ever changes.
            .map_err(|_| OriginError::Unavailable {
                origin: self.fs.id.clone(),
                reason: format!("{op}: the origin's blocking slots were closed"),
            })?;
        let fs = self.fs.clone();
        let task = tokio::task::spawn_blocking(move || {
            // Held until the syscall returns, not until the caller gives up;
            // while out of fds the call waits here, holding its slot, so
            // the queue stays on the semaphore.
            let _permit = permit;
            fds::retry_while_exhausted(fds::FD_WAIT, || f(&fs), OriginError::is_fd_exhaustion)
        });
        task.await.map_err(|err| OriginError::Unavailable {
            origin: self.fs.id.clone(),
            reason: format!(
                "{op} failed in the blocking pool ({err}); a panic here is a MusicFS bug, \
                 a cancellation means the runtime is shutting down"
            ),
        })?
    }
}

#[async_trait]
impl Origin for LocalOrigin {
    fn id(&self) -> &OriginId {
        &self.fs.id
    }

    async fn list(&self, path: &OriginPath) -> Result<Vec<DirEntry>> {
        let path = path.clone();
        self.blocking("list", move |fs| fs.list(&path)).await
    }

    async fn stat(&self, path: &OriginPath) -> Result<EntryMeta> {
        let path = path.clone();
        self.blocking("stat", move |fs| fs.stat(&path)).await
    }

    async fn read_range(
        &self,
        path: &OriginPath,
        version: &FileVersion,
        offset: u64,
        len: u64,
    ) -> Result<Bytes> {
        let path = path.clone();
        let version = version.clone();
        self.blocking("read", move |fs| {
            fs.read_range(&path, &version, offset, len)
        })
        .await
    }

    fn release(&self, path: &OriginPath, version: &FileVersion) {
        // Closing a descriptor of a local file does not block (a hung NFS
        // server may delay close, but only of a descriptor that had dirty
        // data; these are read-only).
        self.fs.kept.lock().forget(path, version);
    }

    async fn health(&self) -> Result<()> {
        self.blocking("health check", |fs| fs.health()).await
    }

    async fn read_link(&self, path: &OriginPath) -> Result<PathBuf> {
        let path = path.clone();
        self.blocking("readlink", move |fs| fs.read_link(&path))
            .await
    }
}

/// The synchronous half: everything here runs on the blocking pool.
#[derive(Debug, Clone)]
struct Fs {
    id: OriginId,
    root: Arc<Path>,
    kept: Arc<Mutex<Kept>>,
}

/// Descriptors kept open per file version while a reader has the version
/// open (until [`Origin::release`]), at most `cap` of them, least recently
/// used dropped first. They count against the origin's fd share (see
/// [`LocalOrigin::with_max_blocking`]).
#[derive(Debug)]
struct Kept {
    cap: usize,
    /// Most recently used last.
    files: VecDeque<(OriginPath, FileVersion, Arc<File>)>,
}

impl Kept {
    fn new(cap: usize) -> Self {
        Self {
            cap,
            files: VecDeque::new(),
        }
    }

    fn position(&self, path: &OriginPath, version: &FileVersion) -> Option<usize> {
        self.files
            .iter()
            .position(|(p, v, _)| p == path && v == version)
    }

    fn get(&mut self, path: &OriginPath, version: &FileVersion) -> Option<Arc<File>> {
        let at = self.position(path, version)?;
        let entry = self.files.remove(at)?;
        let file = Arc::clone(&entry.2);
        self.files.push_back(entry);
        Some(file)
    }

    fn put(&mut self, path: &OriginPath, version: &FileVersion, file: Arc<File>) {
        if self.cap == 0 {
            return;
        }
        if let Some(at) = self.position(path, version) {
            self.files.remove(at);
        }
        while self.files.len() >= self.cap {
            self.files.pop_front();
        }
        self.files.push_back((path.clone(), version.clone(), file));
    }

    fn forget(&mut self, path: &OriginPath, version: &FileVersion) {
        if let Some(at) = self.position(path, version) {
            self.files.remove(at);
        }
    }

    fn len(&self) -> usize {
        self.files.len()
    }
}

impl Fs {
    /// Classifies an I/O error, telling a missing root (the NAS is gone,
    /// retryable) apart from a missing entry (permanent).
    fn io_err(&self, path: &OriginPath, err: io::Error) -> OriginError {
        if err.kind() == io::ErrorKind::NotFound {
            if let Err(root_err) = fs::metadata(&self.root) {
                if root_err.kind() == io::ErrorKind::NotFound {
                    return self.root_missing();
                }
            }
        }
        OriginError::from_io(&self.id, path, err)
    }

    fn root_missing(&self) -> OriginError {
        OriginError::Unavailable {
            origin: self.id.clone(),
            reason: format!(
                "root {} is missing: the NAS looks unmounted; mount it and MusicFS rejoins by itself",
                self.root.display()
            ),
        }
    }

    fn wrong_kind(&self, path: &OriginPath, expected: &'static str) -> OriginError {
        OriginError::WrongKind {
            origin: self.id.clone(),
            path: path.to_string(),
            expected,
        }
    }

    /// The host path of `path` and its `lstat`, refusing symlinks in every
    /// component but the last. The root itself is followed: it is the
    /// operator's configuration, not library content.
    fn lstat_confined(&self, path: &OriginPath) -> Result<(PathBuf, Metadata)> {
        let mut host = self.root.to_path_buf();
        if path.is_root() {
            let meta = fs::metadata(&host).map_err(|e| self.io_err(path, e))?;
            return Ok((host, meta));
        }
        let mut prefix = OriginPath::root();
        let mut components = path.components().peekable();
        while let Some(component) = components.next() {
            host.push(component);
            prefix = prefix.join(component)?;
            let meta = fs::symlink_metadata(&host).map_err(|e| self.io_err(path, e))?;
            if components.peek().is_none() {
                return Ok((host, meta));
            }
            let kind = meta.file_type();
            if kind.is_symlink() {
                return Err(OriginError::OutsideRoot {
                    origin: self.id.clone(),
                    path: path.to_string(),
                });
            }
            if !kind.is_dir() {
                return Err(self.wrong_kind(&prefix, "directory"));
            }
        }
        // OriginPath guarantees a non-root path has at least one component,
        // so the loop always returns; this keeps that a typed error anyway.
        Err(OriginError::InvalidPath {
            path: path.to_string(),
            reason: "has no components",
        })
    }

    fn stat(&self, path: &OriginPath) -> Result<EntryMeta> {
        let (host, meta) = self.lstat_confined(path)?;
        let mut entry =
            entry_meta(&meta).ok_or_else(|| self.wrong_kind(path, "file or directory"))?;
        if entry.kind == EntryKind::Symlink {
            entry.size = target_len(&self.check_link(path, &host)?);
        }
        Ok(entry)
    }

    fn read_link(&self, path: &OriginPath) -> Result<PathBuf> {
        let (host, meta) = self.lstat_confined(path)?;
        if !meta.file_type().is_symlink() {
            return Err(self.wrong_kind(path, "symlink"));
        }
        self.check_link(path, &host)
    }

    /// The target to serve for the symlink at `path` (host path `host`),
    /// checked now; see the `links` module.
    fn check_link(&self, path: &OriginPath, host: &Path) -> Result<PathBuf> {
        links::check(&self.root, path, host).map_err(|refusal| match refusal {
            links::Refusal::Hidden(reason) => OriginError::HiddenSymlink {
                origin: self.id.clone(),
                path: path.to_string(),
                reason,
            },
            links::Refusal::Gone => OriginError::NotFound {
                origin: self.id.clone(),
                path: path.to_string(),
            },
            links::Refusal::Io(e) => self.io_err(path, e),
        })
    }

    fn list(&self, path: &OriginPath) -> Result<Vec<DirEntry>> {
        let (host, meta) = self.lstat_confined(path)?;
        if !meta.is_dir() {
            return Err(self.wrong_kind(path, "directory"));
        }
        let mut entries = Vec::new();
        for entry in fs::read_dir(&host).map_err(|e| self.io_err(path, e))? {
            let entry = entry.map_err(|e| self.io_err(path, e))?;
            let name = entry.file_name();
            // readdir never yields '.', '..' or names with '/', so this only
            // fails on a broken platform; skipping beats failing the listing.
            let Ok(entry_path) = path.join(&name) else {
                tracing::warn!(origin = %self.id, dir = %path, ?name, "skipping an unusable entry name");
                continue;
            };
            // DirEntry::metadata is an lstat on Unix: symlinks stay symlinks.
            let meta = match entry.metadata() {
                Ok(meta) => meta,
                // Deleted between readdir and lstat: it is simply gone now.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                // Anything else means the listing would be silently partial,
                // and callers cache listings.
                Err(e) => return Err(self.io_err(&entry_path, e)),
            };
            let Some(mut meta) = entry_meta(&meta) else {
                tracing::debug!(
                    origin = %self.id,
                    path = %entry_path,
                    "skipping a special file (FIFO, socket or device)"
                );
                continue;
            };
            let mut link_target = None;
            if meta.kind == EntryKind::Symlink {
                match self.check_link(&entry_path, &entry.path()) {
                    Ok(target) => {
                        meta.size = target_len(&target);
                        link_target = Some(target);
                    }
                    // Hidden, or deleted since readdir: not in the listing.
                    Err(e) if e.is_not_found() => {
                        tracing::debug!(origin = %self.id, path = %entry_path, error = %e, "not listing a symlink");
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
            entries.push(DirEntry {
                name,
                meta,
                link_target,
            });
        }
        Ok(entries)
    }

    /// A descriptor of `version` of `path`: the one kept for it, else the
    /// file opened now, which must be that version. A file that is gone
    /// does not hold `version` anymore: `Changed`, as the trait asks, not
    /// `NotFound` (a reader bound to a version sees its file deleted as a
    /// change, the same as a rewrite).
    fn open_version(&self, path: &OriginPath, version: &FileVersion) -> Result<Arc<File>> {
        if let Some(file) = self.kept.lock().get(path, version) {
            return Ok(file);
        }
        let (host, meta) = self
            .lstat_confined(path)
            .map_err(|e| self.version_gone(path, version, e))?;
        // Checked before open: opening a FIFO would block until a writer shows up.
        if !meta.file_type().is_file() {
            return Err(self.wrong_kind(path, "file"));
        }
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&host)
            .map_err(|e| match e.raw_os_error() {
                // The final component became a symlink after the lstat.
                Some(libc::ELOOP) => self.wrong_kind(path, "file"),
                _ => self.io_err(path, e),
            })
            .map_err(|e| self.version_gone(path, version, e))?;
        let file = Arc::new(file);
        self.check_version(path, version, &file, "at open")?;
        self.kept.lock().put(path, version, Arc::clone(&file));
        Ok(file)
    }

    /// `Changed` for an error that says nothing is at `path` now; other
    /// errors as they are.
    fn version_gone(
        &self,
        path: &OriginPath,
        version: &FileVersion,
        e: OriginError,
    ) -> OriginError {
        match e {
            OriginError::NotFound { .. } => OriginError::Changed {
                origin: self.id.clone(),
                path: path.to_string(),
                reason: format!("expected {version}, found {e}"),
            },
            e => e,
        }
    }

    /// `fstat` of an open descriptor against the version a reader expects.
    fn check_version(
        &self,
        path: &OriginPath,
        version: &FileVersion,
        file: &File,
        when: &str,
    ) -> Result<()> {
        let meta = file.metadata().map_err(|e| self.io_err(path, e))?;
        if !meta.file_type().is_file() {
            return Err(self.wrong_kind(path, "file"));
        }
        match entry_meta(&meta) {
            Some(now) if version.matches(&now) => Ok(()),
            now => {
                self.kept.lock().forget(path, version);
                Err(OriginError::Changed {
                    origin: self.id.clone(),
                    path: path.to_string(),
                    reason: format!(
                        "expected {version}, found {} {when}",
                        now.map_or_else(
                            || "another kind of file".to_owned(),
                            |m| m.version().to_string()
                        )
                    ),
                })
            }
        }
    }

    /// Bytes of `version` only: read on the version's descriptor, then
    /// `fstat` again. A writer changes the mtime before it changes bytes,
    /// so a read that overlapped a rewrite in place sees the new mtime
    /// afterwards and fails instead of returning a mix. A file replaced by
    /// rename keeps serving its old inode through the kept descriptor,
    /// which is still exactly the version asked for.
    fn read_range(
        &self,
        path: &OriginPath,
        version: &FileVersion,
        offset: u64,
        len: u64,
    ) -> Result<Bytes> {
        let file = self.open_version(path, version)?;
        // Sized from the version, so an absurd `len` never allocates more
        // than the file holds.
        let want = len.min(version.size.saturating_sub(offset));
        let want = usize::try_from(want).map_err(|_| OriginError::Io {
            origin: self.id.clone(),
            path: path.to_string(),
            source: io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a {want}-byte read does not fit in memory on this platform; read smaller ranges"),
            ),
        })?;
        let buf = match read_at_most(&file, offset, want) {
            Ok(buf) => buf,
            Err(e) => {
                // A descriptor that failed (a NAS that went away under it)
                // is not kept: the next read starts over from the path.
                self.kept.lock().forget(path, version);
                return Err(self.io_err(path, e));
            }
        };
        self.check_version(path, version, &file, "after the read")?;
        if buf.len() != want {
            self.kept.lock().forget(path, version);
            return Err(OriginError::Changed {
                origin: self.id.clone(),
                path: path.to_string(),
                reason: format!(
                    "asked for {want} bytes at {offset} of {version}, got {}",
                    buf.len()
                ),
            });
        }
        Ok(Bytes::from(buf))
    }

    fn health(&self) -> Result<()> {
        let root = OriginPath::root();
        let meta = match fs::metadata(&self.root) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(self.root_missing()),
            Err(e) => return Err(self.io_err(&root, e)),
        };
        if !meta.is_dir() {
            return Err(self.wrong_kind(&root, "directory"));
        }
        // Reading one entry proves the mount answers, not just that the
        // mount point's inode is cached.
        let mut dir = fs::read_dir(&self.root).map_err(|e| self.io_err(&root, e))?;
        match dir.next() {
            None | Some(Ok(_)) => Ok(()),
            Some(Err(e)) => Err(self.io_err(&root, e)),
        }
    }
}

/// `EntryMeta` for a regular file, directory or symlink; `None` for special
/// files, which MusicFS does not expose.
fn entry_meta(meta: &Metadata) -> Option<EntryMeta> {
    let file_type = meta.file_type();
    let kind = if file_type.is_symlink() {
        EntryKind::Symlink
    } else if file_type.is_dir() {
        EntryKind::Dir
    } else if file_type.is_file() {
        EntryKind::File
    } else {
        return None;
    };
    Some(EntryMeta {
        kind,
        size: meta.len(),
        // None rather than a wrapped value for times past the year 2262.
        mtime_ns: meta
            .mtime()
            .checked_mul(1_000_000_000)
            .and_then(|ns| ns.checked_add(meta.mtime_nsec())),
        etag: None,
    })
}

/// A served target's size, as `lstat` reports a symlink's: its length.
fn target_len(target: &Path) -> u64 {
    target.as_os_str().as_bytes().len() as u64
}

/// Positional reads until `want` bytes or end of file.
fn read_at_most(file: &File, offset: u64, want: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; want];
    let mut filled = 0usize;
    while filled < want {
        // `filled` never exceeds the file size minus `offset`, both u64.
        match file.read_at(&mut buf[filled..], offset + filled as u64) {
            // The file shrank since the fstat.
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    buf.truncate(filled);
    Ok(buf)
}

#[cfg(test)]
mod tests;
