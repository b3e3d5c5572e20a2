//! Writes the seed corpora in `fuzz/seeds/<target>/` from real encoded
//! records, so each fuzz target starts from valid input of its format and
//! mutates it into damage. Run it again when a format changes:
//!
//! ```text
//! cargo run --manifest-path fuzz/Cargo.toml --example seed
//! ```
//!
//! It replaces the seed directories whole, so what is committed is exactly
//! what this writes (a few dozen small files).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a one-shot tool: a failure is the message

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use musicfs_cas::index::ChunkRecord;
use musicfs_cas::{ChunkId, ChunkRef, FileVersion, Index, Listing, Manifest};
use musicfs_cli::status::{MountInfo, OriginInfo, OriginStatus, StatusReport};
use musicfs_origins::{DirEntry, EntryKind, EntryMeta, OriginId, OriginPath};

fn seeds(target: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("seeds")
        .join(target);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn manifest(size: u64, mtime_ns: Option<i64>, etag: Option<&str>, chunks: &[u32]) -> Manifest {
    let mut m = Manifest::new(FileVersion {
        size,
        mtime_ns,
        etag: etag.map(str::to_owned),
    });
    for (i, &len) in chunks.iter().enumerate() {
        m.push(ChunkRef {
            id: ChunkId::of(&[i as u8; 3]),
            len,
        })
        .unwrap();
    }
    m
}

fn entry(
    name: &[u8],
    kind: EntryKind,
    size: u64,
    mtime_ns: Option<i64>,
    etag: Option<&str>,
) -> DirEntry {
    DirEntry::new(
        OsStr::from_bytes(name),
        EntryMeta {
            kind,
            size,
            mtime_ns,
            etag: etag.map(str::to_owned),
        },
    )
}

fn album() -> Listing {
    Listing {
        fetched_at_ns: 1_700_000_000_123_456_789,
        entries: vec![
            entry(
                b"cover.jpg",
                EntryKind::File,
                48_213,
                Some(1_600_000_000_000_000_000),
                None,
            ),
            entry(
                "01 - Tide \"north\".flac".as_bytes(),
                EntryKind::File,
                31_457_280,
                Some(-1),
                Some("\"9f2c\""),
            ),
            entry("坂本龍一".as_bytes(), EntryKind::Dir, 0, None, None),
            // An old Latin-1 rip: names are bytes.
            entry(b"Bj\xf6rk", EntryKind::Dir, 0, Some(1), None),
            DirEntry {
                link_target: Some(PathBuf::from("../2019/latest")),
                ..entry(b"latest", EntryKind::Symlink, 14, Some(0), None)
            },
        ],
    }
}

fn write_manifests() {
    let d = seeds("manifest");
    let cases = [
        ("partial-empty", manifest(9, None, None, &[])),
        ("zero-size", manifest(0, Some(0), None, &[])),
        (
            "complete",
            manifest(300, Some(-5), Some("\"abc\""), &[100, 150, 50]),
        ),
        (
            "partial",
            manifest(
                10 << 20,
                Some(1_700_000_000_000_000_000),
                None,
                &[1 << 20, 2 << 20],
            ),
        ),
    ];
    for (name, m) in cases {
        std::fs::write(d.join(name), m.encode()).unwrap();
    }
}

fn write_listings() {
    let d = seeds("listing");
    let empty = Listing {
        fetched_at_ns: 0,
        entries: Vec::new(),
    };
    std::fs::write(d.join("empty"), empty.encode()).unwrap();
    std::fs::write(d.join("album"), album().encode()).unwrap();
    std::fs::write(d.join("v1-album"), v1_listing()).unwrap();
}

/// A listing as releases before `MFL2` wrote it (still decoded, without
/// its symlinks): magic, time, count, then per entry a UTF-8 name, kind,
/// size, mtime and etag, and no link target.
fn v1_listing() -> Vec<u8> {
    let mut out = b"MFL1".to_vec();
    out.extend_from_slice(&1_600_000_000_000_000_000u64.to_le_bytes());
    out.extend_from_slice(&2u32.to_le_bytes());
    for (name, kind) in [("cover.jpg", 0u8), ("latest", 2u8)] {
        out.extend_from_slice(&(name.len() as u32).to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out.push(kind);
        out.extend_from_slice(&48_213u64.to_le_bytes());
        out.push(1);
        out.extend_from_slice(&1_600_000_000_000_000_000i64.to_le_bytes());
        out.push(0);
    }
    out
}

fn write_chunk_records() {
    let d = seeds("chunk_record");
    for (name, size, atime_ns) in [
        ("small", 4096, 1),
        ("large", 4 << 20, 1_700_000_000_000_000_000),
    ] {
        std::fs::write(d.join(name), ChunkRecord { size, atime_ns }.encode()).unwrap();
    }
}

/// A real index on disk, as `[conf length][conf][db]` (see the target).
fn index_seed(fill: impl FnOnce(&Index)) -> Vec<u8> {
    let tmp = std::env::temp_dir().join(format!("musicfs-seed-index-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let path = tmp.join("index.sled");
    {
        let (index, _) = Index::open(&path).unwrap();
        fill(&index);
        index.flush().unwrap();
    }
    let conf = std::fs::read(path.join("conf")).unwrap();
    let db = std::fs::read(path.join("db")).unwrap();
    std::fs::remove_dir_all(&tmp).unwrap();
    let mut out = vec![u8::try_from(conf.len()).expect("sled's conf fits the length byte")];
    out.extend_from_slice(&conf);
    out.extend_from_slice(&db);
    out
}

fn write_indexes() {
    let d = seeds("index_open");
    std::fs::write(d.join("empty"), index_seed(|_| {})).unwrap();
    let filled = index_seed(|index| {
        let lib = OriginId::new("lib").unwrap();
        for i in 0..4u8 {
            index
                .put_chunk(
                    &ChunkId::of(&[i; 3]),
                    ChunkRecord {
                        size: 100 + u64::from(i),
                        atime_ns: u64::from(i),
                    },
                )
                .unwrap();
        }
        let track = OriginPath::new("Album/01 - Track.flac").unwrap();
        index
            .put_manifest(
                &lib,
                &track,
                &manifest(300, Some(-5), Some("\"abc\""), &[100, 150, 50]),
            )
            .unwrap();
        index
            .put_manifest(
                &lib,
                &OriginPath::new("Album/02.mp3").unwrap(),
                &manifest(9, None, None, &[]),
            )
            .unwrap();
        index
            .put_listing(&lib, &OriginPath::new("Album").unwrap(), &album())
            .unwrap();
    });
    std::fs::write(d.join("filled"), filled).unwrap();
}

fn write_configs() {
    let d = seeds("config");
    let cases: [(&str, &str); 8] = [
        (
            "full.toml",
            "cache_dir = \"/var/cache/musicfs\"\ncache_size = \"20G\"\nread_timeout = 30\nhealth_timeout = 5\norigins = [\"nas=/mnt/nas/Music\", \"/srv/music\"]\nlog_level = \"info\"\n",
        ),
        ("bytes.toml", "cache_size = 1073741824\n"),
        ("empty.toml", ""),
        ("size-m", "512M"),
        ("size-frac", "1.5T"),
        ("size-ib", "20GiB"),
        ("origin-named", "nas=/mnt/nas/Music/"),
        ("origin-unicode", "/mnt/Björk/"),
    ];
    for (name, text) in cases {
        std::fs::write(d.join(name), text).unwrap();
    }
}

fn write_status() {
    let d = seeds("status");
    let info = MountInfo {
        pid: 4242,
        mountpoint: "/mnt/music".into(),
        origins: vec![OriginInfo {
            name: "nas".into(),
            location: "/mnt/nas/Music".into(),
        }],
    };
    std::fs::write(
        d.join("mount.json"),
        serde_json::to_vec_pretty(&info).unwrap(),
    )
    .unwrap();
    let report = StatusReport {
        running: true,
        pid: Some(4242),
        mountpoint: Some("/mnt/music".into()),
        cache_dir: "/root/.cache/musicfs".into(),
        cache_size: 123_456_789,
        cache_limit: Some(20 << 30),
        chunks: 321,
        hit_ratio: Some(0.75),
        hit_bytes: 3_000_000,
        origin_bytes: 1_000_000,
        degraded: Some("the cache disk is read-only".into()),
        origins: vec![OriginStatus {
            name: "nas".into(),
            location: Some("/mnt/nas/Music".into()),
            state: "unhealthy".into(),
            latency_ms: Some(12),
            last_error: Some("no answer within 5s".into()),
            state_since_secs: Some(60),
        }],
    };
    std::fs::write(d.join("status.json"), serde_json::to_vec(&report).unwrap()).unwrap();
    std::fs::write(d.join("lock-pid"), "4242\n").unwrap();
}

fn main() {
    write_manifests();
    write_listings();
    write_chunk_records();
    write_indexes();
    write_configs();
    write_status();
    println!("seeds written under {}/seeds", env!("CARGO_MANIFEST_DIR"));
}
