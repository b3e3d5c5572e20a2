//! The one errno table: what every cache or origin error becomes at the
//! kernel boundary.
//!
//! Layer: the edge of the filesystem. Handlers never pick an errno for an
//! error themselves; they call [`of_origin`] or [`of_cas`], so one kind of
//! fault always looks the same to a player, whichever request met it.
//!
//! | error | errno | why |
//! | --- | --- | --- |
//! | `NotFound` (deleted on the origin) | `ENOENT` | the file or directory is not there; a refreshed listing agrees |
//! | `WrongKind`, a directory was expected | `ENOTDIR` | a path component is a file on the origin |
//! | `WrongKind`, a file was expected | `EISDIR` | the name is a directory on the origin now |
//! | `OutsideRoot`, `HiddenSymlink` (a symlink leaving the library or leading nowhere) | `ENOENT` | such links are hidden, so there is nothing by that name |
//! | `Unsupported` (e.g. `readlink` on an origin without symlinks) | `EINVAL` | what `readlink` answers for something that is not a link it can read |
//! | `InvalidPath`, `InvalidName` | `ENOENT` | no origin can hold such a name, so nothing is there |
//! | `PermissionDenied`, `AccessDenied` (bad or insufficient credentials) | `EACCES` | the daemon's user or its credentials may not read it on the origin; what the user must fix |
//! | `Changed` / `OriginChanged` (changed, replaced or deleted while open) | `ESTALE` | the handle is bound to a version the origin no longer has. `ESTALE` ("stale file handle") is what NFS answers in the same case and says exactly what to do: open the file again, which reads the new version. `EIO` would read as a broken disk, `ENOENT` as a deleted file |
//! | `TooManyOpenFiles` | `EIO` | the daemon, not the caller, ran out of fds; `EMFILE` would blame the player's own fd table |
//! | `Unavailable`, `Timeout`, `Throttled`, `OriginTimeout`, `Io` | `EIO` | the origin is down, hung or failing; the cached tree and bytes keep being served, only this request failed |
//! | `OriginCorrupt` (a download that does not match the checksum the origin states for the file) | `EIO` | the bytes the origin sent are wrong; nothing of them was cached, and opening the file again downloads it again. `ESTALE` would send the player to reopen in a loop against an object that may really be damaged |
//! | `UnknownOrigin` | `ENOENT` | no origin by that name is mounted |
//! | the cache disk (`CacheUnavailable`, cache `Io`, damaged chunks) | `EIO` | only when even the origin could not serve the bytes; normally such reads go through to the origin |
//! | a read past `--read-timeout` | `EIO` | see `read` in `fs.rs`; a hung origin must not hang the player |

use fuser::Errno;
use musicfs_cas::CasError;
use musicfs_origins::OriginError;

/// The errno an origin error becomes.
pub(crate) fn of_origin(err: &OriginError) -> Errno {
    match err {
        OriginError::NotFound { .. }
        | OriginError::HiddenSymlink { .. }
        | OriginError::OutsideRoot { .. }
        | OriginError::InvalidPath { .. }
        | OriginError::InvalidName { .. } => Errno::ENOENT,
        OriginError::WrongKind {
            expected: "file", ..
        } => Errno::EISDIR,
        OriginError::WrongKind { .. } => Errno::ENOTDIR,
        OriginError::PermissionDenied { .. } | OriginError::AccessDenied { .. } => Errno::EACCES,
        OriginError::Unsupported { .. } => Errno::EINVAL,
        OriginError::Changed { .. } => Errno::ESTALE,
        OriginError::TooManyOpenFiles { .. }
        | OriginError::Unavailable { .. }
        | OriginError::Timeout { .. }
        | OriginError::Throttled { .. }
        | OriginError::Io { .. } => Errno::EIO,
        // Configuration errors stop a mount from starting; should one reach
        // a request anyway, the origin could not answer it.
        OriginError::InvalidRemote { .. } | OriginError::Misconfigured { .. } => Errno::EIO,
    }
}

