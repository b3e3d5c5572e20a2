use super::*;

fn parse(url: &str) -> RemoteKind {
    match RemoteSpec::parse(url) {
        Ok(spec) => spec.kind,
        Err(e) => panic!("{url}: {e}"),
    }
}

fn problem(url: &str) -> String {
    match RemoteSpec::parse(url) {
        Ok(spec) => panic!("{url} parsed as {spec:?}"),
        Err(e @ OriginError::InvalidRemote { .. }) => e.to_string(),
        Err(e) => panic!("{url}: not InvalidRemote: {e}"),
    }
}

#[test]
fn s3_urls() {
    assert_eq!(
        parse("s3://music"),
        RemoteKind::S3 {
            bucket: "music".into(),
            prefix: String::new()
        }
    );
    assert_eq!(
        parse("s3://music/lib/flac/"),
        RemoteKind::S3 {
            bucket: "music".into(),
            prefix: "lib/flac".into()
        }
    );
    assert_eq!(
        parse("S3://music/Bj%C3%B6rk%20Live"),
        RemoteKind::S3 {
            bucket: "music".into(),
            prefix: "Björk Live".into()
        }
    );
    assert!(problem("s3://").contains("bucket name is missing"));
    assert!(problem("s3:///prefix").contains("bucket name is missing"));
    assert!(problem("s3://bad*bucket").contains("not a bucket name"));
    assert!(problem("s3://key@music").contains("carries no user"));
    assert!(problem("s3://music/a/../b").contains("'..'"));
}

#[test]
fn sftp_urls() {
    assert_eq!(
        parse("sftp://nas/srv/music"),
        RemoteKind::Sftp {
            user: None,
            host: "nas".into(),
            port: None,
            root: "/srv/music".into()
        }
    );
    assert_eq!(
        parse("sftp://bob@127.0.0.1:2222/srv//music/"),
        RemoteKind::Sftp {
            user: Some("bob".into()),
            host: "127.0.0.1".into(),
            port: Some(2222),
            root: "/srv/music".into()
        }
    );
    assert_eq!(
        parse("sftp://[::1]:2222/~/music"),
        RemoteKind::Sftp {
            user: None,
            host: "::1".into(),
            port: Some(2222),
            root: "music".into()
        }
    );
    assert_eq!(
        parse("sftp://nas"),
        RemoteKind::Sftp {
            user: None,
            host: "nas".into(),
            port: None,
            root: String::new()
        }
    );
    assert_eq!(
        parse("sftp://nas/"),
        RemoteKind::Sftp {
            user: None,
            host: "nas".into(),
            port: None,
            root: "/".into()
        }
    );
    assert!(problem("sftp://nas:0/x").contains("not a port"));
    assert!(problem("sftp://nas:99999/x").contains("not a port"));
    assert!(problem("sftp://nas:ssh/x").contains("not a port"));
    assert!(problem("sftp://:22/x").contains("host is missing"));
    assert!(problem("sftp://[::1/x").contains("closing ']'"));
    assert!(problem("sftp://@nas/x").contains("user before '@' is empty"));
}

#[test]
fn webdav_urls() {
    assert_eq!(
        parse("dav://127.0.0.1:8080/music"),
        RemoteKind::WebDav {
            tls: false,
            host: "127.0.0.1".into(),
            port: Some(8080),
            root: "/music".into()
        }
    );
    assert_eq!(
        parse("davs://cloud.example.org/remote.php/dav/files/me/Music"),
        RemoteKind::WebDav {
            tls: true,
            host: "cloud.example.org".into(),
            port: None,
            root: "/remote.php/dav/files/me/Music".into()
        }
    );
    assert_eq!(
        parse("dav://h"),
        RemoteKind::WebDav {
            tls: false,
            host: "h".into(),
            port: None,
            root: "/".into()
        }
    );
    assert!(problem("dav://me@h/x").contains("config file"));
}

#[test]
fn a_password_in_the_url_is_refused_and_never_shown() {
    for url in [
        "sftp://bob:hunter2@nas/srv/music",
        "dav://bob:hunter2@h/x",
        "davs://bob:hunter2@h:443/x",
        "s3://AKIA:hunter2@music",
    ] {
        let msg = problem(url);
        assert!(!msg.contains("hunter2"), "{msg}");
        assert!(
            msg.contains("bob:***@") || msg.contains("AKIA:***@"),
            "{msg}"
        );
        assert!(msg.contains("password"), "{msg}");
        assert!(
            msg.contains("config file") && msg.contains("environment"),
            "{msg}"
        );
    }
}

#[test]
fn other_mistakes_say_what_to_write() {
    assert!(problem("ftp://h/x").contains("unsupported scheme 'ftp'"));
    assert!(problem("ftp://h/x").contains("s3://BUCKET"));
    assert!(problem("s3://music/a b").contains("%20"));
    assert!(problem("s3://music/x?region=eu").contains("config file"));
    assert!(problem("s3://music/bad%zz").contains("two hex digits"));
    assert!(problem("just-a-dir").contains("not a URL"));
}

#[test]
fn redacted_urls_parse_back_to_the_same_origin() {
    for url in [
        "s3://music",
        "s3://music/a/b",
        "s3://music/Bj%C3%B6rk%20Live",
        "s3://music/100%25",
        "sftp://nas",
        "sftp://nas/",
        "sftp://bob@nas:2222/srv/music",
        "sftp://[::1]:22/~/music",
        "sftp://nas/~",
        "dav://h:8080/music",
        "davs://h/remote.php/dav/files/me",
        "dav://h",
    ] {
        let spec = RemoteSpec::parse(url).unwrap();
        let again = RemoteSpec::parse(&spec.redacted()).unwrap();
        assert_eq!(spec.kind, again.kind, "{url} -> {}", spec.redacted());
    }
    assert_eq!(
        RemoteSpec::parse("s3://music/a b%20c".replace(' ', "%20").as_str())
            .unwrap()
            .redacted(),
        "s3://music/a%20b%20c"
    );
}

#[test]
fn secrets_never_print() {
    let settings = RemoteSettings {
        user: Some("bob".into()),
        password: Some(Secret::new("hunter2")),
        ..RemoteSettings::default()
    };
    let spec = RemoteSpec {
        kind: parse("dav://h/x"),
        settings,
    };
    assert!(!format!("{spec:?}").contains("hunter2"));
    assert!(!spec.redacted().contains("hunter2"));
    let secret = Secret::new("hunter2");
    assert_eq!(format!("{secret}"), "***");
    assert_eq!(format!("{secret:?}"), "***");
    assert_eq!(secret.expose(), "hunter2");
}

#[test]
fn remote_urls_are_told_apart_from_directories() {
    for url in ["s3://b", "sftp://h/x", "dav://h", "davs://h", "ftp://h"] {
        assert!(is_remote_url(url), "{url}");
    }
    for dir in [
        "/srv/music",
        "music",
        "./a://b",
        "://x",
        "1s3://b",
        "C:\\music",
    ] {
        assert!(!is_remote_url(dir), "{dir}");
    }
}
