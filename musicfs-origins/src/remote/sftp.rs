//! The SFTP origin: a directory on a server reached with the user's own
//! OpenSSH setup.
//!
//! Layer: bottom (an [`Origin`] implementation inside
//! [`super::RemoteOrigin`]). One call is one attempt; a call that meets a
//! broken connection fails retryable and the next call connects afresh.
//!
//! Built on the `openssh` crate (it drives the system `ssh` binary as a
//! control master) and `openssh-sftp-client`, the same two crates OpenDAL's
//! SFTP service uses, because that service cannot be used as it is: it
//! takes no ssh config, known_hosts or port setting, creates the root
//! directory on the server when it connects, lists a missing directory as
//! empty, panics on a file name that is not UTF-8, and resolves every read
//! with an extra `realpath` round trip.
//!
//! Invariants:
//! - The user's OpenSSH setup decides: `~/.ssh/config` (or the configured
//!   file), the agent, identity files and `known_hosts`. Host keys are
//!   checked strictly (`StrictHostKeyChecking=yes`): an unknown or changed
//!   key is [`OriginError::AccessDenied`] saying "host key", never accepted.
//!   `BatchMode=yes`: ssh never prompts, so it can never hang on a prompt.
//! - [`SftpOrigin::new`] does no I/O: the server may be down when MusicFS
//!   starts. The first call connects.
//! - One connection at a time, shared by all calls (SFTP multiplexes
//!   requests). When it breaks (server restarted, network gone), every
//!   call on it fails with [`OriginError::Unavailable`] and the next call
//!   opens a new one; handles of the old one are never used again.
//! - Every byte returned belongs to the version asked for. SFTP has no
//!   conditional read, so a read runs on a handle opened for the version
//!   and `fstat`s that handle after the bytes arrived: a file rewritten in
//!   place shows a new size or mtime there and the read fails with
//!   [`OriginError::Changed`]; a file replaced by rename leaves the handle
//!   on the old inode, whose bytes are the version's. The version is size
//!   and mtime (whole seconds: SFTP v3 has no finer time).
//! - A read returns exactly `min(len, size - offset)` bytes, or fails.
//! - A call its caller gave up on (a timeout) puts the connection under
//!   suspicion: one stat must answer within a few seconds or the
//!   connection is dropped, so a hung connection is replaced by a fresh one
//!   at the next attempt rather than after ssh's keepalives (15 s).
//! - Names are UTF-8 (openssh-sftp-client decodes them as such): a path
//!   that is not is [`OriginError::Unsupported`] without a request, and a
//!   directory holding such a name fails to list (retryably: the client's
//!   connection ends with the undecodable answer and the next call opens a
//!   new one), never lists short and never panics.
//! - Listings leave out `.`, `..`, and anything but files and directories:
//!   symlinks are not served on SFTP origins (the server would follow them
//!   anywhere, and MusicFS never follows a link out of the root).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use openssh::{ControlPersist, KnownHosts, SessionBuilder};
use openssh_sftp_client::error::SftpErrorKind;
use openssh_sftp_client::file::File;
use openssh_sftp_client::metadata::MetaData;
use openssh_sftp_client::{Error as SftpError, Sftp, SftpOptions};
use parking_lot::Mutex;
use tokio::io::AsyncSeekExt;

use super::meta;
use super::spec::RemoteSettings;

mod kept;
mod ssh;

use crate::{
    DirEntry, EntryKind, EntryMeta, FileVersion, OriginError, OriginId, OriginPath, Result,
};
use kept::Kept;
use ssh::{classify_ssh, error_chain};

/// How long ssh may take to open the TCP connection and exchange banners.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Keepalives find a dead connection in about three of these.
const ALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// Bytes asked for by one SFTP read request; larger reads are split and
/// sent together, so a read of several requests costs one round trip.
const READ_REQUEST: u64 = 256 * 1024;
/// How long a connection under suspicion may take to answer a stat.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Where to connect and how.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub user: Option<String>,
    pub host: String,
    pub port: Option<u16>,
    /// Absolute, relative to the login directory, or empty (that directory).
    pub root: String,
    pub settings: RemoteSettings,
}

