//! End-to-end: `bkpool local` with the real `buildkitd` and `buildctl`. Builds whose `RUN`
//! steps execute a static busybox (so runc runs too) go through a sleeping pool, many at once,
//! across a `RUN` step silent for longer than `idle_after`, and across sleep and wake; and
//! nothing a replica started outlives it, whether bkpool is killed with `kill -9` or buildkitd
//! itself crashes in the middle of a build.

mod support;

use std::path::Path;
use std::time::Duration;

use control::scale::Phase;
use control::testkit::BuildKit;
use support::buildkit::{Context, Endpoint, build_ok, describe, processes_with, within};
use support::local::{Local, local};

/// One pool running the real buildkitd with the default command, idle after `idle_after`.
fn buildkit_pool(buildkit: &BuildKit, scaling: &str) -> String {
    let mut command = control::local_config::DEFAULT_COMMAND.map(|a| format!("{a:?}"));
    command[0] = format!("{:?}", buildkit.buildkitd.display().to_string());
    format!(
        "[[pool]]\nname = \"default\"\n[pool.scaling]\n{scaling}\n\
         [pool.replica]\ncommand = [{}]\nstop_grace = \"5s\"\n",
        command.join(", ")
    )
}

/// `buildctl`'s way through the gateway as the pool's client.
fn endpoint(bk: &Local) -> Endpoint {
    Endpoint::tls(bk.listen, &bk.issue("default"))
}

/// Live processes of this test's bkpool: anything whose command line names its directory
/// (bkpool itself, each replica's shim and init, buildkitd, the runc it runs).
fn processes_of(bk: &Local) -> Vec<u32> {
    processes_with(&bk.dir.path().display().to_string())
}

#[tokio::test]
async fn a_cold_build_through_a_sleeping_pool_runs_its_steps_and_exports_them() {
    let Some((buildkit, busybox)) = support::buildkit::tools() else {
        return;
    };
    let bk = local("31600-31609", &buildkit_pool(&buildkit, ""));
    let endpoint = endpoint(&bk);
    assert_eq!(bk.pool("default").await.state, Phase::Sleeping);
    assert!(bk.replica_pids().is_empty(), "nothing runs before a build");

    let context = Context::new(&busybox, "hello from a cold pool", "");
    let progress = build_ok(&buildkit, &endpoint, &context, "hello from a cold pool").await;
    assert!(progress.contains("RUN"), "{progress}");
    let pool = bk.pool("default").await;
    assert_eq!((pool.state, pool.replicas.len()), (Phase::Ready, 1));
    let wakes = bk
        .metric(
            "bkpool_controller_wakes_total",
            &[("pool", "local/default"), ("result", "ok")],
        )
        .await;
    assert_eq!(wakes, 1.0);
}

#[tokio::test]
async fn twenty_concurrent_cold_builds_wake_one_replica_and_all_succeed() {
    let Some((buildkit, busybox)) = support::buildkit::tools() else {
        return;
    };
    // Room for three replicas, but twenty connections are far below the policy's target per
    // replica: one wake, one replica.
    let scaling = "max_replicas = 3\ntarget_connections_per_replica = 100";
    let bk = local("31610-31619", &buildkit_pool(&buildkit, scaling));
    let endpoint = endpoint(&bk);
    let context = std::sync::Arc::new(Context::new(&busybox, "twenty at once", ""));
    let builds: Vec<_> = (0..20)
        .map(|_| {
            let (buildkit, endpoint, context) =
                (buildkit.clone(), endpoint.clone(), context.clone());
            tokio::spawn(async move {
                build_ok(&buildkit, &endpoint, &context, "twenty at once").await;
            })
        })
        .collect();
    for build in builds {
        build.await.expect("every build succeeds");
    }
    let up = bk
        .metric(
            "bkpool_controller_scale_events_total",
            &[
                ("pool", "local/default"),
                ("direction", "up"),
                ("reason", "wake"),
            ],
        )
        .await;
    assert_eq!(up, 1.0, "one wake");
    assert_eq!(bk.pool("default").await.replicas.len(), 1);
    assert_eq!(bk.replica_pids().len(), 1, "one replica process");
}

#[tokio::test]
async fn a_run_step_silent_longer_than_idle_after_keeps_the_pool_awake() {
    let Some((buildkit, busybox)) = support::buildkit::tools() else {
        return;
    };
    let scaling = "idle_after = \"1s\"\nmin_up_after_wake = \"0s\"";
    let bk = local("31620-31629", &buildkit_pool(&buildkit, scaling));
    let endpoint = endpoint(&bk);
    // Three times idle_after without a byte on the connection.
    let context = Context::new(&busybox, "after a long silence", "/bin/busybox sleep 3 && ");
    build_ok(&buildkit, &endpoint, &context, "after a long silence").await;
    let down = bk
        .metric(
            "bkpool_controller_scale_events_total",
            &[("pool", "local/default"), ("direction", "down")],
        )
        .await;
    assert_eq!(down, 0.0, "never scaled down during the build");
    let wakes = bk
        .metric(
            "bkpool_controller_wakes_total",
            &[("pool", "local/default"), ("result", "ok")],
        )
        .await;
    assert_eq!(wakes, 1.0, "one wake, no second one");
}

