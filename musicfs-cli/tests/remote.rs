//! `musicfs mount` of remote origins, end to end: the real binary, a real
//! FUSE mount and real servers on loopback (SeaweedFS for S3, OpenSSH
//! `sshd` for SFTP, `rclone serve webdav`), started and stopped by each
//! test. What a user relies on: the library reads byte for byte and
//! decodes; a file changed on the server is served new to the next open;
//! with the server gone the cached tree and bytes keep being served while
//! an uncached read fails with EIO (never ENOENT) and `status` says why;
//! the origin rejoins by itself; and no secret shows in the log, `status`
//! or the mount record.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

#[path = "support/daemon.rs"]
mod daemon;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use daemon::{status, wait_until, Daemon};
use musicfs_test_utils::servers::{DavServer, RemoteServer, S3Server, SftpServer};
use musicfs_test_utils::{library_files, make_library, LibrarySpec};
use tempfile::TempDir;

/// The origin's name under the mount.
const NAME: &str = "music";

/// How one protocol's origin is configured.
struct Remote<'a> {
    server: &'a dyn RemoteServer,
    url: String,
    /// Extra lines of the `[origin.music]` table.
    table: String,
    env: Vec<(&'static str, String)>,
    /// Strings that must never be shown (passwords, secret keys).
    secrets: Vec<String>,
}

fn read(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut f = std::fs::File::open(path)?;
    let mut out = Vec::new();
    f.read_to_end(&mut out)?;
    Ok(out)
}

