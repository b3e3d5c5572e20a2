use std::collections::HashSet;

use proptest::prelude::*;

use super::*;

fn track(path: &str) -> TrackRef {
    TrackRef {
        origin: OriginId::new("o").unwrap(),
        path: OriginPath::new(path).unwrap(),
    }
}

fn tags(artist: &str, album: &str, title: &str, n: u32) -> TrackTags {
    TrackTags {
        artist: Some(artist.into()),
        album: Some(album.into()),
        title: Some(title.into()),
        track: Some(n),
        ..TrackTags::default()
    }
}

fn paths(tree: &ViewTree) -> Vec<String> {
    let mut out = Vec::new();
    for a in tree.list(&[]).unwrap() {
        for b in tree.list(&[&a.name]).unwrap() {
            for t in tree.list(&[&a.name, &b.name]).unwrap() {
                out.push(format!("{}/{}/{}", a.name, b.name, t.name));
            }
        }
    }
    out
}

#[test]
fn an_album_by_album_artist_in_track_order() {
    let tree = ViewTree::build([
        (
            track("A/x/2.flac"),
            Some(TrackTags {
                album_artist: Some("Band".into()),
                ..tags("Guest", "Al", "Two", 2)
            }),
        ),
        (
            track("A/x/1.flac"),
            Some(TrackTags {
                album_artist: Some("Band".into()),
                ..tags("Band", "Al", "One", 1)
            }),
        ),
    ]);
    assert_eq!(paths(&tree), ["Band/Al/01 One.flac", "Band/Al/02 Two.flac"]);
    let (dir, order) = tree.album_of(&track("A/x/2.flac")).unwrap();
    assert_eq!(dir, ["Band", "Al"]);
    assert_eq!(order, [track("A/x/1.flac"), track("A/x/2.flac")]);
    assert_eq!(
        (tree.track_count(), tree.album_count(), tree.artist_count()),
        (2, 1, 1)
    );
    assert_eq!(tree.tracks_under(&["Band"]).unwrap().len(), 2);
    assert_eq!(tree.tracks_under(&[]).unwrap().len(), 2);
    assert!(tree.lookup(&["Band", "Al"], "01 One.flac").is_some());
    assert!(tree.lookup(&["Band", "Al"], "nope").is_none());
    assert!(tree.list(&["Nobody"]).is_none());
}

#[test]
fn compilations_and_scattered_artists_are_various_artists() {
    let mut flagged = tags("X", "Hits", "t", 1);
    flagged.compilation = true;
    let tree = ViewTree::build(
        [(track("c/1.mp3"), Some(flagged))]
            .into_iter()
            .chain((1..=5).map(|i| {
                (
                    track(&format!("m/{i}.mp3")),
                    Some(tags(&format!("Artist {i}"), "Mix", "t", i)),
                )
            })),
    );
    let p = paths(&tree);
    assert!(
        p.contains(&"Various Artists/Hits/01 t.mp3".to_owned()),
        "{p:?}"
    );
    assert!(
        p.contains(&"Various Artists/Mix/05 t.mp3".to_owned()),
        "{p:?}"
    );
    // One artist on 2 of 5 tracks (40 %) keeps the album.
    let tree = ViewTree::build((1..=5).map(|i| {
        let a = if i <= 2 {
            "Main"
        } else {
            ["B", "C", "D"][i as usize - 3]
        };
        (
            track(&format!("m/{i}.mp3")),
            Some(tags(a, "Mostly", "t", i)),
        )
    }));
    assert_eq!(tree.list(&[]).unwrap()[0].name, "Main");
}

#[test]
fn missing_tags_get_placeholders() {
    let tree = ViewTree::build([
        (track("x/Song Name.flac"), None),
        (track("x/other.mp3"), Some(TrackTags::default())),
    ]);
    assert_eq!(
        paths(&tree),
        // An album lists in play order: without numbers, by path.
        [
            "[Unknown Artist]/[Unknown Album]/Song Name.flac",
            "[Unknown Artist]/[Unknown Album]/other.mp3"
        ]
    );
}

#[test]
fn multi_disc_albums_in_disc_folders_stay_one_album() {
    let d = |disc, n, path: &str| {
        (
            track(path),
            Some(TrackTags {
                disc: Some(disc),
                ..tags("B", "Double", "s", n)
            }),
        )
    };
    let tree = ViewTree::build([
        d(2, 1, "B/Double/CD2/a.flac"),
        d(1, 1, "B/Double/CD1/a.flac"),
        d(1, 2, "B/Double/CD1/b.flac"),
    ]);
    assert_eq!(
        paths(&tree),
        [
            "B/Double/1-01 s.flac",
            "B/Double/1-02 s.flac",
            "B/Double/2-01 s.flac"
        ]
    );
}

