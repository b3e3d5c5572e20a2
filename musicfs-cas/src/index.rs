//! The sled index: chunk records and file manifests.
//!
//! The chunk files are the truth; this index is a disposable cache of them
//! that makes startup and lookups fast. So opening never fails because of
//! the index's own state: a database sled cannot open, or whose records do
//! not decode, is moved aside (`index.sled.broken-<unix-time>`) and a fresh
//! one is built, and the store then re-adds every chunk file it finds. Only a
//! database locked by another live process is an error, since moving that
//! aside would corrupt the other process's cache.
//!
//! Records are decoded as untrusted bytes: a damaged record is a typed error
//! and is dropped, never a panic.
//!
//! The number of manifests is a counter (sled's `len` walks the whole
//! tree): every insert and removal adjusts it under one small lock, and a
//! count taken while no manifest changed sets it exactly (the store counts
//! once after open, in the background).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use musicfs_origins::{OriginId, OriginPath};
use parking_lot::Mutex;
use tracing::{info, warn};

use crate::listing::Listing;
use crate::manifest::Manifest;
use crate::{CasError, ChunkId, Result};

const CHUNKS: &str = "chunks";
const MANIFESTS: &str = "manifests";
const LISTINGS: &str = "listings";
/// Records checked at each end of each tree when the index opens.
const VALIDATE_SAMPLE: usize = 256;

/// What the index remembers of one chunk file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRecord {
    pub size: u64,
    /// Last access, nanoseconds since the Unix epoch (drives LRU eviction).
    pub atime_ns: u64,
}

impl ChunkRecord {
    pub fn encode(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.size.to_le_bytes());
        b[8..].copy_from_slice(&self.atime_ns.to_le_bytes());
        b
    }

    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let arr: [u8; 16] = bytes.try_into().map_err(|_| CasError::CorruptRecord {
            what: "chunk",
            reason: format!("{} bytes instead of 16", bytes.len()),
        })?;
        let mut size = [0u8; 8];
        let mut atime = [0u8; 8];
        size.copy_from_slice(&arr[..8]);
        atime.copy_from_slice(&arr[8..]);
        Ok(Self {
            size: u64::from_le_bytes(size),
            atime_ns: u64::from_le_bytes(atime),
        })
    }
}

/// How opening went: whether the index had to be rebuilt, and why.
#[derive(Debug, Clone, Default)]
pub struct IndexOpenReport {
    pub rebuilt: bool,
    pub reason: Option<String>,
    pub moved_to: Option<PathBuf>,
    /// True when no index could be created on disk and an in-memory one is
    /// used instead (the cache disk is unusable).
    pub in_memory: bool,
}

#[derive(Clone, Debug)]
pub struct Index {
    db: sled::Db,
    chunks: sled::Tree,
    manifests: sled::Tree,
    listings: sled::Tree,
    manifest_count: Arc<Mutex<ManifestCount>>,
}

/// See the module docs.
#[derive(Debug, Default)]
struct ManifestCount {
    count: i64,
    /// Bumped by every insert and removal.
    changes: u64,
    /// True once a full count has succeeded.
    exact: bool,
}

fn sled_err(e: sled::Error) -> CasError {
    CasError::Index {
        reason: e.to_string(),
    }
}

