//! Which symlinks of a local origin are served, and with what target.
//!
//! Layer: inside [`super::LocalOrigin`], on its blocking threads.
//!
//! A symlink is served when its target resolves inside the origin root, and
//! hidden otherwise. The check runs on every `list`, `stat` and `read_link`
//! (a link can be re-pointed on the origin at any time) and has three parts:
//! - As written, the target never climbs above the root
//!   ([`OriginPath::lexical_link_target`]), so the kernel, which resolves the
//!   served target through the mount, can never walk out of the origin's
//!   directory there either.
//! - As resolved on the origin, the way the kernel would (each `..` applies
//!   to where the links before it led; at most [`MAX_HOPS`] links, Linux's
//!   limit), it stays inside the root and ends on an existing file or
//!   directory. A link to a link that escapes is hidden; a link that leads
//!   nowhere (missing target, too many levels, a FIFO) is hidden too, since
//!   it would be broken through the mount anyway.
//! - An absolute target is served only when it names a place under the
//!   root (as configured, or with its symlinks resolved, since NAS links
//!   often use the canonical path): it is rewritten to the equivalent
//!   relative target (`/srv/music/Albums/X` from `Favourites/X` becomes
//!   `../Albums/X`). Served as is, it would resolve on the host outside the
//!   mount, past the cache, and break when the NAS is down. Any other
//!   absolute target is hidden.
//!
//! Resolving reads only metadata (`lstat`, `readlink`) of entries inside the
//! root; nothing outside it is ever touched, and no file is opened through
//! a link. The walk and the kernel's later resolution are not atomic: a
//! link changed in between is seen by the next check (the next listing).

use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};

use crate::OriginPath;

/// Links followed in one resolution at most: Linux's `MAXSYMLINKS`.
pub(super) const MAX_HOPS: usize = 40;

/// Why a symlink is not served.
#[derive(Debug)]
pub(super) enum Refusal {
    /// It is there, but hidden; the reason is for logs and errors.
    Hidden(&'static str),
    /// It stopped being a symlink (deleted or replaced) since it was seen.
    Gone,
    /// The origin failed while checking (an I/O error, a NAS going away).
    Io(io::Error),
}

const LEAVES: &str = "its target leaves the origin root";
const NOWHERE: &str = "its target does not exist";

/// The target to serve for the symlink at `link` (whose host path is
/// `host`), or why it is not served.
pub(super) fn check(root: &Path, link: &OriginPath, host: &Path) -> Result<PathBuf, Refusal> {
    let raw = match fs::read_link(host) {
        Ok(raw) => raw,
        Err(e) if gone(&e) => return Err(Refusal::Gone),
        Err(e) => return Err(Refusal::Io(e)),
    };
    let parent_depth = link.components().count().saturating_sub(1);
    let served = if raw.is_absolute() {
        let rest = under_root(root, &raw).ok_or(Refusal::Hidden(
            "its absolute target is outside the origin root",
        ))?;
        relative_from(parent_depth, &rest)
    } else {
        raw
    };
    if link.lexical_link_target(&served).is_none() {
        return Err(Refusal::Hidden(if served.as_os_str().is_empty() {
            NOWHERE
        } else {
            LEAVES
        }));
    }
    let dir: Vec<OsString> = link
        .components()
        .take(parent_depth)
        .map(OsString::from)
        .collect();
    resolve(root, dir, &served)?;
    Ok(served)
}

/// True when a `readlink` error means the path is no longer a symlink.
fn gone(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::EINVAL)
}

/// `abs` relative to the root, when it lies under the root as configured or
/// as canonicalised.
fn under_root(root: &Path, abs: &Path) -> Option<PathBuf> {
    if let Ok(rest) = abs.strip_prefix(root) {
        return Some(rest.to_path_buf());
    }
    let canonical = fs::canonicalize(root).ok()?;
    abs.strip_prefix(canonical).ok().map(Path::to_path_buf)
}

