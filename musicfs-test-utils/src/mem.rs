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
mod tests {
    use super::*;

    fn p(s: &str) -> OriginPath {
        OriginPath::new(s).unwrap()
    }

    fn origin() -> Arc<MemOrigin> {
        MemOrigin::new(OriginId::new("mem").unwrap())
    }

    fn names(mut entries: Vec<DirEntry>) -> Vec<(String, EntryKind)> {
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        entries
            .into_iter()
            .map(|e| (e.name.into_string().unwrap(), e.meta.kind))
            .collect()
    }

    #[tokio::test]
    async fn names_are_bytes() {
        use std::os::unix::ffi::OsStrExt;
        let m = origin();
        let latin1 = OsStr::from_bytes(b"Bj\xf6rk/J\xf3ga.flac");
        m.put(latin1, "old rip");
        m.put("Björk/Jóga.flac", "new rip");
        let root = m.list(&OriginPath::root()).await.unwrap();
        let mut root: Vec<&[u8]> = root.iter().map(|e| e.name.as_bytes()).collect();
        root.sort();
        assert_eq!(root, [&b"Bj\xc3\xb6rk"[..], b"Bj\xf6rk"]);
        let path = OriginPath::new(latin1).unwrap();
        assert_eq!(
            &crate::read_now(&*m, &path, 0, 100).await.unwrap()[..],
            b"old rip"
        );
        let album = m.list(&path.parent().unwrap()).await.unwrap();
        assert_eq!(album[0].name, OsStr::from_bytes(b"J\xf3ga.flac"));
        m.remove(OsStr::from_bytes(b"Bj\xf6rk"));
        assert!(m.stat(&path).await.unwrap_err().is_not_found());
        assert_eq!(m.list(&OriginPath::root()).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn list_gives_direct_children_with_implicit_dirs() {
        let m = origin();
        m.put("Artist/2001 - Album/01 - One.flac", "one");
        m.put("Artist/2001 - Album/02 - Two.mp3", "two!");
        m.put("Artist/cover.jpg", "jpg");
        m.put("Artist B/x.flac", "x");
        m.put("top.txt", "");

        assert_eq!(
            names(m.list(&OriginPath::root()).await.unwrap()),
            vec![
                ("Artist".to_owned(), EntryKind::Dir),
                ("Artist B".to_owned(), EntryKind::Dir),
                ("top.txt".to_owned(), EntryKind::File),
            ]
        );
        assert_eq!(
            names(m.list(&p("Artist")).await.unwrap()),
            vec![
                ("2001 - Album".to_owned(), EntryKind::Dir),
                ("cover.jpg".to_owned(), EntryKind::File),
            ]
        );
        let album = m.list(&p("Artist/2001 - Album")).await.unwrap();
        let two = album.iter().find(|e| e.name == "02 - Two.mp3").unwrap();
        assert_eq!(two.meta.size, 4);
        assert_eq!(album.len(), 2);
    }

    #[tokio::test]
    async fn stat_and_errors_match_a_filesystem() {
        let m = origin();
        m.put("a/b.flac", "data");
        let dir = m.stat(&p("a")).await.unwrap();
        assert_eq!((dir.kind, dir.size), (EntryKind::Dir, 0));
        let root = m.stat(&OriginPath::root()).await.unwrap();
        assert_eq!(root.kind, EntryKind::Dir);
        let file = m.stat(&p("a/b.flac")).await.unwrap();
        assert_eq!((file.kind, file.size), (EntryKind::File, 4));

        assert!(m.stat(&p("a/nope")).await.unwrap_err().is_not_found());
        assert!(m.list(&p("nope")).await.unwrap_err().is_not_found());
        // A read asks for a version; a path that holds none is a change.
        assert!(crate::read_now(&*m, &p("nope"), 0, 1)
            .await
            .unwrap_err()
            .is_changed());
        let wrong = |e: OriginError, want: &str| {
            assert!(!e.is_retryable());
            assert!(
                matches!(e, OriginError::WrongKind { expected, .. } if expected == want),
                "{e:?}"
            );
        };
        wrong(m.list(&p("a/b.flac")).await.unwrap_err(), "directory");
        wrong(
            crate::read_now(&*m, &p("a"), 0, 1).await.unwrap_err(),
            "file",
        );
        wrong(m.stat(&p("a/b.flac/c")).await.unwrap_err(), "directory");
    }

    #[tokio::test]
    async fn read_range_is_short_only_at_eof() {
        let m = origin();
        let data: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        m.put("f", data.clone());
        let f = p("f");
        assert_eq!(
            &crate::read_now(&*m, &f, 10, 20).await.unwrap()[..],
            &data[10..30]
        );
        assert_eq!(
            &crate::read_now(&*m, &f, 990, 20).await.unwrap()[..],
            &data[990..]
        );
        assert_eq!(
            &crate::read_now(&*m, &f, 0, u64::MAX).await.unwrap()[..],
            &data[..]
        );
        assert!(crate::read_now(&*m, &f, 1000, 10).await.unwrap().is_empty());
        assert!(crate::read_now(&*m, &f, u64::MAX, u64::MAX)
            .await
            .unwrap()
            .is_empty());
        assert!(crate::read_now(&*m, &f, 5, 0).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn every_put_is_a_new_version() {
        let m = origin();
        m.put("a/f", "same");
        let v1 = m.stat(&p("a/f")).await.unwrap();
        m.put("a/f", "same");
        let v2 = m.stat(&p("a/f")).await.unwrap();
        assert!(!v1.same_version(&v2));
        assert!(v2.mtime_ns > v1.mtime_ns);

        // A chosen mtime can hide a change (same size, same mtime)...
        m.put_with_mtime("a/f", "SAME", v2.mtime_ns.unwrap());
        let v3 = m.stat(&p("a/f")).await.unwrap();
        assert!(v2.same_version(&v3));
        assert_eq!(
            &crate::read_now(&*m, &p("a/f"), 0, 4).await.unwrap()[..],
            b"SAME"
        );

        // ...but a later put is still newer than any chosen mtime.
        m.put_with_mtime("a/g", "x", i64::MAX - 10);
        m.put("a/f", "same");
        let v4 = m.stat(&p("a/f")).await.unwrap();
        assert!(v4.mtime_ns.unwrap() > i64::MAX - 10);
    }

    #[tokio::test]
    async fn dir_mtime_moves_when_entries_come_and_go() {
        let m = origin();
        m.put("a/f", "1");
        let d1 = m.stat(&p("a")).await.unwrap();
        m.put("a/f", "2");
        assert!(d1.same_version(&m.stat(&p("a")).await.unwrap()));
        m.put("a/g", "3");
        let d2 = m.stat(&p("a")).await.unwrap();
        assert!(!d1.same_version(&d2));
        m.remove("a/g");
        assert!(!d2.same_version(&m.stat(&p("a")).await.unwrap()));
    }

    #[tokio::test]
    async fn remove_deletes_files_and_subtrees() {
        let m = origin();
        m.put("a/b/c.flac", "c");
        m.put("a/d.flac", "d");
        m.put("ab.flac", "ab");
        m.remove("a/d.flac");
        assert!(m.stat(&p("a/d.flac")).await.unwrap_err().is_not_found());
        assert!(m.stat(&p("a")).await.is_ok());
        m.remove("a");
        assert!(m.stat(&p("a/b/c.flac")).await.unwrap_err().is_not_found());
        assert!(m.stat(&p("a/b")).await.unwrap_err().is_not_found());
        // A sibling sharing the name prefix survives.
        assert!(m.stat(&p("ab.flac")).await.is_ok());
        m.remove("does/not/exist");
        m.remove("");
        assert!(m.list(&OriginPath::root()).await.unwrap().is_empty());
        // A removed directory's name can become a file.
        m.put("a", "now a file");
        assert_eq!(m.stat(&p("a")).await.unwrap().kind, EntryKind::File);
    }

    #[tokio::test]
    async fn unavailable_fails_every_call_with_a_retryable_error() {
        let m = origin();
        m.put("f", "x");
        m.set_available(false);
        let errs = [
            m.health().await.unwrap_err(),
            m.list(&OriginPath::root()).await.unwrap_err(),
            m.stat(&p("f")).await.unwrap_err(),
            crate::read_now(&*m, &p("f"), 0, 1).await.unwrap_err(),
        ];
        for e in errs {
            assert!(matches!(e, OriginError::Unavailable { .. }) && e.is_retryable());
        }
        m.set_available(true);
        assert!(m.health().await.is_ok());
        assert_eq!(
            &crate::read_now(&*m, &p("f"), 0, 1).await.unwrap()[..],
            b"x"
        );
    }

    #[tokio::test]
    async fn a_stated_digest_belongs_to_one_version() {
        let m = origin();
        m.put("f", "x");
        let v1 = m.stat(&p("f")).await.unwrap().version();
        assert_eq!(m.whole_digest(&p("f"), &v1), None);
        let d = WholeDigest::Md5([7; 16]);
        m.set_whole_digest("f", Some(d));
        assert_eq!(m.whole_digest(&p("f"), &v1), Some(d));
        m.put("f", "y");
        let v2 = m.stat(&p("f")).await.unwrap().version();
        assert_eq!(m.whole_digest(&p("f"), &v1), None, "old version");
        assert_eq!(m.whole_digest(&p("f"), &v2), None, "a put states none");
    }

    #[test]
    #[should_panic(expected = "is a file")]
    fn putting_under_a_file_is_a_test_bug() {
        let m = origin();
        m.put("a", "file");
        m.put("a/b", "x");
    }
}