#[derive(Debug)]
pub(crate) struct SftpOrigin {
    id: OriginId,
    target: Target,
    conn: tokio::sync::Mutex<Option<Arc<Conn>>>,
    generation: AtomicU64,
    kept: Mutex<Kept>,
}

#[derive(Debug)]
struct Conn {
    generation: u64,
    sftp: Sftp,
}

impl SftpOrigin {
    pub(crate) fn new(id: OriginId, target: Target) -> Self {
        Self {
            id,
            target,
            conn: tokio::sync::Mutex::new(None),
            generation: AtomicU64::new(0),
            kept: Mutex::new(Kept::default()),
        }
    }

    pub(crate) fn id(&self) -> &OriginId {
        &self.id
    }

    /// The live connection, or a new one. Callers queue here while one of
    /// them connects, so a server coming back meets one login, not many.
    async fn conn(&self) -> Result<Arc<Conn>> {
        let mut slot = self.conn.lock().await;
        if let Some(conn) = slot.as_ref() {
            return Ok(Arc::clone(conn));
        }
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let conn = Arc::new(Conn {
            generation,
            sftp: self.connect().await?,
        });
        tracing::info!(origin = %self.id, generation, "connected to the SFTP server");
        *slot = Some(Arc::clone(&conn));
        Ok(conn)
    }

    async fn connect(&self) -> Result<Sftp> {
        let t = &self.target;
        let mut builder = SessionBuilder::default();
        builder
            .known_hosts_check(KnownHosts::Strict)
            .connect_timeout(CONNECT_TIMEOUT)
            .server_alive_interval(ALIVE_INTERVAL)
            // The master ends with its one session: nothing outlives us.
            .control_persist(ControlPersist::ClosedAfterInitialConnection)
            .control_directory(std::env::temp_dir());
        if let Some(user) = &t.user {
            builder.user(user.clone());
        }
        if let Some(port) = t.port {
            builder.port(port);
        }
        if let Some(config) = &t.settings.ssh_config {
            builder.config_file(config);
        }
        if let Some(key) = &t.settings.ssh_key {
            builder.keyfile(key);
        }
        if let Some(known_hosts) = &t.settings.known_hosts {
            builder.user_known_hosts_file(known_hosts);
        }
        let session = builder
            .connect(&t.host)
            .await
            .map_err(|e| self.ssh_err(&e))?;
        Sftp::from_session(session, SftpOptions::default())
            .await
            .map_err(|e| self.lost(None, &OriginPath::root(), e))
    }

    /// A failed login, with what the user must fix.
    fn ssh_err(&self, e: &openssh::Error) -> OriginError {
        let text = error_chain(e);
        classify_ssh(&self.id, &self.target.host, &text)
    }

    /// An SFTP error on `conn`. A status from the server is an answer; any
    /// other error means the connection is gone, so it is dropped and the
    /// next call reconnects.
    fn lost(&self, conn: Option<&Conn>, path: &OriginPath, e: SftpError) -> OriginError {
        match &e {
            SftpError::SftpError(kind, msg) => match kind {
                SftpErrorKind::NoSuchFile => OriginError::NotFound {
                    origin: self.id.clone(),
                    path: path.to_string(),
                },
                SftpErrorKind::PermDenied => OriginError::PermissionDenied {
                    origin: self.id.clone(),
                    path: path.to_string(),
                },
                _ => OriginError::Unavailable {
                    origin: self.id.clone(),
                    reason: format!("'{path}': the SFTP server answered {kind:?}: {msg}"),
                },
            },
            _ => {
                if let Some(conn) = conn {
                    self.drop_conn(conn.generation);
                }
                OriginError::Unavailable {
                    origin: self.id.clone(),
                    reason: format!("'{path}': the SFTP connection failed: {e}"),
                }
            }
        }
    }

