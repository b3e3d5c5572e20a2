//! The server fixtures against real clients: each starts, answers a real
//! request, serves what the fixture wrote, survives stop/start_again with
//! its data, and closes its port when dropped.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use musicfs_test_utils::servers::{http_request, RemoteServer};
use musicfs_test_utils::{pseudo_random_bytes, DavServer, FixtureError, S3Server, SftpServer};

/// Whether something accepts connections on `addr`.
fn port_open(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok()
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The stop/start_again/drop cycle every fixture must honour: stopped
/// means the process is gone and the port closed, started again means the
/// same port serves the same data (`key` still reads as `data`), dropped
/// means the port is closed for good.
fn stop_start_drop(server: impl RemoteServer, key: &str, data: &[u8]) {
    let port = server.port();
    assert!(server.is_running());
    assert_eq!(server.fetch(key).unwrap(), data);
    let pid = server.pid().unwrap();
    server.stop().unwrap();
    assert!(!server.is_running());
    assert_eq!(server.pid(), None);
    assert!(
        !port_open(addr(port)),
        "{} port open after stop",
        server.protocol()
    );
    assert!(server.fetch(key).is_err(), "a stopped server answered");
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    assert!(
        stat.is_empty() || stat.contains(") Z"),
        "server {pid} alive: {stat}"
    );
    server.start_again().unwrap();
    assert!(server.is_running());
    assert_eq!(server.port(), port);
    assert_ne!(server.pid(), Some(pid));
    assert_eq!(server.fetch(key).unwrap(), data);
    drop(server);
    assert!(!port_open(addr(port)), "port open after drop");
}

#[test]
fn s3_server_answers_signed_requests_and_refuses_anonymous_ones() {
    let s3 = S3Server::start().unwrap();
    let data = pseudo_random_bytes(3 << 20, 7);
    s3.put("Artist/Album/01 - Track.flac", &data).unwrap();
    s3.put("top.txt", b"hello").unwrap();
    assert_eq!(
        s3.list("").unwrap(),
        vec!["Artist/Album/01 - Track.flac", "top.txt"]
    );
    assert_eq!(s3.fetch("Artist/Album/01 - Track.flac").unwrap(), data);

    // Anonymous requests are refused: the credential is real.
    let anon = http_request(s3.addr(), "GET", "/music/top.txt", &[], b"").unwrap();
    assert_eq!(anon.status, 403, "{}", anon.text());

    // Wrong secret: a signed request that must fail.
    let mut wrong = s3.rclone();
    wrong
        .env(
            "RCLONE_CONFIG_MUSICFS_S3_SECRET_ACCESS_KEY",
            "not-the-secret",
        )
        .arg("lsf")
        .arg(s3.rclone_bucket());
    assert!(!wrong.output().unwrap().status.success());

    // Overwrite and delete.
    s3.put("top.txt", b"hello again").unwrap();
    assert_eq!(s3.fetch("top.txt").unwrap(), b"hello again");
    s3.delete("top.txt").unwrap();
    assert_eq!(s3.list("").unwrap(), vec!["Artist/Album/01 - Track.flac"]);

    // A single-part PUT: the ETag is the MD5 of the bytes.
    let out = s3
        .rclone()
        .args(["md5sum", "--download"])
        .arg(s3.rclone_bucket())
        .output()
        .unwrap();
    let download_md5 = String::from_utf8_lossy(&out.stdout).to_string();
    let out = s3
        .rclone()
        .arg("md5sum")
        .arg(s3.rclone_bucket())
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), download_md5);

    stop_start_drop(s3, "Artist/Album/01 - Track.flac", &data);
}

#[test]
fn s3_data_survives_a_restart_and_two_servers_run_side_by_side() {
    let a = S3Server::start().unwrap();
    let b = S3Server::start_with_bucket("other").unwrap();
    assert_ne!(a.port(), b.port());
    a.put("x", b"from a").unwrap();
    b.put("x", b"from b").unwrap();
    let tree = tempfile::tempdir().unwrap();
    musicfs_test_utils::write_file(tree.path(), "d/one.bin", &pseudo_random_bytes(1000, 1))
        .unwrap();
    musicfs_test_utils::write_file(tree.path(), "two.bin", b"2").unwrap();
    b.put_tree("pre", tree.path()).unwrap();
    assert_eq!(
        b.list("").unwrap(),
        vec!["pre/d/one.bin", "pre/two.bin", "x"]
    );

    a.stop().unwrap();
    // The other server is untouched by its neighbour's stop.
    assert_eq!(b.fetch("x").unwrap(), b"from b");
    let err = a.fetch("x").unwrap_err();
    assert!(matches!(err, FixtureError::Command { .. }), "{err}");
    a.start_again().unwrap();
    assert_eq!(a.fetch("x").unwrap(), b"from a");
    stop_start_drop(b, "pre/d/one.bin", &pseudo_random_bytes(1000, 1));
}

