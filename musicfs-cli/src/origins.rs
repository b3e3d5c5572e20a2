//! The origin stacks a mount serves from, built from what the user gave.
//!
//! Layer: between the CLI's settings and `musicfs-origins`. Behaviour is
//! composition, outermost first:
//!
//! ```text
//! directory:  Retry → health watch → RootGuard → LocalOrigin (own fd share)
//! remote:     Retry → health watch → RootGuard → Timeout → Limit → RemoteOrigin
//! ```
//!
//! Retries live only in `RetryOrigin`; each remote attempt is bounded by
//! `TimeoutOrigin` (a hung connection is abandoned and the retry opens a
//! fresh one) and waits its turn in `LimitOrigin` (at most `connections`
//! requests in flight per origin). The whole read, retries included, is
//! bounded by `--read-timeout` in the cache.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use musicfs_cas::Cache;
use musicfs_origins::remote::RemoteOrigin;
use musicfs_origins::{
    DynOrigin, HealthMonitor, LimitOrigin, LocalOrigin, OriginPath, RetryOrigin, RetryPolicy,
    RootGuard, TimeoutOrigin,
};

use crate::config::{Location, OriginSpec, UsageError};

/// Requests one remote origin has in flight at once, unless its
/// `[origin.NAME] connections` says otherwise. The filesystem's listing
/// read-ahead takes up to 16 and the cache keeps a quarter of the limit
/// for reads a player waits on, so 32 leaves a walk, a few files'
/// pipelined ingests and the player's own reads room side by side.
pub const DEFAULT_CONNECTIONS: usize = 32;

/// How long one request to a remote origin may take before it is
/// abandoned (`[origin.NAME] timeout`). Long enough for a 2 MiB range on a
/// slow uplink; a hung connection is retried well inside `--read-timeout`.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything a stack needs from the mount.
#[derive(Debug)]
pub struct StackParts<'a> {
    pub cache: &'a Cache,
    pub health: &'a Arc<HealthMonitor>,
    /// Descriptors a local origin may keep open.
    pub fds_per_origin: usize,
}

/// The root listing the cache holds for `origin`; empty when none (or an
/// empty one) is cached.
pub fn cached_root(cache: &Cache, origin: &OriginSpec) -> Vec<musicfs_origins::DirEntry> {
    match cache.index().listing(&origin.name, &OriginPath::root()) {
        Ok(Some(listing)) => listing.entries,
        _ => Vec::new(),
    }
}

/// Connects each remote origin (no network needed: a server that is down
/// now is the health monitor's business). Only mistakes of configuration
/// fail, and they fail before anything is locked or mounted, as one line.
pub async fn connect_remotes(origins: &[OriginSpec]) -> Result<Vec<Option<DynOrigin>>, UsageError> {
    let mut out = Vec::with_capacity(origins.len());
    for o in origins {
        out.push(match &o.location {
            Location::Dir(_) => None,
            Location::Remote(spec) => {
                let remote = RemoteOrigin::connect(o.name.clone(), (**spec).clone())
                    .await
                    .map_err(|e| UsageError(format!("origin {}: {e}", o.name)))?;
                Some(Arc::new(remote) as DynOrigin)
            }
        });
    }
    Ok(out)
}

/// Builds the stack for one origin over `remote`, its connected
/// [`RemoteOrigin`] (from [`connect_remotes`]; `None` for a directory).
pub fn build(o: &OriginSpec, remote: Option<DynOrigin>, parts: &StackParts<'_>) -> DynOrigin {
    let (storage, policy): (DynOrigin, RetryPolicy) = match (&o.location, remote) {
        (Location::Remote(_), Some(remote)) => {
            let limited = LimitOrigin::new(remote, o.connections.unwrap_or(DEFAULT_CONNECTIONS));
            let timed = TimeoutOrigin::new(
                Arc::new(limited),
                o.timeout.unwrap_or(DEFAULT_REQUEST_TIMEOUT),
            );
            (
                Arc::new(timed),
                // A network blip, a reset connection or a throttled request
                // heals in a moment: more tries, shorter waits (with jitter),
                // all inside the read timeout.
                RetryPolicy {
                    max_attempts: 4,
                    initial_backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_secs(2),
                },
            )
        }
        (location, _) => {
            let dir = location.dir().map(Path::to_path_buf).unwrap_or_default();
            (
                Arc::new(
                    LocalOrigin::new(o.name.clone(), dir).with_max_blocking(parts.fds_per_origin),
                ),
                RetryPolicy {
                    max_attempts: 2,
                    initial_backoff: Duration::from_millis(200),
                    max_backoff: Duration::from_secs(1),
                },
            )
        }
    };
    // An emptied or absent root while the cache holds the tree is an
    // unmounted NAS (or a wrong prefix), not an empty library; the guard
    // sits under the monitor's watch so the health checks see it too.
    let guard = RootGuard::new(storage, o.location.to_string());
    guard.remember_root(&cached_root(parts.cache, o));
    // Reads go through the monitor's watch, so a hung origin shows as
    // unhealthy `--health-timeout` after a read starts waiting, not only at
    // the next periodic probe.
    let watched = parts.health.watch(Arc::new(guard));
    Arc::new(RetryOrigin::new(watched, policy))
}
