//! Requests MusicFS does not support, answered without noise.
//!
//! Layer: part of the filesystem proper (see `fs.rs`). fuser's defaults
//! answer these with a WARN line each; players and scanners (mpd, beets,
//! file managers) probe them on every file, which filled the log with lines
//! that look like faults. Each answer here is the one that makes the kernel
//! do the right thing by itself.

use fuser::{Errno, ReplyEmpty, ReplyIoctl, ReplyLock, ReplyLseek, ReplyPoll};

/// `ioctl`: no file here is a device. `ENOTTY` is the standard answer for
/// an ioctl a file does not support.
pub(super) fn ioctl(reply: ReplyIoctl) {
    reply.error(Errno::ENOTTY);
}

/// `poll`: `ENOSYS` makes the kernel stop asking and treat files as always
/// ready, which regular files are.
pub(super) fn poll(reply: ReplyPoll) {
    reply.error(Errno::ENOSYS);
}

/// `lseek` (SEEK_DATA/SEEK_HOLE): `ENOSYS` makes the kernel answer from the
/// file size, which is right for files without holes.
pub(super) fn lseek(reply: ReplyLseek) {
    reply.error(Errno::ENOSYS);
}

/// `getlk`: `ENOSYS` makes the kernel keep POSIX locks locally, which is
/// all a read-only tree needs.
pub(super) fn getlk(reply: ReplyLock) {
    reply.error(Errno::ENOSYS);
}

/// `setlk`: as `getlk`.
pub(super) fn setlk(reply: ReplyEmpty) {
    reply.error(Errno::ENOSYS);
}
