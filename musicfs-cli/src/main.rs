//! `musicfs`: mount a music library through a self-healing chunk cache, and
//! inspect, verify and diagnose its cache.
//!
//! Exit codes: 0 success; 1 a runtime failure or remaining damage (the
//! message says what happened); 2 bad input (the message says what to fix).

mod doctor;
mod forget;
mod mount;
mod origins;
mod output;
mod placement;
mod reload;
mod verify;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use musicfs_cli::{config, lock, mountinfo, status};

#[derive(Debug, Parser)]
#[command(
    name = "musicfs",
    version,
    about = "A read-only filesystem for music libraries on a NAS, a server or object storage, through a verified, self-healing local cache."
)]
struct Cli {
    /// Log level (error, warn, info, debug, trace); RUST_LOG wins when set.
    #[arg(long, global = true, value_name = "LEVEL")]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Mount origins read-only at MOUNTPOINT and serve them until SIGINT/SIGTERM or unmount.
    ///
    /// Each origin appears at MOUNTPOINT/NAME/. A dead mount left by a crash
    /// at MOUNTPOINT is cleaned up first.
    Mount(mount::MountArgs),
    /// Show the running mount's origins, cache use, hit ratio and health.
    Status {
        /// Cache directory [default: $XDG_CACHE_HOME/musicfs or ~/.cache/musicfs]
        #[arg(long, value_name = "DIR")]
        cache_dir: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Hash every cached chunk and check the index; --repair fixes what it finds.
    ///
    /// Without --repair nothing in the cache directory is changed: what a
    /// mount or --repair would heal is reported. On the cache of a running
    /// mount it checks the chunk files and skips the index (the mount has
    /// it open); --repair needs the mount stopped. Exit 0 when clean (or
    /// clean after repair), 1 when damage remains, 2 when --cache-dir is not
    /// a MusicFS cache.
    Verify {
        #[arg(long, value_name = "DIR")]
        cache_dir: Option<PathBuf>,
        /// Remove corrupt chunks, drop orphaned records and damaged manifests, re-fetch missing chunks where the origin is known.
        #[arg(long)]
        repair: bool,
        #[arg(long)]
        json: bool,
    },
    /// Check what can go wrong (lock holder, stale mounts, disk, fds, origins, index) and say how to fix it.
    ///
    /// Exit 0 when nothing needs action, 1 otherwise.
    Doctor {
        #[arg(long, value_name = "DIR")]
        cache_dir: Option<PathBuf>,
        /// Also check this mountpoint.
        #[arg(long, value_name = "DIR")]
        mountpoint: Option<PathBuf>,
    },
    /// Drop an origin's cached tree (listings and manifests), after emptying it on purpose.
    ///
    /// A mount serves the cached tree of an origin whose root went empty or
    /// absent (a NAS that looks unmounted); when the library really was
    /// emptied or moved, run this on the stopped mount's cache so the next
    /// mount shows the origin as it is. Its chunks age out by LRU eviction.
    Forget {
        /// The origin's name (as under the mountpoint, and in `musicfs status`).
        name: String,
        #[arg(long, value_name = "DIR")]
        cache_dir: Option<PathBuf>,
    },
}

use output::init_logging;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Mount(args) => {
            let hint = args.log_level_hint();
            init_logging(cli.log_level.as_deref().or(hint.as_deref()));
            mount::run(args, cli.log_level)
        }
        Command::Status { cache_dir, json } => {
            init_logging(Some(cli.log_level.as_deref().unwrap_or("warn")));
            status_cmd(cache_dir, json)
        }
        Command::Verify {
            cache_dir,
            repair,
            json,
        } => {
            init_logging(Some(cli.log_level.as_deref().unwrap_or("warn")));
            verify::run(
                cache_dir.unwrap_or_else(config::default_cache_dir),
                repair,
                json,
            )
        }
        Command::Doctor {
            cache_dir,
            mountpoint,
        } => {
            init_logging(Some(cli.log_level.as_deref().unwrap_or("warn")));
            doctor::run(
                cache_dir.unwrap_or_else(config::default_cache_dir),
                mountpoint,
            )
        }
        Command::Forget { name, cache_dir } => {
            init_logging(Some(cli.log_level.as_deref().unwrap_or("warn")));
            forget::run(&name, cache_dir.unwrap_or_else(config::default_cache_dir))
        }
    };
    // Queued log lines first (bounded: the terminal may have stopped
    // reading), so the last line below comes last.
    output::flush_logs(std::time::Duration::from_secs(1));
    // The terminal may be gone by now (a mount outlives it): these lines
    // must not panic on a failed write.
    match result {
        Ok(code) => code,
        Err(e) => {
            if let Some(u) = e.downcast_ref::<config::UsageError>() {
                output::complain(&format!("musicfs: {u}"));
                return ExitCode::from(2);
            }
            output::complain(&format!("musicfs: {e:#}"));
            ExitCode::from(1)
        }
    }
}

fn status_cmd(cache_dir: Option<PathBuf>, json: bool) -> anyhow::Result<ExitCode> {
    let dir = cache_dir.unwrap_or_else(config::default_cache_dir);
    let report = status::query(&dir).unwrap_or_else(|| status::offline_report(&dir));
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        status::print(&report);
    }
    Ok(ExitCode::SUCCESS)
}
