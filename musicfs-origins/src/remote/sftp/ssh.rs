//! What the system `ssh` says when a login fails, as a typed error.
//!
//! Layer: inside the SFTP origin. Invariants: a refused host key (unknown
//! or changed) or a refused login is [`OriginError::AccessDenied`],
//! permanent, and a host key refusal says "host key"; anything else
//! (refused connection, DNS, timeout) is retryable
//! [`OriginError::Unavailable`], never not-found.

use crate::{OriginError, OriginId};

pub(super) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        let msg = s.to_string();
        if !text.contains(&msg) {
            text.push_str(": ");
            text.push_str(&msg);
        }
        next = s.source();
    }
    text
}

/// What ssh's complaint means: a host key or login refusal is permanent
/// (the user must act), anything else may pass.
pub(super) fn classify_ssh(origin: &OriginId, host: &str, text: &str) -> OriginError {
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if text.contains("Host key verification failed")
        || text.contains("REMOTE HOST IDENTIFICATION HAS CHANGED")
        || text.contains("host key for")
    {
        return OriginError::AccessDenied {
            origin: origin.clone(),
            reason: format!(
                "ssh refused the server's host key (unknown or changed): {text}; check the key and \
                 add it to known_hosts (run `ssh {host}` once and compare the fingerprint)"
            ),
        };
    }
    if text.contains("Permission denied") || text.contains("Too many authentication failures") {
        return OriginError::AccessDenied {
            origin: origin.clone(),
            reason: format!(
                "ssh could not log in: {text}; check the user, the key and the ssh agent"
            ),
        };
    }
    OriginError::Unavailable {
        origin: origin.clone(),
        reason: format!("ssh to {host} failed: {text}"),
    }
}
