//! The tags of one audio file, read with lofty.
//!
//! Layer: over `lazy.rs`. Only tags are read: cover art and audio
//! properties are turned off, so lofty skips picture blocks and never
//! walks the audio. The format is told by content (an extension is only a
//! hint); the primary tag wins, gaps are filled from the file's other tags
//! (an MP3 with ID3v2 and ID3v1, a FLAC with ID3v2 in front).

use std::io::BufReader;

use lofty::config::ParseOptions;
use lofty::file::TaggedFileExt;
use lofty::probe::Probe;
use lofty::tag::{ItemKey, Tag};

use crate::lazy::{LazyReader, RangeSource, ReadStats};
use crate::{LibraryError, Result};

/// What the view needs of a track's tags; all optional.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TrackTags {
    pub title: Option<String>,
    pub artist: Option<String>,
    pub album_artist: Option<String>,
    pub album: Option<String>,
    pub track: Option<u32>,
    pub disc: Option<u32>,
    pub disc_total: Option<u32>,
    pub year: Option<u32>,
    pub compilation: bool,
    pub musicbrainz_album_id: Option<String>,
}

const AUDIO: &[&str] = &[
    "flac", "mp3", "m4a", "m4b", "mp4", "aac", "alac", "ogg", "oga", "opus", "spx", "wav", "aif",
    "aiff", "ape", "wv", "mpc",
];

/// Whether a file name looks like audio (by its extension, any case).
pub fn is_audio_name(name: &[u8]) -> bool {
    let Some(dot) = name.iter().rposition(|&b| b == b'.') else {
        return false;
    };
    let ext = &name[dot + 1..];
    AUDIO.iter().any(|a| a.as_bytes().eq_ignore_ascii_case(ext))
}

/// Reads the tags of the file `source` holds (named `file_name`, for the
/// hint only), fetching only what the tags span.
pub fn read_tags<S: RangeSource>(source: S, file_name: &[u8]) -> Result<(TrackTags, ReadStats)> {
    let _ = file_name;
    let mut reader = LazyReader::new(source);
    let parsed = {
        // Small reads (lofty reads headers a few bytes at a time) are
        // served from the fetched ranges; the buffer only saves calls.
        let buffered = BufReader::with_capacity(4096, &mut reader);
        let options = ParseOptions::new()
            .read_properties(false)
            .read_cover_art(false);
        Probe::new(buffered)
            .options(options)
            .guess_file_type()
            .map_err(|e| unreadable(&e))
            .and_then(|p| {
                if p.file_type().is_none() {
                    return Err(LibraryError::Unreadable {
                        reason: "not a known audio format".into(),
                    });
                }
                p.read().map_err(|e| unreadable(&e))
            })
    };
    let stats = reader.stats();
    let file = parsed?;
    let mut tags = TrackTags::default();
    let mut ordered: Vec<&Tag> = Vec::new();
    if let Some(primary) = file.primary_tag() {
        ordered.push(primary);
    }
    for t in file.tags() {
        if !ordered.iter().any(|o| std::ptr::eq(*o, t)) {
            ordered.push(t);
        }
    }
    for tag in ordered {
        fill(&mut tags, tag);
    }
    Ok((tags, stats))
}

fn unreadable(e: &dyn std::fmt::Display) -> LibraryError {
    LibraryError::Unreadable {
        reason: e.to_string(),
    }
}

/// Fills what `tags` lacks from `tag`.
fn fill(tags: &mut TrackTags, tag: &Tag) {
    let text = |key: ItemKey| {
        tag.get_string(key)
            .map(|s| s.trim().trim_matches('\0').to_owned())
            .filter(|s| !s.is_empty())
    };
    let number = |key: ItemKey| text(key).and_then(|s| leading_number(&s));
    tags.title = tags.title.take().or_else(|| text(ItemKey::TrackTitle));
    tags.artist = tags.artist.take().or_else(|| text(ItemKey::TrackArtist));
    tags.album_artist = tags
        .album_artist
        .take()
        .or_else(|| text(ItemKey::AlbumArtist));
    tags.album = tags.album.take().or_else(|| text(ItemKey::AlbumTitle));
    tags.track = tags.track.or_else(|| number(ItemKey::TrackNumber));
    tags.disc = tags.disc.or_else(|| number(ItemKey::DiscNumber));
    tags.disc_total = tags.disc_total.or_else(|| {
        number(ItemKey::DiscTotal).or_else(|| {
            // "1/2" in the disc number.
            text(ItemKey::DiscNumber)
                .and_then(|s| s.split_once('/').and_then(|(_, t)| leading_number(t)))
        })
    });
    tags.year = tags.year.or_else(|| {
        [ItemKey::RecordingDate, ItemKey::Year, ItemKey::ReleaseDate]
            .into_iter()
            .find_map(|k| text(k).and_then(|s| year_of(&s)))
    });
    tags.compilation = tags.compilation
        || text(ItemKey::FlagCompilation)
            .is_some_and(|s| s == "1" || s.eq_ignore_ascii_case("true"));
    tags.musicbrainz_album_id = tags
        .musicbrainz_album_id
        .take()
        .or_else(|| text(ItemKey::MusicBrainzReleaseId));
}

/// The number a field starts with: "3", "03", "3/12" are 3.
fn leading_number(s: &str) -> Option<u32> {
    let digits: String = s.trim().chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The year of a date: its first four digits ("1994", "1994-05-01").
fn year_of(s: &str) -> Option<u32> {
    let s = s.trim();
    let y: String = s.chars().take(4).collect();
    (y.len() == 4 && y.chars().all(|c| c.is_ascii_digit()))
        .then(|| y.parse().ok())
        .flatten()
}

#[cfg(test)]
mod tests;
