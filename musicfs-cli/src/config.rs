//! Settings for `musicfs mount`: a TOML file, overridden by flags.
//!
//! Every parse error here is a usage error (exit 2) whose message says what
//! to fix.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use musicfs_origins::remote::{self, RemoteKind, RemoteSpec, Secret};
use musicfs_origins::OriginId;
use serde::Deserialize;

pub const DEFAULT_CACHE_SIZE: u64 = 20 << 30;
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(5);

/// A mistake in what the user asked for: reported in one line, exit 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

fn usage(msg: impl Into<String>) -> UsageError {
    UsageError(msg.into())
}

/// The config file: the same settings as the flags.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub cache_dir: Option<PathBuf>,
    pub cache_size: Option<SizeValue>,
    pub read_timeout: Option<u64>,
    pub health_timeout: Option<u64>,
    pub listing_ttl: Option<u64>,
    pub freshness: Option<u64>,
    #[serde(default)]
    pub origins: Vec<String>,
    pub log_level: Option<String>,
    /// Settings of one origin, by name: `[origin.NAME]`.
    #[serde(default)]
    pub origin: BTreeMap<String, OriginSettings>,
}

/// `[origin.NAME]`: what a remote origin needs beyond its URL. Secrets
/// (`password`) live here or in the environment, never in the URL.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OriginSettings {
    /// The location, instead of naming it in `origins`.
    pub url: Option<String>,
    /// S3: the endpoint of an S3-compatible store (else `AWS_ENDPOINT_URL_S3`
    /// / `AWS_ENDPOINT_URL`, else AWS).
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// S3: the profile of the shared config and credentials files.
    pub profile: Option<String>,
    /// WebDAV: the user (else `MUSICFS_WEBDAV_USER`).
    pub user: Option<String>,
    /// WebDAV: the password (else `MUSICFS_WEBDAV_PASSWORD`).
    pub password: Option<String>,
    /// SFTP: an ssh_config file (else `~/.ssh/config`).
    pub ssh_config: Option<PathBuf>,
    /// SFTP: the identity file (else the agent and `~/.ssh/config`).
    pub ssh_key: Option<PathBuf>,
    /// SFTP: the known_hosts file (else `~/.ssh/known_hosts`).
    pub known_hosts: Option<PathBuf>,
    /// Seconds one request to this origin may take before it is abandoned
    /// and tried again on a fresh connection.
    pub timeout: Option<u64>,
    /// Requests to this origin in flight at once.
    pub connections: Option<usize>,
    /// S3: the bucket's ETags are not MD5s (SSE-KMS or SSE-C encryption),
    /// so a first download is not checked against them.
    #[serde(default)]
    pub etags_not_md5: bool,
}

/// Environment variables a WebDAV origin takes its login from when the
/// config file does not give it.
pub const WEBDAV_USER_ENV: &str = "MUSICFS_WEBDAV_USER";
pub const WEBDAV_PASSWORD_ENV: &str = "MUSICFS_WEBDAV_PASSWORD";

/// `cache_size = "20G"` or `cache_size = 1073741824`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum SizeValue {
    Bytes(u64),
    Text(String),
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<Self, UsageError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| usage(format!("cannot read config file {}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| {
            usage(format!(
                "config file {} is not valid: {}",
                path.display(),
                e.message()
            ))
        })
    }
}

/// One origin as the user gave it: a name and where the music lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginSpec {
    pub name: OriginId,
    pub location: Location,
    /// Per-request timeout and connection limit (remote origins).
    pub timeout: Option<Duration>,
    pub connections: Option<usize>,
}

/// Where an origin's music lives.
#[derive(Clone)]
pub enum Location {
    /// A local or NAS directory.
    Dir(PathBuf),
    /// An S3 bucket, SFTP server or WebDAV folder.
    Remote(Box<RemoteSpec>),
}

impl Location {
    /// The directory, for a local origin.
    pub fn dir(&self) -> Option<&Path> {
        match self {
            Location::Dir(p) => Some(p),
            Location::Remote(_) => None,
        }
    }
}

/// The path, or the URL without secrets: what logs, `status` and the
/// mount record show.
impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Dir(p) => write!(f, "{}", p.display()),
            Location::Remote(r) => f.write_str(&r.redacted()),
        }
    }
}

impl fmt::Debug for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Location({self})")
    }
}

/// Two locations are the same when they show the same and carry the same
/// settings (a reload compares them to say what needs a remount).
impl PartialEq for Location {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Location::Dir(a), Location::Dir(b)) => a == b,
            (Location::Remote(a), Location::Remote(b)) => {
                a.redacted() == b.redacted()
                    && format!("{:?}", a.settings) == format!("{:?}", b.settings)
                    && a.settings.password.as_ref().map(Secret::expose)
                        == b.settings.password.as_ref().map(Secret::expose)
            }
            _ => false,
        }
    }
}

