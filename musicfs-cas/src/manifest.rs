//! File manifests: which chunks make up a version of an origin file.
//!
//! A manifest belongs to one version of one file (size, mtime, etag). It may
//! be partial: ingest extends it chunk by chunk as a file is played, and a
//! partial manifest always covers a prefix `[0, covered)` of the file ending
//! on a chunk boundary, so ingest can resume from it with the same chunk
//! boundaries. Manifests are read back from disk, so decoding treats the
//! bytes as untrusted: any damage gives [`CasError::CorruptRecord`].

pub use musicfs_origins::FileVersion;

use crate::codec::{put_opt_i64, put_opt_str, Reader};
use crate::{CasError, ChunkId, Result};

const MAGIC: &[u8; 4] = b"MFM1";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRef {
    pub id: ChunkId,
    pub len: u32,
}

/// Chunks of a file prefix, with the end offset of each for binary search.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub version: FileVersion,
    chunks: Vec<ChunkRef>,
    ends: Vec<u64>,
}

impl Manifest {
    pub fn new(version: FileVersion) -> Self {
        Self {
            version,
            chunks: Vec::new(),
            ends: Vec::new(),
        }
    }

    /// Bytes of the file the chunks cover, from offset 0.
    pub fn covered(&self) -> u64 {
        self.ends.last().copied().unwrap_or(0)
    }

    pub fn is_complete(&self) -> bool {
        self.covered() == self.version.size
    }

    pub fn chunks(&self) -> &[ChunkRef] {
        &self.chunks
    }

    /// Appends the next chunk. A chunk past the file's size means the origin
    /// served more bytes than it said the file has.
    pub fn push(&mut self, chunk: ChunkRef) -> Result<()> {
        let end = self.covered() + u64::from(chunk.len);
        if end > self.version.size || chunk.len == 0 {
            return Err(CasError::CorruptRecord {
                what: "manifest",
                reason: format!(
                    "chunk of {} bytes ends at {end}, past the file size {}",
                    chunk.len, self.version.size
                ),
            });
        }
        self.chunks.push(chunk);
        self.ends.push(end);
        Ok(())
    }

    /// The chunks overlapping `[offset, offset+len)` within the covered
    /// prefix, each with its start offset in the file.
    pub fn chunks_in(&self, offset: u64, len: u64) -> Vec<(u64, ChunkRef)> {
        let end = offset.saturating_add(len).min(self.covered());
        if offset >= end {
            return Vec::new();
        }
        // First chunk whose end is past `offset`.
        let first = self.ends.partition_point(|&e| e <= offset);
        let mut out = Vec::new();
        for i in first..self.chunks.len() {
            let start = self.start_of(i);
            if start >= end {
                break;
            }
            out.push((start, self.chunks[i]));
        }
        out
    }

    fn start_of(&self, i: usize) -> u64 {
        if i == 0 {
            0
        } else {
            self.ends[i - 1]
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let etag = self.version.etag.as_deref().unwrap_or("").as_bytes();
        let mut out = Vec::with_capacity(4 + 8 + 9 + 5 + etag.len() + 4 + self.chunks.len() * 36);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.version.size.to_le_bytes());
        put_opt_i64(&mut out, self.version.mtime_ns);
        put_opt_str(&mut out, self.version.etag.as_deref());
        out.extend_from_slice(&(self.chunks.len() as u32).to_le_bytes());
        for c in &self.chunks {
            out.extend_from_slice(c.id.as_bytes());
            out.extend_from_slice(&c.len.to_le_bytes());
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new(bytes, "manifest");
        if r.take(4)? != MAGIC {
            return Err(corrupt("bad magic (not a MusicFS manifest)"));
        }
        let size = r.u64()?;
        let mtime_ns = r.opt_i64()?;
        let etag = r.opt_string()?;
        let count = r.u32()? as usize;
        // Each chunk takes 36 bytes: check before allocating for `count`.
        if r.remaining() != count.saturating_mul(36) {
            return Err(corrupt("chunk list length does not match its count"));
        }
        let mut m = Manifest::new(FileVersion {
            size,
            mtime_ns,
            etag,
        });
        for _ in 0..count {
            let mut id = [0u8; 32];
            id.copy_from_slice(r.take(32)?);
            let len = r.u32()?;
            m.push(ChunkRef {
                id: ChunkId::from_bytes(id),
                len,
            })?;
        }
        Ok(m)
    }
}

fn corrupt(reason: &str) -> CasError {
    crate::codec::corrupt("manifest", reason)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Manifest {
        let mut m = Manifest::new(FileVersion {
            size: 300,
            mtime_ns: Some(-5),
            etag: Some("\"abc\"".into()),
        });
        for (i, len) in [100u32, 150, 50].into_iter().enumerate() {
            m.push(ChunkRef {
                id: ChunkId::of(&[i as u8]),
                len,
            })
            .unwrap();
        }
        m
    }

    #[test]
    fn round_trips() {
        let m = sample();
        assert!(m.is_complete());
        assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
        let partial = Manifest::new(FileVersion {
            size: 9,
            mtime_ns: None,
            etag: None,
        });
        assert_eq!(Manifest::decode(&partial.encode()).unwrap(), partial);
    }

    #[test]
    fn finds_overlapping_chunks() {
        let m = sample();
        let starts = |o, l| {
            m.chunks_in(o, l)
                .iter()
                .map(|(s, _)| *s)
                .collect::<Vec<_>>()
        };
        assert_eq!(starts(0, 1), vec![0]);
        assert_eq!(starts(99, 2), vec![0, 100]);
        assert_eq!(starts(100, 150), vec![100]);
        assert_eq!(starts(0, 1000), vec![0, 100, 250]);
        assert_eq!(starts(300, 10), Vec::<u64>::new());
    }

    #[test]
    fn rejects_chunks_past_the_size() {
        let mut m = Manifest::new(FileVersion {
            size: 10,
            mtime_ns: None,
            etag: None,
        });
        assert!(m
            .push(ChunkRef {
                id: ChunkId::of(b"x"),
                len: 11
            })
            .is_err());
    }

    proptest! {
        #[test]
        fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Manifest::decode(&bytes);
        }

        #[test]
        fn decoding_damaged_manifests_never_panics(pos in 0usize..200, val in any::<u8>(), cut in 0usize..200) {
            let mut b = sample().encode();
            let p = pos % b.len();
            b[p] = val;
            b.truncate(cut.max(1).min(b.len()));
            let _ = Manifest::decode(&b);
        }
    }
}
