//! `verify`: check everything the cache holds, and optionally repair it.
//!
//! Like `rustic check`, verify never stops at the first problem: it collects
//! every [`Finding`] with the fix for it. With `repair`, each fix is applied
//! and recorded, so that a second verify over the same cache is clean:
//! - a corrupt chunk file (bytes not hashing to its name, truncated, empty)
//!   is removed;
//! - an index record without a chunk file is dropped, a chunk file without a
//!   record gets one;
//! - a manifest that does not decode is dropped;
//! - a manifest chunk whose file was lost (the index still records it) is
//!   re-fetched from the origin by its byte range and checked against its
//!   name; when that cannot be done (no such origin configured, origin down,
//!   file changed) the manifest is dropped so the file is simply fetched
//!   again on its next read.
//!
//! A manifest chunk with neither a file nor a record was evicted: that is
//! the cache working as sized, not damage, so it is only counted
//! ([`VerifyReport::chunks_not_cached`]); the next read fetches it.
//!
//! This check runs on an opened [`Cache`], and opening heals crash
//! leftovers first; the CLI turns what the open healed into repaired
//! findings. Without repair, the CLI uses [`crate::inspect`] instead, which
//! changes nothing on disk.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::Path;

use musicfs_origins::{OriginId, OriginPath};
use tracing::info;

use crate::cache::Cache;
use crate::index::now_ns;
use crate::inspect::Progress;
use crate::manifest::Manifest;
use crate::{ChunkId, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FindingKind {
    CorruptChunk,
    RecordWithoutFile,
    FileWithoutRecord,
    DamagedManifest,
    MissingChunk,
    /// A temp file a crash left in `tmp/`.
    OrphanedTempFile,
    /// A file or directory in the shard tree that is not a chunk file in
    /// its right shard.
    StrayFile,
    /// The index cannot be opened or holds undecodable records.
    DamagedIndex,
}

impl FindingKind {
    /// Leftovers of a crash that the next mount heals by itself (its open
    /// and background reconcile): normal after a kill or power loss, not
    /// damage.
    pub fn heals_at_mount(&self) -> bool {
        matches!(
            self,
            FindingKind::OrphanedTempFile
                | FindingKind::StrayFile
                | FindingKind::FileWithoutRecord
                | FindingKind::RecordWithoutFile
        )
    }
}

impl fmt::Display for FindingKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FindingKind::CorruptChunk => "corrupt chunk",
            FindingKind::RecordWithoutFile => "orphaned index record",
            FindingKind::FileWithoutRecord => "unindexed chunk",
            FindingKind::DamagedManifest => "damaged manifest",
            FindingKind::MissingChunk => "missing chunk",
            FindingKind::OrphanedTempFile => "orphaned temp file",
            FindingKind::StrayFile => "stray file",
            FindingKind::DamagedIndex => "damaged index",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub kind: FindingKind,
    /// The chunk or file concerned.
    pub subject: String,
    pub detail: String,
    /// What repair does (or did) about it.
    pub fix: String,
    pub repaired: bool,
}

#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    pub chunks_checked: u64,
    pub bytes_checked: u64,
    pub manifests_checked: u64,
    /// Chunks that manifests name but eviction removed (not damage).
    pub chunks_not_cached: u64,
    pub findings: Vec<Finding>,
    /// Checks that were not made, each with the reason.
    pub skipped: Vec<String>,
}

impl VerifyReport {
    /// True when nothing is wrong, or everything found was repaired.
    pub fn is_clean(&self) -> bool {
        self.findings.iter().all(|f| f.repaired)
    }

    pub fn unrepaired(&self) -> impl Iterator<Item = &Finding> {
        self.findings.iter().filter(|f| !f.repaired)
    }

    /// True when something unrepaired is more than a crash leftover the
    /// next mount heals by itself (`musicfs verify` exits 1 then).
    pub fn damage_remains(&self) -> bool {
        self.unrepaired().any(|f| !f.kind.heals_at_mount())
    }
}

pub(crate) async fn run(cache: &Cache, repair: bool) -> Result<VerifyReport> {
    check(cache, repair, &|_| {}).await
}

