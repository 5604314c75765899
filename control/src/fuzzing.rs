//! The checks the control plane's fuzz targets run, one function per target (`fuzz/`), kept
//! here so `cargo test` replays every committed corpus file through the same code (see
//! `proxy::fuzzing`, which also holds the corpus reader).

use std::sync::OnceLock;
use std::time::Duration;

use proxy::identify::identify;
use proxy::names::{ClientIdentity, PoolId};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::crd::{BuildKitPool, validate};
use crate::operator::{buildkitd, service};
use crate::pki::Ca;
use crate::pki::csr::{self, CsrError};

/// The control plane's fuzz targets and their checks, by target name.
pub const TARGETS: [(&str, proxy::fuzzing::Check); 3] = [
    ("token", crate::auth::fuzz_token),
    ("crd_spec", crd_spec),
    ("csr", csr_request),
];

/// `crd_spec`: a `BuildKitPool` as the API server hands it over (JSON) is validated without
/// panicking; every fault names a `spec.` field and says what is wrong; and a pool with no
/// fault renders its buildkitd.toml (valid TOML) and its Service without panicking.
pub fn crd_spec(data: &[u8]) {
    let Ok(pool) = serde_json::from_slice::<BuildKitPool>(data) else {
        return;
    };
    let faults = validate::validate_pool(&pool);
    for fault in &faults {
        assert!(fault.path.starts_with("spec."), "{fault}");
        assert!(!fault.message.is_empty(), "{fault}");
    }
    assert_eq!(faults, validate::validate_pool(&pool), "validation is pure");
    let _ = validate::summary(&faults);
    if faults.is_empty() {
        let data = buildkitd::desired(&pool)
            .data
            .expect("the ConfigMap has data");
        let rendered = &data["buildkitd.toml"];
        let parsed = rendered.parse::<toml::Table>();
        assert!(parsed.is_ok(), "rendered buildkitd.toml: {rendered}");
        let _ = service::backend(&pool);
    }
}

/// `csr`: a certificate signing request, PEM or DER, is parsed, its key checked and its
/// self-signature verified without panicking; a refusal has one of the fixed reasons; and a
/// request that is accepted gets a certificate with exactly its key and the names the issuer
/// chose, whatever the request asked for.
pub fn csr_request(data: &[u8]) {
    check_csr(data, csr::requested_key_der(data));
    if let Ok(text) = std::str::from_utf8(data) {
        check_csr(data, csr::requested_key(text));
        if let Ok(issued) =
            signer().sign_client_csr(text, &pool(), &caller(), Duration::from_secs(60))
        {
            let peer = identify(issued.cert_der()).expect("an issued certificate names its pool");
            assert_eq!((peer.pool, peer.identity), (pool(), caller()));
            let (_, cert) = X509Certificate::from_der(issued.cert_der()).unwrap();
            let der = pem_der(text);
            let (_, request) = X509CertificationRequest::from_der(&der).unwrap();
            let asked = &request.certification_request_info.subject_pki;
            let got = cert.public_key();
            assert_eq!(
                got.algorithm.algorithm, asked.algorithm.algorithm,
                "key type"
            );
            assert_eq!(
                got.subject_public_key.data, asked.subject_public_key.data,
                "the certificate carries the request's key"
            );
        }
    }
}

fn check_csr(data: &[u8], result: Result<csr::RequestedKey, CsrError>) {
    if let Err(e) = result {
        let reasons = [
            "csr_invalid",
            "csr_key_unsupported",
            "csr_asks_for_names",
            "csr_asks_for_ca",
        ];
        assert!(
            reasons.contains(&e.reason()),
            "{e:?} on {} bytes",
            data.len()
        );
    }
}

fn pem_der(text: &str) -> Vec<u8> {
    use rustls::pki_types::CertificateSigningRequestDer;
    use rustls::pki_types::pem::PemObject;
    CertificateSigningRequestDer::from_pem_slice(text.as_bytes())
        .expect("an accepted request is PEM")
        .as_ref()
        .to_vec()
}

/// One CA for the whole run: making a key per input would be most of the work.
fn signer() -> &'static Ca {
    static CA: OnceLock<Ca> = OnceLock::new();
    CA.get_or_init(|| Ca::generate("bkpool fuzz", Duration::from_secs(3600)).unwrap())
}

fn pool() -> PoolId {
    PoolId::new("fuzz", "pool").unwrap()
}

fn caller() -> ClientIdentity {
    ClientIdentity::new("fuzzer").unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_control_plane_corpus_replays_clean() {
        for (target, check) in TARGETS {
            let ran = proxy::fuzzing::replay(target, check);
            assert!(
                ran >= 3,
                "{target}: only {ran} corpus files; seeds are missing"
            );
        }
    }

    /// The seeds start the fuzzer on both sides of each check, not only on refusals.
    #[test]
    fn the_seeds_reach_acceptance_and_refusal() {
        use proxy::fuzzing::seed;
        let refusal = |name| {
            let text = String::from_utf8(seed("csr", name)).unwrap();
            csr::requested_key(&text).err().map(|e| e.reason())
        };
        assert_eq!(refusal("seed-p256.pem"), None);
        assert_eq!(refusal("seed-rsa2048.pem"), None);
        assert_eq!(
            refusal("seed-asks-for-names.pem"),
            Some("csr_asks_for_names")
        );
        assert_eq!(refusal("seed-asks-for-ca.pem"), Some("csr_asks_for_ca"));
        assert_eq!(refusal("seed-secp256k1.pem"), Some("csr_key_unsupported"));
        assert!(csr::requested_key_der(&seed("csr", "seed-p384.der")).is_ok());

        let faults = |name| {
            let pool: BuildKitPool = serde_json::from_slice(&seed("crd_spec", name)).unwrap();
            validate::validate_pool(&pool).len()
        };
        assert_eq!(faults("seed-deployment-pool.json"), 0);
        assert_eq!(faults("seed-statefulset-pool.json"), 0);
        assert_eq!(faults("seed-minimal.json"), 0);
        assert!(faults("seed-many-faults.json") >= 5);
    }

    /// Every target in `fuzz/Cargo.toml` has a check replayed here or in `proxy::fuzzing`, and
    /// a corpus directory: a new target cannot be added without its replay.
    #[test]
    fn every_fuzz_target_is_replayed() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let manifest = std::fs::read_to_string(root.join("fuzz/Cargo.toml")).unwrap();
        let bins: Vec<&str> = manifest
            .split("[[bin]]")
            .skip(1)
            .filter_map(|bin| bin.lines().find_map(|l| l.strip_prefix("name = ")))
            .map(|name| name.trim_matches('"'))
            .collect();
        let mut replayed: Vec<&str> = TARGETS
            .iter()
            .chain(&proxy::fuzzing::TARGETS)
            .map(|(name, _)| *name)
            .collect();
        replayed.sort_unstable();
        let mut bins_sorted = bins.clone();
        bins_sorted.sort_unstable();
        assert_eq!(
            bins_sorted, replayed,
            "fuzz/Cargo.toml targets vs. replayed checks"
        );
        for bin in bins {
            assert!(
                root.join("fuzz/corpus").join(bin).is_dir(),
                "no corpus for {bin}"
            );
        }
    }
}