#[tokio::test]
async fn a_pool_that_slept_builds_again_from_its_cache() {
    let Some((buildkit, busybox)) = support::buildkit::tools() else {
        return;
    };
    let scaling = "idle_after = \"1s\"\nmin_up_after_wake = \"0s\"";
    let bk = local("31630-31639", &buildkit_pool(&buildkit, scaling));
    let endpoint = endpoint(&bk);
    let context = Context::new(&busybox, "kept across sleep", "");
    let first = build_ok(&buildkit, &endpoint, &context, "kept across sleep").await;
    assert!(!first.contains("CACHED"), "a first build: {first}");
    bk.wait_phase("default", Phase::Sleeping, Duration::from_secs(15))
        .await;
    assert!(
        within(Duration::from_secs(10), || bk.replica_pids().is_empty()).await,
        "the replica stopped"
    );

    // The same slot wakes with the same root: buildkitd finds its cache there.
    let second = build_ok(&buildkit, &endpoint, &context, "kept across sleep").await;
    assert!(
        second.contains("CACHED"),
        "the RUN step comes from the cache: {second}"
    );
    let wakes = bk
        .metric(
            "bkpool_controller_wakes_total",
            &[("pool", "local/default"), ("result", "ok")],
        )
        .await;
    assert_eq!(wakes, 2.0);
}

#[tokio::test]
async fn kill_9_of_bkpool_mid_build_leaves_no_buildkitd_and_no_build_step() {
    let Some((buildkit, busybox)) = support::buildkit::tools() else {
        return;
    };
    let mut bk = local("31640-31649", &buildkit_pool(&buildkit, ""));
    let endpoint = endpoint(&bk);
    let context = Context::new(&busybox, "never finished", "/bin/busybox sleep 4711 && ");
    let build = tokio::spawn({
        let (buildkit, endpoint) = (buildkit.clone(), endpoint.clone());
        async move { context.build(&buildkit, &endpoint).await }
    });
    let step = wait_for_step(&bk, "sleep 4711").await;
    let tree = processes_of(&bk);
    assert!(
        tree.len() >= 4,
        "bkpool, shim, init, buildkitd at least: {tree:?}"
    );

    bk.child.kill().unwrap(); // SIGKILL
    bk.child.wait().unwrap();
    let gone = within(Duration::from_secs(10), || {
        processes_of(&bk).is_empty() && processes_with("sleep 4711").is_empty()
    })
    .await;
    assert!(
        gone,
        "left behind: {:?} (the step was {step:?})",
        processes_of(&bk)
    );
    let (output, _) = build.await.unwrap();
    assert!(!output.status.success(), "{}", describe(&output));
}

#[tokio::test]
async fn a_crash_of_buildkitd_mid_build_ends_its_build_steps_and_the_next_build_wakes_a_new_one() {
    let Some((buildkit, busybox)) = support::buildkit::tools() else {
        return;
    };
    let bk = local("31650-31659", &buildkit_pool(&buildkit, ""));
    let endpoint = endpoint(&bk);
    let doomed = Context::new(&busybox, "crashed", "/bin/busybox sleep 4712 && ");
    let build = tokio::spawn({
        let (buildkit, endpoint) = (buildkit.clone(), endpoint.clone());
        async move { doomed.build(&buildkit, &endpoint).await }
    });
    wait_for_step(&bk, "sleep 4712").await;
    let daemons = buildkitds_under(bk.dir.path());
    assert_eq!(daemons.len(), 1, "{daemons:?}");
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &daemons[0].to_string()])
        .status()
        .unwrap();
    assert!(killed.success());

    // The client of the crashed replica gets an error, and the build step dies with its
    // daemon instead of running on unowned.
    let (output, _) = build.await.unwrap();
    assert!(!output.status.success(), "{}", describe(&output));
    let ended = within(Duration::from_secs(10), || {
        processes_with("sleep 4712").is_empty()
    })
    .await;
    assert!(
        ended,
        "build step outlived buildkitd: {:?}",
        processes_with("sleep 4712")
    );
    assert!(
        within(Duration::from_secs(10), || bk.replica_pids().is_empty()).await,
        "the crashed replica is gone: {:?}",
        bk.replica_pids()
    );

    // The next build wakes a fresh replica.
    let context = Context::new(&busybox, "after the crash", "");
    build_ok(&buildkit, &endpoint, &context, "after the crash").await;
    assert_eq!(buildkitds_under(bk.dir.path()).len(), 1);
}

/// Waits (up to 60 s: the replica starts, then the build reaches its `RUN` step) until a
/// build step whose command line holds `marker` runs; its pids.
async fn wait_for_step(bk: &Local, marker: &str) -> Vec<u32> {
    let started = within(Duration::from_secs(60), || {
        !processes_with(marker).is_empty()
    })
    .await;
    assert!(started, "the build step never ran:\n{}", bk.log_text());
    processes_with(marker)
}

/// buildkitd processes whose command line names a directory under `dir`.
fn buildkitds_under(dir: &Path) -> Vec<u32> {
    processes_with(&dir.display().to_string())
        .into_iter()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim() == "buildkitd")
        })
        .collect()
}
