//! `musicfs-servers`: the real server fixtures of `musicfs-test-utils`
//! (SeaweedFS S3, OpenSSH SFTP, rclone WebDAV) for scripts (torture runs,
//! benchmarks), so Python drives the same servers the Rust tests use
//! instead of a second copy of their setup.
//!
//! `musicfs-servers s3|sftp|webdav [--put-tree PREFIX=DIR]...` starts the
//! server on free loopback ports, uploads each DIR under PREFIX ("" or
//! "." for the top) through the fixture's own client, prints one JSON line
//! on stdout with what a client needs (`ready: true`, the protocol, port,
//! pid, and per protocol the endpoint, bucket, region and keys; the URL,
//! user, ssh_config and key files; the URL, user and password), then
//! reads commands from stdin, one per line, each answered with one line:
//!
//! - `stop` — kills the server (and its connections); `ok` once its port
//!   is closed
//! - `start` — starts it again on the same port with the same data; `ok`
//!   once it answers
//! - `pid` — `ok PID` (or `ok -` while stopped)
//! - `via PORT` (SFTP) — adds the host key for `[127.0.0.1]:PORT` to the
//!   known_hosts and answers `ok PATH` with an ssh_config that connects to
//!   PORT, for clients that go through a proxy listening there
//!
//! Anything else answers `error: ...`. It stops the server and removes its
//! files when stdin closes, on SIGTERM or on SIGINT. A failure to start
//! prints `{"ready": false, "error": ...}` and exits 1.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc;

use clap::{Parser, ValueEnum};
use musicfs_test_utils::servers::{DavServer, RemoteServer, S3Server, SftpServer};
use serde_json::{json, Value};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Protocol {
    S3,
    Sftp,
    Webdav,
}

#[derive(Debug, Parser)]
#[command(
    name = "musicfs-servers",
    about = "Starts a real S3, SFTP or WebDAV server on loopback for scripts; \
             commands on stdin: stop, start, pid, via PORT"
)]
struct Cli {
    /// Which server to start.
    protocol: Protocol,
    /// Uploads the local DIR under PREFIX ("" or "." for the top); may be
    /// given several times.
    #[arg(long = "put-tree", value_name = "PREFIX=DIR")]
    put_tree: Vec<String>,
}

/// What ends the serving loop or acts on the server.
enum Event {
    Line(String),
    /// stdin closed, SIGTERM or SIGINT.
    Quit,
}

/// A started fixture of any protocol.
enum Server {
    S3(S3Server),
    Sftp(SftpServer),
    Dav(DavServer),
}

impl Server {
    fn start(protocol: Protocol) -> musicfs_test_utils::Result<Server> {
        Ok(match protocol {
            Protocol::S3 => Server::S3(S3Server::start()?),
            Protocol::Sftp => Server::Sftp(SftpServer::start()?),
            Protocol::Webdav => Server::Dav(DavServer::start()?),
        })
    }

    fn remote(&self) -> &dyn RemoteServer {
        match self {
            Server::S3(s) => s,
            Server::Sftp(s) => s,
            Server::Dav(s) => s,
        }
    }

    /// What a client needs, as one JSON object.
    fn describe(&self) -> Value {
        let r = self.remote();
        let mut v = json!({
            "ready": true,
            "protocol": r.protocol(),
            "port": r.port(),
            "pid": r.pid(),
        });
        let extra = match self {
            Server::S3(s) => json!({
                "endpoint": s.endpoint(),
                "bucket": s.bucket(),
                "region": s.region(),
                "access_key_id": s.access_key_id(),
                "secret_access_key": s.secret_access_key(),
                "rclone_remote": musicfs_test_utils::servers::s3::RCLONE_REMOTE,
                "rclone_env": s.rclone_env().into_iter().collect::<std::collections::BTreeMap<_, _>>(),
            }),
            Server::Sftp(s) => json!({
                "url": s.url(),
                "host": s.host(),
                "user": s.user(),
                "root": s.root(),
                "ssh_config": s.ssh_config(),
                "private_key": s.private_key(),
                "known_hosts": s.known_hosts(),
                "host_alias": musicfs_test_utils::servers::sftp::HOST_ALIAS,
            }),
            Server::Dav(s) => json!({
                "url": s.url(),
                "user": s.user(),
                "password": s.password(),
                "root": s.root(),
            }),
        };
        if let (Value::Object(v), Value::Object(extra)) = (&mut v, extra) {
            v.extend(extra);
        }
        v
    }

