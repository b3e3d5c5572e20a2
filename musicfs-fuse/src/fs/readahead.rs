//! Listing read-ahead: when a user opens a directory, its subdirectories
//! are listed in the background, so a tree walk (`find`, `ls -lR`, a
//! player's library scan) over a slow origin finds each next directory
//! cached instead of paying a round trip per directory, one after another.
//!
//! Layer: part of the filesystem proper (see `fs.rs`), beside the listings
//! (`listings.rs`), whose cache it fills through the same
//! `Inner::list_origin`.
//!
//! Invariants:
//! - Lower priority than the user, never in the user's way: at most
//!   [`crate::FsConfig::listing_readahead`] read-ahead listings run per
//!   origin, counted here and nowhere else, so a user's listing or read
//!   never waits for a read-ahead slot. A user listing of a directory whose
//!   read-ahead is already running waits for that call (the same call,
//!   started earlier) rather than asking again; one that is only queued is
//!   not waited for.
//! - Bounded: only a directory a user opened starts read-ahead (a mount
//!   lists nothing by itself), at most [`MAX_DEPTH`] levels below it; at
//!   most [`WINDOW`] listings per origin are read ahead and not yet opened
//!   by anyone (older than [`STALE_AFTER`], they stop counting), so a huge
//!   library is not listed because someone looked at its root; a job not
//!   started within [`STALE_AFTER`] is dropped, and at most [`QUEUE`] wait
//!   per origin.
//! - Ordered like the walkers it serves: the directory opened last goes
//!   first (a user moved on), and within one trigger, depth-first in name
//!   order, the order `find` and `ls -R` visit.
//! - Skipped while the origin is unhealthy or not answering (the same
//!   test as the freshness check), and for what is cached already. A user
//!   waiting on a read-ahead that failed with a fault asks again, within
//!   the same `read_timeout` as a listing of its own; a definite answer
//!   (not found, not a directory) is the user's answer too.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use musicfs_origins::{EntryKind, OriginId};
use parking_lot::Mutex;
use tokio::sync::watch;
use tracing::debug;

use super::listings::{DirListing, Listed};
use super::Inner;
use crate::errno;
use crate::inode::NodeKey;

/// Levels below a directory a user opened that are read ahead.
pub(super) const MAX_DEPTH: u8 = 3;

/// Listings per origin read ahead and not yet opened by a user.
pub(super) const WINDOW: usize = 256;

/// Jobs waiting per origin; the least urgent goes when more come.
pub(super) const QUEUE: usize = 1024;

/// A job not started this long after its trigger, and a listing read ahead
/// this long ago and never opened, no longer count: the user moved on.
pub(super) const STALE_AFTER: Duration = Duration::from_secs(30);

/// Queue order: the newest trigger first, then depth-first by path.
type Priority = (Reverse<u64>, Vec<u8>);

/// The outcome of one read-ahead listing, for users who wait on it.
type Outcome = watch::Receiver<Option<Listed>>;

#[derive(Debug)]
struct Job {
    dir: NodeKey,
    /// Levels below the directory whose opening queued it (1: a child).
    depth: u8,
    /// The trigger it belongs to (higher: newer).
    trigger: u64,
    queued_at: Instant,
}

/// One origin's read-ahead.
#[derive(Debug, Default)]
struct Lane {
    queue: BTreeMap<Priority, Job>,
    running: usize,
    /// Listed ahead and not opened by a user yet, with when they were.
    unopened: HashMap<NodeKey, Instant>,
}

#[derive(Debug, Default)]
struct State {
    lanes: HashMap<OriginId, Lane>,
    /// Where each queued directory sits in its lane's queue.
    queued: HashMap<NodeKey, Priority>,
    running: HashMap<NodeKey, Outcome>,
    triggers: u64,
    /// Triggers whose task has not queued its jobs yet.
    pending: usize,
}

/// The read-ahead state of a mount.
#[derive(Debug, Default)]
pub(super) struct ReadAhead {
    state: Mutex<State>,
}

