//! `musicfs mount`: the daemon's life from flags to a clean exit.
//!
//! Order matters: validate input (exit 2 on mistakes: also a mountpoint
//! inside an origin or the other way round, and a mountpoint a live MusicFS
//! serves, named by its PID), clean up a dead mount a crash left at the
//! mountpoint, take the cache lock (a second mount fails at once, naming
//! the holder), open the cache (healing it), check the origins (one that is
//! down, absent or emptied is fine if its listing is cached; absent with
//! nothing cached is exit 2), mount, then wait for SIGINT/SIGTERM or an
//! external unmount. SIGHUP (a closed terminal) never stops it: it reloads
//! what it can from `--config` (see `reload`). Shutdown unmounts (lazily if
//! a hung origin keeps the kernel busy), flushes the index and exits 0
//! within a few seconds even while an origin hangs.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use musicfs_cas::{Cache, CacheConfig};
use musicfs_fuse::{FsConfig, MusicFs};
use musicfs_origins::{fds, DynOrigin, HealthMonitor, LocalOrigin};
use tracing::{info, warn};

use crate::config::{self, FileConfig, Location, OriginSpec, UsageError};
use crate::lock::CacheLock;
use crate::origins::{self, cached_root, StackParts};
use crate::output::say;
use crate::placement;
use crate::reload::Reloader;
use crate::status::{self, MountInfo, OriginInfo};

#[derive(Debug, Clone, Args)]
pub struct MountArgs {
    /// Where the library appears (an existing, empty directory).
    pub mountpoint: PathBuf,
    /// An origin as [NAME=]LOCATION. LOCATION is a directory, s3://BUCKET[/PREFIX], sftp://[USER@]HOST[:PORT]/PATH, dav://HOST[:PORT]/PATH or davs://… (WebDAV over TLS); settings of a remote origin (endpoint, region, user, password, timeout, connections) go in the config file's [origin.NAME] table. Repeatable. NAME defaults to the last path component (else the bucket or host).
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
    /// Seconds a cached directory listing is served before it is refreshed from the origin in the background [default: 60]
    #[arg(long, value_name = "SECS")]
    pub listing_ttl: Option<u64>,
    /// The staleness bound in seconds: a new open of a file whose version was last confirmed longer ago asks the origin first, so a file changed on a healthy origin is served new at most this long after the change; 0 asks at every open [default: 2]
    #[arg(long, value_name = "SECS")]
    pub freshness: Option<u64>,
    /// A TOML file with the same settings (cache_dir, cache_size, read_timeout, health_timeout, listing_ttl, freshness, origins, log_level); flags override it. SIGHUP re-reads it.
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

/// What a mount runs with: flags over the config file over defaults.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Settings {
    pub mountpoint: PathBuf,
    pub origins: Vec<OriginSpec>,
    pub cache_dir: PathBuf,
    pub cache_size: u64,
    pub read_timeout: Duration,
    pub health_timeout: Duration,
    pub listing_ttl: Duration,
    pub freshness: Duration,
}

pub(crate) fn settings(args: MountArgs) -> Result<Settings, UsageError> {
    let file = match &args.config {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    let specs = if args.origins.is_empty() {
        let mut specs = file.origins.clone();
        specs.extend(config::origins_from_tables(&file.origin));
        specs
    } else {
        args.origins.clone()
    };
    if specs.is_empty() {
        return Err(UsageError(
            "no origin given: add --origin [NAME=]DIR or [NAME=]URL (or `origins` in the config \
             file)"
                .into(),
        ));
    }
    let mut origins: Vec<OriginSpec> = Vec::new();
    for s in &specs {
        let o = config::parse_origin(s, &file.origin)?;
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
        listing_ttl: secs(
            args.listing_ttl,
            file.listing_ttl,
            FsConfig::default().listing_ttl,
            "listing-ttl",
        )?,
        // 0 is meaningful here: confirm at every open.
        freshness: args
            .freshness
            .or(file.freshness)
            .map_or(FsConfig::default().freshness, Duration::from_secs),
        origins,
    })
}

