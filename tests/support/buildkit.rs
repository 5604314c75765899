//! The real BuildKit in tests: `buildctl` calls with their output kept, a small build context
//! whose `RUN` steps execute a static busybox (so runc runs too), a buildkitd of the test's
//! own, and the processes a test must see gone.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use control::driver::local::{LocalDriver, ProcessSpec};
use control::testkit::BuildKit;
use proxy::names::PoolId;

/// What a test needs to build: BuildKit and a static busybox, or a skip.
pub fn tools() -> Option<(BuildKit, PathBuf)> {
    let buildkit = control::testkit::buildkit()?;
    let busybox = control::testkit::static_busybox()?;
    Some((buildkit, busybox))
}

/// A buildkitd started by the test on a free loopback port, through bkpool's own process
/// driver: in its own PID and mount namespace, so nothing of it (runc, build steps, overlay
/// mounts) outlives the test. Killed on drop.
pub struct Daemon {
    pub addr: SocketAddr,
    /// How a client reaches it directly.
    pub endpoint: Endpoint,
    _driver: LocalDriver,
    _dir: tempfile::TempDir,
}

/// The mTLS a [`Daemon`] serves.
pub struct DaemonTls<'a> {
    /// `ca.pem` (the CA its clients must come from), its own `cert.pem` and `key.pem`; the
    /// certificate must name 127.0.0.1.
    pub serve: &'a Path,
    /// A `--tlsdir` its clients can use (to find out when it is ready).
    pub client: &'a Path,
}

