//! The HTTP remote origins (S3, WebDAV) on an Apache OpenDAL operator.
//!
//! Layer: bottom (an [`Origin`] implementation inside
//! [`super::RemoteOrigin`]). One call is one attempt: no OpenDAL retry
//! layer is stacked (retries live in `RetryOrigin`, timeouts in
//! `TimeoutOrigin`), and OpenDAL's HTTP client sets no timeout of its own.
//!
//! Invariants:
//! - Listings page through OpenDAL's lister (S3: 1,000 keys a request), so
//!   no single response holds a whole large prefix. S3 has no
//!   directories: they are the common prefixes of a delimited listing,
//!   reported with size 0, and zero-byte "directory marker" keys ending in
//!   `/` are never files.
//! - A directory that does not exist lists as [`OriginError::NotFound`],
//!   never as empty: OpenDAL lists a missing S3 prefix or WebDAV
//!   collection as empty, so an empty answer without the directory's own
//!   entry is checked with a stat.
//! - Every byte returned belongs to the version asked for. A read of a
//!   version with a strong ETag sends `If-Match` (412 is
//!   [`OriginError::Changed`]); the response's own ETag or Last-Modified is
//!   compared with the version as well (a server that ignores `If-Match`
//!   is caught there), and where the response says neither, the file is
//!   stat'ed after the read.
//! - A read returns exactly `min(len, size - offset)` bytes or fails with a
//!   retryable error: a short body is never served as the end of a file.

use std::collections::HashSet;
use std::ffi::OsString;
use std::time::SystemTime;

use bytes::Bytes;
use futures::TryStreamExt;
use opendal::{EntryMode, Operator};

use super::errors::from_dal;
use super::meta::{self, Verdict};
use crate::{
    DirEntry, EntryKind, EntryMeta, FileVersion, OriginError, OriginId, OriginPath, Result,
    WholeDigest,
};

/// Keys asked for per S3 list request (S3's own maximum; WebDAV ignores
/// it): pages are bounded whatever the server's default.
const LIST_PAGE: usize = 1000;

/// What a WebDAV health check asks about; it need not exist.
const HEALTH_PROBE: &str = ".musicfs-health-probe";

/// Which protocol is behind the operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flavor {
    S3,
    WebDav,
}

#[derive(Debug)]
pub(crate) struct DalOrigin {
    id: OriginId,
    op: Operator,
    flavor: Flavor,
    /// S3: single-part ETags are MD5s of the content (see
    /// [`RemoteSettings::etags_not_md5`](super::RemoteSettings)).
    pub(crate) md5_etags: bool,
}

impl DalOrigin {
    pub(crate) fn new(id: OriginId, op: Operator, flavor: Flavor) -> Self {
        Self {
            id,
            op,
            flavor,
            md5_etags: true,
        }
    }

    pub(crate) fn id(&self) -> &OriginId {
        &self.id
    }

    fn err(&self, path: &OriginPath, e: &opendal::Error) -> OriginError {
        from_dal(&self.id, path, e)
    }

    /// The key of a file (no trailing `/`); `None` for a path no remote key
    /// can have (not UTF-8: S3 keys and WebDAV hrefs are UTF-8).
    fn key(path: &OriginPath) -> Option<&str> {
        std::str::from_utf8(path.as_bytes()).ok()
    }

    /// The key of a directory, as OpenDAL lists it (`/` for the root).
    fn dir_key(path: &OriginPath) -> Option<String> {
        let key = Self::key(path)?;
        Some(if key.is_empty() {
            "/".to_owned()
        } else {
            format!("{key}/")
        })
    }

    fn not_found(&self, path: &OriginPath) -> OriginError {
        OriginError::NotFound {
            origin: self.id.clone(),
            path: path.to_string(),
        }
    }

