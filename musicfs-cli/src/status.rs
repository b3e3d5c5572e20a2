//! `musicfs status`, and the Unix socket the running mount answers it on.
//!
//! The mount listens on `CACHE/musicfs.sock`; each connection gets one JSON
//! [`StatusReport`] and is closed. When no mount answers, `status` reports
//! what the cache directory holds, read without taking the lock.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Result;
use musicfs_cas::Cache;
use musicfs_origins::{HealthMonitor, HealthState};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

use crate::config::human_size;
use crate::lock;

pub const SOCKET: &str = "musicfs.sock";
pub const MOUNT_INFO: &str = "mount.json";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OriginInfo {
    pub name: String,
    /// A directory, or a remote origin's URL (never with a secret).
    pub location: String,
}

/// What the mount records about itself in the cache dir, for `status` and
/// `doctor` when it is not running.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountInfo {
    pub pid: u32,
    pub mountpoint: PathBuf,
    pub origins: Vec<OriginInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OriginStatus {
    pub name: String,
    pub location: Option<String>,
    pub state: String,
    pub latency_ms: Option<u64>,
    pub last_error: Option<String>,
    pub state_since_secs: Option<u64>,
}

/// The JSON answer. Fields added after the first release carry
/// `#[serde(default)]`, so a newer `status` still reads an older daemon.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    pub running: bool,
    pub pid: Option<u32>,
    pub mountpoint: Option<PathBuf>,
    pub cache_dir: PathBuf,
    /// Bytes of chunk files.
    pub cache_size: u64,
    pub cache_limit: Option<u64>,
    pub chunks: u64,
    /// `hit_bytes / (hit_bytes + origin_bytes)`.
    pub hit_ratio: Option<f64>,
    /// Bytes served from cached chunks without an origin read.
    pub hit_bytes: u64,
    /// Bytes served that the origin sent for the read.
    pub origin_bytes: u64,
    pub degraded: Option<String>,
    pub origins: Vec<OriginStatus>,
    /// Disk use of the index, which counts against the limit too.
    #[serde(default)]
    pub index_bytes: u64,
    #[serde(default)]
    pub manifests: u64,
    /// Bytes the ingest read from origins to cache them.
    #[serde(default)]
    pub ingested_bytes: u64,
    #[serde(default)]
    pub evicted_chunks: u64,
    /// Chunks fetched again because their file was damaged.
    #[serde(default)]
    pub refetched_corrupt: u64,
    /// Chunks fetched again because eviction had removed them.
    #[serde(default)]
    pub refetched_evicted: u64,
    /// True while the chunk files are being checked against the index
    /// after the mount started (sizes converge when it ends).
    #[serde(default)]
    pub reconciling: bool,
}

pub fn live_report(
    cache_dir: &Path,
    info: &MountInfo,
    cache: &Cache,
    health: &HealthMonitor,
) -> StatusReport {
    let stats = cache.stats();
    let origins = health
        .statuses()
        .into_iter()
        .map(|(id, h)| OriginStatus {
            location: info
                .origins
                .iter()
                .find(|o| o.name == id.as_str())
                .map(|o| o.location.clone()),
            name: id.to_string(),
            state: match h.state {
                HealthState::Healthy => "healthy",
                HealthState::Unhealthy => "unhealthy",
                HealthState::Unknown => "unknown",
            }
            .to_owned(),
            latency_ms: h.last_latency.map(|d| d.as_millis() as u64),
            last_error: h.last_error,
            state_since_secs: SystemTime::now()
                .duration_since(h.since)
                .ok()
                .map(|d| d.as_secs()),
        })
        .collect();
    StatusReport {
        running: true,
        pid: Some(info.pid),
        mountpoint: Some(info.mountpoint.clone()),
        cache_dir: cache_dir.to_owned(),
        cache_size: stats.size,
        cache_limit: Some(stats.max_size),
        chunks: stats.chunks,
        hit_ratio: stats.hit_ratio(),
        hit_bytes: stats.hit_bytes,
        origin_bytes: stats.origin_bytes,
        index_bytes: stats.index_bytes,
        manifests: stats.manifests,
        ingested_bytes: stats.ingested_bytes,
        evicted_chunks: stats.evicted_chunks,
        refetched_corrupt: stats.refetched_corrupt,
        refetched_evicted: stats.refetched_evicted,
        reconciling: stats.reconciling,
        degraded: stats.degraded,
        origins,
    }
}

/// Serves status on `CACHE/musicfs.sock` until the task is aborted.
pub fn serve(
    cache_dir: PathBuf,
    info: MountInfo,
    cache: Cache,
    health: Arc<HealthMonitor>,
) -> Result<tokio::task::JoinHandle<()>> {
    let path = cache_dir.join(SOCKET);
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)?;
    Ok(tokio::spawn(async move {
        loop {
            let mut conn = match listener.accept().await {
                Ok((conn, _)) => conn,
                Err(e) => {
                    // EMFILE leaves the client in the backlog, so accept
                    // would fail again at once: pause instead of spinning.
                    tracing::debug!(error = %e, "status socket accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let report = live_report(&cache_dir, &info, &cache, &health);
            let body = serde_json::to_vec(&report).unwrap_or_default();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(2), conn.write_all(&body)).await;
            });
        }
    }))
}