impl Eq for Location {}

/// `[NAME=]LOCATION`: LOCATION is a directory or a URL (`s3://`, `sftp://`,
/// `dav://`, `davs://`). `settings` are the config file's `[origin.NAME]`
/// tables; a URL's settings come from its table.
pub fn parse_origin(
    spec: &str,
    settings: &BTreeMap<String, OriginSettings>,
) -> Result<OriginSpec, UsageError> {
    // NAME is what comes before the first '=', unless that is part of a
    // path or URL (`a/b=c` is a path; so is `s3://b/x=y`).
    let (name, location) = match spec.split_once('=') {
        Some((n, l)) if !n.contains('/') && !n.contains(':') => (Some(n), l),
        _ => (None, spec),
    };
    if location.is_empty() {
        return Err(usage(format!(
            "origin '{spec}': the location is empty; give a directory path or a URL \
             (s3://BUCKET/PREFIX, sftp://HOST/PATH, dav://HOST/PATH)"
        )));
    }
    let remote = if remote::is_remote_url(location) {
        Some(
            RemoteSpec::parse(location)
                .map_err(|e| usage(format!("origin '{}': {e}", redact_spec(spec))))?,
        )
    } else {
        None
    };
    let name = match name {
        Some(n) => n.to_owned(),
        None => default_name(location, remote.as_ref()).ok_or_else(|| {
            usage(format!(
                "origin '{}': cannot name it after its location; use NAME={}",
                redact_spec(spec),
                redact_spec(spec)
            ))
        })?,
    };
    let id = OriginId::new(&name).map_err(|e| usage(format!("origin '{spec}': {e}")))?;
    let own = settings.get(&name).cloned().unwrap_or_default();
    let location = match remote {
        Some(mut r) => {
            apply_settings(&mut r, &own, &name)?;
            Location::Remote(Box::new(r))
        }
        None => {
            if own != (OriginSettings::default()) && own.url.is_none() {
                return Err(usage(format!(
                    "[origin.{name}]: origin {name} is a directory; its settings are for \
                     remote origins (s3://, sftp://, dav://) only"
                )));
            }
            Location::Dir(PathBuf::from(location))
        }
    };
    Ok(OriginSpec {
        name: id,
        location,
        timeout: match own.timeout {
            Some(0) => {
                return Err(usage(format!(
                    "[origin.{name}]: timeout must be at least 1 second"
                )))
            }
            t => t.map(Duration::from_secs),
        },
        connections: match own.connections {
            Some(0) => {
                return Err(usage(format!(
                    "[origin.{name}]: connections must be at least 1"
                )))
            }
            c => c,
        },
    })
}

/// Origins named only by `[origin.NAME] url = ...` tables.
pub fn origins_from_tables(settings: &BTreeMap<String, OriginSettings>) -> Vec<String> {
    settings
        .iter()
        .filter_map(|(name, s)| s.url.as_ref().map(|u| format!("{name}={u}")))
        .collect()
}

/// A spec as it may be shown: a URL's user info dropped.
fn redact_spec(spec: &str) -> String {
    match spec.split_once("://") {
        Some((head, rest)) => match rest.split_once('@') {
            Some((_, tail)) if !tail.is_empty() => format!("{head}://***@{tail}"),
            _ => spec.to_owned(),
        },
        None => spec.to_owned(),
    }
}

/// The name an origin gets when the user gives none: a directory's last
/// component; a URL's last path component, else its bucket or host.
fn default_name(location: &str, remote: Option<&RemoteSpec>) -> Option<String> {
    let last = |p: &str| {
        p.rsplit('/')
            .find(|c| !c.is_empty() && *c != "." && *c != "..")
            .map(str::to_owned)
    };
    match remote.map(|r| &r.kind) {
        Some(RemoteKind::S3 { bucket, prefix }) => last(prefix).or_else(|| Some(bucket.clone())),
        Some(RemoteKind::Sftp { host, root, .. }) | Some(RemoteKind::WebDav { host, root, .. }) => {
            last(root).or_else(|| Some(host.clone()))
        }
        None => PathBuf::from(location)
            .components()
            .next_back()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .filter(|n| n != "/" && n != "." && n != ".."),
    }
}