/// Absolute, resolved origin paths, so the cache dir's record means the
/// same thing to `status`, `verify` and `doctor` run from anywhere, and
/// nesting is judged on real paths. A path that cannot be resolved now
/// (NAS down) is resolved as far as it exists.
pub(crate) fn resolve_origins(s: &mut Settings) {
    for o in &mut s.origins {
        if let Location::Dir(dir) = &mut o.location {
            *dir = placement::resolve(dir);
        }
    }
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

/// Refuses an origin that is certainly not a directory. An absent one is
/// judged once the cache is open (see [`cached_root`]): a NAS that does not
/// answer is the health monitor's business, not a usage error.
fn check_origin_paths(origins: &[OriginSpec]) -> Result<(), UsageError> {
    for o in origins {
        let Some(dir) = o.location.dir() else {
            continue;
        };
        match std::fs::symlink_metadata(dir) {
            Ok(m) if !m.is_dir() && !m.file_type().is_symlink() => {
                return Err(UsageError(format!(
                    "origin {}: {} is not a directory",
                    o.name,
                    dir.display()
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

/// Until the runtime's SIGHUP handler is installed, a SIGHUP is ignored
/// instead of ending the process (its default action): the terminal may
/// close while the cache opens.
fn ignore_sighup_until_handled() {
    // SAFETY: sets the SIG_IGN disposition, which runs no code of ours in
    // signal context; called before the mount starts any thread.
    unsafe {
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
}

/// A directory origin whose directory is not there. (A remote origin
/// that does not answer is not absent: it is down, and served from the
/// cache until it answers.)
fn is_absent(origin: &OriginSpec) -> bool {
    origin.location.dir().is_some_and(|dir| {
        matches!(std::fs::symlink_metadata(dir), Err(e) if e.kind() == std::io::ErrorKind::NotFound)
    })
}

fn absent_and_uncached(origin: &OriginSpec) -> UsageError {
    UsageError(format!(
        "origin {}: {} does not exist and nothing of it is cached: check the path (or mount \
         the NAS first)",
        origin.name, origin.location
    ))
}

/// An absent origin with no cache at all is refused before anything is
/// created or locked.
fn check_absent_origins_without_cache(
    cache_dir: &Path,
    origins: &[OriginSpec],
) -> Result<(), UsageError> {
    if cache_dir.join("index.sled").exists() {
        return Ok(());
    }
    match origins.iter().find(|o| is_absent(o)) {
        Some(o) => Err(absent_and_uncached(o)),
        None => Ok(()),
    }
}

/// An absent origin is an unmounted NAS while the cache holds its tree
/// (served until it is back); with nothing cached it is a mistake.
fn check_absent_origins(cache: &Cache, origins: &[OriginSpec]) -> Result<(), UsageError> {
    for o in origins.iter().filter(|o| is_absent(o)) {
        let cached = cached_root(cache, o).len();
        if cached == 0 {
            return Err(absent_and_uncached(o));
        }
        warn!(
            origin = %o.name,
            location = %o.location,
            cached_entries = cached,
            "the origin's root is absent: the NAS looks unmounted; serving its cached tree until it is back"
        );
    }
    Ok(())
}

/// Runs a mount until SIGINT, SIGTERM or an external unmount. `log_flag`
/// is the global `--log-level` flag (a SIGHUP reload does not override it).
pub fn run(args: MountArgs, log_flag: Option<String>) -> Result<ExitCode> {
    ignore_sighup_until_handled();
    limit_malloc_arenas();
    let mut s = settings(args.clone())?;
    check_origin_paths(&s.origins)?;
    resolve_origins(&mut s);
    let resolved = placement::resolve(&s.mountpoint);
    placement::refuse_live_mount(&resolved)?;
    placement::refuse_nesting(&resolved, &s.origins)?;
    check_absent_origins_without_cache(&s.cache_dir, &s.origins)?;
    prepare_mountpoint(&s.mountpoint)?;
    let mountpoint = s
        .mountpoint
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", s.mountpoint.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .thread_name("musicfs")
        .build()
        .context("cannot start the async runtime")?;
    // A remote origin's configuration (region, endpoint, URL) is checked
    // here, before anything is locked, so a mistake stays one line.
    let mut remotes = rt.block_on(origins::connect_remotes(&s.origins))?;
    let lock = CacheLock::acquire(&s.cache_dir)?;
    // From here a SIGHUP waits in this stream for the main loop to reload.
    let mut hangup = rt
        .block_on(async { tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) })
        .context("cannot handle SIGHUP")?;

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

    let mut config = CacheConfig::new(&s.cache_dir, s.cache_size);
    config.origin_timeout = s.read_timeout;
    config.max_open_files = budget.store;
    let (cache, opened) = rt
        .block_on(Cache::open(config))
        .context("cannot open the cache")?;
    if opened.index.rebuilt {
        warn!(reason = ?opened.index.reason, "the cache index was damaged and has been rebuilt from the chunk files");
    }

    check_absent_origins(&cache, &s.origins)?;
    // Logged once the input is known good, so a usage error stays one line.
    info!(lock = %lock.path().display(), pid = std::process::id(), "cache locked");
    info!(
        fd_limit,
        store = budget.store,
        per_origin = budget.per_origin,
        "fd budget"
    );

    let health = Arc::new(HealthMonitor::new(s.health_timeout));
    let mut origins: Vec<DynOrigin> = Vec::new();
    let parts = StackParts {
        cache: &cache,
        health: &health,
        fds_per_origin: budget.per_origin,
    };
    for (o, remote) in s.origins.iter().zip(remotes.drain(..)) {
        let origin = origins::build(o, remote, &parts);
        info!(origin = %o.name, location = %o.location, "origin");
        cache.add_origin(origin.clone());
        origins.push(origin);
    }

    let fs_config = FsConfig {
        read_timeout: s.read_timeout,
        listing_ttl: s.listing_ttl,
        freshness: s.freshness,
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
                location: o.location.to_string(),
            })
            .collect(),
    };
    if let Err(e) = std::fs::write(
        s.cache_dir.join(status::MOUNT_INFO),
        serde_json::to_vec_pretty(&info)?,
    ) {
        warn!(error = %e, "cannot record the mount in the cache dir; status and doctor will know less");
    }

    // Installed before mounting: from the moment the mount exists, a
    // SIGTERM or Ctrl-C unmounts it instead of killing the process and
    // leaving a dead mount. Before this, they end the process as usual
    // (nothing is mounted yet).
    let (mut term, mut int) = rt
        .block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            Ok::<_, std::io::Error>((
                signal(SignalKind::terminate())?,
                signal(SignalKind::interrupt())?,
            ))
        })
        .context("cannot handle SIGTERM and SIGINT")?;
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
    say(&format!(
        "musicfs: mounted at {} (PID {})",
        mountpoint.display(),
        std::process::id()
    ));

    let mut reloader = Reloader::new(args, log_flag, s.clone(), Arc::clone(&health));
    let reason = rt.block_on(async {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                _ = term.recv() => return anyhow::Ok("SIGTERM"),
                _ = int.recv() => return anyhow::Ok("SIGINT"),
                _ = hangup.recv() => reloader.hangup(),
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
    say(&format!("musicfs: unmounted ({reason})"));
    Ok(ExitCode::SUCCESS)
}
