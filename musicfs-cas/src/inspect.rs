//! Read-only inspection of a cache directory: `musicfs verify` without
//! `--repair`.
//!
//! Opening a cache heals it (temp files removed, stray files removed, index
//! records reconciled), so a check that opened it first would never report
//! what it healed. This one changes nothing in the cache directory: it
//! lists `tmp/` and the shard tree and hashes every chunk file directly
//! (chunks are immutable and named by their hash, so this needs no lock and
//! works beside a running mount), and for the index it opens a *copy* of
//! `index.sled` in a temporary directory, because sled cannot open a
//! database read-only and would write to (or, if damaged, move aside) the
//! original. What an open or `--repair` would do is reported as findings.
//!
//! With a mount running, its daemon holds sled's lock and writes the index
//! as it plays, so a copy could be torn: the index checks are skipped and
//! the report says so ([`IndexCheck::Skip`]), and temp files are in-flight
//! writes, not leftovers.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use crate::index::Index;
use crate::store::reconcile::chunk_file;
use crate::verify::{Finding, FindingKind, VerifyReport};
use crate::{ChunkId, Result};

/// What to do about the index.
#[derive(Debug, Clone)]
pub enum IndexCheck {
    /// Check a copy of it (the cache is not in use).
    Snapshot,
    /// Do not; the reason goes into the report.
    Skip(String),
}

/// Progress of a check, for a progress bar.
#[derive(Debug, Clone, Copy)]
pub enum Progress {
    /// The chunk files were listed: this many, of this many bytes.
    Listed { files: u64, bytes: u64 },
    /// This many more bytes were hashed.
    Hashed { bytes: u64 },
}

/// `Ok` when `dir` looks like a MusicFS cache directory (it has `chunks/`
/// or `index.sled/`); else what was expected, in one line.
pub fn looks_like_cache(dir: &Path) -> std::result::Result<(), String> {
    match fs::metadata(dir) {
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return Err(format!(
            "{} does not exist; expected a MusicFS cache directory (with chunks/ and index.sled/)",
            dir.display()
        ))
        }
        Err(e) => return Err(format!("{}: {e}", dir.display())),
        Ok(m) if !m.is_dir() => {
            return Err(format!(
                "{} is not a directory; expected a MusicFS cache directory",
                dir.display()
            ))
        }
        Ok(_) => {}
    }
    if dir.join("chunks").is_dir() || dir.join("index.sled").is_dir() {
        Ok(())
    } else {
        Err(format!(
            "{} is not a MusicFS cache directory (no chunks/ or index.sled/ in it); check --cache-dir",
            dir.display()
        ))
    }
}

/// Checks the cache in `dir` without changing it; see the module docs.
/// `live` says a mount is serving it.
pub fn inspect(
    dir: &Path,
    index: IndexCheck,
    live: bool,
    progress: &dyn Fn(Progress),
) -> Result<VerifyReport> {
    let mut report = VerifyReport::default();
    let chunks_dir = dir.join("chunks");

    // 1. Leftovers of a crash in tmp/ (a running mount's are its writes).
    if !live {
        for e in read_dir_sorted(&dir.join("tmp")) {
            report.findings.push(Finding {
                kind: FindingKind::OrphanedTempFile,
                subject: e.display().to_string(),
                detail: "a chunk write a crash interrupted".into(),
                fix: "remove it (the next mount does)".into(),
                repaired: false,
            });
        }
    }

    // 2. The shard tree: chunk files, and anything else in it.
    let mut files: Vec<(ChunkId, PathBuf, u64)> = Vec::new();
    walk_shards(&chunks_dir, 0, &mut files, &mut report);
    progress(Progress::Listed {
        files: files.len() as u64,
        bytes: files.iter().map(|f| f.2).sum(),
    });

    // 3. Every chunk file hashed against its name.
    let mut present: HashSet<ChunkId> = HashSet::new();
    let mut corrupt: HashSet<ChunkId> = HashSet::new();
    for (id, path, size) in &files {
        let data = match fs::read(path) {
            Ok(d) => d,
            // Evicted by the running mount since the listing.
            Err(e) if e.kind() == ErrorKind::NotFound => {
                progress(Progress::Hashed { bytes: *size });
                continue;
            }
            Err(e) => {
                corrupt.insert(*id);
                report
                    .findings
                    .push(corrupt_finding(*id, format!("unreadable: {e}")));
                progress(Progress::Hashed { bytes: *size });
                continue;
            }
        };
        report.chunks_checked += 1;
        report.bytes_checked += data.len() as u64;
        let actual = ChunkId::of(&data);
        if actual == *id {
            present.insert(*id);
        } else {
            corrupt.insert(*id);
            report.findings.push(corrupt_finding(
                *id,
                format!("{} bytes hashing to {actual}", data.len()),
            ));
        }
        progress(Progress::Hashed { bytes: *size });
    }

    // 4. The index, from a copy.
    match index {
        IndexCheck::Skip(why) => report.skipped.push(why),
        IndexCheck::Snapshot => {
            let on_disk: HashSet<ChunkId> = files.iter().map(|f| f.0).collect();
            check_index_copy(dir, &on_disk, &present, &corrupt, &mut report)?;
        }
    }
    Ok(report)
}

fn corrupt_finding(id: ChunkId, detail: String) -> Finding {
    Finding {
        kind: FindingKind::CorruptChunk,
        subject: id.to_hex(),
        detail,
        fix: "remove the file; it is fetched again when needed".into(),
        repaired: false,
    }
}

