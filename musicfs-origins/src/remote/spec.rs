//! What a remote origin is: its URL, parsed and checked, and the settings
//! that do not belong in a URL.
//!
//! Layer: configuration, below [`super::RemoteOrigin`]; no I/O here.
//!
//! Invariants:
//! - A URL never carries a secret. One with a password (`user:pass@`) is
//!   refused, with a message that shows it as `***` and says where a
//!   password goes instead (the config file or the environment).
//! - Secrets live only in [`Secret`], whose `Debug` and `Display` print
//!   `***`; [`RemoteSpec::redacted`] rebuilds the URL from the parsed parts,
//!   so what is logged, shown by `status` or written to the mount record is
//!   free of secrets by construction.
//! - Every parse error is [`OriginError::InvalidRemote`] and says what to
//!   write instead.

use std::fmt;
use std::path::PathBuf;

use crate::{OriginError, Result};

/// A remote origin: where it is and how to reach it.
#[derive(Debug, Clone)]
pub struct RemoteSpec {
    pub kind: RemoteKind,
    pub settings: RemoteSettings,
}

/// The protocol and location from the URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoteKind {
    /// `s3://BUCKET[/PREFIX]`: `prefix` has no leading or trailing `/`
    /// (empty for the whole bucket).
    S3 { bucket: String, prefix: String },
    /// `sftp://[USER@]HOST[:PORT]/PATH`: `root` is absolute (`/srv/music`),
    /// or relative to the login directory (`music`, from `/~/music`), or
    /// empty for the login directory itself. `host` may be an alias from
    /// the user's ssh config.
    Sftp {
        user: Option<String>,
        host: String,
        port: Option<u16>,
        root: String,
    },
    /// `dav://HOST[:PORT]/PATH` (`davs://` with TLS): `root` is the
    /// server path of the folder, starting with `/`.
    WebDav {
        tls: bool,
        host: String,
        port: Option<u16>,
        root: String,
    },
}

/// Settings from the config file or the environment, beside the URL.
#[derive(Debug, Default, Clone)]
pub struct RemoteSettings {
    /// S3: the endpoint URL of an S3-compatible store (else
    /// `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`, else AWS).
    pub endpoint: Option<String>,
    /// S3: the signing region (else `AWS_REGION` / `AWS_DEFAULT_REGION`).
    pub region: Option<String>,
    /// S3: the profile of the shared config and credentials files (else
    /// `AWS_PROFILE`).
    pub profile: Option<String>,
    /// WebDAV: the user name.
    pub user: Option<String>,
    /// WebDAV: the password.
    pub password: Option<Secret>,
    /// SFTP: an ssh config file to use instead of `~/.ssh/config`.
    pub ssh_config: Option<PathBuf>,
    /// SFTP: an identity file to offer (besides the agent's keys).
    pub ssh_key: Option<PathBuf>,
    /// SFTP: a known_hosts file to check the server's key against instead
    /// of `~/.ssh/known_hosts`.
    pub known_hosts: Option<PathBuf>,
    /// S3: the store's ETags are not MD5s of the content even for
    /// single-part uploads (SSE-KMS or SSE-C encryption, some stores), so
    /// a first download is not checked against them.
    pub etags_not_md5: bool,
}

/// A secret (a password): never printed. Read it with [`Secret::expose`]
/// only where it is handed to the protocol.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(secret: String) -> Self {
        Self(secret)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// True when `location` names a remote origin (`scheme://...`) rather than
/// a local directory. Unknown schemes count, so that
/// [`RemoteSpec::parse`] can say which ones exist.
pub fn is_remote_url(location: &str) -> bool {
    match location.split_once("://") {
        Some((scheme, _)) => {
            let mut chars = scheme.chars();
            chars.next().is_some_and(|c| c.is_ascii_alphabetic())
                && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        }
        None => false,
    }
}

const SCHEMES: &str = "s3://BUCKET[/PREFIX], sftp://[USER@]HOST[:PORT]/PATH, \
                       dav://HOST[:PORT]/PATH or davs://HOST[:PORT]/PATH";

