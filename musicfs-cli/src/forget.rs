//! `musicfs forget NAME`: drop an origin's cached tree once the user has
//! emptied (or moved) the library on purpose.
//!
//! A mount never lets an empty or absent root replace a cached tree, since
//! that is what an unmounted NAS looks like; only the user can tell the
//! two apart. This runs on a stopped mount's cache (it takes the cache
//! lock) and removes the origin's listings and manifests from the index.
//! Chunks stay: other files may share them, and LRU eviction ages out the
//! rest.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use musicfs_cas::Index;
use musicfs_origins::OriginId;

use crate::config::UsageError;
use crate::lock::CacheLock;
use crate::output::say;

pub fn run(name: &str, cache_dir: PathBuf) -> Result<ExitCode> {
    let id = OriginId::new(name).map_err(|e| UsageError(e.to_string()))?;
    let index_path = cache_dir.join("index.sled");
    if !index_path.is_dir() {
        return Err(UsageError(format!(
            "{} is not a MusicFS cache (it has no index.sled): check --cache-dir",
            cache_dir.display()
        ))
        .into());
    }
    let _lock = CacheLock::acquire(&cache_dir)?;
    let (index, _) = Index::open(&index_path).context("cannot open the cache index")?;
    let (listings, manifests) = index
        .forget_origin(&id)
        .context("cannot remove the origin's records")?;
    index.flush().context("cannot write the cache index")?;
    if listings + manifests == 0 {
        return Err(UsageError(format!(
            "nothing is cached for origin {id} in {}: check the name (`musicfs status` shows \
             the last mount's origins)",
            cache_dir.display()
        ))
        .into());
    }
    say(&format!(
        "musicfs: forgot origin {id}: removed {listings} directory listings and {manifests} file \
         manifests from {}; its chunks age out by LRU eviction. The next mount shows {id} as it \
         is now.",
        cache_dir.display()
    ));
    Ok(ExitCode::SUCCESS)
}
