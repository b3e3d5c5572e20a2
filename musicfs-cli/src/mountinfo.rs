//! The kernel's mount table (`/proc/self/mountinfo`): what is mounted
//! where, so `musicfs mount` can name the PID serving a live MusicFS mount
//! on its mountpoint (see `musicfs_fuse::serving_pid`).
//!
//! Invariant: whatever bytes the table holds, parsing returns entries or
//! skips lines, never panics. Paths are bytes (`\NNN` octal escapes for
//! space, tab, newline and backslash), so non-UTF-8 mountpoints work.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// One line of the mount table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_point: PathBuf,
    /// `fuse.musicfs` for a MusicFS mount.
    pub fstype: String,
    /// The mount source; a FUSE filesystem's `fsname`.
    pub source: String,
}

/// The entries of a mountinfo table, in its order (a later mount on the
/// same point covers an earlier one).
pub fn parse(table: &[u8]) -> Vec<MountEntry> {
    table
        .split(|&b| b == b'\n')
        .filter_map(parse_line)
        .collect()
}

/// `ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS`
fn parse_line(line: &[u8]) -> Option<MountEntry> {
    let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
    let mount_point = *fields.get(4)?;
    let dash = fields.iter().skip(6).position(|f| *f == b"-")? + 6;
    let fstype = fields.get(dash + 1)?;
    let source = fields.get(dash + 2)?;
    Some(MountEntry {
        mount_point: PathBuf::from(OsStr::from_bytes(&unescape(mount_point))),
        fstype: String::from_utf8_lossy(&unescape(fstype)).into_owned(),
        source: String::from_utf8_lossy(&unescape(source)).into_owned(),
    })
}

/// Undoes the kernel's `\NNN` octal escapes; anything else stays as is.
fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let octal = field
            .get(i + 1..i + 4)
            .filter(|d| field[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .map(|d| d.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0')));
        match octal.and_then(|v| u8::try_from(v).ok()) {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(field[i]);
                i += 1;
            }
        }
    }
    out
}

/// What is mounted on top at `path` (an absolute, resolved path), if
/// anything.
pub fn mounted_at<'t>(table: &'t [MountEntry], path: &Path) -> Option<&'t MountEntry> {
    table.iter().rev().find(|e| e.mount_point == path)
}

/// This process's mount table; empty when it cannot be read.
pub fn read() -> Vec<MountEntry> {
    std::fs::read("/proc/self/mountinfo")
        .map(|t| parse(&t))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &[u8] = b"\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
98 22 0:51 / /tmp/a\\040b/mnt ro,nosuid,nodev,noatime shared:50 - fuse.musicfs musicfs:4242 ro,user_id=0,group_id=0
99 22 0:52 / /srv/m\\134x rw master:3 shared:7 - fuse.other src rw
garbage line
100 22 0:53 / /tmp/a\\040b/mnt ro - fuse.musicfs musicfs:4343 ro
";

    #[test]
    fn mountinfo_lines_are_parsed_with_their_escapes() {
        let t = parse(TABLE);
        assert_eq!(t.len(), 4, "{t:?}");
        assert_eq!(t[0].mount_point, PathBuf::from("/"));
        assert_eq!(t[1].mount_point, PathBuf::from("/tmp/a b/mnt"));
        assert_eq!(t[1].fstype, "fuse.musicfs");
        assert_eq!(t[1].source, "musicfs:4242");
        assert_eq!(t[2].mount_point, PathBuf::from("/srv/m\\x"));
        assert_eq!(t[2].source, "src");
        // The later mount on the same point is the one on top.
        let top = mounted_at(&t, Path::new("/tmp/a b/mnt")).unwrap();
        assert_eq!(top.source, "musicfs:4343");
        assert!(mounted_at(&t, Path::new("/tmp/a b")).is_none());
    }

    #[test]
    fn odd_input_never_panics() {
        for bad in [
            &b""[..],
            b"\\",
            b"1 2 3 4 \\7777 6 - x",
            b"1 2 3 4 5 6 7 8 9 - ",
            b"\xff\xfe \\0 \\00 - -",
        ] {
            let _ = parse(bad);
        }
        assert_eq!(unescape(b"a\\04"), b"a\\04");
        assert_eq!(unescape(b"\\400"), b"\\400");
        assert_eq!(unescape(b"x\\011y"), b"x\ty");
    }

    #[test]
    fn this_process_sees_its_root_mount() {
        assert!(read().iter().any(|e| e.mount_point == Path::new("/")));
    }
}