impl RemoteSpec {
    /// Parses a remote origin URL; the settings start empty.
    pub fn parse(url: &str) -> Result<RemoteSpec> {
        let shown = redact_url(url);
        let bad = |problem: String| OriginError::InvalidRemote {
            url: shown.clone(),
            problem,
        };
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(bad(format!("not a URL; write {SCHEMES}")));
        };
        if rest.contains(['?', '#']) {
            return Err(bad(
                "a query ('?') or fragment ('#') is not understood; put settings in the config file"
                    .into(),
            ));
        }
        if rest.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad(
                "contains a space or control character; write it percent-encoded (%20)".into(),
            ));
        }
        let (authority, path) = match rest.find('/') {
            Some(at) => (&rest[..at], &rest[at..]),
            None => (rest, ""),
        };
        let path = percent_decode(path).map_err(|e| bad(e.into()))?;
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((userinfo, hostport)) => (Some(userinfo), hostport),
            None => (None, authority),
        };
        if let Some(userinfo) = userinfo {
            if userinfo.contains(':') {
                return Err(bad(
                    "the URL carries a password; remove it from the URL and give it in the config \
                     file or the environment instead (SFTP: use a key or the ssh agent)"
                        .into(),
                ));
            }
        }
        let user = userinfo
            .map(|u| percent_decode(u).map_err(|e| bad(e.into())))
            .transpose()?;
        if user.as_deref() == Some("") {
            return Err(bad(
                "the user before '@' is empty; write USER@HOST or leave the user out".into(),
            ));
        }
        let kind = match scheme.to_ascii_lowercase().as_str() {
            "s3" => {
                if user.is_some() {
                    return Err(bad(
                        "an S3 URL carries no user; credentials come from the AWS config files or \
                         the environment (AWS_PROFILE, AWS_ACCESS_KEY_ID)"
                            .into(),
                    ));
                }
                let bucket = hostport;
                check_bucket(bucket).map_err(bad)?;
                RemoteKind::S3 {
                    bucket: bucket.to_owned(),
                    prefix: clean_path(&path).map_err(bad)?,
                }
            }
            "sftp" => {
                let (host, port) = split_host_port(hostport).map_err(bad)?;
                let root = if path == "/~" || path.starts_with("/~/") {
                    clean_path(&path[2..]).map_err(bad)?
                } else if path.is_empty() {
                    String::new()
                } else {
                    format!("/{}", clean_path(&path).map_err(bad)?)
                };
                RemoteKind::Sftp {
                    user,
                    host,
                    port,
                    root,
                }
            }
            "dav" | "davs" => {
                if user.is_some() {
                    return Err(bad(
                        "put the WebDAV user in the config file or the environment, not in the URL"
                            .into(),
                    ));
                }
                let (host, port) = split_host_port(hostport).map_err(bad)?;
                RemoteKind::WebDav {
                    tls: scheme.eq_ignore_ascii_case("davs"),
                    host,
                    port,
                    root: format!("/{}", clean_path(&path).map_err(bad)?),
                }
            }
            other => {
                return Err(bad(format!(
                    "unsupported scheme '{other}'; write {SCHEMES}"
                )))
            }
        };
        Ok(RemoteSpec {
            kind,
            settings: RemoteSettings::default(),
        })
    }

    /// The URL, without any secret: for logs, `status` and the mount
    /// record. Parsing it again gives the same [`RemoteKind`].
    pub fn redacted(&self) -> String {
        match &self.kind {
            RemoteKind::S3 { bucket, prefix } => {
                let mut url = format!("s3://{bucket}");
                if !prefix.is_empty() {
                    url.push('/');
                    url.push_str(&percent_encode(prefix));
                }
                url
            }
            RemoteKind::Sftp {
                user,
                host,
                port,
                root,
            } => {
                let mut url = "sftp://".to_owned();
                if let Some(user) = user {
                    url.push_str(&percent_encode(user));
                    url.push('@');
                }
                push_host_port(&mut url, host, *port);
                if root.starts_with('/') {
                    url.push_str(&percent_encode(root));
                } else if !root.is_empty() {
                    url.push_str("/~/");
                    url.push_str(&percent_encode(root));
                }
                url
            }
            RemoteKind::WebDav {
                tls,
                host,
                port,
                root,
            } => {
                let mut url = if *tls { "davs://" } else { "dav://" }.to_owned();
                push_host_port(&mut url, host, *port);
                url.push_str(&percent_encode(root));
                url
            }
        }
    }
}

/// `url` with the password of a `user:pass@` part replaced by `***`.
fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, hostport)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:***@{hostport}{path}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// S3's own rules are stricter (3–63 lowercase letters, digits, `.`,
/// `-`); S3-compatible stores vary, so only what can never be a bucket is
/// refused.
fn check_bucket(bucket: &str) -> std::result::Result<(), String> {
    if bucket.is_empty() {
        return Err("the bucket name is missing; write s3://BUCKET or s3://BUCKET/PREFIX".into());
    }
    if !bucket
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
    {
        return Err(format!(
            "'{bucket}' is not a bucket name: use letters, digits, '.', '-' and '_' only"
        ));
    }
    Ok(())
}

/// The path without leading, trailing or doubled `/`, refusing `.` and
/// `..` (a root that climbs is a typo, never a library).
fn clean_path(path: &str) -> std::result::Result<String, String> {
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" => {}
            "." | ".." => {
                return Err(format!(
                    "the path '{path}' contains '.' or '..'; write the folder's plain path"
                ))
            }
            p => parts.push(p),
        }
    }
    Ok(parts.join("/"))
}

fn split_host_port(hostport: &str) -> std::result::Result<(String, Option<u16>), String> {
    let (host, port) = if let Some(rest) = hostport.strip_prefix('[') {
        // An IPv6 literal: [::1]:2222
        let Some((host, after)) = rest.split_once(']') else {
            return Err(format!(
                "'{hostport}': an IPv6 address needs its closing ']', as in [::1]:22"
            ));
        };
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or_else(|| {
                format!("'{hostport}': write a port after the address as [ADDR]:PORT")
            })?),
        };
        (host, port)
    } else {
        match hostport.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (hostport, None),
        }
    };
    if host.is_empty() {
        return Err("the host is missing; write HOST or HOST:PORT after '//'".into());
    }
    let port = match port {
        None => None,
        Some(p) => match p.parse::<u16>() {
            Ok(0) | Err(_) => {
                return Err(format!(
                    "'{p}' is not a port; write a number from 1 to 65535 after ':'"
                ))
            }
            Ok(n) => Some(n),
        },
    };
    Ok((host.to_owned(), port))
}

fn push_host_port(url: &mut String, host: &str, port: Option<u16>) {
    if host.contains(':') {
        url.push('[');
        url.push_str(host);
        url.push(']');
    } else {
        url.push_str(host);
    }
    if let Some(port) = port {
        url.push(':');
        url.push_str(&port.to_string());
    }
}

fn percent_decode(s: &str) -> std::result::Result<String, &'static str> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or("a '%' must be followed by two hex digits (write '%25' for '%')")?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "percent-encoded bytes that are not UTF-8")
}

/// Encodes what would not survive [`RemoteSpec::parse`]: `%`, `?`, `#`,
/// `@`, `:` in user names, spaces and controls.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_whitespace() || c.is_control() || matches!(c, '%' | '?' | '#' | '@' | ':') {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests;
