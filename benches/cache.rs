//! What cache-affine routing is worth to a build farm. BuildKit's cache lives with a replica,
//! so a repository that built on replica 0 builds from cache only if it comes back to
//! replica 0. This runs the same workload through `bkpool local` twice, once with
//! `balance = "affine"` (the default) and once with `balance = "least-loaded"`, and counts the
//! build steps BuildKit reports `CACHED` against those it ran.
//!
//! Workload: 12 repositories (distinct build contexts, each a Dockerfile of three `RUN` steps
//! over its own source file), each built `ROUNDS` times as its own client identity, in one
//! shuffled order fixed by a seed; `CLIENTS` builds run at once, on a pool held at 3 replicas.
//! (Letting the pool scale out from zero made the comparison one of scale-out timing: one run
//! would reach 3 replicas, the next stay at 2.) Each mode starts with empty caches.
//!
//! `cargo bench --bench cache` as root, with the real BuildKit on PATH
//! (`../shared/tools/buildkit/build.sh`) and a static busybox (`busybox-static`).
//! `BKPOOL_BENCH_SEED` changes the order, `BKPOOL_BENCH_LOAD_BOUND` sets the affine pool's
//! `load_bound` (default: the pool's default). It prints, per mode, steps cached and run, the
//! cache-hit ratio, the replicas started and the total time, then the ratio of hit ratios.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use control::testkit::BuildKit;
use support::buildkit::{Endpoint, describe, dockerfile_build};
use support::local::Local;

const POOL: &str = "default";
const REPOSITORIES: usize = 12;
const ROUNDS: usize = 4;
const CLIENTS: usize = 6;
/// The pool's replicas, held up throughout.
const REPLICAS: usize = 3;
/// The Dockerfile's steps: two `COPY`, three `RUN`.
const STEPS: usize = 5;

fn main() {
    let Some((buildkit, busybox)) =
        control::testkit::buildkit().zip(control::testkit::static_busybox())
    else {
        eprintln!("cache: needs buildkitd and buildctl on PATH and a static busybox");
        std::process::exit(2);
    };
    let seed = std::env::var("BKPOOL_BENCH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2016);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run(buildkit, busybox, seed));
}

async fn run(buildkit: BuildKit, busybox: PathBuf, seed: u64) {
    let repos: Vec<Repository> = (0..REPOSITORIES)
        .map(|i| Repository::new(&busybox, i))
        .collect();
    let order = shuffled(seed);
    println!(
        "cache: {REPOSITORIES} repositories x {ROUNDS} builds, {CLIENTS} at once, seed {seed}"
    );
    let mut results = Vec::new();
    let bound: f64 = std::env::var("BKPOOL_BENCH_LOAD_BOUND")
        .ok()
        .and_then(|b| b.parse().ok())
        .unwrap_or(proxy::affinity::DEFAULT_LOAD_BOUND);
    let affine = format!("load_bound = {bound}\n");
    for (mode, ports, extra) in [
        ("affine", "31920-31929", affine.as_str()),
        ("least-loaded", "31930-31939", ""),
    ] {
        let result = Mode::new(&buildkit, mode, extra, ports, &repos)
            .run(&order, bound)
            .await;
        println!(
            "{mode:>13}: {:>3} steps cached, {:>3} run, hit ratio {:.2}, {} replicas, {:.1} s",
            result.cached,
            result.ran,
            result.hit_ratio(),
            result.replicas,
            result.took.as_secs_f64()
        );
        let load = &result.load;
        let cap = (bound * load.busiest_of as f64 / REPLICAS as f64).ceil();
        println!(
            "{:>13}  busiest replica {} of {} connections (bound: ceil(c x average) = {cap}); \
             above the bound in {} of {} samples",
            "", load.busiest, load.busiest_of, load.above, load.samples
        );
        results.push(result);
    }
    let (affine, least) = (&results[0], &results[1]);
    println!(
        "affine / least-loaded: hit ratio x{:.2}, time x{:.2}",
        affine.hit_ratio() / least.hit_ratio().max(f64::EPSILON),
        affine.took.as_secs_f64() / least.took.as_secs_f64()
    );
}

/// One build context: busybox, a source file of its own, three dependent `RUN` steps.
struct Repository {
    name: String,
    dir: tempfile::TempDir,
}

impl Repository {
    fn new(busybox: &Path, i: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(busybox, dir.path().join("busybox")).unwrap();
        std::fs::write(dir.path().join("src.txt"), format!("repository {i}\n")).unwrap();
        let run = |script: &str| format!("RUN [\"/bin/busybox\", \"sh\", \"-c\", {script:?}]\n");
        let dockerfile =
            String::from("FROM scratch\nCOPY busybox /bin/busybox\nCOPY src.txt /src.txt\n")
                + &run("/bin/busybox sleep 1 && /bin/busybox md5sum /src.txt > /a")
                + &run("/bin/busybox sleep 1 && /bin/busybox cat /a /a > /b")
                + &run("/bin/busybox sleep 1 && /bin/busybox wc -c /b > /c");
        std::fs::write(dir.path().join("Dockerfile"), dockerfile).unwrap();
        Repository {
            name: format!("ci/repo-{i}"),
            dir,
        }
    }
}

/// Every repository `ROUNDS` times, shuffled by a seeded xorshift (Fisher–Yates).
fn shuffled(seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..REPOSITORIES * ROUNDS)
        .map(|i| i % REPOSITORIES)
        .collect();
    let mut state = seed.max(1);
    for i in (1..order.len()).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        order.swap(i, (state % (i as u64 + 1)) as usize);
    }
    order
}

