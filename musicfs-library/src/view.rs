//! The view tree: `<album artist>/<album>/<disc-track> <title>.<ext>`.
//!
//! Layer: over `view/group.rs` (which tracks make an album, whose it is)
//! and `view/names.rs` (safe, unique names). Invariants:
//! - Every track given appears exactly once; none is dropped for its name.
//! - Names are unique per directory after case folding: an artist written
//!   two ways ("ABBA", "Abba") is one directory (the first spelling in a
//!   fixed order); two albums of one artist with one name are told apart by
//!   " [YEAR]" when their years differ, else " [folder]" (their folders'
//!   names), and anything still equal by " (2)", " (3)", in a fixed order.
//! - Track names are `TT Title.ext` (`D-TT` when the album has more than
//!   one disc; no number when the track has none), the title falling back
//!   to the file name.
//! - The tree depends only on the set of tracks and tags given, not their
//!   order.

use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt;

use musicfs_origins::{OriginId, OriginPath};

use crate::tags::TrackTags;

mod group;
pub(crate) mod names;

use group::{Album, UNKNOWN_ALBUM, UNKNOWN_ARTIST};
use names::{component, fold, Unique};

/// A file of an origin.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrackRef {
    pub origin: OriginId,
    pub path: OriginPath,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ViewEntryKind {
    Dir,
    Track(TrackRef),
}

/// One entry of a view directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewEntry {
    pub name: String,
    pub kind: ViewEntryKind,
}

/// A directory: its entries in the order shown, and an index by name.
#[derive(Debug, Default)]
struct Dir {
    entries: Vec<ViewEntry>,
    by_name: HashMap<String, usize>,
}

impl Dir {
    fn push(&mut self, entry: ViewEntry) {
        self.by_name.insert(entry.name.clone(), self.entries.len());
        self.entries.push(entry);
    }

    fn sort(&mut self) {
        self.entries
            .sort_by(|a, b| fold(&a.name).cmp(&fold(&b.name)).then(a.name.cmp(&b.name)));
        self.by_name = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.name.clone(), i))
            .collect();
    }
}

#[derive(Debug, Default)]
struct AlbumNode {
    dir: Dir,
    /// Its path: [artist, album].
    path: Vec<String>,
    /// Tracks in play order.
    order: Vec<TrackRef>,
}

/// See the module docs.
#[derive(Debug, Default)]
pub struct ViewTree {
    root: Dir,
    /// Artist name → (its albums, album name → index in `albums`).
    artists: HashMap<String, (Dir, HashMap<String, usize>)>,
    albums: Vec<AlbumNode>,
    album_of: HashMap<TrackRef, usize>,
}

impl ViewTree {
    /// The view of `tracks` (every indexed audio file with its tags; `None`
    /// for a file whose tags cannot be read: it gets placeholders).
    pub fn build(tracks: impl IntoIterator<Item = (TrackRef, Option<TrackTags>)>) -> ViewTree {
        let albums = group::albums(tracks);
        // Artists: one directory per case-folded name.
        let mut artist_names: HashMap<String, String> = HashMap::new();
        let mut by_artist: HashMap<String, Vec<Album>> = HashMap::new();
        for album in albums {
            let shown = component(&album.artist, UNKNOWN_ARTIST);
            let name = artist_names.entry(fold(&shown)).or_insert(shown).clone();
            by_artist.entry(name).or_default().push(album);
        }
        let mut tree = ViewTree::default();
        let mut artist_list: Vec<(String, Vec<Album>)> = by_artist.into_iter().collect();
        artist_list.sort_by(|a, b| a.0.cmp(&b.0));
        for (artist, mut albums) in artist_list {
            albums.sort_by(|a, b| a.tracks[0].0.cmp(&b.tracks[0].0));
            let names = album_names(&albums);
            let mut dir = Dir::default();
            let mut index = HashMap::new();
            for (album, name) in albums.into_iter().zip(names) {
                let node = tree.album_node(&artist, &name, album);
                index.insert(name.clone(), node);
                dir.push(ViewEntry {
                    name,
                    kind: ViewEntryKind::Dir,
                });
            }
            dir.sort();
            tree.root.push(ViewEntry {
                name: artist.clone(),
                kind: ViewEntryKind::Dir,
            });
            tree.artists.insert(artist, (dir, index));
        }
        tree.root.sort();
        tree
    }

