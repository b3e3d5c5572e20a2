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
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;
    use std::time::{Duration, UNIX_EPOCH};
    use tempfile::TempDir;

    fn id(name: &str) -> OriginId {
        OriginId::new(name).unwrap()
    }

    fn p(path: &str) -> OriginPath {
        OriginPath::new(path).unwrap()
    }

    fn origin(dir: &TempDir) -> LocalOrigin {
        LocalOrigin::new(id("music"), dir.path())
    }

    /// The version a reader that just looked at `path` holds (a made-up one
    /// for what is not a file, whose reads fail before any version check).
    async fn now(origin: &LocalOrigin, path: &OriginPath) -> FileVersion {
        origin.stat(path).await.map_or(
            FileVersion {
                size: 100,
                mtime_ns: None,
                etag: None,
            },
            |m| m.version(),
        )
    }

    /// Content where every offset holds a different-looking byte, so an
    /// off-by-one read cannot pass.
    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i.wrapping_mul(31) % 251) as u8).collect()
    }

    fn library() -> (TempDir, Vec<u8>) {
        let dir = TempDir::new().unwrap();
        let album = dir.path().join("坂本龍一").join("1999 - Glass Echo");
        fs::create_dir_all(&album).unwrap();
        let data = pattern(10_000);
        fs::write(album.join("01 - Tide \"north\".flac"), &data).unwrap();
        fs::write(dir.path().join("Björk.mp3"), b"abc").unwrap();
        fs::write(dir.path().join("empty.flac"), b"").unwrap();
        (dir, data)
    }

    fn sorted_names(entries: &[DirEntry]) -> Vec<&str> {
        let mut names: Vec<&str> = entries.iter().map(|e| e.name.to_str().unwrap()).collect();
        names.sort_unstable();
        names
    }

    #[tokio::test]
    async fn new_does_no_io_and_keeps_the_root() {
        let origin = LocalOrigin::new(id("nas"), "/definitely/not/mounted/here");
        assert_eq!(origin.root(), Path::new("/definitely/not/mounted/here"));
        assert_eq!(origin.max_blocking(), LocalOrigin::DEFAULT_MAX_BLOCKING);
        assert_eq!(origin.with_max_blocking(0).max_blocking(), 1);
    }

    #[tokio::test]
    async fn list_stat_read_round_trip() {
        let (dir, data) = library();
        let origin = origin(&dir);

        let root = origin.list(&OriginPath::root()).await.unwrap();
        assert_eq!(sorted_names(&root), ["Björk.mp3", "empty.flac", "坂本龍一"]);
        let by_name = |name: &str| root.iter().find(|e| e.name == name).unwrap().meta.clone();
        assert_eq!(by_name("坂本龍一").kind, EntryKind::Dir);
        assert_eq!(by_name("Björk.mp3").kind, EntryKind::File);
        assert_eq!(by_name("Björk.mp3").size, 3);
        assert_eq!(by_name("empty.flac").size, 0);

        let album = origin.list(&p("坂本龍一/1999 - Glass Echo")).await.unwrap();
        assert_eq!(sorted_names(&album), ["01 - Tide \"north\".flac"]);
        let track = p("/坂本龍一/1999 - Glass Echo/01 - Tide \"north\".flac");
        let meta = origin.stat(&track).await.unwrap();
        assert_eq!(meta.kind, EntryKind::File);
        assert_eq!(meta.size, 10_000);
        assert!(meta.same_version(&album[0].meta));
        assert_eq!(meta.etag, None);

        let whole = origin
            .read_range(&track, &now(&origin, &track).await, 0, u64::MAX)
            .await
            .unwrap();
        assert_eq!(&whole[..], &data[..]);

        let empty = p("empty.flac");
        assert_eq!(origin.stat(&empty).await.unwrap().size, 0);
        assert!(origin
            .read_range(&empty, &now(&origin, &empty).await, 0, 100)
            .await
            .unwrap()
            .is_empty());

        assert_eq!(
            origin.stat(&OriginPath::root()).await.unwrap().kind,
            EntryKind::Dir
        );
    }

    fn set_mtime(path: &Path, secs: u64) {
        let file = File::options().write(true).open(path).unwrap();
        file.set_modified(UNIX_EPOCH + Duration::from_secs(secs))
            .unwrap();
    }

    #[tokio::test]
    async fn a_rewrite_in_place_ends_reads_of_the_old_version() {
        let dir = TempDir::new().unwrap();
        let host = dir.path().join("t.flac");
        fs::write(&host, pattern(10_000)).unwrap();
        set_mtime(&host, 1_000);
        let origin = origin(&dir);
        let t = p("t.flac");
        let old = now(&origin, &t).await;
        assert_eq!(origin.read_range(&t, &old, 0, 10).await.unwrap().len(), 10);
        assert_eq!(
            origin.kept_files(),
            1,
            "the descriptor is kept for the reader"
        );

        // What a tagger does: same size, new bytes, new mtime, same inode.
        fs::write(&host, vec![7u8; 10_000]).unwrap();
        set_mtime(&host, 2_000);
        let err = origin.read_range(&t, &old, 10, 10).await.unwrap_err();
        assert!(err.is_changed(), "{err}");
        assert!(!err.is_retryable());
        assert_eq!(origin.kept_files(), 0, "a stale descriptor is dropped");

        // A reader of the new version gets exactly the new bytes.
        let new = now(&origin, &t).await;
        assert_eq!(
            &origin.read_range(&t, &new, 0, 10).await.unwrap()[..],
            &[7u8; 10]
        );
        // And a reader that opens with an outdated version is refused at once.
        let err = origin.read_range(&t, &old, 0, 10).await.unwrap_err();
        assert!(err.is_changed(), "{err}");
    }

    #[tokio::test]
    async fn a_file_replaced_by_rename_serves_the_old_version_to_its_reader() {
        let dir = TempDir::new().unwrap();
        let host = dir.path().join("t.flac");
        let old_bytes = pattern(10_000);
        fs::write(&host, &old_bytes).unwrap();
        set_mtime(&host, 1_000);
        let origin = origin(&dir);
        let t = p("t.flac");
        let old = now(&origin, &t).await;
        origin.read_range(&t, &old, 0, 1).await.unwrap();

        let tmp = dir.path().join(".t.flac.tmp");
        fs::write(&tmp, vec![9u8; 12_000]).unwrap();
        fs::rename(&tmp, &host).unwrap();

        // The kept descriptor still holds exactly the old version.
        let rest = origin.read_range(&t, &old, 1, u64::MAX).await.unwrap();
        assert_eq!(&rest[..], &old_bytes[1..]);
        let new = now(&origin, &t).await;
        assert_eq!(new.size, 12_000);
        assert_eq!(
            &origin.read_range(&t, &new, 11_990, 100).await.unwrap()[..],
            &[9u8; 10]
        );

        origin.release(&t, &old);
        origin.release(&t, &new);
        assert_eq!(origin.kept_files(), 0);
        // Without its descriptor, the old version is gone for good.
        let err = origin.read_range(&t, &old, 0, 1).await.unwrap_err();
        assert!(err.is_changed(), "{err}");
    }

    #[tokio::test]
    async fn a_file_deleted_before_its_reader_reads_is_a_change() {
        let dir = TempDir::new().unwrap();
        let host = dir.path().join("t.flac");
        fs::write(&host, pattern(10_000)).unwrap();
        let origin = origin(&dir);
        let t = p("t.flac");
        let version = now(&origin, &t).await;
        fs::remove_file(&host).unwrap();
        let err = origin.read_range(&t, &version, 0, 10).await.unwrap_err();
        assert!(err.is_changed(), "{err}");
        assert!(!err.is_retryable());
        // Asking about the path itself still says nothing is there.
        assert!(origin.stat(&t).await.unwrap_err().is_not_found());
    }

    #[tokio::test]
    async fn kept_descriptors_stay_within_the_fd_share() {
        let dir = TempDir::new().unwrap();
        for i in 0..10 {
            fs::write(dir.path().join(format!("{i}.flac")), b"abc").unwrap();
        }
        let origin = LocalOrigin::new(id("music"), dir.path()).with_max_blocking(8);
        for i in 0..10 {
            let t = p(&format!("{i}.flac"));
            let v = now(&origin, &t).await;
            assert_eq!(&origin.read_range(&t, &v, 0, 3).await.unwrap()[..], b"abc");
        }
        assert_eq!(origin.kept_files(), 4, "half of 8 fds are kept, LRU");
        let one = LocalOrigin::new(id("music"), dir.path()).with_max_blocking(1);
        let t = p("0.flac");
        let v = now(&one, &t).await;
        one.read_range(&t, &v, 0, 3).await.unwrap();
        assert_eq!(one.kept_files(), 0);
    }

    #[tokio::test]
    async fn mtime_has_nanoseconds() {
        let dir = TempDir::new().unwrap();
        let file = File::create(dir.path().join("a.flac")).unwrap();
        let when = UNIX_EPOCH + Duration::new(1_600_000_000, 123_456_789);
        file.set_modified(when).unwrap();
        drop(file);
        let meta = origin(&dir).stat(&p("a.flac")).await.unwrap();
        assert_eq!(meta.mtime_ns, Some(1_600_000_000_123_456_789));
    }

    #[tokio::test]
    async fn range_reads_at_start_middle_end_and_past_end() {
        let (dir, data) = library();
        let origin = origin(&dir);
        let track = p("坂本龍一/1999 - Glass Echo/01 - Tide \"north\".flac");
        let v = now(&origin, &track).await;
        let read = |offset, len| origin.read_range(&track, &v, offset, len);

        assert_eq!(&read(0, 100).await.unwrap()[..], &data[..100]);
        assert_eq!(&read(4_321, 1_000).await.unwrap()[..], &data[4_321..5_321]);
        assert_eq!(&read(9_990, 100).await.unwrap()[..], &data[9_990..]);
        assert_eq!(&read(9_999, 1).await.unwrap()[..], &data[9_999..]);
        assert!(read(10_000, 100).await.unwrap().is_empty());
        assert!(read(50_000, 100).await.unwrap().is_empty());
        assert!(read(u64::MAX, u64::MAX).await.unwrap().is_empty());
        assert!(read(5, 0).await.unwrap().is_empty());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        #[test]
        fn read_range_equals_slice_of_whole_file(
            offset in proptest::prop_oneof![0u64..12_000, proptest::prelude::any::<u64>()],
            len in proptest::prop_oneof![0u64..12_000, proptest::prelude::any::<u64>()],
        ) {
            let dir = TempDir::new().unwrap();
            let data = pattern(10_007);
            fs::write(dir.path().join("t.flac"), &data).unwrap();
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let got = rt
                .block_on(async {
                    let (o, t) = (origin(&dir), p("t.flac"));
                    o.read_range(&t, &now(&o, &t).await, offset, len).await
                })
                .unwrap();
            let size = data.len() as u64;
            let start = offset.min(size) as usize;
            let end = offset.saturating_add(len).min(size) as usize;
            proptest::prop_assert_eq!(&got[..], &data[start..end]);
        }
    }

    #[tokio::test]
    async fn symlinks_inside_are_served_and_outside_hidden() {
        let outside = TempDir::new().unwrap();
        fs::write(outside.path().join("secret.flac"), b"secret").unwrap();
        let (dir, data) = library();
        let root = dir.path();
        fs::create_dir(root.join("Favourites")).unwrap();
        let link = |target: &Path, at: &str| std::os::unix::fs::symlink(target, root.join(at));
        link(
            Path::new("../坂本龍一/1999 - Glass Echo"),
            "Favourites/Glass Echo",
        )
        .unwrap();
        link(Path::new("../Björk.mp3"), "Favourites/Björk.mp3").unwrap();
        link(&root.join("坂本龍一"), "Favourites/absolute").unwrap();
        link(Path::new("/etc"), "etc").unwrap();
        link(outside.path(), "elsewhere").unwrap();
        link(&outside.path().join("secret.flac"), "secret.flac").unwrap();
        link(Path::new("../../etc"), "Favourites/up").unwrap();
        link(Path::new("../etc"), "Favourites/chain").unwrap();
        let origin = origin(&dir);

        // Outside the root, directly, by `..` or through another link: hidden.
        let listing = origin.list(&OriginPath::root()).await.unwrap();
        assert_eq!(
            sorted_names(&listing),
            ["Björk.mp3", "Favourites", "empty.flac", "坂本龍一"]
        );
        let favourites = origin.list(&p("Favourites")).await.unwrap();
        assert_eq!(
            sorted_names(&favourites),
            ["Björk.mp3", "Glass Echo", "absolute"]
        );
        for entry in &favourites {
            assert_eq!(entry.meta.kind, EntryKind::Symlink);
            let target = entry.link_target.clone().unwrap();
            assert_eq!(entry.meta.size, target.as_os_str().len() as u64);
            // `stat` and `read_link` say what the listing said.
            let path = p("Favourites").join(&entry.name).unwrap();
            assert_eq!(origin.read_link(&path).await.unwrap(), target);
            assert_eq!(origin.stat(&path).await.unwrap(), entry.meta);
        }
        let target_of = |name: &str| {
            favourites
                .iter()
                .find(|e| e.name == name)
                .and_then(|e| e.link_target.clone())
                .unwrap()
        };
        assert_eq!(
            target_of("Glass Echo"),
            Path::new("../坂本龍一/1999 - Glass Echo")
        );
        // An absolute target inside the root is served relative.
        assert_eq!(target_of("absolute"), Path::new("../坂本龍一"));

        for hidden in [
            "etc",
            "elsewhere",
            "secret.flac",
            "Favourites/up",
            "Favourites/chain",
        ] {
            let err = origin.stat(&p(hidden)).await.unwrap_err();
            assert!(
                matches!(err, OriginError::HiddenSymlink { .. }),
                "{hidden}: {err}"
            );
            assert!(err.is_not_found() && !err.is_retryable(), "{hidden}: {err}");
            let err = origin.read_link(&p(hidden)).await.unwrap_err();
            assert!(
                matches!(err, OriginError::HiddenSymlink { .. }),
                "{hidden}: {err}"
            );
        }

        // Checked on every call: re-pointed outside, the link disappears.
        fs::remove_file(root.join("Favourites/Glass Echo")).unwrap();
        link(Path::new("../.."), "Favourites/Glass Echo").unwrap();
        let favourites = origin.list(&p("Favourites")).await.unwrap();
        assert_eq!(sorted_names(&favourites), ["Björk.mp3", "absolute"]);
        let err = origin
            .read_link(&p("Favourites/Glass Echo"))
            .await
            .unwrap_err();
        assert!(matches!(err, OriginError::HiddenSymlink { .. }), "{err}");

        // `read_link` of anything but a symlink is the wrong kind.
        let err = origin.read_link(&p("Björk.mp3")).await.unwrap_err();
        assert!(
            matches!(
                err,
                OriginError::WrongKind {
                    expected: "symlink",
                    ..
                }
            ),
            "{err}"
        );

        // A final symlink is not a file or directory, wherever it points.
        let err = origin
            .read_range(
                &p("Favourites/Björk.mp3"),
                &now(&origin, &p("Favourites/Björk.mp3")).await,
                0,
                100,
            )
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                OriginError::WrongKind {
                    expected: "file",
                    ..
                }
            ),
            "{err}"
        );
        let err = origin.list(&p("Favourites/absolute")).await.unwrap_err();
        assert!(
            matches!(
                err,
                OriginError::WrongKind {
                    expected: "directory",
                    ..
                }
            ),
            "{err}"
        );
        // Going through a symlinked directory is refused, inside or not:
        // through the mount, the kernel resolves links itself.
        let err = origin
            .read_range(
                &p("Favourites/Glass Echo/01 - Tide \"north\".flac"),
                &now(
                    &origin,
                    &p("Favourites/Glass Echo/01 - Tide \"north\".flac"),
                )
                .await,
                0,
                1,
            )
            .await
            .unwrap_err();
        assert!(matches!(err, OriginError::OutsideRoot { .. }), "{err}");
        let through = p("elsewhere/secret.flac");
        let err = origin
            .read_range(&through, &now(&origin, &through).await, 0, 100)
            .await
            .unwrap_err();
        assert!(matches!(err, OriginError::OutsideRoot { .. }), "{err}");
        assert!(!err.is_retryable());
        let err = origin.stat(&p("etc/passwd")).await.unwrap_err();
        assert!(matches!(err, OriginError::OutsideRoot { .. }), "{err}");
        let err = origin.list(&p("etc/ssl")).await.unwrap_err();
        assert!(matches!(err, OriginError::OutsideRoot { .. }), "{err}");
        // The file the links lead to is untouched.
        let track = p("坂本龍一/1999 - Glass Echo/01 - Tide \"north\".flac");
        assert_eq!(
            &origin
                .read_range(&track, &now(&origin, &track).await, 0, u64::MAX)
                .await
                .unwrap()[..],
            &data[..]
        );
    }

    #[tokio::test]
    async fn not_found_is_permanent() {
        let (dir, _) = library();
        let origin = origin(&dir);
        for path in ["nope.flac", "坂本龍一/nope/x.flac"] {
            let err = origin.stat(&p(path)).await.unwrap_err();
            assert!(err.is_not_found(), "{path}: {err}");
            assert!(!err.is_retryable());
        }
        // A read asks for a version, which a missing file does not have.
        let err = origin
            .read_range(&p("nope.flac"), &now(&origin, &p("nope.flac")).await, 0, 1)
            .await
            .unwrap_err();
        assert!(err.is_changed(), "{err}");
        assert!(!err.is_retryable());
        let err = origin.list(&p("nope")).await.unwrap_err();
        assert!(err.is_not_found(), "{err}");
    }

    #[tokio::test]
    async fn missing_root_is_unavailable_and_retryable() {
        let dir = TempDir::new().unwrap();
        let root = dir.path().join("nas");
        let origin = LocalOrigin::new(id("nas"), &root);

        let err = origin.health().await.unwrap_err();
        assert!(matches!(err, OriginError::Unavailable { .. }), "{err}");
        assert!(err.is_retryable());
        assert!(err.to_string().contains("missing"), "{err}");
        // With the root gone, a missing file says nothing about the file.
        let err = origin.stat(&p("a.flac")).await.unwrap_err();
        assert!(matches!(err, OriginError::Unavailable { .. }), "{err}");

        // The NAS comes back.
        fs::create_dir(&root).unwrap();
        origin.health().await.unwrap();
        fs::write(root.join("a.flac"), b"x").unwrap();
        origin.health().await.unwrap();
        assert!(origin.stat(&p("b.flac")).await.unwrap_err().is_not_found());
    }

    #[tokio::test]
    async fn root_that_is_a_file_is_unhealthy() {
        let dir = TempDir::new().unwrap();
        fs::write(dir.path().join("file"), b"x").unwrap();
        let origin = LocalOrigin::new(id("nas"), dir.path().join("file"));
        let err = origin.health().await.unwrap_err();
        assert!(
            matches!(
                err,
                OriginError::WrongKind {
                    expected: "directory",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn wrong_kinds_are_refused() {
        let (dir, _) = library();
        let origin = origin(&dir);
        let err = origin.list(&p("Björk.mp3")).await.unwrap_err();
        assert!(
            matches!(
                err,
                OriginError::WrongKind {
                    expected: "directory",
                    ..
                }
            ),
            "{err}"
        );
        assert!(!err.is_retryable());
        let err = origin
            .read_range(&p("坂本龍一"), &now(&origin, &p("坂本龍一")).await, 0, 10)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                OriginError::WrongKind {
                    expected: "file",
                    ..
                }
            ),
            "{err}"
        );
        // A file used as a directory is named in the error.
        let err = origin.stat(&p("Björk.mp3/x")).await.unwrap_err();
        match err {
            OriginError::WrongKind { path, expected, .. } => {
                assert_eq!((path.as_str(), expected), ("/Björk.mp3", "directory"));
            }
            other => panic!("unexpected {other}"),
        }
    }

    #[tokio::test]
    async fn latin1_names_are_served_under_their_exact_bytes() {
        let dir = TempDir::new().unwrap();
        let bjork = std::ffi::OsStr::from_bytes(b"Bj\xf6rk");
        let track = std::ffi::OsStr::from_bytes(b"J\xf3ga.flac");
        fs::create_dir(dir.path().join(bjork)).unwrap();
        fs::write(dir.path().join(bjork).join(track), b"latin-1").unwrap();
        fs::write(dir.path().join("good.flac"), b"x").unwrap();
        let origin = origin(&dir);

        let listing = origin.list(&OriginPath::root()).await.unwrap();
        let mut names: Vec<&[u8]> = listing.iter().map(|e| e.name.as_bytes()).collect();
        names.sort_unstable();
        assert_eq!(names, [&b"Bj\xf6rk"[..], b"good.flac"]);
        let album = OriginPath::root().join(bjork).unwrap();
        let inside = origin.list(&album).await.unwrap();
        assert_eq!(inside.len(), 1);
        assert_eq!(inside[0].name, track);
        let path = album.join(track).unwrap();
        assert_eq!(path.as_bytes(), b"Bj\xf6rk/J\xf3ga.flac");
        assert_eq!(origin.stat(&path).await.unwrap().size, 7);
        assert_eq!(
            &origin
                .read_range(&path, &now(&origin, &path).await, 0, 100)
                .await
                .unwrap()[..],
            b"latin-1"
        );
    }

    #[tokio::test]
    async fn fifos_are_hidden_and_never_opened() {
        let dir = TempDir::new().unwrap();
        let status = std::process::Command::new("mkfifo")
            .arg(dir.path().join("pipe.flac"))
            .status()
            .unwrap();
        assert!(status.success());
        fs::write(dir.path().join("song.flac"), b"x").unwrap();
        let origin = origin(&dir);

        let listing = origin.list(&OriginPath::root()).await.unwrap();
        assert_eq!(sorted_names(&listing), ["song.flac"]);
        // Opening the FIFO would block forever; the timeout only guards the
        // test against that regression.
        let read = tokio::time::timeout(
            Duration::from_secs(10),
            origin.read_range(&p("pipe.flac"), &now(&origin, &p("pipe.flac")).await, 0, 10),
        )
        .await
        .expect("read_range opened the FIFO and blocked");
        let err = read.unwrap_err();
        assert!(
            matches!(
                err,
                OriginError::WrongKind {
                    expected: "file",
                    ..
                }
            ),
            "{err}"
        );
        let err = origin.stat(&p("pipe.flac")).await.unwrap_err();
        assert!(matches!(err, OriginError::WrongKind { .. }), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn saturated_origin_does_not_block_other_origins() {
        let (hung_dir, _) = library();
        let (other_dir, _) = library();
        let hung = Arc::new(LocalOrigin::new(id("hung"), hung_dir.path()).with_max_blocking(1));
        let other = LocalOrigin::new(id("other"), other_dir.path()).with_max_blocking(1);

        // Occupy the hung origin's only slot with a call stuck in the
        // blocking pool, as a syscall on a dead NAS would be.
        let (entered_tx, entered_rx) = tokio::sync::oneshot::channel();
        // `blocking` may run its closure again (while out of fds), so the
        // one-shot sender sits in a slot it is taken from.
        let entered_tx = std::sync::Mutex::new(Some(entered_tx));
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let stuck = tokio::spawn({
            let hung = Arc::clone(&hung);
            async move {
                hung.blocking("stuck", move |_| {
                    if let Some(tx) = entered_tx.lock().unwrap().take() {
                        let _ = tx.send(());
                    }
                    let _ = release_rx.recv();
                    Ok(())
                })
                .await
            }
        });
        entered_rx.await.unwrap();

        // The other origin answers at once (the timeout only guards the test).
        let meta = tokio::time::timeout(Duration::from_secs(10), other.stat(&p("Björk.mp3")))
            .await
            .expect("a saturated origin blocked another origin")
            .unwrap();
        assert_eq!(meta.size, 3);

        // The hung origin's callers queue on its semaphore instead of taking
        // more threads: this call cannot start while the slot is held.
        let queued = tokio::spawn({
            let hung = Arc::clone(&hung);
            async move { hung.stat(&p("Björk.mp3")).await }
        });
        let waited =
            tokio::time::timeout(Duration::from_millis(50), hung.stat(&p("Björk.mp3"))).await;
        assert!(waited.is_err(), "a call ran without a free slot");
        assert!(!queued.is_finished());

        release_tx.send(()).unwrap();
        stuck.await.unwrap().unwrap();
        assert_eq!(queued.await.unwrap().unwrap().size, 3);
    }

    #[tokio::test]
    async fn panics_in_the_blocking_pool_become_unavailable() {
        let (dir, _) = library();
        let origin = origin(&dir);
        let err = origin
            .blocking::<(), _>("boom", |_| panic!("injected"))
            .await
            .unwrap_err();
        assert!(matches!(err, OriginError::Unavailable { .. }), "{err}");
        assert!(err.to_string().contains("boom"), "{err}");
        // The slot came back with the panicking thread (half of the fd
        // share is slots, the other half kept descriptors).
        let n = origin.max_blocking();
        assert_eq!(origin.slots.available_permits(), n - n / 2);
        origin.health().await.unwrap();
    }
}
