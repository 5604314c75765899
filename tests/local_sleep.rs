//! End-to-end: `bkpool local` puts an idle pool to sleep in two phases (draining, then
//! stopped), a connection while draining is served by the still-running replica, an open but
//! silent connection keeps its pool awake, and `kill -9` of bkpool leaves no replica behind.

mod support;

use std::time::{Duration, Instant};

use control::health::Health;
use control::scale::Phase;
use support::local::{alive, local};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A stand-in pool idle after 1 s, draining for `settle` before it stops.
fn config(settle: &str) -> String {
    format!(
        "[scaling]\ndrain_settle = \"{settle}\"\n[[pool]]\nname = \"default\"\n\
         [pool.scaling]\nidle_after = \"1s\"\nmin_up_after_wake = \"0s\"\n\
         [pool.replica]\nstandin = true\nstop_grace = \"2s\"\n"
    )
}

async fn wait_no_replicas(bk: &support::local::Local) {
    for _ in 0..100 {
        if bk.replica_pids().is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("replicas still running: {:?}", bk.replica_pids());
}

#[tokio::test]
async fn an_idle_pool_drains_then_stops_its_replica() {
    let bk = local("31100-31109", &config("250ms"));
    let tls = bk.issue("default");
    assert_eq!(bk.health(&tls).await.unwrap(), Health::Serving);
    let closed = Instant::now();
    let pid = bk.replica_pids()[0];

    let draining = bk
        .wait_phase("default", Phase::Draining, Duration::from_secs(5))
        .await;
    assert!(alive(pid), "draining stops nothing yet");
    let asleep = bk
        .wait_phase("default", Phase::Sleeping, Duration::from_secs(5))
        .await;
    wait_no_replicas(&bk).await;
    let stopped = closed.elapsed();
    assert!(!alive(pid));
    assert!(
        draining >= Duration::from_millis(900),
        "not before idle_after: {draining:?}"
    );
    eprintln!(
        "idle_after 1s: draining after {draining:?}, asleep {asleep:?} later, replica gone {stopped:?} after the last connection closed"
    );
    let down = bk
        .metric(
            "bkpool_controller_scale_events_total",
            &[
                ("pool", "local/default"),
                ("direction", "down"),
                ("reason", "idle"),
            ],
        )
        .await;
    assert_eq!(down, 1.0);
    let sleeping = bk
        .metric(
            "bkpool_controller_pool_state",
            &[("pool", "local/default"), ("state", "sleeping")],
        )
        .await;
    assert_eq!(sleeping, 1.0);
}

#[tokio::test]
async fn a_connection_during_draining_is_served_without_a_restart() {
    // A long settle time keeps the pool draining long enough to connect during it.
    let bk = local("31110-31119", &config("3s"));
    let tls = bk.issue("default");
    assert_eq!(bk.health(&tls).await.unwrap(), Health::Serving);
    let pid = bk.replica_pids()[0];
    bk.wait_phase("default", Phase::Draining, Duration::from_secs(5))
        .await;

    assert_eq!(bk.health(&tls).await.unwrap(), Health::Serving);
    assert_eq!(
        bk.pool("default").await.state,
        Phase::Ready,
        "the drain was cancelled"
    );
    assert_eq!(bk.replica_pids(), [pid], "same replica, no restart");
    let cancelled = bk
        .metric(
            "bkpool_controller_drains_cancelled_total",
            &[("pool", "local/default")],
        )
        .await;
    assert_eq!(cancelled, 1.0);
    let up = bk
        .metric(
            "bkpool_controller_scale_events_total",
            &[
                ("pool", "local/default"),
                ("direction", "up"),
                ("reason", "wake"),
            ],
        )
        .await;
    assert_eq!(up, 1.0);
}

#[tokio::test]
async fn an_open_silent_connection_keeps_the_pool_awake() {
    let bk = local("31120-31129", &config("250ms"));
    let tls = bk.issue("default");
    let mut stream = bk.connect(&tls).await.unwrap();
    stream.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    stream.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    let pid = bk.replica_pids()[0];

    // Silent for three times idle_after.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pool = bk.pool("default").await;
    assert_eq!(pool.state, Phase::Ready, "{pool:?}");
    assert_eq!((pool.open, pool.replicas[0].load), (1, 1));
    assert!(alive(pid));

    // Still usable, then closed: the pool goes to sleep.
    stream.write_all(b"pong").await.unwrap();
    stream.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong");
    drop(stream);
    bk.wait_phase("default", Phase::Sleeping, Duration::from_secs(5))
        .await;
    wait_no_replicas(&bk).await;
}

#[tokio::test]
async fn kill_9_of_bkpool_leaves_no_replica_behind() {
    let mut bk = local("31130-31139", &config("250ms"));
    let tls = bk.issue("default");
    assert_eq!(bk.health(&tls).await.unwrap(), Health::Serving);
    let pids = bk.replica_pids();
    assert_eq!(pids.len(), 1);
    bk.child.kill().unwrap(); // SIGKILL
    bk.child.wait().unwrap();
    for _ in 0..100 {
        if !pids.iter().any(|p| alive(*p)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("replicas outlived bkpool: {pids:?}");
}

#[tokio::test]
async fn sigterm_drains_the_gateway_then_stops_replicas() {
    let mut bk = local("31140-31149", &config("250ms"));
    let tls = bk.issue("default");
    let mut stream = bk.connect(&tls).await.unwrap();
    stream.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    stream.read_exact(&mut buf).await.unwrap();
    let pids = bk.replica_pids();
    let term = std::process::Command::new("kill")
        .args(["-TERM", &bk.child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    // The open connection may finish during the drain: the replica still serves it.
    stream.write_all(b"last").await.unwrap();
    stream.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"last");
    drop(stream);
    let status = tokio::task::spawn_blocking(move || {
        let status = bk.child.wait().unwrap();
        (status, bk)
    })
    .await
    .unwrap()
    .0;
    assert!(status.success(), "{status:?}");
    assert!(
        pids.iter().all(|p| !alive(*p)),
        "replicas stopped: {pids:?}"
    );
}
