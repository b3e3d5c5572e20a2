//! The store's background work: the reconcile after open, then upkeep.
//!
//! Opening a cache of 200,000 chunk files must not wait for 200,000 stats
//! (seconds on a cold dentry cache, minutes on a spinning disk), so
//! [`super::ChunkStore::open`] only opens the index and empties `tmp/`; one
//! thread per store then
//! 1. scans the shard tree (removing stray files, as open used to),
//! 2. merges what it found into the table and reconciles the index with it
//!    (the files win: records without files are dropped, files without
//!    records get one), in batches so readers never wait on the lock for
//!    long,
//! 3. counts the manifests once (afterwards a counter keeps the count), and
//! 4. every [`UPKEEP_EVERY`]: measures the index's disk use (which counts
//!    against the cache size), evicts if over the limit, and drops
//!    manifests none of whose chunks are stored any more.
//!
//! Reads are correct meanwhile because nothing in the read path trusts the
//! table for existence: a chunk read opens the file by its name and checks
//! its hash; a chunk not in the table yet is still read from disk, and one
//! that is missing is fetched again. Puts and removals during the scan go
//! to the table at once and the merge never overrides them. What is not
//! exact until the merge ends: the size (it counts only chunks known so
//! far) and eviction, which waits for the merge so it never picks victims
//! from half a table.
//!
//! The thread holds the store only weakly and checks a stop flag between
//! steps, so dropping the store ends it within one shard directory.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use tracing::{debug, info, warn};

use super::{Inner, OpenReport};
use crate::index::ChunkRecord;
use crate::ChunkId;

/// How often upkeep runs.
pub const UPKEEP_EVERY: Duration = Duration::from_secs(10);
/// Least time between two manifest sweeps (each reads every manifest).
const SWEEP_EVERY: Duration = Duration::from_secs(600);
/// Entries merged into the table per lock.
const MERGE_BATCH: usize = 4096;

/// Tells the background thread to stop (set when the store is dropped).
#[derive(Debug, Default)]
pub(super) struct Stop {
    stopped: Mutex<bool>,
    cv: Condvar,
}

impl Stop {
    pub fn stop(&self) {
        *self.stopped.lock() = true;
        self.cv.notify_all();
    }

    pub fn is_stopped(&self) -> bool {
        *self.stopped.lock()
    }

    /// Waits up to `d`; true when stopped.
    fn wait(&self, d: Duration) -> bool {
        let mut s = self.stopped.lock();
        if !*s {
            self.cv.wait_for(&mut s, d);
        }
        *s
    }
}

/// Starts the background thread of a freshly opened store.
pub(super) fn spawn(inner: &Arc<Inner>) {
    let weak = Arc::downgrade(inner);
    let stop = Arc::clone(&inner.stop);
    let chunks_dir = inner.chunks_dir.clone();
    let spawned = std::thread::Builder::new()
        .name("musicfs-store".into())
        .spawn(move || run(weak, stop, &chunks_dir));
    if let Err(e) = spawned {
        // Without the thread, reconcile here: slower to open, still right.
        warn!(error = %e, "cannot start the store's background thread; reconciling now");
        let mut report = OpenReport::default();
        let mut found = Vec::new();
        scan_shards(
            &inner.chunks_dir,
            0,
            &mut found,
            &mut report.stray_files_removed,
            &Stop::default(),
        );
        inner.merge(found, &mut report);
    }
}

fn run(weak: Weak<Inner>, stop: Arc<Stop>, chunks_dir: &Path) {
    let started = Instant::now();
    let mut report = OpenReport::default();
    let mut found = Vec::new();
    scan_shards(
        chunks_dir,
        0,
        &mut found,
        &mut report.stray_files_removed,
        &stop,
    );
    if stop.is_stopped() {
        return;
    }
    {
        let Some(inner) = weak.upgrade() else { return };
        inner.merge(found, &mut report);
        debug!(took = ?started.elapsed(), ?report, "chunk files reconciled with the index");
    }
    let mut last_sweep: Option<Instant> = None;
    let mut evicted_at_sweep = u64::MAX;
    loop {
        let Some(inner) = weak.upgrade() else { return };
        if inner.watch.stuck_for().is_none() {
            inner.upkeep();
            let evicted = inner.counters.evicted_chunks.load(Ordering::Relaxed);
            let due = match last_sweep {
                None => true,
                Some(t) => t.elapsed() >= SWEEP_EVERY,
            };
            if due && evicted != evicted_at_sweep {
                evicted_at_sweep = evicted;
                last_sweep = Some(Instant::now());
                inner.sweep_manifests();
            }
        }
        drop(inner);
        if stop.wait(UPKEEP_EVERY) {
            return;
        }
    }
}

