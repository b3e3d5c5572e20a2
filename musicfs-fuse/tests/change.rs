//! Files that change on the origin while MusicFS serves them, through real
//! mounts: a reader never gets bytes of two versions, and a new open gets
//! the new version once the freshness bound has passed.
//!
//! Some waits here are on time itself: the behaviour under test is "after
//! `freshness` has passed, a new open sees the change", so the tests wait
//! until that much time has passed since the change (a deadline computed
//! from the configuration, not a guess at how fast the machine is), then
//! check once.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::fs;
use std::io::{ErrorKind, Read};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use musicfs_fuse::FsConfig;
use musicfs_origins::{DynOrigin, OriginId, OriginPath};
use musicfs_test_utils::{pseudo_random_bytes, Fault, FaultyOrigin, Ops};

#[path = "support/harness.rs"]
mod harness;
use harness::*;

const MIB: usize = 1 << 20;
const TRACK: &str = "Artist/Album/01 - Track.flac";

/// A short staleness bound, and an origin check that may take as long as a
/// loaded machine needs (the origin here is a healthy local directory).
fn config() -> FsConfig {
    FsConfig {
        freshness: Duration::from_millis(300),
        revalidate_wait: Duration::from_secs(30),
        ..FsConfig::default()
    }
}

/// Blocks until `freshness` has passed since `since`.
fn wait_out_the_bound(since: Instant, config: &FsConfig) {
    let until = since + config.freshness + Duration::from_millis(1);
    let now = Instant::now();
    if until > now {
        std::thread::sleep(until - now);
    }
}

fn set_mtime(path: &Path, at: SystemTime) {
    let f = fs::File::options().write(true).open(path).unwrap();
    f.set_modified(at).unwrap();
}

/// Rewrites `path` in place (same inode, no truncation), as taggers do,
/// with a new mtime.
fn rewrite_in_place(path: &Path, data: &[u8], mtime: SystemTime) {
    use std::io::Write;
    let mut f = fs::File::options().write(true).open(path).unwrap();
    f.write_all(data).unwrap();
    f.set_modified(mtime).unwrap();
}

/// Reads `file` to its end in 1 MiB reads from `offset`, checking each
/// piece against `expected` at its offset. Returns the offset where a read
/// failed and its error kind, or `None` if it reached the end.
fn read_rest_checking(
    file: &mut fs::File,
    mut offset: usize,
    expected: &[u8],
) -> Option<(usize, std::io::Error)> {
    let mut buf = vec![0u8; MIB];
    loop {
        match file.read(&mut buf) {
            Ok(0) => {
                assert_eq!(offset, expected.len(), "ended early at {offset}");
                return None;
            }
            Ok(n) => {
                assert!(
                    buf[..n] == expected[offset..offset + n],
                    "bytes at {offset}..{} are not the version the file was opened as",
                    offset + n
                );
                offset += n;
            }
            Err(e) => return Some((offset, e)),
        }
    }
}

fn library(len: usize) -> (tempfile::TempDir, Vec<u8>) {
    let lib = tempfile::tempdir().unwrap();
    let old = pseudo_random_bytes(len, 1);
    let path = lib.path().join(TRACK);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(&path, &old).unwrap();
    set_mtime(
        &path,
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_000_000),
    );
    (lib, old)
}

