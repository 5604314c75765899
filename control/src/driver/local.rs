//! The local process driver: a pool's replicas are processes on this machine (buildkitd, or
//! the stand-in), each on its own loopback port, in its own process group, with its own root
//! directory and log file under the state directory. No replica outlives bkpool: stopping
//! signals the whole group, and the kernel kills replicas left behind by a crash.
//!
//! Replica ids are slot numbers per pool (`r0`, `r1`, ...), lowest free first, as with a
//! StatefulSet: a pool that wakes again reuses `r0`'s root, so buildkitd keeps its cache.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proxy::names::PoolId;
use rustix::io::Errno;
use rustix::process::{Pid, Signal};
use tokio::sync::broadcast;

use super::slots::{Reservation, Table};
use super::spawn::Spawner;

/// What to run for a replica. In `args` and in `env` values, `{addr}` (`127.0.0.1:PORT`),
/// `{port}`, `{root}` (the replica's own directory) and `{pool}` (`namespace/name`) are
/// replaced by the replica's values.
#[derive(Debug, Clone)]
pub struct ProcessSpec {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// How long a replica may take to exit after SIGTERM before it gets SIGKILL.
    pub grace: Duration,
}

/// A replica's slot in its pool: `r0`, `r1`, ...
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReplicaId(pub u32);

/// One started replica process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    pub id: ReplicaId,
    pub pool: PoolId,
    /// Where it was told to listen (it answers there once ready).
    pub addr: SocketAddr,
    /// Its pid, which is also its process group id. With its own namespaces, the pid of the
    /// replica's shim, which passes signals on and exits as the replica does.
    pub pid: u32,
    /// Its stdout and stderr.
    pub log: PathBuf,
}

/// What happened to a replica without being asked, or as asked.
#[derive(Debug, Clone)]
pub enum DriverEvent {
    /// The replica's process exited. `requested` is true when `stop` or `stop_all` asked for
    /// it; false means a crash. `status` is `None` only if the exit could not be collected.
    Exited {
        replica: Replica,
        status: Option<ExitStatus>,
        requested: bool,
    },
}

/// Why the driver could not start or stop a replica.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("no free loopback port in {}..={} for pool {pool}", ports.start(), ports.end())]
    NoFreePort {
        pool: PoolId,
        ports: RangeInclusive<u16>,
    },
    #[error("could not prepare {}: {source}", path.display())]
    Prepare {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("could not start {} for pool {pool}: {source}", program.display())]
    Spawn {
        pool: PoolId,
        program: PathBuf,
        source: std::io::Error,
    },
    #[error("could not signal replica {id} of pool {pool} (pid {pid}): {source}", id = replica.id, pool = replica.pool, pid = replica.pid)]
    Signal {
        replica: Replica,
        source: std::io::Error,
    },
}

impl DriverError {
    /// A fixed label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            DriverError::NoFreePort { .. } => "no_free_port",
            DriverError::Prepare { .. } => "prepare",
            DriverError::Spawn { .. } => "spawn",
            DriverError::Signal { .. } => "signal",
        }
    }
}

/// Starts and stops replica processes. Cheap to clone; clones share the replicas.
///
/// Dropping the last clone kills (SIGKILL) every replica still running, as a crash of bkpool
/// would: call [`LocalDriver::stop_all`] first for a graceful stop.
#[derive(Clone)]
pub struct LocalDriver {
    inner: Arc<Inner>,
}

impl LocalDriver {
    /// A driver keeping replica roots and logs under `state_dir/replicas/` and choosing
    /// ports from `ports`. Must be called within a tokio runtime, which reaps the replicas.
    ///
    /// # Panics
    /// Outside a tokio runtime, or if the spawner thread cannot be started (the process is
    /// out of threads).
    pub fn new(state_dir: PathBuf, ports: RangeInclusive<u16>) -> Self {
        let runtime = tokio::runtime::Handle::current();
        let spawner = Spawner::start(runtime).expect("start the replica spawner thread");
        let inner = Inner {
            replicas_dir: state_dir.join("replicas"),
            next_port: Mutex::new(*ports.start()),
            ports,
            spawner,
            table: Arc::default(),
            events: broadcast::channel(256).0,
        };
        LocalDriver {
            inner: Arc::new(inner),
        }
    }

