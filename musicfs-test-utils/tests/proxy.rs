//! The fault-injecting proxy against real sockets: bytes pass unchanged,
//! delay and rate are at least what was asked for, blackhole, reset, cut
//! and refuse do what a client would meet on a real network, and switching
//! back restores service.
//!
//! Timing assertions are lower bounds only (a delay is never shorter than
//! asked); the upper bounds a loaded machine cannot promise are never
//! asserted. Waits for events are bounded by [`HANG`], which only catches
//! hangs. tokio's paused clock does not fit here: with real sockets it
//! would jump past timeouts while loopback bytes are still in flight; the
//! timing model itself is tested on a virtual clock in `proxy::pace`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use musicfs_test_utils::proxy::RATE_SLACK;
use musicfs_test_utils::{pseudo_random_bytes, Mode, Proxy, ProxyConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Bounds waits for events that must happen; only a hang reaches it.
const HANG: Duration = Duration::from_secs(30);

/// How long "nothing arrives" is watched for.
const QUIET: Duration = Duration::from_millis(300);

async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(HANG, fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: hung for {HANG:?}"))
}

/// An echo server; counts the connections it accepted.
async fn echo_server() -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    (addr, accepted)
}

/// A server that sends `payload` on every connection, then closes.
async fn source_server(payload: Vec<u8>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let payload = Arc::new(payload);
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            let payload = payload.clone();
            tokio::spawn(async move {
                let _ = s.write_all(&payload).await;
                let _ = s.shutdown().await;
                // Wait for the client to close, so our close is a FIN.
                let mut sink = Vec::new();
                let _ = s.read_to_end(&mut sink).await;
            });
        }
    });
    addr
}

/// One request/answer exchange of `n` bytes through an echo server.
async fn ping(s: &mut TcpStream, n: usize) {
    let msg = pseudo_random_bytes(n, n as u64);
    s.write_all(&msg).await.unwrap();
    let mut back = vec![0u8; n];
    within("echo", s.read_exact(&mut back)).await.unwrap();
    assert_eq!(back, msg);
}

