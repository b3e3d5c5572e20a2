//! Where a mount may go. A mountpoint inside an origin would make MusicFS
//! serve itself to itself (a `find` recursed 588 levels deep and marked the
//! origin hung); an origin inside the mountpoint would be hidden by the
//! mount and reached through it; a mountpoint that is a live MusicFS mount
//! is someone else's. Each is refused as a usage error (exit 2, one line).
//!
//! Invariant: paths are compared resolved (symlinks followed, `..` gone)
//! and component by component, never as string prefixes: `/music2` is not
//! inside `/music`.

use std::path::{Component, Path, PathBuf};

use crate::config::{OriginSpec, UsageError};
use crate::{lock, mountinfo};

/// `p` with symlinks resolved as far as it exists: the canonical path of
/// its longest existing ancestor, with the rest appended (an origin may be
/// absent while its NAS is down).
pub fn resolve(p: &Path) -> PathBuf {
    let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    if let Ok(c) = abs.canonicalize() {
        return c;
    }
    let parts: Vec<Component> = abs.components().collect();
    for split in (1..parts.len()).rev() {
        let head: PathBuf = parts[..split].iter().collect();
        if let Ok(mut c) = head.canonicalize() {
            c.extend(&parts[split..]);
            return normalise(&c);
        }
    }
    normalise(&abs)
}

/// Drops `.` and resolves `..` lexically (for the part of a path that does
/// not exist, so has no symlinks to follow).
fn normalise(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// Refuses a mountpoint inside (or equal to) an origin, and an origin
/// inside the mountpoint. Both paths must be resolved.
pub fn refuse_nesting(mountpoint: &Path, origins: &[OriginSpec]) -> Result<(), UsageError> {
    for o in origins {
        // A remote origin cannot nest with a local mountpoint.
        let Some(dir) = o.location.dir() else {
            continue;
        };
        let (name, loc) = (&o.name, dir.display());
        let mp = mountpoint.display();
        if mountpoint == dir {
            return Err(UsageError(format!(
                "mountpoint {mp} is the directory of origin {name} itself: choose a mountpoint \
                 outside every origin"
            )));
        }
        if mountpoint.starts_with(dir) {
            return Err(UsageError(format!(
                "mountpoint {mp} is inside origin {name} ({loc}): MusicFS would serve itself \
                 to itself; choose a mountpoint outside every origin"
            )));
        }
        if dir.starts_with(mountpoint) {
            return Err(UsageError(format!(
                "origin {name} ({loc}) is inside the mountpoint {mp}: the mount would hide it; \
                 choose a mountpoint outside every origin"
            )));
        }
    }
    Ok(())
}

/// Refuses a mountpoint that a running MusicFS serves, naming its PID. A
/// MusicFS mount whose process is gone is a dead mount, left for the
/// caller to clean up.
pub fn refuse_live_mount(mountpoint: &Path) -> Result<(), UsageError> {
    let table = mountinfo::read();
    let Some(entry) = mountinfo::mounted_at(&table, mountpoint) else {
        return Ok(());
    };
    let Some(pid) = musicfs_fuse::serving_pid(&entry.source) else {
        return Ok(());
    };
    if !lock::pid_alive(pid) {
        return Ok(());
    }
    let mp = mountpoint.display();
    Err(UsageError(format!(
        "mountpoint {mp} is already a live MusicFS mount served by PID {pid}: stop it first \
         (`kill {pid}`) or choose another mountpoint"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use musicfs_origins::OriginId;

    fn origin(name: &str, loc: &str) -> OriginSpec {
        OriginSpec {
            name: OriginId::new(name).unwrap(),
            location: crate::config::Location::Dir(PathBuf::from(loc)),
            timeout: None,
            connections: None,
        }
    }

    #[test]
    fn nesting_is_by_components() {
        let os = [origin("music", "/srv/music")];
        assert!(refuse_nesting(Path::new("/srv/music2"), &os).is_ok());
        assert!(refuse_nesting(Path::new("/srv/mus"), &os).is_ok());
        assert!(refuse_nesting(Path::new("/mnt"), &os).is_ok());
        let inside = refuse_nesting(Path::new("/srv/music/mnt"), &os)
            .unwrap_err()
            .0;
        assert!(inside.contains("is inside origin music"), "{inside}");
        let same = refuse_nesting(Path::new("/srv/music"), &os).unwrap_err().0;
        assert!(same.contains("itself"), "{same}");
        let covers = refuse_nesting(Path::new("/srv"), &os).unwrap_err().0;
        assert!(covers.contains("is inside the mountpoint /srv"), "{covers}");
    }

    #[test]
    fn absent_paths_resolve_through_their_existing_ancestors() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let real = real.canonicalize().unwrap();
        assert_eq!(resolve(&link), real);
        assert_eq!(resolve(&link.join("nas/music")), real.join("nas/music"));
        assert_eq!(resolve(&link.join("a/../b/./c")), real.join("b/c"));
    }
}
