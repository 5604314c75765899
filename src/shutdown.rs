//! Process signals: SIGTERM or SIGINT begins a graceful drain.

use tokio::signal::unix::{SignalKind, signal};

/// Completes on the first SIGTERM or SIGINT.
pub async fn requested() {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = int.recv() => tracing::info!("SIGINT: draining"),
    }
}
