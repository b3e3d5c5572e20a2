//! The tag index record of one file: the version its tags were read from,
//! and the tags (none when they could not be read).
//!
//! Layer: between the tag scan and the index (which stores the bytes).
//! Format `MTG1`: the magic, the version (size u64, mtime flag + i64, etag
//! flag + string), a tags flag, then each field as a flagged string or
//! number; little-endian, strings as u32 length + UTF-8. Decoding checks
//! every length against what is left, so a damaged record is an error,
//! never a panic or a huge allocation.

use musicfs_origins::FileVersion;

use crate::tags::TrackTags;
use crate::{LibraryError, Result};

const MAGIC: &[u8; 4] = b"MTG1";

/// See the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagRecord {
    pub version: FileVersion,
    /// `None`: the file's tags could not be read (shown with placeholders).
    pub tags: Option<TrackTags>,
}

impl TagRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.version.size.to_le_bytes());
        put_opt(&mut out, self.version.mtime_ns.map(|m| m.to_le_bytes()));
        put_str(&mut out, self.version.etag.as_deref());
        match &self.tags {
            None => out.push(0),
            Some(t) => {
                out.push(1);
                for s in [
                    &t.title,
                    &t.artist,
                    &t.album_artist,
                    &t.album,
                    &t.musicbrainz_album_id,
                ] {
                    put_str(&mut out, s.as_deref());
                }
                for n in [t.track, t.disc, t.disc_total, t.year] {
                    put_opt(&mut out, n.map(u32::to_le_bytes));
                }
                out.push(u8::from(t.compilation));
            }
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader(bytes);
        if r.take(4)? != MAGIC {
            return Err(bad("not a tag record"));
        }
        let size = u64::from_le_bytes(r.array()?);
        let mtime_ns = if r.flag()? {
            Some(i64::from_le_bytes(r.array()?))
        } else {
            None
        };
        let etag = r.opt_str()?;
        let tags = if r.flag()? {
            let title = r.opt_str()?;
            let artist = r.opt_str()?;
            let album_artist = r.opt_str()?;
            let album = r.opt_str()?;
            let musicbrainz_album_id = r.opt_str()?;
            let mut n = [None; 4];
            for slot in &mut n {
                *slot = if r.flag()? {
                    Some(u32::from_le_bytes(r.array()?))
                } else {
                    None
                };
            }
            let compilation = r.flag()?;
            Some(TrackTags {
                title,
                artist,
                album_artist,
                album,
                track: n[0],
                disc: n[1],
                disc_total: n[2],
                year: n[3],
                compilation,
                musicbrainz_album_id,
            })
        } else {
            None
        };
        if !r.0.is_empty() {
            return Err(bad("trailing bytes"));
        }
        Ok(TagRecord {
            version: FileVersion {
                size,
                mtime_ns,
                etag,
            },
            tags,
        })
    }
}

fn bad(reason: &str) -> LibraryError {
    LibraryError::BadRecord {
        reason: reason.into(),
    }
}

fn put_opt<const N: usize>(out: &mut Vec<u8>, v: Option<[u8; N]>) {
    match v {
        None => out.push(0),
        Some(b) => {
            out.push(1);
            out.extend_from_slice(&b);
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => out.push(0),
        Some(s) => {
            out.push(1);
            // Tag strings are far below 4 GiB; a longer one is cut (on a
            // char boundary) rather than encoded wrong.
            let mut s = s;
            while u32::try_from(s.len()).is_err() {
                let mut cut = s.len() / 2;
                while !s.is_char_boundary(cut) {
                    cut -= 1;
                }
                s = &s[..cut];
            }
            out.extend_from_slice(&(s.len() as u32).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(bad("truncated"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn flag(&mut self) -> Result<bool> {
        match self.take(1)?[0] {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(bad("bad flag")),
        }
    }

    fn opt_str(&mut self) -> Result<Option<String>> {
        if !self.flag()? {
            return Ok(None);
        }
        let len = u32::from_le_bytes(self.array()?) as usize;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec())
            .map(Some)
            .map_err(|_| bad("a string is not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn opt_s() -> impl Strategy<Value = Option<String>> {
        proptest::option::of(".{0,20}")
    }

    proptest! {
        #[test]
        fn decode_inverts_encode(
            size in any::<u64>(), mtime in proptest::option::of(any::<i64>()), etag in opt_s(),
            present in any::<bool>(), title in opt_s(), artist in opt_s(), aa in opt_s(),
            album in opt_s(), mb in opt_s(),
            nums in proptest::collection::vec(proptest::option::of(any::<u32>()), 4),
            comp in any::<bool>(),
        ) {
            let r = TagRecord {
                version: FileVersion { size, mtime_ns: mtime, etag },
                tags: present.then(|| TrackTags {
                    title, artist, album_artist: aa, album, musicbrainz_album_id: mb,
                    track: nums[0], disc: nums[1], disc_total: nums[2], year: nums[3],
                    compilation: comp,
                }),
            };
            prop_assert_eq!(TagRecord::decode(&r.encode()).unwrap(), r);
        }

        #[test]
        fn garbage_is_an_error_not_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = TagRecord::decode(&bytes);
            let mut b = MAGIC.to_vec();
            b.extend_from_slice(&bytes);
            let _ = TagRecord::decode(&b);
        }
    }

    #[test]
    fn a_truncated_record_is_an_error() {
        let r = TagRecord {
            version: FileVersion {
                size: 5,
                mtime_ns: Some(7),
                etag: None,
            },
            tags: Some(TrackTags {
                title: Some("t".into()),
                ..TrackTags::default()
            }),
        };
        let b = r.encode();
        for n in 0..b.len() {
            assert!(TagRecord::decode(&b[..n]).is_err(), "{n}");
        }
    }
}
