use super::*;
use crate::OriginId;
use std::os::unix::ffi::OsStrExt;

fn id() -> OriginId {
    OriginId::new("nas").unwrap()
}

#[test]
fn host_key_refusals_are_access_denied_and_say_host_key() {
    for text in [
        "failed to connect to the remote host: Host key verification failed.",
        "@@@ WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED! @@@ ... Host key verification failed.",
        "No ED25519 host key is known for [127.0.0.1]:2222 and you have requested strict checking.\nHost key verification failed.",
    ] {
        let e = classify_ssh(&id(), "nas", text);
        assert!(matches!(e, OriginError::AccessDenied { .. }), "{e}");
        assert!(!e.is_retryable());
        assert!(e.to_string().contains("host key"), "{e}");
    }
}

#[test]
fn login_refusals_are_access_denied_and_network_faults_retryable() {
    let e = classify_ssh(&id(), "nas", "bob@nas: Permission denied (publickey).");
    assert!(matches!(e, OriginError::AccessDenied { .. }), "{e}");
    for text in [
        "ssh: connect to host 127.0.0.1 port 2222: Connection refused",
        "ssh: Could not resolve hostname nas: Name or service not known",
        "ssh: connect to host 10.0.0.1 port 22: Connection timed out",
        "Connection closed by 127.0.0.1 port 2222",
    ] {
        let e = classify_ssh(&id(), "nas", text);
        assert!(matches!(e, OriginError::Unavailable { .. }), "{e}");
        assert!(e.is_retryable());
        assert!(!e.is_not_found());
    }
}

#[test]
fn server_paths_follow_the_root() {
    let target = |root: &str| Target {
        user: None,
        host: "nas".into(),
        port: None,
        root: root.into(),
        settings: RemoteSettings::default(),
    };
    let p = OriginPath::new("Album/01.flac").unwrap();
    let o = SftpOrigin::new(id(), target("/srv/music"));
    assert_eq!(o.server_path(&p), PathBuf::from("/srv/music/Album/01.flac"));
    assert_eq!(
        o.server_path(&OriginPath::root()),
        PathBuf::from("/srv/music")
    );
    let o = SftpOrigin::new(id(), target(""));
    assert_eq!(o.server_path(&p), PathBuf::from("./Album/01.flac"));
    let o = SftpOrigin::new(id(), target("music"));
    assert_eq!(o.server_path(&p), PathBuf::from("music/Album/01.flac"));
    let latin1 = OriginPath::from_bytes(b"Bj\xf6rk.flac").unwrap();
    assert_eq!(
        o.server_path(&latin1).as_os_str().as_bytes(),
        b"music/Bj\xf6rk.flac"
    );
}
