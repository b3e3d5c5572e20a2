//! The WebDAV operator: `dav://` over HTTP, `davs://` over TLS.
//!
//! Layer: setup of the WebDAV flavour of the remote origin; no network
//! here.
//!
//! Invariants:
//! - The user and password come from the settings (the config file or the
//!   environment, filled in by the caller), never from the URL; the
//!   password is handed to OpenDAL and nowhere else.
//! - No OpenDAL retry layer: one call is one attempt.

use opendal::Operator;

use super::spec::RemoteSettings;
use crate::{OriginError, OriginId, Result};

/// The base URL of the server: scheme, host and port.
pub(crate) fn endpoint(tls: bool, host: &str, port: Option<u16>) -> String {
    let scheme = if tls { "https" } else { "http" };
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    match port {
        Some(port) => format!("{scheme}://{host}:{port}"),
        None => format!("{scheme}://{host}"),
    }
}

pub(crate) fn operator(
    id: &OriginId,
    tls: bool,
    host: &str,
    port: Option<u16>,
    root: &str,
    settings: &RemoteSettings,
) -> Result<Operator> {
    let misconfigured = |reason: String| OriginError::Misconfigured {
        origin: id.clone(),
        reason,
    };
    let mut builder = opendal::services::Webdav::default()
        .endpoint(&endpoint(tls, host, port))
        .root(root);
    match (&settings.user, &settings.password) {
        (Some(user), password) => {
            builder = builder.username(user);
            if let Some(password) = password {
                builder = builder.password(password.expose());
            }
        }
        (None, Some(_)) => {
            return Err(misconfigured(
                "a WebDAV password is set without a user; set the user too".into(),
            ))
        }
        (None, None) => {}
    }
    super::install_http();
    // OpenDAL's error names the endpoint and root only, never the password.
    Operator::new(builder).map_err(|e| misconfigured(format!("WebDAV: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            endpoint(false, "127.0.0.1", Some(8080)),
            "http://127.0.0.1:8080"
        );
        assert_eq!(
            endpoint(true, "cloud.example.org", None),
            "https://cloud.example.org"
        );
        assert_eq!(endpoint(true, "::1", Some(443)), "https://[::1]:443");
    }
}
