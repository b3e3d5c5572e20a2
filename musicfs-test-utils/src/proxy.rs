//! A fault-injecting TCP proxy between clients and one upstream server, both
//! on loopback, for tests and benchmarks of remote origins over a slow or
//! failing network (`tc netem` is not available on the test machines).
//!
//! It is switched while it runs through a [`ProxyHandle`]:
//! - **delay**: one-way, applied to every chunk in each direction as a pipe
//!   (data read at `t` is delivered at `t + delay`, however much is in
//!   flight), so the round trip is `2 × delay`; a new connection also pays
//!   the TCP handshake a real link costs (see [`ProxyConfig::handshake`]);
//! - **rate**: a bandwidth cap in bytes/s per direction, *shared by all
//!   connections* like one link, chunks sent first come first served (an
//!   idle link may send a burst of [`RATE_SLACK`] × rate);
//! - **cut**: each connection is closed (FIN) after exactly N bytes reached
//!   the client;
//! - **reset**: every open connection is reset now (RST, both sides);
//! - **modes** ([`Mode`]): forward; blackhole (open connections stall with
//!   nothing lost, new ones are accepted and their bytes read and dropped,
//!   nothing is ever answered); refuse (the port is closed, so connecting
//!   fails with "connection refused"; open connections are left alone).
//!
//! Invariants: bytes are delivered unchanged and in order, or the
//! connection ends (cut, reset, or the other side's error passed on as a
//! reset); a connection never waits behind another except for its turn on a
//! shared rate-limited link; only loopback addresses are accepted, for the
//! listener and the upstream. Counters ([`ProxyStats`]) count connections
//! and the bytes delivered each way.
//!
//! The `musicfs-proxy` binary wraps this for shell scripts, with a
//! line-based control port ([`control`]).

mod conn;
pub mod control;
mod pace;

use std::net::SocketAddr;
use std::num::NonZeroU64;
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use crate::error::{FixtureError, IoContext, Result};
pub use pace::RATE_SLACK;
use pace::{Dir, Link};

/// How a switch of [`Mode`] is awaited at most before it is reported as
/// failed (only bounds a hang: it ends when the listener is closed or
/// listening again).
const SWITCH_DEADLINE: Duration = Duration::from_secs(30);

/// What the proxy does with connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward bytes both ways (with delay, rate and cut applied).
    Forward,
    /// Never answer: open connections stall (their bytes are held, not
    /// lost, and flow again after switching back); new connections are
    /// accepted, their bytes read and dropped, and they stay dead.
    Blackhole,
    /// Close the listening port: new connections are refused. Open
    /// connections are left alone (combine with
    /// [`ProxyHandle::reset_all`] for a server that went away).
    Refuse,
}

/// The proxy's settings; every field can be changed while it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    /// See [`Mode`].
    pub mode: Mode,
    /// One-way delay added to every chunk (round trip = 2 × delay).
    pub delay: Duration,
    /// Bandwidth cap per direction in bytes/s, shared by all connections.
    pub rate: Option<NonZeroU64>,
    /// Close each connection (FIN to the client, upstream closed) once this
    /// many bytes reached the client.
    pub cut_after: Option<u64>,
    /// Whether new connections pay the TCP handshake: the upstream sees no
    /// byte before 1.5 round trips after connect, the client none before 2
    /// (what a real link of this delay costs a fresh connection). On by
    /// default, so connection reuse matters as much as it would.
    pub handshake: bool,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            mode: Mode::Forward,
            delay: Duration::ZERO,
            rate: None,
            cut_after: None,
            handshake: true,
        }
    }
}

/// A snapshot of the proxy's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Connections accepted since start.
    pub accepted: u64,
    /// Connections open now.
    pub active: u64,
    /// Bytes delivered to the upstream.
    pub bytes_up: u64,
    /// Bytes delivered to clients.
    pub bytes_down: u64,
    /// Connections ended by a reset (asked for, or passed on from one side).
    pub resets: u64,
    /// Connections ended by `cut_after`.
    pub cuts: u64,
    /// Connections whose upstream could not be reached (reset at once).
    pub upstream_failures: u64,
    /// Whether the listening port is open.
    pub listening: bool,
}

#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    active: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    resets: AtomicU64,
    cuts: AtomicU64,
    upstream_failures: AtomicU64,
}

/// State shared by the handle, the accept loop and every connection.
#[derive(Debug)]
struct Shared {
    listen: SocketAddr,
    upstream: SocketAddr,
    config: watch::Sender<ProxyConfig>,
    /// Bumped by `reset_all`; connections open at that moment reset.
    reset: watch::Sender<u64>,
    shutdown: watch::Sender<bool>,
    listening: watch::Sender<bool>,
    counters: Counters,
    /// Woken on every counter change, for [`ProxyHandle::wait_until`].
    changed: Notify,
    /// The shared link of each direction (up, down).
    links: [Mutex<Link>; 2],
}