/// Fills a remote spec from its `[origin.NAME]` table and the environment.
fn apply_settings(r: &mut RemoteSpec, own: &OriginSettings, name: &str) -> Result<(), UsageError> {
    let is_dav = matches!(r.kind, RemoteKind::WebDav { .. });
    let is_s3 = matches!(r.kind, RemoteKind::S3 { .. });
    let is_sftp = matches!(r.kind, RemoteKind::Sftp { .. });
    let misplaced = |key: &str, ok: bool| -> Result<(), UsageError> {
        if ok {
            Ok(())
        } else {
            Err(usage(format!(
                "[origin.{name}]: `{key}` does not apply to this kind of origin"
            )))
        }
    };
    misplaced("endpoint", own.endpoint.is_none() || is_s3)?;
    misplaced("region", own.region.is_none() || is_s3)?;
    misplaced("profile", own.profile.is_none() || is_s3)?;
    misplaced("etags_not_md5", !own.etags_not_md5 || is_s3)?;
    misplaced("user", own.user.is_none() || is_dav)?;
    misplaced("password", own.password.is_none() || is_dav)?;
    misplaced("ssh_config", own.ssh_config.is_none() || is_sftp)?;
    misplaced("ssh_key", own.ssh_key.is_none() || is_sftp)?;
    misplaced("known_hosts", own.known_hosts.is_none() || is_sftp)?;
    let s = &mut r.settings;
    s.endpoint = own.endpoint.clone().or(s.endpoint.take());
    s.region = own.region.clone().or(s.region.take());
    s.profile = own.profile.clone().or(s.profile.take());
    s.etags_not_md5 |= own.etags_not_md5;
    s.ssh_config = own
        .ssh_config
        .as_deref()
        .map(expand_home)
        .or(s.ssh_config.take());
    s.ssh_key = own.ssh_key.as_deref().map(expand_home).or(s.ssh_key.take());
    s.known_hosts = own
        .known_hosts
        .as_deref()
        .map(expand_home)
        .or(s.known_hosts.take());
    if is_dav {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        s.user = own
            .user
            .clone()
            .or(s.user.take())
            .or_else(|| env(WEBDAV_USER_ENV));
        s.password = own
            .password
            .clone()
            .or_else(|| env(WEBDAV_PASSWORD_ENV))
            .map(Secret::new)
            .or(s.password.take());
    }
    Ok(())
}

/// `~/x` as the user's home; other paths unchanged.
fn expand_home(p: &Path) -> PathBuf {
    match p.strip_prefix("~") {
        Ok(rest) => std::env::var_os("HOME")
            .map_or_else(|| p.to_path_buf(), |h| PathBuf::from(h).join(rest)),
        Err(_) => p.to_path_buf(),
    }
}

/// `512M`, `20G`, `1.5T`, `4096` (bytes). Units are binary (K = 1024).
pub fn parse_size(text: &str) -> Result<u64, UsageError> {
    let t = text.trim();
    let bad = || {
        usage(format!(
            "cannot read size '{text}': use bytes or a number with K, M, G or T (e.g. 512M, 20G)"
        ))
    };
    let upper = t.to_ascii_uppercase();
    let upper = upper.trim_end_matches("IB").trim_end_matches('B');
    let (num, mult) = match upper.chars().last() {
        Some('K') => (&upper[..upper.len() - 1], 1u64 << 10),
        Some('M') => (&upper[..upper.len() - 1], 1 << 20),
        Some('G') => (&upper[..upper.len() - 1], 1 << 30),
        Some('T') => (&upper[..upper.len() - 1], 1 << 40),
        Some(c) if c.is_ascii_digit() => (upper, 1),
        _ => return Err(bad()),
    };
    let value: f64 = num.trim().parse().map_err(|_| bad())?;
    if !value.is_finite() || value <= 0.0 {
        return Err(bad());
    }
    let bytes = value * mult as f64;
    // Under one byte would truncate to a cache of 0 bytes, which "0" itself
    // is refused as.
    if !(1.0..=u64::MAX as f64).contains(&bytes) {
        return Err(bad());
    }
    Ok(bytes as u64)
}

pub fn size_value(v: &SizeValue) -> Result<u64, UsageError> {
    match v {
        SizeValue::Bytes(b) if *b > 0 => Ok(*b),
        SizeValue::Bytes(_) => Err(usage("cache_size must be larger than 0")),
        SizeValue::Text(t) => parse_size(t),
    }
}

/// `$XDG_CACHE_HOME/musicfs`, else `~/.cache/musicfs`.
pub fn default_cache_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("musicfs");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".cache").join("musicfs")
}

pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("20G").unwrap(), 20 << 30);
        assert_eq!(parse_size("20GiB").unwrap(), 20 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("1.5k").unwrap(), 1536);
        for bad in ["", "G", "12X", "-5M", "0", "lots", "1e400G"] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn sizes_under_one_byte_are_refused() {
        // Found by the config fuzz target: ".7741824\n" parsed as 0 bytes.
        for tiny in [".7741824\n", "0.5", "0.0001K"] {
            assert!(parse_size(tiny).is_err(), "{tiny:?} accepted");
        }
        assert_eq!(parse_size("1").unwrap(), 1);
        assert_eq!(parse_size("0.5K").unwrap(), 512);
    }

    fn origin(spec: &str) -> Result<OriginSpec, UsageError> {
        parse_origin(spec, &BTreeMap::new())
    }

    #[test]
    fn origins() {
        let o = origin("/srv/music").unwrap();
        assert_eq!(o.name.as_str(), "music");
        assert_eq!(o.location.dir(), Some(Path::new("/srv/music")));
        let o = origin("nas=/mnt/nas/Music/").unwrap();
        assert_eq!(o.name.as_str(), "nas");
        assert_eq!(origin("/mnt/Björk/").unwrap().name.as_str(), "Björk");
        assert!(origin("/").is_err());
        assert!(origin("x=").is_err());
        // A '=' inside a path is part of the path.
        let o = origin("/srv/a=b").unwrap();
        assert_eq!(o.name.as_str(), "a=b");
    }

    #[test]
    fn remote_origins_are_named_after_their_url() {
        let o = origin("s3://bucket/music/flac").unwrap();
        assert_eq!(o.name.as_str(), "flac");
        assert!(o.location.dir().is_none());
        assert_eq!(o.location.to_string(), "s3://bucket/music/flac");
        assert_eq!(origin("s3://bucket").unwrap().name.as_str(), "bucket");
        assert_eq!(origin("sftp://me@nas/").unwrap().name.as_str(), "nas");
        let o = origin("lib=dav://127.0.0.1:8080/Music").unwrap();
        assert_eq!(o.name.as_str(), "lib");
        assert!(origin("nope://x/y").is_err());
    }

    #[test]
    fn passwords_never_come_from_urls_nor_show_in_errors() {
        let e = origin("dav://me:hunter2@host/Music")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("hunter2"), "{e}");
        assert!(e.contains("config"), "{e}");
    }

    #[test]
    fn origin_tables_apply_to_their_origin() {
        let mut t = BTreeMap::new();
        t.insert(
            "lib".to_owned(),
            OriginSettings {
                user: Some("u".into()),
                password: Some("hunter2".into()),
                timeout: Some(7),
                connections: Some(3),
                ..Default::default()
            },
        );
        let o = parse_origin("lib=davs://host/Music", &t).unwrap();
        assert_eq!(o.timeout, Some(Duration::from_secs(7)));
        assert_eq!(o.connections, Some(3));
        let Location::Remote(r) = &o.location else {
            panic!("not remote")
        };
        assert_eq!(r.settings.user.as_deref(), Some("u"));
        assert_eq!(
            r.settings.password.as_ref().map(Secret::expose),
            Some("hunter2")
        );
        assert!(!format!("{o:?}").contains("hunter2"));
        assert!(!o.location.to_string().contains("hunter2"));
        // S3 keys do not belong to a WebDAV origin, nor any to a directory.
        t.get_mut("lib").unwrap().region = Some("eu".into());
        let e = parse_origin("lib=davs://host/Music", &t).unwrap_err().0;
        assert!(e.contains("`region` does not apply"), "{e}");
        let e = parse_origin("lib=/srv/music", &t).unwrap_err().0;
        assert!(e.contains("remote origins"), "{e}");
    }

    #[test]
    fn config_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("musicfs.toml");
        std::fs::write(
            &p,
            "cache_size = \"1G\"\nread_timeout = 10\norigins = [\"lib=/srv/music\"]\n",
        )
        .unwrap();
        let c = FileConfig::load(&p).unwrap();
        assert_eq!(size_value(c.cache_size.as_ref().unwrap()).unwrap(), 1 << 30);
        assert_eq!(c.read_timeout, Some(10));
        std::fs::write(
            &p,
            "[origin.s3lib]\nurl = \"s3://b/m\"\nendpoint = \"http://127.0.0.1:1\"\n",
        )
        .unwrap();
        let c = FileConfig::load(&p).unwrap();
        assert_eq!(origins_from_tables(&c.origin), vec!["s3lib=s3://b/m"]);
        std::fs::write(&p, "[origin.x]\nendpoints = \"e\"\n").unwrap();
        assert!(FileConfig::load(&p).is_err());
        std::fs::write(&p, "cache_sise = 1\n").unwrap();
        let e = FileConfig::load(&p).unwrap_err().to_string();
        assert!(e.contains("not valid"), "{e}");
        assert!(FileConfig::load(&dir.path().join("missing.toml")).is_err());
    }
}