/// The queue key of `dir`: depth-first order is the order of the path's
/// bytes with '/' below every other byte (NUL, which no name holds).
fn priority(trigger: u64, dir: &NodeKey) -> Priority {
    let path = dir
        .path
        .as_bytes()
        .iter()
        .map(|&b| if b == b'/' { 0 } else { b })
        .collect();
    (Reverse(trigger), path)
}

/// The one origin listing of a directory running now, user's or
/// read-ahead's: others who need the directory wait for its outcome. The
/// entry goes when this is dropped.
pub(super) struct Lead<'a> {
    ahead: &'a ReadAhead,
    dir: NodeKey,
    tx: watch::Sender<Option<Listed>>,
}

impl Lead<'_> {
    /// Hands `listed` to whoever waits.
    pub(super) fn done(self, listed: &Listed) {
        self.tx.send_replace(Some(listed.clone()));
    }
}

impl Drop for Lead<'_> {
    fn drop(&mut self) {
        // Only a lead inserts the entry of its directory, and only when
        // there was none, so this one is ours.
        self.ahead.state.lock().running.remove(&self.dir);
    }
}

impl ReadAhead {
    /// The outcome of the listing of `dir` that is running, or, when none
    /// is, the lead of a new one (the caller lists).
    pub(super) fn join_or_lead(&self, dir: &NodeKey) -> std::result::Result<Outcome, Lead<'_>> {
        let mut state = self.state.lock();
        if let Some(outcome) = state.running.get(dir) {
            return Ok(outcome.clone());
        }
        let (tx, rx) = watch::channel(None);
        state.running.insert(dir.clone(), rx);
        Err(Lead {
            ahead: self,
            dir: dir.clone(),
            tx,
        })
    }
}

#[cfg(test)]
impl ReadAhead {
    /// Nothing runs and nothing more can start until a user opens a
    /// directory (the queue is empty or the window full).
    pub(super) fn settled(&self) -> bool {
        let state = self.state.lock();
        state.pending == 0
            && state.running.is_empty()
            && state
                .lanes
                .values()
                .all(|l| l.running == 0 && (l.queue.is_empty() || l.unopened.len() >= WINDOW))
    }
}

/// Waits for the outcome of a listing someone else runs; `None` when it
/// ended without one (skipped, or cancelled at shutdown).
pub(super) async fn outcome(mut outcome: Outcome) -> Option<Listed> {
    let done = outcome.wait_for(Option::is_some).await.ok()?;
    done.clone()
}

impl Inner {
    /// A user opened `dir`, which `listing` lists: its subdirectories that
    /// are not cached are read ahead (see the module docs). Returns at
    /// once; the work runs as a task.
    pub(super) fn read_ahead_below(self: &Arc<Self>, dir: &NodeKey, listing: Arc<DirListing>) {
        let width = self.config.listing_readahead;
        if width == 0 {
            return;
        }
        let may_ask = self.may_ask(dir);
        let trigger = {
            let mut state = self.read_ahead.state.lock();
            if let Some(lane) = state.lanes.get_mut(&dir.origin) {
                lane.unopened.remove(dir);
            }
            if !may_ask {
                return;
            }
            state.triggers += 1;
            state.pending += 1;
            state.triggers
        };
        let inner = Arc::clone(self);
        let dir = dir.clone();
        self.rt.spawn(async move {
            inner.queue_subdirs(&dir, &listing, 1, trigger);
            inner.read_ahead.state.lock().pending -= 1;
            inner.pump(&dir.origin);
        });
    }

