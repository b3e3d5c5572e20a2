//! `musicfs mount`: the daemon's life from flags to a clean exit.
//!
//! Order matters: validate input (exit 2 on mistakes), clean up a dead mount
//! a crash left at the mountpoint, take the cache lock (a second mount fails
//! at once, naming the holder), open the cache (healing it), check the
//! origins (one that is down is fine if its listing is cached), mount, then
//! wait for SIGINT/SIGTERM or an external unmount. Shutdown unmounts
//! (lazily if a hung origin keeps the kernel busy), flushes the index and
//! exits 0 within a few seconds even while an origin hangs.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use musicfs_cas::{Cache, CacheConfig};
use musicfs_fuse::{FsConfig, MusicFs};
use musicfs_origins::{fds, DynOrigin, HealthMonitor, LocalOrigin, RetryOrigin, RetryPolicy};
use tracing::{info, warn};

use crate::config::{self, FileConfig, OriginSpec, UsageError};
use crate::lock::CacheLock;
use crate::status::{self, MountInfo, OriginInfo};

#[derive(Debug, Args)]
pub struct MountArgs {
    /// Where the library appears (an existing, empty directory).
    pub mountpoint: PathBuf,
    /// An origin as [NAME=]LOCATION; LOCATION is a directory. Repeatable. NAME defaults to the directory's last component.
    #[arg(long = "origin", value_name = "[NAME=]LOCATION")]
    pub origins: Vec<String>,
    /// Cache directory [default: $XDG_CACHE_HOME/musicfs or ~/.cache/musicfs]
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Cache size limit: 512M, 20G or bytes [default: 20G]
    #[arg(long, value_name = "SIZE")]
    pub cache_size: Option<String>,
    /// Seconds a read may wait on an origin before it fails with EIO [default: 30]
    #[arg(long, value_name = "SECS")]
    pub read_timeout: Option<u64>,
    /// Seconds an origin health check may take before the origin counts as down [default: 5]
    #[arg(long, value_name = "SECS")]
    pub health_timeout: Option<u64>,
    /// A TOML file with the same settings (cache_dir, cache_size, read_timeout, health_timeout, origins, log_level); flags override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

impl MountArgs {
    /// The config file's log level, for logging set up before the rest.
    pub fn log_level_hint(&self) -> Option<String> {
        let cfg = self
            .config
            .as_ref()
            .and_then(|p| FileConfig::load(p).ok())?;
        cfg.log_level
    }
}

#[derive(Debug)]
struct Settings {
    mountpoint: PathBuf,
    origins: Vec<OriginSpec>,
    cache_dir: PathBuf,
    cache_size: u64,
    read_timeout: Duration,
    health_timeout: Duration,
}

fn settings(args: MountArgs) -> Result<Settings, UsageError> {
    let file = match &args.config {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    let specs = if args.origins.is_empty() {
        file.origins.clone()
    } else {
        args.origins.clone()
    };
    if specs.is_empty() {
        return Err(UsageError(
            "no origin given: add --origin [NAME=]DIR (or `origins` in the config file)".into(),
        ));
    }
    let mut origins: Vec<OriginSpec> = Vec::new();
    for s in &specs {
        let o = config::parse_origin(s)?;
        if origins.iter().any(|x| x.name == o.name) {
            return Err(UsageError(format!(
                "two origins are named '{}': give one of them NAME=",
                o.name
            )));
        }
        origins.push(o);
    }
    let cache_size = match (&args.cache_size, &file.cache_size) {
        (Some(s), _) => config::parse_size(s)?,
        (None, Some(v)) => config::size_value(v)?,
        (None, None) => config::DEFAULT_CACHE_SIZE,
    };
    let secs = |flag: Option<u64>,
                file: Option<u64>,
                default: Duration,
                what: &str|
     -> Result<Duration, UsageError> {
        match flag.or(file) {
            Some(0) => Err(UsageError(format!("--{what} must be at least 1 second"))),
            Some(s) => Ok(Duration::from_secs(s)),
            None => Ok(default),
        }
    };
    Ok(Settings {
        mountpoint: args.mountpoint,
        cache_dir: args
            .cache_dir
            .or(file.cache_dir)
            .unwrap_or_else(config::default_cache_dir),
        cache_size,
        read_timeout: secs(
            args.read_timeout,
            file.read_timeout,
            config::DEFAULT_READ_TIMEOUT,
            "read-timeout",
        )?,
        health_timeout: secs(
            args.health_timeout,
            file.health_timeout,
            config::DEFAULT_HEALTH_TIMEOUT,
            "health-timeout",
        )?,
        origins,
    })
}

/// A dead FUSE mount answers ENOTCONN; clean it before checking anything.
/// `stat` alone can miss one for a moment (the kernel answers it from
/// cached attributes), opening the directory cannot.
fn prepare_mountpoint(mp: &Path) -> Result<()> {
    let dead = |e: &std::io::Error| e.raw_os_error() == Some(libc::ENOTCONN);
    let stat = std::fs::metadata(mp);
    let stat = match (&stat, std::fs::read_dir(mp)) {
        (Ok(_), Err(e)) if dead(&e) => Err(e),
        _ => stat,
    };
    match stat {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            warn!(mountpoint = %mp.display(), "a previous musicfs died here; cleaning up its dead mount");
            musicfs_fuse::cleanup_stale_mount(mp).context("cannot clean up the dead mount")?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(UsageError(format!(
                "mountpoint {} does not exist: create it with `mkdir -p {}`",
                mp.display(),
                mp.display()
            ))
            .into());
        }
        Err(e) => return Err(UsageError(format!("mountpoint {}: {e}", mp.display())).into()),
        Ok(m) if !m.is_dir() => {
            return Err(
                UsageError(format!("mountpoint {} is not a directory", mp.display())).into(),
            );
        }
        Ok(_) => {}
    }
    let mut entries = std::fs::read_dir(mp)
        .with_context(|| format!("cannot read mountpoint {}", mp.display()))?;
    if entries.next().is_some() {
        return Err(UsageError(format!(
            "mountpoint {} is not empty: use an empty directory",
            mp.display()
        ))
        .into());
    }
    Ok(())
}

fn check_origin_paths(origins: &[OriginSpec]) -> Result<(), UsageError> {
    for o in origins {
        // Only what is certainly wrong is refused here: a NAS that does not
        // answer is the health monitor's business, not a usage error.
        match std::fs::symlink_metadata(&o.location) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(UsageError(format!(
                    "origin {}: {} does not exist",
                    o.name,
                    o.location.display()
                )))
            }
            Ok(m) if !m.is_dir() && !m.file_type().is_symlink() => {
                return Err(UsageError(format!(
                    "origin {}: {} is not a directory",
                    o.name,
                    o.location.display()
                )))
            }
            _ => {}
        }
    }
    Ok(())
}

