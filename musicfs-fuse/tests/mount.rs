//! Real mounts of MusicFS, exercised through `std::fs` from the test thread
//! while the filesystem's tokio runtime runs on its own threads.
//!
//! Every test unmounts what it mounted, also when it fails: [`Harness`]
//! unmounts on drop, and falls back to `fusermount3 -u` / `-uz` when the
//! mount point is still mounted after that.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::collections::BTreeSet;
use std::fs;
use std::io::{ErrorKind, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirEntryExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use musicfs_fuse::{cleanup_stale_mount, mount, FsConfig, FuseError, MusicFs};
use musicfs_origins::DynOrigin;
use musicfs_test_utils::{
    library_files, make_library, pseudo_random_bytes, write_file, Fault, FaultyOrigin, LibrarySpec,
    Ops,
};

#[path = "support/harness.rs"]
mod harness;
use harness::*;

#[test]
fn library_is_served_byte_for_byte() {
    let lib = make_library(&LibrarySpec::default()).expect("make-library must be available");
    // A second origin with names players meet: non-ASCII, long, spaces,
    // and a symlink that stays inside (tests/fidelity.rs has the rest).
    let odd = tempfile::tempdir().unwrap();
    let long_name = format!("{}.flac", "é".repeat(120)); // 245 bytes
    let unicode = "Björk — Jóga (世界) 🎵.mp3";
    write_file(odd.path(), unicode, &pseudo_random_bytes(70_000, 3)).unwrap();
    write_file(
        odd.path(),
        &format!("Ünïcödé dir/{long_name}"),
        &pseudo_random_bytes(5_000, 4),
    )
    .unwrap();
    write_file(odd.path(), "empty.flac", b"").unwrap();
    std::os::unix::fs::symlink(unicode, odd.path().join("link.mp3")).unwrap();

    let h = Harness::start(
        vec![local("library", &lib), local("odd names", odd.path())],
        FsConfig::default(),
    );
    let expected: BTreeSet<String> = ["library", "odd names"].map(String::from).into();
    assert_eq!(names(h.root()), expected);
    let root_meta = fs::metadata(h.root()).unwrap();
    assert!(root_meta.is_dir());
    assert_eq!(root_meta.ino(), 1);

    for (origin, top) in [
        (lib.as_path(), h.root().join("library")),
        (odd.path(), h.root().join("odd names")),
    ] {
        assert_same_tree(origin, &top);
        let files = library_files(origin);
        assert!(!files.is_empty());
        for rel in files {
            let want = fs::read(origin.join(&rel)).unwrap();
            let got = fs::read(top.join(&rel)).unwrap();
            assert!(want == got, "{} differs through the mount", rel.display());
            let meta = fs::metadata(top.join(&rel)).unwrap();
            assert_eq!(meta.permissions().mode() & 0o7777, 0o444);
            assert_eq!(meta.blocks(), meta.len().div_ceil(512));
        }
    }

    let odd_top = h.root().join("odd names");
    let link = fs::symlink_metadata(odd_top.join("link.mp3")).unwrap();
    assert!(link.file_type().is_symlink());
    assert_eq!(
        fs::read_link(odd_top.join("link.mp3")).unwrap(),
        Path::new(unicode)
    );
    assert!(
        fs::metadata(odd_top.join("Ünïcödé dir"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
            == 0o555
    );
    // A name the origin does not have does not exist.
    let bad = odd_top.join(std::ffi::OsStr::from_bytes(b"bad\xff.flac"));
    assert_eq!(fs::metadata(bad).unwrap_err().kind(), ErrorKind::NotFound);

    // A decoder is happy with what the mount serves.
    let flac = library_files(&lib)
        .into_iter()
        .find(|f| f.extension().is_some_and(|e| e == "flac"))
        .expect("the library has a FLAC file");
    let out = Command::new("flac")
        .arg("-t")
        .arg("-s")
        .arg(h.root().join("library").join(&flac))
        .output()
        .expect("flac is installed");
    assert!(
        out.status.success(),
        "flac -t failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn everything_that_writes_fails_with_erofs() {
    let src = tempfile::tempdir().unwrap();
    let data = pseudo_random_bytes(10_000, 1);
    write_file(src.path(), "Album/a.flac", &data).unwrap();
    let h = Harness::start(vec![local("music", src.path())], FsConfig::default());
    let album = h.root().join("music/Album");
    let file = album.join("a.flac");

    let erofs = |what: &str, r: std::io::Result<()>| {
        let e = r.expect_err(what);
        assert_eq!(errno(&e), Some(libc::EROFS), "{what}: {e}");
    };
    erofs("create", fs::File::create(album.join("new.flac")).map(drop));
    erofs("mkdir", fs::create_dir(album.join("new dir")));
    erofs("unlink", fs::remove_file(&file));
    erofs("rmdir", fs::remove_dir(&album));
    erofs("rename", fs::rename(&file, album.join("b.flac")));
    erofs(
        "open for writing",
        fs::OpenOptions::new().write(true).open(&file).map(drop),
    );
    erofs(
        "open for append",
        fs::OpenOptions::new().append(true).open(&file).map(drop),
    );
    erofs(
        "chmod",
        fs::set_permissions(&file, fs::Permissions::from_mode(0o644)),
    );
    erofs(
        "symlink",
        std::os::unix::fs::symlink(&file, album.join("l")),
    );
    erofs("hard link", fs::hard_link(&file, album.join("h")));
    // Still intact, and the origin untouched.
    assert_eq!(fs::read(&file).unwrap(), data);
    assert_eq!(
        names(&src.path().join("Album")),
        ["a.flac".to_owned()].into()
    );

    // statfs: read-only, 128 KiB blocks, 255-byte names.
    let c_path = std::ffi::CString::new(h.root().as_os_str().as_bytes()).unwrap();
    // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c_path` is a NUL-terminated path and `st` a valid, writable
    // statvfs for the duration of the call.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), &mut st) };
    assert_eq!(rc, 0);
    assert_ne!(st.f_flag & libc::ST_RDONLY, 0);
    assert_eq!(st.f_bsize, 128 * 1024);
    assert_eq!(st.f_namemax, 255);
}

#[test]
fn a_hung_origin_blocks_neither_listings_nor_cached_reads() {
    let src = tempfile::tempdir().unwrap();
    let data_a = pseudo_random_bytes(3 << 20, 1);
    let data_b = pseudo_random_bytes(3 << 20, 2);
    write_file(src.path(), "a.flac", &data_a).unwrap();
    write_file(src.path(), "b.flac", &data_b).unwrap();
    let faulty = FaultyOrigin::new(local("nas", src.path()));
    // How long B stays stuck: the test's listing and cached read must be
    // done well within it on a busy machine, and it ends the test's wait
    // for B's error.
    let read_timeout = Duration::from_secs(10);
    let h = Harness::start(
        vec![faulty.clone() as DynOrigin],
        FsConfig {
            read_timeout,
            ..FsConfig::default()
        },
    );
    let dir = h.root().join("nas");
    let a = dir.join("a.flac");
    let b = dir.join("b.flac");

    // A, read in full and held open until every chunk is in the cache.
    {
        let mut file = fs::File::open(&a).unwrap();
        let mut got = Vec::new();
        file.read_to_end(&mut got).unwrap();
        assert!(got == data_a);
        h.wait_cached("nas", "a.flac");
    }

    faulty.set_fault_on(Ops::READ, Fault::Hang);
    let stuck = std::thread::spawn(move || fs::read(b));
    wait_until("the B read reaches the hung origin", || {
        faulty.stats().in_flight_reads > 0
    });

    let started = Instant::now();
    let listed = names(&dir);
    assert_eq!(listed, ["a.flac".to_owned(), "b.flac".to_owned()].into());
    assert_eq!(fs::metadata(&a).unwrap().len(), data_a.len() as u64);
    drop_page_cache(&a);
    let got = fs::read(&a).unwrap();
    assert!(got == data_a, "cached A differs");
    let took = started.elapsed();
    // B was stuck at the origin all the while: the listing and the cached
    // read did not wait behind it (that would end only with its timeout).
    assert!(
        faulty.stats().in_flight_reads > 0 && !stuck.is_finished(),
        "B's read ended before the listing and cached read were done ({took:?})"
    );

    let err = stuck
        .join()
        .unwrap()
        .expect_err("reading B from a hung origin must fail");
    assert_eq!(errno(&err), Some(libc::EIO), "{err}");
    faulty.clear();
}

#[test]
fn a_removed_origin_keeps_serving_from_the_cache() {
    let base = tempfile::tempdir().unwrap();
    let src = base.path().join("music");
    let files: Vec<(&str, Vec<u8>)> = vec![
        (
            "Artist/Album/01 First.flac",
            pseudo_random_bytes(1_500_000, 1),
        ),
        (
            "Artist/Album/02 Second.flac",
            pseudo_random_bytes(700_000, 2),
        ),
        ("single.mp3", pseudo_random_bytes(40_000, 3)),
    ];
    for (rel, data) in &files {
        write_file(&src, rel, data).unwrap();
    }
    // Counts the listings MusicFS asks for and how they end.
    let counted = FaultyOrigin::new(local("music", &src));
    let h = Harness::start(
        vec![counted.clone() as DynOrigin],
        FsConfig {
            // Every access finds its listing stale and tries the origin, and
            // the kernel asks MusicFS every time.
            listing_ttl: Duration::ZERO,
            kernel_ttl: Duration::ZERO,
            ..FsConfig::default()
        },
    );
    let top = h.root().join("music");
    // Browse and read everything once, so listings and chunks are cached.
    assert_same_tree(&src, &top);
    for (rel, data) in &files {
        let mut file = fs::File::open(top.join(rel)).unwrap();
        let mut got = Vec::new();
        file.read_to_end(&mut got).unwrap();
        assert!(&got == data, "{rel} differs");
        h.wait_cached("music", rel);
    }
    let before = assert_tree_snapshot(&top);

    // The music top and every directory under it.
    let dirs = 1 + before.iter().filter(|(_, is_dir, ..)| *is_dir).count() as u64;

    fs::rename(&src, base.path().join("gone")).unwrap();
    assert!(!src.exists());
    let gone = counted.stats();

    let serves_everything = || {
        assert_eq!(assert_tree_snapshot(&top), before);
        for (rel, data) in &files {
            let path = top.join(rel);
            drop_page_cache(&path);
            let got = fs::read(&path).unwrap();
            assert!(&got == data, "{rel} differs with the origin gone");
        }
    };
    // Each round starts refreshes of the directories it visits (at most
    // one per directory a second), which fail; browse until as many have
    // failed as there are directories, then once more after those failures.
    wait_until("failed refreshes of the directories", || {
        serves_everything();
        counted.stats().list_failures - gone.list_failures >= dirs
    });
    serves_everything();
}

/// (path, is_dir, size, mtime) of everything under `top`, sorted.
fn assert_tree_snapshot(top: &Path) -> Vec<(PathBuf, bool, u64, std::time::SystemTime)> {
    fn walk(dir: &Path, out: &mut Vec<(PathBuf, bool, u64, std::time::SystemTime)>) {
        for name in names(dir) {
            let path = dir.join(&name);
            let meta = fs::symlink_metadata(&path).unwrap();
            out.push((
                path.clone(),
                meta.is_dir(),
                meta.len(),
                meta.modified().unwrap(),
            ));
            if meta.is_dir() {
                walk(&path, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(top, &mut out);
    out.sort();
    assert!(!out.is_empty());
    out
}

#[test]
fn inode_numbers_are_stable() {
    let src = tempfile::tempdir().unwrap();
    for i in 0..5 {
        write_file(
            src.path(),
            &format!("Album {i}/track.flac"),
            &pseudo_random_bytes(100, i),
        )
        .unwrap();
    }
    let h = Harness::start(
        vec![local("music", src.path())],
        FsConfig {
            // Every stat is a fresh lookup in MusicFS, not a kernel cache hit.
            kernel_ttl: Duration::ZERO,
            ..FsConfig::default()
        },
    );
    let top = h.root().join("music");
    let target = top.join("Album 2/track.flac");
    let first = fs::metadata(&target).unwrap().ino();
    let mut others = BTreeSet::new();
    for i in 0..5 {
        others.insert(
            fs::metadata(top.join(format!("Album {i}/track.flac")))
                .unwrap()
                .ino(),
        );
        others.insert(fs::metadata(top.join(format!("Album {i}"))).unwrap().ino());
    }
    assert_eq!(others.len(), 10, "distinct entries have distinct inodes");
    let _ = names(&top);
    let second = fs::metadata(&target).unwrap().ino();
    assert_eq!(first, second);
    assert_eq!(
        fs::metadata(&top).unwrap().ino(),
        fs::metadata(&top).unwrap().ino()
    );
    // readdir reports the same numbers as stat.
    let from_readdir = fs::read_dir(top.join("Album 2"))
        .unwrap()
        .map(|e| e.unwrap())
        .find(|e| e.file_name() == "track.flac")
        .unwrap()
        .ino();
    assert_eq!(from_readdir, first);
}

#[test]
fn cleanup_leaves_a_plain_directory_alone() {
    let dir = tempfile::tempdir().unwrap();
    assert!(!cleanup_stale_mount(dir.path()).unwrap());
    assert!(dir.path().is_dir());
}

#[test]
fn an_external_unmount_ends_the_session() {
    let src = tempfile::tempdir().unwrap();
    write_file(src.path(), "a.flac", b"x").unwrap();
    let mut h = Harness::start(vec![local("music", src.path())], FsConfig::default());
    assert!(!h.mounted.as_ref().unwrap().is_finished());
    let status = Command::new("fusermount3")
        .arg("-u")
        .arg(h.root())
        .status()
        .unwrap();
    assert!(status.success());
    wait_until("the session notices the unmount", || {
        h.mounted.as_ref().unwrap().is_finished()
    });
    h.mounted.take().unwrap().unmount().unwrap();
    assert!(!is_mounted(h.root()));
}

#[test]
fn preflight_names_the_origin_that_is_down() {
    let (rt, _cache_dir, cache) = runtime_and_cache();
    let up = tempfile::tempdir().unwrap();
    let base = tempfile::tempdir().unwrap();
    let down_root = base.path().join("nas");
    write_file(&down_root, "a.flac", b"x").unwrap();

    // First run: both answer, so both root listings get cached.
    let fs = MusicFs::new(
        cache.clone(),
        vec![local("up", up.path()), local("nas", &down_root)],
        FsConfig::default(),
        rt.handle().clone(),
    );
    rt.block_on(fs.preflight(Duration::from_secs(5))).unwrap();
    drop(fs);

    // Down, but cached: fine.
    fs::rename(&down_root, base.path().join("elsewhere")).unwrap();
    let fs = MusicFs::new(
        cache.clone(),
        vec![local("up", up.path()), local("nas", &down_root)],
        FsConfig::default(),
        rt.handle().clone(),
    );
    rt.block_on(fs.preflight(Duration::from_secs(5))).unwrap();

    // Down with nothing cached: named in the error.
    let fs = MusicFs::new(
        cache,
        vec![
            local("up", up.path()),
            local("never seen", &base.path().join("missing")),
        ],
        FsConfig::default(),
        rt.handle().clone(),
    );
    match rt.block_on(fs.preflight(Duration::from_secs(5))) {
        Err(FuseError::OriginUnavailable { origin, reason }) => {
            assert_eq!(origin.as_str(), "never seen");
            assert!(!reason.is_empty());
        }
        other => panic!("expected OriginUnavailable, got {other:?}"),
    }
}

/// Where [`child_mounts_and_waits`] mounts, and what.
const CHILD_MOUNT: &str = "MUSICFS_FUSE_TEST_CHILD_MOUNT";
const CHILD_ORIGIN: &str = "MUSICFS_FUSE_TEST_CHILD_ORIGIN";

/// The child half of [`cleanup_unmounts_a_dead_mount`]: run in a child
/// process of that same test, it mounts and waits to be killed. Its stdin
/// is a pipe from the parent: should the parent die first, the pipe ends
/// and so does the child (no orphan keeps a mount).
fn child_mounts_and_waits() {
    let (Some(mountpoint), Some(origin)) = (
        std::env::var_os(CHILD_MOUNT),
        std::env::var_os(CHILD_ORIGIN),
    ) else {
        return;
    };
    let (rt, _cache_dir, cache) = runtime_and_cache();
    let fs = MusicFs::new(
        cache,
        vec![local("music", Path::new(&origin))],
        FsConfig::default(),
        rt.handle().clone(),
    );
    rt.block_on(fs.preflight(Duration::from_secs(5))).unwrap();
    let _mounted = mount(fs, Path::new(&mountpoint)).unwrap();
    // Blocks until the parent kills us (or its end of the pipe closes).
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
}

#[test]
fn cleanup_unmounts_a_dead_mount() {
    if std::env::var_os(CHILD_MOUNT).is_some() {
        child_mounts_and_waits();
        return;
    }
    let src = tempfile::tempdir().unwrap();
    write_file(src.path(), "a.flac", b"x").unwrap();
    let mnt = tempfile::tempdir().unwrap();
    let _guard = MountGuard(mnt.path().to_path_buf());
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "cleanup_unmounts_a_dead_mount", "--nocapture"])
        .env(CHILD_MOUNT, mnt.path())
        .env(CHILD_ORIGIN, src.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the child mounts", || {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the child exited ({status}) without mounting");
        }
        is_mounted(mnt.path())
    });
    assert_eq!(fs::read(mnt.path().join("music/a.flac")).unwrap(), b"x");

    // The process behind the mount dies: the mount is dead, not gone.
    child.kill().unwrap();
    child.wait().unwrap();
    let err = fs::read_dir(mnt.path()).unwrap_err();
    assert_eq!(errno(&err), Some(libc::ENOTCONN), "{err}");

    assert!(cleanup_stale_mount(mnt.path()).unwrap());
    assert!(fs::metadata(mnt.path()).unwrap().is_dir());
    assert!(!is_mounted(mnt.path()));
    assert!(!cleanup_stale_mount(mnt.path()).unwrap());
}

#[test]
fn listings_refresh_in_the_background() {
    let src = tempfile::tempdir().unwrap();
    let v1 = pseudo_random_bytes(10_000, 1);
    let v2 = pseudo_random_bytes(20_000, 2);
    write_file(src.path(), "a.flac", &v1).unwrap();
    let h = Harness::start(
        vec![local("music", src.path())],
        FsConfig {
            listing_ttl: Duration::ZERO,
            kernel_ttl: Duration::ZERO,
            ..FsConfig::default()
        },
    );
    let top = h.root().join("music");
    let a = top.join("a.flac");
    assert_eq!(names(&top), ["a.flac".to_owned()].into());
    assert!(fs::read(&a).unwrap() == v1);

    write_file(src.path(), "new.flac", b"new").unwrap();
    write_file(src.path(), "a.flac", &v2).unwrap();
    // Served from the stale listing at first; the refresh shows the change.
    wait_until("the change shows up", || {
        names(&top).contains("new.flac") && fs::metadata(&a).unwrap().len() == 20_000
    });
    assert!(fs::read(&a).unwrap() == v2, "the new version is read");
    assert_eq!(fs::read(top.join("new.flac")).unwrap(), b"new");
}

#[test]
fn big_directories_list_completely() {
    let src = tempfile::tempdir().unwrap();
    // Many long names: the listing takes several readdir replies.
    for i in 0..1500 {
        write_file(
            src.path(),
            &format!("Album/{i:04} {}.flac", "ä".repeat(60)),
            b"",
        )
        .unwrap();
    }
    let h = Harness::start(vec![local("music", src.path())], FsConfig::default());
    let album = h.root().join("music/Album");
    let listed = names(&album);
    assert_eq!(listed.len(), 1500);
    assert_eq!(listed, names(&src.path().join("Album")));
}

#[test]
fn unmounting_a_busy_mount_detaches_it() {
    let src = tempfile::tempdir().unwrap();
    let data = pseudo_random_bytes(300_000, 5);
    write_file(src.path(), "a.flac", &data).unwrap();
    let mut h = Harness::start(vec![local("music", src.path())], FsConfig::default());
    let mut file = fs::File::open(h.root().join("music/a.flac")).unwrap();

    let outcome = h.mounted.take().unwrap().unmount();
    assert!(
        matches!(outcome, Err(FuseError::Unmount { .. })),
        "{outcome:?}"
    );
    assert!(!is_mounted(h.root()), "detached at once");
    // The file that kept it busy is still served until it is closed.
    let mut got = Vec::new();
    file.read_to_end(&mut got).unwrap();
    assert!(got == data);
}