    fn drop_conn(&self, generation: u64) {
        // try_lock: a caller holding the lock is connecting right now, and
        // its connection is newer than the broken one.
        if let Ok(mut slot) = self.conn.try_lock() {
            if slot.as_ref().is_some_and(|c| c.generation == generation) {
                tracing::info!(origin = %self.id, generation, "dropping a broken SFTP connection");
                *slot = None;
            }
        }
    }

    /// `path`, when the SFTP client can name it: openssh-sftp-client
    /// encodes and decodes names as UTF-8 only.
    fn nameable<'a>(&self, path: &'a OriginPath) -> Result<&'a OriginPath> {
        if std::str::from_utf8(path.as_bytes()).is_ok() {
            Ok(path)
        } else {
            Err(OriginError::Unsupported {
                origin: self.id.clone(),
                what: "SFTP names that are not UTF-8",
            })
        }
    }

    /// The server path of `path`.
    fn server_path(&self, path: &OriginPath) -> PathBuf {
        let root = &self.target.root;
        let mut p = if root.is_empty() {
            PathBuf::from(".")
        } else {
            PathBuf::from(root)
        };
        if !path.is_root() {
            p.push(path.as_os_str());
        }
        p
    }

    pub(crate) async fn list(self: &Arc<Self>, path: &OriginPath) -> Result<Vec<DirEntry>> {
        let path = self.nameable(path)?;
        let conn = self.conn().await?;
        let watch = Watch::new(self, &conn);
        let result = self.list_on(&conn, path).await;
        watch.finished();
        result
    }

    async fn list_on(&self, conn: &Conn, path: &OriginPath) -> Result<Vec<DirEntry>> {
        let dir = conn
            .sftp
            .fs()
            .open_dir(self.server_path(path))
            .await
            .map_err(|e| self.lost(Some(conn), path, e));
        let dir = match dir {
            Ok(dir) => dir,
            // A file is no directory; v3 servers say only "failure".
            Err(OriginError::Unavailable { .. }) | Err(OriginError::NotFound { .. })
                if self
                    .stat_on(conn, path)
                    .await
                    .is_ok_and(|m| m.kind != EntryKind::Dir) =>
            {
                return Err(OriginError::WrongKind {
                    origin: self.id.clone(),
                    path: path.to_string(),
                    expected: "directory",
                })
            }
            Err(e) => return Err(e),
        };
        let mut entries = Vec::new();
        let mut stream = Box::pin(dir.read_dir());
        while let Some(entry) = stream.next().await {
            let entry = entry.map_err(|e| self.lost(Some(conn), path, e))?;
            let name = entry.filename().as_os_str();
            if name == "." || name == ".." || !OriginPath::is_valid_name(name) {
                continue;
            }
            let Some(meta) = file_or_dir(&entry.metadata()) else {
                tracing::debug!(origin = %self.id, dir = %path, ?name, "not listing a symlink or special file");
                continue;
            };
            entries.push(DirEntry::new(name.to_owned(), meta));
        }
        Ok(entries)
    }

    pub(crate) async fn stat(self: &Arc<Self>, path: &OriginPath) -> Result<EntryMeta> {
        let path = self.nameable(path)?;
        let conn = self.conn().await?;
        let watch = Watch::new(self, &conn);
        let result = self.stat_on(&conn, path).await;
        watch.finished();
        result
    }

    async fn stat_on(&self, conn: &Conn, path: &OriginPath) -> Result<EntryMeta> {
        let mut fs = conn.sftp.fs();
        let server = self.server_path(path);
        // The root is the operator's configuration: followed if a link.
        let md = if path.is_root() {
            fs.metadata(server).await
        } else {
            fs.symlink_metadata(server).await
        }
        .map_err(|e| self.lost(Some(conn), path, e))?;
        if md.file_type().is_some_and(|t| t.is_symlink()) {
            return Err(OriginError::HiddenSymlink {
                origin: self.id.clone(),
                path: path.to_string(),
                reason: "symlinks on SFTP origins are not served",
            });
        }
        file_or_dir(&md).ok_or_else(|| OriginError::WrongKind {
            origin: self.id.clone(),
            path: path.to_string(),
            expected: "file or directory",
        })
    }

    pub(crate) async fn read_range(
        self: &Arc<Self>,
        path: &OriginPath,
        version: &FileVersion,
        offset: u64,
        len: u64,
    ) -> Result<Bytes> {
        let want = len.min(version.size.saturating_sub(offset));
        if want == 0 {
            return Ok(Bytes::new());
        }
        let path = self.nameable(path)?;
        let conn = self.conn().await?;
        let watch = Watch::new(self, &conn);
        let result = self.read_on(&conn, path, version, offset, want).await;
        watch.finished();
        result
    }

    async fn read_on(
        &self,
        conn: &Conn,
        path: &OriginPath,
        version: &FileVersion,
        offset: u64,
        want: u64,
    ) -> Result<Bytes> {
        let file = self.open_version(conn, path, version).await?;
        let result = self.read_exact(conn, path, &file, offset, want).await;
        // After the bytes: the handle still holds the version, or the read
        // may have overlapped a rewrite.
        let check = self.check_handle(conn, path, version, &file).await;
        match (result, check) {
            (Ok(buf), Ok(())) => Ok(buf),
            (_, Err(e)) | (Err(e), _) => {
                self.kept.lock().forget(path, version);
                Err(e)
            }
        }
    }

    async fn open_version(
        &self,
        conn: &Conn,
        path: &OriginPath,
        version: &FileVersion,
    ) -> Result<File> {
        if let Some(file) = self.kept.lock().get(path, version, conn.generation) {
            return Ok(file);
        }
        let file = conn.sftp.open(self.server_path(path)).await.map_err(|e| {
            match self.lost(Some(conn), path, e) {
                // Gone: it no longer holds the version.
                OriginError::NotFound { .. } => {
                    self.changed(path, version, "the file is gone".into())
                }
                e => e,
            }
        })?;
        self.kept
            .lock()
            .put(path, version, conn.generation, file.clone());
        Ok(file)
    }

    /// `want` bytes from `offset`, in requests of [`READ_REQUEST`] sent
    /// together; a server's short answer is asked again for the rest.
    async fn read_exact(
        &self,
        conn: &Conn,
        path: &OriginPath,
        file: &File,
        offset: u64,
        want: u64,
    ) -> Result<Bytes> {
        let end = offset + want;
        let pieces = (offset..end).step_by(READ_REQUEST as usize).map(|start| {
            let stop = (start + READ_REQUEST).min(end);
            let mut file = file.clone();
            async move {
                let mut out = BytesMut::with_capacity((stop - start) as usize);
                let mut at = start;
                while at < stop {
                    file.seek(std::io::SeekFrom::Start(at))
                        .await
                        .map_err(SftpError::from)?;
                    // `stop - at` <= READ_REQUEST, which fits a u32.
                    let n = (stop - at) as u32;
                    match file.read(n, BytesMut::with_capacity(n as usize)).await? {
                        Some(bytes) if !bytes.is_empty() => {
                            at += bytes.len() as u64;
                            out.extend_from_slice(&bytes);
                        }
                        // End of file before the version's size.
                        _ => break,
                    }
                }
                Ok::<_, SftpError>(out)
            }
        });
        let parts = futures::future::try_join_all(pieces)
            .await
            .map_err(|e| self.lost(Some(conn), path, e))?;
        let mut buf = BytesMut::with_capacity(want as usize);
        for part in parts {
            buf.extend_from_slice(&part);
        }
        if buf.len() as u64 != want {
            // The file is shorter than its version: it changed (the check
            // after the read says how).
            return Err(OriginError::Unavailable {
                origin: self.id.clone(),
                reason: format!(
                    "'{path}': asked for {want} bytes at {offset}, the server sent {}",
                    buf.len()
                ),
            });
        }
        Ok(buf.freeze())
    }

    async fn check_handle(
        &self,
        conn: &Conn,
        path: &OriginPath,
        version: &FileVersion,
        file: &File,
    ) -> Result<()> {
        let md = file
            .clone()
            .metadata()
            .await
            .map_err(|e| self.lost(Some(conn), path, e))?;
        match file_or_dir(&md) {
            Some(now) if version.matches(&now) => Ok(()),
            now => Err(self.changed(
                path,
                version,
                format!(
                    "found {}",
                    now.map_or_else(
                        || "another kind of file".into(),
                        |m| m.version().to_string()
                    )
                ),
            )),
        }
    }

    fn changed(&self, path: &OriginPath, version: &FileVersion, reason: String) -> OriginError {
        OriginError::Changed {
            origin: self.id.clone(),
            path: path.to_string(),
            reason: format!("reading {version}: {reason}"),
        }
    }

    pub(crate) fn release(&self, path: &OriginPath, version: &FileVersion) {
        self.kept.lock().forget(path, version);
    }

    /// Connects if needed, then one stat of the root: one round trip on a
    /// live connection.
    pub(crate) async fn health(self: &Arc<Self>) -> Result<()> {
        let root = OriginPath::root();
        match self.stat(&root).await {
            Ok(meta) if meta.kind == EntryKind::Dir => Ok(()),
            Ok(_) => Err(OriginError::WrongKind {
                origin: self.id.clone(),
                path: root.to_string(),
                expected: "directory",
            }),
            Err(OriginError::NotFound { .. }) => Err(OriginError::Unavailable {
                origin: self.id.clone(),
                reason: format!(
                    "the root folder '{}' does not exist on the server",
                    self.server_path(&root).display()
                ),
            }),
            Err(e) => Err(e),
        }
    }
}

