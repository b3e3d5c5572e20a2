//! One proxied connection: two pumps (client to upstream, upstream to
//! client), each a reader and a writer joined by a queue, in one task per
//! connection.
//!
//! Invariants:
//! - The reader stamps each chunk with the time it was read and queues it
//!   at once; the writer delivers it at its due time ([`pace::due`]). So
//!   the delay is a pipe: many chunks are in flight at once, in order.
//! - The queue holds at most [`QUEUE_CHUNKS`] chunks of at most
//!   [`CHUNK`] bytes per direction; a full queue stops the reader, which is
//!   how a slow link pushes back on its sender.
//! - Blackhole stalls the writer before it takes its turn on the link:
//!   held bytes are delivered, in order, when the mode changes back.
//! - A connection ends by both sides closing (FIN passed on, after the
//!   delay), a cut (FIN to the client after exactly `cut_after` bytes,
//!   upstream closed, the client's remaining bytes read and dropped until
//!   it closes), or a reset: asked for, or an error on one side, passed on
//!   to the other as an RST.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::{sleep_until, Instant};

use super::pace::{self, Dir};
use super::{Mode, ProxyConfig, Shared};

/// The most bytes read at once.
const CHUNK: usize = 64 * 1024;

/// Chunks queued per direction and connection (at most 16 MiB): room for
/// the bandwidth-delay product of fast links with long delays.
const QUEUE_CHUNKS: usize = 256;

/// How long a cut connection waits for its client to close before dropping
/// it.
const CUT_LINGER: Duration = Duration::from_secs(60);

/// A chunk in a queue.
#[derive(Debug)]
enum Chunk {
    Data { read_at: Instant, bytes: Vec<u8> },
    Eof { read_at: Instant },
}

/// How a pump or a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// EOF passed on.
    Done,
    /// Cut after `cut_after` bytes.
    Cut,
    /// Reset, asked for or passed on from an error.
    Reset,
    /// The proxy is shutting down.
    Shutdown,
}

/// Counts the connection as active while it lives.
struct Active(Arc<Shared>);

impl Active {
    fn new(shared: Arc<Shared>) -> Active {
        shared.add(&shared.counters.accepted, 1);
        shared.add(&shared.counters.active, 1);
        Active(shared)
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.counters.active.fetch_sub(1, Ordering::Relaxed);
        self.0.changed.notify_waiters();
    }
}

/// Serves an accepted connection in its own task.
pub(super) fn spawn(shared: Arc<Shared>, client: TcpStream) {
    // Subscribed before the task starts: a reset asked for after this
    // accept reaches this connection.
    let mut reset = shared.reset.subscribe();
    reset.mark_unchanged();
    let shutdown = shared.shutdown.subscribe();
    let accepted = Instant::now();
    let active = Active::new(shared.clone());
    tokio::spawn(async move {
        serve(shared, client, accepted, reset, shutdown).await;
        drop(active);
    });
}

async fn serve(
    shared: Arc<Shared>,
    mut client: TcpStream,
    accepted: Instant,
    mut reset: watch::Receiver<u64>,
    mut shutdown: watch::Receiver<bool>,
) {
    let _ = client.set_nodelay(true);
    let mut upstream: Option<TcpStream> = None;
    let end = tokio::select! {
        end = run(&shared, &mut client, &mut upstream, accepted) => end,
        _ = reset.changed() => End::Reset,
        _ = shutdown.wait_for(|s| *s) => End::Shutdown,
    };
    match end {
        End::Reset => {
            // SO_LINGER 0: closing sends an RST instead of a FIN.
            let _ = client.set_zero_linger();
            if let Some(u) = &upstream {
                let _ = u.set_zero_linger();
            }
            shared.add(&shared.counters.resets, 1);
        }
        End::Cut => {
            drop(upstream.take());
            // The client got its FIN; read and drop what it still sends
            // until it closes, so closing our side does not reset it before
            // it read the bytes it was given.
            let linger = async {
                let mut buf = vec![0u8; CHUNK];
                while matches!(client.read(&mut buf).await, Ok(n) if n > 0) {}
            };
            tokio::select! {
                _ = linger => {}
                _ = tokio::time::sleep(CUT_LINGER) => {}
                _ = reset.changed() => { let _ = client.set_zero_linger(); }
                _ = shutdown.wait_for(|s| *s) => {}
            }
        }
        End::Done | End::Shutdown => {}
    }
}

