//! The SFTP origin against a real OpenSSH `sshd` (started per test), reached
//! through the system `ssh` with the fixture's ssh_config: port, user,
//! identity and a known_hosts file with `StrictHostKeyChecking yes`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

#[path = "support/counting_proxy.rs"]
mod counting_proxy;
#[path = "support/remote.rs"]
mod remote;

use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use counting_proxy::CountingProxy;

use musicfs_origins::{
    EntryKind, Origin, OriginError, OriginId, OriginPath, RemoteOrigin, RemoteSettings, RemoteSpec,
    TimeoutOrigin,
};
use musicfs_test_utils::{RemoteServer, SftpServer};
use remote::{blocking, data, p};

async fn start() -> Arc<SftpServer> {
    Arc::new(blocking(|| SftpServer::start().unwrap()).await)
}

async fn origin_with(server: &SftpServer, settings: RemoteSettings) -> RemoteOrigin {
    let mut spec = RemoteSpec::parse(&server.url()).unwrap();
    spec.settings = settings;
    RemoteOrigin::connect(OriginId::new("nas").unwrap(), spec)
        .await
        .unwrap()
}

async fn origin(server: &SftpServer) -> RemoteOrigin {
    origin_with(
        server,
        RemoteSettings {
            ssh_config: Some(server.ssh_config()),
            ..RemoteSettings::default()
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_stats_and_reads_the_directory() {
    let server = start().await;
    remote::put_tree(server.clone()).await;
    let o = origin(&server).await;
    o.health().await.unwrap();
    remote::check_tree(&o).await;
    remote::check_not_found(&o).await;
    // SFTP ETags do not exist: the version is size and mtime.
    assert_eq!(o.stat(&p("lib/a.flac")).await.unwrap().etag, None);
    assert_eq!(
        o.whole_digest(
            &p("lib/a.flac"),
            &o.stat(&p("lib/a.flac")).await.unwrap().version()
        ),
        None
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_leave_out_dot_entries_and_symlinks() {
    let server = start().await;
    let root = server.root().to_owned();
    std::fs::create_dir_all(root.join("d/sub")).unwrap();
    std::fs::write(root.join("d/real.flac"), data(1, 100)).unwrap();
    std::os::unix::fs::symlink("real.flac", root.join("d/link.flac")).unwrap();
    std::os::unix::fs::symlink("/etc", root.join("d/escape")).unwrap();
    let o = origin(&server).await;
    let mut names: Vec<_> = o
        .list(&p("d"))
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.name.to_string_lossy().into_owned(), e.meta.kind))
        .collect();
    names.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        names,
        vec![
            ("real.flac".into(), EntryKind::File),
            ("sub".into(), EntryKind::Dir)
        ]
    );
    for link in ["d/escape", "d/link.flac"] {
        let e = o.stat(&p(link)).await.unwrap_err();
        assert!(e.is_not_found(), "{link}: {e}");
    }
    assert!(o.list(&p("d/sub")).await.unwrap().is_empty());
}

/// openssh-sftp-client decodes names as UTF-8: a directory holding a
/// Latin-1 name cannot be listed. It must fail as a retryable error (never
/// a panic, never a silently short listing) and leave the origin working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_that_is_not_utf8_fails_its_listing_without_harm() {
    let server = start().await;
    let root = server.root().to_owned();
    std::fs::create_dir_all(root.join("latin")).unwrap();
    std::fs::create_dir_all(root.join("fine")).unwrap();
    std::fs::write(root.join("fine/a.flac"), data(1, 10)).unwrap();
    let latin1 = std::ffi::OsStr::from_bytes(b"Bj\xf6rk.flac");
    std::fs::write(root.join("latin").join(latin1), data(2, 50)).unwrap();
    let o = origin(&server).await;
    let e = o.list(&p("latin")).await.unwrap_err();
    assert!(e.is_retryable() && !e.is_not_found(), "{e}");
    // Such a path is refused before any request, not reported missing.
    let path = OriginPath::from_bytes(b"latin/Bj\xf6rk.flac").unwrap();
    let e = o.stat(&path).await.unwrap_err();
    assert!(matches!(e, OriginError::Unsupported { .. }), "{e}");
    let v = musicfs_origins::FileVersion {
        size: 50,
        mtime_ns: None,
        etag: None,
    };
    let e = o.read_range(&path, &v, 0, 50).await.unwrap_err();
    assert!(matches!(e, OriginError::Unsupported { .. }), "{e}");
    // The next call reconnects.
    assert_eq!(o.list(&p("fine")).await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overwritten_file_is_changed_never_mixed() {
    let server = start().await;
    let o = origin(&server).await;
    remote::check_changed(&o, server.clone(), true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_rewritten_in_place_under_an_open_handle_is_changed() {
    let server = start().await;
    let key = "inplace.flac";
    let old = data(20, 300_000);
    {
        let (s, o) = (server.clone(), old.clone());
        blocking(move || s.put(key, &o).unwrap()).await;
    }
    let o = origin(&server).await;
    let v1 = o.stat(&p(key)).await.unwrap().version();
    // The handle for v1 is now open and kept.
    assert_eq!(
        o.read_range(&p(key), &v1, 0, 10).await.unwrap()[..],
        old[..10]
    );
    let v1_secs = v1.mtime_ns.unwrap() / 1_000_000_000;
    remote::wait_for("the next second", || async {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        (now > v1_secs).then_some(())
    })
    .await;
    {
        let s = server.clone();
        blocking(move || s.rewrite_in_place(key, &data(21, 300_000)).unwrap()).await;
    }
    let e = o.read_range(&p(key), &v1, 1000, 100_000).await.unwrap_err();
    assert!(e.is_changed(), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_or_changed_host_keys_are_refused() {
    let server = start().await;
    remote::put_tree(server.clone()).await;
    for known_hosts in [server.empty_known_hosts(), server.wrong_known_hosts()] {
        let o = origin_with(
            &server,
            RemoteSettings {
                ssh_config: Some(server.ssh_config()),
                known_hosts: Some(known_hosts.clone()),
                ..RemoteSettings::default()
            },
        )
        .await;
        for err in [
            o.health().await.unwrap_err(),
            o.stat(&p("lib/a.flac")).await.unwrap_err(),
            o.list(&OriginPath::root()).await.unwrap_err(),
        ] {
            assert!(
                matches!(err, OriginError::AccessDenied { .. }),
                "{}: {err}",
                known_hosts.display()
            );
            assert!(!err.is_retryable());
            assert!(err.to_string().contains("host key"), "{err}");
        }
        // Strict means strict: the refused key was not added either.
        let text = std::fs::read_to_string(&known_hosts).unwrap();
        if known_hosts == server.empty_known_hosts() {
            assert!(text.is_empty(), "the key was added: {text}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_origin_reconnects_after_sshd_restarts() {
    let server = start().await;
    remote::put_tree(server.clone()).await;
    let o = Arc::new(origin(&server).await);
    remote::check_offline_and_back(o, server.clone()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_origin_starts_while_sshd_is_down() {
    let server = start().await;
    remote::put_tree(server.clone()).await;
    {
        let s = server.clone();
        blocking(move || s.stop().unwrap()).await;
    }
    let o = origin(&server).await;
    let e = o.health().await.unwrap_err();
    assert!(matches!(e, OriginError::Unavailable { .. }), "{e}");
    {
        let s = server.clone();
        blocking(move || s.start_again().unwrap()).await;
    }
    remote::wait_for("sshd", || async { o.health().await.ok() }).await;
    assert_eq!(o.stat(&p("lib/Album/02.flac")).await.unwrap().size, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_connection_is_replaced_after_a_timeout() {
    let server = start().await;
    remote::put_tree(server.clone()).await;
    let proxy = CountingProxy::start(server.addr(), b"").await;
    // Through the proxy's port, checking the server's real host key.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ssh_config");
    std::fs::write(
        &config,
        format!(
            "Host 127.0.0.1\n  User {user}\n  IdentityFile {key}\n  IdentitiesOnly yes\n  \
             UserKnownHostsFile {kh}\n  GlobalKnownHostsFile /dev/null\n  \
             StrictHostKeyChecking yes\n  HostKeyAlias [127.0.0.1]:{port}\n  LogLevel ERROR\n",
            user = server.user(),
            key = server.private_key().display(),
            kh = server.known_hosts().display(),
            port = server.addr().port(),
        ),
    )
    .unwrap();
    let url = format!(
        "sftp://{}@{}{}",
        server.user(),
        proxy.addr,
        server.root().display()
    );
    let mut spec = RemoteSpec::parse(&url).unwrap();
    spec.settings = RemoteSettings {
        ssh_config: Some(config),
        ..RemoteSettings::default()
    };
    let o = RemoteOrigin::connect(OriginId::new("nas").unwrap(), spec)
        .await
        .unwrap();
    let bounded = TimeoutOrigin::new(Arc::new(o), Duration::from_secs(2));
    let meta = bounded.stat(&p("lib/a.flac")).await.unwrap();
    assert_eq!(proxy.connections(), 1);
    proxy.set_blackhole(true);
    let e = bounded
        .read_range(&p("lib/a.flac"), &meta.version(), 0, 4096)
        .await
        .unwrap_err();
    assert!(matches!(e, OriginError::Timeout { .. }), "{e}");
    proxy.set_blackhole(false);
    let back = Instant::now();
    let got = remote::wait_for("a read on a fresh connection", || async {
        bounded
            .read_range(&p("lib/a.flac"), &meta.version(), 0, 4096)
            .await
            .ok()
    })
    .await;
    eprintln!(
        "recovered {:?} after the blackhole ended, {} connections",
        back.elapsed(),
        proxy.connections()
    );
    assert_eq!(got[..], data(1, 300_001)[..4096]);
    assert_eq!(proxy.connections(), 2, "one new connection, not a storm");
}
