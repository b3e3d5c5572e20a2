//! Unit tests of `local.rs`.

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
    let waited = tokio::time::timeout(Duration::from_millis(50), hung.stat(&p("Björk.mp3"))).await;
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
