//! bkpool data plane.
//!
//! - [`names`]: pool, identity and backend newtypes.
//! - [`clienthello`]: SNI and ALPN from a ClientHello read without terminating TLS (passthrough).
//! - [`identify`]: pool and caller from a client certificate's URI SAN.
pub mod clienthello;
pub mod identify;
pub mod names;
