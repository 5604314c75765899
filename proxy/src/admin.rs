//! The admin HTTP endpoint: `/metrics` (OpenMetrics text), `/healthz`, `/readyz` (fails while
//! draining) and `/activity` (per-pool activity as JSON, for the control loop and `bkpool status`).

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::gateway::Gateway;

pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone)]
struct Admin {
    gateway: Arc<Gateway>,
    registry: Arc<Registry>,
}

/// The admin routes; callers may merge more (local mode adds its own).
pub fn router(gateway: Arc<Gateway>, registry: Arc<Registry>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/activity", get(activity))
        .with_state(Admin { gateway, registry })
}

/// Serves `router` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    if let Err(e) = axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
    {
        tracing::error!(error = %e, "admin endpoint failed");
    }
}

async fn metrics(State(admin): State<Admin>) -> Response {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &admin.registry) {
        Ok(()) => ([(header::CONTENT_TYPE, OPENMETRICS)], body).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn ready(State(admin): State<Admin>) -> Response {
    if admin.gateway.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else if !admin.gateway.routes_loaded() {
        (StatusCode::SERVICE_UNAVAILABLE, "routes not loaded yet\n").into_response()
    } else {
        "ready\n".into_response()
    }
}

/// Unavailable until the routes are loaded: a report listing no pools would read as "idle".
async fn activity(State(admin): State<Admin>) -> Response {
    if !admin.gateway.routes_loaded() {
        return (StatusCode::SERVICE_UNAVAILABLE, "routes not loaded yet\n").into_response();
    }
    axum::Json(admin.gateway.activity().snapshot()).into_response()
}
