//! A `BuildKitPool` (JSON) is validated without panicking, every fault names its field, and a
//! valid pool renders its children (`control::fuzzing::crd_spec`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| control::fuzzing::crd_spec(data));
