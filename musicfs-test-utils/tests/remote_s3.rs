//! The S3 origin against a real S3 store (SeaweedFS, started per test).
//!
//! Credentials reach the origin the way a user's do: a profile of the
//! shared credentials file (`AWS_SHARED_CREDENTIALS_FILE`), one profile per
//! server, since the environment is shared by the tests of this process.
//! EC2 metadata is disabled and no AWS key variables are set, so no
//! request leaves the loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

#[path = "support/counting_proxy.rs"]
mod counting_proxy;
#[path = "support/remote.rs"]
mod remote;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use counting_proxy::CountingProxy;
use md5::{Digest, Md5};
use musicfs_origins::{
    EntryKind, Origin, OriginError, OriginId, OriginPath, RemoteOrigin, RemoteSettings, RemoteSpec,
    TimeoutOrigin, WholeDigest,
};
use musicfs_test_utils::{RemoteServer, S3Server};
use remote::{blocking, data, p};

/// The shared credentials file and the profiles written to it so far.
struct Profiles {
    dir: tempfile::TempDir,
    text: String,
    config: String,
}

fn profiles() -> &'static Mutex<Profiles> {
    static PROFILES: OnceLock<Mutex<Profiles>> = OnceLock::new();
    PROFILES.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        // Set once, before any origin reads the environment; every S3 test
        // comes through here first.
        std::env::set_var(
            "AWS_SHARED_CREDENTIALS_FILE",
            dir.path().join("credentials"),
        );
        std::env::set_var("AWS_CONFIG_FILE", dir.path().join("config"));
        std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
        for var in [
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_PROFILE",
            "AWS_ENDPOINT_URL",
            "AWS_ENDPOINT_URL_S3",
            "AWS_REGION",
            "AWS_DEFAULT_REGION",
        ] {
            std::env::remove_var(var);
        }
        Mutex::new(Profiles {
            dir,
            text: String::new(),
            config: String::new(),
        })
    })
}

/// Adds a profile with these keys to the shared credentials file (rewritten
/// whole and renamed into place, so a reader never sees half of it).
fn add_profile(name: &str, key: &str, secret: &str) {
    let mut p = profiles().lock().unwrap();
    p.text.push_str(&format!(
        "[{name}]\naws_access_key_id = {key}\naws_secret_access_key = {secret}\n\n"
    ));
    let mut tmp = tempfile::NamedTempFile::new_in(p.dir.path()).unwrap();
    tmp.write_all(p.text.as_bytes()).unwrap();
    tmp.persist(p.dir.path().join("credentials")).unwrap();
}

/// Adds `[profile NAME]` with these lines to the shared config file.
fn add_config_profile(name: &str, lines: &str) -> std::path::PathBuf {
    let mut p = profiles().lock().unwrap();
    p.config.push_str(&format!("[profile {name}]\n{lines}\n"));
    let mut tmp = tempfile::NamedTempFile::new_in(p.dir.path()).unwrap();
    tmp.write_all(p.config.as_bytes()).unwrap();
    tmp.persist(p.dir.path().join("config")).unwrap();
    p.dir.path().to_owned()
}

async fn start() -> Arc<S3Server> {
    let server = Arc::new(blocking(|| S3Server::start().unwrap()).await);
    let profile = format!("musicfs-{}", server.addr().port());
    add_profile(&profile, server.access_key_id(), server.secret_access_key());
    server
}

fn settings(server: &S3Server) -> RemoteSettings {
    RemoteSettings {
        endpoint: Some(server.endpoint()),
        region: Some(server.region().to_owned()),
        profile: Some(format!("musicfs-{}", server.addr().port())),
        ..RemoteSettings::default()
    }
}

