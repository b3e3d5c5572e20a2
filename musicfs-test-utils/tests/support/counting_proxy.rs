//! A loopback TCP proxy that counts what passes: connections accepted and
//! occurrences of a byte pattern in the client's requests. Lets a test see
//! how many HTTP requests (e.g. S3 list pages) a call sent and whether
//! connections were reused, without trusting the client's own account.
//!
//! It can also turn into a blackhole: while it is one, bytes that arrive
//! are swallowed and the connection they came on stays dead for good (a
//! hung connection, as a dropped route leaves it); connections opened after
//! the blackhole ends work again.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug)]
pub struct CountingProxy {
    pub addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    matches: Arc<AtomicUsize>,
    blackhole: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingProxy {
    /// Forwards 127.0.0.1:<free port> to `upstream`, counting `pattern` in
    /// client-to-server bytes (a pattern split across two reads is missed;
    /// request lines arrive whole in practice on loopback).
    pub async fn start(upstream: SocketAddr, pattern: &'static [u8]) -> CountingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let matches = Arc::new(AtomicUsize::new(0));
        let blackhole = Arc::new(AtomicBool::new(false));
        let (c, m, b) = (connections.clone(), matches.clone(), blackhole.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                let (m, b) = (m.clone(), b.clone());
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let dead = Arc::new(AtomicBool::new(false));
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let (b_up, dead_up) = (b.clone(), dead.clone());
                    let up = async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match cr.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            if b_up.load(Ordering::SeqCst) {
                                dead_up.store(true, Ordering::SeqCst);
                            }
                            if dead_up.load(Ordering::SeqCst) {
                                continue;
                            }
                            let seen = if pattern.is_empty() {
                                0
                            } else {
                                buf[..n]
                                    .windows(pattern.len())
                                    .filter(|w| *w == pattern)
                                    .count()
                            };
                            m.fetch_add(seen, Ordering::SeqCst);
                            if sw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = sw.shutdown().await;
                    };
                    let down = async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match sr.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            if b.load(Ordering::SeqCst) {
                                dead.store(true, Ordering::SeqCst);
                            }
                            if dead.load(Ordering::SeqCst) {
                                continue;
                            }
                            if cw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = cw.shutdown().await;
                    };
                    tokio::join!(up, down);
                });
            }
        });
        CountingProxy {
            addr,
            connections,
            matches,
            blackhole,
            task,
        }
    }

    /// Swallow everything from now on (`true`), or let new connections
    /// through again (`false`); a connection that met the blackhole stays
    /// dead.
    pub fn set_blackhole(&self, on: bool) {
        self.blackhole.store(on, Ordering::SeqCst);
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    pub fn matches(&self) -> usize {
        self.matches.load(Ordering::SeqCst)
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
