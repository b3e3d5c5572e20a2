//! Cached directory listings, so a library can be browsed offline and fast
//! on a slow origin.
//!
//! A [`Listing`] is one directory's entries with their metadata as the
//! origin last reported them, and when (`fetched_at_ns`, wall clock) so the
//! filesystem can decide when to refresh. Decoding treats the bytes as
//! untrusted: damage is a [`CasError::CorruptRecord`], never a panic, and a
//! record that decodes names only single components and carries link
//! targets only on symlinks.
//!
//! Format `MFL2`: names are bytes (Linux names need not be UTF-8) and each
//! entry may carry the symlink target the origin checked. `MFL1` records,
//! written before symlinks were served, still decode so that a library
//! stays browsable offline across an upgrade; their symlink entries are
//! dropped, since nothing checked where those lead.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use musicfs_origins::{DirEntry, EntryKind, EntryMeta, OriginPath};

use crate::codec::{put_bytes, put_opt_i64, put_opt_str, Reader};
use crate::{CasError, Result};

const MAGIC: &[u8; 4] = b"MFL2";
/// Before names were bytes and symlinks served; no link targets.
const MAGIC_V1: &[u8; 4] = b"MFL1";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    /// When the origin was asked, nanoseconds since the Unix epoch.
    pub fetched_at_ns: u64,
    pub entries: Vec<DirEntry>,
}

impl Listing {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.entries.len() * 64);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.fetched_at_ns.to_le_bytes());
        out.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for e in &self.entries {
            put_bytes(&mut out, e.name.as_bytes());
            out.push(match e.meta.kind {
                EntryKind::File => 0,
                EntryKind::Dir => 1,
                EntryKind::Symlink => 2,
            });
            out.extend_from_slice(&e.meta.size.to_le_bytes());
            put_opt_i64(&mut out, e.meta.mtime_ns);
            put_opt_str(&mut out, e.meta.etag.as_deref());
            match &e.link_target {
                Some(t) => {
                    out.push(1);
                    put_bytes(&mut out, t.as_os_str().as_bytes());
                }
                None => out.push(0),
            }
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new(bytes, "listing");
        let v1 = match r.take(4)? {
            m if m == MAGIC => false,
            m if m == MAGIC_V1 => true,
            _ => return Err(corrupt("bad magic")),
        };
        let fetched_at_ns = r.u64()?;
        let count = r.u32()? as usize;
        // Every entry takes at least 14 bytes (16 since MFL2): refuse counts
        // the bytes cannot hold before allocating for them.
        let min_entry = if v1 { 14 } else { 16 };
        if count > r.remaining() / min_entry {
            return Err(corrupt("entry count larger than the record"));
        }
        let mut entries = Vec::with_capacity(count);
        for _ in 0..count {
            let name = OsStr::from_bytes(r.bytes()?);
            if !OriginPath::is_valid_name(name) {
                return Err(corrupt("an entry name is not a single component"));
            }
            let kind = match r.u8()? {
                0 => EntryKind::File,
                1 => EntryKind::Dir,
                2 => EntryKind::Symlink,
                _ => return Err(corrupt("bad entry kind")),
            };
            let size = r.u64()?;
            let mtime_ns = r.opt_i64()?;
            let etag = r.opt_string()?;
            let link_target = if v1 { None } else { link_target(&mut r, kind)? };
            if v1 && kind == EntryKind::Symlink {
                continue;
            }
            entries.push(DirEntry {
                name: name.to_owned(),
                meta: EntryMeta {
                    kind,
                    size,
                    mtime_ns,
                    etag,
                },
                link_target,
            });
        }
        if r.remaining() != 0 {
            return Err(corrupt("trailing bytes"));
        }
        Ok(Self {
            fetched_at_ns,
            entries,
        })
    }
}

/// An entry's optional link target: only a symlink has one, and it is a
/// non-empty path without NUL.
fn link_target(r: &mut Reader<'_>, kind: EntryKind) -> Result<Option<PathBuf>> {
    match r.u8()? {
        0 => Ok(None),
        1 => {
            let t = r.bytes()?;
            if kind != EntryKind::Symlink {
                return Err(corrupt("a link target on an entry that is no symlink"));
            }
            if t.is_empty() || t.contains(&0) {
                return Err(corrupt("an unusable link target"));
            }
            Ok(Some(PathBuf::from(OsStr::from_bytes(t))))
        }
        _ => Err(corrupt("bad link target flag")),
    }
}

