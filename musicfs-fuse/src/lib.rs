//! The MusicFS filesystem: a read-only FUSE view of the origins, served
//! through the verified chunk cache.
//!
//! Layer: top of the engine. The CLI builds a [`musicfs_cas::Cache`] and the
//! origins, hands them to [`MusicFs::new`], checks them with
//! [`MusicFs::preflight`] and calls [`mount`]. Below the mount point, the root
//! lists one directory per origin, named by its [`musicfs_origins::OriginId`];
//! under it, the origin's tree appears byte for byte (names as bytes, UTF-8
//! or not; sizes, mtimes, kinds). Symlinks that stay inside their origin are
//! shown as symlinks, with the origin's target, and the kernel resolves them
//! through the mount (MusicFS never follows one); symlinks that leave it are
//! hidden.
//!
//! Invariants:
//! - Nothing is ever written: every write-like operation is `EROFS`, files
//!   open read-only only, and the mount itself is `ro`.
//! - No kernel request waits on an origin on a FUSE thread. Reads that need
//!   more than the verified chunks of a fully cached file, and any metadata
//!   request that must ask the origin, run as tokio tasks that reply when
//!   done, each bounded by [`FsConfig::read_timeout`] (`EIO` when it
//!   expires); reads of fully cached files are answered on the FUSE thread
//!   from the cache disk. A read of a cached file never queues behind a read
//!   stuck on a hung origin.
//! - Metadata comes from the listings stored in the cache index, so a library
//!   browses offline; a listing older than [`FsConfig::listing_ttl`] is
//!   refreshed in the background while the old one keeps serving.
//! - Inode numbers are allocated on first sight of an (origin, path) and are
//!   stable for the life of the mount; they are never reused while mounted.

mod attr;
mod errno;
mod fs;
mod inode;
mod mount;
mod versions;

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use musicfs_origins::OriginId;

pub use fs::{FsControl, MusicFs, ScanProgress};
pub use inode::Ino;
pub use mount::{cleanup_stale_mount, mount, serving_pid, Mounted};

/// How the filesystem bounds and caches what it asks the origins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsConfig {
    /// Bound on each read, and on each origin call a metadata request has
    /// to wait for; when it expires the request fails with `EIO`.
    pub read_timeout: Duration,
    /// A cached listing (and so the attributes in it) older than this is
    /// refreshed from the origin in the background; the caller is served
    /// from the cached one without waiting.
    pub listing_ttl: Duration,
    /// How long the kernel may cache entries and attributes before asking
    /// again.
    pub kernel_ttl: Duration,
    /// The staleness bound: a new open on a healthy origin binds to a
    /// version the origin confirmed at most this long ago, asking it again
    /// (`stat`) when what is known is older.
    pub freshness: Duration,
    /// How long an open waits for that confirmation before it binds to the
    /// cached version (a hung NAS must not stall cached tracks); opens at
    /// the same time wait together, not in turn. A healthy NAS or a remote
    /// store on a 100 ms link answers well within it.
    pub revalidate_wait: Duration,
    /// Listings read ahead at once per origin when a directory is opened
    /// (its subdirectories, so a tree walk over a slow origin does not pay
    /// a round trip per directory); 0 turns listing read-ahead off. A cold
    /// walk lists about this many directories per round trip: 16 walks
    /// 10,000 tracks in 121 directories in about 9 round trips (0.9 s at
    /// 100 ms; 8 takes 1.6 s). Keep it below an origin's connection limit,
    /// so user calls find a free connection.
    pub listing_readahead: usize,
}

impl Default for FsConfig {
    fn default() -> Self {
        Self {
            read_timeout: Duration::from_secs(30),
            listing_ttl: Duration::from_secs(60),
            kernel_ttl: Duration::from_secs(1),
            freshness: Duration::from_secs(2),
            revalidate_wait: Duration::from_millis(500),
            listing_readahead: 16,
        }
    }
}

/// Everything mounting and running the filesystem can report. Each message
/// says what happened and what the user can do about it.
#[derive(Debug, thiserror::Error)]
pub enum FuseError {
    #[error(
        "origin '{origin}' cannot be read ({reason}) and nothing of it is cached yet; \
         fix what the reason names (the origin reachable: mounted, powered on, online; its \
         credentials; its host key), then start MusicFS again"
    )]
    OriginUnavailable { origin: OriginId, reason: String },

    #[error(
        "cannot mount MusicFS at {}: {source}; check that the directory exists and is not \
         already mounted, and that /dev/fuse is usable",
        mountpoint.display()
    )]
    Mount {
        mountpoint: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("cannot unmount {}: {reason}", mountpoint.display())]
    Unmount { mountpoint: PathBuf, reason: String },

    #[error("the MusicFS session at {} ended with an error: {source}", mountpoint.display())]
    Session {
        mountpoint: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error(
        "cannot clean up the dead mount at {}: {reason}; run `fusermount3 -uz {}` (or \
         `umount -l`) as the user who mounted it",
        mountpoint.display(),
        mountpoint.display()
    )]
    StaleMount { mountpoint: PathBuf, reason: String },
}

pub type Result<T, E = FuseError> = std::result::Result<T, E>;
