//! Hot reload of certificate material from files: server certificate pairs and each pool's
//! client CA bundle.
//!
//! Each file set is re-read when its files change (a directory watch for promptness, a
//! periodic check as the backstop, since watches miss some rename patterns and network file
//! systems). A new value is fully validated before it replaces the old one; a bad one keeps
//! the last good value and is counted. Open connections are never touched: only the next
//! handshake sees the new configuration.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::ServerConfig;
use rustls::pki_types::CertificateDer;
use tokio_util::sync::CancellationToken;

use crate::config::CertFiles;
use crate::gateway::Gateway;
use crate::names::PoolId;
use crate::tls::{self, ServerCert, TlsError};

/// How often files are checked even without a watch event.
pub const CHECK_INTERVAL: Duration = Duration::from_millis(500);

/// The current good material and what it was read from.
#[derive(Debug)]
pub struct Credentials {
    server: Vec<Tracked<ServerCert>>,
    pools: Vec<(PoolId, Tracked<Vec<CertificateDer<'static>>>)>,
}

#[derive(Debug)]
struct Tracked<T> {
    files: Vec<PathBuf>,
    stamps: Vec<Option<Stamp>>,
    good: T,
}

/// What identifies a file version without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

impl Credentials {
    /// Loads everything; any fault is an error (the gateway refuses to start on bad material).
    pub fn load(server: &[CertFiles], pool_cas: &[(PoolId, PathBuf)]) -> Result<Self, TlsError> {
        let server = server
            .iter()
            .map(|f| {
                let files = vec![f.cert.clone(), f.key.clone()];
                let stamps = stamps(&files);
                Ok(Tracked {
                    good: tls::load_server_cert(&f.cert, &f.key)?,
                    files,
                    stamps,
                })
            })
            .collect::<Result<_, TlsError>>()?;
        let pools = pool_cas
            .iter()
            .map(|(pool, path)| {
                let files = vec![path.clone()];
                let stamps = stamps(&files);
                Ok((
                    pool.clone(),
                    Tracked {
                        good: tls::load_ca_bundle(path)?,
                        files,
                        stamps,
                    },
                ))
            })
            .collect::<Result<_, TlsError>>()?;
        Ok(Self { server, pools })
    }

