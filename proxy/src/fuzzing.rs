//! The checks the data plane's fuzz targets run, one function per target (`fuzz/`): each
//! takes the fuzzer's bytes and panics on a broken property. They live here, not in the
//! targets, so `cargo test` replays every committed corpus file through the same code
//! ([`replay`]) and a crash once found stays fixed.

use std::path::{Path, PathBuf};

use rustls::pki_types::CertificateDer;

use crate::clienthello::{self, Progress};
use crate::config::{GatewayConfig, Mode};
use crate::identify::{identify, parse_uri, uri_san};
use crate::preface::{self, Fallback, Held};

/// A fuzz target's check: panics when a property breaks on `data`.
pub type Check = fn(&[u8]);

/// The data plane's fuzz targets and their checks, by target name.
pub const TARGETS: [(&str, Check); 4] = [
    ("clienthello", client_hello),
    ("identify", identify_certificate),
    ("gateway_config", gateway_config),
    ("h2_preface", h2_preface),
];

/// `clienthello`: [`clienthello::parse`] never panics, and never answers a prefix
/// differently from the whole: once a prefix is complete (or refused), more bytes cannot
/// change the answer. Inputs up to 4 KiB have every prefix checked (quadratic).
pub fn client_hello(data: &[u8]) {
    const PREFIX_CHECK_MAX: usize = 4096;
    let whole = clienthello::parse(data);
    if data.len() > PREFIX_CHECK_MAX {
        return;
    }
    for cut in 0..data.len() {
        match (clienthello::parse(&data[..cut]), &whole) {
            (Ok(Progress::Incomplete), _) => {}
            (Ok(Progress::Complete(early)), Ok(Progress::Complete(late))) => {
                assert_eq!(&early, late, "prefix of {cut} bytes");
                assert!(early.len <= cut, "len past the prefix");
            }
            (Err(early), Err(late)) => assert_eq!(early.reason(), late.reason()),
            (early, late) => panic!("prefix of {cut} bytes gave {early:?}, whole {late:?}"),
        }
    }
}

/// `identify`: [`identify`] never panics on arbitrary DER, nor [`parse_uri`] on arbitrary
/// text, and what `parse_uri` accepts survives a round trip through [`uri_san`].
pub fn identify_certificate(data: &[u8]) {
    let _ = identify(&CertificateDer::from(data));
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(peer) = parse_uri(text, Some("fallback"))
    {
        let again = parse_uri(&uri_san(&peer.pool, &peer.identity), None);
        assert_eq!(again.as_ref(), Ok(&peer), "{text:?}");
    }
}

/// `gateway_config`: [`GatewayConfig::parse`] never panics on any text; a refusal names at
/// least one fault, each with a field path and a message; and what it accepts keeps the
/// promises the rest of the gateway relies on (see [`accepted_config_holds`]).
pub fn gateway_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // A base that does not exist: the check reads no file the fuzzer could name.
    let base = Path::new("/nonexistent/bkpool-fuzz");
    match GatewayConfig::parse(text, base) {
        Ok(config) => accepted_config_holds(&config),
        Err(errors) => {
            assert!(!errors.0.is_empty(), "refused without a fault");
            for fault in &errors.0 {
                assert!(!fault.path.is_empty(), "a fault without a path: {fault:?}");
                assert!(!fault.message.is_empty(), "a fault without a message");
            }
            let _ = errors.to_string();
        }
    }
}

/// What a valid configuration guarantees: every pool reachable and routable the way its
/// mode needs, no pool twice, no host name in two pools, limits inside each other.
fn accepted_config_holds(config: &GatewayConfig) {
    let limits = &config.limits;
    assert!(limits.max_connections >= 1 && limits.max_handshakes >= 1);
    let mut ids = std::collections::HashSet::new();
    // A host name may repeat within a pool (harmless), never across two.
    let mut hosts = std::collections::HashMap::new();
    for pool in &config.pools {
        assert!(ids.insert(&pool.id), "pool {} twice", pool.id);
        for host in &pool.hostnames {
            let owner = *hosts.entry(host).or_insert(&pool.id);
            assert_eq!(owner, &pool.id, "host {host} routed to two pools");
            assert_eq!(
                host,
                &host.to_ascii_lowercase(),
                "host names are normalized"
            );
            assert!(!host.ends_with('.'), "{host}");
        }
        match pool.mode {
            Mode::Terminate => assert!(pool.client_ca.is_some(), "{}", pool.id),
            Mode::Passthrough => {
                assert!(pool.client_ca.is_none() && pool.backend_tls.is_none());
                assert!(!pool.hostnames.is_empty() && !pool.preface_while_waking);
            }
        }
        if let Some(max) = pool.max_connections {
            assert!(max <= limits.max_connections, "{}", pool.id);
            if let Some(per_identity) = pool.max_connections_per_identity {
                assert!(per_identity <= max, "{}", pool.id);
            }
        }
        assert!(!pool.connect_timeout.is_zero() && !pool.idle_timeout.is_zero());
    }
    if config.pools.iter().any(|p| p.mode == Mode::Terminate) {
        assert!(!config.server_certs.is_empty());
    }
}

