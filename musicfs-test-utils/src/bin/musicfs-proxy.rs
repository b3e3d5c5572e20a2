//! `musicfs-proxy`: the fault-injecting TCP proxy of `musicfs-test-utils`
//! for shell scripts (benchmarks, torture runs).
//!
//! `musicfs-proxy --listen 127.0.0.1:P --upstream 127.0.0.1:Q [--delay-ms N]
//! [--rate BYTES_PER_SEC] [--cut-after BYTES] [--no-handshake]
//! [--control 127.0.0.1:C]` prints `listen ADDR` and `control ADDR` (the
//! bound addresses, so port 0 works) on stdout and runs until it is killed
//! (SIGTERM or SIGINT). While it runs, `musicfs-proxy ctl --control ADDR
//! COMMAND...` sends control commands (see the library's
//! `proxy::control`: `delay MS`, `rate N|off`, `cut N|off`,
//! `handshake on|off`, `mode forward|blackhole|refuse`, `reset`, `stats`,
//! `config`) and prints each answer; it exits with 1 if one is an error.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::num::NonZeroU64;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use musicfs_test_utils::proxy::{control, Proxy, ProxyConfig};

#[derive(Debug, Parser)]
#[command(
    name = "musicfs-proxy",
    about = "A TCP proxy on loopback with delay, bandwidth cap, cuts, resets, blackhole and refuse, switchable while it runs",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Sends control commands to a running proxy and prints the answers.
    Ctl {
        /// The proxy's control address.
        #[arg(long)]
        control: SocketAddr,
        /// Commands, e.g. 'mode blackhole' 'delay 50' stats.
        #[arg(required = true)]
        commands: Vec<String>,
    },
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Where clients connect (loopback; port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The server to forward to (loopback).
    #[arg(long)]
    upstream: Option<SocketAddr>,
    /// One-way delay in milliseconds (round trip = twice this).
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Bandwidth cap per direction in bytes/s, shared by all connections.
    #[arg(long)]
    rate: Option<NonZeroU64>,
    /// Close each connection after this many bytes reached the client.
    #[arg(long)]
    cut_after: Option<u64>,
    /// New connections do not pay the TCP handshake's round trips.
    #[arg(long)]
    no_handshake: bool,
    /// The control port's address (loopback; port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    control: SocketAddr,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Ctl { control, commands }) => ctl(control, &commands),
        None => match cli.run.upstream {
            Some(upstream) => run(&cli.run, upstream),
            None => {
                eprintln!("musicfs-proxy: --upstream is required (or use `musicfs-proxy ctl`)");
                ExitCode::from(2)
            }
        },
    }
}

fn run(args: &RunArgs, upstream: SocketAddr) -> ExitCode {
    if !args.control.ip().is_loopback() {
        eprintln!("musicfs-proxy: --control must be a loopback address");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("musicfs-proxy: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let config = ProxyConfig {
        delay: Duration::from_millis(args.delay_ms),
        rate: args.rate,
        cut_after: args.cut_after,
        handshake: !args.no_handshake,
        ..ProxyConfig::default()
    };
    runtime.block_on(async {
        let proxy = match Proxy::start_on(args.listen, upstream, config).await {
            Ok(p) => p,
            Err(e) => {
                eprintln!("musicfs-proxy: {e}");
                return ExitCode::FAILURE;
            }
        };
        let control_listener = match tokio::net::TcpListener::bind(args.control).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!(
                    "musicfs-proxy: binding the control port {}: {e}",
                    args.control
                );
                return ExitCode::FAILURE;
            }
        };
        let control_addr = control_listener.local_addr().unwrap_or(args.control);
        println!("listen {}", proxy.addr());
        println!("control {control_addr}");
        let _ = std::io::stdout().flush();
        let control_task = tokio::spawn(control::serve(control_listener, proxy.handle()));
        wait_for_signal().await;
        control_task.abort();
        drop(proxy);
        ExitCode::SUCCESS
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        // Without signal handlers the default action still ends the
        // process on SIGTERM/SIGINT.
        _ => std::future::pending().await,
    }
}

fn ctl(control: SocketAddr, commands: &[String]) -> ExitCode {
    let stream = match std::net::TcpStream::connect_timeout(&control, Duration::from_secs(10)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("musicfs-proxy ctl: cannot reach the control port {control}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(e) => {
            eprintln!("musicfs-proxy ctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut reader = BufReader::new(stream);
    let mut failed = false;
    for command in commands {
        let mut answer = String::new();
        let sent = writeln!(writer, "{command}").and_then(|()| reader.read_line(&mut answer));
        match sent {
            Ok(n) if n > 0 => {
                print!("{answer}");
                failed |= answer.starts_with("error");
            }
            Ok(_) => {
                eprintln!("musicfs-proxy ctl: the proxy closed the control connection");
                return ExitCode::FAILURE;
            }
            Err(e) => {
                eprintln!("musicfs-proxy ctl: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
