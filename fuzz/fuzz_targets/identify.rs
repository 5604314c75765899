//! `proxy::identify` never panics on arbitrary DER, nor `parse_uri` on arbitrary text, and
//! what `parse_uri` accepts survives a round trip (`proxy::fuzzing::identify_certificate`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| proxy::fuzzing::identify_certificate(data));
