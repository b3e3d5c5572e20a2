//! Shared by the mount tests: a mounted MusicFS over given origins that
//! unmounts on drop (also when a test fails), and helpers to compare trees
//! and reach the daemon past the kernel's page cache.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)] // each test file uses some; test code

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use musicfs_cas::{Cache, CacheConfig};
use musicfs_fuse::{mount, FsConfig, Mounted, MusicFs};
use musicfs_origins::{DynOrigin, LocalOrigin, OriginId, OriginPath};
use tempfile::TempDir;
use tokio::runtime::Runtime;

/// Bounds every wait on an event in the mount tests: it only ends a hang,
/// so it is far longer than anything takes on a busy machine.
pub const HANG: Duration = Duration::from_secs(60);

/// Waits until `cond` holds, polling every 20 ms; fails the test with
/// `what` after [`HANG`].
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + HANG;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within {HANG:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A mounted MusicFS with its runtime and cache; unmounts on drop.
pub struct Harness {
    pub mounted: Option<Mounted>,
    pub mountpoint: TempDir,
    pub rt: Option<Runtime>,
    pub cache: Cache,
    /// The cache directory when the harness made it (removed on drop).
    pub cache_tmp: Option<TempDir>,
    pub cache_dir: PathBuf,
}

/// A multi-thread runtime and a fresh 1 GiB cache in a temp dir.
pub fn runtime_and_cache() -> (Runtime, TempDir, Cache) {
    let cache_dir = tempfile::tempdir().unwrap();
    let (rt, cache) = runtime_and_cache_in(cache_dir.path());
    (rt, cache_dir, cache)
}

/// A multi-thread runtime and a 1 GiB cache in `dir`.
pub fn runtime_and_cache_in(dir: &Path) -> (Runtime, Cache) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let (cache, _) = rt
        .block_on(Cache::open(CacheConfig::new(dir, 1 << 30)))
        .unwrap();
    (rt, cache)
}

impl Harness {
    pub fn start(origins: Vec<DynOrigin>, config: FsConfig) -> Harness {
        let cache_tmp = tempfile::tempdir().unwrap();
        let mut h = Harness::start_in(origins, config, cache_tmp.path());
        h.cache_tmp = Some(cache_tmp);
        h
    }

    /// A mount whose cache lives in `cache_dir`, which outlives it (for a
    /// remount over the same cache).
    pub fn start_in(origins: Vec<DynOrigin>, config: FsConfig, cache_dir: &Path) -> Harness {
        let (rt, cache) = runtime_and_cache_in(cache_dir);
        let fs = MusicFs::new(cache.clone(), origins, config, rt.handle().clone());
        rt.block_on(fs.preflight(Duration::from_secs(10))).unwrap();
        let mountpoint = tempfile::tempdir().unwrap();
        let mounted = mount(fs, mountpoint.path()).unwrap();
        Harness {
            mounted: Some(mounted),
            mountpoint,
            rt: Some(rt),
            cache,
            cache_tmp: None,
            cache_dir: cache_dir.to_path_buf(),
        }
    }

    pub fn root(&self) -> &Path {
        self.mountpoint.path()
    }

    /// Waits until the cache holds every chunk of `path` (the file must be
    /// open meanwhile, or its ingest stops).
    pub fn wait_cached(&self, origin: &str, path: &str) {
        let origin = OriginId::new(origin).unwrap();
        let path = OriginPath::new(path).unwrap();
        wait_until(&format!("{path} fully cached"), || {
            let manifest = self.cache.index().manifest(&origin, &path).unwrap();
            manifest.is_some_and(|m| m.is_complete())
        });
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

/// Unmounts a mount point on drop, for mounts made by another process.
pub struct MountGuard(pub PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        unmount_leftover(&self.0);
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

/// Names in `dir`, leaving out symlinks (tests/fidelity.rs covers them).
pub fn names(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| !e.file_type().unwrap().is_symlink())
        .map(|e| e.file_name().into_string().unwrap())
        .collect()
}

/// Asserts that `mounted` shows the tree at `origin`: the same names per
/// directory, kinds, sizes and mtimes.
pub fn assert_same_tree(origin: &Path, mounted: &Path) {
    assert_eq!(
        names(origin),
        names(mounted),
        "listing of {}",
        mounted.display()
    );
    for name in names(origin) {
        let o = fs::symlink_metadata(origin.join(&name)).unwrap();
        let m = fs::symlink_metadata(mounted.join(&name)).unwrap();
        let what = mounted.join(&name);
        assert_eq!(o.is_dir(), m.is_dir(), "kind of {}", what.display());
        assert_eq!(o.is_file(), m.is_file(), "kind of {}", what.display());
        assert_eq!(o.len(), m.len(), "size of {}", what.display());
        assert_eq!(
            o.modified().unwrap(),
            m.modified().unwrap(),
            "mtime of {}",
            what.display()
        );
        if o.is_dir() {
            assert_same_tree(&origin.join(&name), &mounted.join(&name));
        }
    }
}

/// Drops the kernel's cached pages of `path`, so the next read reaches
/// MusicFS instead of the page cache.
pub fn drop_page_cache(path: &Path) {
    let file = fs::File::open(path).unwrap();
    // SAFETY: the descriptor is open for the whole call (owned by `file`);
    // fadvise only drops clean cached pages and touches no memory of ours.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0, "posix_fadvise failed on {}", path.display());
}

pub fn errno(e: &std::io::Error) -> Option<i32> {
    e.raw_os_error()
}