/// Asks a running mount; `None` when none answers.
pub fn query(cache_dir: &Path) -> Option<StatusReport> {
    use std::io::Read;
    let mut s = std::os::unix::net::UnixStream::connect(cache_dir.join(SOCKET)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    serde_json::from_slice(&buf).ok()
}

pub fn read_mount_info(cache_dir: &Path) -> Option<MountInfo> {
    let text = std::fs::read(cache_dir.join(MOUNT_INFO)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// What a stopped cache dir holds, without opening (or locking) it.
pub fn offline_report(cache_dir: &Path) -> StatusReport {
    let chunks_dir = cache_dir.join("chunks");
    let mut chunks = 0;
    let mut stack = vec![chunks_dir];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(t) if t.is_file() => chunks += 1,
                _ => {}
            }
        }
    }
    let info = read_mount_info(cache_dir);
    let holder = lock::holder(cache_dir);
    StatusReport {
        running: false,
        pid: holder.and_then(|(pid, _)| pid),
        mountpoint: info.as_ref().map(|i| i.mountpoint.clone()),
        cache_dir: cache_dir.to_owned(),
        cache_size: musicfs_cas::store::disk_usage(&cache_dir.join("chunks")),
        cache_limit: None,
        chunks,
        hit_ratio: None,
        hit_bytes: 0,
        origin_bytes: 0,
        index_bytes: musicfs_cas::store::disk_usage(&cache_dir.join("index.sled")),
        manifests: 0,
        ingested_bytes: 0,
        evicted_chunks: 0,
        refetched_corrupt: 0,
        refetched_evicted: 0,
        reconciling: false,
        degraded: None,
        origins: info
            .map(|i| {
                i.origins
                    .into_iter()
                    .map(|o| OriginStatus {
                        name: o.name,
                        location: Some(o.location),
                        state: "not checked (no mount running)".into(),
                        latency_ms: None,
                        last_error: None,
                        state_since_secs: None,
                    })
                    .collect()
            })
            .unwrap_or_default(),
    }
}

pub fn print(r: &StatusReport) {
    if r.running {
        println!(
            "musicfs: running (PID {}) at {}",
            r.pid.map_or_else(|| "?".into(), |p| p.to_string()),
            r.mountpoint
                .as_deref()
                .map_or_else(|| "?".into(), |m| m.display().to_string())
        );
    } else {
        match r.pid {
            Some(pid) => {
                println!("musicfs: PID {pid} holds the cache lock but does not answer on {SOCKET}")
            }
            None => println!("musicfs: not running"),
        }
    }
    println!("cache:   {}", r.cache_dir.display());
    let used = r.cache_size + r.index_bytes;
    let counting = if r.reconciling {
        ", still counting"
    } else {
        ""
    };
    match r.cache_limit {
        Some(limit) => println!(
            "  size   {} of {} ({} chunks, {} index{counting})",
            human_size(used),
            human_size(limit),
            r.chunks,
            human_size(r.index_bytes)
        ),
        None => println!(
            "  size   {} ({} chunks, {} index)",
            human_size(used),
            r.chunks,
            human_size(r.index_bytes)
        ),
    }
    if let Some(h) = r.hit_ratio {
        println!(
            "  hits   {:.1}% ({} from the cache without an origin read, {} sent by the origins)",
            h * 100.0,
            human_size(r.hit_bytes),
            human_size(r.origin_bytes)
        );
    }
    if r.running {
        println!(
            "  cached {} ingested from origins, {} evicted chunks",
            human_size(r.ingested_bytes),
            r.evicted_chunks
        );
        println!(
            "  refetched {} damaged chunks, {} evicted chunks read again",
            r.refetched_corrupt, r.refetched_evicted
        );
    }
    match &r.degraded {
        Some(why) => {
            println!("  state  DEGRADED: {why} (reads go to the origins; recovers by itself)")
        }
        None if r.running => println!("  state  ok"),
        None => {}
    }
    if !r.origins.is_empty() {
        println!("origins:");
    }
    for o in &r.origins {
        let loc = o
            .location
            .as_deref()
            .map_or_else(String::new, |l| format!(" ({l})"));
        let lat = o
            .latency_ms
            .map_or_else(String::new, |l| format!(", {l} ms"));
        let err = o
            .last_error
            .as_deref()
            .map_or_else(String::new, |e| format!(": {e}"));
        println!("  {}{loc}: {}{lat}{err}", o.name, o.state);
    }
}