/// Below this many fds the daemon's own fixed set (FUSE channels, sled,
/// tokio, the lock and status socket: about 20) leaves too little to read
/// with; FUSE itself fails with EMFILE at about 12.
const MIN_FD_LIMIT: u64 = fds::RESERVED_FDS + 8;

/// glibc gives each thread that allocates under contention an arena of its
/// own (up to 8 per core) and keeps whatever each arena ever held. The MiB
/// buffers of a cold read are allocated and freed across the FUSE, runtime
/// and blocking threads, so they pile up in a dozen arenas: about 100 MB of
/// RSS for one full-speed cold read, most of it kept afterwards. Two arenas
/// serve the same work at no measurable cost (`scripts/bench`,
/// docs/benchmarks.md).
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter and takes no pointers;
    // it runs before the mount starts any thread.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

pub fn run(args: MountArgs) -> Result<ExitCode> {
    limit_malloc_arenas();
    let mut s = settings(args)?;
    check_origin_paths(&s.origins)?;
    // Absolute paths, so the cache dir's record means the same thing to
    // `status`, `verify` and `doctor` run from anywhere. A path that cannot
    // be resolved now (NAS down) is made absolute without touching it.
    for o in &mut s.origins {
        o.location = o.location.canonicalize().unwrap_or_else(|_| {
            std::path::absolute(&o.location).unwrap_or_else(|_| o.location.clone())
        });
    }
    prepare_mountpoint(&s.mountpoint)?;
    let mountpoint = s
        .mountpoint
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", s.mountpoint.display()))?;
    let lock = CacheLock::acquire(&s.cache_dir)?;
    info!(lock = %lock.path().display(), pid = std::process::id(), "cache locked");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .thread_name("musicfs")
        .build()
        .context("cannot start the async runtime")?;

    // Our own fd use is bounded by the limit we run under (a raised soft
    // limit when the hard one allows), so a burst of readers queues on the
    // store's and origins' semaphores instead of meeting EMFILE.
    let fd_limit = fds::raise_soft_limit().unwrap_or(1024);
    if fd_limit < MIN_FD_LIMIT {
        bail!(
            "the open-file limit is {fd_limit}, too low to serve a mount (MusicFS needs at \
             least {MIN_FD_LIMIT}); raise it with `ulimit -n 1024` or prlimit"
        );
    }
    let budget = fds::FdBudget::split(fd_limit, s.origins.len(), LocalOrigin::DEFAULT_MAX_BLOCKING);
    info!(
        fd_limit,
        store = budget.store,
        per_origin = budget.per_origin,
        "fd budget"
    );

    let mut config = CacheConfig::new(&s.cache_dir, s.cache_size);
    config.origin_timeout = s.read_timeout;
    config.max_open_files = budget.store;
    let (cache, opened) = rt
        .block_on(Cache::open(config))
        .context("cannot open the cache")?;
    if opened.index.rebuilt {
        warn!(reason = ?opened.index.reason, "the cache index was damaged and has been rebuilt from the chunk files");
    }

    let health = Arc::new(HealthMonitor::new(s.health_timeout));
    let mut origins: Vec<DynOrigin> = Vec::new();
    for o in &s.origins {
        let local: DynOrigin = Arc::new(
            LocalOrigin::new(o.name.clone(), o.location.clone())
                .with_max_blocking(budget.per_origin),
        );
        // Reads go through the monitor's watch, so a hung NAS shows as
        // unhealthy `--health-timeout` after a read starts waiting, not
        // only at the next periodic probe.
        let local = health.watch(local);
        let policy = RetryPolicy {
            max_attempts: 2,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(1),
        };
        let origin: DynOrigin = Arc::new(RetryOrigin::new(local, policy));
        cache.add_origin(origin.clone());
        origins.push(origin);
    }

    let fs_config = FsConfig {
        read_timeout: s.read_timeout,
        ..FsConfig::default()
    };
    let fs = MusicFs::new(cache.clone(), origins, fs_config, rt.handle().clone());
    fs.set_health(Arc::clone(&health));
    rt.block_on(fs.preflight(s.health_timeout))
        .context("cannot start")?;

    let info = MountInfo {
        pid: std::process::id(),
        mountpoint: mountpoint.clone(),
        origins: s
            .origins
            .iter()
            .map(|o| OriginInfo {
                name: o.name.to_string(),
                location: o.location.clone(),
            })
            .collect(),
    };
    if let Err(e) = std::fs::write(
        s.cache_dir.join(status::MOUNT_INFO),
        serde_json::to_vec_pretty(&info)?,
    ) {
        warn!(error = %e, "cannot record the mount in the cache dir; status and doctor will know less");
    }

    let mounted = musicfs_fuse::mount(fs, &mountpoint)
        .with_context(|| format!("cannot mount at {}", mountpoint.display()))?;
    let _enter = rt.enter();
    let monitor = health.spawn(Duration::from_secs(10));
    let status_task = {
        let (dir, cache, health) = (s.cache_dir.clone(), cache.clone(), health.clone());
        rt.block_on(async move { status::serve(dir, info, cache, health) })
    };
    if let Err(e) = &status_task {
        warn!(error = %e, "cannot serve status on the cache dir's socket");
    }
    info!(mountpoint = %mountpoint.display(), origins = s.origins.len(), "mounted; press Ctrl-C or send SIGTERM to unmount");
    println!(
        "musicfs: mounted at {} (PID {})",
        mountpoint.display(),
        std::process::id()
    );

    let reason = rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                _ = term.recv() => return anyhow::Ok("SIGTERM"),
                _ = int.recv() => return anyhow::Ok("SIGINT"),
                _ = tick.tick() => if mounted.is_finished() { return anyhow::Ok("unmounted from outside") },
            }
        }
    })?;
    info!(reason, "shutting down");
    monitor.stop();
    if let Ok(t) = status_task {
        t.abort();
    }
    let _ = std::fs::remove_file(s.cache_dir.join(status::SOCKET));

    // Unmount in a thread: with a hung origin the kernel may hold the mount
    // busy; after 3 s fall back to a lazy unmount so SIGTERM still ends us.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(mounted.unmount());
    });
    match rx.recv_timeout(Duration::from_secs(3)) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!(error = %e, "unmount reported an error"),
        Err(_) => {
            warn!("unmount is taking long (a hung origin?); detaching the mount lazily");
            let _ = musicfs_fuse::cleanup_stale_mount(&mountpoint);
            let _ = std::process::Command::new("fusermount3")
                .arg("-uz")
                .arg(&mountpoint)
                .status();
        }
    }
    // A track read to its end may still have its last chunks in memory.
    if !rt.block_on(cache.wait_for_ingests(Duration::from_secs(2))) {
        warn!("stopping with an ingest still running; its file is read again when next played");
    }
    match rt.block_on(async { tokio::time::timeout(Duration::from_secs(3), cache.flush()).await }) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            warn!(error = %e, "could not flush the index; it is healed at the next start")
        }
        Err(_) => warn!("flushing the index timed out; it is healed at the next start"),
    }
    drop(lock);
    // Threads stuck on a hung origin must not keep the process alive.
    rt.shutdown_timeout(Duration::from_millis(500));
    println!("musicfs: unmounted ({reason})");
    Ok(ExitCode::SUCCESS)
}