impl Inner {
    /// Step 2 of the module docs.
    pub(super) fn merge(&self, found: Vec<(ChunkId, u64, u64)>, report: &mut OpenReport) {
        let recorded: HashMap<ChunkId, ChunkRecord> = match self.index.chunk_records() {
            Ok(r) => r.into_iter().collect(),
            Err(e) => {
                warn!(error = %e, "cannot read the index's chunk records; rebuilding them from the files");
                HashMap::new()
            }
        };
        let mut on_disk: HashSet<ChunkId> = HashSet::with_capacity(found.len());
        for batch in found.chunks(MERGE_BATCH) {
            let mut unrecorded = Vec::new();
            {
                let mut t = self.table.lock();
                for &(id, size, mtime_ns) in batch {
                    on_disk.insert(id);
                    // A put or removal since open is newer than the scan.
                    if t.contains(&id) || t.removed_while_loading.contains(&id) {
                        continue;
                    }
                    let atime_ns = match recorded.get(&id) {
                        Some(rec) => rec.atime_ns,
                        None => {
                            unrecorded.push((id, size, mtime_ns));
                            mtime_ns
                        }
                    };
                    t.insert(id, size, atime_ns);
                }
            }
            for (id, size, atime_ns) in unrecorded {
                report.index_entries_added += 1;
                let _ = self.index.put_chunk(&id, ChunkRecord { size, atime_ns });
            }
        }
        for id in recorded.keys() {
            if !on_disk.contains(id) && !self.table.lock().contains(id) {
                report.index_entries_dropped += 1;
                let _ = self.index.remove_chunk(id);
            }
        }
        {
            let mut t = self.table.lock();
            t.loading = false;
            t.removed_while_loading = HashSet::new();
            report.chunks = t.len() as u64;
            report.bytes = t.total();
        }
        self.index.recount_manifests();
        if report.stray_files_removed + report.index_entries_dropped + report.index_entries_added
            > 0
        {
            info!(?report, "cache reconciled; healed leftovers");
        }
        self.reconciled.send_replace(Some(report.clone()));
        self.evict_if_needed();
    }

    /// Step 4 of the module docs, minus the sweep.
    fn upkeep(&self) {
        let bytes = self.index_path.as_deref().map_or(0, dir_blocks);
        self.index_bytes.store(bytes, Ordering::Relaxed);
        self.index.recount_manifests_if_unsure();
        self.evict_if_needed();
    }

    /// Drops manifests none of whose chunks are stored: their file was
    /// evicted or deleted, and keeping them would grow the index without
    /// bound over a long-lived mount. Returns how many were dropped.
    pub(super) fn sweep_manifests(&self) -> u64 {
        if self.table.lock().loading {
            return 0;
        }
        let dropped = self.index.sweep_manifests(|m| {
            let t = self.table.lock();
            m.chunks().is_empty() || m.chunks().iter().any(|c| t.contains(&c.id))
        });
        match dropped {
            Ok(n) => {
                if n > 0 {
                    debug!(dropped = n, "dropped manifests of files no longer cached");
                }
                n
            }
            Err(e) => {
                debug!(error = %e, "manifest sweep failed");
                0
            }
        }
    }
}

/// Disk blocks used under `dir`, in bytes (sled's files may be sparse).
pub(crate) fn dir_blocks(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(rd) = fs::read_dir(dir) else { return 0 };
    let mut total = 0;
    for entry in rd.flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_dir() {
            total += dir_blocks(&entry.path());
        } else {
            total += meta.blocks() * 512;
        }
    }
    total
}

/// Removes every file in `dir` (temp files left by a crash); returns how many.
pub(crate) fn clean_dir(dir: &Path) -> u64 {
    let Ok(rd) = fs::read_dir(dir) else { return 0 };
    let mut n = 0;
    for entry in rd.flatten() {
        let p = entry.path();
        let removed = if p.is_dir() {
            fs::remove_dir_all(&p)
        } else {
            fs::remove_file(&p)
        };
        if removed.is_ok() {
            n += 1;
        }
    }
    n
}

/// Recursively collects `(id, size, mtime_ns)` of chunk files under the
/// shard tree. Anything else found there (temp files, wrong names, files in
/// the wrong shard) is removed: only the store writes here.
fn scan_shards(
    dir: &Path,
    depth: usize,
    out: &mut Vec<(ChunkId, u64, u64)>,
    strays: &mut u64,
    stop: &Stop,
) {
    if stop.is_stopped() {
        return;
    }
    let Ok(rd) = fs::read_dir(dir) else { return };
    for entry in rd.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        match entry.file_type() {
            Ok(t) if t.is_dir() => {
                if depth < 2 && name.len() == 2 {
                    scan_shards(&path, depth + 1, out, strays, stop);
                } else {
                    warn!(path = %path.display(), "removing a stray directory from the chunk tree");
                    let _ = fs::remove_dir_all(&path);
                    *strays += 1;
                }
                continue;
            }
            Ok(_) => {}
            Err(_) => continue,
        }
        match chunk_file(dir, depth, &name) {
            Some(id) => {
                let Ok(meta) = entry.metadata() else { continue };
                if meta.is_file() {
                    use std::os::unix::fs::MetadataExt;
                    let mtime_ns = (meta.mtime().max(0) as u64) * 1_000_000_000
                        + meta.mtime_nsec().max(0) as u64;
                    out.push((id, meta.len(), mtime_ns));
                    continue;
                }
                warn!(path = %path.display(), "removing a stray file from the chunk tree");
                let _ = fs::remove_file(&path);
                *strays += 1;
            }
            None => {
                warn!(path = %path.display(), "removing a stray file from the chunk tree");
                let _ = fs::remove_file(&path);
                *strays += 1;
            }
        }
    }
}

/// The chunk a file named `name` in `dir` (at `depth` under `chunks/`)
/// stands for: `Some` only for a well-named chunk in its right shard.
pub(crate) fn chunk_file(dir: &Path, depth: usize, name: &str) -> Option<ChunkId> {
    let shard = |p: Option<&Path>| {
        p.and_then(|p| p.file_name())
            .map(|s| s.to_string_lossy().into_owned())
    };
    let in_right_shard = depth == 2
        && shard(Some(dir)).as_deref() == name.get(2..4)
        && shard(dir.parent()).as_deref() == name.get(0..2);
    ChunkId::from_hex(name).filter(|_| in_right_shard)
}
