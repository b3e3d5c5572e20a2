//! The process's file descriptors: how many it may have, how MusicFS splits
//! them, and waiting out a moment of exhaustion.
//!
//! Layer: shared plumbing under the origins and the chunk store, which both
//! open one file per operation.
//!
//! Invariants:
//! - MusicFS bounds its own fd use from `RLIMIT_NOFILE`: [`FdBudget`] gives
//!   the chunk store and the origins fixed shares of the limit minus a
//!   reserve for what every daemon holds (FUSE channels, sled, tokio, the
//!   status socket, stdio). Those shares are semaphores, so extra readers
//!   queue instead of failing.
//! - If the process still runs out (a limit lowered under us, fds taken by a
//!   part outside the budget), the operation is retried with a growing pause
//!   for up to [`FD_WAIT`] before its `EMFILE` reaches the user: other reads
//!   finishing free fds within milliseconds.

use std::time::{Duration, Instant};

/// How long one file operation keeps retrying while the process is out of
/// fds: long enough for other reads to finish, well under a read timeout.
pub const FD_WAIT: Duration = Duration::from_secs(2);

/// fds every daemon holds whatever the load: stdio, the FUSE channel and its
/// clones, sled's files, tokio's epoll/eventfd/signal pipe, the lock file,
/// the status socket and a few status clients.
pub const RESERVED_FDS: u64 = 32;

/// The soft `RLIMIT_NOFILE`, or `None` if it cannot be read.
pub fn soft_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes into the rlimit struct we own and pass
    // by a valid pointer.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    (rc == 0).then_some(lim.rlim_cur)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard one (as most servers do at
/// start: the soft default of 1024 is a relic of `select`) and returns the
/// soft limit in force afterwards.
pub fn raise_soft_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: as in `soft_limit`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return None;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we pass by a valid pointer; a
        // refusal leaves the old limit, which we then report.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return Some(raised.rlim_cur);
        }
    }
    Some(lim.rlim_cur)
}

/// How many files the chunk store and each origin may have open at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdBudget {
    /// Chunk files open at once (reads, temp files being written).
    pub store: usize,
    /// Concurrent file operations per origin (each holds at most one fd).
    pub per_origin: usize,
}

impl FdBudget {
    /// Splits `limit` minus [`RESERVED_FDS`] evenly between the chunk store
    /// and the origins, each share capped at `cap` (past which more
    /// parallelism buys nothing and only pins threads) and at least 1, so a
    /// tiny limit still makes progress, one file at a time.
    pub fn split(limit: u64, origins: usize, cap: usize) -> FdBudget {
        let usable = limit.saturating_sub(RESERVED_FDS);
        let half = usize::try_from(usable / 2).unwrap_or(usize::MAX);
        let cap = cap.max(1);
        FdBudget {
            store: half.clamp(1, cap),
            per_origin: (half / origins.max(1)).clamp(1, cap),
        }
    }
}

/// Runs `op` again while `is_exhausted` says its error is `EMFILE`/`ENFILE`,
/// pausing 5 ms, 10 ms, ... up to 100 ms between tries, for at most `wait`
/// (normally [`FD_WAIT`]); then returns the last error. Blocking: call it on
/// a blocking thread, inside the slot that bounds the caller's fd use.
pub fn retry_while_exhausted<T, E>(
    wait: Duration,
    mut op: impl FnMut() -> std::result::Result<T, E>,
    is_exhausted: impl Fn(&E) -> bool,
) -> std::result::Result<T, E> {
    let deadline = Instant::now() + wait;
    let mut pause = Duration::from_millis(5);
    loop {
        match op() {
            Err(e) if is_exhausted(&e) && Instant::now() + pause < deadline => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(100));
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_splits_the_limit_after_the_reserve() {
        let b = FdBudget::split(128, 1, 256);
        assert_eq!(
            b,
            FdBudget {
                store: 48,
                per_origin: 48
            }
        );
        let b = FdBudget::split(1024, 2, 32);
        assert_eq!(
            b,
            FdBudget {
                store: 32,
                per_origin: 32
            }
        );
        let b = FdBudget::split(64, 2, 256);
        assert_eq!(
            b,
            FdBudget {
                store: 16,
                per_origin: 8
            }
        );
    }

    #[test]
    fn a_tiny_limit_still_allows_one_file_at_a_time() {
        assert_eq!(
            FdBudget::split(10, 3, 32),
            FdBudget {
                store: 1,
                per_origin: 1
            }
        );
    }

    #[test]
    fn exhaustion_is_waited_out_and_other_errors_are_not() {
        let mut tries = 0;
        let r: Result<u32, &str> = retry_while_exhausted(
            FD_WAIT,
            || {
                tries += 1;
                if tries < 3 {
                    Err("emfile")
                } else {
                    Ok(7)
                }
            },
            |e| *e == "emfile",
        );
        assert_eq!(r, Ok(7));
        assert_eq!(tries, 3);

        let mut tries = 0;
        let r: Result<u32, &str> = retry_while_exhausted(
            FD_WAIT,
            || {
                tries += 1;
                Err("enoent")
            },
            |e| *e == "emfile",
        );
        assert_eq!(r, Err("enoent"));
        assert_eq!(tries, 1);
    }

    #[test]
    fn lasting_exhaustion_gives_up_with_the_error() {
        let mut tries = 0;
        let r: Result<(), &str> = retry_while_exhausted(
            Duration::from_millis(50),
            || {
                tries += 1;
                Err("emfile")
            },
            |_| true,
        );
        assert_eq!(r, Err("emfile"));
        assert!(tries > 1, "it retried before giving up");
    }

    #[test]
    fn the_soft_limit_is_readable_and_raising_never_lowers_it() {
        let before = soft_limit().unwrap();
        let after = raise_soft_limit().unwrap();
        assert!(after >= before);
    }
}
