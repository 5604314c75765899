//! End-to-end with the real `buildctl` and `buildkitd`: a replica that takes 30 s to start,
//! longer than the 20 s a BuildKit client waits after connecting for its server's HTTP/2
//! preface. With the preface answered while the connection is held (the default), the first
//! build succeeds; without it, the same build fails on the client's own deadline.

mod support;

use std::time::{Duration, Instant};

use control::testkit::BuildKit;
use support::buildkit::{Context, Endpoint, build_ok, describe};
use support::local::{Local, local};

/// How long each replica sleeps before buildkitd starts: a node being added, an image pulled.
const START_DELAY: Duration = Duration::from_secs(30);

/// One pool whose replicas start buildkitd (with the default mTLS arguments) after
/// [`START_DELAY`].
fn slow_pool(buildkit: &BuildKit, extra: &str) -> String {
    let mut command = control::local_config::DEFAULT_COMMAND.map(str::to_owned);
    command[0] = buildkit.buildkitd.display().to_string();
    let script = format!(
        "sleep {}; exec {}",
        START_DELAY.as_secs(),
        command.join(" ")
    );
    format!(
        "[[pool]]\nname = \"default\"\n{extra}\n[pool.replica]\n\
         command = [\"sh\", \"-c\", {script:?}]\nstop_grace = \"5s\"\n"
    )
}

fn endpoint(bk: &Local) -> Endpoint {
    Endpoint::tls(bk.listen, &bk.issue("default"))
}

#[tokio::test]
async fn a_build_outlasts_a_thirty_second_wake_when_the_preface_is_answered() {
    let Some((buildkit, busybox)) = support::buildkit::tools() else {
        return;
    };
    let bk = local("31660-31669", &slow_pool(&buildkit, ""));
    let context = Context::new(&busybox, "after a slow wake", "");
    let began = Instant::now();
    build_ok(&buildkit, &endpoint(&bk), &context, "after a slow wake").await;
    assert!(
        began.elapsed() >= START_DELAY,
        "the build waited for the replica ({:?})",
        began.elapsed()
    );
    let answered = bk
        .metric("bkpool_gateway_held_prefaces_answered_total", &[])
        .await;
    assert!(answered >= 1.0, "the gateway answered the held preface");
}

#[tokio::test]
async fn without_the_answered_preface_the_same_build_fails_on_the_clients_deadline() {
    let Some((buildkit, busybox)) = support::buildkit::tools() else {
        return;
    };
    // The gateway would hold for a minute: only the client's deadline can end the attempt.
    let extra = "preface_while_waking = false\n[pool.scaling]\nwake_timeout = \"60s\"";
    let bk = local("31670-31679", &slow_pool(&buildkit, extra));
    let context = Context::new(&busybox, "never built", "");
    let began = Instant::now();
    let (output, _) = context.build(&buildkit, &endpoint(&bk)).await;
    let took = began.elapsed();
    assert!(!output.status.success(), "{}", describe(&output));
    assert!(
        took < START_DELAY,
        "the client gave up before the replica started ({took:?}): {}",
        describe(&output)
    );
    let answered = bk
        .metric("bkpool_gateway_held_prefaces_answered_total", &[])
        .await;
    assert_eq!(answered, 0.0);
}
