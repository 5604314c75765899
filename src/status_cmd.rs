//! `bkpool status [--admin ADDR]`: the pools of a running `bkpool local`, as a table read
//! from its admin endpoint's `/pools`.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use control::scale::status::{PoolStatus, Pools};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(clap::Args)]
pub struct Args {
    /// Admin address of the running `bkpool local`.
    #[arg(long, default_value = proxy::config::DEFAULT_ADMIN, env = "BKPOOL_ADMIN")]
    admin: SocketAddr,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let body = get(args.admin, "/pools").await.with_context(|| {
        format!(
            "asking {} for /pools (is `bkpool local` running?)",
            args.admin
        )
    })?;
    let pools: Pools = serde_json::from_str(&body).context("reading /pools")?;
    print!("{}", table(&pools.pools, now_ms()));
    Ok(())
}

/// The table `bkpool status` prints: one line per pool, one indented line per replica.
pub fn table(pools: &[PoolStatus], now_ms: u64) -> String {
    let mut out = format!(
        "{:<24} {:<9} {:>8} {:>5} {:>5}  {}\n",
        "POOL", "STATE", "REPLICAS", "OPEN", "HELD", "LAST ACTIVITY"
    );
    for p in pools {
        let last = match p.last_activity_ms {
            0 => "never".to_string(),
            at => format!("{} ago", ago(now_ms.saturating_sub(at))),
        };
        let state = serde_json::to_value(p.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "{:<24} {:<9} {:>8} {:>5} {:>5}  {}",
            p.pool,
            state,
            format!("{}/{}", p.replicas.len(), p.max_replicas),
            p.open,
            p.held,
            last
        );
        for r in &p.replicas {
            let retiring = if r.retiring { "  (retiring)" } else { "" };
            let _ = writeln!(
                out,
                "  {:<8} {:<21} {} connection(s){retiring}",
                r.name, r.addr, r.load
            );
        }
    }
    out
}

fn ago(ms: u64) -> String {
    let d = Duration::from_millis(ms);
    match d.as_secs() {
        0 => format!("{ms}ms"),
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s => format!("{}h", s / 3600),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A minimal HTTP/1.1 GET: the admin endpoint is local and answers with a length.
async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut tcp = tokio::net::TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: bkpool\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    tcp.read_to_end(&mut raw).await?;
    let text = String::from_utf8(raw).context("response is not UTF-8")?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    let status = head.split_whitespace().nth(1).unwrap_or("");
    anyhow::ensure!(status == "200", "{path} answered {status}");
    Ok(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use control::scale::Phase;
    use control::scale::status::ReplicaStatus;

    #[test]
    fn the_table_shows_state_replicas_and_connections() {
        let pools = [PoolStatus {
            pool: "local/default".into(),
            state: Phase::Ready,
            replicas: vec![ReplicaStatus {
                name: "r0".into(),
                addr: "127.0.0.1:20000".into(),
                load: 2,
                retiring: false,
            }],
            open: 2,
            held: 0,
            last_activity_ms: 10_000,
            min_replicas: 0,
            max_replicas: 1,
            idle_after_seconds: 600.0,
        }];
        let t = table(&pools, 13_000);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("POOL"), "{t}");
        assert!(
            lines[1].starts_with("local/default") && lines[1].contains("ready"),
            "{t}"
        );
        assert!(
            lines[1].contains("1/1") && lines[1].ends_with("3s ago"),
            "{t}"
        );
        assert!(
            lines[2].contains("r0 ") && lines[2].contains("127.0.0.1:20000 "),
            "{t}"
        );
        assert!(lines[2].ends_with(" 2 connection(s)"), "{t}");
    }
}
