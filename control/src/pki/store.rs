//! The local PKI: every CA and the gateway's server certificate, kept as PEM files in a state
//! directory so that `bkpool local` survives restarts and clients keep trusting it.
//!
//! Layout (directories 0700, `*.key` 0600, `*.pem` 0644):
//!
//! ```text
//! <dir>/gateway/ca.pem, ca.key          server CA: what clients trust (buildctl --tlscacert)
//! <dir>/gateway/server.pem, server.key  the gateway's server certificate, issued by that CA
//! <dir>/pools/<namespace>/<name>/client-ca.pem, client-ca.key
//!                                       one client CA per pool: a pool's certs open no other pool
//! <dir>/backend/ca.pem, ca.key          backend CA for an mTLS leg to buildkitd (its server
//!                                       certs and the gateway's client cert)
//! ```
//!
//! Whatever is missing is created; whatever exists is checked and never silently replaced: a
//! corrupt, unreadable or mismatched file, or one half of a key pair without the other, is an
//! error naming the file and leaves every file as it was. The one thing renewed in place is
//! the gateway server certificate, when it nears expiry or lacks a requested name; the CA
//! behind it stays, so clients keep trusting the gateway.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use proxy::names::PoolId;

use super::files::{CERT_MODE, KEY_MODE, ensure_dir, read_text, warn_if_loose, write_atomic};
use super::inspect::{CertInfo, key_from_pem};
use super::issue::is_dns_name;
use super::{Ca, PkiError};

/// How long a generated CA is valid: long, because replacing one means redistributing trust.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long the gateway's server certificate is valid; it is renewed with a third left.
pub const SERVER_CERT_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);

/// Where the host's name is read from, for the gateway certificate's SANs.
const HOSTNAME_FILE: &str = "/proc/sys/kernel/hostname";

/// The CAs of a local PKI, loaded from (and created in) its state directory.
#[derive(Debug)]
pub struct LocalPki {
    dir: PathBuf,
    gateway_ca: Ca,
    backend_ca: Ca,
    pool_cas: BTreeMap<PoolId, Ca>,
}

impl LocalPki {
    /// Opens the PKI in `dir`, creating what is missing: CAs for the gateway, the backend leg
    /// and each of `pools`, and a gateway server certificate for loopback, the host name and
    /// `server_names` (renewed if due or lacking one of them).
    pub fn open_or_init(
        dir: &Path,
        pools: &[PoolId],
        server_names: &[String],
    ) -> Result<Self, PkiError> {
        ensure_dir(dir)?;
        let gateway_ca = open_or_create_ca(&dir.join("gateway"), "ca", "bkpool gateway server CA")?;
        let backend_ca = open_or_create_ca(&dir.join("backend"), "ca", "bkpool backend CA")?;
        let mut pki = Self {
            dir: dir.to_path_buf(),
            gateway_ca,
            backend_ca,
            pool_cas: BTreeMap::new(),
        };
        for pool in pools {
            pki.add_pool(pool)?;
        }
        pki.ensure_server_cert(server_names, SystemTime::now())?;
        Ok(pki)
    }

    /// Opens the PKI in `dir` as it is, creating nothing (for a command that issues from the
    /// PKI of a `bkpool local`, which must never make a CA of its own): `None` when `dir`
    /// holds none. Pools of `pools` without a client CA are left out.
    pub fn open_existing(dir: &Path, pools: &[PoolId]) -> Result<Option<Self>, PkiError> {
        let Some(gateway_ca) = load_ca(&dir.join("gateway"), "ca")? else {
            return Ok(None);
        };
        let Some(backend_ca) = load_ca(&dir.join("backend"), "ca")? else {
            return Ok(None);
        };
        let mut pki = Self {
            dir: dir.to_path_buf(),
            gateway_ca,
            backend_ca,
            pool_cas: BTreeMap::new(),
        };
        for pool in pools {
            if let Some(ca) = load_ca(&pki.pool_dir(pool), "client-ca")? {
                pki.pool_cas.insert(pool.clone(), ca);
            }
        }
        Ok(Some(pki))
    }

    /// Loads `pool`'s client CA, creating it if the pool is new.
    pub fn add_pool(&mut self, pool: &PoolId) -> Result<&Ca, PkiError> {
        if !self.pool_cas.contains_key(pool) {
            let dir = self.pool_dir(pool);
            // Named in every CertificateRequest, so the name must not say which pool.
            let ca = open_or_create_ca(&dir, "client-ca", &super::opaque_name()?)?;
            self.pool_cas.insert(pool.clone(), ca);
        }
        Ok(&self.pool_cas[pool])
    }