/// Notices a call given up while it waited on the connection (the caller's
/// timeout dropped it): the connection may be hung, so it is asked a cheap
/// question in the background, and dropped when that gets no answer within
/// [`PROBE_TIMEOUT`]. The next call then connects afresh instead of
/// queueing on a dead connection until ssh's keepalives notice.
struct Watch {
    origin: Arc<SftpOrigin>,
    conn: Arc<Conn>,
    armed: bool,
}

impl Watch {
    fn new(origin: &Arc<SftpOrigin>, conn: &Arc<Conn>) -> Self {
        Self {
            origin: Arc::clone(origin),
            conn: Arc::clone(conn),
            armed: true,
        }
    }

    /// The call ended (with an answer or an error): nothing to check.
    fn finished(mut self) {
        self.armed = false;
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let origin = Arc::clone(&self.origin);
        let conn = Arc::clone(&self.conn);
        runtime.spawn(async move {
            let mut fs = conn.sftp.fs();
            let probe = fs.metadata(origin.server_path(&OriginPath::root()));
            match tokio::time::timeout(PROBE_TIMEOUT, probe).await {
                Ok(Ok(_)) | Ok(Err(SftpError::SftpError(..))) => {}
                Ok(Err(e)) => {
                    tracing::info!(origin = %origin.id, error = %e, "the SFTP connection failed");
                    origin.drop_conn(conn.generation);
                }
                Err(_) => {
                    tracing::warn!(
                        origin = %origin.id,
                        "the SFTP connection does not answer; opening a new one"
                    );
                    origin.drop_conn(conn.generation);
                }
            }
        });
    }
}

/// A file's or directory's metadata; `None` for anything else.
fn file_or_dir(md: &MetaData) -> Option<EntryMeta> {
    let t = md.file_type()?;
    let kind = if t.is_file() {
        EntryKind::File
    } else if t.is_dir() {
        EntryKind::Dir
    } else {
        return None;
    };
    Some(meta::entry(
        kind,
        md.len().unwrap_or(0),
        md.modified().map(|m| m.as_system_time()),
        None,
    ))
}

#[cfg(test)]
mod tests;
