//! Real servers on loopback for the remote-origin tests: an S3 store
//! (SeaweedFS), an SFTP server (OpenSSH `sshd`) and a WebDAV server
//! (`rclone serve webdav`), each started by the test on free ports and
//! stopped by PID.
//!
//! Invariants, for every fixture:
//! - It listens on 127.0.0.1 only, on ports picked free at start; two
//!   fixtures of the same kind run side by side in one test process.
//! - `start()` returns once the server gave a real protocol answer (a
//!   signed S3 listing, an SSH banner, an authenticated PROPFIND), or fails
//!   with the end of the server's log; the wait is bounded by
//!   [`START_DEADLINE`], which only bounds a hang.
//! - `stop()` kills the server and everything it forked, by PID, and
//!   returns once its port is closed; `start_again()` brings it back on the
//!   same port with the same data, credentials and host key. Drop stops it
//!   and removes its temporary directory.
//! - A missing program is an error naming the package to install: tests
//!   fail loudly, never skip.
//! - The blocking calls here (start, stop, put) take up to a second or so;
//!   async tests call them before starting the code under test, or through
//!   `spawn_blocking`.

pub mod http;
pub(crate) mod process;
pub mod s3;
pub mod sftp;
pub mod tools;
pub mod webdav;

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};

pub use http::{basic_auth, http_request, HttpResponse};
pub use process::START_DEADLINE;
pub use s3::S3Server;
pub use sftp::SftpServer;
pub use tools::{rclone_binary, ssh_client_binary, sshd_binary, weed_binary};
pub use webdav::DavServer;

use crate::error::{FixtureError, IoContext, Result};

/// What every server fixture offers, so a test can run the same scenario
/// against each protocol.
pub trait RemoteServer: Send + Sync {
    /// "s3", "sftp" or "webdav".
    fn protocol(&self) -> &'static str;
    /// The loopback port clients connect to (stable across
    /// `stop`/`start_again`).
    fn port(&self) -> u16;
    /// Stores `data` under `key` (a relative, `/`-separated path), replacing
    /// what was there atomically: a reader sees the old or the new object,
    /// never a mix.
    fn put(&self, key: &str, data: &[u8]) -> Result<()>;
    /// Reads the object `key` back through the server's own protocol with a
    /// real client (rclone's S3 backend, `sftp`, an HTTP GET).
    fn fetch(&self, key: &str) -> Result<Vec<u8>>;
    /// Removes the object `key`.
    fn delete(&self, key: &str) -> Result<()>;
    /// Copies every file under the local directory `local` to keys under
    /// `prefix` ("" for the top), keeping relative paths.
    fn put_tree(&self, prefix: &str, local: &Path) -> Result<()>;
    /// Kills the server (and its open connections); returns once the port
    /// is closed.
    fn stop(&self) -> Result<()>;
    /// Starts the server again on the same port with the same data.
    fn start_again(&self) -> Result<()>;
    /// Whether the server process is running (not stopped, not exited).
    fn is_running(&self) -> bool;
    /// The server's PID while it runs.
    fn pid(&self) -> Option<u32>;
}

/// Checks that `key` names a file below a root: relative, no empty, `.` or
/// `..` component, no NUL.
pub(crate) fn check_key(key: &str) -> Result<()> {
    let bad = |why| {
        Err(FixtureError::BadKey {
            key: key.to_string(),
            why,
        })
    };
    if key.is_empty() {
        return bad("empty");
    }
    if key.starts_with('/') {
        return bad("must be relative (no leading '/')");
    }
    if key.contains('\0') {
        return bad("contains NUL");
    }
    if key
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return bad("has an empty, '.' or '..' component");
    }
    Ok(())
}

/// Joins a prefix ("" or "a/b" or "a/b/") and a relative path into a key.
pub(crate) fn join_key(prefix: &str, rel: &str) -> String {
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        rel.to_string()
    } else {
        format!("{prefix}/{rel}")
    }
}