    /// Applies one stdin command; the text after `ok`, or what went wrong.
    fn command(&self, line: &str) -> Result<String, String> {
        let mut words = line.split_whitespace();
        let r = self.remote();
        match (words.next(), words.next(), words.next()) {
            (Some("stop"), None, _) => r.stop().map(|()| String::new()),
            (Some("start"), None, _) => r.start_again().map(|()| String::new()),
            (Some("pid"), None, _) => Ok(r.pid().map_or("-".to_string(), |p| p.to_string())),
            (Some("via"), Some(port), None) => {
                let Server::Sftp(s) = self else {
                    return Err("`via PORT` is for the SFTP server only".to_string());
                };
                let port: u16 = port
                    .parse()
                    .map_err(|_| format!("`via {port}`: not a port number"))?;
                s.ssh_config_via(port).map(|p| p.display().to_string())
            }
            _ => {
                return Err(format!(
                    "unknown command {line:?} (stop, start, pid, via PORT)"
                ))
            }
        }
        .map_err(|e| e.to_string())
    }
}

/// Splits `PREFIX=DIR`; "." means the top of the store.
fn parse_put_tree(arg: &str) -> Result<(String, PathBuf), String> {
    let (prefix, dir) = arg
        .split_once('=')
        .ok_or_else(|| format!("--put-tree {arg:?}: expected PREFIX=DIR"))?;
    let prefix = if prefix == "." { "" } else { prefix };
    let dir = PathBuf::from(dir);
    if !dir.is_dir() {
        return Err(format!(
            "--put-tree {arg:?}: {} is not a directory",
            dir.display()
        ));
    }
    Ok((prefix.to_string(), dir))
}

fn print_line(line: &str) {
    let mut out = std::io::stdout().lock();
    // A script that stopped reading our stdout cannot be told anything;
    // it still ends us by closing stdin or with SIGTERM.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn fail(why: &str) -> ExitCode {
    print_line(&json!({"ready": false, "error": why}).to_string());
    eprintln!("musicfs-servers: {why}");
    ExitCode::FAILURE
}

/// Forwards SIGTERM and SIGINT as [`Event::Quit`], from a thread of its
/// own, so the main thread can stop the server (by PID) before exiting.
fn watch_signals(tx: mpsc::Sender<Event>) -> Result<(), String> {
    use tokio::signal::unix::{signal, SignalKind};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime for signals: {e}"))?;
    // Registered here, before the server starts, so a SIGTERM that comes
    // at any later moment is caught rather than killing us with the
    // server left running.
    let (mut term, mut int) = rt
        .block_on(async {
            Ok::<_, std::io::Error>((
                signal(SignalKind::terminate())?,
                signal(SignalKind::interrupt())?,
            ))
        })
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    std::thread::spawn(move || {
        rt.block_on(async {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        });
        let _ = tx.send(Event::Quit);
    });
    Ok(())
}

fn read_stdin(tx: mpsc::Sender<Event>) {
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(Event::Line(line)).is_err() {
                return;
            }
        }
        let _ = tx.send(Event::Quit);
    });
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let trees = match cli
        .put_tree
        .iter()
        .map(|a| parse_put_tree(a))
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(t) => t,
        Err(e) => return fail(&e),
    };
    let (tx, rx) = mpsc::channel();
    if let Err(e) = watch_signals(tx.clone()) {
        return fail(&e);
    }
    let server = match Server::start(cli.protocol) {
        Ok(s) => s,
        Err(e) => return fail(&format!("starting the server: {e}")),
    };
    for (prefix, dir) in &trees {
        if let Err(e) = server.remote().put_tree(prefix, dir) {
            return fail(&format!("uploading {} to {prefix:?}: {e}", dir.display()));
        }
    }
    print_line(&server.describe().to_string());
    read_stdin(tx);
    while let Ok(Event::Line(line)) = rx.recv() {
        if line.trim().is_empty() {
            continue;
        }
        match server.command(&line) {
            Ok(text) if text.is_empty() => print_line("ok"),
            Ok(text) => print_line(&format!("ok {text}")),
            Err(e) => print_line(&format!("error: {}", e.replace('\n', " | "))),
        }
    }
    // Dropping the fixture stops the server by PID and removes its files.
    drop(server);
    ExitCode::SUCCESS
}
