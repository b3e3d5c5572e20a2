//! A `Read + Seek` over a file's bytes fetched by range, on demand.
//!
//! Layer: below the tag reader (`tags.rs`), above whatever fetches ranges
//! (the cache, in MusicFS). Invariants: a byte is fetched at most once;
//! nothing is fetched past the size; reads return exactly the bytes of the
//! source at their offsets. The fetch policy keeps a scan cheap: the first
//! miss in the head fetches the first [`HEAD`] bytes at once (FLAC
//! metadata, ID3v2, Ogg headers, an MP4 `ftyp`/`moov` at the front), a miss
//! in the last [`TAIL`] bytes fetches them at once (ID3v1, an APE footer),
//! any other miss at least [`STEP`] bytes (an MP4 `moov` at the end).

use std::io::{self, Read, Seek, SeekFrom};

/// Fetched at once on the first miss near the start.
pub const HEAD: u64 = 60 << 10;
/// Fetched at once on a miss near the end.
pub const TAIL: u64 = 4 << 10;
/// The least any other miss fetches.
pub const STEP: u64 = 16 << 10;

/// A source of one file's bytes by range; blocking is fine (a tag reader
/// runs on a blocking thread).
pub trait RangeSource {
    fn size(&self) -> u64;
    /// Exactly `len` bytes at `offset` (the caller never asks past the
    /// size), or an error.
    fn read_at(&mut self, offset: u64, len: u64) -> io::Result<Vec<u8>>;
}

/// What a tag read cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadStats {
    pub fetched_bytes: u64,
    pub requests: u64,
}

/// See the module docs.
#[derive(Debug)]
pub struct LazyReader<S: RangeSource> {
    source: S,
    size: u64,
    pos: u64,
    /// Fetched extents: (start, bytes), sorted, never overlapping.
    held: Vec<(u64, Vec<u8>)>,
    stats: ReadStats,
}

impl<S: RangeSource> LazyReader<S> {
    pub fn new(source: S) -> Self {
        let size = source.size();
        LazyReader {
            source,
            size,
            pos: 0,
            held: Vec::new(),
            stats: ReadStats::default(),
        }
    }

    pub fn stats(&self) -> ReadStats {
        self.stats
    }

    pub fn into_source(self) -> S {
        self.source
    }

    /// The extent holding `pos`, if fetched.
    fn extent_at(&self, pos: u64) -> Option<&(u64, Vec<u8>)> {
        let i = self.held.partition_point(|(s, _)| *s <= pos);
        let e = self.held.get(i.checked_sub(1)?)?;
        (pos < e.0 + e.1.len() as u64).then_some(e)
    }

    /// Fetches what is missing of `[start, end)`.
    fn fetch(&mut self, start: u64, end: u64) -> io::Result<()> {
        let mut pos = start;
        while pos < end {
            if let Some((s, b)) = self.extent_at(pos) {
                pos = s + b.len() as u64;
                continue;
            }
            // Up to the next held extent or the end.
            let i = self.held.partition_point(|(s, _)| *s <= pos);
            let gap_end = self.held.get(i).map_or(end, |(s, _)| (*s).min(end));
            let bytes = self.source.read_at(pos, gap_end - pos)?;
            if bytes.len() as u64 != gap_end - pos {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "the source gave {} bytes at {pos}, not the {} asked",
                        bytes.len(),
                        gap_end - pos
                    ),
                ));
            }
            self.stats.requests += 1;
            self.stats.fetched_bytes += bytes.len() as u64;
            self.held.insert(i, (pos, bytes));
            pos = gap_end;
        }
        Ok(())
    }

    /// The range the policy fetches for a miss at `pos` wanting `want`.
    fn policy(&self, pos: u64, want: u64) -> (u64, u64) {
        let end = pos.saturating_add(want).min(self.size);
        if pos < HEAD {
            return (0, end.max(HEAD.min(self.size)));
        }
        let tail = self.size.saturating_sub(TAIL);
        if pos >= tail {
            return (tail, self.size);
        }
        (pos, end.max(pos.saturating_add(STEP).min(tail)))
    }
}

impl<S: RangeSource> Read for LazyReader<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.size || buf.is_empty() {
            return Ok(0);
        }
        if self.extent_at(self.pos).is_none() {
            let (start, end) = self.policy(self.pos, buf.len() as u64);
            self.fetch(start, end)?;
        }
        let pos = self.pos;
        let Some((s, bytes)) = self.extent_at(pos) else {
            return Err(io::Error::other("a fetched range is not held"));
        };
        let from = (pos - s) as usize;
        let n = buf.len().min(bytes.len() - from);
        buf[..n].copy_from_slice(&bytes[from..from + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl<S: RangeSource> Seek for LazyReader<S> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let new = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.size.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        let Some(new) = new else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before the start of the file",
            ));
        };
        self.pos = new;
        Ok(new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) struct VecSource(pub Vec<u8>, pub Vec<(u64, u64)>);

    impl RangeSource for VecSource {
        fn size(&self) -> u64 {
            self.0.len() as u64
        }
        fn read_at(&mut self, offset: u64, len: u64) -> io::Result<Vec<u8>> {
            self.1.push((offset, len));
            Ok(self.0[offset as usize..(offset + len) as usize].to_vec())
        }
    }

    #[test]
    fn head_and_tail_misses_fetch_once() {
        let data: Vec<u8> = (0..500_000u32).map(|i| (i % 251) as u8).collect();
        let mut r = LazyReader::new(VecSource(data.clone(), Vec::new()));
        let mut b = [0u8; 4];
        r.read_exact(&mut b).unwrap();
        r.seek(SeekFrom::Start(100)).unwrap();
        r.read_exact(&mut b).unwrap();
        r.seek(SeekFrom::End(-128)).unwrap();
        let mut t = [0u8; 128];
        r.read_exact(&mut t).unwrap();
        r.seek(SeekFrom::End(-160)).unwrap();
        r.read_exact(&mut b).unwrap();
        assert_eq!(&t[..], &data[data.len() - 128..]);
        let stats = r.stats();
        assert_eq!(stats.requests, 2);
        assert_eq!(stats.fetched_bytes, HEAD + TAIL);
        assert_eq!(r.into_source().1, vec![(0, HEAD), (500_000 - TAIL, TAIL)]);
    }

    proptest! {
        #[test]
        fn reads_equal_the_slice_of_the_whole(
            len in 0usize..300_000,
            ops in proptest::collection::vec((0u64..320_000, 1usize..70_000), 1..20),
        ) {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 % 256) as u8).collect();
            let mut r = LazyReader::new(VecSource(data.clone(), Vec::new()));
            for (at, n) in ops {
                r.seek(SeekFrom::Start(at)).unwrap();
                let mut buf = vec![0u8; n];
                let mut got = 0;
                loop {
                    let k = r.read(&mut buf[got..]).unwrap();
                    if k == 0 { break; }
                    got += k;
                }
                let start = (at as usize).min(len);
                let end = (at as usize).saturating_add(n).min(len);
                prop_assert_eq!(&buf[..got], &data[start..end]);
            }
            let fetched = r.stats().fetched_bytes;
            prop_assert!(fetched <= len as u64, "each byte fetched at most once");
        }
    }
}
