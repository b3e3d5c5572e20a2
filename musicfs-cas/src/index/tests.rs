//! Unit tests of `index.rs`.

use super::*;
use crate::manifest::{ChunkRef, FileVersion};

#[test]
fn records_round_trip() {
    let r = ChunkRecord {
        size: 7,
        atime_ns: 9,
    };
    assert_eq!(ChunkRecord::decode(&r.encode()).unwrap(), r);
    assert!(ChunkRecord::decode(&[1, 2, 3]).is_err());
}

#[test]
fn manifests_persist_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("index.sled");
    let o = OriginId::new("lib").unwrap();
    let p = OriginPath::new("Sigur Rós/01 - ágætis.flac").unwrap();
    let mut m = Manifest::new(FileVersion {
        size: 5,
        mtime_ns: Some(1),
        etag: None,
    });
    m.push(ChunkRef {
        id: ChunkId::of(b"abcde"),
        len: 5,
    })
    .unwrap();
    {
        let (idx, report) = Index::open(&path).unwrap();
        assert!(!report.rebuilt);
        idx.put_manifest(&o, &p, &m).unwrap();
        idx.flush().unwrap();
    }
    let (idx, report) = Index::open(&path).unwrap();
    assert!(!report.rebuilt);
    assert_eq!(idx.manifest(&o, &p).unwrap(), Some(m));
    let all = idx.manifests().unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].key.as_ref().unwrap().1, p);
}

fn manifest_of(len: u32) -> Manifest {
    let mut m = Manifest::new(FileVersion {
        size: u64::from(len),
        mtime_ns: Some(1),
        etag: None,
    });
    m.push(ChunkRef {
        id: ChunkId::of(&len.to_le_bytes()),
        len,
    })
    .unwrap();
    m
}

#[test]
fn the_manifest_count_is_kept_without_walking_the_tree() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("index.sled");
    let o = OriginId::new("lib").unwrap();
    {
        let (idx, _) = Index::open(&path).unwrap();
        for i in 0..5u32 {
            let p = OriginPath::new(&format!("f{i}")).unwrap();
            idx.put_manifest(&o, &p, &manifest_of(i + 1)).unwrap();
        }
        // Replacing one is no new manifest; removing one is one less.
        let p0 = OriginPath::new("f0").unwrap();
        idx.put_manifest(&o, &p0, &manifest_of(9)).unwrap();
        idx.remove_manifest(&o, &OriginPath::new("f1").unwrap())
            .unwrap();
        idx.remove_manifest(&o, &OriginPath::new("gone").unwrap())
            .unwrap();
        assert_eq!(idx.manifest_count(), 4);
        idx.flush().unwrap();
    }
    let (idx, _) = Index::open(&path).unwrap();
    // Counted once after open (the store does this in the background).
    assert!(idx.recount_manifests());
    assert_eq!(idx.manifest_count(), 4);
}

#[test]
fn forget_tree_drops_a_vanished_directory_and_everything_under_it() {
    let (idx, o) = (Index::temporary().unwrap(), OriginId::new("lib").unwrap());
    let p = |s: &str| OriginPath::new(s).unwrap();
    for f in [
        "Album/01.flac",
        "Album/CD2/01.flac",
        "Albums/x.flac",
        "y.flac",
    ] {
        idx.put_manifest(&o, &p(f), &manifest_of(3)).unwrap();
    }
    for d in ["Album", "Album/CD2", "Albums"] {
        let l = Listing {
            fetched_at_ns: 1,
            entries: Vec::new(),
        };
        idx.put_listing(&o, &p(d), &l).unwrap();
    }
    // Two manifests and two listings under Album/; not "Albums".
    assert_eq!(idx.forget_tree(&o, &p("Album")).unwrap(), 4);
    assert!(idx.manifest(&o, &p("Album/CD2/01.flac")).unwrap().is_none());
    assert!(idx.listing(&o, &p("Album")).unwrap().is_none());
    assert!(idx.manifest(&o, &p("Albums/x.flac")).unwrap().is_some());
    assert!(idx.listing(&o, &p("Albums")).unwrap().is_some());
    assert_eq!(idx.manifest_count(), 2);
    idx.forget_file(&o, &p("y.flac")).unwrap();
    assert_eq!(idx.manifest_count(), 1);
    assert_eq!(idx.forget_tree(&o, &OriginPath::root()).unwrap(), 2);
    assert_eq!(idx.manifest_count(), 0);
}