#[test]
fn sftp_server_serves_the_directory_by_key_and_checks_host_keys() {
    let sftp = SftpServer::start().unwrap();
    let data = pseudo_random_bytes(200_000, 9);
    sftp.put("Album/01.flac", &data).unwrap();
    sftp.put("top.txt", b"hi").unwrap();

    let listing = sftp.sftp_batch("ls -1 Album\nls -1\n").unwrap();
    assert!(listing.contains("Album/01.flac"), "{listing}");
    assert!(listing.contains("top.txt"), "{listing}");

    assert_eq!(sftp.fetch("Album/01.flac").unwrap(), data);
    sftp.put("dir with space/q\"uote.bin", b"odd").unwrap();
    assert_eq!(sftp.fetch("dir with space/q\"uote.bin").unwrap(), b"odd");

    // The absolute path of root is the SFTP path too.
    let abs = sftp
        .sftp_batch(&format!("ls -1 {}/Album\n", sftp.root().display()))
        .unwrap();
    assert!(abs.contains("01.flac"), "{abs}");

    // A changed host key and an unknown host are refused.
    for kh in [sftp.wrong_known_hosts(), sftp.empty_known_hosts()] {
        let cfg = sftp.ssh_config_with_known_hosts(&kh).unwrap();
        let err = sftp.sftp_batch_with_config(&cfg, "ls\n").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("Host key verification failed")
                || msg.contains("REMOTE HOST IDENTIFICATION HAS CHANGED")
                || msg.contains("No ED25519 host key is known"),
            "{msg}"
        );
    }

    // The url names user, port and root.
    assert_eq!(
        sftp.url(),
        format!(
            "sftp://{}@127.0.0.1:{}{}",
            sftp.user(),
            sftp.port(),
            sftp.root().display()
        )
    );

    stop_start_drop(sftp, "Album/01.flac", &data);
}

#[test]
fn sftp_restart_keeps_host_key_and_kills_open_sessions() {
    let sftp = SftpServer::start().unwrap();
    sftp.put("a.txt", b"a").unwrap();
    // An open session: sftp waiting on stdin.
    let sftp_bin = musicfs_test_utils::servers::ssh_client_binary("sftp").unwrap();
    let mut session = Command::new(sftp_bin)
        .arg("-F")
        .arg(sftp.ssh_config())
        .args(["-b", "-", musicfs_test_utils::servers::sftp::HOST_ALIAS])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the session to be up: the server's child for it appears.
    let pid = sftp.pid().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !has_child(pid) {
        assert!(std::time::Instant::now() < deadline, "no session child");
        std::thread::sleep(Duration::from_millis(10));
    }
    sftp.stop().unwrap();
    // The client sees its connection end: it exits on its own.
    let status = session.wait().unwrap();
    assert!(!status.success());
    sftp.start_again().unwrap();
    // Same host key: the same known_hosts still works.
    let listing = sftp.sftp_batch("ls -1\n").unwrap();
    assert!(listing.contains("a.txt"), "{listing}");
}

fn has_child(pid: u32) -> bool {
    std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
        std::fs::read_to_string(e.path().join("stat")).is_ok_and(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1).map(str::to_string))
                == Some(pid.to_string())
        })
    })
}

