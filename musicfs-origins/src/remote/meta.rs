//! Versions of remote files: ETags, modification times and sizes as the
//! remote origins store them.
//!
//! Layer: inside the remote origins, shared by S3, WebDAV and SFTP.
//!
//! Invariants:
//! - A strong ETag is stored without its quotes (`9e10…`), a weak one as
//!   the server wrote it (`W/"…"`), so the same object gives the same
//!   [`FileVersion`] from a listing, a stat and a read response, whatever
//!   quoting each answer used.
//! - Remote modification times are whole seconds: S3 listings carry
//!   milliseconds but `HEAD` and HTTP dates carry seconds, and SFTP v3 has
//!   seconds only. Truncating everywhere keeps a listing's version equal
//!   to a stat's.
//! - Only a strong ETag is sent as `If-Match`: a weak one never matches
//!   under the strong comparison `If-Match` uses.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::{EntryKind, EntryMeta, FileVersion};

/// The stored form of an ETag header value.
pub(crate) fn normalize_etag(raw: &str) -> Option<String> {
    let raw = raw.trim();
    if raw.is_empty() {
        return None;
    }
    if raw.starts_with("W/") {
        return Some(raw.to_owned());
    }
    let bare = raw
        .strip_prefix('"')
        .and_then(|r| r.strip_suffix('"'))
        .unwrap_or(raw);
    (!bare.is_empty()).then(|| bare.to_owned())
}

/// The `If-Match` value for a stored ETag, where one can be sent.
pub(crate) fn if_match(etag: &str) -> Option<String> {
    (!etag.starts_with("W/")).then(|| format!("\"{etag}\""))
}

/// Seconds since the epoch, in nanoseconds (whole seconds only).
pub(crate) fn mtime_ns(time: SystemTime) -> Option<i64> {
    let secs = match time.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_secs()).ok()?,
        // Before 1970: round towards the past, as a whole second.
        Err(before) => {
            let d = before.duration();
            let whole = i64::try_from(d.as_secs()).ok()?;
            -(whole + i64::from(d.subsec_nanos() > 0))
        }
    };
    secs.checked_mul(1_000_000_000)
}

/// Metadata of a file or directory as the remote reports it.
pub(crate) fn entry(
    kind: EntryKind,
    size: u64,
    modified: Option<SystemTime>,
    etag: Option<&str>,
) -> EntryMeta {
    match kind {
        // Directories have no version; S3 has no directories at all.
        EntryKind::Dir => EntryMeta {
            kind,
            size: 0,
            mtime_ns: None,
            etag: None,
        },
        _ => EntryMeta {
            kind,
            size,
            mtime_ns: modified.and_then(mtime_ns),
            etag: etag.and_then(normalize_etag),
        },
    }
}

/// What a read response says about the version it came from.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The response names this version.
    Same,
    /// The response names another version.
    Other(String),
    /// The response does not say; check another way.
    Unknown,
}

/// Compares what a read response carried (its ETag and Last-Modified)
/// with the version the read was for.
pub(crate) fn check_response(
    version: &FileVersion,
    etag: Option<&str>,
    modified: Option<SystemTime>,
) -> Verdict {
    if let (Some(want), Some(got)) = (&version.etag, etag.and_then(normalize_etag)) {
        return if *want == got {
            Verdict::Same
        } else {
            Verdict::Other(format!("expected etag {want}, the server sent {got}"))
        };
    }
    if let (Some(want), Some(got)) = (version.mtime_ns, modified.and_then(mtime_ns)) {
        return if want == got {
            Verdict::Same
        } else {
            Verdict::Other(format!(
                "expected mtime {}, the server sent {}",
                want / 1_000_000_000,
                got / 1_000_000_000
            ))
        };
    }
    Verdict::Unknown
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn etags_are_stored_without_quotes() {
        assert_eq!(normalize_etag("\"abc\"").as_deref(), Some("abc"));
        assert_eq!(normalize_etag("abc").as_deref(), Some("abc"));
        assert_eq!(normalize_etag(" \"abc-3\" ").as_deref(), Some("abc-3"));
        assert_eq!(normalize_etag("W/\"abc\"").as_deref(), Some("W/\"abc\""));
        assert_eq!(normalize_etag(""), None);
        assert_eq!(normalize_etag("\"\""), None);
    }

    #[test]
    fn only_strong_etags_are_sent_as_if_match() {
        assert_eq!(if_match("abc").as_deref(), Some("\"abc\""));
        assert_eq!(if_match("W/\"abc\""), None);
    }

    #[test]
    fn mtimes_are_whole_seconds() {
        let t = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        assert_eq!(mtime_ns(t), Some(1_700_000_000 * 1_000_000_000));
        let before = UNIX_EPOCH - Duration::from_millis(1_500);
        assert_eq!(mtime_ns(before), Some(-2_000_000_000));
    }

    #[test]
    fn a_listing_and_a_stat_give_the_same_version() {
        let listed = entry(
            EntryKind::File,
            10,
            Some(UNIX_EPOCH + Duration::from_millis(1_700_000_000_456)),
            Some("\"d41d8cd98f00b204e9800998ecf8427e\""),
        );
        let stated = entry(
            EntryKind::File,
            10,
            Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000)),
            Some("d41d8cd98f00b204e9800998ecf8427e"),
        );
        assert_eq!(listed.version(), stated.version());
        let dir = entry(EntryKind::Dir, 4096, Some(UNIX_EPOCH), Some("x"));
        assert_eq!((dir.size, dir.mtime_ns, dir.etag), (0, None, None));
    }

    #[test]
    fn responses_are_checked_by_etag_then_mtime() {
        let t = UNIX_EPOCH + Duration::from_secs(100);
        let v = entry(EntryKind::File, 3, Some(t), Some("\"e1\"")).version();
        assert_eq!(check_response(&v, Some("\"e1\""), None), Verdict::Same);
        assert!(matches!(
            check_response(&v, Some("e2"), Some(t)),
            Verdict::Other(_)
        ));
        assert_eq!(check_response(&v, None, Some(t)), Verdict::Same);
        assert!(matches!(
            check_response(&v, None, Some(t + Duration::from_secs(1))),
            Verdict::Other(_)
        ));
        assert_eq!(check_response(&v, None, None), Verdict::Unknown);
        let no_etag = entry(EntryKind::File, 3, None, None).version();
        assert_eq!(
            check_response(&no_etag, Some("e1"), Some(t)),
            Verdict::Unknown
        );
    }
}
