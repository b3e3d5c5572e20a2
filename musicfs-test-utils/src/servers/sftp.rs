//! An SFTP server on loopback: OpenSSH's `sshd` with its own config, a
//! generated host key and user key, serving a temporary directory through
//! `internal-sftp`.
//!
//! Clients reach it the way a user's OpenSSH setup would: an ssh_config
//! file (`ssh -F`) names the port, user, identity and a known_hosts file
//! that holds the server's real host key, with `StrictHostKeyChecking yes`.
//! For the refusal tests the fixture also offers a known_hosts file with a
//! different key for the same host and port, and an empty one.
//!
//! Invariants: sshd listens on 127.0.0.1 only, authenticates by key only
//! (no password, no PAM), and its host key survives `stop`/`start_again`,
//! so a client's known_hosts stays valid across a restart. The served
//! directory's absolute path is also the SFTP path (and the session's
//! start directory), so `sftp://USER@127.0.0.1:PORT/<root>` names it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

use crate::error::{IoContext, Result};
use crate::servers::process::{self, reserve_ports, start_with_retries, Slot, Spawned};
use crate::servers::tools::{ssh_client_binary, sshd_binary};
use crate::servers::{DirStore, RemoteServer};

/// The `Host` alias the fixture's ssh_config defines.
pub const HOST_ALIAS: &str = "musicfs-sftp";

/// Where sshd insists on its privilege-separation directory when run as
/// root.
const PRIVSEP_DIR: &str = "/run/sshd";

/// An OpenSSH SFTP server on 127.0.0.1, stopped and deleted on drop.
#[derive(Debug)]
pub struct SftpServer {
    port: u16,
    user: String,
    sshd: PathBuf,
    store: DirStore,
    process: Slot,
    /// Keys, configs, logs and the served directory; dropped after
    /// `process`.
    dir: TempDir,
}

impl SftpServer {
    /// Generates keys and configs and starts sshd on a free port.
    pub fn start() -> Result<SftpServer> {
        let sshd = sshd_binary()?;
        let keygen = ssh_client_binary("ssh-keygen")?;
        let dir = tempfile::Builder::new()
            .prefix("musicfs-sftp-")
            .tempdir()
            .ctx(|| "creating the SFTP server's temporary directory".to_string())?;
        let d = dir.path();
        for (name, comment) in [
            ("host_key", "musicfs-test-host"),
            ("other_host_key", "musicfs-test-other-host"),
            ("user_key", "musicfs-test-user"),
        ] {
            process::run(
                Command::new(&keygen)
                    .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
                    .arg(d.join(name)),
            )?;
        }
        std::fs::copy(d.join("user_key.pub"), d.join("authorized_keys"))
            .ctx(|| "writing authorized_keys".to_string())?;
        std::fs::write(d.join("empty_known_hosts"), b"")
            .ctx(|| "writing empty_known_hosts".to_string())?;
        ensure_privsep_dir()?;
        let store = DirStore::new(d.join("root"), d.join("staging"))?;
        let mut server = SftpServer {
            port: 0,
            user: current_user()?,
            sshd,
            store,
            process: Slot::default(),
            dir,
        };
        let p = start_with_retries(|| {
            server.port = reserve_ports(1)?[0];
            server.write_configs()?;
            server.launch()
        })?;
        server.process.set(p);
        Ok(server)
    }

    /// `127.0.0.1`.
    pub fn host(&self) -> &str {
        "127.0.0.1"
    }

    /// The server's socket address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The user to log in as (the user running the tests).
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The served directory; its absolute path is also its SFTP path.
    /// Files written here are served at once.
    pub fn root(&self) -> &Path {
        self.store.root()
    }

    /// `sftp://USER@127.0.0.1:PORT/<root>`.
    pub fn url(&self) -> String {
        format!(
            "sftp://{}@127.0.0.1:{}{}",
            self.user,
            self.port,
            self.root().display()
        )
    }

    /// The user's private key (ed25519, no passphrase).
    pub fn private_key(&self) -> PathBuf {
        self.dir.path().join("user_key")
    }

    /// A known_hosts file holding the server's real host key for
    /// `[127.0.0.1]:PORT`.
    pub fn known_hosts(&self) -> PathBuf {
        self.dir.path().join("known_hosts")
    }

    /// A known_hosts file holding a different key for the same
    /// `[127.0.0.1]:PORT`: a client using it meets a changed host key and
    /// must refuse.
    pub fn wrong_known_hosts(&self) -> PathBuf {
        self.dir.path().join("wrong_known_hosts")
    }

