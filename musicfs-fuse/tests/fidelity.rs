//! Fidelity through a real mount: names that are not UTF-8 and symlinks.
//!
//! A real `make-library` library, copied so the test can change it, gets
//! an old Latin-1 rip (`Bj\xf6rk/J\xf3ga.flac`) and a `Favourites` folder of
//! links: relative ones to an album, a track and the Latin-1 directory, an
//! absolute one that stays inside, and links that leave the library (an
//! absolute target, a `..` chain, a link to a link that leaves). Through
//! the mount, names keep their bytes, files their bytes, links their
//! targets, and only the links that stay inside exist.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

#[path = "support/harness.rs"]
mod harness;

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::ErrorKind;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use musicfs_fuse::FsConfig;
use musicfs_origins::{
    DirEntry, DynOrigin, EntryMeta, FileVersion, Origin, OriginId, OriginPath,
    Result as OriginResult,
};
use musicfs_test_utils::{copy_tree, library_files, make_library, LibrarySpec};

use harness::{local, Harness};

/// Generous bound on waiting for the mount to show an origin change; only
/// there so that a bug fails the test instead of hanging it.
const DEADLINE: Duration = Duration::from_secs(30);

fn latin1(bytes: &[u8]) -> &OsStr {
    OsStr::from_bytes(bytes)
}

/// Every name in `dir`, as bytes.
fn names(dir: &Path) -> BTreeSet<OsString> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect()
}

/// The library under test; see the module docs. Returns the copy's root
/// (inside `base`), an album directory and a FLAC track of it (relative).
fn library(base: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let generated = make_library(&LibrarySpec::default()).expect("make-library must be available");
    let root = base.join("music");
    copy_tree(&generated, &root).unwrap();
    let track = library_files(&root)
        .into_iter()
        .find(|f| f.extension().is_some_and(|e| e == "flac"))
        .expect("the library has a FLAC file");
    let album = track.parent().unwrap().to_path_buf();
    assert!(
        album.components().count() >= 1,
        "tracks sit in album folders"
    );

    // An old rip with Latin-1 names: a real FLAC under bytes that are not UTF-8.
    let rip = root.join(latin1(b"Bj\xf6rk"));
    fs::create_dir(&rip).unwrap();
    fs::copy(root.join(&track), rip.join(latin1(b"J\xf3ga.flac"))).unwrap();

    let fav = root.join("Favourites");
    fs::create_dir(&fav).unwrap();
    let up = Path::new("..");
    symlink(up.join(&album), fav.join("Album")).unwrap();
    symlink(up.join(&track), fav.join("Track.flac")).unwrap();
    symlink(latin1(b"../Bj\xf6rk"), fav.join(latin1(b"Bj\xf6rk"))).unwrap();
    symlink(root.join(&album), fav.join("Absolute album")).unwrap();
    // Leaving the library, three ways.
    symlink(base, fav.join("Outside (absolute)")).unwrap();
    symlink("../..", fav.join("Outside (dots)")).unwrap();
    symlink("../escape", fav.join("Outside (chain)")).unwrap();
    symlink("..", root.join("escape")).unwrap();
    fs::write(base.join("secret.flac"), b"not part of the library").unwrap();
    (root, album, track)
}

/// Relative path climbing from `Favourites/` to the library root.
fn from_favourites(rel: &Path) -> PathBuf {
    Path::new("..").join(rel)
}

