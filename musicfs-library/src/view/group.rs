//! Which tracks make one album, and whose album it is.
//!
//! Layer: inside the view (see `view.rs`). The rules (beets, Navidrome):
//! - An album is the tracks with the same album name (case-folded) and the
//!   same MusicBrainz album id, or without one, the same album folder: the
//!   track's directory, or its parent when the directory is a disc folder
//!   ("CD1", "Disc 2", "disk 3"), so a multi-disc album in per-disc folders
//!   stays one album, and two albums of one name in two folders stay two.
//! - Its artist: Various Artists when a track has the compilation flag;
//!   else the most common album artist tag; else the most common track
//!   artist, unless it is on fewer than a quarter of the tracks (Various
//!   Artists); else "[Unknown Artist]". Ties go to the smallest name, so
//!   the outcome never depends on input order.
//! - Play order: disc, track number, title, then origin and path.

use std::collections::{BTreeMap, HashMap};

use crate::tags::TrackTags;
use crate::view::TrackRef;

pub(crate) const VARIOUS: &str = "Various Artists";
pub(crate) const UNKNOWN_ARTIST: &str = "[Unknown Artist]";
pub(crate) const UNKNOWN_ALBUM: &str = "[Unknown Album]";

/// One album before naming.
#[derive(Debug)]
pub(crate) struct Album {
    pub artist: String,
    pub name: String,
    pub year: Option<u32>,
    /// The album folder's own name, to tell same-named albums apart.
    pub folder: String,
    /// In play order.
    pub tracks: Vec<(TrackRef, Option<TrackTags>)>,
    pub multi_disc: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    album: Option<String>,
    scope: Scope,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Scope {
    MusicBrainz(String),
    Folder(TrackRef),
}

pub(crate) fn albums(
    tracks: impl IntoIterator<Item = (TrackRef, Option<TrackTags>)>,
) -> Vec<Album> {
    let mut groups: BTreeMap<Key, Vec<(TrackRef, Option<TrackTags>)>> = BTreeMap::new();
    for (track, tags) in tracks {
        let t = tags.as_ref();
        let album = t
            .and_then(|t| t.album.as_deref())
            .map(crate::view::names::fold);
        let scope = match t.and_then(|t| t.musicbrainz_album_id.clone()) {
            Some(id) => Scope::MusicBrainz(id.to_ascii_lowercase()),
            None => Scope::Folder(album_folder(&track)),
        };
        groups
            .entry(Key { album, scope })
            .or_default()
            .push((track, tags));
    }
    groups
        .into_iter()
        .map(|(key, mut tracks)| {
            tracks.sort_by(|a, b| play_order(a).cmp(&play_order(b)));
            let tags: Vec<&TrackTags> = tracks.iter().filter_map(|(_, t)| t.as_ref()).collect();
            let name = most_common(tags.iter().filter_map(|t| t.album.as_deref()))
                .unwrap_or(UNKNOWN_ALBUM)
                .to_owned();
            let year = most_common(tags.iter().filter_map(|t| t.year));
            let artist = artist_of(&tags, tracks.len());
            let mut discs: Vec<u32> = tags.iter().filter_map(|t| t.disc).collect();
            discs.sort_unstable();
            discs.dedup();
            let multi_disc =
                discs.len() > 1 || tags.iter().any(|t| t.disc_total.is_some_and(|n| n > 1));
            let folder = match &key.scope {
                Scope::Folder(f) => f
                    .path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| f.origin.as_str().to_owned()),
                Scope::MusicBrainz(id) => id.chars().take(8).collect(),
            };
            Album {
                artist,
                name,
                year,
                folder,
                tracks,
                multi_disc,
            }
        })
        .collect()
}

fn artist_of(tags: &[&TrackTags], total: usize) -> String {
    if tags.iter().any(|t| t.compilation) {
        return VARIOUS.to_owned();
    }
    if let Some(a) = most_common(tags.iter().filter_map(|t| t.album_artist.as_deref())) {
        return a.to_owned();
    }
    let artists: Vec<&str> = tags.iter().filter_map(|t| t.artist.as_deref()).collect();
    match most_common(artists.iter().copied()) {
        None => UNKNOWN_ARTIST.to_owned(),
        Some(a) => {
            let n = artists.iter().filter(|x| **x == a).count();
            // Under a quarter of the tracks: a various-artists album.
            if n * 4 < total {
                VARIOUS.to_owned()
            } else {
                a.to_owned()
            }
        }
    }
}

/// The most frequent value; ties go to the smallest.
fn most_common<T: Ord + Copy + std::hash::Hash>(items: impl Iterator<Item = T>) -> Option<T> {
    let mut counts: HashMap<T, usize> = HashMap::new();
    for i in items {
        *counts.entry(i).or_default() += 1;
    }
    counts
        .into_iter()
        .max_by(|(a, ca), (b, cb)| ca.cmp(cb).then_with(|| b.cmp(a)))
        .map(|(v, _)| v)
}

type Order<'a> = (u32, u32, Option<&'a str>, &'a TrackRef);

fn play_order(item: &(TrackRef, Option<TrackTags>)) -> Order<'_> {
    let (track, tags) = item;
    let t = tags.as_ref();
    (
        t.and_then(|t| t.disc).unwrap_or(1),
        t.and_then(|t| t.track).unwrap_or(u32::MAX),
        t.and_then(|t| t.title.as_deref()),
        track,
    )
}

/// The album folder of a track: its directory, or the directory above a
/// disc folder.
fn album_folder(track: &TrackRef) -> TrackRef {
    let dir = track
        .path
        .parent()
        .unwrap_or_else(musicfs_origins::OriginPath::root);
    let is_disc = dir
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(is_disc_folder);
    let folder = if is_disc {
        dir.parent().unwrap_or(dir)
    } else {
        dir
    };
    TrackRef {
        origin: track.origin.clone(),
        path: folder,
    }
}

/// "CD1", "cd 2", "Disc 3", "Disk04", "disc_1".
fn is_disc_folder(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    let rest = ["disc", "disk", "cd"]
        .iter()
        .find_map(|p| lower.strip_prefix(p));
    rest.is_some_and(|r| {
        let r = r.trim_start_matches([' ', '_', '-', '.']);
        !r.is_empty() && r.chars().all(|c| c.is_ascii_digit())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disc_folders() {
        for yes in ["CD1", "cd 2", "Disc 3", "Disk04", "disc_1", "DISC-2"] {
            assert!(is_disc_folder(yes), "{yes}");
        }
        for no in ["CD", "Discovery", "cd1x", "Album", "1"] {
            assert!(!is_disc_folder(no), "{no}");
        }
    }

    #[test]
    fn most_common_breaks_ties_by_the_smallest() {
        assert_eq!(most_common(["b", "a", "b", "a"].into_iter()), Some("a"));
        assert_eq!(most_common(["b", "a", "b"].into_iter()), Some("b"));
        assert_eq!(most_common(std::iter::empty::<&str>()), None);
    }
}