    /// Starts one replica of `pool` on a free port of the range, with `spec`'s placeholders
    /// filled in. The process is running when this returns, but not ready: probe
    /// [`Replica::addr`] until it answers.
    pub async fn start(&self, pool: &PoolId, spec: &ProcessSpec) -> Result<Replica, DriverError> {
        let reservation = self.reserve(pool)?;
        let (id, port) = (reservation.id, reservation.port);
        let dir = self.inner.pool_dir(pool);
        let root = dir.join(id.to_string()).join("root");
        let log = dir.join(format!("{id}.log"));
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let fill = |s: &str| fill(s, addr, &root, pool);
        let mut command = std::process::Command::new(&spec.program);
        command.args(spec.args.iter().map(|a| fill(a)));
        command.envs(spec.env.iter().map(|(k, v)| (k, fill(v))));
        let output = prepare(&root, &log).await?;
        let error_output = output.try_clone().map_err(prepare_error(&log))?;
        command
            .current_dir(&root)
            .stdin(Stdio::null())
            .stdout(output)
            .stderr(error_output);
        let child = self.inner.spawner.spawn(command).await.map_err(|source| {
            let program = spec.program.clone();
            DriverError::Spawn {
                pool: pool.clone(),
                program,
                source,
            }
        })?;
        let pid = child.id().expect("a just-spawned child has a pid");
        let replica = Replica {
            id,
            pool: pool.clone(),
            addr,
            pid,
            log,
        };
        tracing::info!(pool = %pool, replica = %id, pid, %addr, "replica started");
        reservation.commit(&replica, spec.grace, child, self.inner.events.clone());
        Ok(replica)
    }

    /// Stops `replica`: SIGTERM to its process group, SIGKILL after its grace period, and
    /// returns once it has been reaped. Stopping a replica that already exited is a no-op.
    pub async fn stop(&self, replica: &Replica) -> Result<(), DriverError> {
        let Some(mut exited) = self.inner.table.mark_stopping(replica) else {
            return Ok(());
        };
        let grace = exited.grace;
        signal_group(replica, Signal::TERM)?;
        let gone = tokio::time::timeout(grace, exited.wait()).await.is_ok();
        if !gone {
            // Its whole namespace (or group) goes; with a namespace, the exit is reaped only
            // once nothing of it is left.
            let kill = self.inner.spawner.kill(replica.pid);
            kill.map_err(|source| DriverError::Signal {
                replica: replica.clone(),
                source,
            })?;
        } else if !self.inner.spawner.isolated() {
            // The group may hold stragglers the leader left behind. The pid cannot have been
            // reused yet: the exit was collected an instant ago.
            signal_group(replica, Signal::KILL)?;
        }
        if !gone {
            let (pool, id) = (&replica.pool, replica.id);
            tracing::warn!(%pool, replica = %id, ?grace, "replica outlived its grace, killed");
            exited.wait().await;
        }
        Ok(())
    }

