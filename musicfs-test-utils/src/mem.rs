//! An in-memory origin for engine tests.
//!
//! [`MemOrigin`] holds files in a map and can be changed while MusicFS runs
//! on top of it, so a test can rewrite a file under a warm cache, delete it,
//! or take the whole origin down.
//!
//! Invariants:
//! - It behaves like a filesystem: every ancestor of a file is a directory
//!   (created implicitly), a path is never both a file and a directory, and
//!   missing or wrong-kind paths give [`OriginError::NotFound`] /
//!   [`OriginError::WrongKind`] exactly where a local disk would.
//! - `read_range` follows the trait to the letter: short only at the end of
//!   the file, empty at or past it, [`OriginError::Changed`] when the file
//!   is no longer the version asked for. Returned buffers share the stored bytes,
//!   so reading a 100 MB file costs no copy.
//! - [`MemOrigin::put`] always produces a new version: its mtime is a clock
//!   that only moves forward, past every mtime ever stored. A directory's
//!   mtime moves when entries are added to or removed from it, as on disk.
//! - Calls never await anything: latency and faults come from wrapping it
//!   in [`crate::FaultyOrigin`].

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStringExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use musicfs_origins::{
    DirEntry, EntryKind, EntryMeta, FileVersion, Origin, OriginError, OriginId, OriginPath, Result,
    WholeDigest,
};
use parking_lot::Mutex;

/// Where the mtime clock starts: 2023-11-14, so times look like real ones to
/// code that turns them into dates.
const CLOCK_START_NS: i64 = 1_700_000_000_000_000_000;

#[derive(Debug)]
struct MemFile {
    data: Bytes,
    mtime_ns: i64,
    /// What [`Origin::whole_digest`] states for this version, if anything.
    digest: Option<WholeDigest>,
}

#[derive(Debug)]
struct State {
    /// Keyed by `OriginPath::as_bytes()` (names are bytes, UTF-8 or not).
    /// Keys sharing a prefix are contiguous, which `list` relies on.
    files: BTreeMap<Vec<u8>, MemFile>,
    /// Directory path to mtime. Always holds the root, `""`.
    dirs: BTreeMap<Vec<u8>, i64>,
    clock: i64,
}

impl State {
    fn touch_parent(&mut self, path: &OriginPath) {
        if let Some(parent) = path.parent() {
            let clock = self.clock;
            if let Some(mtime) = self.dirs.get_mut(parent.as_bytes()) {
                *mtime = clock;
            }
        }
    }

    /// What a failed lookup of `path` should say: `WrongKind` when some
    /// ancestor is a file (ENOTDIR on disk), else `NotFound`.
    fn missing(&self, origin: &OriginId, path: &OriginPath) -> OriginError {
        let mut ancestor = path.parent();
        while let Some(a) = ancestor {
            if self.files.contains_key(a.as_bytes()) {
                return OriginError::WrongKind {
                    origin: origin.clone(),
                    path: path.to_string(),
                    expected: "directory",
                };
            }
            ancestor = a.parent();
        }
        OriginError::NotFound {
            origin: origin.clone(),
            path: path.to_string(),
        }
    }

    fn insert(&mut self, path: &OriginPath, data: Bytes, mtime_ns: i64) {
        assert!(!path.is_root(), "MemOrigin: cannot put a file at the root");
        let mut ancestors = Vec::new();
        let mut ancestor = path.parent();
        while let Some(a) = ancestor {
            ancestor = a.parent();
            ancestors.push(a);
        }
        for dir in ancestors.iter().rev() {
            assert!(
                !self.files.contains_key(dir.as_bytes()),
                "MemOrigin: cannot put {path}: {dir} is a file"
            );
            if !self.dirs.contains_key(dir.as_bytes()) {
                self.dirs.insert(dir.as_bytes().to_vec(), self.clock);
                self.touch_parent(dir);
            }
        }
        assert!(
            !self.dirs.contains_key(path.as_bytes()),
            "MemOrigin: cannot put {path}: it is a directory"
        );
        let file = MemFile {
            data,
            mtime_ns,
            digest: None,
        };
        if self.files.insert(path.as_bytes().to_vec(), file).is_none() {
            self.touch_parent(path);
        }
    }
}