#[test]
fn a_track_rewritten_in_place_while_streamed_never_mixes_versions() {
    let len = 48 * MIB;
    let (lib, old) = library(len);
    let origin_file = lib.path().join(TRACK);
    let cache_dir = tempfile::tempdir().unwrap();
    let cfg = config();
    let h = Harness::start_in(
        vec![local("lib", lib.path())],
        cfg.clone(),
        cache_dir.path(),
    );
    let mounted = h.root().join("lib").join(TRACK);

    let mut reader = fs::File::open(&mounted).unwrap();
    let mut head = vec![0u8; 2 * MIB];
    reader.read_exact(&mut head).unwrap();
    assert!(head == old[..2 * MIB]);

    let new = pseudo_random_bytes(len, 2);
    rewrite_in_place(
        &origin_file,
        &new,
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_000_100),
    );
    let changed_at = Instant::now();

    // The reader gets old bytes, then (if it gets that far before the end)
    // an error saying the file changed; never a new byte.
    let outcome = read_rest_checking(&mut reader, 2 * MIB, &old);
    if let Some((at, e)) = &outcome {
        assert_eq!(e.raw_os_error(), Some(libc::ESTALE), "at {at}: {e}");
        // Once failed, the handle stays failed: no new bytes later either.
        let mut more = vec![0u8; 4096];
        match reader.read(&mut more) {
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::ESTALE), "{e}"),
            Ok(0) => {}
            Ok(_) => panic!("bytes served after the handle failed"),
        }
    }
    drop(reader);

    wait_out_the_bound(changed_at, &cfg);
    let got = fs::read(&mounted).unwrap();
    assert!(
        got == new,
        "a new open after the bound did not get exactly the new file"
    );

    // The cache holds no manifest of the old version (which would serve
    // a mix to an open that still carried the old size and mtime).
    let origin = OriginId::new("lib").unwrap();
    let path = OriginPath::new(TRACK).unwrap();
    let new_mtime = fs::metadata(&origin_file).unwrap().modified().unwrap();
    if let Some(m) = h.cache.index().manifest(&origin, &path).unwrap() {
        let ns = new_mtime
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        assert_eq!(
            m.version.mtime_ns,
            Some(ns as i64),
            "a manifest of the old version"
        );
    }
    drop(h);

    // And after a remount over the same cache.
    let h = Harness::start_in(vec![local("lib", lib.path())], cfg, cache_dir.path());
    let got = fs::read(h.root().join("lib").join(TRACK)).unwrap();
    assert!(
        got == new,
        "after a remount, the file is not the new version"
    );
}

#[test]
fn a_track_replaced_by_rename_serves_its_reader_the_old_version_whole() {
    let len = 24 * MIB;
    let (lib, old) = library(len);
    let origin_file = lib.path().join(TRACK);
    let cfg = config();
    let h = Harness::start(vec![local("lib", lib.path())], cfg.clone());
    let mounted = h.root().join("lib").join(TRACK);

    let mut reader = fs::File::open(&mounted).unwrap();
    let mut head = vec![0u8; MIB];
    reader.read_exact(&mut head).unwrap();

    // What most taggers and rsync do: write a new file, rename it over.
    let new = pseudo_random_bytes(len + 12_345, 3);
    let tmp = origin_file.with_extension("tmp");
    fs::write(&tmp, &new).unwrap();
    fs::rename(&tmp, &origin_file).unwrap();
    let changed_at = Instant::now();

    // The open handle still reaches the old file on the origin: it gets
    // the old version whole (an error would be allowed too; a mix is not).
    if let Some((at, e)) = read_rest_checking(&mut reader, MIB, &old) {
        assert_eq!(e.raw_os_error(), Some(libc::ESTALE), "at {at}: {e}");
    }
    drop(reader);

    wait_out_the_bound(changed_at, &cfg);
    let got = fs::read(&mounted).unwrap();
    assert_eq!(got.len(), new.len(), "a grown file is served whole");
    assert!(
        got == new,
        "a new open after the bound did not get the new file"
    );
}

#[test]
fn deleted_and_grown_files_are_seen_by_new_opens_within_the_bound() {
    let lib = tempfile::tempdir().unwrap();
    let gone = lib.path().join("gone.flac");
    let grows = lib.path().join("grows.flac");
    let dir_now = lib.path().join("becomes-a-dir.flac");
    fs::write(&gone, b"soon deleted").unwrap();
    fs::write(&grows, b"short").unwrap();
    fs::write(&dir_now, b"a file for now").unwrap();
    let cfg = config();
    let h = Harness::start(vec![local("lib", lib.path())], cfg.clone());
    let root = h.root().join("lib");
    // Listed and read once, so everything is cached.
    assert_eq!(fs::read(root.join("gone.flac")).unwrap(), b"soon deleted");
    assert_eq!(fs::read(root.join("grows.flac")).unwrap(), b"short");
    assert_eq!(
        fs::read(root.join("becomes-a-dir.flac")).unwrap(),
        b"a file for now"
    );

    fs::remove_file(&gone).unwrap();
    let longer = pseudo_random_bytes(3 * MIB, 9);
    fs::write(&grows, &longer).unwrap();
    set_mtime(&grows, SystemTime::now() + Duration::from_secs(5));
    fs::remove_file(&dir_now).unwrap();
    fs::create_dir(&dir_now).unwrap();
    let changed_at = Instant::now();

    wait_out_the_bound(changed_at, &cfg);
    let err = fs::File::open(root.join("gone.flac")).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    let got = fs::read(root.join("grows.flac")).unwrap();
    assert!(got == longer, "got {} bytes, not the grown file", got.len());
    let err = fs::File::open(root.join("becomes-a-dir.flac")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EISDIR), "{err}");
}

