//! What an OpenDAL error (S3, WebDAV) means to MusicFS.
//!
//! Layer: inside the remote origins, between OpenDAL and [`OriginError`].
//!
//! Invariants:
//! - Only a definite "no such key" (404, `NoSuchKey`) is
//!   [`OriginError::NotFound`]. A timeout, a 5xx, a refused connection, a
//!   TLS or DNS failure, or anything unexpected is retryable
//!   ([`OriginError::Unavailable`]); MusicFS caches a not-found as a
//!   negative entry, so a mistaken one would hide a file.
//! - 412 (`If-Match` failed) is [`OriginError::Changed`]; 429 and 503 are
//!   [`OriginError::Throttled`] with the server's `Retry-After` where it
//!   sent one in seconds; 401 and 403 are [`OriginError::AccessDenied`],
//!   permanent, so bad credentials never become a retry storm.
//! - A reason never carries a secret: it is built from the error kind, the
//!   HTTP status, the service's message and the transport's error chain,
//!   never from request headers.
//!
//! OpenDAL 0.59 keeps the HTTP status and headers of a failed response only
//! in the error's `response` context (the `Debug` of the response parts),
//! so they are read back from there; the tests build errors with OpenDAL's
//! own helper, so a change of that format fails them.

use std::error::Error as _;
use std::time::Duration;

use opendal::ErrorKind;

use crate::{OriginError, OriginId, OriginPath};

/// Longest service message kept in a reason (an HTML error page is noise).
const MAX_MESSAGE: usize = 240;

/// The typed error for `err`, met by an operation on `path`.
pub(crate) fn from_dal(origin: &OriginId, path: &OriginPath, err: &opendal::Error) -> OriginError {
    let origin = origin.clone();
    let rendered = err.to_string();
    let status = http_status(&rendered);
    let reason = || reason(err, status);
    let kind = err.kind();

    if kind == ErrorKind::ConditionNotMatch || status == Some(412) {
        return OriginError::Changed {
            origin,
            path: path.to_string(),
            reason: format!("the server no longer has this version ({})", reason()),
        };
    }
    if kind == ErrorKind::RateLimited || matches!(status, Some(429) | Some(503)) {
        return OriginError::Throttled {
            origin,
            reason: reason(),
            retry_after: retry_after(&rendered),
        };
    }
    if kind == ErrorKind::PermissionDenied || matches!(status, Some(401) | Some(403)) {
        return OriginError::AccessDenied {
            origin,
            reason: reason(),
        };
    }
    if no_credentials(err) {
        return OriginError::AccessDenied {
            origin,
            reason: "no credentials were found (AWS_PROFILE, ~/.aws/credentials, \
                     AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)"
                .into(),
        };
    }
    match kind {
        ErrorKind::NotFound if status.is_none_or(|s| s == 404) => OriginError::NotFound {
            origin,
            path: path.to_string(),
        },
        ErrorKind::IsADirectory => OriginError::WrongKind {
            origin,
            path: path.to_string(),
            expected: "file",
        },
        ErrorKind::NotADirectory => OriginError::WrongKind {
            origin,
            path: path.to_string(),
            expected: "directory",
        },
        // A range past the end under a matching version cannot happen; the
        // object is not what the version says.
        ErrorKind::RangeNotSatisfied => OriginError::Changed {
            origin,
            path: path.to_string(),
            reason: format!("the server refused the range ({})", reason()),
        },
        // A missing bucket, an endpoint OpenDAL cannot use.
        ErrorKind::ConfigInvalid => OriginError::Misconfigured {
            origin,
            reason: reason(),
        },
        _ => OriginError::Unavailable {
            origin,
            reason: reason(),
        },
    }
}

/// The HTTP status of the failed response, where there was one.
fn http_status(rendered: &str) -> Option<u16> {
    let at = rendered.find("Parts { status: ")? + "Parts { status: ".len();
    rendered.get(at..at + 3)?.parse().ok()
}

/// `Retry-After` in seconds, from the response headers. An HTTP-date
/// form is ignored (no S3 or WebDAV server we know sends one); backoff
/// applies then.
fn retry_after(rendered: &str) -> Option<Duration> {
    let key = "\"retry-after\": \"";
    let at = rendered.find(key)? + key.len();
    let value = &rendered[at..];
    let end = value.find('"')?;
    value[..end].trim().parse().ok().map(Duration::from_secs)
}

/// reqsign found no credential source at all: retrying cannot help.
fn no_credentials(err: &opendal::Error) -> bool {
    chain(err)
        .iter()
        .any(|m| m.contains("failed to load signing credential"))
}

/// The messages of `err`'s sources, outermost first.
fn chain(err: &opendal::Error) -> Vec<String> {
    let mut out = Vec::new();
    let mut next = err.source();
    while let Some(e) = next {
        let msg = e.to_string();
        if !out.contains(&msg) {
            out.push(msg);
        }
        next = e.source();
    }
    out
}

fn reason(err: &opendal::Error, status: Option<u16>) -> String {
    let mut reason = match status {
        Some(status) => format!("HTTP {status}"),
        None => err.kind().to_string(),
    };
    let message = err.message().trim();
    if !message.is_empty() {
        reason.push_str(": ");
        reason.push_str(&shorten(message));
    }
    for source in chain(err) {
        reason.push_str(": ");
        reason.push_str(&shorten(&source));
    }
    reason
}

fn shorten(s: &str) -> String {
    let s = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if s.len() <= MAX_MESSAGE {
        return s;
    }
    let mut end = MAX_MESSAGE;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests;
