//! `loadgen`: the load side of bkpool's comparative benchmarks.
//!
//! - `backend`    — plain-TCP sink and echo servers behind every proxy
//! - `tls`        — client TLS config (client cert, no resumption), raw ClientHello
//! - `connect`    — one client connection: TCP, then TLS or a raw ClientHello
//! - `throughput` — bulk Gbit/s over 1..N connections, upload or verified echo
//! - `handshakes` — full mTLS handshakes per second and per proxy core-second
//! - `latency`    — open-loop request/response percentiles at a fixed rate
//! - `idle`       — proxy memory per idle connection
//! - `procfs`     — the proxy's CPU time and memory from /proc
//! - `limits`     — raising RLIMIT_NOFILE
//! - `report`     — medians of interleaved rounds as a markdown table
//!
//! Every subcommand prints one JSON line; every run stops by itself.

mod backend;
mod connect;
mod handshakes;
mod idle;
mod latency;
mod limits;
mod procfs;
mod report;
mod throughput;
mod tls;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::backend::{Backend, Behaviour};
use crate::connect::Opening;
use crate::tls::TlsArgs;

#[derive(Debug, Parser)]
#[command(
    name = "loadgen",
    about = "Load generator and backends for bkpool's proxy comparison"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Backend that reads and discards everything.
    Sink(BackendArgs),
    /// Backend that writes back everything it reads.
    Echo(BackendArgs),
    /// Bulk throughput in Gbit/s.
    Throughput(ThroughputArgs),
    /// Full TLS handshakes (with client certificate, no resumption) per second.
    Handshakes(HandshakeArgs),
    /// Open-loop request/response latency at a fixed rate.
    Latency(LatencyArgs),
    /// Proxy memory per idle TLS connection.
    Idle(IdleArgs),
    /// Markdown table of medians from compare.sh's results (JSON lines).
    Report {
        /// Result files; `-` for standard input.
        files: Vec<PathBuf>,
    },
}

#[derive(Debug, Args)]
struct BackendArgs {
    #[arg(long)]
    listen: SocketAddr,
    /// Discard one TLS record (the passthrough load's ClientHello) first.
    #[arg(long)]
    skip_client_hello: bool,
    /// Stop by itself after this long.
    #[arg(long, default_value_t = 3600)]
    lifetime_seconds: u64,
}

#[derive(Debug, Args)]
struct Target {
    #[arg(long)]
    target: SocketAddr,
    #[command(flatten)]
    tls: TlsArgs,
    /// Send a real ClientHello with this SNI, then raw bytes (passthrough).
    #[arg(long, conflicts_with = "tls")]
    client_hello: Option<String>,
}

#[derive(Debug, Args)]
struct ThroughputArgs {
    #[command(flatten)]
    target: Target,
    #[arg(long, default_value_t = 1)]
    conns: usize,
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    #[arg(long, value_enum, default_value = "upload")]
    mode: throughput::Mode,
    /// The proxy's processes (comma-separated), for CPU time.
    #[arg(long, value_delimiter = ',')]
    pid: Vec<u32>,
}

#[derive(Debug, Args)]
struct HandshakeArgs {
    #[command(flatten)]
    target: Target,
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// The proxy's processes (comma-separated), for CPU time.
    #[arg(long, value_delimiter = ',')]
    pid: Vec<u32>,
}

#[derive(Debug, Args)]
struct LatencyArgs {
    #[command(flatten)]
    target: Target,
    /// Requests per second, over all connections.
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    /// Request (and response) size in bytes.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Not recorded, before the measured seconds.
    #[arg(long, default_value_t = 1.0)]
    warmup_seconds: f64,
    #[arg(long, default_value_t = 8)]
    conns: usize,
}