#[test]
fn a_hung_origin_does_not_hold_up_opens_of_cached_tracks() {
    let (lib, old) = library(2 * MIB);
    let faulty = FaultyOrigin::new(local("lib", lib.path()));
    let origin: DynOrigin = Arc::clone(&faulty) as DynOrigin;
    let cfg = FsConfig {
        freshness: Duration::from_millis(100),
        revalidate_wait: Duration::from_millis(300),
        ..FsConfig::default()
    };
    let h = Harness::start(vec![origin], cfg.clone());
    let mounted = h.root().join("lib").join(TRACK);
    // Cache the whole track while the origin answers.
    {
        let mut f = fs::File::open(&mounted).unwrap();
        let mut all = Vec::new();
        f.read_to_end(&mut all).unwrap();
        assert!(all == old);
        h.wait_cached("lib", TRACK);
    }
    // The ingest's last step (a version check) must be done before the
    // origin's stat calls are counted.
    let rt = h.rt.as_ref().unwrap();
    assert!(rt.block_on(h.cache.wait_for_ingests(Duration::from_secs(30))));
    faulty.set_fault_on(Ops::STAT, Fault::Hang);
    let hung_at = Instant::now();
    wait_out_the_bound(hung_at, &cfg);

    // The first open waits `revalidate_wait` for a check that never comes
    // and opens the cached version; its bytes come from the cache.
    let before = faulty.stats().stat_calls;
    assert!(fs::read(&mounted).unwrap() == old);
    let asked = faulty.stats().stat_calls - before;
    assert_eq!(asked, 1, "the open asked the origin once");
    // Later opens do not ask while that check is unanswered.
    for _ in 0..3 {
        assert!(fs::read(&mounted).unwrap() == old);
    }
    assert_eq!(
        faulty.stats().stat_calls - before,
        1,
        "opens kept asking a hung origin"
    );
    faulty.set_fault(Fault::None);
}

/// A tagger or sync tool that deletes a track and writes it again (or a new
/// file under a name a player asks for): a new open finds it within the
/// bound, not when the directory's listing expires (60 s by default).
#[test]
fn a_file_deleted_and_recreated_is_found_within_the_bound() {
    let lib = tempfile::tempdir().unwrap();
    let host = lib.path().join(TRACK);
    fs::create_dir_all(host.parent().unwrap()).unwrap();
    let old = pseudo_random_bytes(MIB, 1);
    fs::write(&host, &old).unwrap();
    let cfg = config();
    let h = Harness::start(vec![local("lib", lib.path())], cfg.clone());
    let mounted = h.root().join("lib").join(TRACK);
    assert!(fs::read(&mounted).unwrap() == old);

    fs::remove_file(&host).unwrap();
    wait_out_the_bound(Instant::now(), &cfg);
    let err = fs::File::open(&mounted).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");

    let new = pseudo_random_bytes(MIB + 4096, 2);
    let tmp = host.with_extension("tmp");
    fs::write(&tmp, &new).unwrap();
    fs::rename(&tmp, &host).unwrap();
    let recreated_at = Instant::now();
    wait_out_the_bound(recreated_at, &cfg);
    let got = fs::read(&mounted).expect("the recreated file is found within the bound");
    assert!(
        got == new,
        "got {} bytes, not the recreated file",
        got.len()
    );
    // A name never created is still not there.
    let err = fs::File::open(mounted.with_file_name("never.flac")).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
}

/// A track deleted on the origin while it plays, once the mount knows it is
/// gone (a new open said ENOENT): the open handle still reads its version
/// to the end or ends with ESTALE, and fstat still answers. The kernel
/// asks for attributes before a read once they expire; answering ENOENT
/// there failed the read with "No such file or directory".
#[test]
fn a_track_deleted_while_played_keeps_playing_or_ends_with_estale() {
    let lib = tempfile::tempdir().unwrap();
    let host = lib.path().join(TRACK);
    fs::create_dir_all(host.parent().unwrap()).unwrap();
    let old = pseudo_random_bytes(3 * MIB, 5);
    fs::write(&host, &old).unwrap();
    let cfg = config();
    let h = Harness::start(vec![local("lib", lib.path())], cfg.clone());
    let mounted = h.root().join("lib").join(TRACK);

    let mut reader = fs::File::open(&mounted).unwrap();
    let mut head = vec![0u8; MIB];
    reader.read_exact(&mut head).unwrap();
    assert!(head[..] == old[..MIB]);
    fs::remove_file(&host).unwrap();
    wait_out_the_bound(Instant::now(), &cfg);
    let err = fs::File::open(&mounted).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    // Past the kernel's attribute TTL, so its next read asks again.
    std::thread::sleep(cfg.kernel_ttl + Duration::from_millis(100));

    assert_eq!(reader.metadata().unwrap().len(), old.len() as u64);
    if let Some((at, e)) = read_rest_checking(&mut reader, MIB, &old) {
        assert_eq!(e.raw_os_error(), Some(libc::ESTALE), "at {at}: {e}");
    }
}

