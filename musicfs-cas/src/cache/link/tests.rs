//! Unit tests of `link.rs`: the order reads go out in, and the window.

use super::*;
use futures::FutureExt;

const KIB: u64 = 1024;

/// Polls `fut` until it is ready, yielding to the runtime between polls
/// (a handed-over slot arrives through a channel), at most 100 times.
async fn ready<T>(fut: impl std::future::Future<Output = T>) -> T {
    let mut fut = std::pin::pin!(fut);
    for _ in 0..100 {
        if let Some(v) = (&mut fut).now_or_never() {
            return v;
        }
        tokio::task::yield_now().await;
    }
    panic!("never ready");
}

#[tokio::test]
async fn slots_leave_a_reserve_below_the_origins_call_limit() {
    assert_eq!(Link::new(Some(4)).slots, 3);
    assert_eq!(Link::new(Some(16)).slots, 12);
    assert_eq!(Link::new(Some(1)).slots, 1);
    assert_eq!(Link::new(None).slots, DEFAULT_SLOTS);
}

#[tokio::test]
async fn a_user_read_never_waits_for_read_ahead() {
    // One slot: read-ahead holds it, more read-ahead queues.
    let link = Link::new(Some(2));
    let held = ready(link.acquire(Class::ReadAhead)).await;
    let mut queued = Box::pin(link.acquire(Class::ReadAhead));
    assert!((&mut queued).now_or_never().is_none());
    let user = link
        .acquire(Class::User)
        .now_or_never()
        .expect("a user read waited");
    assert_eq!(link.estimate().in_flight, 2);
    // Freeing the user's place leaves the link full (the queued read-ahead
    // still waits); freeing the read-ahead's place hands it on.
    drop(user);
    assert!((&mut queued).now_or_never().is_none());
    drop(held);
    let next = ready(queued).await;
    assert_eq!(link.estimate().in_flight, 1);
    drop(next);
    assert_eq!(link.estimate().in_flight, 0);
}

#[tokio::test]
async fn a_freed_slot_goes_to_read_ahead_before_background_work() {
    let link = Link::new(Some(2));
    let held = ready(link.acquire(Class::ReadAhead)).await;
    let order = Arc::new(Mutex::new(Vec::new()));
    let spawn = |class: Class, name: &'static str| {
        let (link, order) = (Arc::clone(&link), Arc::clone(&order));
        tokio::spawn(async move {
            let slot = link.acquire(class).await;
            order.lock().push(name);
            // Held until the next one may go.
            drop(slot);
        })
    };
    let bg = spawn(Class::Background, "verify");
    // Let the background waiter queue first.
    while link.gate.lock().background.is_empty() {
        tokio::task::yield_now().await;
    }
    let ra1 = spawn(Class::ReadAhead, "ahead-1");
    let ra2 = spawn(Class::ReadAhead, "ahead-2");
    while link.gate.lock().readahead.len() < 2 {
        tokio::task::yield_now().await;
    }
    drop(held);
    for t in [bg, ra1, ra2] {
        t.await.unwrap();
    }
    assert_eq!(*order.lock(), ["ahead-1", "ahead-2", "verify"]);
    assert_eq!(link.estimate().in_flight, 0);
}

#[tokio::test]
async fn background_work_does_not_jump_the_queue_of_read_ahead() {
    let link = Link::new(Some(3));
    // Two slots, both taken, read-ahead queued. The place freed goes to
    // the read-ahead; background work arriving meanwhile waits for the
    // next one.
    let a = ready(link.acquire(Class::ReadAhead)).await;
    let b = ready(link.acquire(Class::ReadAhead)).await;
    let mut ra = Box::pin(link.acquire(Class::ReadAhead));
    assert!((&mut ra).now_or_never().is_none());
    drop(a);
    let mut bg = Box::pin(link.acquire(Class::Background));
    assert!((&mut bg).now_or_never().is_none());
    let ra = ready(ra).await;
    drop(b);
    let bg = ready(bg).await;
    drop((ra, bg));
    assert_eq!(link.estimate().in_flight, 0);
}

