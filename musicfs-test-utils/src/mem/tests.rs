//! Unit tests of `MemOrigin`.

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