impl Shared {
    fn add(&self, counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
        self.changed.notify_waiters();
    }

    fn link(&self, dir: Dir) -> std::sync::MutexGuard<'_, Link> {
        let i = match dir {
            Dir::Up => 0,
            Dir::Down => 1,
        };
        self.links[i].lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Controls a running proxy; cheap to clone, usable from any thread and
/// any runtime.
#[derive(Debug, Clone)]
pub struct ProxyHandle(Arc<Shared>);

impl ProxyHandle {
    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.0.listen
    }

    /// The upstream server.
    pub fn upstream(&self) -> SocketAddr {
        self.0.upstream
    }

    /// The current settings.
    pub fn config(&self) -> ProxyConfig {
        self.0.config.borrow().clone()
    }

    /// Sets the one-way delay; applies to chunks read from now on.
    pub fn set_delay(&self, one_way: Duration) {
        self.0.config.send_modify(|c| c.delay = one_way);
    }

    /// Sets the bandwidth cap per direction (`None`: unlimited).
    pub fn set_rate(&self, bytes_per_sec: Option<NonZeroU64>) {
        self.0.config.send_modify(|c| c.rate = bytes_per_sec);
    }

    /// Sets the per-connection cut (`None`: never cut). Counts from each
    /// connection's start, so open connections past the limit are cut at
    /// their next chunk.
    pub fn set_cut_after(&self, bytes: Option<u64>) {
        self.0.config.send_modify(|c| c.cut_after = bytes);
    }

    /// Turns the handshake cost of new connections on or off.
    pub fn set_handshake(&self, on: bool) {
        self.0.config.send_modify(|c| c.handshake = on);
    }

    /// Switches the mode and returns once it is in effect: for
    /// [`Mode::Refuse`] the port is closed, for the others it is listening
    /// (again, on the same port).
    pub async fn set_mode(&self, mode: Mode) -> Result<()> {
        self.0.config.send_modify(|c| c.mode = mode);
        let want_listening = mode != Mode::Refuse;
        let mut rx = self.0.listening.subscribe();
        let outcome = tokio::time::timeout(SWITCH_DEADLINE, async {
            rx.wait_for(|l| *l == want_listening).await.is_ok()
        })
        .await;
        match outcome {
            Ok(true) => Ok(()),
            Ok(false) => Err(FixtureError::io(
                "switching the proxy's mode",
                std::io::Error::other("the proxy has shut down"),
            )),
            Err(_) => Err(FixtureError::io(
                format!(
                    "switching the proxy to {mode:?}: the port {} did not {} within {SWITCH_DEADLINE:?}",
                    self.0.listen,
                    if want_listening { "open again" } else { "close" }
                ),
                std::io::Error::from(std::io::ErrorKind::TimedOut),
            )),
        }
    }

    /// Resets every connection open now: both sides get an RST
    /// (`ECONNRESET`). Returns at once; the resets follow within moments.
    pub fn reset_all(&self) {
        self.0.reset.send_modify(|n| *n += 1);
    }

    /// The counters now.
    pub fn stats(&self) -> ProxyStats {
        let c = &self.0.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ProxyStats {
            accepted: get(&c.accepted),
            active: get(&c.active),
            bytes_up: get(&c.bytes_up),
            bytes_down: get(&c.bytes_down),
            resets: get(&c.resets),
            cuts: get(&c.cuts),
            upstream_failures: get(&c.upstream_failures),
            listening: *self.0.listening.borrow(),
        }
    }

    /// Waits until `pred` holds for the counters (checked on every change).
    /// Bound it with a timeout: it waits for ever otherwise.
    pub async fn wait_until(&self, pred: impl Fn(&ProxyStats) -> bool) -> ProxyStats {
        loop {
            let notified = self.0.changed.notified();
            tokio::pin!(notified);
            // Registered before the check, so a change between the check
            // and the await is not missed.
            notified.as_mut().enable();
            let s = self.stats();
            if pred(&s) {
                return s;
            }
            notified.await;
        }
    }
}

