//! bkpool data plane: one listener serving many pools, each connection taken through
//! admit → handshake → authorize → route → connect → relay (see [`connection`]).
//!
//! - [`config`]: the gateway's TOML configuration, validated with field paths.
//! - [`names`]: pool, identity and backend newtypes.
//! - [`gateway`]: shared state, the accept loop, back-off and graceful drain.
//! - [`connection`]: one connection's life, top to bottom.
//! - [`admit`]: connection and handshake limits as RAII permits.
//! - [`handshake`]: TLS termination, or SNI routing for passthrough.
//! - [`hold`]: a connection held while its pool wakes: the client watched, h2 answered.
//! - [`clienthello`]: reads a ClientHello's SNI without terminating TLS.
//! - [`tls`]: certificate loading, SNI certificate choice, per-pool client verification.
//! - [`identify`]: pool and caller from a client certificate's URI SAN.
//! - [`verified`]: a bounded memo of client certificate chains already verified.
//! - [`credentials`]: hot reload of certificates and CA bundles from files.
//! - [`route`]: the route table and where backends come from.
//! - [`connect`]: backend dial with fallback, optional backend mTLS.
//! - [`preface`]: the HTTP/2 server preface answered while a connection is held (h2 wakes).
//! - [`relay`]: moves bytes client ↔ backend (splice or pooled copy), half-close, resets, idle.
//! - [`affinity`]: cache-affine backend choice (consistent hashing with bounded loads).
//! - [`activity`]: lock-free per-pool activity for the control loop.
//! - [`metrics`]: Prometheus metrics.
//! - [`fuzzing`]: the checks the fuzz targets run, replayed over their corpus by `cargo test`.
//! - [`admin`]: `/metrics`, `/healthz`, `/readyz`, `/activity`.
//! - `testing` (feature `test-util`): TLS fixtures over loopback for tests and examples.
//! - [`server`]: starts a whole gateway from a configuration (credentials first, then bind).
pub mod activity;
pub mod admin;
pub mod admit;
pub mod affinity;
pub mod clienthello;
pub mod config;
pub mod connect;
pub mod connection;
pub mod credentials;
#[doc(hidden)]
pub mod fuzzing;
pub mod gateway;
pub mod handshake;
pub mod hold;
pub mod identify;
pub mod metrics;
pub mod names;
pub mod preface;
pub mod relay;
pub mod route;
pub mod server;
#[cfg(any(test, feature = "test-util"))]
pub mod testing;
pub mod tls;
pub mod verified;