/// `h2_preface`: a held connection's client bytes ([`Held`]) are parsed the same however they
/// arrive, and what is replayed to the backend is exactly the client's stream with at most
/// the one SETTINGS acknowledgement taken out. The first byte picks the read size (its low
/// bit puts the HTTP/2 connection preface in front, so the fuzzer starts past it); the rest is
/// the client's stream.
pub fn h2_preface(data: &[u8]) {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let stream = match control & 1 {
        1 => [&preface::CLIENT_MAGIC[..], rest].concat(),
        _ => rest.to_vec(),
    };
    let chunk = usize::from(control >> 1).max(1);
    let (whole, whole_result) = held(&stream, stream.len().max(1));
    let (split, split_result) = held(&stream, chunk);
    let full = |r: &Result<(), Fallback>| *r == Err(Fallback::BufferFull);
    // A full buffer depends on when the acknowledgement made room; anything else may not.
    if !full(&whole_result) && !full(&split_result) {
        assert_eq!(whole_result, split_result, "read in pieces of {chunk}");
        assert_eq!(whole.acknowledged(), split.acknowledged());
        assert_eq!(whole.spoke_h2(), split.spoke_h2());
        // After a fallback the rest is not read, so only a clean read has a whole replay.
        if whole_result.is_ok() {
            let acknowledged = whole.acknowledged();
            let (whole, split) = (whole.into_replay(), split.into_replay());
            assert_eq!(whole, split, "read in pieces of {chunk}");
            replay_is_the_stream_less_one_ack(&stream, &whole, acknowledged);
        }
    }
    let goaway = preface::goaway(&String::from_utf8_lossy(rest));
    let len = usize::from(goaway[0]) << 16 | usize::from(goaway[1]) << 8 | usize::from(goaway[2]);
    assert_eq!(len + 9, goaway.len(), "GOAWAY length");
}

/// Pushes `stream` in pieces of `chunk` until the first fallback, as the hold loop does.
fn held(stream: &[u8], chunk: usize) -> (Held, Result<(), Fallback>) {
    let mut held = Held::new(preface::DEFAULT_LIMIT);
    for piece in stream.chunks(chunk) {
        if let Err(e) = held.push(piece) {
            return (held, Err(e));
        }
    }
    (held, Ok(()))
}

fn replay_is_the_stream_less_one_ack(stream: &[u8], replay: &[u8], acknowledged: bool) {
    const ACK: usize = 9;
    if !acknowledged {
        assert_eq!(replay, stream, "nothing removed before the acknowledgement");
        return;
    }
    assert_eq!(
        replay.len() + ACK,
        stream.len(),
        "exactly one frame removed"
    );
    // The removed frame starts within the common prefix and ends where the common suffix
    // begins; where the bytes around it repeat, any such place will do.
    let prefix = replay
        .iter()
        .zip(stream)
        .take_while(|(a, b)| a == b)
        .count();
    let suffix = replay
        .iter()
        .rev()
        .zip(stream.iter().rev())
        .take_while(|(a, b)| a == b)
        .count();
    let first = replay.len() - suffix.min(replay.len());
    let removed_an_ack = (first..=prefix).any(|at| is_settings_ack(&stream[at..at + ACK]));
    assert!(removed_an_ack, "the frame removed is not a SETTINGS ACK");
}

/// A SETTINGS frame with the ACK flag, no payload, on stream 0 (the top bit is reserved).
fn is_settings_ack(header: &[u8]) -> bool {
    header[..3] == [0, 0, 0]
        && header[3] == 4
        && header[4] & 1 == 1
        && header[5] & 0x7f == 0
        && header[6..9] == [0, 0, 0]
}

/// The committed corpus file `name` of `target`.
pub fn seed(target: &str, name: &str) -> Vec<u8> {
    std::fs::read(corpus_dir(target).join(name)).unwrap_or_else(|e| panic!("{target}/{name}: {e}"))
}

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

/// Every committed corpus file of `target` from the repository's `fuzz/corpus/`: the
/// `seed-*` files (git ignores the hash-named files libFuzzer adds beside them; a crash worth
/// keeping is committed as `seed-crash-<what>`).
pub fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = corpus_dir(target);
    let entries =
        std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("fuzz corpus {}: {e}", dir.display()));
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("a corpus entry").path())
        .filter(|p| {
            p.is_file()
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("seed-"))
        })
        .collect();
    files.sort();
    files
}

/// Runs `check` over every committed corpus file of `target`, naming the file that fails.
/// Returns how many files it ran.
pub fn replay(target: &str, check: Check) -> usize {
    let files = corpus(target);
    for file in &files {
        let data = std::fs::read(file).unwrap();
        let run = std::panic::catch_unwind(|| check(&data));
        assert!(
            run.is_ok(),
            "fuzz target {target} fails on {}",
            file.display()
        );
    }
    files.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_data_plane_corpus_replays_clean() {
        for (target, check) in TARGETS {
            let ran = replay(target, check);
            assert!(
                ran >= 3,
                "{target}: only {ran} corpus files; seeds are missing"
            );
        }
    }

    /// The seeds start the fuzzer on both sides of each check, not only on refusals.
    #[test]
    fn the_seeds_reach_acceptance_and_refusal() {
        let config = |name| {
            let text = String::from_utf8(seed("gateway_config", name)).unwrap();
            GatewayConfig::parse(&text, Path::new("/nonexistent"))
        };
        assert!(config("seed-terminate.toml").is_ok());
        assert!(config("seed-passthrough.toml").is_ok());
        let faults = config("seed-many-faults.toml").unwrap_err().0;
        assert!(faults.len() >= 10, "{faults:?}");

        let preface = |name| {
            let data = seed("h2_preface", name);
            let stream = [&preface::CLIENT_MAGIC[..], &data[1..]].concat();
            held(&stream, usize::from(data[0] >> 1).max(1))
        };
        let (grpc, result) = preface("seed-grpc-go-bytewise");
        assert!(result.is_ok() && grpc.acknowledged());
        assert_eq!(
            preface("seed-frame-too-large").1,
            Err(Fallback::FrameTooLarge)
        );
        assert_eq!(preface("seed-bad-settings").1, Err(Fallback::BadSettings));
    }
}
