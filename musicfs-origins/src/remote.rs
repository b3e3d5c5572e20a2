//! Remote origins: an S3 bucket (or S3-compatible store), a directory over
//! SFTP, a WebDAV folder.
//!
//! Layer: bottom (an [`Origin`] implementation). Meant to be stacked as
//! `RetryOrigin` → `TimeoutOrigin` → `LimitOrigin` → [`RemoteOrigin`]:
//! this layer makes exactly one attempt per call, sets no timeout of its
//! own beyond ssh's connect timeout, and never retries (OpenDAL's retry
//! layer is not used).
//!
//! Invariants:
//! - [`RemoteOrigin::connect`] needs no network: S3 and WebDAV build an
//!   operator, SFTP connects on its first call. A server that is down at
//!   start shows in the calls and in [`Origin::health`], so a mount starts
//!   offline and serves its cache; only a configuration mistake (bad URL,
//!   missing region) fails `connect`.
//! - A file's version is its ETag plus size and mtime where the server has
//!   an ETag (S3, most WebDAV servers), else size and mtime (SFTP);
//!   see `meta` for how they are normalised so a listing's version equals
//!   a stat's.
//! - Errors say what retrying can do: not-found only for a definite "no
//!   such file"; timeouts, 5xx and broken connections retryable; 429/503
//!   throttled with the server's `Retry-After`; bad credentials and
//!   refused host keys permanent ([`OriginError::AccessDenied`]).
//! - No secret reaches a log, an error or [`RemoteSpec::redacted`].

use std::sync::Arc;

use bytes::Bytes;

use async_trait::async_trait;

use crate::{DirEntry, EntryMeta, FileVersion, Origin, OriginId, OriginPath, Result, WholeDigest};

mod dal;
mod errors;
mod meta;
mod s3;
mod sftp;
mod spec;
mod webdav;

pub use spec::{is_remote_url, RemoteKind, RemoteSettings, RemoteSpec, Secret};

use dal::{DalOrigin, Flavor};
use sftp::{SftpOrigin, Target};

/// An origin on a remote server.
#[derive(Debug)]
pub struct RemoteOrigin {
    inner: Inner,
    url: String,
}

#[derive(Debug)]
enum Inner {
    Dal(DalOrigin),
    Sftp(Arc<SftpOrigin>),
}

/// OpenDAL's HTTP services need a process-wide transport (reqwest with
/// rustls, no timeout: `TimeoutOrigin` bounds each call). Installing it
/// twice is a no-op.
fn install_http() {
    opendal::install_default();
}

impl RemoteOrigin {
    /// Sets the origin up without touching the network.
    pub async fn connect(id: OriginId, spec: RemoteSpec) -> Result<RemoteOrigin> {
        let url = spec.redacted();
        let RemoteSpec { kind, settings } = spec;
        let inner = match kind {
            RemoteKind::S3 { bucket, prefix } => {
                let op = s3::operator(&id, &bucket, &prefix, &settings)?;
                let mut dal = DalOrigin::new(id, op, Flavor::S3);
                dal.md5_etags = !settings.etags_not_md5;
                Inner::Dal(dal)
            }
            RemoteKind::WebDav {
                tls,
                host,
                port,
                root,
            } => {
                let op = webdav::operator(&id, tls, &host, port, &root, &settings)?;
                Inner::Dal(DalOrigin::new(id, op, Flavor::WebDav))
            }
            RemoteKind::Sftp {
                user,
                host,
                port,
                root,
            } => Inner::Sftp(Arc::new(SftpOrigin::new(
                id,
                Target {
                    user,
                    host,
                    port,
                    root,
                    settings,
                },
            ))),
        };
        tracing::debug!(%url, "remote origin set up");
        Ok(RemoteOrigin { inner, url })
    }

    /// The origin's URL without secrets.
    pub fn url(&self) -> &str {
        &self.url
    }
}

#[async_trait]
impl Origin for RemoteOrigin {
    fn id(&self) -> &OriginId {
        match &self.inner {
            Inner::Dal(o) => o.id(),
            Inner::Sftp(o) => o.id(),
        }
    }

    async fn list(&self, path: &OriginPath) -> Result<Vec<DirEntry>> {
        match &self.inner {
            Inner::Dal(o) => o.list(path).await,
            Inner::Sftp(o) => o.list(path).await,
        }
    }

    async fn stat(&self, path: &OriginPath) -> Result<EntryMeta> {
        match &self.inner {
            Inner::Dal(o) => o.stat(path).await,
            Inner::Sftp(o) => o.stat(path).await,
        }
    }

    async fn read_range(
        &self,
        path: &OriginPath,
        version: &FileVersion,
        offset: u64,
        len: u64,
    ) -> Result<Bytes> {
        match &self.inner {
            Inner::Dal(o) => o.read_range(path, version, offset, len).await,
            Inner::Sftp(o) => o.read_range(path, version, offset, len).await,
        }
    }

    fn release(&self, path: &OriginPath, version: &FileVersion) {
        if let Inner::Sftp(o) = &self.inner {
            o.release(path, version);
        }
    }

    async fn health(&self) -> Result<()> {
        match &self.inner {
            Inner::Dal(o) => o.health().await,
            Inner::Sftp(o) => o.health().await,
        }
    }

    fn whole_digest(&self, _path: &OriginPath, version: &FileVersion) -> Option<WholeDigest> {
        match &self.inner {
            Inner::Dal(o) => o.whole_digest(version),
            Inner::Sftp(_) => None,
        }
    }
}
