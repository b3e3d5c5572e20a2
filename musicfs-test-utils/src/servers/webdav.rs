//! A WebDAV server on loopback: `rclone serve webdav` over a temporary
//! directory, with basic-auth user and password.
//!
//! Invariants: the server's directory cache is off (`--dir-cache-time 0`),
//! so a file written into [`DavServer::root`] shows up in the next listing
//! and a rewritten file is served with its new size and ETag at once. The
//! ETag is rclone's default, derived from modification time and size (as
//! many WebDAV servers do); [`DavServer::start_with_etag_hash`] makes it a
//! content hash instead.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

use crate::error::{FixtureError, IoContext, Result};
use crate::servers::http::{basic_auth, http_request, HttpResponse};
use crate::servers::process::{reserve_ports, start_with_retries, Slot, Spawned};
use crate::servers::tools::rclone_binary;
use crate::servers::{fresh_secret, DirStore, RemoteServer};

/// The user name the fixture's server accepts.
pub const USER: &str = "musicfs";

/// An rclone WebDAV server on 127.0.0.1, stopped and deleted on drop.
#[derive(Debug)]
pub struct DavServer {
    port: u16,
    password: String,
    etag_hash: Option<String>,
    rclone: PathBuf,
    store: DirStore,
    process: Slot,
    /// The served directory, config and log; dropped after `process`.
    dir: TempDir,
}

impl DavServer {
    /// Starts a server whose ETags come from modification time and size.
    pub fn start() -> Result<DavServer> {
        Self::start_inner(None)
    }

    /// Starts a server whose ETags are the content hash `hash` (e.g. "MD5").
    pub fn start_with_etag_hash(hash: &str) -> Result<DavServer> {
        Self::start_inner(Some(hash.to_string()))
    }

    fn start_inner(etag_hash: Option<String>) -> Result<DavServer> {
        let rclone = rclone_binary()?;
        let dir = tempfile::Builder::new()
            .prefix("musicfs-dav-")
            .tempdir()
            .ctx(|| "creating the WebDAV server's temporary directory".to_string())?;
        std::fs::write(dir.path().join("rclone.conf"), b"")
            .ctx(|| "writing an empty rclone.conf".to_string())?;
        let store = DirStore::new(dir.path().join("root"), dir.path().join("staging"))?;
        let mut server = DavServer {
            port: 0,
            password: fresh_secret("pw"),
            etag_hash,
            rclone,
            store,
            process: Slot::default(),
            dir,
        };
        let p = start_with_retries(|| {
            server.port = reserve_ports(1)?[0];
            server.launch()
        })?;
        server.process.set(p);
        Ok(server)
    }

    /// `http://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("http://{}/", self.addr())
    }

    /// The server's socket address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The user name.
    pub fn user(&self) -> &str {
        USER
    }

    /// The password.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// The served directory; files written here are served at once.
    pub fn root(&self) -> &Path {
        self.store.root()
    }

    /// An authenticated PROPFIND of `path` (absolute, e.g. "/" or
    /// "/Album/") with the given `Depth`.
    pub fn propfind(&self, path: &str, depth: u32) -> Result<HttpResponse> {
        let auth = basic_auth(USER, &self.password);
        let depth = depth.to_string();
        http_request(
            self.addr(),
            "PROPFIND",
            path,
            &[("Authorization", &auth), ("Depth", &depth)],
            b"",
        )
    }

    /// An authenticated request with any method.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<HttpResponse> {
        let auth = basic_auth(USER, &self.password);
        let mut all = vec![("Authorization", auth.as_str())];
        all.extend_from_slice(headers);
        http_request(self.addr(), method, path, &all, b"")
    }

    /// Truncates the file `key` and writes `data` into the same inode, so a
    /// reader with the file open sees the change mid-read.
    pub fn rewrite_in_place(&self, key: &str, data: &[u8]) -> Result<()> {
        self.store.rewrite_in_place(key, data)
    }

    /// Starts rclone and waits for an authenticated PROPFIND to answer 207.
    fn launch(&self) -> Result<Spawned> {
        let d = self.dir.path();
        let mut cmd = Command::new(&self.rclone);
        cmd.arg("serve")
            .arg("webdav")
            .arg(self.root())
            .arg("--addr")
            .arg(self.addr().to_string())
            .args(["--user", USER, "--pass", &self.password])
            .args(["--dir-cache-time", "0s", "--poll-interval", "0"])
            .arg("--config")
            .arg(d.join("rclone.conf"));
        if let Some(hash) = &self.etag_hash {
            cmd.args(["--etag-hash", hash]);
        }
        let mut p = Spawned::spawn("rclone serve webdav", cmd, &d.join("server.log"))?;
        p.wait_ready(|| match self.propfind("/", 0) {
            Ok(r) if r.status == 207 => Ok(()),
            Ok(r) => Err(format!("PROPFIND / answered {}", r.status)),
            Err(e) => Err(e.to_string()),
        })?;
        Ok(p)
    }
}

impl RemoteServer for DavServer {
    fn protocol(&self) -> &'static str {
        "webdav"
    }

    fn port(&self) -> u16 {
        self.port
    }

    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        self.store.put(key, data)
    }

    /// An authenticated HTTP GET; anything but 200 is an error.
    fn fetch(&self, key: &str) -> Result<Vec<u8>> {
        super::check_key(key)?;
        let path = format!("/{}", super::url_path(key));
        let r = self.request("GET", &path, &[])?;
        if r.status == 200 {
            Ok(r.body)
        } else {
            Err(FixtureError::Http {
                from: format!("GET {}{}", self.url(), &path[1..]),
                why: format!("status {}", r.status),
            })
        }
    }

    fn delete(&self, key: &str) -> Result<()> {
        self.store.delete(key)
    }

    fn put_tree(&self, prefix: &str, local: &Path) -> Result<()> {
        self.store.put_tree(prefix, local)
    }

    fn stop(&self) -> Result<()> {
        self.process.stop();
        Ok(())
    }

    fn start_again(&self) -> Result<()> {
        self.process.start_again(|| self.launch())
    }

    fn is_running(&self) -> bool {
        self.process.is_running()
    }

    fn pid(&self) -> Option<u32> {
        self.process.pid()
    }
}
