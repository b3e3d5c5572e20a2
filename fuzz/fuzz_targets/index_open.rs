//! Fuzz target: `Index::open` on a sled directory whose files hold damaged
//! bytes, then every read the cache makes of it.
//!
//! Input: one length byte `n`, then `n` bytes for sled's `conf` file, then
//! the rest for its `db` file (seeds are real indexes in that form). Each
//! run writes them into a fresh directory, so no run sees another's lock.
//!
//! Invariants checked: `Index::open` never fails because of what the
//! directory holds (it rebuilds instead: only a lock held by another process
//! is an error), no panic escapes it or the reads after it, and the opened
//! index takes writes. `Index::open` catches sled's own panics on purpose (a
//! database sled panics on counts as damaged and is rebuilt), so this
//! target keeps panics quiet and fails only on one that escapes.

#![no_main]
#![allow(clippy::unwrap_used, clippy::expect_used)] // harness: a failed setup is a failed run

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use musicfs_cas::index::ChunkRecord;
use musicfs_cas::{ChunkId, Index};
use musicfs_origins::{OriginId, OriginPath};

static BASE: OnceLock<PathBuf> = OnceLock::new();
static RUN: AtomicU64 = AtomicU64::new(0);
static LAST_PANIC: Mutex<Option<String>> = Mutex::new(None);

fn base() -> &'static PathBuf {
    BASE.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("musicfs-fuzz-index-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("create the fuzz work dir");
        d
    })
}

fn exercise(data: &[u8]) {
    let n = usize::from(data.first().copied().unwrap_or(0));
    let rest = data.get(1..).unwrap_or(&[]);
    let (conf, db) = rest.split_at(n.min(rest.len()));
    let dir = base().join(RUN.fetch_add(1, Ordering::Relaxed).to_string());
    let path = dir.join("index.sled");
    std::fs::create_dir_all(&path).unwrap();
    std::fs::write(path.join("conf"), conf).unwrap();
    std::fs::write(path.join("db"), db).unwrap();
    {
        let (index, _report) = match Index::open(&path) {
            Ok(opened) => opened,
            Err(e) => panic!("Index::open refused a damaged index instead of rebuilding: {e}"),
        };
        let lib = OriginId::new("lib").unwrap();
        let _ = index.chunk_records();
        let _ = index.chunk_count();
        if let Ok(all) = index.manifests() {
            for m in all {
                if let Some((o, p)) = &m.key {
                    let _ = index.manifest(o, p);
                }
            }
        }
        for dir in ["", "Album"] {
            let _ = index.listing(&lib, &OriginPath::new(dir).unwrap());
        }
        let _ = index.manifest(&lib, &OriginPath::new("Album/01 - Track.flac").unwrap());
        index
            .put_chunk(
                &ChunkId::of(b"fuzz"),
                ChunkRecord {
                    size: 4,
                    atime_ns: 1,
                },
            )
            .expect("the opened index takes writes");
        let _ = index.flush();
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fuzz_target!(
    init: {
        std::panic::set_hook(Box::new(|info| {
            *LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()) = Some(info.to_string());
        }));
        base();
    },
    |data: &[u8]| {
        if catch_unwind(AssertUnwindSafe(|| exercise(data))).is_err() {
            let msg = LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()).take();
            eprintln!("panic escaped the index: {}", msg.unwrap_or_default());
            std::process::abort();
        }
    }
);