/// The kernel keeps one page cache and one size per inode. A handle of the
/// old version and a new open of the new one must not share them: the old
/// handle must not read pages the new one filled (or stop at the new
/// size), and a new open must not read pages the old handle filled.
#[test]
fn handles_of_two_versions_never_share_the_kernels_pages() {
    let len = 6 * MIB;
    let (lib, old) = library(len);
    let origin_file = lib.path().join(TRACK);
    let cfg = config();
    let h = Harness::start(vec![local("lib", lib.path())], cfg.clone());
    let mounted = h.root().join("lib").join(TRACK);

    let mut old_reader = fs::File::open(&mounted).unwrap();
    let mut head = vec![0u8; MIB];
    old_reader.read_exact(&mut head).unwrap();
    assert!(head == old[..MIB]);

    // Replaced by rename with a shorter file: the old handle's version
    // stays readable on the origin (its descriptor is kept).
    let new = pseudo_random_bytes(4 * MIB, 5);
    let tmp = origin_file.with_extension("tmp");
    fs::write(&tmp, &new).unwrap();
    fs::rename(&tmp, &origin_file).unwrap();
    let changed_at = Instant::now();
    wait_out_the_bound(changed_at, &cfg);

    // A new open reads the new version whole, filling the page cache.
    assert!(
        fs::read(&mounted).unwrap() == new,
        "a new open got other bytes"
    );
    // The old handle goes on with its own version: its pages, its size.
    assert_eq!(
        old_reader.metadata().unwrap().len(),
        len as u64,
        "fstat of the old handle"
    );
    if let Some((at, e)) = read_rest_checking(&mut old_reader, MIB, &old) {
        assert_eq!(e.raw_os_error(), Some(libc::ESTALE), "at {at}: {e}");
    }
    // And a new open after the old handle read on still gets the new one.
    assert!(
        fs::read(&mounted).unwrap() == new,
        "the old handle's pages leaked into a new open"
    );
}

/// A long-lived mount does not keep the records of what left the origin:
/// once a refreshed listing no longer names an album, its listing and its
/// tracks' manifests are gone from the index.
#[test]
fn records_of_an_album_removed_from_the_origin_are_collected() {
    let (lib, old) = library(MIB);
    let cfg = FsConfig {
        listing_ttl: Duration::from_secs(1),
        ..config()
    };
    let h = Harness::start(vec![local("lib", lib.path())], cfg);
    let artist = h.root().join("lib").join("Artist");
    assert!(fs::read(artist.join("Album/01 - Track.flac")).unwrap() == old);
    h.wait_cached("lib", TRACK);
    let origin = OriginId::new("lib").unwrap();
    let album = OriginPath::new("Artist/Album").unwrap();
    let track = OriginPath::new(TRACK).unwrap();
    assert!(h.cache.index().listing(&origin, &album).unwrap().is_some());
    assert!(h.cache.index().manifest(&origin, &track).unwrap().is_some());

    fs::remove_dir_all(lib.path().join("Artist/Album")).unwrap();
    // Browsing the artist refreshes its listing in the background once the
    // TTL has passed; wait for the records to go.
    wait_until("the album's records are collected", || {
        let _ = fs::read_dir(&artist).map(|d| d.count());
        let listing = h.cache.index().listing(&origin, &album).unwrap();
        let manifest = h.cache.index().manifest(&origin, &track).unwrap();
        listing.is_none() && manifest.is_none()
    });
    // The kernel may answer from an entry it cached (`kernel_ttl`) for a
    // moment after the records went; the album must then be gone.
    wait_until("the album is gone from the mount", || {
        !artist.join("Album").exists()
    });
}
