//! Starting a whole gateway from a configuration: load and check every credential, build the
//! routes, and only then bind the listeners — a bad configuration never binds a port.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::admit::HoldLimits;
use crate::config::{GatewayConfig, Mode, PoolConfig};
use crate::credentials::{self, Credentials};
use crate::gateway::{self, Gateway, Settings};
use crate::route::{BackendTlsClient, PoolRoute, Routes, StaticUpstream, Upstream};
use crate::tls::{self, TlsError};

/// Why a gateway did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Tls(#[from] TlsError),
    #[error("pool {pool}: backend_tls.server_name {name:?} is not a valid server name")]
    ServerName { pool: String, name: String },
    #[error("binding the {what} address {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A running gateway.
pub struct Running {
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub gateway: Arc<Gateway>,
    pub registry: Arc<Registry>,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

/// Chooses the upstream of each configured pool.
pub type UpstreamFactory = Box<dyn Fn(&PoolConfig) -> Arc<dyn Upstream> + Send>;

/// How pools get their backends, and what else the admin endpoint serves.
pub struct Options {
    pub upstream: UpstreamFactory,
    pub admin_routes: Router,
    /// Extra metrics registered next to the gateway's (the control loop's, in local mode).
    pub registry: Registry,
    /// Routes come later through [`Gateway::set_routes`]: not ready until
    /// [`Gateway::set_routes_loaded`] says so.
    pub routes_later: bool,
}

impl Default for Options {
    /// Static backends from the configuration: the standalone gateway.
    fn default() -> Self {
        Self {
            upstream: Box::new(|pool| Arc::new(StaticUpstream::new(&pool.backends))),
            admin_routes: Router::new(),
            registry: Registry::default(),
            routes_later: false,
        }
    }
}

/// Loads everything `config` names, binds its listeners and starts serving.
pub async fn start(config: &GatewayConfig, options: Options) -> Result<Running, StartError> {
    let credentials = load_credentials(config)?;
    let tls = credentials.server_config()?;
    let mut routes = Vec::new();
    for pool in &config.pools {
        routes.push(PoolRoute::from_config(
            pool,
            (options.upstream)(pool),
            backend_tls(pool)?,
        ));
    }
    let (max_connections, nofile) = gateway::fd_connection_limit(config.limits.max_connections);
    tracing::info!(
        max_connections,
        configured = config.limits.max_connections,
        open_files_limit = nofile,
        "connection limit"
    );

    let listener = bind("gateway", config.listen).await?;
    let admin_listener = bind("admin", config.admin).await?;
    let (listen, admin) = (local_addr(&listener), local_addr(&admin_listener));

    let mut registry = options.registry;
    let settings = Settings {
        max_connections,
        max_handshakes: config.limits.max_handshakes,
        max_handshakes_per_source: config.limits.max_handshakes_per_source,
        hold_limits: HoldLimits {
            per_source: config.limits.max_held_per_source,
            unauthenticated_per_pool: config.limits.max_held_unauthenticated,
        },
        max_client_hello_bytes: config.limits.max_client_hello_bytes,
        client_hello_timeout: config.timeouts.client_hello,
        handshake_timeout: config.timeouts.handshake,
        drain_timeout: config.timeouts.drain,
    };
    let gateway = Gateway::new(settings, Routes::new(routes), tls, &mut registry);
    gateway.set_routes_loaded(!options.routes_later);
    let registry = Arc::new(registry);
    let shutdown = CancellationToken::new();
    let admin_router =
        crate::admin::router(gateway.clone(), registry.clone()).merge(options.admin_routes);
    // The admin endpoint outlives the drain, so readiness reports it; it stops once the
    // gateway has closed its last connection.
    let admin_stop = CancellationToken::new();
    let serving = gateway
        .clone()
        .serve(listener, shutdown.clone().cancelled_owned());
    let drained = admin_stop.clone();
    let tasks = vec![
        tokio::spawn(async move {
            serving.await;
            drained.cancel();
        }),
        tokio::spawn(crate::admin::serve(
            admin_listener,
            admin_router,
            admin_stop.clone().cancelled_owned(),
        )),
        tokio::spawn(credentials::watch(credentials, gateway.clone(), admin_stop)),
    ];
    tracing::info!(%listen, %admin, pools = config.pools.len(), "gateway listening");
    Ok(Running {
        listen,
        admin,
        gateway,
        registry,
        shutdown,
        tasks,
    })
}

impl Running {
    /// Begins the graceful drain and waits for it (bounded by the drain timeout).
    pub async fn shutdown(self) {
        self.gateway.begin_drain();
        self.shutdown.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
    }

    /// A token that, when cancelled, starts the same drain as [`Running::shutdown`].
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }
}

/// Loads and checks every file `config` names, as [`start`] would, without binding anything.
pub fn check(config: &GatewayConfig) -> Result<(), StartError> {
    load_credentials(config)?.server_config()?;
    for pool in &config.pools {
        backend_tls(pool)?;
    }
    Ok(())
}

fn load_credentials(config: &GatewayConfig) -> Result<Credentials, StartError> {
    let pool_cas: Vec<_> = config
        .pools
        .iter()
        .filter(|p| p.mode == Mode::Terminate)
        .filter_map(|p| p.client_ca.clone().map(|ca| (p.id.clone(), ca)))
        .collect();
    Ok(Credentials::load(&config.server_certs, &pool_cas)?)
}

fn backend_tls(pool: &PoolConfig) -> Result<Option<BackendTlsClient>, StartError> {
    let Some(b) = &pool.backend_tls else {
        return Ok(None);
    };
    let config = tls::backend_client_config(&b.ca, &b.cert, &b.key)?;
    let server_name = match &b.server_name {
        None => None,
        Some(name) => Some(
            rustls::pki_types::ServerName::try_from(name.clone()).map_err(|_| {
                StartError::ServerName {
                    pool: pool.id.to_string(),
                    name: name.clone(),
                }
            })?,
        ),
    };
    Ok(Some(BackendTlsClient {
        config,
        server_name,
    }))
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    };
    let bind = |socket: tokio::net::TcpSocket| -> std::io::Result<TcpListener> {
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(4096)
    };
    socket
        .and_then(bind)
        .map_err(|source| StartError::Bind { what, addr, source })
}

fn local_addr(listener: &TcpListener) -> SocketAddr {
    listener
        .local_addr()
        .expect("a bound listener has an address")
}
