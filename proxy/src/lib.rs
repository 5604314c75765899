//! bkpool data plane.
//!
//! - [`names`]: pool, identity and backend newtypes.
//! - [`identify`]: pool and caller from a client certificate's URI SAN.
pub mod identify;
pub mod names;
