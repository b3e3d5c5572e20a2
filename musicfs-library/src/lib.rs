//! The music view of MusicFS: what a library looks like to a listener.
//!
//! Layer: pure logic beside the cache and the filesystem; no I/O of its own.
//! - `lazy.rs`: a `Read + Seek` over a [`RangeSource`] that fetches small
//!   ranges on demand (the head, the last bytes, what a tag spans), so a
//!   tag scan costs the tag bytes, not the file.
//! - `tags.rs`: the tags of one file, read with lofty (tags only: no cover
//!   art, no audio properties).
//! - `record.rs`: the tag index record stored per file version.
//! - `view.rs` (with `view/group.rs`, `view/names.rs`): the tree
//!   `<album artist>/<album>/<disc-track> <title>.<ext>` built from the
//!   records, by the rules librarians settled (beets, Navidrome).
//!
//! Invariants: bad input is an error, never a panic; the tree is a pure,
//! deterministic function of the set of (track, tags) it is built from, and
//! every track appears in it exactly once under a valid, unique name.

mod lazy;
mod record;
mod tags;
mod view;

pub use lazy::{LazyReader, RangeSource, ReadStats};
pub use record::TagRecord;
pub use tags::{is_audio_name, read_tags, TrackTags};
pub use view::{TrackRef, ViewEntry, ViewEntryKind, ViewTree};

/// What can go wrong reading tags or decoding a record.
#[derive(Debug, thiserror::Error)]
pub enum LibraryError {
    #[error("the file's tags cannot be read: {reason}; it is shown with placeholders")]
    Unreadable { reason: String },

    #[error("a tag index record cannot be decoded: {reason}; the file's tags are read again")]
    BadRecord { reason: String },
}

pub type Result<T, E = LibraryError> = std::result::Result<T, E>;