#[tokio::test]
async fn queued_read_ahead_goes_out_once_a_reader_waits_for_it() {
    let link = Link::new(Some(2));
    let held = ready(link.acquire(Class::ReadAhead)).await;
    let (tx, rx) = watch::channel(0u64);
    let mut ahead = Box::pin(link.acquire_readahead(rx, 4 * 1024 * KIB));
    assert!((&mut ahead).now_or_never().is_none());
    // A reader waiting for bytes before the request does not promote it.
    tx.send_replace(4 * 1024 * KIB);
    assert!((&mut ahead).now_or_never().is_none());
    tx.send_replace(4 * 1024 * KIB + 1);
    let promoted = ready(ahead).await;
    assert_eq!(link.estimate().in_flight, 2);
    drop((held, promoted));
    assert_eq!(link.estimate().in_flight, 0);
}

#[tokio::test]
async fn a_waiter_that_gives_up_loses_no_slot() {
    let link = Link::new(Some(2));
    let held = ready(link.acquire(Class::ReadAhead)).await;
    let mut gone = Box::pin(link.acquire(Class::ReadAhead));
    assert!((&mut gone).now_or_never().is_none());
    drop(gone);
    drop(held);
    assert_eq!(link.estimate().in_flight, 0);
    // The place is free for the next one.
    drop(link.acquire(Class::ReadAhead).now_or_never().unwrap());
}

#[tokio::test(start_paused = true)]
async fn the_window_is_bandwidth_times_round_trip_shared_by_the_ingests() {
    let link = Link::new(None);
    assert_eq!(link.window(), 0, "nothing measured: one read at a time");
    // A small read answered in 50 ms: the round trip.
    let sent = link.sent();
    tokio::time::advance(Duration::from_millis(50)).await;
    link.completed(sent, 128 * KIB);
    assert_eq!(link.estimate().rtt, Some(Duration::from_millis(50)));
    // Four 2 MiB reads in flight together, answered after 100 ms: the
    // origin delivered 8 MiB in 100 ms (about 84 MB/s). They took longer
    // than the round trip, which stands.
    let sent: Vec<_> = (0..4).map(|_| link.sent()).collect();
    tokio::time::advance(Duration::from_millis(100)).await;
    for s in sent {
        link.completed(s, 2048 * KIB);
    }
    assert_eq!(link.estimate().rtt, Some(Duration::from_millis(50)));
    let bw = link.estimate().bandwidth.unwrap();
    assert!((bw - 8.0 * 1024.0 * 1024.0 / 0.1).abs() < 1.0, "{bw}");
    // 2 × 84 MB/s × 50 ms.
    assert_eq!(link.window(), 8 << 20);
    let two = (link.ingest_running(), link.ingest_running());
    assert_eq!(link.window(), 4 << 20);
    drop(two);
    // A slower read replaces the round trip only once it is old.
    tokio::time::advance(Duration::from_secs(5)).await;
    let sent = link.sent();
    tokio::time::advance(Duration::from_millis(80)).await;
    link.completed(sent, 64 * KIB);
    assert_eq!(link.estimate().rtt, Some(Duration::from_millis(50)));
    tokio::time::advance(Duration::from_secs(5)).await;
    let sent = link.sent();
    tokio::time::advance(Duration::from_millis(80)).await;
    link.completed(sent, 64 * KIB);
    assert_eq!(link.estimate().rtt, Some(Duration::from_millis(80)));
    // A faster one at once.
    let sent = link.sent();
    tokio::time::advance(Duration::from_millis(30)).await;
    link.completed(sent, 64 * KIB);
    assert_eq!(link.estimate().rtt, Some(Duration::from_millis(30)));
    // Never more than the cap.
    let sent = link.sent();
    tokio::time::advance(Duration::from_millis(40)).await;
    link.completed(sent, 1 << 30);
    assert_eq!(link.window(), MAX_WINDOW);
}

#[tokio::test(start_paused = true)]
async fn a_link_that_answers_within_a_few_ms_gets_one_read_at_a_time() {
    let link = Link::new(None);
    // A local disk: 2 MiB in a millisecond, 2 GB/s.
    for _ in 0..3 {
        let sent = link.sent();
        tokio::time::advance(Duration::from_millis(1)).await;
        link.completed(sent, 2048 * KIB);
    }
    assert!(link.estimate().bandwidth.unwrap() > 1e9);
    assert_eq!(link.window(), 0);
}
