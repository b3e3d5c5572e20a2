//! `musicfs verify [--repair]`: check a cache directory like `rustic check`.
//!
//! - It first makes sure `--cache-dir` is a MusicFS cache (exit 2 with what
//!   it expected otherwise; nothing is created on a typo).
//! - Without `--repair` it changes nothing on disk: it inspects the chunk
//!   files and a copy of the index ([`musicfs_cas::inspect`]) and reports
//!   what an open or a repair would heal. Exit 1 only for damage: crash
//!   leftovers that the next mount heals by itself (temp files, strays,
//!   index records out of step with the files) are listed but exit 0. It holds a shared lock on
//!   `musicfs.lock` meanwhile (without writing to it), so a mount cannot
//!   start and change the cache under it.
//! - With a mount running it still hashes every chunk file (chunks are
//!   immutable and named by their hash, so reading them needs no lock and
//!   does not disturb playback), and says that the index checks were
//!   skipped: the daemon holds sled's lock and writes the index as it
//!   plays. `--repair` on a running mount is refused with what to do; the
//!   mount itself removes and re-fetches any damaged chunk it reads.
//! - `--repair` on a stopped cache takes the cache lock, opens the cache
//!   (which heals crash leftovers; those are reported as repaired findings)
//!   and repairs what the full check finds.
//!
//! On a terminal a progress bar on stderr follows the hashing; with
//! `--json`, or when stderr is not a terminal, output is only the report.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use musicfs_cas::inspect::{self, IndexCheck, Progress};
use musicfs_cas::verify::{Finding, FindingKind};
use musicfs_cas::{Cache, CacheConfig, VerifyReport};
use musicfs_origins::{DynOrigin, LocalOrigin, OriginId};

use crate::config::UsageError;
use crate::lock::{self, CacheLock};
use crate::status::read_mount_info;

pub fn run(cache_dir: PathBuf, repair: bool, json: bool) -> Result<ExitCode> {
    inspect::looks_like_cache(&cache_dir).map_err(UsageError)?;
    let bar = progress_bar(json);
    let running = lock::holder(&cache_dir).map(|(pid, _)| pid);
    let report = match (running, repair) {
        (Some(pid), true) => {
            let pid = pid.map_or_else(|| "?".to_owned(), |p| p.to_string());
            return Err(UsageError(format!(
                "a mount (PID {pid}) is serving this cache: stop it (kill -TERM {pid}) before \
                 `musicfs verify --repair`; without --repair verify checks a running mount's chunks"
            ))
            .into());
        }
        (Some(pid), false) => {
            let pid = pid.map_or_else(|| "?".to_owned(), |p| p.to_string());
            let why = format!(
                "index records and manifests: the mount (PID {pid}) has the index open; stop it \
                 and run verify again to check them"
            );
            inspect::inspect(&cache_dir, IndexCheck::Skip(why), true, &|p| bar.update(p))?
        }
        (None, false) => {
            // Held for the whole check; `None` when no mount ever ran here.
            let _shared = lock::SharedLock::acquire(&cache_dir)?;
            inspect::inspect(&cache_dir, IndexCheck::Snapshot, false, &|p| bar.update(p))?
        }
        (None, true) => repair_stopped(&cache_dir, &bar)?,
    };
    bar.finish();
    print_report(&report, json, running.is_some())?;
    Ok(if report.damage_remains() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn repair_stopped(cache_dir: &Path, bar: &Bar) -> Result<VerifyReport> {
    let _lock = CacheLock::acquire(cache_dir)?;
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    rt.block_on(async {
        // The size limit does not matter to verify; a large one keeps it
        // from evicting anything at open.
        let (cache, opened) = Cache::open(CacheConfig::new(cache_dir, u64::MAX / 2)).await?;
        let healed = cache.store().reconciled().await;
        // Re-fetching missing chunks needs the origins of the last mount.
        if let Some(info) = read_mount_info(cache_dir) {
            for o in info.origins {
                // A remote origin's settings and credentials are not in the
                // record: its missing chunks are fetched again when read.
                if musicfs_origins::remote::is_remote_url(&o.location) {
                    continue;
                }
                if let Ok(id) = OriginId::new(&o.name) {
                    let origin: DynOrigin =
                        std::sync::Arc::new(LocalOrigin::new(id, PathBuf::from(o.location)));
                    cache.add_origin(origin);
                }
            }
        }
        let mut report = musicfs_cas::verify::check(&cache, true, &|p| bar.update(p)).await?;
        let mut found = Vec::new();
        if opened.index.rebuilt {
            found.push((
                FindingKind::DamagedIndex,
                1,
                opened.index.reason.clone().unwrap_or_default(),
                "moved aside and rebuilt from the chunk files",
            ));
        }
        for (kind, n, what, fix) in [
            (
                FindingKind::OrphanedTempFile,
                opened.store.temp_files_removed,
                "temp files left by a crash",
                "removed",
            ),
            (
                FindingKind::StrayFile,
                healed.stray_files_removed,
                "stray files in the chunk tree",
                "removed",
            ),
            (
                FindingKind::FileWithoutRecord,
                healed.index_entries_added,
                "chunk files without an index record",
                "records added",
            ),
            (
                FindingKind::RecordWithoutFile,
                healed.index_entries_dropped,
                "index records without a chunk file",
                "records dropped",
            ),
        ] {
            if n > 0 {
                found.push((kind, n, what.to_owned(), fix));
            }
        }
        for (kind, n, what, fix) in found {
            report.findings.insert(
                0,
                Finding {
                    kind,
                    subject: cache_dir.display().to_string(),
                    detail: format!("{n} {what}"),
                    fix: format!("{fix} when the cache was opened"),
                    repaired: true,
                },
            );
        }
        cache.flush().await?;
        anyhow::Ok(report)
    })
}

fn print_report(report: &VerifyReport, json: bool, running: bool) -> Result<()> {
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
            "chunks_not_cached": report.chunks_not_cached,
            "clean": !report.damage_remains(),
            "leftovers": report.unrepaired().filter(|f| f.kind.heals_at_mount()).count(),
            "findings": findings, "skipped": report.skipped, "mount_running": running,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    print!("{report}");
    let leftovers = report
        .unrepaired()
        .filter(|f| f.kind.heals_at_mount())
        .count();
    if report.damage_remains() {
        if running {
            println!("damage remains: stop the mount, then run `musicfs verify --repair`");
        } else {
            println!("damage remains: run `musicfs verify --repair`");
        }
    } else if leftovers > 0 {
        println!(
            "no damage; {leftovers} crash leftover(s) that the next mount heals by itself \
             (or `musicfs verify --repair` now)"
        );
    } else if report.findings.is_empty() {
        println!("clean");
    } else {
        println!("clean after repair");
    }
    Ok(())
}

/// A progress bar on a terminal; nothing otherwise.
struct Bar(Option<ProgressBar>);

fn progress_bar(json: bool) -> Bar {
    if json || !std::io::stderr().is_terminal() {
        return Bar(None);
    }
    let bar = ProgressBar::new(0);
    let style = ProgressStyle::with_template(
        "{spinner} hashing chunks {bar:30} {binary_bytes}/{binary_total_bytes} ({binary_bytes_per_sec}, {eta})",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    Bar(Some(bar))
}

impl Bar {
    fn update(&self, p: Progress) {
        let Some(bar) = &self.0 else { return };
        match p {
            Progress::Listed { bytes, .. } => bar.set_length(bytes),
            Progress::Hashed { bytes } => bar.inc(bytes),
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
    }
}