/// [`Cache::verify`] reporting its progress.
pub async fn check(
    cache: &Cache,
    repair: bool,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<VerifyReport> {
    let store = cache.store().clone();
    let index = cache.index().clone();
    let mut report = VerifyReport::default();
    // Records against files is only meaningful once the open's own
    // reconcile has finished.
    store.reconciled().await;

    // 1. Every chunk file on disk, hashed.
    let chunks_dir = store.chunks_dir().to_owned();
    let on_disk = tokio::task::spawn_blocking(move || list_chunk_files(&chunks_dir))
        .await
        .unwrap_or_default();
    let mut present: HashSet<ChunkId> = HashSet::new();
    let mut corrupt: HashSet<ChunkId> = HashSet::new();
    progress(Progress::Listed {
        files: on_disk.len() as u64,
        bytes: on_disk.values().map(|(_, size)| size).sum(),
    });
    for (id, (path, size)) in &on_disk {
        progress(Progress::Hashed { bytes: *size });
        let p = path.clone();
        let bytes = tokio::task::spawn_blocking(move || std::fs::read(p)).await;
        let data = match bytes {
            Ok(Ok(d)) => d,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => continue,
            other => {
                let why = match other {
                    Ok(Err(e)) => e.to_string(),
                    _ => "the read task failed".to_owned(),
                };
                bad_chunk(
                    &store,
                    *id,
                    format!("unreadable: {why}"),
                    repair,
                    &mut corrupt,
                    &mut report,
                )
                .await?;
                continue;
            }
        };
        report.chunks_checked += 1;
        report.bytes_checked += data.len() as u64;
        let actual = ChunkId::of(&data);
        if actual == *id {
            present.insert(*id);
            continue;
        }
        let detail = format!("{} bytes hashing to {actual}", data.len());
        bad_chunk(&store, *id, detail, repair, &mut corrupt, &mut report).await?;
    }

    // 2. Index records against files.
    let records = index.chunk_records()?;
    let recorded: HashSet<ChunkId> = records.iter().map(|(id, _)| *id).collect();
    for (id, _) in &records {
        if !on_disk.contains_key(id) {
            if repair {
                store.remove(*id).await?;
            }
            report.findings.push(Finding {
                kind: FindingKind::RecordWithoutFile,
                subject: id.to_hex(),
                detail: "the index lists a chunk whose file is gone".into(),
                fix: "drop the index record".into(),
                repaired: repair,
            });
        }
    }
    for id in &present {
        if !recorded.contains(id) {
            if repair {
                let size = std::fs::metadata(store.chunk_path(id))
                    .map(|m| m.len())
                    .unwrap_or(0);
                index.put_chunk(
                    id,
                    crate::index::ChunkRecord {
                        size,
                        atime_ns: now_ns(),
                    },
                )?;
            }
            report.findings.push(Finding {
                kind: FindingKind::FileWithoutRecord,
                subject: id.to_hex(),
                detail: "a valid chunk file has no index record".into(),
                fix: "add the index record".into(),
                repaired: repair,
            });
        }
    }

    let sets = ChunkSets {
        present,
        recorded,
        corrupt,
    };
    // 3. Manifests: decodable, and every chunk present.
    for entry in index.manifests()? {
        report.manifests_checked += 1;
        let (key, manifest) = match (entry.key, entry.manifest) {
            (Some(k), Ok(m)) => (k, m),
            (key, m) => {
                if repair {
                    index.remove_manifest_raw(&entry.raw_key)?;
                }
                let subject = key.map_or_else(
                    || String::from_utf8_lossy(&entry.raw_key).into_owned(),
                    |(o, p)| format!("{o}:{p}"),
                );
                report.findings.push(Finding {
                    kind: FindingKind::DamagedManifest,
                    subject,
                    detail: m
                        .err()
                        .map_or_else(|| "undecodable key".into(), |e| e.to_string()),
                    fix: "drop the manifest; the file is fetched again on its next read".into(),
                    repaired: repair,
                });
                continue;
            }
        };
        check_manifest(cache, &key, &manifest, &sets, repair, &mut report).await?;
    }
    if repair {
        store.flush().await?;
    }
    info!(
        chunks = report.chunks_checked,
        manifests = report.manifests_checked,
        findings = report.findings.len(),
        repair,
        "verify finished"
    );
    Ok(report)
}

/// A chunk file that is corrupt or unreadable: removed when repairing, and
/// remembered, so the manifest check re-fetches it (repair) or does not
/// report it twice.
async fn bad_chunk(
    store: &crate::ChunkStore,
    id: ChunkId,
    detail: String,
    repair: bool,
    corrupt: &mut HashSet<ChunkId>,
    report: &mut VerifyReport,
) -> Result<()> {
    if repair {
        store.remove(id).await?;
    }
    corrupt.insert(id);
    report.findings.push(Finding {
        kind: FindingKind::CorruptChunk,
        subject: id.to_hex(),
        detail,
        fix: "remove the file; it is fetched again when needed".into(),
        repaired: repair,
    });
    Ok(())
}

/// What steps 1 and 2 learnt about chunks, for the manifest check.
struct ChunkSets {
    /// Files on disk that hash to their name.
    present: HashSet<ChunkId>,
    /// Chunks the index recorded before this run.
    recorded: HashSet<ChunkId>,
    /// Files found corrupt or unreadable (already findings).
    corrupt: HashSet<ChunkId>,
}

async fn check_manifest(
    cache: &Cache,
    (origin_id, path): &(OriginId, OriginPath),
    manifest: &Manifest,
    chunks: &ChunkSets,
    repair: bool,
    report: &mut VerifyReport,
) -> Result<()> {
    let ChunkSets {
        present,
        recorded,
        corrupt,
    } = chunks;
    let mut start = 0u64;
    let mut missing = Vec::new();
    for c in manifest.chunks() {
        if present.contains(&c.id) {
            // Fine.
        } else if corrupt.contains(&c.id) {
            // Already a finding; repair removed it, so fetch it again.
            if repair {
                missing.push((start, *c));
            }
        } else if recorded.contains(&c.id) {
            missing.push((start, *c));
        } else {
            report.chunks_not_cached += 1;
        }
        start += u64::from(c.len);
    }
    if missing.is_empty() {
        return Ok(());
    }
    let origin = cache.origin(origin_id);
    let mut dropped = false;
    for (start, chunk) in missing {
        let mut fix = "re-fetch the chunk's byte range from the origin".to_owned();
        let mut repaired = false;
        if repair && !dropped {
            let refetched = match &origin {
                Some(o) => cache
                    .refetch_chunk(o, path, &manifest.version, start, chunk)
                    .await
                    .map(|_| ()),
                None => Err(crate::CasError::UnknownOrigin {
                    origin: origin_id.clone(),
                }),
            };
            match refetched {
                Ok(()) => repaired = true,
                Err(e) => {
                    cache.index().remove_manifest(origin_id, path)?;
                    dropped = true;
                    fix = format!("re-fetch failed ({e}); dropped the manifest so the file is fetched again on its next read");
                }
            }
        }
        if dropped {
            repaired = true;
            if !fix.starts_with("re-fetch failed") {
                fix = "covered by dropping the file's manifest".into();
            }
        }
        report.findings.push(Finding {
            kind: FindingKind::MissingChunk,
            subject: format!("{origin_id}:{path}"),
            detail: format!(
                "chunk {} at offset {start} ({} bytes) is not in the cache",
                chunk.id, chunk.len
            ),
            fix,
            repaired,
        });
    }
    Ok(())
}

/// Chunk files in the shard tree by id, with their sizes (names that are
/// not chunk ids are the store's business at open, not verify's).
fn list_chunk_files(dir: &Path) -> HashMap<ChunkId, (std::path::PathBuf, u64)> {
    let mut out = HashMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(p),
                Ok(t) if t.is_file() => {
                    if let Some(id) = e.file_name().to_str().and_then(ChunkId::from_hex) {
                        let size = e.metadata().map(|m| m.len()).unwrap_or(0);
                        out.insert(id, (p, size));
                    }
                }
                _ => {}
            }
        }
    }
    out
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "checked {} chunks ({} bytes) and {} manifests: {} findings ({} chunks evicted, fetched again when read)",
            self.chunks_checked,
            self.bytes_checked,
            self.manifests_checked,
            self.findings.len(),
            self.chunks_not_cached
        )?;
        for x in &self.findings {
            let state = if x.repaired { "repaired" } else { "fix" };
            writeln!(
                f,
                "  {}: {} — {}; {state}: {}",
                x.kind, x.subject, x.detail, x.fix
            )?;
        }
        for s in &self.skipped {
            writeln!(f, "  skipped: {s}")?;
        }
        Ok(())
    }
}