#[test]
fn byte_names_and_inside_symlinks_are_served_as_on_the_origin() {
    let base = tempfile::tempdir().unwrap();
    let (src, album, track) = library(base.path());
    let h = Harness::start(
        vec![local("music", &src)],
        FsConfig {
            // The re-pointed link below must disappear within a refresh;
            // the kernel asks MusicFS on every lookup.
            listing_ttl: Duration::from_millis(200),
            kernel_ttl: Duration::ZERO,
            ..FsConfig::default()
        },
    );
    let top = h.root().join("music");

    // The root lists the Latin-1 directory under its exact bytes, and the
    // root-level link that leaves (`escape`) not at all.
    let mut want = names(&src);
    want.remove(OsStr::new("escape"));
    assert_eq!(names(&top), want);
    assert!(names(&top).contains(latin1(b"Bj\xf6rk")));

    // The Latin-1 file: listed under its bytes, byte-identical, same size
    // and mtime; its UTF-8 look-alike does not exist.
    let rip = top.join(latin1(b"Bj\xf6rk"));
    assert_eq!(
        names(&rip),
        BTreeSet::from([latin1(b"J\xf3ga.flac").to_owned()])
    );
    let origin_file = src.join(latin1(b"Bj\xf6rk/J\xf3ga.flac"));
    let mounted_file = rip.join(latin1(b"J\xf3ga.flac"));
    assert!(fs::read(&mounted_file).unwrap() == fs::read(&origin_file).unwrap());
    let (o, m) = (
        fs::metadata(&origin_file).unwrap(),
        fs::metadata(&mounted_file).unwrap(),
    );
    assert_eq!(
        (o.len(), o.mtime(), o.mtime_nsec()),
        (m.len(), m.mtime(), m.mtime_nsec())
    );
    let err = fs::metadata(top.join("Björk")).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");

    // Favourites: the links that stay inside, and nothing else.
    let fav = top.join("Favourites");
    let inside: BTreeSet<OsString> = ["Album", "Track.flac", "Absolute album"]
        .iter()
        .map(OsString::from)
        .chain([latin1(b"Bj\xf6rk").to_owned()])
        .collect();
    assert_eq!(names(&fav), inside);
    for name in &inside {
        let meta = fs::symlink_metadata(fav.join(name)).unwrap();
        assert!(meta.file_type().is_symlink(), "{name:?}");
        assert_eq!(
            meta.len(),
            fs::read_link(fav.join(name)).unwrap().as_os_str().len() as u64,
            "a symlink's size is its target's length"
        );
    }
    // readlink gives the origin's target, byte for byte...
    for name in ["Album", "Track.flac"] {
        assert_eq!(
            fs::read_link(fav.join(name)).unwrap(),
            fs::read_link(src.join("Favourites").join(name)).unwrap(),
            "{name}"
        );
    }
    assert_eq!(
        fs::read_link(fav.join(latin1(b"Bj\xf6rk"))).unwrap(),
        Path::new(latin1(b"../Bj\xf6rk"))
    );
    // ...except an absolute target inside the library, which is served
    // relative so that it resolves through the mount.
    assert_eq!(
        fs::read_link(fav.join("Absolute album")).unwrap(),
        from_favourites(&album)
    );

    // Through the links, the kernel resolves to the mounted files: the
    // same bytes, and a decoder is happy with them.
    let want = fs::read(src.join(&track)).unwrap();
    let through_album = fav.join("Album").join(track.file_name().unwrap());
    for path in [
        fav.join("Track.flac"),
        through_album.clone(),
        fav.join("Absolute album").join(track.file_name().unwrap()),
    ] {
        assert!(
            fs::read(&path).unwrap() == want,
            "{} differs",
            path.display()
        );
    }
    assert!(
        fs::read(fav.join(latin1(b"Bj\xf6rk/J\xf3ga.flac"))).unwrap() == want,
        "the Latin-1 rip through its link differs"
    );
    let out = Command::new("flac")
        .arg("-t")
        .arg("-s")
        .arg(&through_album)
        .output()
        .expect("flac is installed");
    assert!(
        out.status.success(),
        "flac -t failed through a symlink: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        fs::canonicalize(&through_album).unwrap(),
        fs::canonicalize(top.join(&track)).unwrap(),
        "the link resolves inside the mount"
    );

    // Links that leave the library: not listed, and ENOENT when looked up.
    for name in ["Outside (absolute)", "Outside (dots)", "Outside (chain)"] {
        let err = fs::symlink_metadata(fav.join(name)).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT), "{name}: {err}");
        let err = fs::read_link(fav.join(name)).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT), "{name}: {err}");
    }
    let err = fs::symlink_metadata(top.join("escape")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOENT), "{err}");

    // Re-pointed on the origin to leave the library, the album link
    // disappears within a listing refresh; until then it only ever shows
    // the target that was checked.
    let old_target = fs::read_link(fav.join("Album")).unwrap();
    let origin_link = src.join("Favourites/Album");
    let tmp = src.join("Favourites/.Album.new");
    symlink("../../secret.flac", &tmp).unwrap();
    fs::rename(&tmp, &origin_link).unwrap();
    let started = Instant::now();
    loop {
        match fs::read_link(fav.join("Album")) {
            Ok(target) => assert_eq!(target, old_target, "an unchecked target was served"),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(e) => panic!("readlink of the re-pointed link: {e}"),
        }
        assert!(
            started.elapsed() < DEADLINE,
            "the re-pointed link was still served after {DEADLINE:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Gone from the listing as well (the refresh may finish a moment after
    // readlink first fails).
    let started = Instant::now();
    while names(&fav).contains(OsStr::new("Album")) {
        assert!(
            started.elapsed() < DEADLINE,
            "the re-pointed link is still listed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let err = fs::symlink_metadata(fav.join("Album")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOENT), "{err}");
    assert!(fs::read(fav.join("Album").join(track.file_name().unwrap())).is_err());

    // And pointed back inside, it returns.
    let tmp = src.join("Favourites/.Album.back");
    symlink(&old_target, &tmp).unwrap();
    fs::rename(&tmp, &origin_link).unwrap();
    let started = Instant::now();
    while fs::read_link(fav.join("Album")).ok().as_deref() != Some(old_target.as_path()) {
        assert!(
            started.elapsed() < DEADLINE,
            "the restored link never came back"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An origin whose listings carry no link targets, as an origin that cannot
/// report them cheaply would: `readlink` must ask the origin.
#[derive(Debug)]
struct NoTargetsInListings(DynOrigin);

#[async_trait]
impl Origin for NoTargetsInListings {
    fn id(&self) -> &OriginId {
        self.0.id()
    }

    async fn list(&self, path: &OriginPath) -> OriginResult<Vec<DirEntry>> {
        let mut entries = self.0.list(path).await?;
        for e in &mut entries {
            e.link_target = None;
        }
        Ok(entries)
    }

    async fn stat(&self, path: &OriginPath) -> OriginResult<EntryMeta> {
        self.0.stat(path).await
    }

    async fn read_range(
        &self,
        path: &OriginPath,
        version: &FileVersion,
        offset: u64,
        len: u64,
    ) -> OriginResult<Bytes> {
        self.0.read_range(path, version, offset, len).await
    }

    fn release(&self, path: &OriginPath, version: &FileVersion) {
        self.0.release(path, version);
    }

    async fn health(&self) -> OriginResult<()> {
        self.0.health().await
    }

    async fn read_link(&self, path: &OriginPath) -> OriginResult<PathBuf> {
        self.0.read_link(path).await
    }
}

#[test]
fn readlink_asks_the_origin_when_the_listing_has_no_target() {
    let base = tempfile::tempdir().unwrap();
    let (src, album, _) = library(base.path());
    let origin: DynOrigin = Arc::new(NoTargetsInListings(local("music", &src)));
    let h = Harness::start(
        vec![origin],
        FsConfig {
            kernel_ttl: Duration::ZERO,
            ..FsConfig::default()
        },
    );
    let fav = h.root().join("music/Favourites");
    assert_eq!(names(&fav).len(), 4);
    assert_eq!(
        fs::read_link(fav.join("Album")).unwrap(),
        from_favourites(&album)
    );
    assert_eq!(
        fs::read_link(fav.join("Absolute album")).unwrap(),
        from_favourites(&album)
    );
    // Re-pointed to leave: the origin refuses at once, whatever the listing.
    fs::remove_file(src.join("Favourites/Album")).unwrap();
    symlink("../../secret.flac", src.join("Favourites/Album")).unwrap();
    let err = fs::read_link(fav.join("Album")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOENT), "{err}");
}