    pub(crate) async fn list(&self, path: &OriginPath) -> Result<Vec<DirEntry>> {
        let Some(dir) = Self::dir_key(path) else {
            return Err(self.not_found(path));
        };
        let mut lister = self
            .op
            .lister_with(&dir)
            .recursive(false)
            .limit(LIST_PAGE)
            .await
            .map_err(|e| self.err(path, &e))?;
        let mut entries = Vec::new();
        let mut seen = HashSet::new();
        let mut saw_itself = path.is_root();
        while let Some(entry) = lister.try_next().await.map_err(|e| self.err(path, &e))? {
            let full = entry.path();
            let rel = full
                .strip_prefix(dir.trim_start_matches('/'))
                .unwrap_or(full);
            let name = rel.trim_end_matches('/');
            if name.is_empty() || full == dir {
                // The directory's own entry (a PROPFIND's first answer, an
                // S3 directory marker).
                saw_itself = true;
                continue;
            }
            if name.contains('/') || !OriginPath::is_valid_name(name.as_ref()) {
                tracing::debug!(origin = %self.id, dir = %path, entry = full, "skipping an unusable entry name");
                continue;
            }
            let md = entry.metadata();
            let kind = match md.mode() {
                EntryMode::DIR => EntryKind::Dir,
                EntryMode::FILE => EntryKind::File,
                EntryMode::Unknown => continue,
            };
            if !seen.insert(name.to_owned()) {
                continue;
            }
            let meta = meta::entry(
                kind,
                md.content_length(),
                md.last_modified().map(SystemTime::from),
                md.etag(),
            );
            entries.push(DirEntry::new(OsString::from(name), meta));
        }
        if entries.is_empty() && !saw_itself {
            // Nothing under this prefix: a missing directory, or a file.
            return match self.stat(path).await {
                Ok(meta) if meta.kind == EntryKind::Dir => Ok(entries),
                Ok(_) => Err(OriginError::WrongKind {
                    origin: self.id.clone(),
                    path: path.to_string(),
                    expected: "directory",
                }),
                Err(e) => Err(e),
            };
        }
        Ok(entries)
    }

    pub(crate) async fn stat(&self, path: &OriginPath) -> Result<EntryMeta> {
        if path.is_root() {
            return Ok(meta::entry(EntryKind::Dir, 0, None, None));
        }
        let Some(key) = Self::key(path) else {
            return Err(self.not_found(path));
        };
        match self.op.stat(key).await {
            Ok(md) if md.mode() == EntryMode::DIR => Ok(meta::entry(EntryKind::Dir, 0, None, None)),
            Ok(md) => Ok(meta::entry(
                EntryKind::File,
                md.content_length(),
                md.last_modified().map(SystemTime::from),
                md.etag(),
            )),
            Err(e) if e.kind() == opendal::ErrorKind::NotFound && self.flavor == Flavor::S3 => {
                // No such key; a directory exists while any key has its
                // prefix.
                if self.has_children(path).await? {
                    Ok(meta::entry(EntryKind::Dir, 0, None, None))
                } else {
                    Err(self.err(path, &e))
                }
            }
            Err(e) => Err(self.err(path, &e)),
        }
    }

    /// True when some key starts with `path/` (one entry of one page).
    async fn has_children(&self, path: &OriginPath) -> Result<bool> {
        let Some(dir) = Self::dir_key(path) else {
            return Ok(false);
        };
        let mut lister = self
            .op
            .lister_with(&dir)
            .limit(1)
            .await
            .map_err(|e| self.err(path, &e))?;
        Ok(lister
            .try_next()
            .await
            .map_err(|e| self.err(path, &e))?
            .is_some())
    }