fn corrupt(reason: &str) -> CasError {
    crate::codec::corrupt("listing", reason)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn meta(kind: EntryKind, size: u64) -> EntryMeta {
        EntryMeta {
            kind,
            size,
            mtime_ns: Some(-1),
            etag: None,
        }
    }

    fn sample() -> Listing {
        Listing {
            fetched_at_ns: 42,
            entries: vec![
                DirEntry::new("坂本龍一", meta(EntryKind::Dir, 0)),
                DirEntry::new(
                    "01 - Tide \"north\".flac",
                    EntryMeta {
                        kind: EntryKind::File,
                        size: 123,
                        mtime_ns: None,
                        etag: Some("e".into()),
                    },
                ),
                DirEntry::new(OsStr::from_bytes(b"Bj\xf6rk"), meta(EntryKind::Dir, 0)),
                DirEntry {
                    name: OsStr::from_bytes(b"J\xf3ga \xff.flac").to_owned(),
                    meta: meta(EntryKind::Symlink, 22),
                    link_target: Some(PathBuf::from(OsStr::from_bytes(
                        b"../Bj\xf6rk/J\xf3ga.flac",
                    ))),
                },
            ],
        }
    }

    #[test]
    fn round_trips_with_byte_names_and_link_targets() {
        let l = sample();
        let encoded = l.encode();
        assert_eq!(&encoded[..4], b"MFL2");
        assert_eq!(Listing::decode(&encoded).unwrap(), l);
    }

    /// An `MFL1` record as the previous release wrote it.
    fn v1_record() -> Vec<u8> {
        let mut out = b"MFL1".to_vec();
        out.extend_from_slice(&7u64.to_le_bytes());
        out.extend_from_slice(&2u32.to_le_bytes());
        for (name, kind) in [("Album", 1u8), ("link", 2u8)] {
            put_bytes(&mut out, name.as_bytes());
            out.push(kind);
            out.extend_from_slice(&9u64.to_le_bytes());
            put_opt_i64(&mut out, Some(5));
            put_opt_str(&mut out, None);
        }
        out
    }

    #[test]
    fn old_records_decode_without_their_unchecked_symlinks() {
        let l = Listing::decode(&v1_record()).unwrap();
        assert_eq!(l.fetched_at_ns, 7);
        assert_eq!(l.entries.len(), 1);
        assert_eq!(l.entries[0].name, "Album");
        assert_eq!(l.entries[0].meta.kind, EntryKind::Dir);
        assert_eq!(l.entries[0].link_target, None);
    }

    #[test]
    fn names_and_targets_are_checked() {
        let with = |name: &[u8], kind, target: Option<&[u8]>| Listing {
            fetched_at_ns: 1,
            entries: vec![DirEntry {
                name: OsStr::from_bytes(name).to_owned(),
                meta: meta(kind, 1),
                link_target: target.map(|t| PathBuf::from(OsStr::from_bytes(t))),
            }],
        };
        for bad in [
            with(b"", EntryKind::File, None),
            with(b"..", EntryKind::Dir, None),
            with(b"a/b", EntryKind::File, None),
            with(b"a\0b", EntryKind::File, None),
            with(b"f", EntryKind::File, Some(b"x")),
            with(b"l", EntryKind::Symlink, Some(b"")),
            with(b"l", EntryKind::Symlink, Some(b"a\0")),
        ] {
            assert!(Listing::decode(&bad.encode()).is_err(), "{bad:?}");
        }
        // A symlink without a target is fine: the origin is asked for it.
        let l = with(b"l", EntryKind::Symlink, None);
        assert_eq!(Listing::decode(&l.encode()).unwrap(), l);
    }

    proptest! {
        #[test]
        fn damaged_listings_never_panic(pos in 0usize..200, val in any::<u8>(), cut in 0usize..200) {
            for mut b in [sample().encode(), v1_record()] {
                let p = pos % b.len();
                b[p] = val;
                b.truncate(cut.min(b.len()));
                // What decodes has one spelling (the fuzz target's check).
                if let Ok(l) = Listing::decode(&b) {
                    if b.starts_with(MAGIC) {
                        prop_assert_eq!(l.encode(), b);
                    } else {
                        prop_assert_eq!(Listing::decode(&l.encode()).unwrap(), l);
                    }
                }
            }
        }

        #[test]
        fn any_valid_names_round_trip(
            names in prop::collection::vec(prop::collection::vec(1u8..=255, 1..12), 0..8),
        ) {
            let entries: Vec<DirEntry> = names
                .iter()
                .filter(|n| OriginPath::is_valid_name(OsStr::from_bytes(n)))
                .map(|n| DirEntry::new(OsStr::from_bytes(n), meta(EntryKind::File, n.len() as u64)))
                .collect();
            let l = Listing { fetched_at_ns: 3, entries };
            prop_assert_eq!(Listing::decode(&l.encode()).unwrap(), l);
        }
    }
}
