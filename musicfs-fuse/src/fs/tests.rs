//! Unit tests of the filesystem proper: listings and their memo.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use musicfs_cas::{Cache, Listing};
use musicfs_origins::{DirEntry, EntryKind, EntryMeta, OriginId, OriginPath};

use super::listings::{DirListing, Memo, MEMO_DIRS};
use super::*;

fn entry(name: &str, kind: EntryKind) -> DirEntry {
    DirEntry::new(
        name,
        EntryMeta {
            kind,
            size: 1,
            mtime_ns: Some(1),
            etag: None,
        },
    )
}

#[test]
fn listings_keep_symlinks_and_find_names_by_bytes() {
    let latin1 = OsStr::from_bytes(b"Bj\xf6rk");
    let l = DirListing::new(Listing {
        fetched_at_ns: now_ns(),
        entries: vec![
            entry("b.flac", EntryKind::File),
            entry("link", EntryKind::Symlink),
            DirEntry::new(latin1, entry("", EntryKind::Dir).meta),
            entry("Björk — 世界", EntryKind::Dir),
            entry("a.mp3", EntryKind::File),
        ],
    });
    let names: Vec<&[u8]> = l.entries.iter().map(|e| e.name.as_bytes()).collect();
    assert_eq!(
        names,
        [
            "Björk — 世界".as_bytes(),
            b"Bj\xf6rk",
            b"a.mp3",
            b"b.flac",
            b"link"
        ]
    );
    assert_eq!(
        l.get(OsStr::new("link")).map(|m| m.kind),
        Some(EntryKind::Symlink)
    );
    assert_eq!(l.get(latin1).map(|m| m.kind), Some(EntryKind::Dir));
    // The UTF-8 spelling is another name.
    assert!(l.get(OsStr::new("Björk")).is_none());
    assert_eq!(
        l.get(OsStr::new("a.mp3")).map(|m| m.kind),
        Some(EntryKind::File)
    );
    assert!(l.get(OsStr::new("missing")).is_none());
    assert!(!l.is_stale(Duration::from_secs(60)));
}

#[test]
fn old_and_future_listings_are_stale() {
    let mut old = DirListing::new(Listing {
        fetched_at_ns: now_ns() - 120_000_000_000,
        entries: Vec::new(),
    });
    assert!(old.is_stale(Duration::from_secs(60)));
    assert!(!old.is_stale(Duration::from_secs(600)));
    old.fetched_at_ns = now_ns() + 3_600_000_000_000;
    assert!(old.is_stale(Duration::from_secs(600)));
}

#[test]
fn memo_is_bounded() {
    let mut memo = Memo::default();
    for i in 0..MEMO_DIRS + 10 {
        let key = NodeKey {
            origin: OriginId::new("o").unwrap(),
            path: OriginPath::new(&format!("d{i}")).unwrap(),
        };
        memo.put(
            key,
            Arc::new(DirListing::new(Listing {
                fetched_at_ns: 0,
                entries: Vec::new(),
            })),
        );
    }
    assert_eq!(memo.map.len(), MEMO_DIRS);
    assert_eq!(memo.order.len(), MEMO_DIRS);
}

#[test]
fn an_empty_root_never_replaces_a_cached_one() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cache, _) = rt
        .block_on(Cache::open(musicfs_cas::CacheConfig::new(
            dir.path(),
            1 << 20,
        )))
        .unwrap();
    let fs = MusicFs::new(cache, Vec::new(), FsConfig::default(), rt.handle().clone());
    let key = |path: &str| NodeKey {
        origin: OriginId::new("nas").unwrap(),
        path: OriginPath::new(path).unwrap(),
    };
    let root = key("");
    // A new, empty library is just empty.
    assert!(fs.inner.refuse_emptied_root(&root, &[]).is_ok());
    let album = vec![entry("Album", EntryKind::Dir)];
    fs.inner.store_listing(
        &root,
        Listing {
            fetched_at_ns: now_ns(),
            entries: album.clone(),
        },
    );
    let e = fs.inner.refuse_emptied_root(&root, &[]).unwrap_err();
    assert!(e.is_retryable(), "{e:?}");
    assert!(e.to_string().contains("looks unmounted"), "{e}");
    // Only the root, and only an empty answer, is judged so.
    assert!(fs.inner.refuse_emptied_root(&root, &album).is_ok());
    assert!(fs.inner.refuse_emptied_root(&key("Album"), &[]).is_ok());
}
