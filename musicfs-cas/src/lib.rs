//! The content-addressed chunk cache under the MusicFS filesystem.
//!
//! Layers, bottom up:
//! - [`chunk`]: FastCDC boundaries and BLAKE3 [`ChunkId`]s.
//! - [`store`]: one file per chunk under `CACHE/chunks/aa/bb/<64-hex>`,
//!   written through `CACHE/tmp/` and renamed into place; size accounting,
//!   LRU eviction that never touches a pinned chunk, verified reads, and the
//!   degraded (passthrough) state when the cache disk fails.
//!   Opening returns at once; the shard tree is reconciled with the index
//!   in the background.
//! - [`index`]: a sled database in `CACHE/index.sled` holding chunk records
//!   and [`manifest`]s. It is a disposable cache of the chunk files: when it
//!   is damaged it is moved aside and rebuilt from them.
//! - [`cache`]: what the filesystem calls. Opens files against their origin
//!   version, ingests them in order in the background as they are read
//!   (several ranges in flight over a long link), serves reads from chunks,
//!   the ingest buffer or the origin directly (a player's read before
//!   read-ahead), re-fetches damaged chunks by their byte range, and checks
//!   a first download against the whole-file digest an origin states.
//! - `tree`: checks part of a chunk against the chunk's BLAKE3 hash tree,
//!   so a small read of a cached chunk needs not hash all of it.
//! - [`stats`]: the figures `musicfs status` and `statfs` show, all kept as
//!   counters.
//! - [`verify`]: the check and repair behind `musicfs verify`, and the
//!   read-only inspection of a cache directory it runs without `--repair`.
//!
//! The invariant everything rests on: a chunk's bytes are only ever served
//! after hashing to the chunk's name (whole, or as part of its BLAKE3 tree
//! whose root is the name), so no crash, bad disk or stray write can make
//! MusicFS serve wrong cached bytes; at worst it fetches them again.

pub mod cache;
pub mod chunk;
mod codec;
pub mod index;
pub mod inspect;
pub mod listing;
pub mod manifest;
pub mod stats;
pub mod store;
mod tree;
pub mod verify;

pub use cache::{BackgroundTurn, Cache, CacheConfig, FileHandle, LinkEstimate};
pub use chunk::{ChunkId, ChunkParams};
pub use index::Index;
pub use listing::Listing;
pub use manifest::{ChunkRef, FileVersion, Manifest};
pub use stats::CacheStats;
pub use store::{ChunkStore, StoreConfig};
pub use verify::{Finding, FindingKind, VerifyReport};

use std::path::PathBuf;
use std::time::Duration;

use musicfs_origins::{OriginError, OriginId, WholeDigest};

/// Everything the cache can report. Each message says what happened and,
/// where the user can act, what to do.
#[derive(Debug, thiserror::Error)]
pub enum CasError {
    #[error("chunk of {size} bytes is larger than the {max}-byte limit; refusing to store it")]
    ChunkTooLarge { size: u64, max: u64 },

    #[error("chunk {id} is missing from the cache")]
    ChunkMissing { id: ChunkId },

    #[error("chunk {id} is corrupt on disk (its bytes hash to {actual}); it was removed and will be fetched again")]
    ChunkCorrupt { id: ChunkId, actual: ChunkId },

    #[error(transparent)]
    Origin(#[from] OriginError),

    #[error("{origin}: '{path}' changed on the origin while it was being read ({reason}); reopen the file")]
    OriginChanged {
        origin: OriginId,
        path: String,
        reason: String,
    },

    #[error("{origin}: the download of '{path}' does not match the checksum the origin states for it (expected {expected}, got {got}); nothing of it was cached. Open the file again to download it again; if this repeats, the object is damaged on the origin, or (S3) the bucket's ETags are not MD5s (SSE-KMS or SSE-C encryption): then set `etags_not_md5 = true` in the origin's [origin.NAME] table")]
    OriginCorrupt {
        origin: OriginId,
        path: String,
        expected: WholeDigest,
        got: WholeDigest,
    },

    #[error("{origin}: no answer for '{path}' within {timeout:?}; the origin may be hung")]
    OriginTimeout {
        origin: OriginId,
        path: String,
        timeout: Duration,
    },

    #[error("no origin named '{origin}' is configured")]
    UnknownOrigin { origin: OriginId },

    #[error(
        "the cache disk is unusable ({reason}); reads go straight to the origin until it recovers"
    )]
    CacheUnavailable { reason: String },

    #[error("too many open files at {path}; raise the fd limit (ulimit -n) or lower the cache's max_open_files")]
    TooManyOpenFiles { path: PathBuf },

    #[error("I/O error at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("the cache index at {path} is in use by another process; stop the other MusicFS or use another --cache-dir")]
    IndexLocked { path: PathBuf },

    #[error("cache index error: {reason}")]
    Index { reason: String },

    #[error("damaged {what} record: {reason}")]
    CorruptRecord { what: &'static str, reason: String },

    #[error("invalid cache configuration: {reason}")]
    InvalidConfig { reason: String },
}

impl CasError {
    /// Wraps an I/O error from the cache disk, keeping EMFILE/ENFILE apart so
    /// callers can queue instead of failing the user's read.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        match source.raw_os_error() {
            Some(libc::EMFILE) | Some(libc::ENFILE) => CasError::TooManyOpenFiles { path },
            _ => CasError::Io { path, source },
        }
    }

    /// True when the error is about damaged or absent cached data, which a
    /// re-fetch from the origin repairs.
    pub fn is_refetchable(&self) -> bool {
        matches!(
            self,
            CasError::ChunkMissing { .. } | CasError::ChunkCorrupt { .. }
        )
    }
}

pub type Result<T, E = CasError> = std::result::Result<T, E>;