#[test]
fn same_named_albums_are_told_apart_by_year_then_folder() {
    let y = |path: &str, year| {
        (
            track(path),
            Some(TrackTags {
                year: Some(year),
                ..tags("A", "Live", "t", 1)
            }),
        )
    };
    let tree = ViewTree::build([y("1/t.flac", 1999), y("2/t.flac", 2004)]);
    assert_eq!(
        tree.list(&["A"])
            .unwrap()
            .iter()
            .map(|e| e.name.as_str())
            .collect::<Vec<_>>(),
        ["Live [1999]", "Live [2004]"]
    );
    let tree = ViewTree::build([y("Tokyo/t.flac", 1999), y("Paris/t.flac", 1999)]);
    assert_eq!(
        tree.list(&["A"])
            .unwrap()
            .iter()
            .map(|e| e.name.as_str())
            .collect::<Vec<_>>(),
        ["Live [Paris]", "Live [Tokyo]"]
    );
    // One album whose tracks have different years stays one.
    let tree = ViewTree::build([
        y("f/1.flac", 1999),
        (
            track("f/2.flac"),
            Some(TrackTags {
                year: Some(2000),
                ..tags("A", "Live", "u", 2)
            }),
        ),
    ]);
    assert_eq!(tree.album_count(), 1);
}

#[test]
fn artists_spelled_two_ways_are_one_directory_and_case_collisions_get_suffixes() {
    let tree = ViewTree::build([
        (track("a/1.mp3"), Some(tags("ABBA", "Gold", "Intro", 1))),
        (track("b/1.mp3"), Some(tags("Abba", "Arrival", "x", 1))),
        (track("c/1.mp3"), Some(tags("Z", "Same", "intro", 1))),
        (track("c/2.mp3"), Some(tags("Z", "Same", "INTRO", 1))),
    ]);
    assert_eq!(tree.artist_count(), 2);
    let p = paths(&tree);
    // Equal after case folding: the second in play order gets " (2)".
    assert!(
        p.contains(&"Z/Same/01 INTRO.mp3".to_owned())
            && p.contains(&"Z/Same/01 intro (2).mp3".to_owned()),
        "{p:?}"
    );
}

#[test]
fn names_are_sanitised() {
    let tree = ViewTree::build([(track("a/1.mp3"), Some(tags("AC/DC", "..", "a/b\0c", 1)))]);
    assert_eq!(paths(&tree), ["AC_DC/[Unknown Album]/01 a_b_c.mp3"]);
}

fn arb_tags() -> impl Strategy<Value = Option<TrackTags>> {
    let s = || {
        proptest::option::of(prop_oneof![
            "[a-cA-C/. ]{0,4}",
            Just("..".to_owned()),
            Just("x".repeat(300))
        ])
    };
    proptest::option::of(
        (
            s(),
            s(),
            s(),
            s(),
            proptest::option::of(0u32..4),
            proptest::option::of(1u32..3),
            any::<bool>(),
            proptest::option::of(1990u32..1993),
        )
            .prop_map(
                |(title, artist, album_artist, album, track, disc, compilation, year)| TrackTags {
                    title,
                    artist,
                    album_artist,
                    album,
                    track,
                    disc,
                    compilation,
                    year,
                    ..TrackTags::default()
                },
            ),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn every_track_once_valid_unique_names_and_order_free(
        items in proptest::collection::vec(("[ab]/[cd]/[e-h]{1,2}\\.(flac|MP3|x)", arb_tags()), 0..30),
    ) {
        let mut seen = HashSet::new();
        let items: Vec<(TrackRef, Option<TrackTags>)> = items
            .into_iter()
            .filter(|(p, _)| seen.insert(p.clone()))
            .map(|(p, t)| (track(&p), t))
            .collect();
        let tree = ViewTree::build(items.clone());
        let mut reversed = items.clone();
        reversed.reverse();
        prop_assert_eq!(paths(&tree), paths(&ViewTree::build(reversed)));
        prop_assert_eq!(tree.track_count(), items.len());
        let mut found = Vec::new();
        let check_dir = |entries: &[ViewEntry]| -> Result<(), TestCaseError> {
            let mut folded = HashSet::new();
            for e in entries {
                prop_assert!(e.name.len() <= 255 && !e.name.is_empty());
                prop_assert!(!e.name.contains('/') && !e.name.contains('\0'));
                prop_assert!(e.name != "." && e.name != ".." && !e.name.starts_with('.'));
                prop_assert!(folded.insert(names::fold(&e.name)), "duplicate {}", e.name);
            }
            Ok(())
        };
        check_dir(tree.list(&[]).unwrap())?;
        for a in tree.list(&[]).unwrap() {
            check_dir(tree.list(&[&a.name]).unwrap())?;
            for b in tree.list(&[&a.name]).unwrap() {
                let entries = tree.list(&[&a.name, &b.name]).unwrap();
                check_dir(entries)?;
                for e in entries {
                    if let ViewEntryKind::Track(t) = &e.kind { found.push(t.clone()); }
                }
            }
        }
        found.sort();
        let mut want: Vec<TrackRef> = items.into_iter().map(|(t, _)| t).collect();
        want.sort();
        prop_assert_eq!(found, want);
    }
}