async fn origin(server: &S3Server, url: &str) -> RemoteOrigin {
    let mut spec = RemoteSpec::parse(url).unwrap();
    spec.settings = settings(server);
    RemoteOrigin::connect(OriginId::new("s3").unwrap(), spec)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_stats_and_reads_the_bucket() {
    let server = start().await;
    remote::put_tree(server.clone()).await;
    let o = origin(&server, &format!("s3://{}", server.bucket())).await;
    o.health().await.unwrap();
    remote::check_tree(&o).await;
    remote::check_not_found(&o).await;

    // Rooted at a prefix: the same files, one level down.
    let lib = origin(&server, &format!("s3://{}/lib", server.bucket())).await;
    let entries = lib.list(&OriginPath::root()).await.unwrap();
    assert_eq!(entries.len(), 4, "{entries:?}");
    let meta = lib.stat(&p("Album/02.flac")).await.unwrap();
    assert_eq!(
        &lib.read_range(&p("Album/02.flac"), &meta.version(), 0, 100)
            .await
            .unwrap()[..],
        &data(3, 10)[..]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_part_etags_are_the_md5_of_the_content() {
    let server = start().await;
    remote::put_tree(server.clone()).await;
    let o = origin(&server, &format!("s3://{}", server.bucket())).await;
    for (key, seed, len) in remote::TREE {
        let meta = o.stat(&p(key)).await.unwrap();
        let etag = meta.etag.clone().expect("S3 objects have ETags");
        assert!(!etag.contains('"'), "stored with quotes: {etag}");
        let md5: [u8; 16] = Md5::digest(data(*seed, *len)).into();
        assert_eq!(
            o.whole_digest(&p(key), &meta.version()),
            Some(WholeDigest::Md5(md5)),
            "{key}"
        );
    }
}

/// A bucket whose ETags are not MD5s (SSE-KMS, SSE-C) is told so in its
/// settings, and then no digest is stated: every first download would
/// otherwise fail the whole-file check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etags_not_md5_states_no_digest() {
    let server = start().await;
    remote::put_tree(server.clone()).await;
    let mut spec = RemoteSpec::parse(&format!("s3://{}", server.bucket())).unwrap();
    spec.settings = settings(&server);
    spec.settings.etags_not_md5 = true;
    let o = RemoteOrigin::connect(OriginId::new("s3").unwrap(), spec)
        .await
        .unwrap();
    let (key, _, _) = remote::TREE[0];
    let meta = o.stat(&p(key)).await.unwrap();
    assert!(meta.etag.is_some());
    assert_eq!(o.whole_digest(&p(key), &meta.version()), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_of_more_than_1000_keys_lists_in_pages() {
    let server = start().await;
    let files = tempfile::tempdir().unwrap();
    let n = 1_205;
    for i in 0..n {
        std::fs::write(files.path().join(format!("t{i:05}.flac")), format!("{i}")).unwrap();
    }
    std::fs::create_dir(files.path().join("sub")).unwrap();
    std::fs::write(files.path().join("sub/x.flac"), b"x").unwrap();
    {
        let (s, dir) = (server.clone(), files.path().to_owned());
        blocking(move || s.put_tree("many", &dir).unwrap()).await;
    }
    // Through a proxy that counts ListObjectsV2 requests.
    let proxy = CountingProxy::start(server.addr(), b"list-type=2").await;
    let mut spec = RemoteSpec::parse(&format!("s3://{}", server.bucket())).unwrap();
    spec.settings = RemoteSettings {
        endpoint: Some(format!("http://{}", proxy.addr)),
        ..settings(&server)
    };
    let o = RemoteOrigin::connect(OriginId::new("s3").unwrap(), spec)
        .await
        .unwrap();
    let mut entries = o.list(&p("many")).await.unwrap();
    // 1,206 entries (1,205 keys and one common prefix) in pages of 1,000.
    assert_eq!(proxy.matches(), 2, "list requests");
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(entries.len(), n + 1);
    let dirs: Vec<_> = entries
        .iter()
        .filter(|e| e.meta.kind == EntryKind::Dir)
        .map(|e| e.name.to_string_lossy().into_owned())
        .collect();
    assert_eq!(dirs, ["sub"]);
    for (i, e) in entries
        .iter()
        .filter(|e| e.meta.kind == EntryKind::File)
        .enumerate()
    {
        assert_eq!(e.name.to_string_lossy(), format!("t{i:05}.flac"));
        assert_eq!(e.meta.size, format!("{i}").len() as u64);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overwritten_object_is_changed_never_mixed() {
    let server = start().await;
    let o = origin(&server, &format!("s3://{}", server.bucket())).await;
    remote::check_changed(&o, server.clone(), false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_are_access_denied_without_the_secret() {
    let server = start().await;
    remote::put_tree(server.clone()).await;
    let wrong_secret = "wrongsecret0123456789abcdef";
    let profile = format!("musicfs-wrong-{}", server.addr().port());
    add_profile(&profile, server.access_key_id(), wrong_secret);
    let mut spec = RemoteSpec::parse(&format!("s3://{}", server.bucket())).unwrap();
    spec.settings = RemoteSettings {
        profile: Some(profile),
        ..settings(&server)
    };
    let o = RemoteOrigin::connect(OriginId::new("s3").unwrap(), spec)
        .await
        .unwrap();
    for err in [
        o.health().await.unwrap_err(),
        o.list(&OriginPath::root()).await.unwrap_err(),
        o.stat(&p("lib/a.flac")).await.unwrap_err(),
    ] {
        assert!(matches!(err, OriginError::AccessDenied { .. }), "{err}");
        assert!(!err.is_retryable(), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("credentials"), "{msg}");
        assert!(!msg.contains(wrong_secret), "{msg}");
        assert!(!msg.contains(server.secret_access_key()), "{msg}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_store_is_unavailable_and_the_origin_recovers() {
    let server = start().await;
    remote::put_tree(server.clone()).await;
    // Set up while the store is up; the origin needs no network to start.
    let o = Arc::new(origin(&server, &format!("s3://{}", server.bucket())).await);
    remote::check_offline_and_back(o, server.clone()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_origin_starts_while_the_store_is_down() {
    let server = start().await;
    remote::put_tree(server.clone()).await;
    {
        let s = server.clone();
        blocking(move || s.stop().unwrap()).await;
    }
    let o = origin(&server, &format!("s3://{}", server.bucket())).await;
    let e = o.health().await.unwrap_err();
    assert!(e.is_retryable() && !e.is_not_found(), "{e}");
    {
        let s = server.clone();
        blocking(move || s.start_again().unwrap()).await;
    }
    remote::wait_for("the store", || async { o.health().await.ok() }).await;
    assert_eq!(o.stat(&p("lib/Album/02.flac")).await.unwrap().size, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_calls_reuse_one_connection() {
    let server = start().await;
    remote::put_tree(server.clone()).await;
    let proxy = CountingProxy::start(server.addr(), b"HTTP/1.1\r\n").await;
    let mut spec = RemoteSpec::parse(&format!("s3://{}", server.bucket())).unwrap();
    spec.settings = RemoteSettings {
        endpoint: Some(format!("http://{}", proxy.addr)),
        ..settings(&server)
    };
    let o = RemoteOrigin::connect(OriginId::new("s3").unwrap(), spec)
        .await
        .unwrap();
    let meta = o.stat(&p("lib/a.flac")).await.unwrap();
    for i in 0..20u64 {
        o.read_range(&p("lib/a.flac"), &meta.version(), i * 10_000, 10_000)
            .await
            .unwrap();
        o.stat(&p("lib/Album/02.flac")).await.unwrap();
    }
    assert_eq!(proxy.matches(), 41, "requests");
    // Measured: 2. The read right after the first HEAD opens a second
    // connection (hyper hands a finished connection back to its pool
    // asynchronously); from then on both are reused.
    assert!(
        proxy.connections() <= 2,
        "{} connections for 41 sequential requests",
        proxy.connections()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_connection_times_out_and_the_next_call_gets_a_fresh_one() {
    let server = start().await;
    remote::put_tree(server.clone()).await;
    let proxy = CountingProxy::start(server.addr(), b"HTTP/1.1\r\n").await;
    let mut spec = RemoteSpec::parse(&format!("s3://{}", server.bucket())).unwrap();
    spec.settings = RemoteSettings {
        endpoint: Some(format!("http://{}", proxy.addr)),
        ..settings(&server)
    };
    let o = RemoteOrigin::connect(OriginId::new("s3").unwrap(), spec)
        .await
        .unwrap();
    let bounded = TimeoutOrigin::new(Arc::new(o), Duration::from_secs(2));
    let meta = bounded.stat(&p("lib/a.flac")).await.unwrap();
    let before = proxy.connections();
    proxy.set_blackhole(true);
    let e = bounded
        .read_range(&p("lib/a.flac"), &meta.version(), 0, 4096)
        .await
        .unwrap_err();
    assert!(matches!(e, OriginError::Timeout { .. }), "{e}");
    proxy.set_blackhole(false);
    // The hung connection is not reused: the read answers at once on a new
    // one (were it queued on the dead one, it would time out again).
    let got = bounded
        .read_range(&p("lib/a.flac"), &meta.version(), 0, 4096)
        .await
        .unwrap();
    assert_eq!(got[..], data(1, 300_001)[..4096]);
    assert!(proxy.connections() > before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_markers_are_directories_never_files() {
    let server = start().await;
    remote::put_tree(server.clone()).await;
    // rclone's directory markers: zero-byte objects "empty/" and "lib/Album/".
    for dir in ["empty", "lib/Album"] {
        let s = server.clone();
        let target = format!("{}/{dir}", s.rclone_bucket());
        let out = blocking(move || {
            s.rclone()
                .args(["mkdir", "--s3-directory-markers"])
                .arg(target)
                .output()
                .unwrap()
        })
        .await;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let keys = {
        let s = server.clone();
        blocking(move || s.list("").unwrap()).await
    };
    let o = origin(&server, &format!("s3://{}", server.bucket())).await;
    let root = o.list(&OriginPath::root()).await.unwrap();
    let kinds: Vec<_> = root
        .iter()
        .map(|e| (e.name.to_string_lossy().into_owned(), e.meta.kind))
        .collect();
    assert!(
        kinds.contains(&("empty".into(), EntryKind::Dir)),
        "{kinds:?} (keys {keys:?})"
    );
    assert!(
        kinds
            .iter()
            .all(|(n, _)| !n.is_empty() && !n.ends_with('/')),
        "{kinds:?}"
    );
    // An empty directory exists (its marker says so) and lists empty.
    assert!(o.list(&p("empty")).await.unwrap().is_empty());
    assert_eq!(o.stat(&p("empty")).await.unwrap().kind, EntryKind::Dir);
    // A marker beside real keys adds no entry.
    let album = o.list(&p("lib/Album")).await.unwrap();
    assert_eq!(album.len(), 2, "{album:?}");
    assert!(album.iter().all(|e| e.meta.kind == EntryKind::File));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiring_credentials_are_loaded_again_before_they_expire() {
    let server = start().await;
    remote::put_tree(server.clone()).await;
    // A credential_process that hands out credentials expiring in 60 s
    // (inside reqsign's 2-minute refresh margin) and counts its runs.
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("creds.sh");
    let count = dir.path().join("runs");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho run >> {count}\nexp=$(date -u -d '+60 seconds' +%Y-%m-%dT%H:%M:%SZ)\n\
             printf '{{\"Version\":1,\"AccessKeyId\":\"{key}\",\"SecretAccessKey\":\"{secret}\",\"Expiration\":\"%s\"}}' \"$exp\"\n",
            count = count.display(),
            key = server.access_key_id(),
            secret = server.secret_access_key(),
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let profile = format!("musicfs-proc-{}", server.addr().port());
    add_config_profile(
        &profile,
        &format!("credential_process = {}", script.display()),
    );
    let mut spec = RemoteSpec::parse(&format!("s3://{}", server.bucket())).unwrap();
    spec.settings = RemoteSettings {
        profile: Some(profile),
        ..settings(&server)
    };
    let o = RemoteOrigin::connect(OriginId::new("s3").unwrap(), spec)
        .await
        .unwrap();
    for _ in 0..3 {
        o.stat(&p("lib/a.flac")).await.unwrap();
    }
    // Each credential was inside the refresh margin when the next request
    // was signed, so each request loaded a new one.
    let runs = std::fs::read_to_string(&count).unwrap().lines().count();
    assert_eq!(runs, 3, "credential_process runs for 3 requests");
}
