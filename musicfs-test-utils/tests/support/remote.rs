//! Scenarios every remote origin must pass against its real server, shared
//! by `remote_s3.rs`, `remote_sftp.rs` and `remote_webdav.rs`.
//!
//! Each scenario writes through the server's own client (the fixture's
//! `put`), then reads through the [`RemoteOrigin`] under test, and checks
//! what the user relies on: listings and stats that agree, bytes equal to
//! what was written, typed errors.

#![allow(dead_code)]

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use musicfs_origins::{
    DynOrigin, EntryKind, EntryMeta, FileVersion, Origin, OriginError, OriginPath, RemoteOrigin,
    TimeoutOrigin,
};
use musicfs_test_utils::RemoteServer;

/// Bounds a hang only; every wait ends as soon as its event happens.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// Deterministic bytes that differ per seed (xorshift).
pub fn data(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

pub fn p(path: &str) -> OriginPath {
    OriginPath::new(path).unwrap()
}

/// Runs a blocking fixture call (server start, stop, put) off the runtime.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

/// Polls `check` until it returns `Some`, failing after [`DEADLINE`].
pub async fn wait_for<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The files of the tree scenario: key, seed, size.
pub const TREE: &[(&str, u64, usize)] = &[
    ("lib/a.flac", 1, 300_001),
    ("lib/Album/01 Intro.flac", 2, 1_048_577),
    ("lib/Album/02.flac", 3, 10),
    ("lib/Ünïcødé Ärtist/x.flac", 4, 4096),
    ("lib/empty.txt", 5, 0),
];

pub async fn put_tree(server: Arc<dyn RemoteServer>) {
    blocking(move || {
        for (key, seed, len) in TREE {
            server.put(key, &data(*seed, *len)).unwrap();
        }
    })
    .await
}

fn names(entries: &[musicfs_origins::DirEntry]) -> Vec<(String, EntryKind)> {
    let mut v: Vec<_> = entries
        .iter()
        .map(|e| (e.name.to_string_lossy().into_owned(), e.meta.kind))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Listings, stats and reads over [`TREE`] (already put), with the origin
/// rooted at the server's root.
pub async fn check_tree(origin: &RemoteOrigin) {
    let root = origin.list(&OriginPath::root()).await.unwrap();
    assert!(
        names(&root).contains(&("lib".into(), EntryKind::Dir)),
        "{root:?}"
    );
    let lib = origin.list(&p("lib")).await.unwrap();
    assert_eq!(
        names(&lib),
        vec![
            ("Album".into(), EntryKind::Dir),
            ("a.flac".into(), EntryKind::File),
            ("empty.txt".into(), EntryKind::File),
            ("Ünïcødé Ärtist".into(), EntryKind::Dir),
        ]
    );
    for e in &lib {
        let path = p("lib").join(&e.name).unwrap();
        let stat = origin.stat(&path).await.unwrap();
        // A listing's version is a stat's version: otherwise every file
        // opened from a listing would look changed.
        assert_eq!(stat, e.meta, "{path}");
        if e.meta.kind == EntryKind::Dir {
            assert_eq!(e.meta.size, 0);
        }
    }
    let album = origin.list(&p("lib/Album")).await.unwrap();
    assert_eq!(
        names(&album),
        vec![
            ("01 Intro.flac".into(), EntryKind::File),
            ("02.flac".into(), EntryKind::File)
        ]
    );
    for (key, seed, len) in TREE {
        let meta = origin.stat(&p(key)).await.unwrap();
        assert_eq!(meta.kind, EntryKind::File, "{key}");
        assert_eq!(meta.size, *len as u64, "{key}");
        assert!(meta.mtime_ns.is_some(), "{key} has no mtime");
        check_reads(origin, key, &meta.version(), &data(*seed, *len)).await;
    }
    assert_eq!(
        origin.stat(&p("lib/Album")).await.unwrap().kind,
        EntryKind::Dir
    );
}

/// Range reads of `version` of `key` equal slices of `whole`.
pub async fn check_reads(origin: &RemoteOrigin, key: &str, version: &FileVersion, whole: &[u8]) {
    let size = whole.len() as u64;
    let mut ranges = vec![
        (0, size),
        (0, 1),
        (0, 64 * 1024),
        (size / 2, 1000),
        (size.saturating_sub(7), 100), // runs past the end
        (size, 10),                    // at the end
        (size + 5, 10),                // past it
        (1, u64::MAX / 2),             // an absurd length
    ];
    // A few more from a seeded generator.
    let mut x = size | 1;
    for _ in 0..6 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let off = if size == 0 { 0 } else { x % size };
        ranges.push((off, (x >> 20) % (300 * 1024) + 1));
    }
    let path = p(key);
    for (off, len) in ranges {
        let got = origin
            .read_range(&path, version, off, len)
            .await
            .unwrap_or_else(|e| panic!("{key} [{off}, +{len}): {e}"));
        let start = off.min(size) as usize;
        let end = off.saturating_add(len).min(size) as usize;
        assert_eq!(
            got.len(),
            end - start,
            "{key} [{off}, +{len}): wrong length"
        );
        assert!(
            got[..] == whole[start..end],
            "{key} [{off}, +{len}): wrong bytes"
        );
    }
    origin.release(&path, version);
}

/// Missing keys and directories are NotFound; a file listed as a
/// directory is WrongKind.
pub async fn check_not_found(origin: &RemoteOrigin) {
    for missing in ["nope.flac", "lib/nope.flac", "lib/Album/nope/x.flac"] {
        let e = origin.stat(&p(missing)).await.unwrap_err();
        assert!(e.is_not_found(), "{missing}: {e}");
        assert!(!e.is_retryable(), "{missing}: {e}");
    }
    let e = origin.list(&p("lib/nope")).await.unwrap_err();
    assert!(e.is_not_found(), "{e}");
    let e = origin.list(&p("lib/a.flac")).await.unwrap_err();
    assert!(
        matches!(e, OriginError::WrongKind { .. }),
        "listing a file: {e}"
    );
    // A read of a version of a file that never existed: it does not hold
    // that version.
    let v = FileVersion {
        size: 10,
        mtime_ns: None,
        etag: None,
    };
    let e = origin
        .read_range(&p("nope.flac"), &v, 0, 10)
        .await
        .unwrap_err();
    assert!(e.is_changed() || e.is_not_found(), "{e}");
}

/// A file overwritten between "open" (stat) and read: the old version's
/// reads fail with Changed and never return new bytes; the new version
/// reads.
///
/// With `kept_handle`, the origin reads through a handle it opened for the
/// version (SFTP): a file replaced by rename leaves that handle on the old
/// file, so reads may go on returning the old version's bytes (exactly
/// those) until the reader releases the version; then the next read sees
/// the change.
pub async fn check_changed(
    origin: &RemoteOrigin,
    server: Arc<dyn RemoteServer>,
    kept_handle: bool,
) {
    let key = "change/track.flac";
    let old = data(10, 200_000);
    let new = data(11, 200_000); // same size: only the version tells
    {
        let (s, o) = (server.clone(), old.clone());
        blocking(move || s.put(key, &o).unwrap()).await;
    }
    let v1 = origin.stat(&p(key)).await.unwrap().version();
    let first = origin.read_range(&p(key), &v1, 0, 1000).await.unwrap();
    assert_eq!(first[..], old[..1000]);
    // mtimes are whole seconds on SFTP and HTTP: wait for the next one so
    // the new version differs by mtime where there is no ETag.
    let v1_secs = v1.mtime_ns.map(|n| n / 1_000_000_000);
    wait_for("the next second", || async {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        (Some(now) > v1_secs).then_some(())
    })
    .await;
    {
        let (s, n) = (server.clone(), new.clone());
        blocking(move || s.put(key, &n).unwrap()).await;
    }
    for (off, len) in [(0, 1000), (1000, 100_000), (150_000, 50_000)] {
        match origin.read_range(&p(key), &v1, off, len).await {
            Err(e) => assert!(e.is_changed(), "old version [{off}, +{len}): {e}"),
            Ok(bytes) if kept_handle && bytes[..] == old[off as usize..(off + len) as usize] => {}
            Ok(bytes) => panic!(
                "old version [{off}, +{len}) read after the overwrite: {} bytes, {}",
                bytes.len(),
                if bytes[..] == new[off as usize..(off + len) as usize] {
                    "the NEW version's bytes"
                } else {
                    "old bytes"
                }
            ),
        }
    }
    origin.release(&p(key), &v1);
    let e = origin.read_range(&p(key), &v1, 0, 1000).await.unwrap_err();
    assert!(e.is_changed(), "old version after release: {e}");
    let v2 = origin.stat(&p(key)).await.unwrap().version();
    assert_ne!(v1, v2);
    check_reads(origin, key, &v2, &new).await;
    // Deleted: the old version is gone too.
    {
        let s = server.clone();
        blocking(move || s.delete(key).unwrap()).await;
    }
    let e = origin.read_range(&p(key), &v2, 0, 10).await.unwrap_err();
    assert!(e.is_changed(), "deleted: {e}");
    let e = origin.stat(&p(key)).await.unwrap_err();
    assert!(e.is_not_found(), "deleted: {e}");
}

/// Every call fails retryable, never NotFound, while the server is down,
/// and works again once it is back, on the same origin object.
pub async fn check_offline_and_back(origin: Arc<RemoteOrigin>, server: Arc<dyn RemoteServer>) {
    let key = "lib/a.flac";
    let (_, seed, len) = TREE[0];
    let meta: EntryMeta = origin.stat(&p(key)).await.unwrap();
    let v = meta.version();
    origin.read_range(&p(key), &v, 0, 4096).await.unwrap();
    origin.health().await.unwrap();

    {
        let s = server.clone();
        blocking(move || s.stop().unwrap()).await;
    }
    // A TimeoutOrigin as the mount stacks it: a hang shows as Timeout.
    let bounded: DynOrigin = Arc::new(TimeoutOrigin::new(
        origin.clone() as DynOrigin,
        Duration::from_secs(20),
    ));
    let down = |what: &str, e: OriginError| {
        assert!(
            matches!(
                e,
                OriginError::Unavailable { .. } | OriginError::Timeout { .. }
            ),
            "{what} while the server is down: {e}"
        );
        assert!(e.is_retryable() && !e.is_not_found(), "{what}: {e}");
    };
    down("health", bounded.health().await.unwrap_err());
    down("stat", bounded.stat(&p(key)).await.unwrap_err());
    down(
        "stat of a missing key",
        bounded.stat(&p("nope.flac")).await.unwrap_err(),
    );
    down("list", bounded.list(&p("lib")).await.unwrap_err());
    down(
        "read",
        bounded.read_range(&p(key), &v, 0, 4096).await.unwrap_err(),
    );

    {
        let s = server.clone();
        blocking(move || s.start_again().unwrap()).await;
    }
    wait_for("the origin to answer again", || async {
        bounded.health().await.ok()
    })
    .await;
    let whole = data(seed, len);
    let got = bounded.read_range(&p(key), &v, 1000, 5000).await.unwrap();
    assert_eq!(got[..], whole[1000..6000]);
    assert!(bounded
        .stat(&p("nope.flac"))
        .await
        .unwrap_err()
        .is_not_found());
}
