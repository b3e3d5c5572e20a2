//! What a running mount answers outside the kernel: the CLI's control
//! socket asks which origin files a path of the mount stands for (`pin`,
//! `warm`) and how far the tag scan has come (`status`).
//!
//! Layer: beside the kernel handlers, over the same state (`fs.rs`). It
//! answers from memory only (the inode-free path walk below, the view's
//! tree), never from an origin, so a control request cannot hang on a dead
//! NAS.

use std::path::{Component, Path};
use std::sync::Arc;

use musicfs_origins::{OriginId, OriginPath};

use super::Inner;

/// How far the tag scan that builds the music view has come.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScanProgress {
    /// A scan pass is running.
    pub scanning: bool,
    /// Audio files found by the scan so far (in this pass).
    pub files_seen: u64,
    /// Audio files whose tags are in the index at their current version.
    pub files_indexed: u64,
    /// Files whose tags could not be read (shown with placeholders).
    pub unreadable: u64,
    /// What the view shows now.
    pub tracks: u64,
    pub albums: u64,
    pub artists: u64,
}

/// A handle on a mounted filesystem for the CLI's control socket; cheap to
/// clone.
#[derive(Debug, Clone)]
pub struct FsControl {
    pub(super) inner: Arc<Inner>,
}

impl FsControl {
    /// The origin files or directories `rel` (a path below the mount root,
    /// e.g. `nas/Artist/Album` or `Artists/Artist/Album`) stands for: a
    /// path in an origin's tree is itself; a directory or track of the
    /// music view stands for each of its tracks. `None` when it names
    /// nothing known (the path is not checked against the origin: an
    /// origin-tree path is taken as given, so it can be pinned before its
    /// listing was ever fetched).
    pub fn resolve(&self, rel: &Path) -> Option<Vec<(OriginId, OriginPath)>> {
        let mut parts = Vec::new();
        for c in rel.components() {
            match c {
                Component::Normal(p) => parts.push(p),
                Component::CurDir | Component::RootDir => {}
                // `..` could climb out of the mount: refused, not resolved.
                Component::ParentDir | Component::Prefix(_) => return None,
            }
        }
        let (first, rest) = parts.split_first()?;
        if let Some(tracks) = self.inner.view_resolve(first, rest) {
            return Some(tracks);
        }
        let origin = self
            .inner
            .origins
            .iter()
            .find(|o| o.id().as_str().as_bytes() == first.as_encoded_bytes())?;
        let mut path = OriginPath::root();
        for p in rest {
            path = path.join(p).ok()?;
        }
        Some(vec![(origin.id().clone(), path)])
    }

    /// The tag scan's progress and what the view shows.
    pub fn scan_progress(&self) -> ScanProgress {
        self.inner.scan_progress()
    }
}

impl super::MusicFs {
    /// A handle for the CLI's control socket, valid while the filesystem
    /// lives (also after it is handed to [`crate::mount`]).
    pub fn control(&self) -> FsControl {
        FsControl {
            inner: Arc::clone(&self.inner),
        }
    }
}
