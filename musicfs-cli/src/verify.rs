//! `musicfs verify [--repair]` on a stopped mount's cache.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use musicfs_cas::{Cache, CacheConfig};
use musicfs_origins::{DynOrigin, LocalOrigin, OriginId};

use crate::lock::CacheLock;
use crate::status::read_mount_info;

pub fn run(cache_dir: PathBuf, repair: bool, json: bool) -> Result<ExitCode> {
    let _lock = CacheLock::acquire(&cache_dir)?;
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let report = rt.block_on(async {
        // The size limit does not matter to verify; a large one keeps it
        // from evicting anything at open.
        let (cache, opened) = Cache::open(CacheConfig::new(&cache_dir, u64::MAX / 2)).await?;
        if opened.index.rebuilt {
            eprintln!(
                "musicfs: the index was damaged and has been rebuilt from the chunk files ({})",
                opened.index.reason.unwrap_or_default()
            );
        }
        // Re-fetching missing chunks needs the origins of the last mount.
        if let Some(info) = read_mount_info(&cache_dir) {
            for o in info.origins {
                if let Ok(id) = OriginId::new(&o.name) {
                    let origin: DynOrigin = std::sync::Arc::new(LocalOrigin::new(id, o.location));
                    cache.add_origin(origin);
                }
            }
        }
        let report = cache.verify(repair).await?;
        cache.flush().await?;
        anyhow::Ok(report)
    })?;
    if json {
        let findings: Vec<serde_json::Value> = report
            .findings
            .iter()
            .map(|f| {
                serde_json::json!({
                    "kind": f.kind.to_string(), "subject": f.subject, "detail": f.detail,
                    "fix": f.fix, "repaired": f.repaired,
                })
            })
            .collect();
        let v = serde_json::json!({
            "chunks_checked": report.chunks_checked, "bytes_checked": report.bytes_checked,
            "manifests_checked": report.manifests_checked,
            "chunks_not_cached": report.chunks_not_cached, "clean": report.is_clean(), "findings": findings,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{report}");
        if !report.is_clean() {
            println!("damage remains: run `musicfs verify --repair`");
        } else if report.findings.is_empty() {
            println!("clean");
        } else {
            println!("clean after repair");
        }
    }
    Ok(if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
