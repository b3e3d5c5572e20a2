//! SIGHUP: what `musicfs mount` does when the terminal it was started from
//! closes, or when `kill -HUP PID` asks it to re-read its config file.
//!
//! Invariants:
//! - A SIGHUP never ends the daemon or its mount.
//! - With a `--config` file, the settings that can change live are applied:
//!   `log_level` and `health_timeout`. The others (`cache_dir`,
//!   `cache_size`, `read_timeout`, `listing_ttl`, `freshness`, `origins`) are named in
//!   the log as needing a remount when they changed, and are not applied.
//!   Flags still override the file, as at start; `RUST_LOG` still beats
//!   `log_level`.
//! - A config file that no longer reads or parses changes nothing: the
//!   running settings stay, and the log says why.

use std::sync::Arc;

use musicfs_origins::HealthMonitor;
use tracing::{info, warn};

use crate::config::FileConfig;
use crate::mount::{resolve_origins, settings, MountArgs, Settings};
use crate::output;

/// Applies SIGHUPs to a running mount.
#[derive(Debug)]
pub struct Reloader {
    args: MountArgs,
    /// The global `--log-level` flag, which overrides the file.
    log_flag: Option<String>,
    running: Settings,
    log_level: String,
    health: Arc<HealthMonitor>,
}

impl Reloader {
    pub fn new(
        args: MountArgs,
        log_flag: Option<String>,
        running: Settings,
        health: Arc<HealthMonitor>,
    ) -> Self {
        let log_level = log_flag
            .clone()
            .or_else(|| args.log_level_hint())
            .unwrap_or_else(|| "info".to_owned());
        Reloader {
            args,
            log_flag,
            running,
            log_level,
            health,
        }
    }

    /// Handles one SIGHUP (see the module docs).
    pub fn hangup(&mut self) {
        let Some(path) = self.args.config.clone() else {
            info!("SIGHUP: no --config file to reload; carrying on (SIGTERM or Ctrl-C unmounts)");
            return;
        };
        let loaded = FileConfig::load(&path).and_then(|file| {
            let mut new = settings(self.args.clone())?;
            resolve_origins(&mut new);
            Ok((file, new))
        });
        let (file, new) = match loaded {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "SIGHUP: cannot reload the config file; keeping the running settings");
                return;
            }
        };
        let mut reloaded = Vec::new();
        let mut ignored = Vec::new();

        let mut new_filter = None;
        let wanted = file.log_level.unwrap_or_else(|| "info".to_owned());
        if wanted != self.log_level {
            if output::level_from_env() {
                ignored.push("log_level (RUST_LOG sets it)".to_owned());
            } else if self.log_flag.is_some() {
                ignored.push("log_level (the --log-level flag overrides it)".to_owned());
            } else {
                match output::parse_level(&wanted) {
                    Ok(filter) => {
                        reloaded.push(format!("log_level = {wanted}"));
                        new_filter = Some((wanted, filter));
                    }
                    Err(e) => ignored.push(format!("log_level ({e})")),
                }
            }
        }

        if new.health_timeout != self.running.health_timeout {
            self.health.set_timeout(new.health_timeout);
            self.running.health_timeout = new.health_timeout;
            reloaded.push(format!(
                "health_timeout = {}s",
                new.health_timeout.as_secs()
            ));
        }

        let old = &self.running;
        let remount: Vec<&str> = [
            ("origins", new.origins != old.origins),
            ("cache_dir", new.cache_dir != old.cache_dir),
            ("cache_size", new.cache_size != old.cache_size),
            ("read_timeout", new.read_timeout != old.read_timeout),
            ("listing_ttl", new.listing_ttl != old.listing_ttl),
            ("freshness", new.freshness != old.freshness),
        ]
        .into_iter()
        .filter_map(|(name, changed)| changed.then_some(name))
        .collect();

        // Said before a new log level applies, so that raising it to
        // `warn` does not hide what was done.
        let config = path.display();
        if reloaded.is_empty() && remount.is_empty() && ignored.is_empty() {
            info!("SIGHUP: re-read {config}; nothing changed");
        } else {
            let list = |v: &[String]| {
                if v.is_empty() {
                    "nothing".to_owned()
                } else {
                    v.join(", ")
                }
            };
            info!(
                "SIGHUP: re-read {config}; reloaded: {}; changed but needs a remount: {}; not applied: {}",
                list(&reloaded),
                if remount.is_empty() {
                    "nothing".to_owned()
                } else {
                    remount.join(", ")
                },
                list(&ignored)
            );
        }
        if let Some((level, filter)) = new_filter {
            match output::set_filter(filter) {
                Ok(()) => self.log_level = level,
                Err(e) => warn!(error = %e, "SIGHUP: cannot change the log level"),
            }
        }
    }
}