/// One `bkpool local` with one balance mode, and an identity per repository.
struct Mode<'a> {
    buildkit: &'a BuildKit,
    local: Local,
    repos: &'a [Repository],
    tls: Vec<PathBuf>,
}

#[derive(Default)]
struct Outcome {
    cached: usize,
    ran: usize,
    replicas: usize,
    took: Duration,
    load: Loads,
}

/// Replica loads sampled from `/pools` while the builds run.
#[derive(Default)]
struct Loads {
    /// The most connections one replica carried, and how many the pool had then.
    busiest: usize,
    busiest_of: usize,
    /// Samples in which a replica carried more than `⌈c × average⌉`, of those with any
    /// connection. The bound holds when a connection is placed; one that ends elsewhere can
    /// leave a replica above it until its own connections end.
    above: usize,
    samples: usize,
}

impl Outcome {
    fn hit_ratio(&self) -> f64 {
        self.cached as f64 / (self.cached + self.ran).max(1) as f64
    }
}

impl<'a> Mode<'a> {
    fn new(
        buildkit: &'a BuildKit,
        balance: &str,
        extra: &str,
        ports: &str,
        repos: &'a [Repository],
    ) -> Self {
        let mut command = control::local_config::DEFAULT_COMMAND.map(|a| format!("{a:?}"));
        command[0] = format!("{:?}", buildkit.buildkitd.display().to_string());
        let body = format!(
            "[[pool]]\nname = \"{POOL}\"\nbalance = \"{balance}\"\n{extra}[pool.scaling]\n\
             min_replicas = {REPLICAS}\nmax_replicas = {REPLICAS}\nidle_after = \"10m\"\n\
             [pool.replica]\ncommand = [{}]\nstop_grace = \"5s\"\n",
            command.join(", ")
        );
        let local = support::local::local(ports, &body);
        let tls = repos
            .iter()
            .map(|repo| {
                let out = local.dir.path().join(repo.name.replace('/', "-"));
                let args = ["--pool", POOL, "--identity", &repo.name, "--ttl", "1h"];
                let issued = local.cert_issue(&args, &out);
                assert!(issued.status.success(), "{}", describe(&issued));
                out
            })
            .collect();
        Mode {
            buildkit,
            local,
            repos,
            tls,
        }
    }

