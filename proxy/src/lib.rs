//! bkpool data plane.
//!
//! - [`names`]: pool, identity and backend newtypes.
//! - [`identify`]: pool and caller from a client certificate's URI SAN.
//! - [`relay`]: moves bytes client ↔ backend (splice or pooled copy), half-close, resets, idle.
pub mod identify;
pub mod names;
pub mod relay;