    /// Stops every replica of every pool, concurrently (for shutdown, once nothing starts
    /// replicas any more). Returns the first error, after trying them all.
    pub async fn stop_all(&self) -> Result<(), DriverError> {
        let mut stops = tokio::task::JoinSet::new();
        for replica in self.replicas() {
            let driver = self.clone();
            stops.spawn(async move { driver.stop(&replica).await });
        }
        let mut first_error = None;
        while let Some(done) = stops.join_next().await {
            if let Ok(Err(error)) = done {
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Whether each replica runs in its own PID and mount namespace, so that nothing it
    /// starts outlives it (see `sandbox`); false where that takes privileges bkpool lacks.
    pub fn isolates_replicas(&self) -> bool {
        self.inner.spawner.isolated()
    }

    /// Whether `replica`'s process is still running.
    pub fn is_running(&self, replica: &Replica) -> bool {
        self.inner.table.contains(replica)
    }

    /// Every running replica.
    pub fn replicas(&self) -> Vec<Replica> {
        self.inner.table.running()
    }

    /// Replica exits from now on, crashes included.
    pub fn subscribe(&self) -> broadcast::Receiver<DriverEvent> {
        self.inner.events.subscribe()
    }

    /// Claims a slot of `pool` and a free port, released unless the process starts.
    fn reserve(&self, pool: &PoolId) -> Result<Reservation, DriverError> {
        let reservation = self
            .inner
            .table
            .reserve(pool, |taken| self.free_port(taken));
        reservation.ok_or_else(|| DriverError::NoFreePort {
            pool: pool.clone(),
            ports: self.inner.ports.clone(),
        })
    }

    /// The next port of the range, round robin, that no replica holds and that binds now.
    fn free_port(&self, taken: &[u16]) -> Option<u16> {
        let ports = &self.inner.ports;
        if ports.is_empty() {
            return None;
        }
        let mut next = self.inner.next_port.lock().expect("port cursor lock");
        let len = usize::from(ports.end() - ports.start()) + 1;
        let from = ports
            .clone()
            .cycle()
            .skip(usize::from(*next - ports.start()));
        let port = from.take(len).find(|p| !taken.contains(p) && binds(*p))?;
        *next = if port == *ports.end() {
            *ports.start()
        } else {
            port + 1
        };
        Some(port)
    }
}

struct Inner {
    replicas_dir: PathBuf,
    ports: RangeInclusive<u16>,
    next_port: Mutex<u16>,
    spawner: Spawner,
    table: Arc<Table>,
    events: broadcast::Sender<DriverEvent>,
}

impl Inner {
    fn pool_dir(&self, pool: &PoolId) -> PathBuf {
        self.replicas_dir.join(pool.namespace()).join(pool.name())
    }
}

impl fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "r{}", self.0)
    }
}

fn fill(template: &str, addr: SocketAddr, root: &Path, pool: &PoolId) -> String {
    template
        .replace("{addr}", &addr.to_string())
        .replace("{port}", &addr.port().to_string())
        .replace("{root}", &root.to_string_lossy())
        .replace("{pool}", pool.as_str())
}

/// Creates the replica's root and opens its log for appending (earlier runs stay readable).
async fn prepare(root: &Path, log: &Path) -> Result<std::fs::File, DriverError> {
    tokio::fs::create_dir_all(root)
        .await
        .map_err(prepare_error(root))?;
    let file = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .await;
    Ok(file.map_err(prepare_error(log))?.into_std().await)
}

fn prepare_error(path: &Path) -> impl FnOnce(std::io::Error) -> DriverError + '_ {
    move |source| DriverError::Prepare {
        path: path.to_path_buf(),
        source,
    }
}

/// Whether a listener could bind `port` on loopback right now.
fn binds(port: u16) -> bool {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
}

