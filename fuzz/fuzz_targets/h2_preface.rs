//! A held connection's HTTP/2 frames are parsed the same however they arrive, and replayed
//! less the one SETTINGS acknowledgement (`proxy::fuzzing::h2_preface`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| proxy::fuzzing::h2_preface(data));
