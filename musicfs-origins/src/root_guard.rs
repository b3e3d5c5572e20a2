//! A library that never vanishes: an origin whose root is gone or emptied
//! while the cache holds its tree counts as unavailable, not as empty.
//!
//! Layer: a wrapper origin, placed directly on the origin that reaches the
//! storage, below the health monitor's watch and the retries, so that the
//! monitor's probes and every call of the filesystem see its verdict.
//!
//! A NAS that is not mounted leaves its mountpoint directory empty (or, for
//! an automount or a pulled disk, absent). To the origin below, an empty
//! directory is a valid, empty library; served as such, every player's
//! rescan would drop every song. So once the root has been seen with entries
//! (by this process, or in the cached listing the guard is seeded with, see
//! [`RootGuard::remember_root`]), an empty root is a NAS that looks
//! unmounted.
//!
//! Invariants:
//! - After the root was seen with entries, `list` of the root never answers
//!   an empty listing: it answers [`OriginError::Unavailable`] ("looks
//!   unmounted", retryable), so no cache ever replaces a non-empty root
//!   listing with an empty one.
//! - `health` checks the root's contents too (a full root listing instead
//!   of the inner probe, once the root was seen with entries), so the
//!   health monitor reports the vanished root and sees it come back.
//! - `NotFound` while the root is empty or missing is `Unavailable`: a track
//!   missing under an unmounted NAS was not deleted, and must not turn into
//!   ENOENT for the cached tree.
//! - An origin whose root was never seen with entries (a new, empty
//!   library) passes through unchanged.
//! - Only the user can say a library was really emptied: `musicfs forget`
//!   drops the cached tree, so the next mount seeds the guard with nothing.

use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use bytes::Bytes;

use crate::{
    DirEntry, DynOrigin, EntryMeta, FileVersion, Origin, OriginError, OriginId, OriginPath, Result,
};

/// An origin that reports a vanished root as unavailable (see the module
/// docs).
#[derive(Debug)]
pub struct RootGuard {
    inner: DynOrigin,
    /// Where the root is, as the user configured it (for messages).
    location: String,
    /// Entries the root had when last seen with any (0: never seen so).
    known_entries: AtomicUsize,
}

fn entries(n: usize) -> String {
    match n {
        1 => "1 entry".to_owned(),
        n => format!("{n} entries"),
    }
}

/// What the root looks like right now.
enum Root {
    HasEntries,
    Vanished(OriginError),
}

impl RootGuard {
    /// Guards `inner`, whose root is at `location` (a path or URL, shown in
    /// messages). Does no I/O.
    pub fn new(inner: DynOrigin, location: impl Into<String>) -> Self {
        RootGuard {
            inner,
            location: location.into(),
            known_entries: AtomicUsize::new(0),
        }
    }

    /// Seeds the guard with the root listing the cache holds: with any
    /// entries, an empty or missing root counts as unmounted from the first
    /// call on.
    pub fn remember_root(&self, entries: &[DirEntry]) {
        if !entries.is_empty() {
            self.known_entries.store(entries.len(), Ordering::Relaxed);
        }
    }

    /// Entries of the root when last seen with any; 0 when never.
    pub fn known_root_entries(&self) -> usize {
        self.known_entries.load(Ordering::Relaxed)
    }

    fn looks_unmounted(&self, seen: &str) -> OriginError {
        let id = self.inner.id();
        OriginError::Unavailable {
            origin: id.clone(),
            reason: format!(
                "root {} is {seen} but the cache holds {} for it: the NAS looks unmounted; \
                 mount it and MusicFS rejoins by itself (emptied on purpose? stop the mount \
                 and run `musicfs forget {id}`)",
                self.location,
                entries(self.known_root_entries())
            ),
        }
    }

    /// An empty root listing, checked against what was seen before; a
    /// non-empty one is remembered.
    fn judge_root(&self, entries: Vec<DirEntry>) -> Result<Vec<DirEntry>> {
        if entries.is_empty() {
            if self.known_root_entries() > 0 {
                return Err(self.looks_unmounted("empty"));
            }
        } else {
            self.known_entries.store(entries.len(), Ordering::Relaxed);
        }
        Ok(entries)
    }

