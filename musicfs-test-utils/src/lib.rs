//! Test helpers for MusicFS: origins that misbehave on demand, an in-memory
//! origin, and real music-library fixtures.
//!
//! - [`FaultyOrigin`] wraps any origin to inject delays, hangs, errors and
//!   bad data, and counts the traffic that reached it (with a call log that
//!   shows which calls overlapped).
//! - [`MemOrigin`] is a mutable in-memory origin for engine tests.
//! - [`make_library`] and friends build real FLAC/MP3 trees on disk, cached
//!   per machine because generating audio is slow.
//!
//! - [`servers`] starts real S3 (SeaweedFS), SFTP (OpenSSH) and WebDAV
//!   (rclone) servers on loopback for the remote-origin tests.
//! - [`proxy`] is a TCP proxy that adds delay, a bandwidth cap, cuts,
//!   resets, blackholes and refusals between a client and such a server
//!   (also as the `musicfs-proxy` binary for scripts).
//!
//! Everything here exists to be used by tests; nothing here is used by the
//! filesystem itself. The resilience suite lives in this crate's `tests/`.

pub mod error;
pub mod faulty;
pub mod library;
pub mod mem;
pub mod proxy;
pub mod servers;

pub use error::{FixtureError, Result};
pub use faulty::{Call, CallKind, Fault, FaultyOrigin, Ops, OriginStats};
pub use library::{
    copy_tree, corpus_tool, library_files, make_library, pseudo_random_bytes, write_file,
    LibrarySpec,
};
pub use mem::MemOrigin;
pub use proxy::{Mode, Proxy, ProxyConfig, ProxyHandle, ProxyStats};
pub use servers::{DavServer, RemoteServer, S3Server, SftpServer};

use musicfs_origins::{Origin, OriginPath};

/// `read_range` of the version `path` has right now, as a reader that just
/// stat'ed it would ask for (a made-up version for what cannot be stat'ed,
/// so the read's own error shows). For tests of origins and wrappers.
pub async fn read_now(
    origin: &dyn Origin,
    path: &OriginPath,
    offset: u64,
    len: u64,
) -> musicfs_origins::Result<bytes::Bytes> {
    let version = match origin.stat(path).await {
        Ok(meta) => meta.version(),
        Err(_) => musicfs_origins::FileVersion {
            size: 0,
            mtime_ns: None,
            etag: None,
        },
    };
    origin.read_range(path, &version, offset, len).await
}
