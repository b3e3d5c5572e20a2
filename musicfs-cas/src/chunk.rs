//! Chunk identity and content-defined chunk boundaries.
//!
//! A chunk is named by the BLAKE3 digest of its bytes ([`ChunkId`]), so a
//! chunk file can always be checked against its own name. Boundaries come
//! from FastCDC (v2020), which depends only on the bytes from the chunk's
//! start up to `max` bytes ahead: [`ChunkParams::next_cut`] therefore gives
//! the same boundaries whether a file is chunked whole or streamed in pieces,
//! as long as it is fed at least `max` bytes (or the rest of the file).
//!
//! Why 256 KiB / 1 MiB / 4 MiB (min / avg / max): tracks are 5–100 MB, so a
//! track is 5–100 chunks and a 20,000-track library is a few hundred
//! thousand chunk files, which a sharded directory tree and a sled index
//! handle easily. Writing one file per chunk runs about twice as fast at
//! 1 MiB as at 64 KiB on these machines. Dedup in a music library comes from
//! the same audio with different tags (compilations, re-tagged copies): tags
//! and cover art sit at the start (FLAC, ID3v2) or the end (ID3v1) of the
//! file, so content-defined cuts re-align right after them and only the one
//! or two chunks around the header differ. Smaller chunks would dedup a few
//! hundred KiB more per copy at the cost of 4x the files and index entries.

use std::fmt;

use fastcdc::v2020::FastCDC;

use crate::{CasError, Result};

/// BLAKE3 digest of a chunk's bytes; its 64-hex form is the chunk file's name.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId([u8; 32]);

impl ChunkId {
    pub fn of(data: &[u8]) -> Self {
        Self(*blake3::hash(data).as_bytes())
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }

    /// Parses a 64-character lowercase hex name; anything else is `None`, so
    /// stray files in the chunk tree are never mistaken for chunks.
    pub fn from_hex(name: &str) -> Option<Self> {
        if name.len() != 64 || !name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return None;
        }
        blake3::Hash::from_hex(name)
            .ok()
            .map(|h| Self(*h.as_bytes()))
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", &self.to_hex()[..16])
    }
}

/// FastCDC size bounds in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkParams {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

impl Default for ChunkParams {
    fn default() -> Self {
        Self {
            min: 256 * 1024,
            avg: 1024 * 1024,
            max: 4 * 1024 * 1024,
        }
    }
}

impl ChunkParams {
    /// Checks the bounds against what FastCDC v2020 accepts (it asserts on
    /// them, so they must never reach it unchecked).
    pub fn validate(&self) -> Result<()> {
        use fastcdc::v2020::{
            AVERAGE_MAX, AVERAGE_MIN, MAXIMUM_MAX, MAXIMUM_MIN, MINIMUM_MAX, MINIMUM_MIN,
        };
        let (min, avg, max) = (self.min as usize, self.avg as usize, self.max as usize);
        let ok = (MINIMUM_MIN..=MINIMUM_MAX).contains(&min)
            && (AVERAGE_MIN..=AVERAGE_MAX).contains(&avg)
            && (MAXIMUM_MIN..=MAXIMUM_MAX).contains(&max)
            && min <= avg
            && avg <= max;
        if ok {
            Ok(())
        } else {
            Err(CasError::InvalidConfig {
                reason: format!(
                    "chunk sizes min {min} / avg {avg} / max {max} are out of FastCDC's range \
                     ({MINIMUM_MIN}..={MINIMUM_MAX} / {AVERAGE_MIN}..={AVERAGE_MAX} / {MAXIMUM_MIN}..={MAXIMUM_MAX}, min <= avg <= max)"
                ),
            })
        }
    }

    /// Length of the first chunk of `buf`, or `None` when it cannot be known
    /// yet: fewer than `max` bytes are buffered and more of the file follows.
    /// `eof` says `buf` ends where the file ends. Requires validated params.
    pub fn next_cut(&self, buf: &[u8], eof: bool) -> Option<usize> {
        let max = self.max as usize;
        if buf.is_empty() || (buf.len() < max && !eof) {
            return None;
        }
        let window = &buf[..buf.len().min(max)];
        let first = FastCDC::new(window, self.min as usize, self.avg as usize, max).next();
        // FastCDC yields at least one chunk for a non-empty source.
        Some(first.map_or(window.len(), |c| c.length))
    }

    /// All chunk lengths of a whole file held in memory.
    pub fn cut_all(&self, data: &[u8]) -> Vec<usize> {
        let mut out = Vec::new();
        let mut pos = 0;
        while let Some(n) = self.next_cut(&data[pos..], true) {
            out.push(n);
            pos += n;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn noise(len: usize, mut seed: u64) -> Vec<u8> {
        (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect()
    }

    #[test]
    fn hex_round_trip_and_rejects_strays() {
        let id = ChunkId::of(b"hello");
        assert_eq!(ChunkId::from_hex(&id.to_hex()), Some(id));
        assert_eq!(ChunkId::from_hex("abc"), None);
        assert_eq!(ChunkId::from_hex(&id.to_hex().to_uppercase()), None);
        assert_eq!(
            ChunkId::from_hex(&format!("{}.tmp", &id.to_hex()[..60])),
            None
        );
    }

    #[test]
    fn default_params_are_valid_and_bad_ones_rejected() {
        ChunkParams::default().validate().unwrap();
        let bad = ChunkParams {
            min: 10,
            avg: 20,
            max: 30,
        };
        assert!(matches!(
            bad.validate(),
            Err(CasError::InvalidConfig { .. })
        ));
    }

    #[test]
    fn chunks_respect_bounds() {
        let p = ChunkParams::default();
        let data = noise(20 << 20, 7);
        let cuts = p.cut_all(&data);
        assert_eq!(cuts.iter().sum::<usize>(), data.len());
        for &c in &cuts[..cuts.len() - 1] {
            assert!(
                c >= p.min as usize && c <= p.max as usize,
                "chunk of {c} bytes"
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]
        /// Streaming in arbitrary pieces gives the same boundaries as
        /// chunking the whole file: ingest relies on this.
        #[test]
        fn streaming_equals_whole(seed in any::<u64>(), len in 0usize..3_000_000, piece in 1usize..700_000) {
            let p = ChunkParams { min: 16 * 1024, avg: 64 * 1024, max: 256 * 1024 };
            let data = noise(len, seed | 1);
            let whole = p.cut_all(&data);
            let mut streamed = Vec::new();
            let mut buf: Vec<u8> = Vec::new();
            let mut fed = 0;
            loop {
                let eof = fed == data.len();
                while let Some(n) = p.next_cut(&buf, eof) {
                    streamed.push(n);
                    buf.drain(..n);
                }
                if eof { break; }
                let take = piece.min(data.len() - fed);
                buf.extend_from_slice(&data[fed..fed + take]);
                fed += take;
            }
            prop_assert_eq!(whole, streamed);
        }
    }
}