    /// Lists the root to tell a vanished root from a healthy one.
    async fn root(&self) -> Result<Root> {
        match self.inner.list(&OriginPath::root()).await {
            Ok(entries) if entries.is_empty() => Ok(Root::Vanished(self.looks_unmounted("empty"))),
            Ok(entries) => {
                self.known_entries.store(entries.len(), Ordering::Relaxed);
                Ok(Root::HasEntries)
            }
            Err(e) if e.is_not_found() => Ok(Root::Vanished(self.looks_unmounted("missing"))),
            // The inner origin says why itself (a local origin names a
            // missing root as unmounted, see `LocalOrigin`).
            Err(e @ OriginError::Unavailable { .. }) => Ok(Root::Vanished(e)),
            Err(e) => Err(e),
        }
    }

    /// A `NotFound` under a root that vanished is the root's absence, not
    /// the entry's; so is a read's `Changed` (a file gone while read), which
    /// must not end a player's handle with ESTALE while the NAS is only
    /// unmounted. Every other outcome stands.
    async fn not_found_means<T>(&self, result: Result<T>) -> Result<T> {
        match result {
            Err(e) if (e.is_not_found() || e.is_changed()) && self.known_root_entries() > 0 => {
                match self.root().await {
                    Ok(Root::Vanished(unavailable)) => Err(unavailable),
                    Ok(Root::HasEntries) | Err(_) => Err(e),
                }
            }
            other => other,
        }
    }
}

#[async_trait]
impl Origin for RootGuard {
    fn id(&self) -> &OriginId {
        self.inner.id()
    }

    fn wrapped(&self) -> Option<&DynOrigin> {
        Some(&self.inner)
    }

    async fn list(&self, path: &OriginPath) -> Result<Vec<DirEntry>> {
        let listed = self.inner.list(path).await;
        if path.is_root() {
            return match listed {
                Ok(entries) => self.judge_root(entries),
                Err(e) if e.is_not_found() && self.known_root_entries() > 0 => {
                    Err(self.looks_unmounted("missing"))
                }
                Err(e) => Err(e),
            };
        }
        self.not_found_means(listed).await
    }

    async fn stat(&self, path: &OriginPath) -> Result<EntryMeta> {
        let stat = self.inner.stat(path).await;
        self.not_found_means(stat).await
    }

    async fn read_range(
        &self,
        path: &OriginPath,
        version: &FileVersion,
        offset: u64,
        len: u64,
    ) -> Result<Bytes> {
        let read = self.inner.read_range(path, version, offset, len).await;
        self.not_found_means(read).await
    }

    async fn read_link(&self, path: &OriginPath) -> Result<std::path::PathBuf> {
        let link = self.inner.read_link(path).await;
        self.not_found_means(link).await
    }

