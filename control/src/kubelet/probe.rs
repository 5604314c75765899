//! Readiness probes, run as a kubelet runs them: `exec` (the command, with the container's
//! environment and rewritten paths, succeeds on exit 0), `tcpSocket` (a connection to the pod
//! IP) and `httpGet` (plain HTTP, 200–399), after `initialDelaySeconds`, every
//! `periodSeconds`, each attempt bounded by `timeoutSeconds`; ready after
//! `successThreshold` successes in a row, unready after `failureThreshold` failures.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::volumes::PrepareError;

/// One readiness check.
#[derive(Debug, Clone)]
pub enum Check {
    Exec {
        program: PathBuf,
        args: Vec<String>,
        env: Vec<(String, String)>,
        dir: PathBuf,
    },
    Tcp(SocketAddr),
    Http {
        addr: SocketAddr,
        path: String,
    },
}

/// A readiness probe with its timing.
#[derive(Debug, Clone)]
pub struct Readiness {
    pub check: Check,
    initial_delay: Duration,
    period: Duration,
    timeout: Duration,
    success_threshold: u32,
    failure_threshold: u32,
}

impl Readiness {
    /// The probe of `container`, or `None` without one. `exec` turns the exec command into a
    /// check (program look-up, rewritten paths, the container's environment).
    pub fn of(
        container: &Container,
        ip: Ipv4Addr,
        exec: impl FnOnce(&[String]) -> Result<Check, PrepareError>,
    ) -> Result<Option<Self>, PrepareError> {
        let Some(probe) = &container.readiness_probe else {
            return Ok(None);
        };
        let port = |port: &IntOrString| named_port(container, port);
        let check = if let Some(e) = &probe.exec {
            exec(e.command.as_deref().unwrap_or_default())?
        } else if let Some(t) = &probe.tcp_socket {
            Check::Tcp(SocketAddr::new(ip.into(), port(&t.port)?))
        } else if let Some(h) = &probe.http_get {
            if h.scheme.as_deref().is_some_and(|s| s != "HTTP") {
                return Err(unsupported("an httpGet probe over HTTPS"));
            }
            let path = h.path.clone().unwrap_or_else(|| "/".into());
            Check::Http {
                addr: SocketAddr::new(ip.into(), port(&h.port)?),
                path,
            }
        } else {
            return Err(unsupported("a probe other than exec, tcpSocket or httpGet"));
        };
        Ok(Some(timing(probe, check)))
    }

    /// Runs forever, calling `report` with each change of readiness (starting unready).
    pub async fn run(self, mut report: impl FnMut(bool)) {
        tokio::time::sleep(self.initial_delay).await;
        let (mut ready, mut streak) = (false, 0u32);
        loop {
            let ok = tokio::time::timeout(self.timeout, self.check.attempt())
                .await
                .unwrap_or(false);
            streak = if ok == ready { 0 } else { streak + 1 };
            let needed = if ready {
                self.failure_threshold
            } else {
                self.success_threshold
            };
            if ok != ready && streak >= needed {
                ready = ok;
                streak = 0;
                report(ready);
            }
            tokio::time::sleep(self.period).await;
        }
    }
}

impl Check {
    /// One attempt: whether it succeeded.
    pub async fn attempt(&self) -> bool {
        match self {
            Check::Exec {
                program,
                args,
                env,
                dir,
            } => {
                let status = tokio::process::Command::new(program)
                    .args(args)
                    .env_clear()
                    .envs(env.iter().map(|(k, v)| (k, v)))
                    .current_dir(dir)
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .kill_on_drop(true)
                    .status()
                    .await;
                status.is_ok_and(|s| s.success())
            }
            Check::Tcp(addr) => TcpStream::connect(addr).await.is_ok(),
            Check::Http { addr, path } => http_ok(*addr, path).await,
        }
    }
}

