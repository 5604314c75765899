//! What `/pools` serves on the admin endpoint, and `bkpool status` reads.

use axum::Router;
use axum::routing::get;
use serde::{Deserialize, Serialize};

use super::pool::Phase;
use super::scaler::Scaler;

/// One pool, as `/pools` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PoolStatus {
    pub pool: String,
    pub state: Phase,
    pub replicas: Vec<ReplicaStatus>,
    /// Authenticated connections open through this gateway.
    pub open: u64,
    /// Connections held waiting for a wake.
    pub held: u64,
    /// Unix time in milliseconds; 0 if the pool never saw an authenticated connection.
    pub last_activity_ms: u64,
    pub min_replicas: usize,
    pub max_replicas: usize,
    pub idle_after_seconds: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReplicaStatus {
    pub name: String,
    pub addr: String,
    /// Connections open to it.
    pub load: usize,
    /// Being retired: gets no new connections.
    pub retiring: bool,
}

/// The `/pools` body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Pools {
    pub pools: Vec<PoolStatus>,
}

/// `GET /pools`, to merge into the admin router.
pub fn router(scaler: Scaler) -> Router {
    Router::new().route(
        "/pools",
        get(move || {
            let pools = scaler.status();
            async move { axum::Json(Pools { pools }) }
        }),
    )
}