/// A mutable in-memory origin. See the module docs.
#[derive(Debug)]
pub struct MemOrigin {
    id: OriginId,
    state: Mutex<State>,
    available: AtomicBool,
}

fn parse<P: AsRef<OsStr> + ?Sized>(path: &P) -> OriginPath {
    match OriginPath::new(path) {
        Ok(p) => p,
        Err(e) => panic!("MemOrigin: bad path in test: {e}"),
    }
}

fn file_meta(file: &MemFile) -> EntryMeta {
    EntryMeta {
        kind: EntryKind::File,
        size: file.data.len() as u64,
        mtime_ns: Some(file.mtime_ns),
        etag: None,
    }
}

fn dir_meta(mtime_ns: i64) -> EntryMeta {
    EntryMeta {
        kind: EntryKind::Dir,
        size: 0,
        mtime_ns: Some(mtime_ns),
        etag: None,
    }
}

impl MemOrigin {
    /// An empty, available origin: just the root directory.
    pub fn new(id: OriginId) -> Arc<Self> {
        let mut dirs = BTreeMap::new();
        dirs.insert(Vec::new(), CLOCK_START_NS);
        Arc::new(Self {
            id,
            state: Mutex::new(State {
                files: BTreeMap::new(),
                dirs,
                clock: CLOCK_START_NS,
            }),
            available: AtomicBool::new(true),
        })
    }

    /// Creates or replaces the file at `path`, creating its parent
    /// directories, with an mtime newer than any stored so far.
    ///
    /// # Panics
    /// When `path` is not a valid [`OriginPath`], is the root, is a
    /// directory, or has a file as an ancestor: these are bugs in the test.
    pub fn put<P: AsRef<OsStr> + ?Sized>(&self, path: &P, data: impl Into<Bytes>) {
        let path = parse(path);
        let mut state = self.state.lock();
        state.clock = state.clock.saturating_add(1);
        let mtime = state.clock;
        state.insert(&path, data.into(), mtime);
    }

    /// Like [`MemOrigin::put`] with a chosen mtime, e.g. to rewrite a file
    /// while keeping its size and mtime, as some sync tools do.
    ///
    /// # Panics
    /// As [`MemOrigin::put`].
    pub fn put_with_mtime<P: AsRef<OsStr> + ?Sized>(
        &self,
        path: &P,
        data: impl Into<Bytes>,
        mtime_ns: i64,
    ) {
        let path = parse(path);
        let mut state = self.state.lock();
        // Keeps the promise that a later `put` is newer than this file.
        state.clock = state.clock.max(mtime_ns);
        state.insert(&path, data.into(), mtime_ns);
    }

    /// Removes the file at `path`, or the directory and everything under it.
    /// Removing the root empties the origin. A missing path is ignored.
    ///
    /// # Panics
    /// When `path` is not a valid [`OriginPath`].
    pub fn remove<P: AsRef<OsStr> + ?Sized>(&self, path: &P) {
        let path = parse(path);
        let mut state = self.state.lock();
        state.clock = state.clock.saturating_add(1);
        let key = path.as_bytes();
        let removed_file = state.files.remove(key).is_some();
        let removed_dir = if path.is_root() {
            state.files.clear();
            state.dirs.retain(|k, _| k.is_empty());
            let clock = state.clock;
            state.dirs.insert(Vec::new(), clock);
            false
        } else if state.dirs.remove(key).is_some() {
            let prefix = [key, b"/"].concat();
            state.files.retain(|k, _| !k.starts_with(&prefix));
            state.dirs.retain(|k, _| !k.starts_with(&prefix));
            true
        } else {
            false
        };
        if removed_file || removed_dir {
            state.touch_parent(&path);
        }
    }

    /// States `digest` as the whole-content digest of the file now at
    /// `path` (what an S3 ETag of a single-part upload says), or none. The
    /// test chooses it, so it may be wrong on purpose; the next
    /// [`MemOrigin::put`] of the path states none again (a new version).
    ///
    /// # Panics
    /// When no file is at `path`: a bug in the test.
    pub fn set_whole_digest<P: AsRef<OsStr> + ?Sized>(
        &self,
        path: &P,
        digest: Option<WholeDigest>,
    ) {
        let path = parse(path);
        let mut state = self.state.lock();
        match state.files.get_mut(path.as_bytes()) {
            Some(file) => file.digest = digest,
            None => panic!("MemOrigin: no file at {path} to state a digest for"),
        }
    }