    async fn health(&self) -> Result<()> {
        if self.known_root_entries() == 0 {
            return self.inner.health().await;
        }
        // A full root listing proves both that the origin answers and that
        // its root still holds the library.
        match self.root().await? {
            Root::HasEntries => Ok(()),
            Root::Vanished(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LocalOrigin;
    use std::path::Path;
    use std::sync::Arc;

    fn guard(root: &Path) -> RootGuard {
        let local: DynOrigin = Arc::new(LocalOrigin::new(OriginId::new("nas").unwrap(), root));
        RootGuard::new(local, root.display().to_string())
    }

    fn path(p: &str) -> OriginPath {
        OriginPath::new(p).unwrap()
    }

    fn fill(root: &Path) {
        std::fs::create_dir_all(root.join("Artist")).unwrap();
        std::fs::write(root.join("Artist/t.flac"), b"fLaC").unwrap();
        std::fs::write(root.join("cover.jpg"), b"jpg").unwrap();
    }

    fn assert_unmounted(e: &OriginError, seen: &str) {
        assert!(matches!(e, OriginError::Unavailable { .. }), "{e:?}");
        assert!(e.is_retryable());
        let msg = e.to_string();
        assert!(msg.contains("looks unmounted"), "{msg}");
        assert!(msg.contains(seen), "{msg}");
    }

    #[tokio::test]
    async fn a_new_empty_library_is_just_empty() {
        let dir = tempfile::tempdir().unwrap();
        let g = guard(dir.path());
        assert!(g.list(&OriginPath::root()).await.unwrap().is_empty());
        g.health().await.unwrap();
        assert_eq!(g.known_root_entries(), 0);
        let e = g.stat(&path("a.flac")).await.unwrap_err();
        assert!(e.is_not_found(), "{e:?}");
    }

    #[tokio::test]
    async fn an_emptied_root_is_unmounted_until_its_entries_are_back() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("music");
        fill(&root);
        let g = guard(&root);
        assert_eq!(g.list(&OriginPath::root()).await.unwrap().len(), 2);
        g.health().await.unwrap();

        // The NAS goes away and leaves its mountpoint empty.
        let aside = dir.path().join("aside");
        std::fs::rename(&root, &aside).unwrap();
        std::fs::create_dir(&root).unwrap();
        let e = g.list(&OriginPath::root()).await.unwrap_err();
        assert_unmounted(&e, "is empty but the cache holds 2 entries");
        assert!(e.to_string().contains("musicfs forget nas"), "{e}");
        assert_unmounted(&g.health().await.unwrap_err(), "empty");
        // A missing track is not a deleted one while the root is empty.
        assert_unmounted(&g.stat(&path("Artist/t.flac")).await.unwrap_err(), "empty");
        assert_unmounted(&g.list(&path("Artist")).await.unwrap_err(), "empty");
        assert_unmounted(
            &g.read_range(
                &path("Artist/t.flac"),
                &FileVersion {
                    size: 4,
                    mtime_ns: None,
                    etag: None,
                },
                0,
                4,
            )
            .await
            .unwrap_err(),
            "empty",
        );

        // Back: healthy again, and a deleted file is NotFound again.
        std::fs::remove_dir(&root).unwrap();
        std::fs::rename(&aside, &root).unwrap();
        g.health().await.unwrap();
        assert_eq!(g.list(&OriginPath::root()).await.unwrap().len(), 2);
        let e = g.stat(&path("Artist/gone.flac")).await.unwrap_err();
        assert!(e.is_not_found(), "{e:?}");
    }

    #[tokio::test]
    async fn a_missing_root_is_unmounted_and_rejoins() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("music");
        fill(&root);
        let g = guard(&root);
        g.list(&OriginPath::root()).await.unwrap();
        let aside = dir.path().join("aside");
        std::fs::rename(&root, &aside).unwrap();
        for e in [
            g.health().await.unwrap_err(),
            g.list(&OriginPath::root()).await.unwrap_err(),
            g.stat(&path("Artist/t.flac")).await.unwrap_err(),
        ] {
            assert_unmounted(&e, "missing");
        }
        std::fs::rename(&aside, &root).unwrap();
        g.health().await.unwrap();
    }

    #[tokio::test]
    async fn a_seeded_guard_refuses_an_empty_root_from_the_first_call() {
        let dir = tempfile::tempdir().unwrap();
        let g = guard(dir.path());
        let cached = vec![DirEntry {
            link_target: None,
            name: "Artist".into(),
            meta: EntryMeta {
                kind: crate::EntryKind::Dir,
                size: 0,
                mtime_ns: None,
                etag: None,
            },
        }];
        g.remember_root(&[]);
        assert_eq!(g.known_root_entries(), 0, "an empty listing seeds nothing");
        g.remember_root(&cached);
        assert_unmounted(
            &g.list(&OriginPath::root()).await.unwrap_err(),
            "holds 1 entry for it",
        );
        assert_unmounted(&g.health().await.unwrap_err(), "empty");
        fill(dir.path());
        g.health().await.unwrap();
        assert_eq!(g.known_root_entries(), 2);
    }
}