impl Index {
    /// Opens the index at `path`, healing it as described in the module docs.
    pub fn open(path: &Path) -> Result<(Self, IndexOpenReport)> {
        let mut report = IndexOpenReport::default();
        match Self::try_open_waiting(path) {
            Ok(index) => match index.validate() {
                Ok(()) => return Ok((index, report)),
                Err(reason) => {
                    drop(index);
                    report.reason = Some(reason);
                }
            },
            Err(OpenFailure::Locked) => {
                return Err(CasError::IndexLocked {
                    path: path.to_owned(),
                })
            }
            Err(OpenFailure::Disk(reason)) => {
                // The disk, not the index, is the problem: keep the files
                // for when it works again and run on an in-memory index.
                warn!(path = %path.display(), %reason, "cannot open the index on the cache disk; keeping it in memory for now");
                report.reason = Some(reason);
                report.in_memory = true;
                return Ok((Self::temporary()?, report));
            }
            Err(OpenFailure::Other(reason)) => report.reason = Some(reason),
        }
        report.rebuilt = true;
        let reason = report.reason.clone().unwrap_or_default();
        if path.exists() {
            remove_old_broken_copies(path);
            let aside = path.with_file_name(format!("index.sled.broken-{}", unix_secs()));
            match std::fs::rename(path, &aside) {
                Ok(()) => report.moved_to = Some(aside),
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "cannot move the damaged index aside; removing it");
                    let _ = std::fs::remove_dir_all(path);
                }
            }
        }
        warn!(path = %path.display(), %reason, moved_to = ?report.moved_to, "cache index was unusable; rebuilding it from the chunk files");
        match Self::try_open(path) {
            Ok(index) => Ok((index, report)),
            Err(e) => {
                let why = match e {
                    OpenFailure::Locked => "locked".to_owned(),
                    OpenFailure::Disk(r) | OpenFailure::Other(r) => r,
                };
                warn!(path = %path.display(), error = %why, "cannot create an index on the cache disk; keeping it in memory");
                report.in_memory = true;
                Ok((Self::temporary()?, report))
            }
        }
    }

    /// An index that lives only as long as the process (for a dead cache
    /// disk, and for tests).
    pub fn temporary() -> Result<Self> {
        let db = sled::Config::new()
            .temporary(true)
            .cache_capacity(16 << 20)
            .open()
            .map_err(sled_err)?;
        Self::from_db(db).map_err(|r| CasError::Index { reason: r })
    }

    /// sled releases its file lock from a background thread shortly after
    /// the last handle drops, so a reopen in the same process (a restart of
    /// the cache, tests) may briefly see it locked: wait up to 2 s for it.
    fn try_open_waiting(path: &Path) -> std::result::Result<Self, OpenFailure> {
        let mut attempts = 0;
        loop {
            match Self::try_open(path) {
                Err(OpenFailure::Locked) if attempts < 20 => {
                    attempts += 1;
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                other => return other,
            }
        }
    }

    fn try_open(path: &Path) -> std::result::Result<Self, OpenFailure> {
        let config = sled::Config::new()
            .path(path)
            .cache_capacity(32 << 20)
            .flush_every_ms(Some(1000));
        // sled has been seen to panic on some damaged databases; a damaged
        // index must never take the daemon down, so a panic counts as damage.
        let opened = catch_unwind(AssertUnwindSafe(|| config.open()));
        let db = match opened {
            Ok(Ok(db)) => db,
            Ok(Err(e)) => {
                let msg = e.to_string();
                if let sled::Error::Io(io) = &e {
                    if io.kind() == std::io::ErrorKind::WouldBlock || msg.contains("lock") {
                        return Err(OpenFailure::Locked);
                    }
                    if matches!(
                        io.raw_os_error(),
                        Some(
                            libc::EMFILE
                                | libc::ENFILE
                                | libc::ENOSPC
                                | libc::EACCES
                                | libc::EROFS
                                | libc::EIO
                                | libc::EDQUOT
                        )
                    ) {
                        return Err(OpenFailure::Disk(format!("sled could not open it: {msg}")));
                    }
                }
                return Err(OpenFailure::Other(format!("sled could not open it: {msg}")));
            }
            Err(_) => return Err(OpenFailure::Other("sled panicked while opening it".into())),
        };
        Self::from_db(db).map_err(OpenFailure::Other)
    }

    fn from_db(db: sled::Db) -> std::result::Result<Self, String> {
        let chunks = db.open_tree(CHUNKS).map_err(|e| e.to_string())?;
        let manifests = db.open_tree(MANIFESTS).map_err(|e| e.to_string())?;
        let listings = db.open_tree(LISTINGS).map_err(|e| e.to_string())?;
        Ok(Self {
            db,
            chunks,
            manifests,
            listings,
            manifest_count: Arc::default(),
        })
    }

    /// The records at both ends of each tree must decode; one that does not
    /// means the database was damaged in ways sled did not notice (a
    /// database that reads as garbage fails here). Only a sample, so that
    /// opening an index of 200,000 records stays quick: the rest are
    /// decoded as they are used, and a damaged one is dropped then (the
    /// store's reconcile reads every chunk record, the manifest sweep every
    /// manifest).
    fn validate(&self) -> std::result::Result<(), String> {
        let check = || -> std::result::Result<(), String> {
            let ends = |t: &sled::Tree| {
                t.iter()
                    .take(VALIDATE_SAMPLE)
                    .chain(t.iter().rev().take(VALIDATE_SAMPLE))
                    .collect::<Vec<_>>()
            };
            for item in ends(&self.chunks) {
                let (k, v) = item.map_err(|e| e.to_string())?;
                if k.len() != 32 {
                    return Err(format!("chunk key of {} bytes", k.len()));
                }
                ChunkRecord::decode(&v).map_err(|e| e.to_string())?;
            }
            for item in ends(&self.manifests) {
                let (k, v) = item.map_err(|e| e.to_string())?;
                decode_manifest_key(&k).ok_or("undecodable manifest key")?;
                Manifest::decode(&v).map_err(|e| e.to_string())?;
            }
            Ok(())
        };
        match catch_unwind(AssertUnwindSafe(check)) {
            Ok(r) => r,
            Err(_) => Err("sled panicked while reading it".into()),
        }
    }

    pub fn put_chunk(&self, id: &ChunkId, rec: ChunkRecord) -> Result<()> {
        self.chunks
            .insert(id.as_bytes(), &rec.encode()[..])
            .map_err(sled_err)?;
        Ok(())
    }

    pub fn remove_chunk(&self, id: &ChunkId) -> Result<()> {
        self.chunks.remove(id.as_bytes()).map_err(sled_err)?;
        Ok(())
    }

    /// All chunk records; undecodable ones are dropped (the store re-adds
    /// the files they stood for).
    pub fn chunk_records(&self) -> Result<Vec<(ChunkId, ChunkRecord)>> {
        let (out, damaged) = self.read_chunk_records()?;
        if !damaged.is_empty() {
            warn!(
                count = damaged.len(),
                "dropping damaged chunk records; the chunk files are recorded again"
            );
            for k in damaged {
                self.chunks.remove(k).map_err(sled_err)?;
            }
        }
        Ok(out)
    }

    /// All chunk records, and the keys of those that do not decode (left
    /// in place: for `verify`, which changes nothing).
    pub fn read_chunk_records(&self) -> Result<(Vec<(ChunkId, ChunkRecord)>, DamagedKeys)> {
        let mut out = Vec::new();
        let mut damaged = Vec::new();
        for item in self.chunks.iter() {
            let (k, v) = item.map_err(sled_err)?;
            let key = <[u8; 32]>::try_from(&k[..]).ok();
            match (key, ChunkRecord::decode(&v)) {
                (Some(key), Ok(rec)) => out.push((ChunkId::from_bytes(key), rec)),
                _ => damaged.push(k),
            }
        }
        Ok((out, damaged))
    }

    /// Chunk records (a walk of the tree: for tests and `doctor`).
    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    /// The manifest of a file, if one is stored and decodes. A damaged one is
    /// dropped (it is only a cache) and `None` returned.
    pub fn manifest(&self, origin: &OriginId, path: &OriginPath) -> Result<Option<Manifest>> {
        let key = manifest_key(origin, path);
        let Some(bytes) = self.manifests.get(&key).map_err(sled_err)? else {
            return Ok(None);
        };
        match Manifest::decode(&bytes) {
            Ok(m) => Ok(Some(m)),
            Err(e) => {
                warn!(%origin, %path, error = %e, "dropping a damaged manifest; the file is fetched again from the origin");
                self.remove_manifest_raw(&key)?;
                Ok(None)
            }
        }
    }

    pub fn put_manifest(&self, origin: &OriginId, path: &OriginPath, m: &Manifest) -> Result<()> {
        let mut c = self.manifest_count.lock();
        let old = self
            .manifests
            .insert(manifest_key(origin, path), m.encode())
            .map_err(sled_err)?;
        c.changes += 1;
        if old.is_none() {
            c.count += 1;
        }
        Ok(())
    }

    pub fn remove_manifest(&self, origin: &OriginId, path: &OriginPath) -> Result<()> {
        self.remove_manifest_raw(&manifest_key(origin, path))
    }

    /// Forgets a file that is gone from its origin: its manifest (the
    /// filesystem calls this when a lookup finds the file deleted).
    pub fn forget_file(&self, origin: &OriginId, path: &OriginPath) -> Result<()> {
        self.remove_manifest(origin, path)
    }

    /// Forgets a directory that is gone from its origin: its listing and
    /// the listings and manifests of everything under it. Returns how many
    /// records were dropped. The root forgets the whole origin.
    pub fn forget_tree(&self, origin: &OriginId, dir: &OriginPath) -> Result<u64> {
        let mut dropped = 0;
        let own = manifest_key(origin, dir);
        if self.listings.remove(&own).map_err(sled_err)?.is_some() {
            dropped += 1;
        }
        if !dir.is_root() && self.remove_manifest_raw_counted(&own)? {
            dropped += 1;
        }
        let mut prefix = own;
        if !dir.is_root() {
            prefix.push(b'/');
        }
        for tree in [&self.listings, &self.manifests] {
            let keys: Vec<sled::IVec> = tree
                .scan_prefix(&prefix)
                .keys()
                .collect::<std::result::Result<_, _>>()
                .map_err(sled_err)?;
            for k in keys {
                let removed = if std::ptr::eq(tree, &self.manifests) {
                    self.remove_manifest_raw_counted(&k)?
                } else {
                    tree.remove(&k).map_err(sled_err)?.is_some()
                };
                if removed {
                    dropped += 1;
                }
            }
        }
        Ok(dropped)
    }

    /// Drops every manifest for which `keep` is false, unless it changed
    /// meanwhile (the ingest extended it). Returns how many were dropped;
    /// manifests that do not decode are dropped too.
    pub fn sweep_manifests(&self, keep: impl Fn(&Manifest) -> bool) -> Result<u64> {
        let mut dropped = 0;
        for item in self.manifests.iter() {
            let (k, v) = item.map_err(sled_err)?;
            if Manifest::decode(&v).is_ok_and(|m| keep(&m)) {
                continue;
            }
            let mut c = self.manifest_count.lock();
            let swapped = self
                .manifests
                .compare_and_swap(&k, Some(&v), None::<&[u8]>)
                .map_err(sled_err)?;
            if swapped.is_ok() {
                c.changes += 1;
                c.count -= 1;
                dropped += 1;
            }
        }
        Ok(dropped)
    }

    /// Every manifest with its origin and path. Entries that do not decode
    /// come back as errors so `verify` can report them.
    pub fn manifests(&self) -> Result<Vec<ManifestEntry>> {
        let mut out = Vec::new();
        for item in self.manifests.iter() {
            let (k, v) = item.map_err(sled_err)?;
            let key = decode_manifest_key(&k);
            let manifest = Manifest::decode(&v);
            out.push(ManifestEntry {
                raw_key: k.to_vec(),
                key,
                manifest,
            });
        }
        Ok(out)
    }

    pub fn remove_manifest_raw(&self, raw_key: &[u8]) -> Result<()> {
        self.remove_manifest_raw_counted(raw_key).map(|_| ())
    }

    fn remove_manifest_raw_counted(&self, raw_key: &[u8]) -> Result<bool> {
        let mut c = self.manifest_count.lock();
        let old = self.manifests.remove(raw_key).map_err(sled_err)?;
        c.changes += 1;
        if old.is_some() {
            c.count -= 1;
        }
        Ok(old.is_some())
    }

    /// The number of manifests, from the counter (O(1)). Exact once the
    /// store's first count after open has run; until then it counts the
    /// manifests added since open.
    pub fn manifest_count(&self) -> usize {
        usize::try_from(self.manifest_count.lock().count).unwrap_or(0)
    }

    /// Counts the manifests (a walk of the tree) and sets the counter, if
    /// no manifest changed during the count; else leaves it for the next
    /// try. Returns whether the count is exact now.
    pub fn recount_manifests(&self) -> bool {
        let before = self.manifest_count.lock().changes;
        let n = self.manifests.len() as i64;
        let mut c = self.manifest_count.lock();
        if c.changes == before {
            c.count = n;
            c.exact = true;
        }
        c.exact
    }

    /// [`Self::recount_manifests`] unless the count is exact already.
    pub fn recount_manifests_if_unsure(&self) {
        if !self.manifest_count.lock().exact {
            self.recount_manifests();
        }
    }

    /// The cached listing of a directory, if one is stored and decodes (a
    /// damaged one is dropped: it is only a cache of the origin).
    pub fn listing(&self, origin: &OriginId, dir: &OriginPath) -> Result<Option<Listing>> {
        get_or_drop(&self.listings, &manifest_key(origin, dir), Listing::decode)
    }

    pub fn put_listing(
        &self,
        origin: &OriginId,
        dir: &OriginPath,
        listing: &Listing,
    ) -> Result<()> {
        self.listings
            .insert(manifest_key(origin, dir), listing.encode())
            .map_err(sled_err)?;
        Ok(())
    }

    pub fn remove_listing(&self, origin: &OriginId, dir: &OriginPath) -> Result<()> {
        self.listings
            .remove(manifest_key(origin, dir))
            .map_err(sled_err)?;
        Ok(())
    }

    /// Drops every listing and manifest of `origin` (for `musicfs forget`,
    /// after the user emptied it for real); returns how many of each went.
    /// Its chunks stay: other files may share them, and eviction ages out
    /// the rest.
    pub fn forget_origin(&self, origin: &OriginId) -> Result<(u64, u64)> {
        let mut prefix = origin.as_str().as_bytes().to_vec();
        prefix.push(0);
        let keys = |tree: &sled::Tree| -> Result<Vec<sled::IVec>> {
            tree.scan_prefix(&prefix)
                .keys()
                .collect::<std::result::Result<_, _>>()
                .map_err(sled_err)
        };
        let mut listings = 0;
        for k in keys(&self.listings)? {
            if self.listings.remove(&k).map_err(sled_err)?.is_some() {
                listings += 1;
            }
        }
        // Through the counted removal, so the manifest count stays right.
        let mut manifests = 0;
        for k in keys(&self.manifests)? {
            if self.remove_manifest_raw_counted(&k)? {
                manifests += 1;
            }
        }
        Ok((listings, manifests))
    }

    pub fn flush(&self) -> Result<()> {
        self.db.flush().map_err(sled_err)?;
        Ok(())
    }
}

