//! The cache's link to one origin: the order its origin reads go out in,
//! and what it has measured of the round trip and the bandwidth.
//!
//! Layer: inside the cache (see `cache.rs`), under every origin read the
//! cache makes (`fetch.rs`). One [`Link`] per origin, shared by all of the
//! origin's open files. Invariants:
//! - A read a user waits for ([`Class::User`]) never waits here.
//! - Read-ahead ([`Class::ReadAhead`]) and background work
//!   ([`Class::Background`], `musicfs verify`) go out only while the
//!   cache's reads in flight to the origin, of every class, are fewer than
//!   the link's slots: the origin's call limit ([`Origin::call_limit`], a
//!   connection pool's size) less a reserve of a quarter of it, at least
//!   one; [`DEFAULT_SLOTS`] when the origin states no limit. So while fewer
//!   user reads than the reserve are in flight, a user read finds a free
//!   connection instead of queueing behind read-ahead.
//! - A freed slot goes to waiting read-ahead before background work, and
//!   within a class in arrival order. A read-ahead request that a reader
//!   starts waiting for while it is still queued goes out at once, as a
//!   user read.
//! - The estimates only size how much the ingest asks for at once; they
//!   never decide which bytes are read or served.
//!
//! [`Origin::call_limit`]: musicfs_origins::Origin::call_limit

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

/// Read-ahead and background slots of an origin that states no call limit:
/// enough for two files streaming at the full window at once.
pub(crate) const DEFAULT_SLOTS: usize = 16;
/// Origin reads the ingest of one file keeps in flight at most.
pub(crate) const MAX_REQUESTS: usize = 8;
/// Bytes the ingest of one file keeps in flight at most.
pub(crate) const MAX_WINDOW: u64 = 16 << 20;
/// A link whose round trip is shorter than this (a local disk, memory, a
/// LAN NAS) gets one read at a time: more in flight would save less than
/// handing reads between tasks costs.
const MIN_RTT: Duration = Duration::from_millis(2);
/// How long the least time a read took stands as the round trip: a
/// longer one replaces it only after this (the route may have changed).
const RTT_WINDOW: Duration = Duration::from_secs(10);
/// The window is this many times bandwidth × round trip: the margin that
/// keeps the pipe full while answers are consumed, and lets a window that
/// is below the link's rate double each round trip until it is not.
const GAIN: f64 = 2.0;

/// Who waits for an origin read, most urgent first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// A reader waits for these bytes (a miss, a seek, a re-fetch).
    User,
    /// The ingest reading ahead of every reader.
    ReadAhead,
    /// Work nobody waits for (verify's repairs).
    Background,
}

/// What the cache has measured of an origin's link.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LinkEstimate {
    /// The least time a read took lately: the round trip plus the
    /// transfer of the smallest read (a file's first read is small).
    pub rtt: Option<Duration>,
    /// Bytes per second the origin delivered, counting every read in
    /// flight at once, smoothed.
    pub bandwidth: Option<f64>,
    /// Ingests of the origin running now (they share the window).
    pub ingests: usize,
    /// Cache reads in flight to the origin now, of every class.
    pub in_flight: usize,
    /// Read-ahead and background reads waiting for a place now.
    pub queued: usize,
}

#[derive(Debug, Default)]
struct GateState {
    in_flight: usize,
    readahead: VecDeque<oneshot::Sender<Slot>>,
    background: VecDeque<oneshot::Sender<Slot>>,
}

#[derive(Debug, Default)]
struct Estimates {
    /// The round trip, and when it was seen.
    rtt: Option<(Duration, Instant)>,
    /// Bytes per second.
    bandwidth: Option<f64>,
}

/// See the module docs.
#[derive(Debug)]
pub(crate) struct Link {
    /// Cache reads in flight below which read-ahead and background work
    /// may go out.
    slots: usize,
    gate: Mutex<GateState>,
    estimates: Mutex<Estimates>,
    /// Bytes of completed reads, for delivery-rate samples.
    delivered: AtomicU64,
    ingests: AtomicUsize,
}

/// One cache read in flight to the origin; frees its place on drop.
#[derive(Debug)]
pub(crate) struct Slot {
    link: Arc<Link>,
    /// False once handed back without freeing (see [`Link::release`]).
    armed: bool,
}

impl Slot {
    fn new(link: &Arc<Link>) -> Self {
        Self {
            link: Arc::clone(link),
            armed: true,
        }
    }

    pub(crate) fn link(&self) -> &Arc<Link> {
        &self.link
    }
}

/// Counts one running ingest of the link while it lives.
#[derive(Debug)]
pub(crate) struct IngestOnLink(Arc<Link>);

