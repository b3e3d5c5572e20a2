//! Origin-relative paths.
//!
//! An [`OriginPath`] is a `/`-separated path relative to an origin's root,
//! made of bytes: on Linux a name is any bytes but `/` and NUL, and old rips
//! carry Latin-1 names (`b"Bj\xf6rk"`) that are not UTF-8, so nothing here
//! assumes UTF-8. It has no empty, `.` or `..` components and no NUL bytes.
//! Because the check happens at construction, nothing downstream can be
//! handed a path that climbs out of the root lexically; symlinks are the
//! origin's job. `Display` is lossy (for logs and messages only); keys and
//! names use [`OriginPath::as_bytes`] / [`OriginPath::as_os_str`].

use std::ffi::OsStr;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};
use std::sync::Arc;

use crate::{OriginError, Result};

#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OriginPath(Arc<[u8]>);

impl OriginPath {
    /// The origin's root directory.
    pub fn root() -> Self {
        Self(Arc::from(&b""[..]))
    }

    /// Validates `path` (a `&str`, `&OsStr`, `&Path`...). A leading `/` is
    /// accepted and ignored; `""` is the root.
    pub fn new<P: AsRef<OsStr> + ?Sized>(path: &P) -> Result<Self> {
        Self::from_bytes(path.as_ref().as_bytes())
    }

    /// Validates raw bytes, as [`OriginPath::new`] does.
    pub fn from_bytes(path: &[u8]) -> Result<Self> {
        let trimmed = path.strip_prefix(b"/").unwrap_or(path);
        if trimmed.is_empty() {
            return Ok(Self::root());
        }
        let invalid = |reason| OriginError::InvalidPath {
            path: String::from_utf8_lossy(path).into_owned(),
            reason,
        };
        if trimmed.contains(&0) {
            return Err(invalid("contains a NUL byte"));
        }
        for component in trimmed.split(|&b| b == b'/') {
            match component {
                b"" => return Err(invalid("contains an empty component")),
                b"." | b".." => return Err(invalid("contains '.' or '..'")),
                _ => {}
            }
        }
        Ok(Self(Arc::from(trimmed)))
    }

    /// True when `name` can be one component: not empty, `.` or `..`, and
    /// without `/` or NUL.
    pub fn is_valid_name(name: &OsStr) -> bool {
        let b = name.as_bytes();
        !(b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') || b.contains(&0))
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// The path without a leading `/` (the root is empty): the exact bytes,
    /// for keys and for building host paths.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn as_os_str(&self) -> &OsStr {
        OsStr::from_bytes(&self.0)
    }

    /// The components, root first. The root has none.
    pub fn components(&self) -> impl Iterator<Item = &OsStr> {
        self.0
            .split(|&b| b == b'/')
            .filter(|c| !c.is_empty())
            .map(OsStr::from_bytes)
    }

    /// The last component, or `None` for the root.
    pub fn file_name(&self) -> Option<&OsStr> {
        self.components().last()
    }

    /// The parent directory, or `None` for the root.
    pub fn parent(&self) -> Option<OriginPath> {
        if self.is_root() {
            return None;
        }
        Some(match self.0.iter().rposition(|&b| b == b'/') {
            Some(i) => Self(Arc::from(&self.0[..i])),
            None => Self::root(),
        })
    }

    /// `self/name`, where `name` must be one valid component.
    pub fn join<N: AsRef<OsStr> + ?Sized>(&self, name: &N) -> Result<OriginPath> {
        let name = name.as_ref();
        if !Self::is_valid_name(name) {
            return Err(OriginError::InvalidPath {
                path: name.to_string_lossy().into_owned(),
                reason: "is not a single file name",
            });
        }
        let name = name.as_bytes();
        Ok(if self.is_root() {
            Self(Arc::from(name))
        } else {
            let mut joined = Vec::with_capacity(self.0.len() + 1 + name.len());
            joined.extend_from_slice(&self.0);
            joined.push(b'/');
            joined.extend_from_slice(name);
            Self(Arc::from(joined))
        })
    }

    /// Where a symlink at `self` whose target is `target` leads, read as
    /// written (each `..` removes the component before it): `None` when the
    /// target is absolute, empty, or climbs above the root. This is only the
    /// lexical half of confinement; an origin also resolves the symlinks
    /// the target passes through.
    pub fn lexical_link_target(&self, target: &Path) -> Option<OriginPath> {
        if target.as_os_str().is_empty() {
            return None;
        }
        if self.is_root() {
            return None;
        }
        let mut stack: Vec<&OsStr> = self.components().collect();
        // Relative targets start in the symlink's own directory.
        stack.pop();
        for component in target.components() {
            match component {
                Component::Normal(name) => stack.push(name),
                Component::CurDir => {}
                Component::ParentDir => {
                    stack.pop()?;
                }
                Component::RootDir | Component::Prefix(_) => return None,
            }
        }
        let mut out = OriginPath::root();
        for name in stack {
            out = out.join(name).ok()?;
        }
        Some(out)
    }
}

impl fmt::Display for OriginPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "/{}", String::from_utf8_lossy(&self.0))
    }
}