/// Chunk files under the shard tree; anything else there is a finding.
fn walk_shards(
    dir: &Path,
    depth: usize,
    out: &mut Vec<(ChunkId, PathBuf, u64)>,
    report: &mut VerifyReport,
) {
    for path in read_dir_sorted(dir) {
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if meta.is_dir() && depth < 2 && name.len() == 2 {
            walk_shards(&path, depth + 1, out, report);
            continue;
        }
        match chunk_file(dir, depth, &name) {
            Some(id) if meta.is_file() => out.push((id, path, meta.len())),
            _ => report.findings.push(Finding {
                kind: FindingKind::StrayFile,
                subject: path.display().to_string(),
                detail: "not a chunk file in its shard; only MusicFS writes here".into(),
                fix: "remove it (the next mount does)".into(),
                repaired: false,
            }),
        }
    }
}

fn read_dir_sorted(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = match fs::read_dir(dir) {
        Ok(rd) => rd.flatten().map(|e| e.path()).collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

/// A copy of `index.sled` in a temporary directory, removed on drop.
struct IndexCopy(PathBuf);

impl Drop for IndexCopy {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    fs::create_dir_all(to)?;
    for e in fs::read_dir(from)? {
        let e = e?;
        let target = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_tree(&e.path(), &target)?;
        } else {
            fs::copy(e.path(), &target)?;
        }
    }
    Ok(())
}

fn check_index_copy(
    dir: &Path,
    on_disk: &HashSet<ChunkId>,
    present: &HashSet<ChunkId>,
    corrupt: &HashSet<ChunkId>,
    report: &mut VerifyReport,
) -> Result<()> {
    let original = dir.join("index.sled");
    if !original.is_dir() {
        report.findings.push(Finding {
            kind: FindingKind::DamagedIndex,
            subject: original.display().to_string(),
            detail: "there is no index".into(),
            fix: "rebuild it from the chunk files (the next mount does)".into(),
            repaired: false,
        });
        return Ok(());
    }
    let copy = IndexCopy(std::env::temp_dir().join(format!(
        "musicfs-verify-{}-{}",
        std::process::id(),
        crate::index::now_ns()
    )));
    copy_tree(&original, &copy.0).map_err(|e| crate::CasError::io(&copy.0, e))?;
    let (index, opened) = Index::open(&copy.0)?;
    if opened.rebuilt || opened.in_memory {
        report.findings.push(Finding {
            kind: FindingKind::DamagedIndex,
            subject: original.display().to_string(),
            detail: opened.reason.unwrap_or_else(|| "it cannot be opened".into()),
            fix: "move it aside and rebuild it from the chunk files (the next mount does); manifests are lost, files are fetched again when read".into(),
            repaired: false,
        });
        return Ok(());
    }
    let (records, damaged) = index.read_chunk_records()?;
    if !damaged.is_empty() {
        report.findings.push(Finding {
            kind: FindingKind::DamagedIndex,
            subject: original.display().to_string(),
            detail: format!("{} chunk records do not decode", damaged.len()),
            fix: "drop them; the chunk files are recorded again (the next mount does)".into(),
            repaired: false,
        });
    }
    let records: HashMap<ChunkId, _> = records.into_iter().collect();
    let mut orphaned: Vec<&ChunkId> = records.keys().filter(|id| !on_disk.contains(id)).collect();
    orphaned.sort();
    for id in orphaned {
        report.findings.push(Finding {
            kind: FindingKind::RecordWithoutFile,
            subject: id.to_hex(),
            detail: "the index lists a chunk whose file is gone".into(),
            fix: "drop the index record".into(),
            repaired: false,
        });
    }
    let mut unindexed: Vec<&ChunkId> = present
        .iter()
        .filter(|id| !records.contains_key(id))
        .collect();
    unindexed.sort();
    for id in unindexed {
        report.findings.push(Finding {
            kind: FindingKind::FileWithoutRecord,
            subject: id.to_hex(),
            detail: "a valid chunk file has no index record".into(),
            fix: "add the index record".into(),
            repaired: false,
        });
    }
    for entry in index.manifests()? {
        report.manifests_checked += 1;
        let (origin, path, manifest) = match (entry.key, entry.manifest) {
            (Some((o, p)), Ok(m)) => (o, p, m),
            (key, m) => {
                report.findings.push(Finding {
                    kind: FindingKind::DamagedManifest,
                    subject: key.map_or_else(
                        || String::from_utf8_lossy(&entry.raw_key).into_owned(),
                        |(o, p)| format!("{o}:{p}"),
                    ),
                    detail: m
                        .err()
                        .map_or_else(|| "undecodable key".into(), |e| e.to_string()),
                    fix: "drop the manifest; the file is fetched again on its next read".into(),
                    repaired: false,
                });
                continue;
            }
        };
        let mut start = 0u64;
        for c in manifest.chunks() {
            if present.contains(&c.id) || corrupt.contains(&c.id) {
                // Fine, or already a finding.
            } else if records.contains_key(&c.id) {
                report.findings.push(Finding {
                    kind: FindingKind::MissingChunk,
                    subject: format!("{origin}:{path}"),
                    detail: format!(
                        "chunk {} at offset {start} ({} bytes) is not in the cache",
                        c.id, c.len
                    ),
                    fix: "re-fetch the chunk's byte range from the origin".into(),
                    repaired: false,
                });
            } else {
                report.chunks_not_cached += 1;
            }
            start += u64::from(c.len);
        }
    }
    Ok(())
}