    async fn run(&self, order: &[usize], bound: f64) -> Outcome {
        let queue = Arc::new(Mutex::new(order.to_vec()));
        let totals = Arc::new(Mutex::new(Outcome::default()));
        let began = Instant::now();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let sampler = self.sample_loads(bound, stopped);
        let clients: Vec<_> = (0..CLIENTS)
            .map(|_| {
                let (queue, totals) = (queue.clone(), totals.clone());
                let builds: Vec<(PathBuf, Endpoint)> = self
                    .repos
                    .iter()
                    .zip(&self.tls)
                    .map(|(repo, tls)| {
                        (
                            repo.dir.path().to_path_buf(),
                            Endpoint::tls(self.local.listen, tls),
                        )
                    })
                    .collect();
                let buildkit = self.buildkit.clone();
                tokio::spawn(async move {
                    loop {
                        let Some(next) = queue.lock().unwrap().pop() else {
                            return;
                        };
                        let (dir, endpoint) = &builds[next];
                        let (cached, ran) = build(&buildkit, endpoint, dir).await;
                        let mut totals = totals.lock().unwrap();
                        totals.cached += cached;
                        totals.ran += ran;
                    }
                })
            })
            .collect();
        let clients = async {
            for client in clients {
                client.await.expect("a client finished");
            }
            let _ = stop.send(());
        };
        let ((), load) = tokio::join!(clients, sampler);
        let took = began.elapsed();
        let replicas = self.replicas_started().await;
        let mut totals = std::mem::take(&mut *totals.lock().unwrap());
        totals.took = took;
        totals.replicas = replicas;
        totals.load = load;
        totals
    }

    /// Polls the pool's replica loads every 100 ms until `stopped`.
    async fn sample_loads(
        &self,
        bound: f64,
        mut stopped: tokio::sync::oneshot::Receiver<()>,
    ) -> Loads {
        let mut loads = Loads::default();
        loop {
            let pool = self.local.pool(POOL).await;
            let each: Vec<usize> = pool.replicas.iter().map(|r| r.load).collect();
            let total: usize = each.iter().sum();
            let busiest = each.iter().copied().max().unwrap_or(0);
            if total > 0 {
                loads.samples += 1;
                let cap = (bound * total as f64 / each.len() as f64).ceil() as usize;
                loads.above += usize::from(busiest > cap);
                if busiest > loads.busiest {
                    (loads.busiest, loads.busiest_of) = (busiest, total);
                }
            }
            tokio::select! {
                _ = &mut stopped => return loads,
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    }

    async fn replicas_started(&self) -> usize {
        self.local.pool(POOL).await.replicas.len()
    }
}

/// Builds `dir` through `endpoint`; the Dockerfile steps BuildKit reported cached and run.
async fn build(buildkit: &BuildKit, endpoint: &Endpoint, dir: &Path) -> (usize, usize) {
    let output = dockerfile_build(buildkit, endpoint, dir, None).await;
    assert!(
        output.status.success(),
        "build failed: {}",
        describe(&output)
    );
    steps(&String::from_utf8_lossy(&output.stderr))
}

/// From `--progress plain`: of the Dockerfile's [`STEPS`] steps (`#N [i/n] ...`), how many
/// BuildKit took from its cache and how many it ran (`#N DONE` without `#N CACHED`). A step
/// it never shows counts as cached: with the result cached, BuildKit skips showing the steps
/// before it.
fn steps(progress: &str) -> (usize, usize) {
    let mut steps = BTreeSet::new();
    let mut done = BTreeSet::new();
    let mut cached = BTreeSet::new();
    for line in progress.lines() {
        let mut words = line.split_whitespace();
        let (Some(vertex), Some(next)) = (words.next(), words.next()) else {
            continue;
        };
        if !vertex.starts_with('#') {
            continue;
        }
        if next.starts_with('[') && next.contains('/') && !next.starts_with("[internal]") {
            steps.insert(vertex.to_owned());
        } else if next == "CACHED" {
            cached.insert(vertex.to_owned());
        } else if next == "DONE" {
            done.insert(vertex.to_owned());
        }
    }
    let ran = steps
        .iter()
        .filter(|v| done.contains(*v) && !cached.contains(*v))
        .count();
    (STEPS - ran.min(STEPS), ran.min(STEPS))
}