/// Keys of records that do not decode.
pub type DamagedKeys = Vec<sled::IVec>;

/// One stored manifest as `verify` sees it.
#[derive(Debug)]
pub struct ManifestEntry {
    pub raw_key: Vec<u8>,
    pub key: Option<(OriginId, OriginPath)>,
    pub manifest: Result<Manifest>,
}

/// The record at `key`, decoded; a record that does not decode is dropped
/// (the index is only a cache: the file or listing is fetched again) and
/// `None` returned.
fn get_or_drop<T>(
    tree: &sled::Tree,
    key: &[u8],
    decode: impl Fn(&[u8]) -> Result<T>,
) -> Result<Option<T>> {
    let Some(bytes) = tree.get(key).map_err(sled_err)? else {
        return Ok(None);
    };
    match decode(&bytes) {
        Ok(v) => Ok(Some(v)),
        Err(e) => {
            warn!(key = %String::from_utf8_lossy(key).replace('\0', ":"), error = %e, "dropping a damaged index record; it is fetched again from the origin");
            tree.remove(key).map_err(sled_err)?;
            Ok(None)
        }
    }
}

enum OpenFailure {
    Locked,
    /// The disk failed (fds, space, permissions, I/O): not the index's fault.
    Disk(String),
    Other(String),
}

