//! The WebDAV origin against a real WebDAV server (`rclone serve webdav`,
//! started per test) with basic auth.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

#[path = "support/remote.rs"]
mod remote;

use std::sync::Arc;

use musicfs_origins::{
    Origin, OriginError, OriginId, OriginPath, RemoteOrigin, RemoteSettings, RemoteSpec, Secret,
};
use musicfs_test_utils::{DavServer, RemoteServer};
use remote::{blocking, p};

async fn start() -> Arc<DavServer> {
    Arc::new(blocking(|| DavServer::start().unwrap()).await)
}

fn url(server: &DavServer) -> String {
    format!("dav://{}/", server.addr())
}

async fn origin_with(server: &DavServer, password: &str) -> RemoteOrigin {
    let mut spec = RemoteSpec::parse(&url(server)).unwrap();
    spec.settings = RemoteSettings {
        user: Some(server.user().to_owned()),
        password: Some(Secret::new(password)),
        ..RemoteSettings::default()
    };
    RemoteOrigin::connect(OriginId::new("dav").unwrap(), spec)
        .await
        .unwrap()
}

async fn origin(server: &DavServer) -> RemoteOrigin {
    origin_with(server, server.password()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_stats_and_reads_the_folder() {
    let server = start().await;
    remote::put_tree(server.clone()).await;
    let o = origin(&server).await;
    o.health().await.unwrap();
    remote::check_tree(&o).await;
    remote::check_not_found(&o).await;
    // rclone's ETags stand for the version; they are no content digest.
    let meta = o.stat(&p("lib/a.flac")).await.unwrap();
    assert!(meta.etag.is_some());
    assert_eq!(o.whole_digest(&p("lib/a.flac"), &meta.version()), None);

    // Rooted below the top: the same files, one level down.
    let mut spec = RemoteSpec::parse(&format!("{}lib/Album", url(&server))).unwrap();
    spec.settings = RemoteSettings {
        user: Some(server.user().to_owned()),
        password: Some(Secret::new(server.password())),
        ..RemoteSettings::default()
    };
    let album = RemoteOrigin::connect(OriginId::new("dav").unwrap(), spec)
        .await
        .unwrap();
    let mut names: Vec<_> = album
        .list(&OriginPath::root())
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.name.to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["01 Intro.flac", "02.flac"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overwritten_file_is_changed_never_mixed() {
    let server = start().await;
    let o = origin(&server).await;
    remote::check_changed(&o, server.clone(), false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_hash_etags_work_the_same() {
    let server = Arc::new(blocking(|| DavServer::start_with_etag_hash("MD5").unwrap()).await);
    remote::put_tree(server.clone()).await;
    let o = origin(&server).await;
    remote::check_tree(&o).await;
    remote::check_changed(&o, server.clone(), false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_access_denied_without_the_password() {
    let server = start().await;
    remote::put_tree(server.clone()).await;
    let wrong = "not-the-password-4711";
    let o = origin_with(&server, wrong).await;
    for err in [
        o.health().await.unwrap_err(),
        o.list(&OriginPath::root()).await.unwrap_err(),
        o.stat(&p("lib/a.flac")).await.unwrap_err(),
    ] {
        assert!(matches!(err, OriginError::AccessDenied { .. }), "{err}");
        assert!(!err.is_retryable());
        let msg = err.to_string();
        assert!(msg.contains("credentials"), "{msg}");
        assert!(
            !msg.contains(wrong) && !msg.contains(server.password()),
            "{msg}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_server_is_unavailable_and_the_origin_recovers() {
    let server = start().await;
    remote::put_tree(server.clone()).await;
    let o = Arc::new(origin(&server).await);
    remote::check_offline_and_back(o, server.clone()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_origin_starts_while_the_server_is_down() {
    let server = start().await;
    remote::put_tree(server.clone()).await;
    {
        let s = server.clone();
        blocking(move || s.stop().unwrap()).await;
    }
    let o = origin(&server).await;
    let e = o.health().await.unwrap_err();
    assert!(e.is_retryable() && !e.is_not_found(), "{e}");
    {
        let s = server.clone();
        blocking(move || s.start_again().unwrap()).await;
    }
    remote::wait_for("the server", || async { o.health().await.ok() }).await;
    assert_eq!(o.stat(&p("lib/Album/02.flac")).await.unwrap().size, 10);
}
