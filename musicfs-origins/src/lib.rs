//! Origins: where the music lives.
//!
//! This is the bottom layer of MusicFS. An [`Origin`] is a read-only tree of
//! files (a local or NAS directory, an S3 bucket, an SFTP or WebDAV server) addressed by
//! [`OriginPath`]s that are relative, normalised and can never name anything
//! outside the origin's root. Names are bytes, as on Linux: a name that is
//! not UTF-8 is served under its exact bytes (S3 and SFTP keys are UTF-8,
//! which bytes cover).
//!
//! Invariants every implementation keeps:
//! - One call is one attempt. Retries live in exactly one place,
//!   [`retry::RetryOrigin`], so that stacking wrappers never multiplies them.
//! - Errors say whether retrying can help ([`OriginError::is_retryable`]):
//!   a missing file is permanent, an unreachable NAS is not.
//! - A wrapper passes on what the origin under it states about itself
//!   ([`Origin::supports_range_reads`], [`Origin::whole_digest`],
//!   [`Origin::call_limit`]), or the cache under-uses or over-trusts it.
//! - A call never blocks a tokio worker thread: an origin that can hang (a
//!   dead NAS mount) does its blocking work on threads of its own, so a hung
//!   origin stalls only the callers that wait on it, and those callers bound
//!   the wait with a timeout.
//! - A symlink is reported (by `list`, `stat` and `read_link`) only when its
//!   target resolves inside the origin's root, checked again on every call
//!   (a link can be changed on the origin); one that leaves the root, or
//!   leads nowhere, is hidden ([`OriginError::HiddenSymlink`]). The target
//!   served is relative, so the kernel resolves it through the mount:
//!   MusicFS never follows a link to read.

use std::ffi::OsString;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

pub mod fds;
pub mod health;
pub mod limit;
pub mod local;
mod path;
pub mod remote;
pub mod retry;
pub mod root_guard;

pub use health::{HealthMonitor, HealthState, MonitorTask, OriginHealth};
pub use limit::{LimitOrigin, TimeoutOrigin};
pub use local::LocalOrigin;
pub use path::OriginPath;
pub use remote::{is_remote_url, RemoteKind, RemoteOrigin, RemoteSettings, RemoteSpec, Secret};
pub use retry::{RetryOrigin, RetryPolicy};
pub use root_guard::RootGuard;

/// The name of an origin, as it appears under the mount point.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OriginId(Arc<str>);

impl OriginId {
    /// An origin name must be usable as one path component.
    pub fn new(name: &str) -> Result<Self> {
        if name.is_empty()
            || name == "."
            || name == ".."
            || name.contains('/')
            || name.contains('\0')
        {
            return Err(OriginError::InvalidName {
                name: name.to_owned(),
            });
        }
        Ok(Self(Arc::from(name)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for OriginId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for OriginId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OriginId({:?})", &*self.0)
    }
}

/// What kind of entry a path names. Symlinks are reported (only those that
/// stay inside the root), never followed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
}

/// What an origin knows about one entry.
///
/// `size`, `mtime_ns` and `etag` together are the entry's version: cached data
/// for a file is only valid while all three are unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EntryMeta {
    pub kind: EntryKind,
    pub size: u64,
    /// Modification time in nanoseconds since the Unix epoch, where the origin
    /// has one.
    pub mtime_ns: Option<i64>,
    /// An opaque content version (S3 ETag), where the origin has one.
    pub etag: Option<String>,
}

impl EntryMeta {
    /// The version of the file this entry describes.
    pub fn version(&self) -> FileVersion {
        FileVersion::of(self)
    }

    /// True when `other` describes the same version of the same content.
    pub fn same_version(&self, other: &EntryMeta) -> bool {
        self.kind == other.kind
            && self.size == other.size
            && self.mtime_ns == other.mtime_ns
            && self.etag == other.etag
    }
}

/// One version of an origin file: what a reader binds to when it opens the
/// file, and what every byte it reads from the origin must belong to.
///
/// Equal versions are assumed to hold equal bytes. That is as strong as the
/// origin's own change marker: a local file rewritten with its size and
/// mtime restored (`touch -r`) looks unchanged; an ETag does not have that
/// gap.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FileVersion {
    pub size: u64,
    pub mtime_ns: Option<i64>,
    pub etag: Option<String>,
}

impl FileVersion {
    pub fn of(meta: &EntryMeta) -> Self {
        Self {
            size: meta.size,
            mtime_ns: meta.mtime_ns,
            etag: meta.etag.clone(),
        }
    }

    /// True when `meta` is a file of exactly this version.
    pub fn matches(&self, meta: &EntryMeta) -> bool {
        meta.kind == EntryKind::File
            && meta.size == self.size
            && meta.mtime_ns == self.mtime_ns
            && meta.etag == self.etag
    }
}

