//! When a chunk may be delivered: the proxy's model of a link, as pure
//! functions of time so it is tested without sockets or clocks.
//!
//! - Propagation: a chunk read at `t` is delivered no earlier than
//!   `t + delay` (one-way). Each chunk's due time depends only on when it
//!   was read, never on when earlier chunks were delivered: the link is a
//!   pipe, not stop-and-wait.
//! - Handshake: a real TCP connection costs one round trip before the
//!   client can send, and the server accepts it only when the client's
//!   final ACK arrives (1.5 round trips). The proxy accepts at once, so it
//!   holds the first bytes back instead: nothing reaches the upstream
//!   before `accepted + 3 × delay`, nothing reaches the client before
//!   `accepted + 4 × delay` (a server that speaks first, like SSH, is heard
//!   two round trips after connect, as on a real link).
//! - Bandwidth: one [`Link`] per direction is shared by all connections; it
//!   sends one chunk at a time at `rate` bytes/s, first come first served
//!   (GCRA). A link that fell behind its schedule by up to [`RATE_SLACK`]
//!   (timers fire on a 1 ms grid, threads wake late) catches up, so the
//!   average rate is the one asked for; the price is that an idle link may
//!   send a burst of `RATE_SLACK × rate` bytes at once.

use std::num::NonZeroU64;
use std::time::Duration;

use tokio::time::Instant;

/// How far a link may lag behind its schedule and still catch up; also the
/// longest burst an idle link sends at full speed. Without it, every chunk
/// would lose up to a timer tick and a 50 MB/s cap would give about 25.
pub const RATE_SLACK: Duration = Duration::from_millis(20);

/// The direction of a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dir {
    /// Client to upstream.
    Up,
    /// Upstream to client.
    Down,
}

/// The earliest time a chunk read at `read_at`, on a connection accepted
/// at `accepted`, may be delivered.
pub(crate) fn due(
    dir: Dir,
    read_at: Instant,
    accepted: Instant,
    delay: Duration,
    handshake: bool,
) -> Instant {
    let propagated = read_at + delay;
    if !handshake {
        return propagated;
    }
    let legs = match dir {
        Dir::Up => 3,
        Dir::Down => 4,
    };
    propagated.max(accepted + delay * legs)
}

/// How long `len` bytes take at `rate` bytes/s.
pub(crate) fn transmit_time(len: u64, rate: NonZeroU64) -> Duration {
    let nanos = u128::from(len) * 1_000_000_000 / u128::from(rate.get());
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

/// A link of limited bandwidth shared by every connection in one direction.
#[derive(Debug, Default)]
pub(crate) struct Link {
    /// When the link has sent everything reserved so far.
    busy_until: Option<Instant>,
}

impl Link {
    /// Reserves the link for `len` bytes at `rate` after what is reserved
    /// already, starting no earlier than `now - RATE_SLACK`; returns when
    /// the last byte is through.
    pub(crate) fn reserve(&mut self, now: Instant, len: u64, rate: NonZeroU64) -> Instant {
        let earliest = now.checked_sub(RATE_SLACK).unwrap_or(now);
        let start = match self.busy_until {
            Some(t) if t > earliest => t,
            _ => earliest,
        };
        let finish = start + transmit_time(len, rate);
        self.busy_until = Some(finish);
        finish
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn rate(n: u64) -> NonZeroU64 {
        NonZeroU64::new(n).unwrap()
    }

    #[test]
    fn chunks_are_due_one_delay_after_they_were_read_whatever_came_before() {
        let t0 = Instant::now();
        // Without handshake: each chunk independently read time + delay, so
        // ten chunks read 1 ms apart are due 1 ms apart (a pipe), not 10
        // delays apart (stop-and-wait).
        for k in 0..10 {
            let read = t0 + ms(k);
            assert_eq!(due(Dir::Down, read, t0, ms(50), false), read + ms(50));
            assert_eq!(due(Dir::Up, read, t0, ms(50), false), read + ms(50));
        }
    }

    #[test]
    fn a_new_connection_pays_the_handshake() {
        let t0 = Instant::now();
        let d = ms(50);
        // Sent at once after connect: reaches the server 1.5 RTT after
        // connect; the server's answer (or banner) is back 2 RTT after.
        assert_eq!(due(Dir::Up, t0, t0, d, true), t0 + ms(150));
        assert_eq!(due(Dir::Down, t0, t0, d, true), t0 + ms(200));
        // Later traffic only pays propagation.
        let late = t0 + ms(1000);
        assert_eq!(due(Dir::Up, late, t0, d, true), late + d);
        assert_eq!(due(Dir::Down, late, t0, d, true), late + d);
        // No delay, no handshake cost.
        assert_eq!(due(Dir::Down, t0, t0, Duration::ZERO, true), t0);
    }

    #[test]
    fn transmit_time_is_len_over_rate() {
        assert_eq!(transmit_time(1_000_000, rate(1_000_000)), ms(1000));
        assert_eq!(
            transmit_time(65_536, rate(1 << 20)),
            ms(62) + Duration::from_micros(500)
        );
        assert_eq!(transmit_time(0, rate(1)), Duration::ZERO);
        assert_eq!(
            transmit_time(u64::MAX, rate(1)),
            Duration::from_nanos(u64::MAX)
        );
    }

    #[test]
    fn the_link_is_shared_first_come_first_served() {
        let t0 = Instant::now();
        let mut link = Link::default();
        let r = rate(1000);
        let slack = RATE_SLACK;
        // Two 500-byte chunks at once: the second waits for the first.
        let first = link.reserve(t0, 500, r);
        assert_eq!(first, t0 - slack + ms(500));
        assert_eq!(link.reserve(t0, 500, r), first + ms(500));
        // A writer that woke 5 ms late is not charged for it: the next
        // chunk follows the schedule, not the late wake-up.
        let late = first + ms(500) + ms(5);
        assert_eq!(link.reserve(late, 100, r), first + ms(600));
        // An idle link saves no more credit than the slack.
        let later = t0 + ms(5000);
        assert_eq!(link.reserve(later, 100, r), later - slack + ms(100));
    }
}