/// A running proxy; dropping it closes the port and every connection.
/// Derefs to its [`ProxyHandle`].
#[derive(Debug)]
pub struct Proxy {
    handle: ProxyHandle,
    /// The accept loop, when it runs on the caller's runtime.
    task: Option<JoinHandle<()>>,
    /// The proxy's own thread and runtime, for [`Proxy::start_background`].
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Proxy {
    /// Starts a proxy on a free loopback port, forwarding to `upstream`, on
    /// the current tokio runtime.
    pub async fn start(upstream: SocketAddr, config: ProxyConfig) -> Result<Proxy> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), upstream, config).await
    }

    /// Like [`start`](Self::start), listening on `listen` (a loopback
    /// address; port 0 picks a free one).
    pub async fn start_on(
        listen: SocketAddr,
        upstream: SocketAddr,
        config: ProxyConfig,
    ) -> Result<Proxy> {
        check_loopback(listen, upstream)?;
        let listener = TcpListener::bind(listen)
            .await
            .ctx(|| format!("proxy: binding {listen}"))?;
        let shared = new_shared(&listener, upstream, config)?;
        let task = tokio::spawn(accept_loop(shared.clone(), listener));
        Ok(Proxy {
            handle: ProxyHandle(shared),
            task: Some(task),
            thread: None,
        })
    }

    /// Starts a proxy on its own thread and runtime, so it keeps running
    /// while the caller blocks (sync tests, a blocked test runtime).
    pub fn start_background(upstream: SocketAddr, config: ProxyConfig) -> Result<Proxy> {
        let listen = SocketAddr::from(([127, 0, 0, 1], 0));
        check_loopback(listen, upstream)?;
        let std_listener =
            std::net::TcpListener::bind(listen).ctx(|| format!("proxy: binding {listen}"))?;
        std_listener
            .set_nonblocking(true)
            .ctx(|| "proxy: making the listener non-blocking".to_string())?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ctx(|| "proxy: building its runtime".to_string())?;
        let listener = {
            let _guard = runtime.enter();
            TcpListener::from_std(std_listener)
                .ctx(|| "proxy: registering the listener".to_string())?
        };
        let shared = new_shared(&listener, upstream, config)?;
        let for_thread = shared.clone();
        let thread = std::thread::Builder::new()
            .name("musicfs-proxy".into())
            .spawn(move || runtime.block_on(accept_loop(for_thread, listener)))
            .ctx(|| "proxy: starting its thread".to_string())?;
        Ok(Proxy {
            handle: ProxyHandle(shared),
            task: None,
            thread: Some(thread),
        })
    }

    /// A handle that outlives borrows of the proxy (for other tasks).
    pub fn handle(&self) -> ProxyHandle {
        self.handle.clone()
    }
}

impl Deref for Proxy {
    type Target = ProxyHandle;
    fn deref(&self) -> &ProxyHandle {
        &self.handle
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.handle.0.shutdown.send_replace(true);
        if let Some(task) = self.task.take() {
            task.abort();
        }
        if let Some(thread) = self.thread.take() {
            // The accept loop returns on shutdown; dropping the runtime at
            // the end of the thread drops every connection with it.
            let _ = thread.join();
        }
    }
}

fn check_loopback(listen: SocketAddr, upstream: SocketAddr) -> Result<()> {
    for (what, a) in [("listen", listen), ("upstream", upstream)] {
        if !a.ip().is_loopback() {
            return Err(FixtureError::io(
                format!("proxy: {what} address {a}"),
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "only loopback addresses are allowed",
                ),
            ));
        }
    }
    Ok(())
}

fn new_shared(
    listener: &TcpListener,
    upstream: SocketAddr,
    config: ProxyConfig,
) -> Result<Arc<Shared>> {
    let listen = listener
        .local_addr()
        .ctx(|| "proxy: reading its port".to_string())?;
    Ok(Arc::new(Shared {
        listen,
        upstream,
        config: watch::Sender::new(config),
        reset: watch::Sender::new(0),
        shutdown: watch::Sender::new(false),
        listening: watch::Sender::new(true),
        counters: Counters::default(),
        changed: Notify::new(),
        links: [Mutex::new(Link::default()), Mutex::new(Link::default())],
    }))
}

/// Accepts connections while the mode is not [`Mode::Refuse`]; closes the
/// port in refuse mode and binds it again afterwards.
async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    let mut config = shared.config.subscribe();
    let mut shutdown = shared.shutdown.subscribe();
    let mut listener = Some(listener);
    loop {
        let refuse = config.borrow_and_update().mode == Mode::Refuse;
        match (&listener, refuse) {
            (Some(l), false) => {
                shared
                    .listening
                    .send_if_modified(|on| !std::mem::replace(on, true));
                tokio::select! {
                    accepted = l.accept() => {
                        if let Ok((stream, _)) = accepted {
                            conn::spawn(shared.clone(), stream);
                        }
                    }
                    _ = config.changed() => {}
                    _ = shutdown.wait_for(|s| *s) => return,
                }
            }
            (Some(_), true) => {
                listener = None;
                shared
                    .listening
                    .send_if_modified(|on| std::mem::replace(on, false));
            }
            (None, true) => {
                tokio::select! {
                    _ = config.changed() => {}
                    _ = shutdown.wait_for(|s| *s) => return,
                }
            }
            (None, false) => match TcpListener::bind(shared.listen).await {
                Ok(l) => listener = Some(l),
                Err(e) => {
                    // Someone took the port meanwhile; keep trying until they
                    // let go (set_mode reports it if that takes too long).
                    tracing::warn!("proxy: binding {} again: {e}", shared.listen);
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                        _ = shutdown.wait_for(|s| *s) => return,
                    }
                }
            },
        }
    }
}