    /// When `up` is false every call, health checks included, fails with
    /// [`OriginError::Unavailable`], like an unreachable NAS.
    pub fn set_available(&self, up: bool) {
        self.available.store(up, Ordering::SeqCst);
    }

    fn check_up(&self) -> Result<()> {
        if self.available.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(OriginError::Unavailable {
                origin: self.id.clone(),
                reason: "MemOrigin set unavailable by the test".to_owned(),
            })
        }
    }
}

#[async_trait]
impl Origin for MemOrigin {
    fn id(&self) -> &OriginId {
        &self.id
    }

    async fn list(&self, path: &OriginPath) -> Result<Vec<DirEntry>> {
        self.check_up()?;
        let state = self.state.lock();
        let key = path.as_bytes();
        if !state.dirs.contains_key(key) {
            if state.files.contains_key(key) {
                return Err(OriginError::WrongKind {
                    origin: self.id.clone(),
                    path: path.to_string(),
                    expected: "directory",
                });
            }
            return Err(state.missing(&self.id, path));
        }
        let prefix = if path.is_root() {
            Vec::new()
        } else {
            [key, b"/"].concat()
        };
        // A direct child is a key under the prefix with no further '/'.
        let child = |k: &[u8]| -> Option<OsString> {
            let rest = k.strip_prefix(prefix.as_slice())?;
            (!rest.is_empty() && !rest.contains(&b'/')).then(|| OsString::from_vec(rest.to_vec()))
        };
        let mut entries = Vec::new();
        for (k, file) in state.files.range(prefix.clone()..) {
            if !k.starts_with(&prefix) {
                break;
            }
            if let Some(name) = child(k) {
                entries.push(DirEntry::new(name, file_meta(file)));
            }
        }
        for (k, mtime) in state.dirs.range(prefix.clone()..) {
            if !k.starts_with(&prefix) {
                break;
            }
            if let Some(name) = child(k) {
                entries.push(DirEntry::new(name, dir_meta(*mtime)));
            }
        }
        Ok(entries)
    }

    async fn stat(&self, path: &OriginPath) -> Result<EntryMeta> {
        self.check_up()?;
        let state = self.state.lock();
        if let Some(file) = state.files.get(path.as_bytes()) {
            return Ok(file_meta(file));
        }
        if let Some(mtime) = state.dirs.get(path.as_bytes()) {
            return Ok(dir_meta(*mtime));
        }
        Err(state.missing(&self.id, path))
    }

    async fn read_range(
        &self,
        path: &OriginPath,
        version: &FileVersion,
        offset: u64,
        len: u64,
    ) -> Result<Bytes> {
        self.check_up()?;
        let state = self.state.lock();
        let Some(file) = state.files.get(path.as_bytes()) else {
            if state.dirs.contains_key(path.as_bytes()) {
                return Err(OriginError::WrongKind {
                    origin: self.id.clone(),
                    path: path.to_string(),
                    expected: "file",
                });
            }
            // Deleted: the version asked for is gone, as after a rewrite.
            return Err(OriginError::Changed {
                origin: self.id.clone(),
                path: path.to_string(),
                reason: format!("expected {version}, found nothing"),
            });
        };
        let now = file_meta(file);
        if !version.matches(&now) {
            return Err(OriginError::Changed {
                origin: self.id.clone(),
                path: path.to_string(),
                reason: format!("expected {version}, found {}", now.version()),
            });
        }
        let size = file.data.len() as u64;
        let start = offset.min(size);
        let end = offset.saturating_add(len).min(size);
        // Both are at most `size`, which came from a `usize`, so they fit.
        let (start, end) = (start as usize, end as usize);
        Ok(file.data.slice(start..end))
    }

    async fn health(&self) -> Result<()> {
        self.check_up()
    }

    fn whole_digest(&self, path: &OriginPath, version: &FileVersion) -> Option<WholeDigest> {
        let state = self.state.lock();
        let file = state.files.get(path.as_bytes())?;
        // Only for the version asked about: an old version's digest must
        // not vouch for new bytes.
        if version.matches(&file_meta(file)) {
            file.digest
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests;