impl Drop for IngestOnLink {
    fn drop(&mut self) {
        self.0.ingests.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Taken when a read starts; turned into samples when it completes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sent {
    at: Instant,
    delivered: u64,
}

impl Link {
    /// A link for an origin that allows `call_limit` calls at once.
    pub(crate) fn new(call_limit: Option<usize>) -> Arc<Self> {
        let slots = match call_limit {
            Some(limit) => limit.saturating_sub((limit / 4).max(1)).max(1),
            None => DEFAULT_SLOTS,
        };
        Arc::new(Self {
            slots,
            gate: Mutex::new(GateState::default()),
            estimates: Mutex::new(Estimates::default()),
            delivered: AtomicU64::new(0),
            ingests: AtomicUsize::new(0),
        })
    }

    /// A place for a read of `class`; waits (read-ahead, background) until
    /// there is one. Cancel-safe: a place handed to a waiter that is gone
    /// is freed again.
    pub(crate) async fn acquire(self: &Arc<Self>, class: Class) -> Slot {
        loop {
            let rx = {
                let mut g = self.gate.lock();
                g.readahead.retain(|tx| !tx.is_closed());
                g.background.retain(|tx| !tx.is_closed());
                let free = g.in_flight < self.slots;
                let go = match class {
                    Class::User => true,
                    Class::ReadAhead => free && g.readahead.is_empty(),
                    Class::Background => free && g.readahead.is_empty() && g.background.is_empty(),
                };
                if go {
                    g.in_flight += 1;
                    return Slot::new(self);
                }
                let (tx, rx) = oneshot::channel();
                match class {
                    Class::Background => g.background.push_back(tx),
                    _ => g.readahead.push_back(tx),
                }
                rx
            };
            // The sender is only dropped after handing over a slot, so an
            // error cannot happen while this link lives; asking again is
            // right either way.
            if let Ok(slot) = rx.await {
                return slot;
            }
        }
    }

    /// A read-ahead place for the bytes from `from`, or a user one as soon
    /// as a reader waits for them (`waiting` holds the end of the furthest
    /// read waiting on the ingest).
    pub(crate) async fn acquire_readahead(
        self: &Arc<Self>,
        mut waiting: watch::Receiver<u64>,
        from: u64,
    ) -> Slot {
        // False only when the file is gone: then nobody waits, and the read
        // is dropped with the ingest anyway.
        let needed = async move { waiting.wait_for(|&end| end > from).await.is_ok() };
        tokio::select! {
            slot = self.acquire(Class::ReadAhead) => return slot,
            true = needed => {}
        }
        self.acquire(Class::User).await
    }

    /// Frees one place and hands it on to the most urgent waiter, if the
    /// link has room for one.
    fn release(self: &Arc<Self>) {
        let mut g = self.gate.lock();
        g.in_flight = g.in_flight.saturating_sub(1);
        while g.in_flight < self.slots {
            let Some(tx) = g.readahead.pop_front().or_else(|| g.background.pop_front()) else {
                break;
            };
            g.in_flight += 1;
            let slot = Slot::new(self);
            // A waiter that goes away after this send drops the slot on its
            // own side (tokio's receiver drops a sent value itself), so the
            // slot's drop never runs here, under the gate's lock.
            if let Err(mut slot) = tx.send(slot) {
                // The waiter is gone: take the place back without running
                // the slot's drop, which would lock the gate again.
                slot.armed = false;
                g.in_flight -= 1;
            }
        }
    }

    /// Marks a read as sent, for its samples.
    pub(crate) fn sent(&self) -> Sent {
        Sent {
            at: Instant::now(),
            delivered: self.delivered.load(Ordering::Acquire),
        }
    }

    /// A read sent at `sent` returned `len` bytes: one sample of the round
    /// trip and one of the delivery rate. The round trip is the least time
    /// any read took in the last [`RTT_WINDOW`] (time to first answer shows
    /// best in small reads; a read that queued or carried many bytes took
    /// longer than the link's round trip, never less). The delivery rate is
    /// the bytes every read of the origin delivered while this one was in
    /// flight, over the time it took, so reads in flight together count as
    /// the link they share; it is smoothed, following a rise at once (a
    /// rate seen once is there) and a drop slowly (a slower sample may be a
    /// reader that asked for less).
    pub(crate) fn completed(&self, sent: Sent, len: u64) {
        let now = Instant::now();
        let took = now.saturating_duration_since(sent.at);
        let delivered = self.delivered.fetch_add(len, Ordering::AcqRel) + len;
        let mut e = self.estimates.lock();
        let stands = |(rtt, at): (Duration, Instant)| rtt <= took && now - at < RTT_WINDOW;
        if !e.rtt.is_some_and(stands) {
            e.rtt = Some((took, now));
        }
        let secs = took.as_secs_f64();
        if secs > 0.0 {
            let rate = delivered.saturating_sub(sent.delivered) as f64 / secs;
            e.bandwidth = Some(match e.bandwidth {
                Some(bw) if rate > bw => rate,
                Some(bw) => (bw * 7.0 + rate) / 8.0,
                None => rate,
            });
        }
    }

    /// Bytes one ingest keeps in flight: about bandwidth × round trip (with
    /// a margin), shared by the origin's running ingests, at most
    /// [`MAX_WINDOW`]. 0 while nothing is measured, and on a link faster
    /// than [`MIN_RTT`]: one read at a time.
    pub(crate) fn window(&self) -> u64 {
        let e = self.estimates.lock();
        let (Some((rtt, _)), Some(bw)) = (e.rtt, e.bandwidth) else {
            return 0;
        };
        if rtt < MIN_RTT {
            return 0;
        }
        let share = self.ingests.load(Ordering::Acquire).max(1) as f64;
        let w = GAIN * bw * rtt.as_secs_f64() / share;
        // Float to int saturates; NaN becomes 0.
        (w as u64).min(MAX_WINDOW)
    }

    /// Counts a running ingest of this origin until the guard drops.
    pub(crate) fn ingest_running(self: &Arc<Self>) -> IngestOnLink {
        self.ingests.fetch_add(1, Ordering::AcqRel);
        IngestOnLink(Arc::clone(self))
    }

    pub(crate) fn estimate(&self) -> LinkEstimate {
        let e = self.estimates.lock();
        let g = self.gate.lock();
        let waiting =
            |q: &VecDeque<oneshot::Sender<Slot>>| q.iter().filter(|tx| !tx.is_closed()).count();
        LinkEstimate {
            rtt: e.rtt.map(|(rtt, _)| rtt),
            bandwidth: e.bandwidth,
            ingests: self.ingests.load(Ordering::Acquire),
            in_flight: g.in_flight,
            queued: waiting(&g.readahead) + waiting(&g.background),
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.armed {
            self.link.release();
        }
    }
}

#[cfg(test)]
mod tests;
