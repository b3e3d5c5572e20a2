//! The parts of the `musicfs` command that read bytes from disk, as a
//! library so the fuzz targets (`fuzz/`) can reach them: the config file
//! and size/origin parsing ([`config`]), the mount record and status
//! answer ([`status`], with the cache [`lock`] it reads), and the kernel's
//! mount table ([`mountinfo`]). The binary
//! (`src/main.rs`) uses these same modules.
//!
//! Invariant: whatever bytes these parsers are given, they return a typed
//! error or `None`, never panic.

pub mod config;
pub mod lock;
pub mod mountinfo;
pub mod status;