    /// Renews the gateway server certificate if it is within a third of its lifetime of
    /// expiry (as of `now`) or lacks one of the wanted names. Returns whether it renewed.
    pub fn ensure_server_cert(
        &self,
        server_names: &[String],
        now: SystemTime,
    ) -> Result<bool, PkiError> {
        let wanted = wanted_server_names(server_names);
        let (cert_path, key_path) = (self.server_cert_path(), self.server_key_path());
        if !pair_exists(&cert_path, &key_path)? {
            self.write_server_cert(&wanted, &cert_path, &key_path)?;
            tracing::info!(path = %cert_path.display(), "created gateway server certificate");
            return Ok(true);
        }
        let info = self.load_server_cert(&cert_path, &key_path)?;
        let Some(reason) = renewal_reason(&info, &wanted, now) else {
            return Ok(false);
        };
        self.write_server_cert(&wanted, &cert_path, &key_path)?;
        tracing::info!(path = %cert_path.display(), reason, "renewed gateway server certificate");
        Ok(true)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA clients trust for the gateway (`buildctl --tlscacert`).
    pub fn gateway_ca_path(&self) -> PathBuf {
        self.dir.join("gateway/ca.pem")
    }

    pub fn server_cert_path(&self) -> PathBuf {
        self.dir.join("gateway/server.pem")
    }

    pub fn server_key_path(&self) -> PathBuf {
        self.dir.join("gateway/server.key")
    }

    pub fn backend_ca_path(&self) -> PathBuf {
        self.dir.join("backend/ca.pem")
    }

    /// `pool`'s client CA certificate (whether or not the pool is known).
    pub fn pool_ca_path(&self, pool: &PoolId) -> PathBuf {
        self.pool_dir(pool).join("client-ca.pem")
    }

    pub fn pool_ca_key_path(&self, pool: &PoolId) -> PathBuf {
        self.pool_dir(pool).join("client-ca.key")
    }

    pub fn gateway_ca(&self) -> &Ca {
        &self.gateway_ca
    }

    pub fn backend_ca(&self) -> &Ca {
        &self.backend_ca
    }

    pub fn pool_ca(&self, pool: &PoolId) -> Option<&Ca> {
        self.pool_cas.get(pool)
    }

    pub fn pools(&self) -> impl Iterator<Item = &PoolId> {
        self.pool_cas.keys()
    }

    fn pool_dir(&self, pool: &PoolId) -> PathBuf {
        self.dir
            .join("pools")
            .join(pool.namespace())
            .join(pool.name())
    }

    fn load_server_cert(&self, cert_path: &Path, key_path: &Path) -> Result<CertInfo, PkiError> {
        let info = CertInfo::from_pem(&read_text(cert_path)?, cert_path)?;
        let key = key_from_pem(&read_text(key_path)?, key_path)?;
        warn_if_loose(key_path);
        info.check_key(&key, key_path, cert_path)?;
        info.check_issued_by(
            self.gateway_ca.cert_der(),
            cert_path,
            &self.gateway_ca_path(),
        )?;
        Ok(info)
    }

    /// Key first, then certificate: a reader that catches the pair mid-update sees a
    /// mismatch and keeps its last good pair until the certificate lands.
    fn write_server_cert(
        &self,
        names: &[String],
        cert_path: &Path,
        key_path: &Path,
    ) -> Result<(), PkiError> {
        let issued = self.gateway_ca.issue_server(names, SERVER_CERT_VALIDITY)?;
        let key_pem = issued.key_pem.as_deref().unwrap_or_default();
        write_atomic(key_path, key_pem.as_bytes(), KEY_MODE)?;
        write_atomic(cert_path, issued.cert_pem.as_bytes(), CERT_MODE)
    }
}

/// Loads `<dir>/<stem>.pem` + `<dir>/<stem>.key`, or creates both if neither exists.
fn open_or_create_ca(dir: &Path, stem: &str, common_name: &str) -> Result<Ca, PkiError> {
    if let Some(ca) = load_ca(dir, stem)? {
        return Ok(ca);
    }
    let cert_path = dir.join(format!("{stem}.pem"));
    let key_path = dir.join(format!("{stem}.key"));
    ensure_dir(dir)?;
    let ca = Ca::generate(common_name, CA_VALIDITY)?;
    write_atomic(&key_path, ca.key_pem().as_bytes(), KEY_MODE)?;
    write_atomic(&cert_path, ca.cert_pem().as_bytes(), CERT_MODE)?;
    tracing::info!(path = %cert_path.display(), common_name, "created CA");
    Ok(ca)
}

/// Loads `<dir>/<stem>.pem` + `<dir>/<stem>.key`; `None` if neither exists.
fn load_ca(dir: &Path, stem: &str) -> Result<Option<Ca>, PkiError> {
    let cert_path = dir.join(format!("{stem}.pem"));
    let key_path = dir.join(format!("{stem}.key"));
    if !pair_exists(&cert_path, &key_path)? {
        return Ok(None);
    }
    warn_if_loose(&key_path);
    Ca::load(&cert_path, &key_path).map(Some)
}

/// Whether both halves exist; an error if only one does (creating the other would pair a
/// new key with an old certificate, or hide a lost one).
fn pair_exists(cert_path: &Path, key_path: &Path) -> Result<bool, PkiError> {
    let exists = |p: &Path| {
        p.try_exists().map_err(|source| PkiError::Read {
            path: p.into(),
            source,
        })
    };
    match (exists(cert_path)?, exists(key_path)?) {
        (true, true) => Ok(true),
        (false, false) => Ok(false),
        (true, false) => Err(PkiError::HalfPair {
            present: cert_path.into(),
            missing: key_path.into(),
        }),
        (false, true) => Err(PkiError::HalfPair {
            present: key_path.into(),
            missing: cert_path.into(),
        }),
    }
}

/// Loopback, the host name and `extra`, each once, IP addresses in canonical form.
fn wanted_server_names(extra: &[String]) -> Vec<String> {
    let hostname = std::fs::read_to_string(HOSTNAME_FILE).unwrap_or_default();
    let hostname = hostname.trim().to_ascii_lowercase();
    let mut names: Vec<String> = vec!["127.0.0.1".into(), "::1".into(), "localhost".into()];
    if is_dns_name(&hostname) {
        names.push(hostname);
    }
    for name in extra {
        names.push(match name.parse::<IpAddr>() {
            Ok(ip) => ip.to_string(),
            Err(_) => name.to_ascii_lowercase(),
        });
    }
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    names
}

/// Why the server certificate must be renewed at `now`, if it must.
fn renewal_reason(info: &CertInfo, wanted: &[String], now: SystemTime) -> Option<&'static str> {
    let lifetime = info
        .not_after
        .duration_since(info.not_before)
        .unwrap_or_default();
    let left = info.not_after.duration_since(now).unwrap_or_default();
    if left < lifetime / 3 {
        return Some("within a third of its lifetime of expiry");
    }
    let has = |w: &String| info.server_names.iter().any(|n| n.eq_ignore_ascii_case(w));
    if !wanted.iter().all(has) {
        return Some("lacks a requested server name");
    }
    None
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::pki::Problem;

