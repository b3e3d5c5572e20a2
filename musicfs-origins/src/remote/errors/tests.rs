use super::*;
use opendal::raw::with_error_response_context;

fn id() -> OriginId {
    OriginId::new("s3").unwrap()
}

fn path() -> OriginPath {
    OriginPath::new("Album/01.flac").unwrap()
}

/// An error as OpenDAL's services build it from a failed response.
fn http_error(
    kind: ErrorKind,
    status: u16,
    headers: &[(&str, &str)],
    message: &str,
) -> opendal::Error {
    let mut builder = http::Response::builder().status(status);
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    let (parts, ()) = builder.body(()).unwrap().into_parts();
    with_error_response_context(opendal::Error::new(kind, message), parts)
}

fn map(err: opendal::Error) -> OriginError {
    from_dal(&id(), &path(), &err)
}

#[test]
fn only_a_404_is_not_found() {
    let e = map(http_error(ErrorKind::NotFound, 404, &[], "NoSuchKey"));
    assert!(e.is_not_found(), "{e}");
    assert!(!e.is_retryable());

    // A kind that says not-found under a status that does not is a fault.
    let e = map(http_error(ErrorKind::NotFound, 500, &[], "odd"));
    assert!(!e.is_not_found(), "{e}");
    assert!(e.is_retryable());
}

#[test]
fn a_failed_if_match_is_changed() {
    let e = map(http_error(
        ErrorKind::ConditionNotMatch,
        412,
        &[],
        "PreconditionFailed",
    ));
    assert!(e.is_changed(), "{e}");
    // WebDAV servers that OpenDAL does not classify still say 412.
    let e = map(http_error(ErrorKind::Unexpected, 412, &[], ""));
    assert!(e.is_changed(), "{e}");
    assert!(!e.is_retryable());
}

#[test]
fn throttling_carries_retry_after() {
    let e = map(http_error(
        ErrorKind::RateLimited,
        429,
        &[("retry-after", "7")],
        "SlowDown",
    )
    .set_temporary());
    match &e {
        OriginError::Throttled { retry_after, .. } => {
            assert_eq!(*retry_after, Some(Duration::from_secs(7)))
        }
        other => panic!("{other}"),
    }
    assert!(e.is_retryable());

    let e = map(http_error(ErrorKind::Unexpected, 503, &[], "Service Unavailable").set_temporary());
    assert!(
        matches!(
            e,
            OriginError::Throttled {
                retry_after: None,
                ..
            }
        ),
        "{e}"
    );
    // An HTTP-date Retry-After is not understood: backoff applies.
    let e = map(http_error(
        ErrorKind::RateLimited,
        429,
        &[("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT")],
        "",
    ));
    assert!(
        matches!(
            e,
            OriginError::Throttled {
                retry_after: None,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn bad_credentials_are_permanent_and_say_so_without_secrets() {
    let secret = "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/s3, Signature=deadbeef";
    for err in [
        http_error(
            ErrorKind::PermissionDenied,
            403,
            &[("x-echo-authorization", secret)],
            "SignatureDoesNotMatch",
        ),
        http_error(
            ErrorKind::Unexpected,
            401,
            &[("www-authenticate", "Basic realm=x")],
            "",
        ),
    ] {
        let e = map(err);
        assert!(matches!(e, OriginError::AccessDenied { .. }), "{e}");
        assert!(!e.is_retryable());
        let msg = e.to_string();
        assert!(msg.contains("credentials"), "{msg}");
        assert!(!msg.contains("deadbeef"), "{msg}");
    }
}

#[test]
fn no_credentials_at_all_is_access_denied() {
    let err = opendal::Error::new(
        ErrorKind::Unexpected,
        "loading credential to sign http request",
    )
    .set_temporary()
    .set_source(std::io::Error::other("failed to load signing credential"));
    let e = map(err);
    assert!(matches!(e, OriginError::AccessDenied { .. }), "{e}");
    assert!(e.to_string().contains("AWS_PROFILE"), "{e}");
}

#[test]
fn faults_are_retryable_and_never_not_found() {
    let cases = [
        http_error(ErrorKind::Unexpected, 500, &[], "InternalError").set_temporary(),
        http_error(ErrorKind::Unexpected, 502, &[], "<html>Bad Gateway</html>"),
        opendal::Error::new(ErrorKind::Unexpected, "send http request")
            .set_temporary()
            .set_source(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
        opendal::Error::new(ErrorKind::Unexpected, "read data from http response")
            .set_source(std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
        opendal::Error::new(ErrorKind::Unexpected, "send http request").set_source(
            std::io::Error::other("invalid peer certificate: UnknownIssuer"),
        ),
    ];
    for err in cases {
        let e = map(err);
        assert!(matches!(e, OriginError::Unavailable { .. }), "{e}");
        assert!(e.is_retryable(), "{e}");
        assert!(!e.is_not_found(), "{e}");
    }
    let e = map(
        opendal::Error::new(ErrorKind::Unexpected, "send http request")
            .set_source(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
    );
    assert!(e.to_string().to_lowercase().contains("refused"), "{e}");
}

#[test]
fn configuration_and_kind_errors() {
    let e = map(http_error(
        ErrorKind::ConfigInvalid,
        404,
        &[],
        "NoSuchBucket",
    ));
    assert!(matches!(e, OriginError::Misconfigured { .. }), "{e}");
    assert!(!e.is_retryable());
    let e = map(opendal::Error::new(
        ErrorKind::IsADirectory,
        "read path is a directory",
    ));
    assert!(
        matches!(
            e,
            OriginError::WrongKind {
                expected: "file",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn long_messages_are_cut() {
    let page = "x".repeat(10_000);
    let e = map(http_error(ErrorKind::Unexpected, 500, &[], &page));
    assert!(e.to_string().len() < 600, "{}", e.to_string().len());
}