impl fmt::Display for FileVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} bytes", self.size)?;
        if let Some(ns) = self.mtime_ns {
            write!(
                f,
                ", mtime {}.{:09}",
                ns.div_euclid(1_000_000_000),
                ns.rem_euclid(1_000_000_000)
            )?;
        }
        if let Some(etag) = &self.etag {
            write!(f, ", etag {etag}")?;
        }
        Ok(())
    }
}

/// One entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// The name's exact bytes (on Linux they need not be UTF-8); always a
    /// single component.
    pub name: OsString,
    pub meta: EntryMeta,
    /// For a symlink: the target to serve (what [`Origin::read_link`] would
    /// answer), already checked to stay inside the root. `None` for files
    /// and directories, and for symlinks of an origin that cannot report
    /// targets in a listing (ask `read_link` then).
    pub link_target: Option<PathBuf>,
}

impl DirEntry {
    /// A file or directory entry (no link target).
    pub fn new(name: impl Into<OsString>, meta: EntryMeta) -> Self {
        Self {
            name: name.into(),
            meta,
            link_target: None,
        }
    }
}

/// A read-only source of music files.
///
/// Implementations must be cheap to share as `Arc<dyn Origin>` and must not
/// block the calling task's thread (see the crate docs).
#[async_trait]
pub trait Origin: Send + Sync + fmt::Debug {
    fn id(&self) -> &OriginId;

    /// Entries of the directory at `path`, in no particular order.
    async fn list(&self, path: &OriginPath) -> Result<Vec<DirEntry>>;

    /// What the entry at `path` is, without following a final symlink.
    async fn stat(&self, path: &OriginPath) -> Result<EntryMeta>;

    /// Up to `len` bytes of `version` of the file at `path` from `offset`.
    /// Fewer bytes come back only at the end of the file; reading at or past
    /// the end gives an empty buffer.
    ///
    /// Every byte returned belongs to `version`: when the origin no longer
    /// has that version (rewritten, replaced, deleted while read), the call
    /// fails with [`OriginError::Changed`] rather than return bytes of
    /// another version or a mix. A local origin checks with `fstat` around
    /// the read on a descriptor it keeps open for the version (so a file
    /// replaced by rename still serves the old inode); a remote one sends
    /// `If-Match` with the ETag.
    async fn read_range(
        &self,
        path: &OriginPath,
        version: &FileVersion,
        offset: u64,
        len: u64,
    ) -> Result<Bytes>;

    /// The origin this one wraps, for a wrapper (retries, timeouts,
    /// connection limits, health watch, fault injection): what an origin
    /// states about itself (`release`, `supports_range_reads`,
    /// `whole_digest`, `call_limit`) passes through to it by default, so a
    /// wrapper never hides it by forgetting to forward one.
    fn wrapped(&self) -> Option<&DynOrigin> {
        None
    }

    /// The reader of `version` of `path` is done with it: an origin that
    /// keeps something open per version (a descriptor) may let it go. A
    /// hint only; later reads of the version still work.
    fn release(&self, path: &OriginPath, version: &FileVersion) {
        if let Some(inner) = self.wrapped() {
            inner.release(path, version);
        }
    }

    /// Whether the origin answers right now. Callers bound this by a timeout.
    async fn health(&self) -> Result<()>;

    /// The target of the symlink at `path`, as MusicFS serves it: relative,
    /// and resolving inside the root (checked on this call). A symlink that
    /// leaves the root or leads nowhere is [`OriginError::HiddenSymlink`];
    /// anything else is [`OriginError::WrongKind`]. Origins without
    /// symlinks keep the default, [`OriginError::Unsupported`].
    async fn read_link(&self, path: &OriginPath) -> Result<PathBuf> {
        let _ = path;
        Err(OriginError::Unsupported {
            origin: self.id().clone(),
            what: "symlinks",
        })
    }

    /// True when `read_range` costs about the bytes asked for, so the cache
    /// may re-fetch single chunks instead of whole files.
    fn supports_range_reads(&self) -> bool {
        self.wrapped()
            .is_none_or(|inner| inner.supports_range_reads())
    }

    /// A digest of the whole content of `version` that the origin vouches
    /// for (an S3 single-part upload's MD5 ETag), where it has one. The
    /// cache checks a first ingest that reaches the end against it and never
    /// keeps bytes that disagree: the one corruption chunk hashes cannot
    /// catch is a download that was wrong from the start.
    fn whole_digest(&self, path: &OriginPath, version: &FileVersion) -> Option<WholeDigest> {
        self.wrapped()
            .and_then(|inner| inner.whole_digest(path, version))
    }

