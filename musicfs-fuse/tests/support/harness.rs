//! A real MusicFS mount for integration tests, with its runtime and cache;
//! shared by test files through `#[path]` (a file under a subdirectory of
//! `tests/` is not a test crate of its own).
//!
//! Every mount is unmounted when its [`Harness`] drops, also when the test
//! fails: `Mounted::unmount`, then `fusermount3 -u` / `-uz` when the mount
//! point is still mounted after that.

#![allow(dead_code)] // each test file uses the part it needs

use std::fs;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use musicfs_cas::{Cache, CacheConfig};
use musicfs_fuse::{mount, FsConfig, Mounted, MusicFs};
use musicfs_origins::{DynOrigin, LocalOrigin, OriginId};
use tempfile::TempDir;
use tokio::runtime::Runtime;

/// A mounted MusicFS with its runtime and cache; unmounts on drop.
pub struct Harness {
    mounted: Option<Mounted>,
    mountpoint: TempDir,
    rt: Option<Runtime>,
    pub cache: Cache,
    _cache_dir: TempDir,
}

impl Harness {
    /// Mounts `origins` over a fresh 1 GiB cache, after a preflight.
    pub fn start(origins: Vec<DynOrigin>, config: FsConfig) -> Harness {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .unwrap();
        let cache_dir = tempfile::tempdir().unwrap();
        let (cache, _) = rt
            .block_on(Cache::open(CacheConfig::new(cache_dir.path(), 1 << 30)))
            .unwrap();
        let fs = MusicFs::new(cache.clone(), origins, config, rt.handle().clone());
        rt.block_on(fs.preflight(Duration::from_secs(10))).unwrap();
        let mountpoint = tempfile::tempdir().unwrap();
        let mounted = mount(fs, mountpoint.path()).unwrap();
        Harness {
            mounted: Some(mounted),
            mountpoint,
            rt: Some(rt),
            cache,
            _cache_dir: cache_dir,
        }
    }

    pub fn root(&self) -> &Path {
        self.mountpoint.path()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(mounted) = self.mounted.take() {
            if let Err(e) = mounted.unmount() {
                eprintln!("unmount failed: {e}");
            }
        }
        // Whatever happened above, leave no mount behind.
        unmount_leftover(self.mountpoint.path());
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

/// Unmounts `path` if it is still mounted: `fusermount3 -u`, then `-uz`.
pub fn unmount_leftover(path: &Path) {
    if is_mounted(path) {
        let _ = Command::new("fusermount3").arg("-u").arg(path).status();
    }
    if is_mounted(path) {
        let _ = Command::new("fusermount3").arg("-uz").arg(path).status();
    }
}

pub fn is_mounted(path: &Path) -> bool {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .any(|mp| Path::new(mp) == path)
}

pub fn local(name: &str, root: &Path) -> DynOrigin {
    Arc::new(LocalOrigin::new(OriginId::new(name).unwrap(), root))
}
