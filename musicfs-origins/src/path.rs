//! Origin-relative paths.
//!
//! An [`OriginPath`] is a `/`-separated UTF-8 path relative to an origin's
//! root with no empty, `.` or `..` components and no NUL bytes. Because the
//! check happens at construction, nothing downstream can be handed a path
//! that climbs out of the root lexically; symlinks are the origin's job.

use std::fmt;
use std::sync::Arc;

use crate::{OriginError, Result};

#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OriginPath(Arc<str>);

impl OriginPath {
    /// The origin's root directory.
    pub fn root() -> Self {
        Self(Arc::from(""))
    }

    /// Validates `path`. A leading `/` is accepted and ignored; `""` is the root.
    pub fn new(path: &str) -> Result<Self> {
        let trimmed = path.strip_prefix('/').unwrap_or(path);
        if trimmed.is_empty() {
            return Ok(Self::root());
        }
        let invalid = |reason| OriginError::InvalidPath {
            path: path.to_owned(),
            reason,
        };
        if trimmed.contains('\0') {
            return Err(invalid("contains a NUL byte"));
        }
        for component in trimmed.split('/') {
            match component {
                "" => return Err(invalid("contains an empty component")),
                "." | ".." => return Err(invalid("contains '.' or '..'")),
                _ => {}
            }
        }
        Ok(Self(Arc::from(trimmed)))
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The components, root first. The root has none.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/').filter(|c| !c.is_empty())
    }

    /// The last component, or `None` for the root.
    pub fn file_name(&self) -> Option<&str> {
        self.components().last()
    }

    /// The parent directory, or `None` for the root.
    pub fn parent(&self) -> Option<OriginPath> {
        if self.is_root() {
            return None;
        }
        Some(match self.0.rfind('/') {
            Some(i) => Self(Arc::from(&self.0[..i])),
            None => Self::root(),
        })
    }

    /// `self/name`, where `name` must be one valid component.
    pub fn join(&self, name: &str) -> Result<OriginPath> {
        if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
            return Err(OriginError::InvalidPath {
                path: name.to_owned(),
                reason: "is not a single file name",
            });
        }
        Ok(if self.is_root() {
            Self(Arc::from(name))
        } else {
            Self(Arc::from(format!("{}/{}", self.0, name)))
        })
    }
}

impl fmt::Display for OriginPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "/{}", self.0)
    }
}

impl fmt::Debug for OriginPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OriginPath({:?})", &*self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }

    #[test]
    fn accepts_music_names() {
        let p = OriginPath::new("/坂本龍一/1999 - Glass Echo/01 - Tide \"north\".flac").unwrap();
        assert_eq!(p.file_name(), Some("01 - Tide \"north\".flac"));
        assert_eq!(p.parent().unwrap().as_str(), "坂本龍一/1999 - Glass Echo");
        assert_eq!(p.components().count(), 3);
        assert!(OriginPath::new("").unwrap().is_root());
        assert!(OriginPath::new("/").unwrap().is_root());
    }

    #[test]
    fn join_and_parent_round_trip() {
        let root = OriginPath::root();
        let a = root.join("a").unwrap();
        let ab = a.join("b c").unwrap();
        assert_eq!(ab.as_str(), "a/b c");
        assert_eq!(ab.parent().unwrap(), a);
        assert_eq!(a.parent().unwrap(), root);
        assert!(root.parent().is_none());
        assert!(a.join("..").is_err());
        assert!(a.join("x/y").is_err());
    }
}