    /// The terminate-mode configuration from the current good material; `None` when nothing
    /// terminates TLS (passthrough only).
    ///
    /// Two pools whose bundles share a CA are refused (at start, by `--check`, and on a reload,
    /// which then keeps the configuration it has): a standalone gateway's CA files are written
    /// by hand, where copying one pool's CA to another is an easy mistake that undoes their
    /// isolation. (The Kubernetes gateway needs no such check: the operator makes every pool's
    /// CAs itself, and the CA of pool A in pool B's bundle gives no one a certificate for A.)
    pub fn server_config(&self) -> Result<Option<Arc<ServerConfig>>, TlsError> {
        let bundles: Vec<&[CertificateDer<'static>]> =
            self.pools.iter().map(|(_, t)| t.good.as_slice()).collect();
        if let Some((subject, first, second)) = tls::shared_ca(&bundles) {
            let (pool, tracked) = &self.pools[second];
            let (other, other_tracked) = &self.pools[first];
            return Err(TlsError::SharedCa {
                subject,
                pool: pool.clone(),
                path: tracked.files[0].clone(),
                other: other.clone(),
                other_path: other_tracked.files[0].clone(),
            });
        }
        // No pool terminates TLS without a client CA: then every connection is passthrough
        // or refused, and an unknown SNI must not start a handshake nobody can finish.
        if self.server.is_empty() || self.pools.is_empty() {
            return Ok(None);
        }
        let certs: Vec<ServerCert> = self.server.iter().map(|t| t.good.clone()).collect();
        let cas: HashMap<PoolId, Vec<CertificateDer<'static>>> = self
            .pools
            .iter()
            .map(|(p, t)| (p.clone(), t.good.clone()))
            .collect();
        tls::server_config(&certs, &cas).map(Some)
    }

    /// Re-reads what changed on disk. Returns whether any good value was replaced; each
    /// attempt is reported to `on_result(kind, outcome)`.
    pub fn refresh(
        &mut self,
        mut on_result: impl FnMut(&'static str, Result<(), &TlsError>),
    ) -> bool {
        let mut changed = false;
        for t in &mut self.server {
            changed |= t.refresh(
                |files| tls::load_server_cert(&files[0], &files[1]),
                |r| on_result("server_cert", r),
            );
        }
        for (_, t) in &mut self.pools {
            changed |= t.refresh(
                |files| tls::load_ca_bundle(&files[0]),
                |r| on_result("client_ca", r),
            );
        }
        changed
    }

    /// Directories to watch: the parents of every file (files are often replaced by rename).
    pub fn directories(&self) -> Vec<PathBuf> {
        let files = self
            .server
            .iter()
            .flat_map(|t| &t.files)
            .chain(self.pools.iter().flat_map(|(_, t)| &t.files));
        let mut dirs: Vec<PathBuf> = files
            .filter_map(|f| f.parent().map(|p| p.to_path_buf()))
            .collect();
        dirs.sort();
        dirs.dedup();
        dirs
    }
}

impl<T> Tracked<T> {
    fn refresh(
        &mut self,
        load: impl Fn(&[PathBuf]) -> Result<T, TlsError>,
        report: impl FnOnce(Result<(), &TlsError>),
    ) -> bool {
        let now = stamps(&self.files);
        if now == self.stamps {
            return false;
        }
        // Record the stamps even on failure: the same bad files are reported once, and any
        // later write (such as the missing half of a pair) triggers another attempt.
        self.stamps = now;
        match load(&self.files) {
            Ok(value) => {
                self.good = value;
                report(Ok(()));
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "new certificate material refused; keeping the last good");
                report(Err(&e));
                false
            }
        }
    }
}

fn stamps(files: &[PathBuf]) -> Vec<Option<Stamp>> {
    use std::os::unix::fs::MetadataExt;
    files
        .iter()
        .map(|f| {
            std::fs::metadata(f).ok().map(|m| Stamp {
                modified: m.modified().ok(),
                len: m.len(),
                inode: m.ino(),
            })
        })
        .collect()
}

/// Keeps `gateway`'s TLS configuration in step with the files until `stop` is cancelled.
pub async fn watch(mut credentials: Credentials, gateway: Arc<Gateway>, stop: CancellationToken) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let _watcher = directory_watch(&credentials.directories(), tx);
    let mut tick = tokio::time::interval(CHECK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
            _ = rx.recv() => {
                // Let a burst of writes (cert, then key) settle before reading.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let metrics = gateway.metrics().clone();
        if credentials.refresh(|kind, r| metrics.reload(kind, r.is_ok())) {
            match credentials.server_config() {
                Ok(config) => {
                    gateway.set_tls(config);
                    tracing::info!("certificates reloaded");
                }
                Err(e) => {
                    metrics.reload("tls_config", false);
                    tracing::error!(error = %e, "reloaded material does not build a TLS configuration; keeping the old one");
                }
            }
        }
    }
}

/// A best-effort watch; the periodic check covers its absence.
fn directory_watch(
    dirs: &[PathBuf],
    tx: tokio::sync::mpsc::Sender<()>,
) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok() {
            let _ = tx.try_send(());
        }
    })
    .map_err(|e| tracing::debug!(error = %e, "no file watch; relying on periodic checks"))
    .ok()?;
    for dir in dirs {
        if let Err(e) = watcher.watch(dir, notify::RecursiveMode::NonRecursive) {
            tracing::debug!(dir = %dir.display(), error = %e, "cannot watch directory");
        }
    }
    Some(watcher)
}

#[cfg(test)]
mod tests {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};

    use super::*;

    /// A self-signed CA named `name` with `key`, as PEM.
    fn ca(name: &str, key: &KeyPair) -> String {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.self_signed(key).unwrap().pem()
    }

    #[test]
    fn two_pools_may_not_trust_one_ca_even_from_two_files() {
        let dir = tempfile::tempdir().unwrap();
        let (key_a, key_b) = (KeyPair::generate().unwrap(), KeyPair::generate().unwrap());
        let (path_a, path_b) = (dir.path().join("a.pem"), dir.path().join("b.pem"));
        std::fs::write(&path_a, ca("CA a", &key_a)).unwrap();
        std::fs::write(&path_b, ca("CA b", &key_b)).unwrap();
        let pools = [
            ("local/a".parse().unwrap(), path_a.clone()),
            ("ci/b".parse().unwrap(), path_b.clone()),
        ];
        let mut credentials = Credentials::load(&[], &pools).unwrap();
        assert!(credentials.server_config().is_ok(), "distinct CAs");

        // b's bundle gains a CA with a's key (another name, another certificate): refused.
        std::fs::write(
            &path_b,
            format!("{}{}", ca("CA b", &key_b), ca("CA a, reissued", &key_a)),
        )
        .unwrap();
        assert!(credentials.refresh(|_, r| assert!(r.is_ok())));
        let err = credentials.server_config().unwrap_err();
        assert!(matches!(err, TlsError::SharedCa { .. }), "{err}");
        let text = err.to_string();
        for part in ["ci/b", "local/a", "a.pem", "b.pem", "CN=CA a, reissued"] {
            assert!(text.contains(part), "{part} not in: {text}");
        }
        // And at load, as when the gateway starts or checks its configuration.
        let err = Credentials::load(&[], &pools)
            .unwrap()
            .server_config()
            .unwrap_err();
        assert!(matches!(err, TlsError::SharedCa { .. }), "{err}");
    }
}
