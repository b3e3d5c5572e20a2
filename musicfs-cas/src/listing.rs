//! Cached directory listings, so a library can be browsed offline and fast
//! on a slow origin.
//!
//! A [`Listing`] is one directory's entries with their metadata as the
//! origin last reported them, and when (`fetched_at_ns`, wall clock) so the
//! filesystem can decide when to refresh. Decoding treats the bytes as
//! untrusted: damage is a [`CasError::CorruptRecord`], never a panic.

use musicfs_origins::{DirEntry, EntryKind, EntryMeta};

use crate::codec::{put_opt_i64, put_opt_str, put_str, Reader};
use crate::{CasError, Result};

const MAGIC: &[u8; 4] = b"MFL1";

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
            put_str(&mut out, &e.name);
            out.push(match e.meta.kind {
                EntryKind::File => 0,
                EntryKind::Dir => 1,
                EntryKind::Symlink => 2,
            });
            out.extend_from_slice(&e.meta.size.to_le_bytes());
            put_opt_i64(&mut out, e.meta.mtime_ns);
            put_opt_str(&mut out, e.meta.etag.as_deref());
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new(bytes, "listing");
        if r.take(4)? != MAGIC {
            return Err(corrupt("bad magic"));
        }
        let fetched_at_ns = r.u64()?;
        let count = r.u32()? as usize;
        // Every entry takes at least 14 bytes: refuse counts the bytes
        // cannot hold before allocating for them.
        if count > r.remaining() / 14 {
            return Err(corrupt("entry count larger than the record"));
        }
        let mut entries = Vec::with_capacity(count);
        for _ in 0..count {
            let name = r.string()?;
            let kind = match r.u8()? {
                0 => EntryKind::File,
                1 => EntryKind::Dir,
                2 => EntryKind::Symlink,
                _ => return Err(corrupt("bad entry kind")),
            };
            let size = r.u64()?;
            let mtime_ns = r.opt_i64()?;
            let etag = r.opt_string()?;
            entries.push(DirEntry {
                name,
                meta: EntryMeta {
                    kind,
                    size,
                    mtime_ns,
                    etag,
                },
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

fn corrupt(reason: &str) -> CasError {
    crate::codec::corrupt("listing", reason)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Listing {
        Listing {
            fetched_at_ns: 42,
            entries: vec![
                DirEntry {
                    name: "坂本龍一".into(),
                    meta: EntryMeta {
                        kind: EntryKind::Dir,
                        size: 0,
                        mtime_ns: Some(-1),
                        etag: None,
                    },
                },
                DirEntry {
                    name: "01 - Tide \"north\".flac".into(),
                    meta: EntryMeta {
                        kind: EntryKind::File,
                        size: 123,
                        mtime_ns: None,
                        etag: Some("e".into()),
                    },
                },
            ],
        }
    }

    #[test]
    fn round_trips() {
        let l = sample();
        assert_eq!(Listing::decode(&l.encode()).unwrap(), l);
    }

    proptest! {
        #[test]
        fn damaged_listings_never_panic(pos in 0usize..200, val in any::<u8>(), cut in 0usize..200) {
            let mut b = sample().encode();
            let p = pos % b.len();
            b[p] = val;
            b.truncate(cut.min(b.len()));
            let _ = Listing::decode(&b);
        }
    }
}