fn origin_state(cache: &Path) -> String {
    status(cache)["origins"][0]["state"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Writes the config file for `remote` and mounts it.
fn mount(remote: &Remote, dir: &TempDir, extra: &[&str]) -> (Daemon, PathBuf, PathBuf) {
    let mp = dir.path().join("mnt");
    let cache = dir.path().join("cache");
    std::fs::create_dir_all(&mp).unwrap();
    let cfg = dir.path().join("musicfs.toml");
    std::fs::write(
        &cfg,
        format!(
            "[origin.{NAME}]\nurl = \"{}\"\ntimeout = 3\n{}\n",
            remote.url, remote.table
        ),
    )
    .unwrap();
    let mut args = vec![
        "--config",
        cfg.to_str().unwrap(),
        "--read-timeout",
        "8",
        "--health-timeout",
        "2",
        "--freshness",
        "0",
    ];
    args.extend_from_slice(extra);
    let d = Daemon::start_with_env(&mp, &cache, &args, &remote.env);
    (d, mp, cache)
}

/// The whole user story against one server.
fn plays_changes_and_survives_the_server(remote: Remote) {
    let lib = make_library(&LibrarySpec::default()).unwrap();
    remote.server.put_tree("lib", &lib).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (mut d, mp, cache) = mount(&remote, &dir, &[]);
    let root = mp.join(NAME);

    // Every file but one reads byte for byte; that one stays uncached.
    let files = library_files(&lib);
    assert!(files.len() >= 4, "library too small: {files:?}");
    let (uncached, cached) = files.split_last().unwrap();
    for rel in cached {
        let want = std::fs::read(lib.join(rel)).unwrap();
        let got = read(&root.join(rel)).unwrap_or_else(|e| {
            panic!("{}: {e}\n{}", rel.display(), d.log.all());
        });
        assert!(
            got == want,
            "{}: wrong bytes through the mount",
            rel.display()
        );
    }
    let flac = cached
        .iter()
        .find(|p| p.extension().is_some_and(|e| e == "flac"))
        .expect("a FLAC track");
    let t = Command::new("flac")
        .args(["-t", "-s"])
        .arg(root.join(flac))
        .output()
        .unwrap();
    assert!(t.status.success(), "flac -t: {t:?}");

    // A file rewritten on the server is served new at the next open
    // (--freshness 0), whole and of one version.
    let changed = &cached[0];
    let key = format!("lib/{}", changed.to_str().unwrap());
    let mut new = std::fs::read(lib.join(changed)).unwrap();
    new.extend_from_slice(b"-- a second version, longer than the first --");
    new[0] ^= 0xff;
    remote.server.put(&key, &new).unwrap();
    wait_until("the new version through the mount", || {
        read(&root.join(changed)).is_ok_and(|b| b == new)
    });

    // The server goes away: cached bytes and the tree stay, the uncached
    // file fails with EIO (the origin is down; the file is not gone).
    remote.server.stop().unwrap();
    for rel in &cached[1..] {
        let want = std::fs::read(lib.join(rel)).unwrap();
        let got = read(&root.join(rel))
            .unwrap_or_else(|e| panic!("cached {} with the server down: {e}", rel.display()));
        assert!(got == want, "{}: wrong cached bytes", rel.display());
    }
    assert_eq!(read(&root.join(changed)).unwrap(), new);
    let names: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(!names.is_empty(), "the cached tree vanished");
    let err = read(&root.join(uncached)).expect_err("uncached read with the server down");
    assert_eq!(
        err.raw_os_error(),
        Some(libc::EIO),
        "uncached read with the server down: {err}"
    );
    wait_until("status to call the origin unhealthy", || {
        origin_state(&cache) == "unhealthy"
    });
    let st = status(&cache);
    let why = st["origins"][0]["last_error"].as_str().unwrap_or_default();
    assert!(!why.is_empty(), "status says no reason: {st}");

    // Back again: it rejoins without a remount.
    remote.server.start_again().unwrap();
    let want = std::fs::read(lib.join(uncached)).unwrap();
    wait_until("the uncached file once the server is back", || {
        read(&root.join(uncached)).is_ok_and(|b| b == want)
    });
    wait_until("status to call the origin healthy", || {
        origin_state(&cache) == "healthy"
    });

    // No secret anywhere a user or a log collector looks.
    let st = status(&cache).to_string();
    let record = std::fs::read_to_string(cache.join("mount.json")).unwrap();
    d.stop();
    let log = d.log.all();
    for s in &remote.secrets {
        assert!(!log.contains(s.as_str()), "a secret in the log:\n{log}");
        assert!(!st.contains(s.as_str()), "a secret in status: {st}");
        assert!(
            !record.contains(s.as_str()),
            "a secret in mount.json: {record}"
        );
    }
}

#[test]
fn s3_library_plays_changes_and_survives_the_server() {
    let s3 = S3Server::start().unwrap();
    let secret = s3.secret_access_key().to_owned();
    let remote = Remote {
        server: &s3,
        url: format!("s3://{}/lib", s3.bucket()),
        table: format!(
            "endpoint = \"{}\"\nregion = \"{}\"",
            s3.endpoint(),
            s3.region()
        ),
        env: vec![
            ("AWS_ACCESS_KEY_ID", s3.access_key_id().to_owned()),
            ("AWS_SECRET_ACCESS_KEY", secret.clone()),
        ],
        secrets: vec![secret],
    };
    plays_changes_and_survives_the_server(remote);
}

#[test]
fn webdav_library_plays_changes_and_survives_the_server() {
    let dav = DavServer::start().unwrap();
    let password = dav.password().to_owned();
    let remote = Remote {
        server: &dav,
        url: format!("dav://{}/lib", dav.addr()),
        table: format!("user = \"{}\"\npassword = \"{password}\"", dav.user()),
        env: vec![],
        secrets: vec![password],
    };
    plays_changes_and_survives_the_server(remote);
}

#[test]
fn sftp_library_plays_changes_and_survives_the_server() {
    let sftp = SftpServer::start().unwrap();
    let remote = Remote {
        server: &sftp,
        url: format!("{}/lib", sftp.url()),
        table: format!("ssh_config = \"{}\"", sftp.ssh_config().display()),
        env: vec![],
        secrets: vec![],
    };
    plays_changes_and_survives_the_server(remote);
}

/// Starts a mount that must refuse to start; its one-line reason.
fn refused(remote: &Remote) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mp = dir.path().join("mnt");
    std::fs::create_dir_all(&mp).unwrap();
    let cfg = dir.path().join("musicfs.toml");
    std::fs::write(
        &cfg,
        format!(
            "[origin.{NAME}]\nurl = \"{}\"\n{}\n",
            remote.url, remote.table
        ),
    )
    .unwrap();
    let out = Command::new(daemon::BIN)
        .arg("mount")
        .arg(&mp)
        .arg("--cache-dir")
        .arg(dir.path().join("cache"))
        .arg("--config")
        .arg(&cfg)
        .envs(remote.env.iter().map(|(k, v)| (*k, v.as_str())))
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert!(!out.status.success(), "mounted anyway: {out:?}");
    assert!(!daemon::is_mounted(&mp), "left a mount behind");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for s in &remote.secrets {
        assert!(
            !text.contains(s.as_str()),
            "a secret in the output:\n{text}"
        );
    }
    text
}

/// Bad credentials with nothing cached are a clear refusal to start that
/// names the cause, never an empty library; the wrong password is shown
/// nowhere.
#[test]
fn webdav_wrong_password_is_access_denied() {
    let dav = DavServer::start().unwrap();
    let lib = make_library(&LibrarySpec::default()).unwrap();
    dav.put_tree("lib", &lib).unwrap();
    let wrong = "not-the-password-5926".to_owned();
    let text = refused(&Remote {
        server: &dav,
        url: format!("dav://{}/lib", dav.addr()),
        table: format!("user = \"{}\"\npassword = \"{wrong}\"", dav.user()),
        env: vec![],
        secrets: vec![wrong.clone()],
    });
    assert!(text.contains("access denied"), "{text}");
}

/// A server whose host key is not the one known is refused, never trusted
/// on first use.
#[test]
fn sftp_changed_host_key_is_refused() {
    let sftp = SftpServer::start().unwrap();
    let lib = make_library(&LibrarySpec::default()).unwrap();
    sftp.put_tree("lib", &lib).unwrap();
    let cfg = sftp
        .ssh_config_with_known_hosts(&sftp.wrong_known_hosts())
        .unwrap();
    let text = refused(&Remote {
        server: &sftp,
        url: format!("{}/lib", sftp.url()),
        table: format!("ssh_config = \"{}\"", cfg.display()),
        env: vec![],
        secrets: vec![],
    });
    assert!(text.to_ascii_lowercase().contains("host key"), "{text}");
}

/// Credentials that go bad while the library is cached (a revoked key):
/// the mount keeps serving the cache, an uncached read is EACCES (not an
/// empty library, not ENOENT), and status says access denied.
#[test]
fn s3_revoked_credentials_keep_the_cache_and_say_access_denied() {
    let s3 = S3Server::start().unwrap();
    let lib = make_library(&LibrarySpec::default()).unwrap();
    s3.put_tree("lib", &lib).unwrap();
    let mut remote = Remote {
        server: &s3,
        url: format!("s3://{}/lib", s3.bucket()),
        table: format!(
            "endpoint = \"{}\"\nregion = \"{}\"",
            s3.endpoint(),
            s3.region()
        ),
        env: vec![
            ("AWS_ACCESS_KEY_ID", s3.access_key_id().to_owned()),
            ("AWS_SECRET_ACCESS_KEY", s3.secret_access_key().to_owned()),
        ],
        secrets: vec![],
    };
    let dir = tempfile::tempdir().unwrap();
    let files = library_files(&lib);
    let (uncached, cached) = files.split_last().unwrap();
    {
        let (mut d, mp, _) = mount(&remote, &dir, &[]);
        let want = std::fs::read(lib.join(&cached[0])).unwrap();
        assert_eq!(read(&mp.join(NAME).join(&cached[0])).unwrap(), want);
        // The listing of every directory on the way to the uncached file.
        let parent = mp.join(NAME).join(uncached.parent().unwrap());
        assert!(std::fs::read_dir(&parent).unwrap().count() > 0);
        d.stop();
    }
    let wrong = "revoked-secret-7731".to_owned();
    remote.env[1].1 = wrong.clone();
    remote.secrets = vec![wrong.clone()];
    let (mut d, mp, cache) = mount(&remote, &dir, &[]);
    let want = std::fs::read(lib.join(&cached[0])).unwrap();
    assert_eq!(read(&mp.join(NAME).join(&cached[0])).unwrap(), want);
    let err = read(&mp.join(NAME).join(uncached)).expect_err("uncached read, revoked key");
    assert_eq!(err.raw_os_error(), Some(libc::EACCES), "{err}");
    wait_until("status to say access denied", || {
        status(&cache)["origins"][0]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("access denied"))
    });
    let st = status(&cache).to_string();
    d.stop();
    assert!(!d.log.all().contains(&wrong), "the secret in the log");
    assert!(!st.contains(&wrong), "the secret in status");
}