/// Whether a read on `s` stays without an answer for [`QUIET`].
async fn stays_quiet(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 1];
    tokio::time::timeout(QUIET, s.read(&mut b)).await.is_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_pass_unchanged_both_ways_on_parallel_connections() {
    let (echo, _) = echo_server().await;
    let cfg = ProxyConfig {
        delay: Duration::from_millis(2),
        ..ProxyConfig::default()
    };
    let proxy = Proxy::start(echo, cfg).await.unwrap();
    let addr = proxy.addr();
    const LEN: usize = 4 << 20;
    let mut tasks = Vec::new();
    for seed in 0..3u64 {
        tasks.push(tokio::spawn(async move {
            let data = pseudo_random_bytes(LEN, seed);
            let s = TcpStream::connect(addr).await.unwrap();
            let (mut r, mut w) = s.into_split();
            let sent = data.clone();
            let writer = tokio::spawn(async move {
                // Writes of uneven sizes, so chunk borders fall anywhere.
                let sizes = pseudo_random_bytes(4096, seed + 100);
                let (mut off, mut i) = (0, 0);
                while off < sent.len() {
                    let n = (1 + usize::from(sizes[i % sizes.len()]) * 300).min(sent.len() - off);
                    w.write_all(&sent[off..off + n]).await.unwrap();
                    off += n;
                    i += 1;
                }
                w.shutdown().await.unwrap();
            });
            let mut back = Vec::new();
            r.read_to_end(&mut back).await.unwrap();
            writer.await.unwrap();
            assert!(back == data, "connection {seed}: bytes changed");
        }));
    }
    for t in tasks {
        within("transfer", t).await.unwrap();
    }
    let s = within("counters", proxy.wait_until(|s| s.active == 0)).await;
    assert_eq!(s.accepted, 3);
    assert_eq!(s.bytes_up, 3 * LEN as u64);
    assert_eq!(s.bytes_down, 3 * LEN as u64);
    assert_eq!((s.resets, s.cuts), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_costs_a_round_trip_per_exchange_and_the_handshake_on_connect() {
    let (echo, _) = echo_server().await;
    let d = Duration::from_millis(40);
    let proxy = Proxy::start(
        echo,
        ProxyConfig {
            delay: d,
            ..ProxyConfig::default()
        },
    )
    .await
    .unwrap();

    // A fresh connection: handshake (1 RTT) + the exchange (1 RTT).
    let t = Instant::now();
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    ping(&mut s, 10).await;
    assert!(
        t.elapsed() >= d * 4,
        "first exchange took {:?}",
        t.elapsed()
    );

    // On the open connection: one round trip.
    let t = Instant::now();
    ping(&mut s, 10).await;
    assert!(
        t.elapsed() >= d * 2,
        "second exchange took {:?}",
        t.elapsed()
    );

    // Without the handshake cost, a fresh connection's first exchange is
    // one round trip.
    proxy.set_handshake(false);
    let t = Instant::now();
    let mut s2 = TcpStream::connect(proxy.addr()).await.unwrap();
    ping(&mut s2, 10).await;
    assert!(t.elapsed() >= d * 2, "took {:?}", t.elapsed());

    // A longer delay set while running applies to the next chunks.
    proxy.set_delay(d * 2);
    let t = Instant::now();
    ping(&mut s, 10).await;
    assert!(t.elapsed() >= d * 4, "took {:?}", t.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackhole_stalls_open_connections_and_swallows_new_ones() {
    let (echo, upstream_accepts) = echo_server().await;
    let proxy = Proxy::start(echo, ProxyConfig::default()).await.unwrap();
    let mut open = TcpStream::connect(proxy.addr()).await.unwrap();
    ping(&mut open, 5).await;

    proxy.set_mode(Mode::Blackhole).await.unwrap();
    open.write_all(b"held").await.unwrap();
    assert!(
        stays_quiet(&mut open).await,
        "an answer came through the blackhole"
    );

    // A new connection is accepted and written to, but never answered and
    // never reaches the upstream.
    let mut swallowed = TcpStream::connect(proxy.addr()).await.unwrap();
    swallowed.write_all(b"into the void").await.unwrap();
    assert!(stays_quiet(&mut swallowed).await);
    let s = proxy.stats();
    assert_eq!(s.accepted, 2);
    assert_eq!(s.active, 2, "blackholed connections stay open");
    assert_eq!(upstream_accepts.load(Ordering::SeqCst), 1);

    // Back to forward: the held bytes go through, in order, on the same
    // connection; the swallowed connection stays dead; new ones work.
    proxy.set_mode(Mode::Forward).await.unwrap();
    let mut back = [0u8; 4];
    within("held bytes", open.read_exact(&mut back))
        .await
        .unwrap();
    assert_eq!(&back, b"held");
    ping(&mut open, 100).await;
    assert!(stays_quiet(&mut swallowed).await);
    let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
    ping(&mut fresh, 1000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_gives_both_sides_econnreset_and_new_connections_work() {
    // An upstream that reports how its read ended.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = l.local_addr().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) => {
                            let _ = tx.send(Ok(()));
                            return;
                        }
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e.kind()));
                            return;
                        }
                    }
                }
            });
        }
    });
    let proxy = Proxy::start(upstream, ProxyConfig::default())
        .await
        .unwrap();
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    ping(&mut s, 10).await;

    proxy.reset_all();
    let mut b = [0u8; 1];
    let err = within("client read", s.read(&mut b)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionReset);
    let upstream_end = within("upstream read", rx.recv()).await.unwrap();
    assert_eq!(upstream_end, Err(ErrorKind::ConnectionReset));
    let stats = within("counters", proxy.wait_until(|s| s.active == 0)).await;
    assert_eq!(stats.resets, 1);

    // Connections opened after the reset are not affected by it.
    let mut s2 = TcpStream::connect(proxy.addr()).await.unwrap();
    ping(&mut s2, 10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_after_n_bytes_delivers_exactly_n() {
    let payload = pseudo_random_bytes(1 << 20, 42);
    let upstream = source_server(payload.clone()).await;
    let proxy = Proxy::start(
        upstream,
        ProxyConfig {
            cut_after: Some(100_000),
            ..ProxyConfig::default()
        },
    )
    .await
    .unwrap();
    for _ in 0..3 {
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        let mut got = Vec::new();
        within("cut read", s.read_to_end(&mut got)).await.unwrap();
        assert_eq!(got.len(), 100_000);
        assert!(got == payload[..100_000]);
    }
    within("cut counter", proxy.wait_until(|s| s.cuts == 3)).await;

    // Cut off: the whole payload again.
    proxy.set_cut_after(None);
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    let mut got = Vec::new();
    within("full read", s.read_to_end(&mut got)).await.unwrap();
    assert!(got == payload);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuse_closes_the_port_and_forward_opens_it_again() {
    let (echo, _) = echo_server().await;
    let proxy = Proxy::start(echo, ProxyConfig::default()).await.unwrap();
    let addr = proxy.addr();
    let mut open = TcpStream::connect(addr).await.unwrap();
    ping(&mut open, 10).await;

    proxy.set_mode(Mode::Refuse).await.unwrap();
    assert!(!proxy.stats().listening);
    let err = TcpStream::connect(addr).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused);
    // Open connections are left alone.
    ping(&mut open, 10).await;

    proxy.set_mode(Mode::Forward).await.unwrap();
    assert_eq!(proxy.addr(), addr);
    let mut s = TcpStream::connect(addr).await.unwrap();
    ping(&mut s, 10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_is_a_cap_shared_by_all_connections() {
    const EACH: usize = 1 << 20;
    let upstream = source_server(pseudo_random_bytes(EACH, 1)).await;
    let rate = 2u64 << 20;
    let proxy = Proxy::start(
        upstream,
        ProxyConfig {
            rate: NonZeroU64::new(rate),
            ..ProxyConfig::default()
        },
    )
    .await
    .unwrap();
    let addr = proxy.addr();
    let t = Instant::now();
    let reads: Vec<_> = (0..2)
        .map(|_| {
            tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await.unwrap();
                let mut got = Vec::new();
                s.read_to_end(&mut got).await.unwrap();
                got.len()
            })
        })
        .collect();
    for r in reads {
        assert_eq!(within("rate-limited read", r).await.unwrap(), EACH);
    }
    // 2 MiB through one 2 MiB/s link: at least a second (less the burst an
    // idle link may send), not half of one (which two independent
    // per-connection caps would allow).
    let took = t.elapsed();
    assert!(took >= Duration::from_secs(1) - RATE_SLACK, "took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_resets_the_client() {
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let proxy = Proxy::start(dead, ProxyConfig::default()).await.unwrap();
    // The reset may even beat the client's connect call to its result.
    let attempt = async {
        let mut s = TcpStream::connect(proxy.addr()).await?;
        let mut b = [0u8; 1];
        s.read(&mut b).await
    };
    let err = within("connect and read", attempt).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionReset);
    within("counter", proxy.wait_until(|s| s.upstream_failures == 1)).await;
}

#[test]
fn a_background_proxy_serves_blocking_clients_and_closes_on_drop() {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let mut s = s.unwrap();
            std::thread::spawn(move || {
                let mut r = s.try_clone().unwrap();
                let _ = std::io::copy(&mut r, &mut s);
            });
        }
    });
    let proxy = Proxy::start_background(upstream, ProxyConfig::default()).unwrap();
    let addr = proxy.addr();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(HANG)).unwrap();
    s.write_all(b"blocking").unwrap();
    let mut back = [0u8; 8];
    s.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"blocking");
    drop(proxy);
    let err = std::net::TcpStream::connect(addr).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused);
    // Its connections closed with it.
    let mut rest = Vec::new();
    assert!(matches!(s.read_to_end(&mut rest), Ok(0) | Err(_)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_is_switched_through_its_control_port() {
    use std::io::BufRead;
    let (echo, _) = echo_server().await;
    let bin = env!("CARGO_BIN_EXE_musicfs-proxy");
    let mut child = std::process::Command::new(bin)
        .args(["--upstream", &echo.to_string(), "--delay-ms", "5"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (listen, control) = tokio::task::spawn_blocking(move || {
        let mut lines = std::io::BufReader::new(stdout).lines();
        let mut next = |prefix: &str| -> SocketAddr {
            let line = lines.next().unwrap().unwrap();
            line.strip_prefix(prefix).unwrap().parse().unwrap()
        };
        (next("listen "), next("control "))
    })
    .await
    .unwrap();
    let ctl = move |commands: &[&str]| {
        let out = std::process::Command::new(bin)
            .args(["ctl", "--control", &control.to_string()])
            .args(commands)
            .output()
            .unwrap();
        (out.status.success(), String::from_utf8(out.stdout).unwrap())
    };

    let mut s = TcpStream::connect(listen).await.unwrap();
    ping(&mut s, 10).await;
    let (ok, out) = tokio::task::spawn_blocking(move || ctl(&["mode refuse", "config"]))
        .await
        .unwrap();
    assert!(ok, "{out}");
    assert_eq!(
        out,
        "ok\nok mode=refuse delay_ms=5 rate=off cut=off handshake=on\n"
    );
    let err = TcpStream::connect(listen).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused);

    let (ok, out) = tokio::task::spawn_blocking(move || ctl(&["mode forward", "stats"]))
        .await
        .unwrap();
    assert!(ok, "{out}");
    assert!(
        out.starts_with("ok\nok accepted=1 active=1 bytes_up=10 bytes_down=10"),
        "{out}"
    );
    let mut s2 = TcpStream::connect(listen).await.unwrap();
    ping(&mut s2, 10).await;

    let (ok, out) = tokio::task::spawn_blocking(move || ctl(&["mode sideways"]))
        .await
        .unwrap();
    assert!(!ok);
    assert!(out.starts_with("error: "), "{out}");

    child.kill().unwrap();
    child.wait().unwrap();
}