impl Daemon {
    /// Starts buildkitd, serving `tls` or plaintext; returns once it answers
    /// `buildctl debug workers`.
    pub async fn start(buildkit: &BuildKit, tls: Option<DaemonTls<'_>>) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let driver = LocalDriver::new(dir.path().to_path_buf(), port..=port);
        let mut args: Vec<String> = ["--addr", "tcp://{addr}", "--root", "{root}"]
            .map(String::from)
            .into();
        if let Some(tls) = &tls {
            let files = [
                ("--tlscacert", "ca.pem"),
                ("--tlscert", "cert.pem"),
                ("--tlskey", "key.pem"),
            ];
            for (flag, file) in files {
                args.push(flag.into());
                args.push(tls.serve.join(file).display().to_string());
            }
        }
        let spec = ProcessSpec {
            program: buildkit.buildkitd.clone(),
            args,
            env: Vec::new(),
            grace: Duration::from_secs(5),
        };
        let pool = PoolId::new("test", "daemon").unwrap();
        let replica = driver.start(&pool, &spec).await.expect("buildkitd starts");
        let endpoint = match &tls {
            Some(tls) => Endpoint::tls(replica.addr, tls.client),
            None => Endpoint {
                addr: format!("tcp://{}", replica.addr),
                tlsdir: None,
                server_name: None,
            },
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while let Err(error) = workers(buildkit, &endpoint).await {
            let log = std::fs::read_to_string(&replica.log).unwrap_or_default();
            let late = std::time::Instant::now() > deadline;
            assert!(!late, "buildkitd never answered: {error}\nits log:\n{log}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Daemon {
            addr: replica.addr,
            endpoint,
            _driver: driver,
            _dir: dir,
        }
    }
}

/// A loopback port free right now.
fn free_port() -> u16 {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    probe.local_addr().unwrap().port()
}

/// How `buildctl` reaches its server.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub addr: String,
    /// A `--tlsdir` (ca.pem, cert.pem, key.pem), if any.
    pub tlsdir: Option<PathBuf>,
    /// `--tlsservername`, when the name to verify is not the address's.
    pub server_name: Option<String>,
}

impl Endpoint {
    pub fn tls(addr: impl std::fmt::Display, tlsdir: &Path) -> Self {
        Endpoint {
            addr: format!("tcp://{addr}"),
            tlsdir: Some(tlsdir.to_path_buf()),
            server_name: None,
        }
    }
}

/// Runs `buildctl` against `endpoint` with `args`; its output, whatever the outcome.
pub async fn buildctl(buildkit: &BuildKit, endpoint: &Endpoint, args: &[&str]) -> Output {
    let mut command = tokio::process::Command::new(&buildkit.buildctl);
    command.arg("--addr").arg(&endpoint.addr);
    if let Some(dir) = &endpoint.tlsdir {
        command.arg("--tlsdir").arg(dir);
    }
    if let Some(name) = &endpoint.server_name {
        command.arg("--tlsservername").arg(name);
    }
    command.args(args).kill_on_drop(true);
    command.output().await.expect("buildctl runs")
}

/// `buildctl debug workers`: the worker IDs the server reports.
pub async fn workers(buildkit: &BuildKit, endpoint: &Endpoint) -> Result<Vec<String>, String> {
    let out = buildctl(buildkit, endpoint, &["debug", "workers"]).await;
    if !out.status.success() {
        return Err(describe(&out));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // The first column of each line after the header.
    Ok(text
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect())
}

/// A build context: busybox, a file, and a Dockerfile whose `RUN` writes `out.txt` from the
/// file (with `run` added to the shell script, e.g. a `sleep`).
pub struct Context {
    pub dir: tempfile::TempDir,
}

impl Context {
    pub fn new(busybox: &Path, greeting: &str, run: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(busybox, dir.path().join("busybox")).unwrap();
        std::fs::write(dir.path().join("hello.txt"), format!("{greeting}\n")).unwrap();
        let script = format!(
            "{run}/bin/busybox cat /hello.txt > /out.txt && /bin/busybox echo built >> /out.txt"
        );
        let dockerfile = format!(
            "FROM scratch\nCOPY busybox /bin/busybox\nCOPY hello.txt /hello.txt\n\
             RUN [\"/bin/busybox\", \"sh\", \"-c\", {script:?}]\n"
        );
        std::fs::write(dir.path().join("Dockerfile"), dockerfile).unwrap();
        Context { dir }
    }

    /// What `out.txt` holds after a build of this context.
    pub fn expected(greeting: &str) -> String {
        format!("{greeting}\nbuilt\n")
    }

    /// Builds through `endpoint`, exporting the result to a new directory; the output and
    /// that directory.
    pub async fn build(
        &self,
        buildkit: &BuildKit,
        endpoint: &Endpoint,
    ) -> (Output, tempfile::TempDir) {
        let out = tempfile::tempdir().unwrap();
        let output = dockerfile_build(buildkit, endpoint, self.dir.path(), Some(out.path())).await;
        (output, out)
    }
}

/// `buildctl build` of the Dockerfile in `dir` (the context too) with plain progress, its
/// result exported to `out` if given; the output, whatever the outcome.
pub async fn dockerfile_build(
    buildkit: &BuildKit,
    endpoint: &Endpoint,
    dir: &Path,
    out: Option<&Path>,
) -> Output {
    let context = format!("context={}", dir.display());
    let dockerfile = format!("dockerfile={}", dir.display());
    let mut args = vec![
        "build".to_owned(),
        "--progress".into(),
        "plain".into(),
        "--frontend".into(),
        "dockerfile.v0".into(),
        "--local".into(),
        context,
        "--local".into(),
        dockerfile,
    ];
    if let Some(out) = out {
        args.push("--output".into());
        args.push(format!("type=local,dest={}", out.display()));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    buildctl(buildkit, endpoint, &args).await
}

/// Builds and checks `out.txt`; returns buildctl's progress output (stderr).
pub async fn build_ok(
    buildkit: &BuildKit,
    endpoint: &Endpoint,
    context: &Context,
    greeting: &str,
) -> String {
    let (output, out) = context.build(buildkit, endpoint).await;
    assert!(
        output.status.success(),
        "build failed: {}",
        describe(&output)
    );
    let built = std::fs::read_to_string(out.path().join("out.txt")).unwrap_or_default();
    assert_eq!(built, Context::expected(greeting), "{}", describe(&output));
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A process's output, for a failing test's message.
pub fn describe(output: &Output) -> String {
    format!(
        "{}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Live processes whose command line contains `text` (zombies count as gone).
pub fn processes_with(text: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| pid_is_live(*pid))
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline.contains(text)
        })
        .collect()
}

fn pid_is_live(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit_once(')')
        .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
}

/// Waits up to `within` for `check`; whether it held.
pub async fn within(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    check()
}