    /// How many calls the origin lets run at once (a connection pool's
    /// size), where it bounds them: calls past it wait for a slot in
    /// arrival order. The cache keeps its read-ahead below it, so that a
    /// player's read finds a free slot instead of queueing behind
    /// read-ahead. Wrappers pass on the inner origin's answer.
    fn call_limit(&self) -> Option<usize> {
        self.wrapped().and_then(|inner| inner.call_limit())
    }
}

/// A digest of a whole file's content, as an origin states it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WholeDigest {
    /// The MD5 of the content (an S3 ETag of a single-part upload).
    Md5([u8; 16]),
}

impl fmt::Display for WholeDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WholeDigest::Md5(bytes) => {
                f.write_str("md5 ")?;
                for b in bytes {
                    write!(f, "{b:02x}")?;
                }
                Ok(())
            }
        }
    }
}

impl WholeDigest {
    /// The MD5 an S3-style ETag states, where it is one: 32 hex digits,
    /// quotes dropped. A multipart ETag (`<hex>-<parts>`) or any other form
    /// states no digest of the content.
    pub fn from_md5_etag(etag: &str) -> Option<Self> {
        let hex = etag.trim().trim_matches('"');
        if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let mut out = [0u8; 16];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(WholeDigest::Md5(out))
    }
}

/// Everything that can go wrong talking to an origin.
#[derive(Debug, thiserror::Error)]
pub enum OriginError {
    #[error("{origin}: '{path}' does not exist on the origin")]
    NotFound { origin: OriginId, path: String },

    #[error("{origin}: '{path}' changed on the origin while it was read ({reason}); open it again to read the new version")]
    Changed {
        origin: OriginId,
        path: String,
        reason: String,
    },

    #[error("{origin}: '{path}' is not a {expected}")]
    WrongKind {
        origin: OriginId,
        path: String,
        expected: &'static str,
    },

    #[error("invalid path '{path}': {reason}")]
    InvalidPath { path: String, reason: &'static str },

    #[error("invalid origin name '{name}': use a non-empty name without '/'")]
    InvalidName { name: String },

    #[error(
        "{origin}: '{path}' leaves the origin root through a symlink; MusicFS never follows it"
    )]
    OutsideRoot { origin: OriginId, path: String },

    #[error("{origin}: '{path}' is a symlink MusicFS hides: {reason}")]
    HiddenSymlink {
        origin: OriginId,
        path: String,
        reason: &'static str,
    },

    #[error("{origin}: this origin does not support {what}")]
    Unsupported {
        origin: OriginId,
        what: &'static str,
    },

    #[error("{origin}: permission denied on '{path}'; give the MusicFS user read access")]
    PermissionDenied { origin: OriginId, path: String },

    #[error("{origin}: too many open files while reading '{path}'; raise the fd limit (ulimit -n) or lower concurrency")]
    TooManyOpenFiles { origin: OriginId, path: String },

    #[error("{origin}: unavailable ({reason}); check that the origin is reachable, MusicFS retries on its own")]
    Unavailable { origin: OriginId, reason: String },

    #[error("{origin}: no answer within {timeout:?}; the origin may be hung")]
    Timeout { origin: OriginId, timeout: Duration },

    #[error("{origin}: the server asks to slow down ({reason}); MusicFS waits and retries")]
    Throttled {
        origin: OriginId,
        reason: String,
        /// How long the server asked to wait (`Retry-After`), where it said.
        retry_after: Option<Duration>,
    },

    #[error(
        "{origin}: access denied ({reason}); check the origin's credentials and what they may read"
    )]
    AccessDenied { origin: OriginId, reason: String },

    #[error("invalid remote origin '{url}': {problem}")]
    InvalidRemote {
        /// The URL as given, with any password replaced by `***`.
        url: String,
        /// What is wrong and how to write it instead.
        problem: String,
    },

    #[error("{origin}: cannot set up this origin: {reason}")]
    Misconfigured { origin: OriginId, reason: String },

    #[error("{origin}: I/O error on '{path}': {source}")]
    Io {
        origin: OriginId,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl OriginError {
    /// True when the same call may succeed later. Permanent answers (missing
    /// file, bad path, permission) are false; an unreachable or slow origin is
    /// true.
    pub fn is_retryable(&self) -> bool {
        match self {
            OriginError::NotFound { .. }
            | OriginError::Changed { .. }
            | OriginError::WrongKind { .. }
            | OriginError::InvalidPath { .. }
            | OriginError::InvalidName { .. }
            | OriginError::OutsideRoot { .. }
            | OriginError::HiddenSymlink { .. }
            | OriginError::Unsupported { .. }
            | OriginError::PermissionDenied { .. }
            | OriginError::AccessDenied { .. }
            | OriginError::InvalidRemote { .. }
            | OriginError::Misconfigured { .. } => false,
            OriginError::TooManyOpenFiles { .. }
            | OriginError::Unavailable { .. }
            | OriginError::Timeout { .. }
            | OriginError::Throttled { .. } => true,
            OriginError::Io { source, .. } => io_is_retryable(source),
        }
    }

    /// True when the process ran out of file descriptors: a moment's wait
    /// (other reads closing theirs) fixes it.
    pub fn is_fd_exhaustion(&self) -> bool {
        matches!(self, OriginError::TooManyOpenFiles { .. })
    }

    /// True when the origin no longer has the version a read asked for.
    pub fn is_changed(&self) -> bool {
        matches!(self, OriginError::Changed { .. })
    }

    /// True when the entry is known not to exist, or is a symlink MusicFS
    /// hides (which is the same to whoever looks through the mount).
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            OriginError::NotFound { .. } | OriginError::HiddenSymlink { .. }
        )
    }

    /// Classifies an I/O error from the origin into a typed error.
    pub fn from_io(origin: &OriginId, path: &OriginPath, err: std::io::Error) -> Self {
        let origin = origin.clone();
        let path = path.to_string();
        match err.raw_os_error() {
            Some(libc::ENOENT) => OriginError::NotFound { origin, path },
            Some(libc::ENOTDIR) => OriginError::WrongKind {
                origin,
                path,
                expected: "directory",
            },
            Some(libc::EISDIR) => OriginError::WrongKind {
                origin,
                path,
                expected: "file",
            },
            Some(libc::EACCES) | Some(libc::EPERM) => {
                OriginError::PermissionDenied { origin, path }
            }
            Some(libc::ELOOP) => OriginError::OutsideRoot { origin, path },
            Some(libc::EMFILE) | Some(libc::ENFILE) => {
                OriginError::TooManyOpenFiles { origin, path }
            }
            Some(libc::ENOTCONN)
            | Some(libc::ESTALE)
            | Some(libc::EHOSTDOWN)
            | Some(libc::EHOSTUNREACH)
            | Some(libc::ENETDOWN)
            | Some(libc::ENETUNREACH)
            | Some(libc::ETIMEDOUT)
            | Some(libc::ECONNRESET)
            | Some(libc::ECONNREFUSED) => OriginError::Unavailable {
                origin,
                reason: format!("'{path}': {err}"),
            },
            _ => OriginError::Io {
                origin,
                path,
                source: err,
            },
        }
    }
}

