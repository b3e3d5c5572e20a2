//! Settings for `musicfs mount`: a TOML file, overridden by flags.
//!
//! Every parse error here is a usage error (exit 2) whose message says what
//! to fix.

use std::path::{Path, PathBuf};
use std::time::Duration;

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
}

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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginSpec {
    pub name: OriginId,
    pub location: PathBuf,
}

/// `[NAME=]LOCATION`. LOCATION is a directory for now; URLs of other
/// schemes are refused with a clear message.
pub fn parse_origin(spec: &str) -> Result<OriginSpec, UsageError> {
    let (name, location) = match spec.split_once('=') {
        Some((n, l)) if !n.contains('/') && !n.contains("://") => (Some(n), l),
        _ => (None, spec),
    };
    if let Some((scheme, _)) = location.split_once("://") {
        return Err(usage(format!(
            "origin '{spec}': '{scheme}://' origins are not supported yet; give a directory path"
        )));
    }
    if location.is_empty() {
        return Err(usage(format!(
            "origin '{spec}': the location is empty; give a directory path"
        )));
    }
    let location = PathBuf::from(location);
    let name = match name {
        Some(n) => n.to_owned(),
        None => location
            .components()
            .next_back()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .filter(|n| n != "/" && n != "." && n != "..")
            .ok_or_else(|| {
                usage(format!(
                    "origin '{spec}': cannot name it after its path; use NAME={spec}"
                ))
            })?,
    };
    let name = OriginId::new(&name).map_err(|e| usage(format!("origin '{spec}': {e}")))?;
    Ok(OriginSpec { name, location })
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

    #[test]
    fn origins() {
        let o = parse_origin("/srv/music").unwrap();
        assert_eq!(o.name.as_str(), "music");
        assert_eq!(o.location, PathBuf::from("/srv/music"));
        let o = parse_origin("nas=/mnt/nas/Music/").unwrap();
        assert_eq!(o.name.as_str(), "nas");
        assert_eq!(parse_origin("/mnt/Björk/").unwrap().name.as_str(), "Björk");
        let e = parse_origin("s3://bucket/music").unwrap_err().to_string();
        assert!(e.contains("not supported yet"), "{e}");
        assert!(parse_origin("/").is_err());
        assert!(parse_origin("x=").is_err());
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
        std::fs::write(&p, "cache_sise = 1\n").unwrap();
        let e = FileConfig::load(&p).unwrap_err().to_string();
        assert!(e.contains("not valid"), "{e}");
        assert!(FileConfig::load(&dir.path().join("missing.toml")).is_err());
    }
}
