//! The gateway's TOML configuration is parsed and validated without panicking, refusals name
//! their fields, and what is accepted is consistent (`proxy::fuzzing::gateway_config`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| proxy::fuzzing::gateway_config(data));