fn io_is_retryable(err: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        err.kind(),
        Interrupted | TimedOut | WouldBlock | UnexpectedEof | ConnectionReset | ConnectionAborted
    ) || err.raw_os_error() == Some(libc::EIO)
}

pub type Result<T, E = OriginError> = std::result::Result<T, E>;

/// Shared handle to any origin.
pub type DynOrigin = Arc<dyn Origin>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_names_are_single_components() {
        assert!(OriginId::new("music").is_ok());
        assert!(OriginId::new("Björk's NAS").is_ok());
        for bad in ["", ".", "..", "a/b", "a\0b"] {
            assert!(OriginId::new(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn only_single_part_md5_etags_state_a_digest() {
        let d = WholeDigest::from_md5_etag("\"9e107d9d372bb6826bd81d3542a419d6\"");
        assert_eq!(
            d,
            Some(WholeDigest::Md5([
                0x9e, 0x10, 0x7d, 0x9d, 0x37, 0x2b, 0xb6, 0x82, 0x6b, 0xd8, 0x1d, 0x35, 0x42, 0xa4,
                0x19, 0xd6
            ]))
        );
        assert_eq!(
            WholeDigest::from_md5_etag("9e107d9d372bb6826bd81d3542a419d6-3"),
            None
        );
        assert_eq!(WholeDigest::from_md5_etag("W/\"abc\""), None);
        assert_eq!(
            WholeDigest::from_md5_etag("zz107d9d372bb6826bd81d3542a419d6"),
            None
        );
        // Shown as the ETag spells it, so a log line can be matched to it.
        assert_eq!(
            d.unwrap().to_string(),
            "md5 9e107d9d372bb6826bd81d3542a419d6"
        );
    }

    #[test]
    fn io_errors_are_classified_by_retryability() {
        let id = OriginId::new("o").unwrap();
        let p = OriginPath::new("a/b.flac").unwrap();
        let e = |code| OriginError::from_io(&id, &p, std::io::Error::from_raw_os_error(code));
        assert!(e(libc::ENOENT).is_not_found());
        assert!(!e(libc::ENOENT).is_retryable());
        assert!(!e(libc::EACCES).is_retryable());
        assert!(e(libc::ENOTCONN).is_retryable());
        assert!(e(libc::EIO).is_retryable());
        assert!(e(libc::EMFILE).is_retryable());
        assert!(matches!(
            e(libc::EMFILE),
            OriginError::TooManyOpenFiles { .. }
        ));
    }
}