#[test]
fn webdav_server_answers_propfind_and_serves_written_files() {
    let dav = DavServer::start().unwrap();
    let data = pseudo_random_bytes(100_000, 5);
    dav.put("Album/01.flac", &data).unwrap();

    let r = dav.propfind("/", 1).unwrap();
    assert_eq!(r.status, 207);
    assert!(r.text().contains("/Album/"), "{}", r.text());
    let r = dav.propfind("/Album/", 1).unwrap();
    assert!(r.text().contains("/Album/01.flac"), "{}", r.text());
    assert!(
        r.text().contains("<D:getcontentlength>100000<"),
        "{}",
        r.text()
    );

    let get = dav.request("GET", "/Album/01.flac", &[]).unwrap();
    assert_eq!(get.status, 200);
    assert_eq!(get.body, data);
    let etag = get.header("etag").unwrap().to_string();

    // A rewrite is served at once, with a new ETag.
    dav.put("Album/01.flac", &pseudo_random_bytes(100_001, 6))
        .unwrap();
    let get = dav.request("GET", "/Album/01.flac", &[]).unwrap();
    assert_eq!(get.body, pseudo_random_bytes(100_001, 6));
    assert_ne!(get.header("etag").unwrap(), etag);

    // A range request gets a range.
    let part = dav
        .request("GET", "/Album/01.flac", &[("Range", "bytes=10-19")])
        .unwrap();
    assert_eq!(part.status, 206);
    assert_eq!(part.body, pseudo_random_bytes(100_001, 6)[10..20].to_vec());

    // No password, no answer.
    let anon = http_request(dav.addr(), "PROPFIND", "/", &[("Depth", "0")], b"").unwrap();
    assert_eq!(anon.status, 401);

    dav.delete("Album/01.flac").unwrap();
    let r = dav.propfind("/Album/", 1).unwrap();
    assert!(!r.text().contains("01.flac"), "{}", r.text());
    dav.put("dir with space/ü.txt", b"kept").unwrap();
    assert_eq!(dav.url(), format!("http://127.0.0.1:{}/", dav.port()));
    stop_start_drop(dav, "dir with space/ü.txt", b"kept");
}

#[test]
fn webdav_etags_can_be_content_hashes() {
    let dav = DavServer::start_with_etag_hash("MD5").unwrap();
    dav.put("kept.txt", b"kept").unwrap();
    let get = dav.request("GET", "/kept.txt", &[]).unwrap();
    assert_eq!(get.body, b"kept");
    let local = dav.root().join("kept.txt");
    let md5 = Command::new("md5sum").arg(&local).output().unwrap();
    let md5 = String::from_utf8(md5.stdout).unwrap();
    let md5 = md5.split_whitespace().next().unwrap();
    assert_eq!(get.header("etag"), Some(format!("\"{md5}\"").as_str()));
}

#[test]
fn each_server_answers_through_the_fault_injecting_proxy() {
    use musicfs_test_utils::{Mode, Proxy, ProxyConfig};
    let via = |upstream: SocketAddr| {
        Proxy::start_background(
            upstream,
            ProxyConfig {
                delay: Duration::from_millis(10),
                ..ProxyConfig::default()
            },
        )
        .unwrap()
    };
    let data = pseudo_random_bytes(300_000, 11);

    // S3: rclone signs for the proxy's host:port, the server checks it.
    let s3 = S3Server::start().unwrap();
    s3.put("a.bin", &data).unwrap();
    let p = via(s3.addr());
    let out = s3
        .rclone()
        .env(
            "RCLONE_CONFIG_MUSICFS_S3_ENDPOINT",
            format!("http://{}", p.addr()),
        )
        .arg("cat")
        .arg(format!("{}/a.bin", s3.rclone_bucket()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout == data);
    assert!(p.stats().bytes_down >= data.len() as u64);

    // SFTP: the client checks the host key under the proxy's port.
    let sftp = SftpServer::start().unwrap();
    sftp.put("a.bin", &data).unwrap();
    let p = via(sftp.addr());
    let cfg = sftp.ssh_config_via(p.addr().port()).unwrap();
    let listing = sftp.sftp_batch_with_config(&cfg, "ls -l a.bin\n").unwrap();
    assert!(listing.contains("300000"), "{listing}");
    assert!(p.stats().accepted >= 1);
    // With the proxy refusing, the same command fails.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(p.set_mode(Mode::Refuse)).unwrap();
    assert!(sftp.sftp_batch_with_config(&cfg, "ls\n").is_err());

    // WebDAV.
    let dav = DavServer::start().unwrap();
    dav.put("a.bin", &data).unwrap();
    let p = via(dav.addr());
    let auth = musicfs_test_utils::servers::basic_auth(dav.user(), dav.password());
    let get = http_request(p.addr(), "GET", "/a.bin", &[("Authorization", &auth)], b"").unwrap();
    assert_eq!(get.status, 200);
    assert!(get.body == data);
}