fn timing(probe: &Probe, check: Check) -> Readiness {
    let seconds = |v: Option<i32>, default: i32| {
        Duration::from_secs(u64::try_from(v.unwrap_or(default).max(0)).unwrap_or(0))
    };
    Readiness {
        check,
        initial_delay: seconds(probe.initial_delay_seconds, 0),
        period: seconds(probe.period_seconds, 10).max(Duration::from_secs(1)),
        timeout: seconds(probe.timeout_seconds, 1).max(Duration::from_secs(1)),
        success_threshold: probe.success_threshold.unwrap_or(1).max(1) as u32,
        failure_threshold: probe.failure_threshold.unwrap_or(3).max(1) as u32,
    }
}

/// A probe's port: a number, or the name of one of the container's ports.
fn named_port(container: &Container, port: &IntOrString) -> Result<u16, PrepareError> {
    let number = match port {
        IntOrString::Int(n) => Some(*n),
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .map(|p| p.container_port),
    };
    number
        .and_then(|n| u16::try_from(n).ok())
        .ok_or_else(|| unsupported(&format!("probe port {port:?}")))
}

fn unsupported(what: &str) -> PrepareError {
    PrepareError::Unsupported { what: what.into() }
}

/// A plain HTTP/1.1 GET answered with a status from 200 to 399.
async fn http_ok(addr: SocketAddr, path: &str) -> bool {
    let Ok(mut tcp) = TcpStream::connect(addr).await else {
        return false;
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if tcp.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    if tcp.read_exact(&mut head).await.is_err() {
        return false;
    }
    let status = std::str::from_utf8(&head[9..12]).ok();
    status
        .and_then(|s| s.parse::<u16>().ok())
        .is_some_and(|s| (200..400).contains(&s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn container(probe: serde_json::Value) -> Container {
        serde_json::from_value(serde_json::json!({
            "name": "c",
            "ports": [{"name": "web", "containerPort": 8080}],
            "readinessProbe": probe,
        }))
        .unwrap()
    }

    #[test]
    fn named_ports_and_defaults_come_from_the_container_and_kubernetes() {
        let ip = Ipv4Addr::new(127, 42, 0, 3);
        let c = container(serde_json::json!({"tcpSocket": {"port": "web"}}));
        let probe = Readiness::of(&c, ip, |_| unreachable!()).unwrap().unwrap();
        assert!(matches!(probe.check, Check::Tcp(a) if a == "127.42.0.3:8080".parse().unwrap()));
        assert_eq!(probe.period, Duration::from_secs(10));
        assert_eq!((probe.success_threshold, probe.failure_threshold), (1, 3));
        let c = container(serde_json::json!({"tcpSocket": {"port": "nope"}}));
        assert!(Readiness::of(&c, ip, |_| unreachable!()).is_err());
        let c = container(serde_json::json!({"grpc": {"port": 1}}));
        assert!(Readiness::of(&c, ip, |_| unreachable!()).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn readiness_follows_the_thresholds() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let c = container(serde_json::json!({
            "tcpSocket": {"port": addr.port()}, "initialDelaySeconds": 2, "periodSeconds": 1,
            "successThreshold": 2, "failureThreshold": 2,
        }));
        let probe = Readiness::of(&c, Ipv4Addr::LOCALHOST, |_| unreachable!())
            .unwrap()
            .unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let task = tokio::spawn(probe.run(move |r| log.lock().unwrap().push(r)));
        tokio::time::sleep(Duration::from_millis(3500)).await;
        assert_eq!(
            *seen.lock().unwrap(),
            vec![true],
            "ready after two successes"
        );
        drop(listener);
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(
            *seen.lock().unwrap(),
            vec![true, false],
            "unready after two failures"
        );
        task.abort();
    }

    #[tokio::test]
    async fn http_checks_want_a_2xx_or_3xx() {
        for (answer, ok) in [
            ("HTTP/1.1 204 No Content\r\n\r\n", true),
            ("HTTP/1.1 503 x\r\n\r\n", false),
        ] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move {
                let (mut tcp, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 256];
                let _ = tcp.read(&mut buf).await;
                tcp.write_all(answer.as_bytes()).await.unwrap();
            });
            let check = Check::Http {
                addr,
                path: "/healthz".into(),
            };
            assert_eq!(check.attempt().await, ok, "{answer}");
        }
    }
}