#[test]
fn non_utf8_paths_are_keys_of_their_own() {
    use musicfs_origins::{DirEntry, EntryKind, EntryMeta};
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;

    let dir = tempfile::tempdir().unwrap();
    let (idx, _) = Index::open(&dir.path().join("index.sled")).unwrap();
    let o = OriginId::new("lib").unwrap();
    // Latin-1 "Björk" and its UTF-8 spelling are two different names.
    let latin1 = OriginPath::from_bytes(b"Bj\xf6rk/a.flac").unwrap();
    let utf8 = OriginPath::new("Björk/a.flac").unwrap();
    let manifest = |size| {
        Manifest::new(FileVersion {
            size,
            mtime_ns: None,
            etag: None,
        })
    };
    idx.put_manifest(&o, &latin1, &manifest(1)).unwrap();
    idx.put_manifest(&o, &utf8, &manifest(2)).unwrap();
    assert_eq!(idx.manifest(&o, &latin1).unwrap(), Some(manifest(1)));
    assert_eq!(idx.manifest(&o, &utf8).unwrap(), Some(manifest(2)));
    let mut keys: Vec<OriginPath> = idx
        .manifests()
        .unwrap()
        .into_iter()
        .map(|e| e.key.unwrap().1)
        .collect();
    keys.sort();
    assert_eq!(keys, [utf8.clone(), latin1.clone()], "sorted by bytes");

    let album = latin1.parent().unwrap();
    let listing = Listing {
        fetched_at_ns: 1,
        entries: vec![DirEntry::new(
            OsStr::from_bytes(b"J\xf3ga.flac"),
            EntryMeta {
                kind: EntryKind::File,
                size: 3,
                mtime_ns: None,
                etag: None,
            },
        )],
    };
    idx.put_listing(&o, &album, &listing).unwrap();
    assert_eq!(idx.listing(&o, &album).unwrap(), Some(listing));
    assert_eq!(idx.listing(&o, &utf8.parent().unwrap()).unwrap(), None);
}

#[test]
fn forgetting_an_origin_drops_only_its_listings_and_manifests() {
    let idx = Index::temporary().unwrap();
    let (a, ab) = (OriginId::new("a").unwrap(), OriginId::new("ab").unwrap());
    let m = Manifest::new(FileVersion {
        size: 0,
        mtime_ns: None,
        etag: None,
    });
    let l = Listing {
        fetched_at_ns: 1,
        entries: Vec::new(),
    };
    for o in [&a, &ab] {
        for p in ["", "x", "x/y"] {
            idx.put_listing(o, &OriginPath::new(p).unwrap(), &l)
                .unwrap();
        }
        idx.put_manifest(o, &OriginPath::new("x/t.flac").unwrap(), &m)
            .unwrap();
    }
    assert_eq!(idx.forget_origin(&a).unwrap(), (3, 1));
    assert_eq!(idx.forget_origin(&a).unwrap(), (0, 0));
    assert!(idx.listing(&a, &OriginPath::root()).unwrap().is_none());
    // "ab" starts with "a" but is another origin.
    assert!(idx.listing(&ab, &OriginPath::root()).unwrap().is_some());
    assert_eq!(idx.manifest_count(), 1);
}

#[test]
fn garbage_index_is_moved_aside_and_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("index.sled");
    std::fs::create_dir_all(&path).unwrap();
    std::fs::write(path.join("conf"), b"\xff\x00 not a sled config").unwrap();
    std::fs::write(path.join("db"), vec![0xA5u8; 10_000]).unwrap();
    let (idx, report) = Index::open(&path).unwrap();
    assert!(report.rebuilt, "{report:?}");
    assert!(report.moved_to.as_ref().unwrap().exists());
    assert_eq!(idx.chunk_count(), 0);
    idx.put_chunk(
        &ChunkId::of(b"x"),
        ChunkRecord {
            size: 1,
            atime_ns: 1,
        },
    )
    .unwrap();
}

#[test]
fn damaged_records_trigger_a_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("index.sled");
    {
        let (idx, _) = Index::open(&path).unwrap();
        idx.chunks.insert(b"short key", b"xx".to_vec()).unwrap();
        idx.flush().unwrap();
    }
    let (idx, report) = Index::open(&path).unwrap();
    assert!(report.rebuilt);
    assert_eq!(idx.chunk_count(), 0);
}