    fn album_node(&mut self, artist: &str, name: &str, album: Album) -> usize {
        let at = self.albums.len();
        let mut unique = Unique::default();
        let mut dir = Dir::default();
        let mut order = Vec::with_capacity(album.tracks.len());
        for (track, tags) in album.tracks {
            let file = track
                .path
                .file_name()
                .map(|n| n.as_bytes())
                .unwrap_or_default();
            let ext = names::extension(file);
            let stem_of_file = {
                let f = String::from_utf8_lossy(file).into_owned();
                match f.rfind('.') {
                    Some(i) if i > 0 && !ext.is_empty() => f[..i].to_owned(),
                    _ => f,
                }
            };
            let t = tags.as_ref();
            let title = component(
                t.and_then(|t| t.title.as_deref()).unwrap_or(&stem_of_file),
                &stem_of_file,
            );
            let stem = match t.and_then(|t| t.track) {
                Some(n) if album.multi_disc => {
                    let disc = t.and_then(|t| t.disc).unwrap_or(1);
                    format!("{disc}-{n:02} {title}")
                }
                Some(n) => format!("{n:02} {title}"),
                None => title,
            };
            let name = unique.claim(&stem, &ext);
            self.album_of.insert(track.clone(), at);
            order.push(track.clone());
            dir.push(ViewEntry {
                name,
                kind: ViewEntryKind::Track(track),
            });
        }
        self.albums.push(AlbumNode {
            dir,
            path: vec![artist.to_owned(), name.to_owned()],
            order,
        });
        at
    }

    /// The entries of a view directory: `[]` is the view root (artists),
    /// `[artist]` its albums, `[artist, album]` its tracks; `None` if there
    /// is no such directory.
    pub fn list(&self, dir: &[&str]) -> Option<&[ViewEntry]> {
        self.dir(dir).map(|d| d.entries.as_slice())
    }

    fn dir(&self, dir: &[&str]) -> Option<&Dir> {
        match dir {
            [] => Some(&self.root),
            [artist] => self.artists.get(*artist).map(|(d, _)| d),
            [artist, album] => {
                let (_, index) = self.artists.get(*artist)?;
                index.get(*album).map(|&i| &self.albums[i].dir)
            }
            _ => None,
        }
    }

    /// The entry `name` of the view directory `dir`.
    pub fn lookup(&self, dir: &[&str], name: &str) -> Option<&ViewEntry> {
        let d = self.dir(dir)?;
        d.by_name.get(name).map(|&i| &d.entries[i])
    }

    /// The album a track is in: its directory (`[artist, album]`) and its
    /// tracks in play order.
    pub fn album_of(&self, track: &TrackRef) -> Option<(Vec<String>, &[TrackRef])> {
        let a = &self.albums[*self.album_of.get(track)?];
        Some((a.path.clone(), &a.order))
    }

    /// Every track below a view directory, in play order per album.
    pub fn tracks_under(&self, dir: &[&str]) -> Option<Vec<TrackRef>> {
        match dir {
            [_, _] => {
                let (_, index) = self.artists.get(dir[0])?;
                Some(self.albums[*index.get(dir[1])?].order.clone())
            }
            [artist] => {
                let (d, index) = self.artists.get(*artist)?;
                Some(
                    d.entries
                        .iter()
                        .filter_map(|e| index.get(&e.name))
                        .flat_map(|&i| self.albums[i].order.iter().cloned())
                        .collect(),
                )
            }
            [] => Some(
                self.root
                    .entries
                    .iter()
                    .filter_map(|e| self.tracks_under(&[&e.name]))
                    .flatten()
                    .collect(),
            ),
            _ => None,
        }
    }

    pub fn track_count(&self) -> usize {
        self.album_of.len()
    }

    pub fn album_count(&self) -> usize {
        self.albums.len()
    }

    pub fn artist_count(&self) -> usize {
        self.artists.len()
    }
}

/// The names of one artist's albums (given in a fixed order): unique after
/// case folding, same-named ones told apart (see the module docs).
fn album_names(albums: &[Album]) -> Vec<String> {
    let base: Vec<String> = albums
        .iter()
        .map(|a| component(&a.name, UNKNOWN_ALBUM))
        .collect();
    let mut same: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, b) in base.iter().enumerate() {
        same.entry(fold(b)).or_default().push(i);
    }
    let mut names = base.clone();
    for group in same.values().filter(|g| g.len() > 1) {
        let years: Vec<Option<u32>> = group.iter().map(|&i| albums[i].year).collect();
        let distinct_years = years.iter().all(Option::is_some) && {
            let mut y = years.clone();
            y.sort_unstable();
            y.dedup();
            y.len() == years.len()
        };
        let folders: Vec<String> = group.iter().map(|&i| fold(&albums[i].folder)).collect();
        let distinct_folders = {
            let mut f = folders.clone();
            f.sort();
            f.dedup();
            f.len() == folders.len()
        };
        for &i in group {
            let tag = if distinct_years {
                albums[i].year.map(|y| y.to_string()).unwrap_or_default()
            } else if distinct_folders {
                component(&albums[i].folder, "_")
            } else {
                continue;
            };
            let suffix = format!(" [{tag}]");
            let room = names::NAME_MAX.saturating_sub(suffix.len());
            names[i] = format!("{}{suffix}", names::cut(&base[i], room));
        }
    }
    let mut unique = Unique::default();
    names.into_iter().map(|n| unique.claim(&n, "")).collect()
}

#[cfg(test)]
mod tests;
