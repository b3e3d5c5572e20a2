//! The proxy's control protocol: one command per line over a loopback TCP
//! connection, one answer line per command (`ok ...` or `error: ...`), so
//! a shell script can switch a running `musicfs-proxy` with
//! `musicfs-proxy ctl --control ADDR 'mode blackhole'` or bash's
//! `/dev/tcp`.
//!
//! Commands:
//! - `delay MS` — one-way delay in milliseconds (round trip = 2 × MS)
//! - `rate BYTES_PER_SEC` | `rate off` — bandwidth cap per direction,
//!   shared by all connections
//! - `cut BYTES` | `cut off` — close each connection after BYTES reached
//!   the client
//! - `handshake on` | `handshake off` — new connections pay the TCP
//!   handshake's round trips
//! - `mode forward` | `mode blackhole` | `mode refuse` — answers once the
//!   mode is in effect
//! - `reset` — reset every open connection now
//! - `stats` — `ok accepted=N active=N bytes_up=N bytes_down=N resets=N
//!   cuts=N upstream_failures=N listening=true|false`
//! - `config` — `ok mode=forward delay_ms=N rate=N|off cut=N|off
//!   handshake=on|off`

use std::num::NonZeroU64;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

use super::{Mode, ProxyHandle};

/// Serves the control protocol on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, handle: ProxyHandle) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if line.trim().is_empty() {
                    continue;
                }
                let answer = match apply(&handle, &line).await {
                    Ok(text) if text.is_empty() => "ok".to_string(),
                    Ok(text) => format!("ok {text}"),
                    Err(e) => format!("error: {e}"),
                };
                if w.write_all(format!("{answer}\n").as_bytes()).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// Applies one command line; the answer's text after `ok`, or what was
/// wrong with it.
pub async fn apply(handle: &ProxyHandle, line: &str) -> Result<String, String> {
    let mut words = line.split_whitespace();
    let command = words.next().unwrap_or("");
    let arg = words.next();
    if let Some(extra) = words.next() {
        return Err(format!("unexpected {extra:?} after {command}"));
    }
    let need = |what: &str| arg.ok_or_else(|| format!("{command} needs {what}"));
    let number = |what: &str| -> Result<u64, String> {
        let a = need(what)?;
        a.parse()
            .map_err(|_| format!("{command}: {a:?} is not a whole number"))
    };
    let off_or = |what: &str| -> Result<Option<u64>, String> {
        if arg == Some("off") {
            Ok(None)
        } else {
            number(what).map(Some)
        }
    };
    match command {
        "delay" => handle.set_delay(Duration::from_millis(number("milliseconds")?)),
        "rate" => {
            let rate = match off_or("bytes per second or off")? {
                None => None,
                Some(n) => Some(
                    NonZeroU64::new(n)
                        .ok_or("rate 0 would stop all traffic; use `mode blackhole`")?,
                ),
            };
            handle.set_rate(rate);
        }
        "cut" => handle.set_cut_after(off_or("a byte count or off")?),
        "handshake" => match need("on or off")? {
            "on" => handle.set_handshake(true),
            "off" => handle.set_handshake(false),
            other => return Err(format!("handshake: {other:?} is not on or off")),
        },
        "mode" => {
            let mode = match need("forward, blackhole or refuse")? {
                "forward" => Mode::Forward,
                "blackhole" => Mode::Blackhole,
                "refuse" => Mode::Refuse,
                other => return Err(format!("mode: unknown mode {other:?}")),
            };
            handle.set_mode(mode).await.map_err(|e| e.to_string())?;
        }
        "reset" => handle.reset_all(),
        "stats" => {
            let s = handle.stats();
            return Ok(format!(
                "accepted={} active={} bytes_up={} bytes_down={} resets={} cuts={} upstream_failures={} listening={}",
                s.accepted, s.active, s.bytes_up, s.bytes_down, s.resets, s.cuts, s.upstream_failures, s.listening
            ));
        }
        "config" => {
            let c = handle.config();
            let opt = |v: Option<u64>| v.map_or("off".to_string(), |n| n.to_string());
            return Ok(format!(
                "mode={} delay_ms={} rate={} cut={} handshake={}",
                match c.mode {
                    Mode::Forward => "forward",
                    Mode::Blackhole => "blackhole",
                    Mode::Refuse => "refuse",
                },
                c.delay.as_millis(),
                opt(c.rate.map(NonZeroU64::get)),
                opt(c.cut_after),
                if c.handshake { "on" } else { "off" }
            ));
        }
        "" => return Err("empty command".into()),
        other => return Err(format!("unknown command {other:?}")),
    }
    Ok(String::new())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::{Proxy, ProxyConfig};

    #[tokio::test]
    async fn commands_change_the_config_and_bad_ones_say_why() {
        let up = std::net::SocketAddr::from(([127, 0, 0, 1], 9));
        let p = Proxy::start(up, ProxyConfig::default()).await.unwrap();
        let h = p.handle();
        assert_eq!(apply(&h, "delay 50").await, Ok(String::new()));
        assert_eq!(apply(&h, "rate 1000000").await, Ok(String::new()));
        assert_eq!(apply(&h, "cut 12345").await, Ok(String::new()));
        assert_eq!(apply(&h, "handshake off").await, Ok(String::new()));
        assert_eq!(apply(&h, "mode blackhole").await, Ok(String::new()));
        assert_eq!(
            apply(&h, "config").await.unwrap(),
            "mode=blackhole delay_ms=50 rate=1000000 cut=12345 handshake=off"
        );
        let c = h.config();
        assert_eq!(c.delay, Duration::from_millis(50));
        assert_eq!(c.rate, NonZeroU64::new(1_000_000));
        assert_eq!(c.cut_after, Some(12345));
        assert!(!c.handshake);
        assert_eq!(apply(&h, "rate off").await, Ok(String::new()));
        assert_eq!(apply(&h, "cut off").await, Ok(String::new()));
        assert_eq!(h.config().rate, None);
        assert_eq!(h.config().cut_after, None);
        assert!(apply(&h, "stats")
            .await
            .unwrap()
            .starts_with("accepted=0 active=0"));

        for bad in [
            "",
            "delay",
            "delay x",
            "rate 0",
            "mode sideways",
            "jump",
            "delay 1 2",
            "handshake maybe",
        ] {
            assert!(apply(&h, bad).await.is_err(), "{bad:?} accepted");
        }
    }
}