    pub(crate) async fn read_range(
        &self,
        path: &OriginPath,
        version: &FileVersion,
        offset: u64,
        len: u64,
    ) -> Result<Bytes> {
        let want = len.min(version.size.saturating_sub(offset));
        if want == 0 {
            // No byte of any version is returned.
            return Ok(Bytes::new());
        }
        let Some(key) = Self::key(path) else {
            return Err(self.changed(path, version, "the path cannot exist remotely".into()));
        };
        let mut reader = self.op.reader_with(key);
        if let Some(tag) = version.etag.as_deref().and_then(meta::if_match) {
            reader = reader.if_match(&tag);
        }
        let reader = reader.await.map_err(|e| self.read_err(path, version, &e))?;
        let buf = reader
            .read(offset..offset + want)
            .await
            .map_err(|e| self.read_err(path, version, &e))?;
        let response = reader.metadata().map(|md| {
            (
                md.etag().map(str::to_owned),
                md.last_modified().map(SystemTime::from),
            )
        });
        let (etag, modified) = response.unwrap_or((None, None));
        match meta::check_response(version, etag.as_deref(), modified) {
            Verdict::Same => {}
            Verdict::Other(reason) => return Err(self.changed(path, version, reason)),
            Verdict::Unknown => {
                // Nothing in the response names its version: ask again now,
                // after the bytes came. A change during the read shows.
                let now = self
                    .stat(path)
                    .await
                    .map_err(|e| self.gone(path, version, e))?;
                if !version.matches(&now) {
                    return Err(self.changed(
                        path,
                        version,
                        format!("found {} after the read", now.version()),
                    ));
                }
            }
        }
        if buf.len() as u64 != want {
            return Err(OriginError::Unavailable {
                origin: self.id.clone(),
                reason: format!(
                    "'{path}': asked for {want} bytes at {offset}, the server sent {}; \
                     the connection was probably cut",
                    buf.len()
                ),
            });
        }
        Ok(buf.to_bytes())
    }

    /// A read's error: a key that is gone no longer has the version
    /// (`Changed`, as the trait asks), the rest as they are.
    fn read_err(
        &self,
        path: &OriginPath,
        version: &FileVersion,
        e: &opendal::Error,
    ) -> OriginError {
        self.gone(path, version, self.err(path, e))
    }

    fn gone(&self, path: &OriginPath, version: &FileVersion, e: OriginError) -> OriginError {
        match e {
            OriginError::NotFound { .. } => {
                self.changed(path, version, "the file is gone from the origin".into())
            }
            e => e,
        }
    }

    fn changed(&self, path: &OriginPath, version: &FileVersion, reason: String) -> OriginError {
        OriginError::Changed {
            origin: self.id.clone(),
            path: path.to_string(),
            reason: format!("reading {version}: {reason}"),
        }
    }

    /// One cheap request with a real answer: S3 lists one key of the root;
    /// WebDAV asks for the properties of one name in the root.
    pub(crate) async fn health(&self) -> Result<()> {
        let root = OriginPath::root();
        match self.flavor {
            Flavor::S3 => {
                let mut lister = self
                    .op
                    .lister_with("/")
                    .limit(1)
                    .await
                    .map_err(|e| self.err(&root, &e))?;
                lister.try_next().await.map_err(|e| self.err(&root, &e))?;
                Ok(())
            }
            // OpenDAL answers a stat of "/" itself, without a request; a
            // PROPFIND (Depth 0) of a name that is never there is the
            // cheapest real question: "not found" is an answer.
            Flavor::WebDav => match self.op.stat(HEALTH_PROBE).await {
                Ok(_) => Ok(()),
                Err(e) if e.kind() == opendal::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(self.err(&root, &e)),
            },
        }
    }

    pub(crate) fn whole_digest(&self, version: &FileVersion) -> Option<WholeDigest> {
        match self.flavor {
            // A single-part upload's ETag is the MD5 of the content.
            Flavor::S3 if self.md5_etags => {
                version.etag.as_deref().and_then(WholeDigest::from_md5_etag)
            }
            Flavor::S3 => None,
            // WebDAV ETags are opaque (rclone's is a hash of size and mtime).
            Flavor::WebDav => None,
        }
    }
}