#[derive(Debug, Args)]
struct IdleArgs {
    #[command(flatten)]
    target: Target,
    #[arg(long, default_value_t = 1000)]
    conns: usize,
    /// Connections opened at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// How long the connections sit idle before memory is read.
    #[arg(long, default_value_t = 3.0)]
    settle_seconds: f64,
    /// The proxy's processes (comma-separated).
    #[arg(long, value_delimiter = ',', required = true)]
    pid: Vec<u32>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The load side is pinned to one core: one thread is all it can use.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let json = match cli.command {
        Command::Sink(args) => return runtime.block_on(serve(args, Behaviour::Sink)),
        Command::Echo(args) => return runtime.block_on(serve(args, Behaviour::Echo)),
        Command::Throughput(args) => {
            let plan = throughput::Plan {
                target: args.target.target,
                conns: args.conns,
                duration: seconds(args.seconds),
                mode: args.mode,
                pids: args.pid,
            };
            let opening = opening(&args.target)?;
            serde_json::to_string(&runtime.block_on(throughput::run(plan, opening))?)?
        }
        Command::Handshakes(args) => {
            let plan = handshakes::Plan {
                target: args.target.target,
                concurrency: args.concurrency,
                duration: seconds(args.seconds),
                pids: args.pid,
            };
            let opening = opening(&args.target)?;
            serde_json::to_string(&runtime.block_on(handshakes::run(plan, opening))?)?
        }
        Command::Latency(args) => {
            let plan = latency::Plan {
                target: args.target.target,
                rate: args.rate,
                size: args.size,
                conns: args.conns,
                duration: seconds(args.seconds),
                warmup: seconds(args.warmup_seconds),
            };
            let tls = args.target.tls.client()?;
            serde_json::to_string(&latency::run(plan, tls)?)?
        }
        Command::Idle(args) => {
            let nofile = limits::raise_nofile().context("raising RLIMIT_NOFILE")?;
            anyhow::ensure!(
                (args.conns as u64) < nofile,
                "{} connections need more than the open-file limit {nofile}",
                args.conns
            );
            let plan = idle::Plan {
                target: args.target.target,
                conns: args.conns,
                concurrency: args.concurrency,
                settle: seconds(args.settle_seconds),
                pids: args.pid,
            };
            let opening = opening(&args.target)?;
            serde_json::to_string(&runtime.block_on(idle::run(plan, opening))?)?
        }
        Command::Report { files } => {
            print!("{}", report_from(&files)?);
            return Ok(());
        }
    };
    println!("{json}");
    Ok(())
}

async fn serve(args: BackendArgs, behaviour: Behaviour) -> anyhow::Result<()> {
    limits::raise_nofile().context("raising RLIMIT_NOFILE")?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    println!(
        "{}",
        serde_json::json!({ "listening": listener.local_addr()? })
    );
    let backend = Backend {
        behaviour,
        skip_client_hello: args.skip_client_hello,
    };
    backend
        .run(listener, Duration::from_secs(args.lifetime_seconds))
        .await?;
    Ok(())
}

fn opening(target: &Target) -> anyhow::Result<Opening> {
    if let Some(sni) = &target.client_hello {
        return Ok(Opening::Hello(tls::client_hello(sni)?));
    }
    Ok(match target.tls.client()? {
        Some(client) => Opening::Tls(client),
        None => Opening::Plain,
    })
}

fn seconds(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

fn report_from(files: &[PathBuf]) -> anyhow::Result<String> {
    let mut lines = Vec::new();
    for file in files {
        let reader: Box<dyn BufRead> = if file.as_os_str() == "-" {
            Box::new(std::io::stdin().lock())
        } else {
            let f =
                std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
            Box::new(BufReader::new(f))
        };
        for (n, line) in reader.lines().enumerate() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            let parsed = serde_json::from_str(&line)
                .with_context(|| format!("{}:{}: not a result line", file.display(), n + 1))?;
            lines.push(parsed);
        }
    }
    let table = report::Table::from_lines(lines);
    Ok(format!(
        "{}\nTargets for bkpool:\n\n{}",
        table.markdown(),
        table.targets()
    ))
}