    /// Queues the subdirectories of `dir` (listed by `listing`) that are
    /// not cached, `depth` levels below the trigger's directory.
    fn queue_subdirs(&self, dir: &NodeKey, listing: &DirListing, depth: u8, trigger: u64) {
        if depth > MAX_DEPTH {
            return;
        }
        let now = Instant::now();
        let mut jobs = Vec::new();
        for entry in &listing.entries {
            if entry.meta.kind != EntryKind::Dir {
                continue;
            }
            let Ok(path) = dir.path.join(&entry.name) else {
                continue;
            };
            let sub = NodeKey {
                origin: dir.origin.clone(),
                path,
            };
            if !self.is_listing_cached(&sub) {
                jobs.push(sub);
            }
            // More than could ever start before these are opened.
            if jobs.len() >= WINDOW {
                break;
            }
        }
        if jobs.is_empty() {
            return;
        }
        let mut state = self.read_ahead.state.lock();
        let state = &mut *state;
        for sub in jobs {
            if state.running.contains_key(&sub) {
                continue;
            }
            let key = priority(trigger, &sub);
            let lane = state.lanes.entry(sub.origin.clone()).or_default();
            if let Some(old) = state.queued.get(&sub) {
                if *old <= key {
                    // Already as urgent (a newer trigger queued it).
                    continue;
                }
                lane.queue.remove(old);
            }
            state.queued.insert(sub.clone(), key.clone());
            lane.queue.insert(
                key,
                Job {
                    dir: sub,
                    depth,
                    trigger,
                    queued_at: now,
                },
            );
            while lane.queue.len() > QUEUE {
                if let Some((_, dropped)) = lane.queue.pop_last() {
                    state.queued.remove(&dropped.dir);
                }
            }
        }
    }

    /// Whether a listing of `dir` is in memory or the index.
    fn is_listing_cached(&self, dir: &NodeKey) -> bool {
        if self.memo.lock().get(dir).is_some() {
            return true;
        }
        matches!(
            self.cache.index().listing(&dir.origin, &dir.path),
            Ok(Some(_))
        )
    }

    /// Starts the most urgent jobs of `origin` that fit its width and
    /// window.
    fn pump(self: &Arc<Self>, origin: &OriginId) {
        let width = self.config.listing_readahead;
        let now = Instant::now();
        let mut started = Vec::new();
        {
            let mut state = self.read_ahead.state.lock();
            let state = &mut *state;
            let Some(lane) = state.lanes.get_mut(origin) else {
                return;
            };
            lane.unopened
                .retain(|_, at| now.duration_since(*at) < STALE_AFTER);
            while lane.running < width && lane.running + lane.unopened.len() < WINDOW {
                let Some((_, job)) = lane.queue.pop_first() else {
                    break;
                };
                state.queued.remove(&job.dir);
                if now.duration_since(job.queued_at) >= STALE_AFTER
                    || state.running.contains_key(&job.dir)
                {
                    continue;
                }
                lane.running += 1;
                started.push(job);
            }
        }
        for job in started {
            let inner = Arc::clone(self);
            self.rt.spawn(async move {
                // Someone may have started listing it since it was popped.
                if let Err(lead) = inner.read_ahead.join_or_lead(&job.dir) {
                    inner.run_job(&job, lead).await;
                }
                if let Some(lane) = inner.read_ahead.state.lock().lanes.get_mut(&job.dir.origin) {
                    lane.running -= 1;
                }
                inner.pump(&job.dir.origin);
            });
        }
    }

    /// Lists `job.dir` unless cached by now (or its origin stopped
    /// answering), tells anyone waiting, and queues its subdirectories.
    async fn run_job(self: &Arc<Self>, job: &Job, lead: Lead<'_>) {
        let dir = &job.dir;
        let listing = match self.cached_listing(dir) {
            Some(l) => Ok(l),
            // Not asked: whoever waits asks for themselves (the lead
            // drops without an outcome).
            None if !self.may_ask(dir) => return,
            None => match self.list_origin(dir).await {
                Ok(l) => {
                    self.read_ahead
                        .state
                        .lock()
                        .lanes
                        .entry(dir.origin.clone())
                        .or_default()
                        .unopened
                        .insert(dir.clone(), Instant::now());
                    debug!(origin = %dir.origin, dir = %dir.path, entries = l.entries.len(), "listing read ahead");
                    Ok(l)
                }
                Err(e) => {
                    debug!(origin = %dir.origin, dir = %dir.path, error = %e, "cannot read a listing ahead");
                    Err(errno::of_origin(&e))
                }
            },
        };
        if let Ok(l) = &listing {
            self.queue_subdirs(dir, l, job.depth + 1, job.trigger);
        }
        lead.done(&listing);
    }
}

#[cfg(test)]
mod tests;