impl fmt::Debug for OriginPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OriginPath({:?})", self.as_os_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(s: &str) -> OriginPath {
        OriginPath::new(s).unwrap()
    }

    #[test]
    fn rejects_paths_that_could_escape() {
        for bad in [
            "..",
            "a/../b",
            "a//b",
            "a/./b",
            "a/",
            "x\0y",
            "../etc/passwd",
        ] {
            assert!(OriginPath::new(bad).is_err(), "{bad:?} accepted");
        }
        for bad in [&b"a/\xff/.."[..], b"\xf6\0", b"\xff//x"] {
            assert!(OriginPath::from_bytes(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn accepts_music_names() {
        let p = p("/坂本龍一/1999 - Glass Echo/01 - Tide \"north\".flac");
        assert_eq!(p.file_name(), Some(OsStr::new("01 - Tide \"north\".flac")));
        assert_eq!(
            p.parent().unwrap().as_bytes(),
            "坂本龍一/1999 - Glass Echo".as_bytes()
        );
        assert_eq!(p.components().count(), 3);
        assert!(OriginPath::new("").unwrap().is_root());
        assert!(OriginPath::new("/").unwrap().is_root());
    }

    #[test]
    fn latin1_names_are_kept_byte_for_byte() {
        let bjork = OsStr::from_bytes(b"Bj\xf6rk");
        let path = OriginPath::root()
            .join(bjork)
            .unwrap()
            .join(OsStr::from_bytes(b"01 - J\xf3ga.flac"))
            .unwrap();
        assert_eq!(path.as_bytes(), b"Bj\xf6rk/01 - J\xf3ga.flac");
        assert_eq!(path.components().next(), Some(bjork));
        assert_eq!(
            OriginPath::from_bytes(b"/Bj\xf6rk/01 - J\xf3ga.flac").unwrap(),
            path
        );
        // Display is for people: lossy, but it never fails.
        assert_eq!(path.to_string(), "/Bj\u{fffd}rk/01 - J\u{fffd}ga.flac");
        assert_eq!(
            format!("{path:?}"),
            r#"OriginPath("Bj\xF6rk/01 - J\xF3ga.flac")"#
        );
    }

    #[test]
    fn join_and_parent_round_trip() {
        let root = OriginPath::root();
        let a = root.join("a").unwrap();
        let ab = a.join("b c").unwrap();
        assert_eq!(ab.as_bytes(), b"a/b c");
        assert_eq!(ab.parent().unwrap(), a);
        assert_eq!(a.parent().unwrap(), root);
        assert!(root.parent().is_none());
        assert!(a.join("..").is_err());
        assert!(a.join("x/y").is_err());
        assert!(a.join(OsStr::from_bytes(b"x\0")).is_err());
    }

    #[test]
    fn lexical_link_targets() {
        let at = |link: &str, target: &str| {
            p(link)
                .lexical_link_target(Path::new(target))
                .map(|t| t.to_string())
        };
        assert_eq!(
            at("Favourites/Glass Echo", "../Albums/Glass Echo").as_deref(),
            Some("/Albums/Glass Echo")
        );
        assert_eq!(at("a/b/link", "./../c/").as_deref(), Some("/a/c"));
        assert_eq!(at("link", ".").as_deref(), Some("/"));
        assert_eq!(at("a/link", "..").as_deref(), Some("/"));
        assert_eq!(at("link", ".."), None, "climbs above the root");
        assert_eq!(at("a/link", "../../etc"), None);
        assert_eq!(at("a/link", "x/../../../etc"), None);
        assert_eq!(at("a/link", "/etc/passwd"), None, "absolute");
        assert_eq!(at("a/link", ""), None);
        assert_eq!(
            OriginPath::root().lexical_link_target(Path::new("a")),
            None,
            "the root is no symlink"
        );
    }

    /// One component's bytes, with the separators and dots that make
    /// components invalid over-represented.
    fn name_bytes() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(
            prop_oneof![
                4 => any::<u8>(),
                1 => Just(b'/'),
                1 => Just(b'.'),
                1 => Just(0u8),
                2 => 0x80u8..=0xff,
            ],
            0..6,
        )
    }

    proptest! {
        #[test]
        fn accepted_paths_are_confined_and_round_trip(raw in prop::collection::vec(any::<u8>(), 0..40)) {
            if let Ok(path) = OriginPath::from_bytes(&raw) {
                for c in path.components() {
                    prop_assert!(OriginPath::is_valid_name(c), "{c:?}");
                }
                prop_assert_eq!(OriginPath::from_bytes(path.as_bytes()).unwrap(), path.clone());
                let mut rebuilt = OriginPath::root();
                for c in path.components() {
                    rebuilt = rebuilt.join(c).unwrap();
                }
                prop_assert_eq!(rebuilt, path);
            }
        }

        #[test]
        fn join_accepts_exactly_the_valid_names(names in prop::collection::vec(name_bytes(), 0..5)) {
            let mut path = OriginPath::root();
            let mut joined = Vec::new();
            for name in &names {
                let valid = !name.is_empty()
                    && name != b"."
                    && name != b".."
                    && !name.contains(&b'/')
                    && !name.contains(&0);
                match path.join(OsStr::from_bytes(name)) {
                    Ok(next) => {
                        prop_assert!(valid, "{name:?} accepted");
                        path = next;
                        joined.push(name.clone());
                    }
                    Err(_) => prop_assert!(!valid, "{name:?} refused"),
                }
            }
            prop_assert_eq!(path.as_bytes(), &joined.join(&b'/')[..]);
            let parsed: Vec<&[u8]> = path.components().map(OsStr::as_bytes).collect();
            let expected: Vec<&[u8]> = joined.iter().map(Vec::as_slice).collect();
            prop_assert_eq!(parsed, expected);
        }
    }
}