/// The errno a cache error becomes.
pub(crate) fn of_cas(err: &CasError) -> Errno {
    match err {
        CasError::Origin(e) => of_origin(e),
        CasError::OriginChanged { .. } => Errno::ESTALE,
        CasError::UnknownOrigin { .. } => Errno::ENOENT,
        CasError::OriginTimeout { .. }
        | CasError::OriginCorrupt { .. }
        | CasError::ChunkTooLarge { .. }
        | CasError::ChunkMissing { .. }
        | CasError::ChunkCorrupt { .. }
        | CasError::CacheUnavailable { .. }
        | CasError::TooManyOpenFiles { .. }
        | CasError::Io { .. }
        | CasError::IndexLocked { .. }
        | CasError::Index { .. }
        | CasError::CorruptRecord { .. }
        | CasError::InvalidConfig { .. } => Errno::EIO,
    }
}

/// True when the errno means "the origin could not answer" rather than a
/// definite answer about the entry: such failures are logged as warnings.
pub(crate) fn is_fault(errno: Errno) -> bool {
    errno == Errno::EIO
}

#[cfg(test)]
mod tests {
    use super::*;
    use musicfs_origins::{OriginId, OriginPath};
    use std::time::Duration;

    #[test]
    fn every_origin_error_has_its_row() {
        let id = OriginId::new("nas").unwrap();
        let p = OriginPath::new("a/b.flac").unwrap();
        let io = |code| OriginError::from_io(&id, &p, std::io::Error::from_raw_os_error(code));
        assert_eq!(of_origin(&io(libc::ENOENT)), Errno::ENOENT);
        assert_eq!(of_origin(&io(libc::ENOTDIR)), Errno::ENOTDIR);
        assert_eq!(of_origin(&io(libc::EISDIR)), Errno::EISDIR);
        assert_eq!(of_origin(&io(libc::EACCES)), Errno::EACCES);
        assert_eq!(of_origin(&io(libc::ELOOP)), Errno::ENOENT);
        assert_eq!(of_origin(&io(libc::EMFILE)), Errno::EIO);
        assert_eq!(of_origin(&io(libc::ENOTCONN)), Errno::EIO);
        assert_eq!(of_origin(&io(libc::EIO)), Errno::EIO);
        let timeout = OriginError::Timeout {
            origin: id.clone(),
            timeout: Duration::from_secs(1),
        };
        assert_eq!(of_origin(&timeout), Errno::EIO);
        let changed = OriginError::Changed {
            origin: id.clone(),
            path: "a".into(),
            reason: "rewritten".into(),
        };
        assert_eq!(of_origin(&changed), Errno::ESTALE);
        // A timeout or an unreachable origin is never "no such file".
        assert_ne!(of_origin(&io(libc::ETIMEDOUT)), Errno::ENOENT);
    }

    #[test]
    fn cache_errors_follow_the_origin_table() {
        let id = OriginId::new("nas").unwrap();
        let changed = CasError::OriginChanged {
            origin: id.clone(),
            path: "a".into(),
            reason: "x".into(),
        };
        assert_eq!(of_cas(&changed), Errno::ESTALE);
        let gone = CasError::Origin(OriginError::NotFound {
            origin: id.clone(),
            path: "a".into(),
        });
        assert_eq!(of_cas(&gone), Errno::ENOENT);
        let hung = CasError::OriginTimeout {
            origin: id,
            path: "a".into(),
            timeout: Duration::from_secs(30),
        };
        assert_eq!(of_cas(&hung), Errno::EIO);
        assert!(is_fault(of_cas(&hung)));
        let corrupt = CasError::OriginCorrupt {
            origin: OriginId::new("s3").unwrap(),
            path: "a".into(),
            expected: musicfs_origins::WholeDigest::Md5([1; 16]),
            got: musicfs_origins::WholeDigest::Md5([2; 16]),
        };
        assert_eq!(of_cas(&corrupt), Errno::EIO);
    }
}
