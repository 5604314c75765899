//! End-to-end: how `bkpool gateway` spreads one pool's connections over its backends. By
//! default (terminate mode) each caller identity returns to its own backend, where its build
//! cache is, until that backend carries more than `load_bound` × the average; with
//! `balance = "least-loaded"` identity plays no part.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use control::pki::testing::{TestClient, TestPki};
use support::backends::{self, Backend};
use support::{GatewayProcess, gateway};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

type Conn = BufReader<TlsStream<TcpStream>>;

const OPEN: &str = "bkpool_gateway_connections_open";

/// Three backends that say their name, behind one pool configured with `extra`.
async fn pool(extra: &str) -> (GatewayProcess, Vec<Backend>, Arc<TestPki>) {
    let pki = Arc::new(TestPki::new().pool("a"));
    let named = vec![
        backends::named("b0").await,
        backends::named("b1").await,
        backends::named("b2").await,
    ];
    let gw = gateway(&pki)
        .pool("a", named[0].addr)
        .and_backends(&[named[1].addr, named[2].addr])
        .with(extra)
        .start();
    (gw, named, pki)
}

/// Opens a connection as `client` and reads which backend took it.
async fn open(gw: &GatewayProcess, client: &TestClient) -> (String, Conn) {
    let mut conn = BufReader::new(gw.connect(client).await.expect("connect"));
    let mut name = String::new();
    conn.read_line(&mut name).await.expect("backend's name");
    (name.trim().to_owned(), conn)
}

#[tokio::test]
async fn each_caller_returns_to_its_backend() {
    let (gw, _backends, pki) = pool("").await;
    let mut homes = BTreeMap::new();
    for round in 0..3 {
        for repo in 0..12 {
            let client = pki.client("a", &format!("ci/repo-{repo}"));
            let (backend, conn) = open(&gw, &client).await;
            drop(conn);
            // Gone from the gateway's count too: a caller meets an idle pool, so only the
            // hash decides (the bound is tested below).
            gw.wait_metric(OPEN, &[("pool", "local/a")], 0.0).await;
            let home = homes.entry(repo).or_insert_with(|| backend.clone());
            assert_eq!(
                *home, backend,
                "repo-{repo} moved from {home} to {backend} in round {round}"
            );
        }
    }
    let used: BTreeSet<&String> = homes.values().collect();
    assert!(
        used.len() >= 2,
        "twelve callers hashed onto one backend: {homes:?}"
    );
}

#[tokio::test]
async fn a_busy_caller_spills_past_the_load_bound_and_no_backend_exceeds_it() {
    let (gw, _backends, pki) = pool("load_bound = 1.25").await;
    let client = pki.client("a", "ci/monorepo");
    let mut open_conns = Vec::new();
    let mut per_backend: BTreeMap<String, usize> = BTreeMap::new();
    for n in 0..9 {
        let (backend, conn) = open(&gw, &client).await;
        *per_backend.entry(backend.clone()).or_default() += 1;
        open_conns.push(conn);
        // ⌈1.25 × (n + 1) / 3⌉: the bound counting the connection just made.
        let bound = (1.25 * (n + 1) as f64 / 3.0).ceil() as usize;
        assert!(
            per_backend[&backend] <= bound,
            "{backend} carries {} of {} connections (bound {bound}): {per_backend:?}",
            per_backend[&backend],
            n + 1
        );
    }
    assert_eq!(
        per_backend.len(),
        3,
        "one caller spread over all: {per_backend:?}"
    );
}

#[tokio::test]
async fn least_loaded_ignores_the_caller() {
    let (gw, _backends, pki) = pool("balance = \"least-loaded\"").await;
    let mut open_conns = Vec::new();
    let mut per_backend: BTreeMap<String, usize> = BTreeMap::new();
    for repo in 0..9 {
        // One caller after another, each keeping its connection: an even spread whatever
        // their identities hash to.
        let client = pki.client("a", &format!("ci/repo-{}", repo % 2));
        let (backend, conn) = open(&gw, &client).await;
        *per_backend.entry(backend).or_default() += 1;
        open_conns.push(conn);
    }
    assert_eq!(
        per_backend.values().copied().collect::<Vec<_>>(),
        [3, 3, 3],
        "{per_backend:?}"
    );
}