/// Keeps one earlier damaged copy at most: they are for post-mortems, and
/// must not fill the cache disk over repeated crashes.
fn remove_old_broken_copies(path: &Path) {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return;
    };
    let prefix = format!("{}.broken-", name.to_string_lossy());
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        if e.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Origin name, NUL, then the path's exact bytes (which need not be UTF-8
/// and never hold a NUL, so the split is unambiguous).
fn manifest_key(origin: &OriginId, path: &OriginPath) -> Vec<u8> {
    let mut k = Vec::with_capacity(origin.as_str().len() + 1 + path.as_bytes().len());
    k.extend_from_slice(origin.as_str().as_bytes());
    k.push(0);
    k.extend_from_slice(path.as_bytes());
    k
}

fn decode_manifest_key(k: &[u8]) -> Option<(OriginId, OriginPath)> {
    let split = k.iter().position(|&b| b == 0)?;
    let origin = std::str::from_utf8(&k[..split]).ok()?;
    let path = OriginPath::from_bytes(&k[split + 1..]).ok()?;
    Some((OriginId::new(origin).ok()?, path))
}

pub(crate) fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(crate) fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

pub(crate) fn log_rebuild(report: &IndexOpenReport) {
    if report.rebuilt {
        info!(reason = ?report.reason, moved_to = ?report.moved_to, "index rebuilt");
    }
}

#[cfg(test)]
mod tests;
