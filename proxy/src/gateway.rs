//! The gateway: shared state (routes, TLS, admission, activity, metrics), the accept loop with
//! back-off when file descriptors run out, and the graceful drain.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use prometheus_client::registry::Registry;
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::activity::Activity;
use crate::admit::{Admission, HoldLimits};
use crate::connection;
use crate::metrics::Metrics;
use crate::route::Routes;

/// Gateway-wide settings that are not per pool.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub max_connections: usize,
    pub max_handshakes: usize,
    pub max_handshakes_per_source: usize,
    pub hold_limits: HoldLimits,
    pub max_client_hello_bytes: usize,
    /// From accept to a complete ClientHello; the handshake timeout bounds the rest.
    pub client_hello_timeout: Duration,
    pub handshake_timeout: Duration,
    pub drain_timeout: Duration,
}

/// Everything connections share. Routes and TLS are swapped whole; readers take a snapshot.
pub struct Gateway {
    pub(crate) routes: ArcSwap<Routes>,
    pub(crate) tls: ArcSwapOption<ServerConfig>,
    pub(crate) admission: Arc<Admission>,
    pub(crate) activity: Arc<Activity>,
    pub(crate) metrics: Metrics,
    pub(crate) settings: Settings,
    draining: AtomicBool,
    /// False until whoever feeds the routes has loaded them once (a Kubernetes gateway before
    /// its first watch sync): readiness and `/activity` fail meanwhile, so neither clients nor
    /// the scaler take an empty table for the truth.
    routes_loaded: AtomicBool,
}

impl Gateway {
    /// A gateway with its metrics registered in `registry`.
    pub fn new(
        settings: Settings,
        routes: Routes,
        tls: Option<Arc<ServerConfig>>,
        registry: &mut Registry,
    ) -> Arc<Self> {
        let admission = Admission::new(settings.max_connections, settings.max_handshakes);
        admission.set_max_handshakes_per_source(settings.max_handshakes_per_source);
        admission.set_hold_limits(settings.hold_limits);
        admission.set_max_client_hello_bytes(settings.max_client_hello_bytes);
        let activity = Arc::new(Activity::default());
        let metrics = Metrics::register(registry, activity.clone(), admission.clone());
        Arc::new(Self {
            routes: ArcSwap::from_pointee(routes),
            tls: ArcSwapOption::new(tls),
            admission,
            activity,
            metrics,
            settings,
            draining: AtomicBool::new(false),
            routes_loaded: AtomicBool::new(true),
        })
    }

    /// Replaces the route table. Connections already open keep the routes they started with;
    /// activity and limits of pools that left are forgotten.
    pub fn set_routes(&self, routes: Routes) {
        self.activity.retain(|id| routes.pool(id).is_some());
        self.admission.retain_pools(|id| routes.pool(id).is_some());
        self.routes.store(Arc::new(routes));
    }

    /// Replaces the terminate-mode TLS configuration; new handshakes use it at once.
    pub fn set_tls(&self, config: Option<Arc<ServerConfig>>) {
        self.tls.store(config);
    }

    pub fn routes(&self) -> Arc<Routes> {
        self.routes.load_full()
    }

    pub fn activity(&self) -> &Arc<Activity> {
        &self.activity
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn admission(&self) -> &Arc<Admission> {
        &self.admission
    }

    /// Marks the routes as (not yet) loaded; see the field.
    pub fn set_routes_loaded(&self, loaded: bool) {
        self.routes_loaded.store(loaded, Ordering::Relaxed);
    }

    pub fn routes_loaded(&self) -> bool {
        self.routes_loaded.load(Ordering::Relaxed)
    }

    /// True once shutdown has begun: readiness fails and nothing new is accepted.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Accepts connections until `shutdown` completes, then drains: stops accepting, lets
    /// open connections finish for up to the drain timeout, and closes the rest.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        let tracker = TaskTracker::new();
        let cancel = CancellationToken::new();
        let mut backoff = Backoff::default();
        tokio::pin!(shutdown);
        loop {
            let accepted = tokio::select! {
                biased;
                () = &mut shutdown => break,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((tcp, peer)) => {
                    backoff.reset();
                    let Ok(slot) = self.admission.connection() else {
                        self.metrics
                            .rejected(None, crate::admit::Refused::GlobalLimit.reason());
                        continue;
                    };
                    let (gateway, cancel) = (self.clone(), cancel.clone());
                    tracker.spawn(async move {
                        tokio::select! {
                            () = connection::handle(&gateway, tcp, peer, slot) => {}
                            () = cancel.cancelled() => {}
                        }
                    });
                }
                Err(e) if runs_out_of_descriptors(&e) => {
                    self.metrics.rejected(None, "accept_fd_exhausted");
                    let pause = backoff.next();
                    tracing::warn!(error = %e, ?pause, "accept failed: out of file descriptors; pausing");
                    tokio::time::sleep(pause).await;
                }
                Err(e) => tracing::debug!(error = %e, "accept failed"),
            }
        }
        self.drain(listener, tracker, cancel).await;
    }

    async fn drain(&self, listener: TcpListener, tracker: TaskTracker, cancel: CancellationToken) {
        self.draining.store(true, Ordering::Relaxed);
        drop(listener);
        tracker.close();
        let open = tracker.len();
        tracing::info!(open, deadline = ?self.settings.drain_timeout, "draining");
        if tokio::time::timeout(self.settings.drain_timeout, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                open = tracker.len(),
                "drain deadline passed; closing the remaining connections"
            );
            cancel.cancel();
            tracker.wait().await;
        }
        tracing::info!("drained");
    }

    /// Marks the gateway as draining ahead of shutdown (readiness fails at once).
    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }
}

/// EMFILE/ENFILE (and memory pressure) make accept fail at once, again and again: pause
/// instead of spinning, so open connections can close and free descriptors.
fn runs_out_of_descriptors(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

#[derive(Debug)]
struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Self(Duration::from_millis(5))
    }
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let now = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(1));
        now
    }

    fn reset(&mut self) {
        *self = Self::default();
    }
}

/// The global connection limit the process can actually hold: each proxied connection takes
/// two descriptors (client and backend), and splice borrows pipes (two descriptors each)
/// while bytes move. Keeps a reserve for listeners, files and the runtime.
pub fn fd_connection_limit(wanted: usize) -> (usize, u64) {
    let soft = raise_nofile_limit();
    const RESERVE: u64 = 128;
    let by_fds = (soft.saturating_sub(RESERVE) / 2) as usize;
    (wanted.min(by_fds), soft)
}

/// Raises the soft open-files limit to the hard limit (as servers commonly do) and returns it.
fn raise_nofile_limit() -> u64 {
    nofile::get_and_raise()
}

mod nofile {
    #![allow(unsafe_code)]
    //! getrlimit/setrlimit for RLIMIT_NOFILE: the one libc call the accept path needs.

    pub fn get_and_raise() -> u64 {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `lim` is a valid, exclusively borrowed rlimit for the call's duration.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            // SAFETY: `raised` is a valid rlimit read by the call only.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
        lim.rlim_cur
    }
}