    /// An empty known_hosts file: the server is unknown.
    pub fn empty_known_hosts(&self) -> PathBuf {
        self.dir.path().join("empty_known_hosts")
    }

    /// An ssh_config file (`ssh -F`) that ties it together for
    /// [`HOST_ALIAS`] and for `127.0.0.1`: port, user, identity, the real
    /// known_hosts and `StrictHostKeyChecking yes`.
    pub fn ssh_config(&self) -> PathBuf {
        self.dir.path().join("ssh_config")
    }

    /// Writes an ssh_config like [`ssh_config`](Self::ssh_config) that
    /// trusts `known_hosts` instead, and returns its path.
    pub fn ssh_config_with_known_hosts(&self, known_hosts: &Path) -> Result<PathBuf> {
        let name = format!(
            "ssh_config.{}",
            known_hosts
                .file_name()
                .map_or("custom".into(), |n| n.to_string_lossy())
        );
        let path = self.dir.path().join(name);
        std::fs::write(&path, self.ssh_config_text(self.port, known_hosts))
            .ctx(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// For clients that reach the server through something listening on
    /// another loopback `port` (the fault-injecting proxy): adds the
    /// server's key for `[127.0.0.1]:port` to [`known_hosts`](Self::known_hosts)
    /// (and the other key to [`wrong_known_hosts`](Self::wrong_known_hosts)),
    /// and writes and returns an ssh_config like
    /// [`ssh_config`](Self::ssh_config) that connects to `port`.
    pub fn ssh_config_via(&self, port: u16) -> Result<PathBuf> {
        use std::io::Write;
        for (file, key) in [
            (self.known_hosts(), "host_key.pub"),
            (self.wrong_known_hosts(), "other_host_key.pub"),
        ] {
            let line = self.known_host_line(port, key)?;
            std::fs::OpenOptions::new()
                .append(true)
                .open(&file)
                .and_then(|mut f| f.write_all(line.as_bytes()))
                .ctx(|| format!("adding port {port} to {}", file.display()))?;
        }
        let path = self.dir.path().join(format!("ssh_config.port-{port}"));
        std::fs::write(&path, self.ssh_config_text(port, &self.known_hosts()))
            .ctx(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// A known_hosts line giving `[127.0.0.1]:port` the public key in
    /// `key_file`.
    fn known_host_line(&self, port: u16, key_file: &str) -> Result<String> {
        let path = self.dir.path().join(key_file);
        let public =
            std::fs::read_to_string(&path).ctx(|| format!("reading {}", path.display()))?;
        Ok(format!("[127.0.0.1]:{port} {}\n", public.trim()))
    }

    /// Runs `sftp -F <ssh_config> -b - musicfs-sftp` with `batch` on stdin
    /// and returns its stdout (the batch echo and the answers).
    pub fn sftp_batch(&self, batch: &str) -> Result<String> {
        self.sftp_batch_with_config(&self.ssh_config(), batch)
    }

    /// [`sftp_batch`](Self::sftp_batch) with another ssh_config.
    pub fn sftp_batch_with_config(&self, ssh_config: &Path, batch: &str) -> Result<String> {
        let sftp = ssh_client_binary("sftp")?;
        let out = process::run_with_input(
            Command::new(sftp)
                .arg("-F")
                .arg(ssh_config)
                .args(["-b", "-", HOST_ALIAS]),
            Some(batch.as_bytes()),
        )?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// Truncates the file `key` and writes `data` into the same inode, so a
    /// reader with the file open sees the change mid-read.
    pub fn rewrite_in_place(&self, key: &str, data: &[u8]) -> Result<()> {
        self.store.rewrite_in_place(key, data)
    }

    fn ssh_config_text(&self, port: u16, known_hosts: &Path) -> String {
        format!(
            "Host {HOST_ALIAS} 127.0.0.1\n\
             \x20 HostName 127.0.0.1\n\
             \x20 Port {port}\n\
             \x20 User {user}\n\
             \x20 IdentityFile {key}\n\
             \x20 IdentitiesOnly yes\n\
             \x20 UserKnownHostsFile {kh}\n\
             \x20 GlobalKnownHostsFile /dev/null\n\
             \x20 StrictHostKeyChecking yes\n\
             \x20 UpdateHostKeys no\n\
             \x20 BatchMode yes\n\
             \x20 PasswordAuthentication no\n\
             \x20 KbdInteractiveAuthentication no\n\
             \x20 ConnectTimeout 10\n\
             \x20 LogLevel ERROR\n",
            user = self.user,
            key = self.private_key().display(),
            kh = known_hosts.display(),
        )
    }

    /// sshd_config, known_hosts files and ssh_config for `self.port`.
    fn write_configs(&self) -> Result<()> {
        let d = self.dir.path();
        let sshd_config = format!(
            "Port {port}\n\
             ListenAddress 127.0.0.1\n\
             HostKey {host_key}\n\
             PidFile none\n\
             AuthorizedKeysFile {authorized}\n\
             PermitRootLogin prohibit-password\n\
             PubkeyAuthentication yes\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             UsePAM no\n\
             StrictModes no\n\
             Subsystem sftp internal-sftp -d {root}\n\
             AllowTcpForwarding no\n\
             X11Forwarding no\n\
             PrintMotd no\n\
             MaxStartups 100\n\
             MaxSessions 100\n\
             LogLevel VERBOSE\n",
            port = self.port,
            host_key = d.join("host_key").display(),
            authorized = d.join("authorized_keys").display(),
            root = self.root().display(),
        );
        let write = |name: &str, text: String| {
            let path = d.join(name);
            std::fs::write(&path, text).ctx(|| format!("writing {}", path.display()))
        };
        write("sshd_config", sshd_config)?;
        let host_line = |key_file: &str| -> Result<String> {
            let public =
                std::fs::read_to_string(d.join(key_file)).ctx(|| format!("reading {key_file}"))?;
            Ok(format!("[127.0.0.1]:{} {}\n", self.port, public.trim()))
        };
        write("known_hosts", host_line("host_key.pub")?)?;
        write("wrong_known_hosts", host_line("other_host_key.pub")?)?;
        write(
            "ssh_config",
            self.ssh_config_text(self.port, &self.known_hosts()),
        )
    }

    /// Starts sshd and waits for its SSH banner.
    fn launch(&self) -> Result<Spawned> {
        let d = self.dir.path();
        let mut cmd = Command::new(&self.sshd);
        cmd.args(["-D", "-e", "-f"]).arg(d.join("sshd_config"));
        let mut p = Spawned::spawn("sshd (SFTP)", cmd, &d.join("server.log"))?;
        let addr = self.addr();
        p.wait_ready(|| ssh_banner(addr))?;
        Ok(p)
    }
}

/// Reads the server's identification line, the first thing an SSH server
/// sends.
fn ssh_banner(addr: SocketAddr) -> std::result::Result<(), String> {
    use std::io::Read;
    let mut s = process::connect(addr)?;
    let mut buf = [0u8; 8];
    s.read_exact(&mut buf)
        .map_err(|e| format!("reading the SSH banner: {e}"))?;
    if &buf == b"SSH-2.0-" {
        Ok(())
    } else {
        Err(format!(
            "not an SSH banner: {:?}",
            String::from_utf8_lossy(&buf)
        ))
    }
}

/// sshd run as root refuses to start without its privilege-separation
/// directory; a fresh container may not have it.
fn ensure_privsep_dir() -> Result<()> {
    std::fs::create_dir_all(PRIVSEP_DIR).ctx(|| format!("creating {PRIVSEP_DIR} for sshd"))
}

/// The name of the user running the tests, the one sshd lets in.
fn current_user() -> Result<String> {
    let out = process::run(Command::new("id").arg("-un"))?;
    Ok(String::from_utf8_lossy(&out).trim().to_string())
}

impl RemoteServer for SftpServer {
    fn protocol(&self) -> &'static str {
        "sftp"
    }

    fn port(&self) -> u16 {
        self.port
    }

    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        self.store.put(key, data)
    }

    /// `sftp get` into a temporary file.
    fn fetch(&self, key: &str) -> Result<Vec<u8>> {
        super::check_key(key)?;
        let tmp = tempfile::NamedTempFile::new_in(self.dir.path())
            .ctx(|| "creating a file to fetch into".to_string())?;
        // sftp's batch syntax takes double-quoted paths.
        let quote = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
        self.sftp_batch(&format!(
            "get {} {}\n",
            quote(key),
            quote(&tmp.path().display().to_string())
        ))?;
        std::fs::read(tmp.path()).ctx(|| format!("reading the fetched {key}"))
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