    fn pool(name: &str) -> PoolId {
        name.parse().unwrap()
    }

    /// Every file under `dir` with its bytes.
    fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
        let mut files = BTreeMap::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for entry in fs::read_dir(&d).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                } else {
                    files.insert(path.clone(), fs::read(&path).unwrap());
                }
            }
        }
        files
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn init(dir: &Path) -> LocalPki {
        LocalPki::open_or_init(dir, &[pool("a"), pool("ci/b")], &[]).unwrap()
    }

    #[test]
    fn opening_an_existing_pki_creates_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("pki");
        assert!(
            LocalPki::open_existing(&dir, &[pool("a")])
                .unwrap()
                .is_none()
        );
        assert!(!dir.exists(), "nothing created where there is no PKI");

        let made = init(&dir);
        let before = snapshot(&dir);
        let opened = LocalPki::open_existing(&dir, &[pool("a"), pool("c")])
            .unwrap()
            .unwrap();
        assert_eq!(opened.gateway_ca().cert_pem(), made.gateway_ca().cert_pem());
        assert_eq!(
            opened.pool_ca(&pool("a")).unwrap().cert_pem(),
            made.pool_ca(&pool("a")).unwrap().cert_pem()
        );
        assert!(
            opened.pool_ca(&pool("c")).is_none(),
            "no CA made for a new pool"
        );
        assert_eq!(snapshot(&dir), before, "every file as it was");
    }

    #[test]
    fn first_run_creates_the_documented_layout_with_private_keys_0600() {
        let tmp = tempfile::tempdir().unwrap();
        let pki = init(tmp.path());
        let files: Vec<String> = snapshot(tmp.path())
            .keys()
            .map(|p| p.strip_prefix(tmp.path()).unwrap().display().to_string())
            .collect();
        let expected = [
            "backend/ca.key",
            "backend/ca.pem",
            "gateway/ca.key",
            "gateway/ca.pem",
            "gateway/server.key",
            "gateway/server.pem",
            "pools/ci/b/client-ca.key",
            "pools/ci/b/client-ca.pem",
            "pools/local/a/client-ca.key",
            "pools/local/a/client-ca.pem",
        ];
        assert_eq!(files, expected);
        for file in files.iter().filter(|f| f.ends_with(".key")) {
            assert_eq!(mode(&tmp.path().join(file)), 0o600, "{file}");
        }
        for dir in ["gateway", "backend", "pools", "pools/local/a"] {
            assert_eq!(mode(&tmp.path().join(dir)), 0o700, "{dir}");
        }
        assert_eq!(
            fs::read_to_string(pki.gateway_ca_path()).unwrap(),
            pki.gateway_ca().cert_pem()
        );
        assert_eq!(
            fs::read_to_string(pki.pool_ca_path(&pool("a"))).unwrap(),
            pki.pool_ca(&pool("a")).unwrap().cert_pem()
        );
        assert_eq!(
            pki.pools().cloned().collect::<Vec<_>>(),
            [pool("ci/b"), pool("a")]
        );
    }

    #[test]
    fn a_second_open_changes_nothing_and_loads_the_same_cas() {
        let tmp = tempfile::tempdir().unwrap();
        let first = init(tmp.path());
        let before = snapshot(tmp.path());
        let second = init(tmp.path());
        assert_eq!(snapshot(tmp.path()), before);
        assert_eq!(
            first.gateway_ca().cert_pem(),
            second.gateway_ca().cert_pem()
        );
        assert_eq!(first.backend_ca().key_pem(), second.backend_ca().key_pem());
        let a = pool("a");
        assert_eq!(
            first.pool_ca(&a).unwrap().cert_der(),
            second.pool_ca(&a).unwrap().cert_der()
        );
    }

    #[test]
    fn a_new_pool_gets_a_ca_and_nothing_else_moves() {
        let tmp = tempfile::tempdir().unwrap();
        init(tmp.path());
        let before = snapshot(tmp.path());
        let pki = LocalPki::open_or_init(tmp.path(), &[pool("a"), pool("c")], &[]).unwrap();
        let after = snapshot(tmp.path());
        for (path, bytes) in &before {
            assert_eq!(after.get(path), Some(bytes), "{} changed", path.display());
        }
        assert_eq!(after.len(), before.len() + 2);
        assert!(pki.pool_ca_path(&pool("c")).exists());
    }

    #[test]
    fn a_pool_ca_is_named_without_its_pool_and_an_old_readable_name_still_loads() {
        let subject = |ca: &Ca| {
            let (_, cert) = x509_parser::parse_x509_certificate(ca.cert_der()).unwrap();
            cert.subject().to_string()
        };
        let tmp = tempfile::tempdir().unwrap();
        let pki = LocalPki::open_or_init(tmp.path(), &[pool("secret-project")], &[]).unwrap();
        let name = subject(pki.pool_ca(&pool("secret-project")).unwrap());
        assert!(name.starts_with("CN=bkpool CA "), "{name}");
        assert!(!name.contains("secret-project"), "{name}");

        // A CA made before opaque names keeps its name and keeps working.
        let old = Ca::generate("bkpool client CA local/legacy", CA_VALIDITY).unwrap();
        let dir = tmp.path().join("pools/local/legacy");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("client-ca.pem"), old.cert_pem()).unwrap();
        std::fs::write(dir.join("client-ca.key"), old.key_pem()).unwrap();
        let pki = LocalPki::open_or_init(tmp.path(), &[pool("legacy")], &[]).unwrap();
        let loaded = pki.pool_ca(&pool("legacy")).unwrap();
        assert_eq!(loaded.cert_pem(), old.cert_pem());
        assert!(subject(loaded).contains("local/legacy"));
    }

    /// Damages one file, reopens, and checks the error names `named` with `problem`
    /// and that no file changed.
    fn assert_refused(
        damage: impl FnOnce(&Path),
        named: &str,
        problem: impl Fn(&PkiError) -> bool,
    ) {
        let tmp = tempfile::tempdir().unwrap();
        init(tmp.path());
        damage(tmp.path());
        let before = snapshot(tmp.path());
        let err = LocalPki::open_or_init(tmp.path(), &[pool("a"), pool("ci/b")], &[]).unwrap_err();
        let path = tmp.path().join(named);
        assert_eq!(err.path(), Some(path.as_path()), "{err}");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        assert!(problem(&err), "unexpected error: {err}");
        assert_eq!(snapshot(tmp.path()), before, "files changed after: {err}");
    }

    fn invalid(expected: Problem) -> impl Fn(&PkiError) -> bool {
        move |e| matches!(e, PkiError::Invalid { problem, .. } if *problem == expected)
    }

    fn is_bad_key(e: &PkiError) -> bool {
        matches!(
            e,
            PkiError::Invalid {
                problem: Problem::BadKey(_) | Problem::NoPem(_),
                ..
            }
        )
    }

    #[test]
    fn corrupt_files_are_errors_naming_them() {
        for file in [
            "gateway/ca.pem",
            "pools/local/a/client-ca.pem",
            "backend/ca.pem",
            "gateway/server.pem",
        ] {
            let garbage = |d: &Path| fs::write(d.join(file), "not a certificate\n").unwrap();
            assert_refused(garbage, file, invalid(Problem::NoPem("CERTIFICATE")));
        }
        let garbage = |d: &Path| fs::write(d.join("pools/ci/b/client-ca.key"), "junk").unwrap();
        assert_refused(garbage, "pools/ci/b/client-ca.key", is_bad_key);
    }

    #[test]
    fn truncated_files_are_errors_naming_them() {
        let truncate = |file: &'static str| {
            move |d: &Path| {
                let bytes = fs::read(d.join(file)).unwrap();
                fs::write(d.join(file), &bytes[..bytes.len() / 2]).unwrap();
            }
        };
        assert_refused(
            truncate("pools/local/a/client-ca.pem"),
            "pools/local/a/client-ca.pem",
            invalid(Problem::NoPem("CERTIFICATE")),
        );
        assert_refused(truncate("gateway/ca.key"), "gateway/ca.key", is_bad_key);
        assert_refused(
            truncate("gateway/server.key"),
            "gateway/server.key",
            is_bad_key,
        );
        let empty = |d: &Path| fs::write(d.join("backend/ca.pem"), "").unwrap();
        assert_refused(
            empty,
            "backend/ca.pem",
            invalid(Problem::NoPem("CERTIFICATE")),
        );
    }

    #[test]
    fn a_key_that_does_not_match_its_cert_is_an_error_naming_the_key() {
        let swap = |d: &Path| {
            fs::copy(
                d.join("backend/ca.key"),
                d.join("pools/local/a/client-ca.key"),
            )
            .map(drop)
            .unwrap()
        };
        let mismatch = |e: &PkiError| {
            matches!(
                e,
                PkiError::Invalid {
                    problem: Problem::KeyMismatch { .. },
                    ..
                }
            )
        };
        assert_refused(swap, "pools/local/a/client-ca.key", mismatch);
        let swap = |d: &Path| {
            fs::copy(d.join("gateway/ca.key"), d.join("gateway/server.key"))
                .map(drop)
                .unwrap()
        };
        assert_refused(swap, "gateway/server.key", mismatch);
    }

    #[test]
    fn half_a_pair_is_an_error_naming_the_half_that_is_there() {
        let no_key = |d: &Path| fs::remove_file(d.join("pools/local/a/client-ca.key")).unwrap();
        let half = |e: &PkiError| matches!(e, PkiError::HalfPair { .. });
        assert_refused(no_key, "pools/local/a/client-ca.pem", half);
        let no_cert = |d: &Path| fs::remove_file(d.join("gateway/ca.pem")).unwrap();
        assert_refused(no_cert, "gateway/ca.key", half);
        let no_server_key = |d: &Path| fs::remove_file(d.join("gateway/server.key")).unwrap();
        assert_refused(no_server_key, "gateway/server.pem", half);
    }

    #[test]
    fn a_leaf_in_place_of_a_ca_is_refused() {
        let leaf = |d: &Path| {
            fs::copy(d.join("gateway/server.pem"), d.join("backend/ca.pem")).unwrap();
            fs::copy(d.join("gateway/server.key"), d.join("backend/ca.key")).unwrap();
        };
        assert_refused(leaf, "backend/ca.pem", invalid(Problem::NotCa));
    }

    #[test]
    fn a_server_cert_from_another_ca_is_refused() {
        let foreign = |d: &Path| {
            let other = Ca::generate("other", CA_VALIDITY).unwrap();
            let issued = other
                .issue_server(&["localhost".into()], SERVER_CERT_VALIDITY)
                .unwrap();
            fs::write(d.join("gateway/server.pem"), &issued.cert_pem).unwrap();
            fs::write(d.join("gateway/server.key"), issued.key_pem.unwrap()).unwrap();
        };
        let not_issued = |e: &PkiError| {
            matches!(
                e,
                PkiError::Invalid {
                    problem: Problem::NotIssuedBy { .. },
                    ..
                }
            )
        };
        assert_refused(foreign, "gateway/server.pem", not_issued);
    }

    #[test]
    fn an_unreadable_file_is_an_error_naming_it() {
        let tmp = tempfile::tempdir().unwrap();
        init(tmp.path());
        let ca = tmp.path().join("pools/local/a/client-ca.pem");
        fs::remove_file(&ca).unwrap();
        fs::create_dir(&ca).unwrap(); // readable by root too, unlike a chmod 000 file
        let err = LocalPki::open_or_init(tmp.path(), &[pool("a")], &[]).unwrap_err();
        assert!(
            matches!(&err, PkiError::Read { path, .. } if *path == ca),
            "{err}"
        );
    }

    #[test]
    fn the_server_cert_is_renewed_near_expiry_and_for_new_names_but_the_ca_stays() {
        let tmp = tempfile::tempdir().unwrap();
        let pki = init(tmp.path());
        let ca_before = fs::read(pki.gateway_ca_path()).unwrap();
        let cert_before = fs::read(pki.server_cert_path()).unwrap();
        let now = SystemTime::now();
        assert!(!pki.ensure_server_cert(&[], now).unwrap());
        assert!(
            !pki.ensure_server_cert(&[], now + SERVER_CERT_VALIDITY / 2)
                .unwrap()
        );
        assert_eq!(fs::read(pki.server_cert_path()).unwrap(), cert_before);

        assert!(
            pki.ensure_server_cert(&[], now + SERVER_CERT_VALIDITY * 3 / 4)
                .unwrap()
        );
        let renewed = fs::read(pki.server_cert_path()).unwrap();
        assert_ne!(renewed, cert_before);
        assert_eq!(fs::read(pki.gateway_ca_path()).unwrap(), ca_before);
        assert_eq!(mode(&pki.server_key_path()), 0o600);

        let names = ["gw.example".to_owned(), "192.0.2.7".to_owned()];
        assert!(pki.ensure_server_cert(&names, now).unwrap());
        let info = CertInfo::from_pem(
            &fs::read_to_string(pki.server_cert_path()).unwrap(),
            Path::new("x"),
        )
        .unwrap();
        for name in ["127.0.0.1", "::1", "localhost", "gw.example", "192.0.2.7"] {
            assert!(
                info.server_names.iter().any(|n| n == name),
                "{name} missing from {:?}",
                info.server_names
            );
        }
        assert!(
            !pki.ensure_server_cert(&["GW.example".to_owned()], now)
                .unwrap()
        );
        // A reopen with the same names leaves the renewed pair alone.
        let before = snapshot(tmp.path());
        LocalPki::open_or_init(tmp.path(), &[pool("a")], &names).unwrap();
        assert_eq!(snapshot(tmp.path()), before);
    }

    #[test]
    fn a_file_where_the_state_dir_should_be_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("state");
        fs::write(&file, "x").unwrap();
        let err = LocalPki::open_or_init(&file, &[], &[]).unwrap_err();
        assert!(
            matches!(&err, PkiError::NotADirectory { path } if *path == file),
            "{err}"
        );
        assert_eq!(fs::read(&file).unwrap(), b"x");
    }
}