/// Connects upstream (or drops everything in blackhole mode) and runs both
/// pumps until the connection ends.
async fn run(
    shared: &Arc<Shared>,
    client: &mut TcpStream,
    upstream: &mut Option<TcpStream>,
    accepted: Instant,
) -> End {
    let config = shared.config.borrow().clone();
    if config.mode == Mode::Blackhole {
        let mut buf = vec![0u8; CHUNK];
        while matches!(client.read(&mut buf).await, Ok(n) if n > 0) {}
        return End::Done;
    }
    let up = match TcpStream::connect(shared.upstream).await {
        Ok(u) => upstream.insert(u),
        Err(_) => {
            shared.add(&shared.counters.upstream_failures, 1);
            // A refused connect on a real link is known one round trip
            // after connect.
            if config.handshake {
                sleep_until(accepted + config.delay * 2).await;
            }
            return End::Reset;
        }
    };
    let _ = up.set_nodelay(true);
    let (client_r, client_w) = client.split();
    let (up_r, up_w) = up.split();
    let to_upstream = pump(shared, Dir::Up, client_r, up_w, accepted);
    let to_client = pump(shared, Dir::Down, up_r, client_w, accepted);
    tokio::pin!(to_upstream, to_client);
    let (mut up_done, mut down_done) = (false, false);
    loop {
        tokio::select! {
            end = &mut to_upstream, if !up_done => match end {
                End::Done => up_done = true,
                other => return other,
            },
            end = &mut to_client, if !down_done => match end {
                End::Done => down_done = true,
                other => return other,
            },
        }
        if up_done && down_done {
            return End::Done;
        }
    }
}

/// Moves bytes from `src` to `dst` in one direction: a reader that queues
/// stamped chunks and a writer that delivers them when due.
async fn pump<R, W>(
    shared: &Arc<Shared>,
    dir: Dir,
    mut src: R,
    mut dst: W,
    accepted: Instant,
) -> End
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (tx, mut rx) = mpsc::channel::<Chunk>(QUEUE_CHUNKS);
    let reader = async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = src.read(&mut buf).await?;
            let read_at = Instant::now();
            let chunk = if n == 0 {
                Chunk::Eof { read_at }
            } else {
                Chunk::Data {
                    read_at,
                    bytes: buf[..n].to_vec(),
                }
            };
            if tx.send(chunk).await.is_err() || n == 0 {
                return Ok::<(), std::io::Error>(());
            }
        }
    };
    let mut config = shared.config.subscribe();
    let writer = async move {
        let mut delivered: u64 = 0;
        while let Some(chunk) = rx.recv().await {
            let read_at = match &chunk {
                Chunk::Data { read_at, .. } | Chunk::Eof { read_at } => *read_at,
            };
            let c = config.borrow_and_update().clone();
            sleep_until(pace::due(dir, read_at, accepted, c.delay, c.handshake)).await;
            let c = wait_while_blackhole(&mut config).await;
            let bytes = match chunk {
                Chunk::Eof { .. } => {
                    let _ = dst.shutdown().await;
                    return End::Done;
                }
                Chunk::Data { bytes, .. } => bytes,
            };
            // A cut delivers exactly up to the limit, then FIN.
            let (len, cut) = match (dir, c.cut_after) {
                (Dir::Down, Some(limit)) if delivered + bytes.len() as u64 >= limit => (
                    usize::try_from(limit - delivered.min(limit)).unwrap_or(0),
                    true,
                ),
                _ => (bytes.len(), false),
            };
            if let Some(rate) = c.rate {
                let finish = shared.link(dir).reserve(Instant::now(), len as u64, rate);
                sleep_until(finish).await;
            }
            if dst.write_all(&bytes[..len]).await.is_err() {
                return End::Reset;
            }
            delivered += len as u64;
            let counter = match dir {
                Dir::Up => &shared.counters.bytes_up,
                Dir::Down => &shared.counters.bytes_down,
            };
            shared.add(counter, len as u64);
            if cut {
                // Counted before the FIN, so a client that saw its EOF sees
                // the cut in the counters too.
                shared.add(&shared.counters.cuts, 1);
                let _ = dst.shutdown().await;
                return End::Cut;
            }
        }
        // The reader stopped without an EOF: it failed.
        End::Reset
    };
    tokio::pin!(reader, writer);
    let mut reader_done = false;
    loop {
        tokio::select! {
            r = &mut reader, if !reader_done => {
                if r.is_err() {
                    return End::Reset;
                }
                reader_done = true;
            }
            end = &mut writer => return end,
        }
    }
}

/// Waits while the mode is [`Mode::Blackhole`]; returns the settings then
/// in force.
async fn wait_while_blackhole(config: &mut watch::Receiver<ProxyConfig>) -> ProxyConfig {
    loop {
        let c = config.borrow_and_update().clone();
        if c.mode != Mode::Blackhole {
            return c;
        }
        if config.changed().await.is_err() {
            return c;
        }
    }
}