/// A secret that differs per fixture and per run (so a test can search
/// logs and messages for it), made of `[0-9a-f]`.
pub(crate) fn fresh_secret(prefix: &str) -> String {
    let mut out = String::from(prefix);
    for _ in 0..2 {
        // RandomState is seeded randomly per process and advanced per
        // instance: unpredictable enough for a loopback test credential.
        let mut h = RandomState::new().build_hasher();
        h.write_u128(std::time::UNIX_EPOCH.elapsed().map_or(0, |d| d.as_nanos()));
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out
}

/// `key` with every byte outside `[A-Za-z0-9-._~/]` percent-encoded, for
/// a URL path.
pub(crate) fn url_path(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Files served straight from a local directory (SFTP, WebDAV): writes go
/// to the directory itself.
#[derive(Debug)]
pub(crate) struct DirStore {
    root: PathBuf,
    /// A sibling of `root` on the same file system, so a staged file is
    /// renamed into place and never shows up half-written in a listing.
    staging: PathBuf,
}

impl DirStore {
    pub(crate) fn new(root: PathBuf, staging: PathBuf) -> Result<DirStore> {
        for d in [&root, &staging] {
            std::fs::create_dir_all(d).ctx(|| format!("creating {}", d.display()))?;
        }
        Ok(DirStore { root, staging })
    }

    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn path_of(&self, key: &str) -> Result<PathBuf> {
        check_key(key)?;
        Ok(self.root.join(key))
    }

    fn make_parent(path: &Path) -> Result<()> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).ctx(|| format!("creating {}", parent.display()))?;
        }
        Ok(())
    }

    /// Writes `data` to a staged file and renames it over `key`.
    pub(crate) fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        let dest = self.path_of(key)?;
        Self::make_parent(&dest)?;
        let staged = tempfile::NamedTempFile::new_in(&self.staging)
            .ctx(|| format!("creating a staging file in {}", self.staging.display()))?;
        std::fs::write(staged.path(), data)
            .ctx(|| format!("writing {}", staged.path().display()))?;
        staged
            .persist(&dest)
            .map_err(|e| FixtureError::io(format!("renaming into {}", dest.display()), e.error))?;
        Ok(())
    }

    /// Truncates the existing file `key` and writes `data` into the same
    /// inode, as an editor that saves in place does: a reader holding the
    /// file open sees the change.
    pub(crate) fn rewrite_in_place(&self, key: &str, data: &[u8]) -> Result<()> {
        let dest = self.path_of(key)?;
        Self::make_parent(&dest)?;
        std::fs::write(&dest, data).ctx(|| format!("rewriting {}", dest.display()))
    }

    pub(crate) fn delete(&self, key: &str) -> Result<()> {
        let dest = self.path_of(key)?;
        std::fs::remove_file(&dest).ctx(|| format!("deleting {}", dest.display()))
    }

    pub(crate) fn put_tree(&self, prefix: &str, local: &Path) -> Result<()> {
        let prefix = prefix.trim_end_matches('/');
        let dest = if prefix.is_empty() {
            self.root.clone()
        } else {
            self.path_of(prefix)?
        };
        crate::library::copy_tree(local, &dest)
            .ctx(|| format!("copying {} into {}", local.display(), dest.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_checked() {
        assert!(check_key("a/b.flac").is_ok());
        assert!(check_key("Ünïcode dir/x y.mp3").is_ok());
        for bad in ["", "/abs", "a//b", "a/./b", "../up", "a/..", "a/", "nul\0"] {
            assert!(check_key(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(join_key("", "x"), "x");
        assert_eq!(join_key("p/", "x"), "p/x");
        assert_eq!(join_key("p", "d/x"), "p/d/x");
        assert_eq!(url_path("a b/ü%.flac"), "a%20b/%C3%BC%25.flac");
    }

    #[test]
    fn secrets_differ() {
        let a = fresh_secret("k");
        let b = fresh_secret("k");
        assert_ne!(a, b);
        assert!(a.starts_with('k') && a.len() == 33);
    }

    #[test]
    fn dir_store_puts_atomically_and_rewrites_in_place() {
        use std::os::unix::fs::MetadataExt;
        let t = tempfile::tempdir().unwrap();
        let s = DirStore::new(t.path().join("root"), t.path().join("staging")).unwrap();
        s.put("a/b/c.bin", b"one").unwrap();
        let p = t.path().join("root/a/b/c.bin");
        assert_eq!(std::fs::read(&p).unwrap(), b"one");
        let ino = std::fs::metadata(&p).unwrap().ino();
        s.put("a/b/c.bin", b"two").unwrap();
        assert_ne!(
            std::fs::metadata(&p).unwrap().ino(),
            ino,
            "put must replace"
        );
        let ino = std::fs::metadata(&p).unwrap().ino();
        s.rewrite_in_place("a/b/c.bin", b"three").unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().ino(), ino, "in place");
        assert_eq!(std::fs::read(&p).unwrap(), b"three");
        s.delete("a/b/c.bin").unwrap();
        assert!(!p.exists());
        assert!(s.put("../escape", b"x").is_err());
        assert_eq!(
            std::fs::read_dir(t.path().join("staging")).unwrap().count(),
            0
        );
    }
}