/// Sends `signal` to the replica's process group; a group that no longer exists is fine.
fn signal_group(replica: &Replica, signal: Signal) -> Result<(), DriverError> {
    let pgid = i32::try_from(replica.pid).ok().and_then(Pid::from_raw);
    let pgid = pgid.expect("replica pids are positive i32");
    match rustix::process::kill_process_group(pgid, signal) {
        Ok(()) | Err(Errno::SRCH) => Ok(()),
        Err(errno) => Err(DriverError::Signal {
            replica: replica.clone(),
            source: errno.into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;
    use std::time::Instant;

    const QUICK: Duration = Duration::from_secs(5);

    fn pool(name: &str) -> PoolId {
        PoolId::new("ci", name).unwrap()
    }

    fn sh(script: &str, grace: Duration) -> ProcessSpec {
        ProcessSpec {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            env: vec![],
            grace,
        }
    }

    /// A driver over a fresh state directory and a range of ports free right now.
    fn driver() -> (LocalDriver, tempfile::TempDir, RangeInclusive<u16>) {
        let dir = tempfile::tempdir().unwrap();
        let ports = free_ports(8);
        (
            LocalDriver::new(dir.path().into(), ports.clone()),
            dir,
            ports,
        )
    }

    /// `n` consecutive loopback ports that all bind now, found from an ephemeral port.
    fn free_ports(n: u16) -> RangeInclusive<u16> {
        loop {
            let probe = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
            let start = probe.local_addr().unwrap().port();
            drop(probe);
            if let Some(end) = start.checked_add(n - 1)
                && (start..=end).all(binds)
            {
                return start..=end;
            }
        }
    }

    /// Whether `pid` is a live process (a zombie waiting for its reaper counts as gone).
    fn alive(pid: u32) -> bool {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return false;
        };
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next());
        !matches!(state, Some('Z' | 'X'))
    }

    async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + QUICK;
        while !check() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn next_exit(
        events: &mut broadcast::Receiver<DriverEvent>,
    ) -> (Replica, Option<ExitStatus>, bool) {
        let event = tokio::time::timeout(QUICK, events.recv())
            .await
            .unwrap()
            .unwrap();
        let DriverEvent::Exited {
            replica,
            status,
            requested,
        } = event;
        (replica, status, requested)
    }

    #[tokio::test]
    async fn a_replica_runs_in_its_own_group_with_its_root_log_and_placeholders() {
        let (driver, dir, ports) = driver();
        let spec = sh(
            "echo hello {pool} {port} $BKPOOL_ROOT; echo oops >&2; exec sleep 100",
            QUICK,
        );
        let spec = ProcessSpec {
            env: vec![("BKPOOL_ROOT".into(), "{root}".into())],
            ..spec
        };
        let replica = driver.start(&pool("a"), &spec).await.unwrap();

        assert!(ports.contains(&replica.addr.port()));
        assert_eq!(replica.addr.ip(), Ipv4Addr::LOCALHOST);
        assert_eq!(replica.id, ReplicaId(0));
        let pid = Pid::from_raw(replica.pid as i32).unwrap();
        assert_eq!(
            rustix::process::getpgid(Some(pid)).unwrap(),
            pid,
            "own process group"
        );
        let root = dir.path().join("replicas/ci/a/r0/root");
        assert!(root.is_dir());
        assert_eq!(replica.log, dir.path().join("replicas/ci/a/r0.log"));
        let read_log = || std::fs::read_to_string(&replica.log).unwrap_or_default();
        eventually("the log has both streams", || read_log().contains("oops")).await;
        let expected = format!("hello ci/a {} {}\n", replica.addr.port(), root.display());
        assert!(read_log().starts_with(&expected), "log: {:?}", read_log());
        assert!(driver.is_running(&replica));
        assert_eq!(driver.replicas(), vec![replica.clone()]);

        driver.stop(&replica).await.unwrap();
        assert!(!driver.is_running(&replica));
        assert!(!alive(replica.pid));
    }

    #[tokio::test]
    async fn stop_terms_a_polite_replica_and_reports_the_exit_as_requested() {
        let (driver, _dir, _) = driver();
        let mut events = driver.subscribe();
        let replica = driver
            .start(&pool("a"), &sh("exec sleep 100", QUICK))
            .await
            .unwrap();
        let started = Instant::now();
        driver.stop(&replica).await.unwrap();
        assert!(
            started.elapsed() < QUICK,
            "exited on SIGTERM, before the grace"
        );
        let (exited, status, requested) = next_exit(&mut events).await;
        assert_eq!(exited, replica);
        assert_eq!(status.unwrap().signal(), Some(libc_sigterm()));
        assert!(requested);
    }

    #[tokio::test]
    async fn a_replica_that_ignores_sigterm_is_killed_after_its_grace() {
        let (driver, _dir, _) = driver();
        let mut events = driver.subscribe();
        let grace = Duration::from_millis(300);
        let spec = sh("trap '' TERM; echo trapped; sleep 100", grace);
        let replica = driver.start(&pool("a"), &spec).await.unwrap();
        let trapped = || std::fs::read_to_string(&replica.log).unwrap_or_default() == "trapped\n";
        eventually("the TERM trap is set", trapped).await;
        let child_sleep = descendants(replica.pid);

        let started = Instant::now();
        driver.stop(&replica).await.unwrap();
        let took = started.elapsed();
        assert!(
            took >= grace && took < grace + Duration::from_secs(2),
            "took {took:?}"
        );
        let (_, status, _) = next_exit(&mut events).await;
        assert_eq!(status.unwrap().signal(), Some(9), "SIGKILL");
        // Everything went, not only the shell: its `sleep` ignored TERM too.
        assert!(!child_sleep.is_empty());
        eventually("the group is gone", || {
            !child_sleep.iter().any(|&p| alive(p))
        })
        .await;
    }

    #[tokio::test]
    async fn a_crash_is_reported_with_its_status() {
        let (driver, _dir, _) = driver();
        let mut events = driver.subscribe();
        let replica = driver
            .start(&pool("a"), &sh("exit 3", QUICK))
            .await
            .unwrap();
        let (exited, status, requested) = next_exit(&mut events).await;
        assert_eq!(exited, replica);
        assert_eq!(status.unwrap().code(), Some(3));
        assert!(!requested, "nobody asked: a crash");
        assert!(!driver.is_running(&replica));
        driver.stop(&replica).await.unwrap(); // stopping what already exited is a no-op
        driver.stop(&replica).await.unwrap();
    }

    #[tokio::test]
    async fn ports_in_use_are_skipped_and_replicas_never_share_one() {
        let (driver, _dir, ports) = driver();
        let busy = TcpListener::bind((Ipv4Addr::LOCALHOST, *ports.start())).unwrap();
        let spec = sh("exec sleep 100", QUICK);
        let a = driver.start(&pool("a"), &spec).await.unwrap();
        let b = driver.start(&pool("a"), &spec).await.unwrap();
        let c = driver.start(&pool("b"), &spec).await.unwrap();
        let used = [a.addr.port(), b.addr.port(), c.addr.port()];
        assert!(!used.contains(&busy.local_addr().unwrap().port()));
        assert!(used[0] != used[1] && used[1] != used[2] && used[0] != used[2]);
        assert_eq!(
            (a.id, b.id, c.id),
            (ReplicaId(0), ReplicaId(1), ReplicaId(0))
        );
        driver.stop_all().await.unwrap();
        assert!(driver.replicas().is_empty());
        assert!([&a, &b, &c].iter().all(|r| !alive(r.pid)));
    }

    #[tokio::test]
    async fn an_exhausted_port_range_is_a_typed_error_and_leaks_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let busy = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = busy.local_addr().unwrap().port();
        let driver = LocalDriver::new(dir.path().into(), port..=port);
        let error = driver
            .start(&pool("a"), &sh("exec sleep 100", QUICK))
            .await
            .unwrap_err();
        assert_eq!(error.reason(), "no_free_port", "{error}");
        drop(busy);
        let replica = driver
            .start(&pool("a"), &sh("exec sleep 100", QUICK))
            .await
            .unwrap();
        assert_eq!((replica.id, replica.addr.port()), (ReplicaId(0), port));
        driver.stop(&replica).await.unwrap();
    }

    #[tokio::test]
    async fn a_program_that_cannot_start_frees_its_slot() {
        let (driver, _dir, _) = driver();
        let spec = ProcessSpec {
            program: "/nonexistent/buildkitd".into(),
            ..sh("", QUICK)
        };
        let error = driver.start(&pool("a"), &spec).await.unwrap_err();
        assert_eq!(error.reason(), "spawn", "{error}");
        assert!(
            error.to_string().contains("/nonexistent/buildkitd"),
            "{error}"
        );
        let replica = driver
            .start(&pool("a"), &sh("exec sleep 100", QUICK))
            .await
            .unwrap();
        assert_eq!(replica.id, ReplicaId(0));
        driver.stop_all().await.unwrap();
    }

    #[tokio::test]
    async fn a_restarted_slot_is_a_new_replica() {
        let (driver, _dir, _) = driver();
        let spec = sh("exec sleep 100", QUICK);
        let first = driver.start(&pool("a"), &spec).await.unwrap();
        driver.stop(&first).await.unwrap();
        let second = driver.start(&pool("a"), &spec).await.unwrap();
        assert_eq!(second.id, first.id, "the slot (and its root) is reused");
        assert!(!driver.is_running(&first) && driver.is_running(&second));
        driver.stop(&first).await.unwrap(); // a stale handle stops nothing
        assert!(driver.is_running(&second));
        driver.stop_all().await.unwrap();
    }

    #[tokio::test]
    async fn concurrent_starts_take_distinct_slots_and_ports() {
        let (driver, _dir, _) = driver();
        let spec = sh("exec sleep 100", QUICK);
        let pool = pool("a");
        let (a, b) = tokio::join!(driver.start(&pool, &spec), driver.start(&pool, &spec));
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_ne!(a.id, b.id);
        assert_ne!(a.addr, b.addr);
        driver.stop_all().await.unwrap();
    }

    #[tokio::test]
    async fn dropping_the_driver_kills_its_replicas() {
        let (driver, _dir, _) = driver();
        let replica = driver
            .start(&pool("a"), &sh("exec sleep 100", QUICK))
            .await
            .unwrap();
        assert!(alive(replica.pid));
        drop(driver);
        eventually("the replica died with its driver", || !alive(replica.pid)).await;
    }

    /// Set to a state directory, it turns [`helper_bkpool_holding_a_replica`] into a stand-in
    /// bkpool process for [`a_killed_bkpool_leaves_no_replica`].
    const HELPER_ENV: &str = "BKPOOL_TEST_DRIVER_HELPER_DIR";
    const HELPER_TEST: &str = "driver::local::tests::helper_bkpool_holding_a_replica";

    #[test]
    fn helper_bkpool_holding_a_replica() {
        let Some(dir) = std::env::var_os(HELPER_ENV) else {
            return; // only meaningful when re-executed by the test below
        };
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let driver = LocalDriver::new(dir.into(), free_ports(4));
            // A replica that leaves a detached grandchild behind, as buildkitd leaves runc.
            let spec = sh("setsid sleep 1000 & exec sleep 1000", QUICK);
            let replica = driver.start(&pool("a"), &spec).await.unwrap();
            println!("replica-pid={}", replica.pid);
            std::future::pending::<()>().await
        });
    }

    #[tokio::test]
    async fn a_killed_bkpool_leaves_no_replica() {
        let dir = tempfile::tempdir().unwrap();
        let mut helper = tokio::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", HELPER_TEST, "--nocapture", "--test-threads=1"])
            .env(HELPER_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdout = helper.stdout.take().unwrap();
        let pid = tokio::time::timeout(QUICK, replica_pid(stdout)).await;
        let pid = pid.expect("the helper prints its replica's pid");
        assert!(alive(pid), "the replica runs while its bkpool does");
        let isolated = Spawner::start(tokio::runtime::Handle::current())
            .unwrap()
            .isolated();
        let mut tree = vec![pid];
        if isolated {
            eventually("the grandchild started", || descendants(pid).len() >= 3).await;
            tree.extend(descendants(pid));
        }

        helper.start_kill().unwrap(); // SIGKILL: no destructor, no stop_all
        helper.wait().await.unwrap();
        eventually(
            "the replica and all it started died with its bkpool",
            || !tree.iter().any(|&p| alive(p)),
        )
        .await;
        if !isolated {
            crate::testkit::skip(
                "replicas get no PID namespace here (not root): grandchildren not checked",
            );
        }
    }

    /// A driver whose replicas get their own namespaces, or a skip.
    fn isolating_driver() -> Option<(LocalDriver, tempfile::TempDir)> {
        let (driver, dir, _) = driver();
        if driver.isolates_replicas() {
            Some((driver, dir))
        } else {
            crate::testkit::skip("replicas get no PID namespace here (it takes root)");
            None
        }
    }

    #[tokio::test]
    async fn a_crashed_replica_leaves_nothing_it_started_and_reports_its_own_status() {
        let Some((driver, _dir)) = isolating_driver() else {
            return;
        };
        let mut events = driver.subscribe();
        let spec = sh("setsid sleep 1000 & exec sleep 1000", QUICK);
        let replica = driver.start(&pool("a"), &spec).await.unwrap();
        eventually("the grandchild started", || {
            descendants(replica.pid).len() >= 3
        })
        .await;
        let tree = descendants(replica.pid);
        // The shim's child is the namespace's init; the init's child is the replica itself.
        let init = children_of(replica.pid);
        let own = children_of(init[0]);
        assert_eq!(own.len(), 1, "{tree:?}");
        let pid = Pid::from_raw(own[0] as i32).unwrap();
        rustix::process::kill_process(pid, Signal::KILL).unwrap();

        let (exited, status, requested) = next_exit(&mut events).await;
        assert_eq!(exited, replica);
        assert_eq!(status.unwrap().signal(), Some(9), "the replica's own death");
        assert!(!requested, "a crash");
        eventually("nothing the replica started is left", || {
            !tree.iter().any(|&p| alive(p))
        })
        .await;
    }

    #[tokio::test]
    async fn a_stop_reaches_the_replica_once_through_its_init() {
        let Some((driver, dir)) = isolating_driver() else {
            return;
        };
        let mut events = driver.subscribe();
        let seen = dir.path().join("signals");
        let script = format!(
            "trap 'echo TERM >> {}; exit 0' TERM; echo ready; while :; do sleep 0.05; done",
            seen.display()
        );
        let replica = driver.start(&pool("a"), &sh(&script, QUICK)).await.unwrap();
        let ready = || std::fs::read_to_string(&replica.log).unwrap_or_default() == "ready\n";
        eventually("the trap is set", ready).await;
        driver.stop(&replica).await.unwrap();
        let (_, status, requested) = next_exit(&mut events).await;
        assert_eq!(status.unwrap().code(), Some(0), "exited by its own trap");
        assert!(requested);
        assert_eq!(std::fs::read_to_string(&seen).unwrap(), "TERM\n");
    }

    /// The pid the helper prints (libtest may put its own text before it on the line).
    async fn replica_pid(stdout: tokio::process::ChildStdout) -> u32 {
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some((_, pid)) = line.split_once("replica-pid=") {
                return pid.trim().parse().unwrap();
            }
        }
        panic!("the helper exited without printing a replica pid");
    }

    const STANDIN_ENV: &str = "BKPOOL_TEST_STANDIN_ADDR";
    const STANDIN_TEST: &str = "driver::local::tests::helper_standin_replica";

    /// Set to an address, it turns [`helper_standin_replica`] into a stand-in backend process.
    #[test]
    fn helper_standin_replica() {
        let Some(addr) = std::env::var_os(STANDIN_ENV) else {
            return; // only meaningful when started as a replica by the test below
        };
        let addr: SocketAddr = addr.to_str().unwrap().parse().unwrap();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
            crate::standin::serve(listener, std::future::pending()).await
        });
    }

    #[tokio::test]
    async fn a_started_replica_becomes_ready_and_stops() {
        let (driver, _dir, _) = driver();
        let spec = ProcessSpec {
            program: std::env::current_exe().unwrap(),
            args: ["--exact", STANDIN_TEST, "--nocapture", "--test-threads=1"]
                .map(String::from)
                .into(),
            env: vec![(STANDIN_ENV.into(), "{addr}".into())],
            grace: QUICK,
        };
        let started = Instant::now();
        let replica = driver.start(&pool("a"), &spec).await.unwrap();
        let probe = || crate::health::probe(replica.addr, Duration::from_millis(500));
        let ready = loop {
            match probe().await {
                Ok(health) => break health,
                Err(error) => assert!(started.elapsed() < QUICK, "never ready: {error}"),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert_eq!(ready, crate::health::Health::Serving);
        eprintln!("replica ready {:?} after start", started.elapsed());

        driver.stop(&replica).await.unwrap();
        let error = probe().await.unwrap_err();
        assert_eq!(error.reason(), "refused", "{error}");
    }

    /// Every process below `pid`, children first.
    fn descendants(pid: u32) -> Vec<u32> {
        let mut found = children_of(pid);
        let mut i = 0;
        while i < found.len() {
            let below = children_of(found[i]);
            found.extend(below);
            i += 1;
        }
        found
    }

    /// The pids whose parent is `pid`.
    fn children_of(pid: u32) -> Vec<u32> {
        let path = format!("/proc/{pid}/task/{pid}/children");
        let children = std::fs::read_to_string(path).unwrap_or_default();
        children
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }

    fn libc_sigterm() -> i32 {
        Signal::TERM.as_raw()
    }
}
