//! The cache's figures for `musicfs status` and `statfs`.
//!
//! Every figure is read from a counter or a size kept current as the cache
//! works, so taking a snapshot costs the same with 200 chunks as with
//! 200,000 (nothing iterates the index or the chunk tree).
//!
//! Bytes served are split by where they came from, so a hit ratio means
//! what a user thinks it means: `hit_bytes` were served from verified
//! cached chunks without an origin read for that read; everything that the
//! origin had to send for a read (a direct range read, bytes of the ingest
//! buffer fetched for it) is `origin_bytes`.

/// A snapshot of the cache's size, traffic and health.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Bytes of chunk files.
    pub size: u64,
    /// Disk use of the index (`index.sled`), measured every few seconds;
    /// eviction keeps `size + index_bytes` under `max_size`.
    pub index_bytes: u64,
    pub max_size: u64,
    pub chunks: u64,
    /// Manifests in the index (a counter, not a scan).
    pub manifests: u64,
    /// Bytes served from cached chunks without any origin read.
    pub hit_bytes: u64,
    /// Bytes served that the origin sent for the read: direct range reads,
    /// passthrough, and the ingest buffer.
    pub origin_bytes: u64,
    /// Bytes the ingest read from origins (to cache them).
    pub ingested_bytes: u64,
    /// Chunks fetched again by their byte range, for any reason.
    pub refetched_chunks: u64,
    /// Re-fetches of chunks whose file was damaged (corrupt, truncated,
    /// unreadable).
    pub refetched_corrupt: u64,
    /// Re-fetches of chunks that eviction had removed (the cache working
    /// as sized, not damage).
    pub refetched_evicted: u64,
    /// Chunk files found not to hash to their name.
    pub corrupt_chunks: u64,
    /// Chunk files found missing.
    pub missing_chunks: u64,
    pub evicted_chunks: u64,
    pub evicted_bytes: u64,
    pub open_files: u64,
    /// `Some(reason)` while the cache disk is unusable or not answering.
    pub degraded: Option<String>,
    /// True until the background check of the chunk files against the
    /// index (run after every open) has finished; `size` and `chunks`
    /// converge to the disk's figures when it does.
    pub reconciling: bool,
}

impl CacheStats {
    /// The share of served bytes that needed no origin read; `None` before
    /// anything was served.
    pub fn hit_ratio(&self) -> Option<f64> {
        let served = self.hit_bytes + self.origin_bytes;
        (served > 0).then(|| self.hit_bytes as f64 / served as f64)
    }

    /// What the cache directory uses on disk: chunks and index.
    pub fn disk_bytes(&self) -> u64 {
        self.size + self.index_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hit_ratio_counts_only_bytes_served_without_an_origin_read() {
        let mut s = CacheStats::default();
        assert_eq!(s.hit_ratio(), None);
        s.origin_bytes = 3 << 20;
        // A cold first read: nothing came from the cache.
        assert_eq!(s.hit_ratio(), Some(0.0));
        s.hit_bytes = 1 << 20;
        assert_eq!(s.hit_ratio(), Some(0.25));
    }
}