/// The relative path from a directory `depth` levels below the root to
/// `rest` (a path relative to the root).
fn relative_from(depth: usize, rest: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for _ in 0..depth {
        out.push("..");
    }
    for c in rest.components() {
        if !matches!(c, Component::CurDir) {
            out.push(c.as_os_str());
        }
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    out
}

enum Step {
    Up,
    Name(OsString),
}

/// Queues `target`'s components so that popping yields them in order.
fn push_target(todo: &mut Vec<Step>, target: &Path) {
    for c in target.components().rev() {
        match c {
            Component::Normal(name) => todo.push(Step::Name(name.to_owned())),
            Component::ParentDir => todo.push(Step::Up),
            // Absolute targets are mapped by the caller before this.
            Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
        }
    }
}

/// Resolves `target` from the directory `dir` (components below the root),
/// following links as the kernel would, without leaving the root.
fn resolve(root: &Path, mut dir: Vec<OsString>, target: &Path) -> Result<(), Refusal> {
    let mut todo = Vec::new();
    push_target(&mut todo, target);
    let mut hops = 0usize;
    while let Some(step) = todo.pop() {
        let name = match step {
            Step::Up => {
                if dir.pop().is_none() {
                    return Err(Refusal::Hidden(LEAVES));
                }
                continue;
            }
            Step::Name(name) => name,
        };
        // Every component in `dir` was checked to be a real directory (a
        // link is replaced by where it leads), so this lstat crosses no
        // symlink but the ones being resolved here.
        let mut host = root.to_path_buf();
        host.extend(&dir);
        host.push(&name);
        let meta = match fs::symlink_metadata(&host) {
            Ok(meta) => meta,
            Err(e) => return Err(missing_or_io(e)),
        };
        let kind = meta.file_type();
        if kind.is_symlink() {
            hops += 1;
            if hops > MAX_HOPS {
                return Err(Refusal::Hidden("too many levels of symbolic links"));
            }
            let next = match fs::read_link(&host) {
                Ok(next) => next,
                // Changed while we looked: as good as missing right now.
                Err(e) if gone(&e) => return Err(Refusal::Hidden(NOWHERE)),
                Err(e) => return Err(Refusal::Io(e)),
            };
            if next.is_absolute() {
                let rest = under_root(root, &next).ok_or(Refusal::Hidden(LEAVES))?;
                dir.clear();
                push_target(&mut todo, &rest);
            } else {
                push_target(&mut todo, &next);
            }
        } else if kind.is_dir() {
            dir.push(name);
        } else if kind.is_file() {
            if !todo.is_empty() {
                // A file used as a directory: ENOTDIR.
                return Err(Refusal::Hidden(NOWHERE));
            }
        } else {
            return Err(Refusal::Hidden(
                "its target is not a file or directory (a FIFO, socket or device)",
            ));
        }
    }
    Ok(())
}

/// An lstat failure during resolution: a missing entry or one MusicFS
/// cannot read hides the link; anything else is the origin failing.
fn missing_or_io(e: io::Error) -> Refusal {
    match e.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ENOTDIR) => Refusal::Hidden(NOWHERE),
        Some(libc::EACCES) | Some(libc::EPERM) => {
            Refusal::Hidden("its target cannot be read by MusicFS")
        }
        _ => Refusal::Io(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use tempfile::TempDir;

    /// root/Albums/Glass Echo/01.flac, root/Albums/Solo.flac, root/Favourites/
    fn tree() -> TempDir {
        let dir = TempDir::new().unwrap();
        let album = dir.path().join("Albums/Glass Echo");
        fs::create_dir_all(&album).unwrap();
        fs::write(album.join("01.flac"), b"x").unwrap();
        fs::write(dir.path().join("Albums/Solo.flac"), b"y").unwrap();
        fs::create_dir(dir.path().join("Favourites")).unwrap();
        dir
    }

    /// Makes `link -> target` in `dir` and checks it.
    fn link(dir: &TempDir, link: &str, target: impl AsRef<Path>) -> Result<PathBuf, Refusal> {
        let host = dir.path().join(link);
        symlink(target, &host).unwrap();
        check(dir.path(), &OriginPath::new(link).unwrap(), &host)
    }

    fn served(r: Result<PathBuf, Refusal>) -> String {
        match r {
            Ok(t) => t.to_string_lossy().into_owned(),
            Err(e) => panic!("hidden: {e:?}"),
        }
    }

    fn hidden(r: Result<PathBuf, Refusal>) -> &'static str {
        match r {
            Err(Refusal::Hidden(why)) => why,
            other => panic!("not hidden: {other:?}"),
        }
    }

    #[test]
    fn links_inside_are_served_as_written() {
        let d = tree();
        assert_eq!(
            served(link(&d, "Favourites/Echo", "../Albums/Glass Echo")),
            "../Albums/Glass Echo"
        );
        assert_eq!(
            served(link(&d, "Favourites/Solo", "../Albums/./Solo.flac")),
            "../Albums/./Solo.flac"
        );
        assert_eq!(served(link(&d, "all", ".")), ".");
        // A link to a link to an album, and through a linked directory.
        assert_eq!(served(link(&d, "Favourites/Again", "Echo")), "Echo");
        assert_eq!(
            served(link(&d, "Favourites/Track", "Echo/01.flac")),
            "Echo/01.flac"
        );
    }

    #[test]
    fn links_leaving_the_root_are_hidden() {
        let outside = TempDir::new().unwrap();
        fs::write(outside.path().join("secret.flac"), b"s").unwrap();
        let d = tree();
        assert_eq!(hidden(link(&d, "etc", "/etc")), LEAVES_ABS);
        assert_eq!(
            hidden(link(&d, "secret.flac", outside.path().join("secret.flac"))),
            LEAVES_ABS
        );
        assert_eq!(hidden(link(&d, "Favourites/up", "../..")), LEAVES);
        assert_eq!(
            hidden(link(&d, "Favourites/up2", "../Albums/../../x")),
            LEAVES
        );
        // Each link stays inside as written, but the chain leaves: the
        // second link sits at the root, so its '..' is outside.
        symlink("..", d.path().join("parent")).unwrap();
        assert_eq!(hidden(link(&d, "Favourites/chain", "../parent")), LEAVES);
        // A chain that ends on an absolute target outside.
        symlink("/etc", d.path().join("Albums/etc")).unwrap();
        assert_eq!(hidden(link(&d, "Favourites/etc", "../Albums/etc")), LEAVES);
        // `..` applies to where a link led, not to the text: after `deep`
        // (two levels down) it is `Albums`, and after `here` (the root) it
        // leaves, although both targets read as inside.
        symlink("Albums/Glass Echo", d.path().join("deep")).unwrap();
        assert_eq!(
            served(link(&d, "Favourites/ok", "../deep/../Solo.flac")),
            "../deep/../Solo.flac"
        );
        symlink(".", d.path().join("here")).unwrap();
        assert_eq!(hidden(link(&d, "Favourites/out", "../here/../x")), LEAVES);
    }

    const LEAVES_ABS: &str = "its absolute target is outside the origin root";

    #[test]
    fn absolute_targets_inside_are_rewritten_relative() {
        let d = tree();
        let abs = d.path().join("Albums/Glass Echo");
        assert_eq!(
            served(link(&d, "Favourites/Echo", &abs)),
            "../Albums/Glass Echo"
        );
        assert_eq!(served(link(&d, "Echo", &abs)), "Albums/Glass Echo");
        assert_eq!(served(link(&d, "Favourites/root", d.path())), "..");
        assert_eq!(served(link(&d, "root", d.path())), ".");
        // Through the canonical root as well (the configured one is a link).
        let alias_dir = TempDir::new().unwrap();
        let alias = alias_dir.path().join("music");
        symlink(d.path(), &alias).unwrap();
        let host = d.path().join("Favourites/Solo");
        let canonical = fs::canonicalize(d.path()).unwrap();
        symlink(canonical.join("Albums/Solo.flac"), &host).unwrap();
        let p = OriginPath::new("Favourites/Solo").unwrap();
        assert_eq!(served(check(&alias, &p, &host)), "../Albums/Solo.flac");
        // An intermediate absolute link is mapped the same way.
        symlink(&abs, d.path().join("Albums/latest")).unwrap();
        assert_eq!(
            served(link(&d, "Favourites/latest", "../Albums/latest/01.flac")),
            "../Albums/latest/01.flac"
        );
        // Lexically outside after mapping.
        let sneaky = d.path().join("Albums/../../etc");
        assert_eq!(hidden(link(&d, "Favourites/sneaky", sneaky)), LEAVES);
    }

    #[test]
    fn links_that_lead_nowhere_are_hidden() {
        let d = tree();
        assert_eq!(
            hidden(link(&d, "Favourites/gone", "../Albums/Gone")),
            NOWHERE
        );
        assert_eq!(
            hidden(link(&d, "Favourites/notdir", "../Albums/Solo.flac/x")),
            NOWHERE
        );
        symlink("loop-b", d.path().join("loop-a")).unwrap();
        symlink("loop-a", d.path().join("loop-b")).unwrap();
        assert!(hidden(link(&d, "loop", "loop-a")).contains("too many levels"));
        let status = std::process::Command::new("mkfifo")
            .arg(d.path().join("pipe"))
            .status()
            .unwrap();
        assert!(status.success());
        assert!(hidden(link(&d, "to-pipe", "pipe")).contains("FIFO"));
    }

    #[test]
    fn a_link_that_changed_is_checked_again() {
        let d = tree();
        let host = d.path().join("Favourites/Echo");
        let p = OriginPath::new("Favourites/Echo").unwrap();
        symlink("../Albums/Glass Echo", &host).unwrap();
        assert!(check(d.path(), &p, &host).is_ok());
        fs::remove_file(&host).unwrap();
        symlink("../../Albums", &host).unwrap();
        assert_eq!(hidden(check(d.path(), &p, &host)), LEAVES);
        fs::remove_file(&host).unwrap();
        assert!(matches!(check(d.path(), &p, &host), Err(Refusal::Gone)));
        fs::write(&host, b"now a file").unwrap();
        assert!(matches!(check(d.path(), &p, &host), Err(Refusal::Gone)));
    }
}
