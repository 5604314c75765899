//! A skip is never silent: this binary runs its own probe test again as a child process,
//! once as CI would (the skip fails the test) and once as a developer would (the test
//! passes and the skip is recorded in `BKPOOL_SKIP_LOG` with the test's name and reason).

use std::process::Command;

/// Skips only when run as the probe; run normally it passes without doing anything.
#[test]
fn probe() {
    if std::env::var_os("BKPOOL_TESTKIT_PROBE").is_some() {
        control::testkit::skip("the probe has nothing to run against");
    }
}

fn run_probe(ci: Option<&str>, log: &std::path::Path) -> std::process::Output {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args(["--exact", "probe", "--test-threads", "1"])
        .env("BKPOOL_TESTKIT_PROBE", "1")
        .env("BKPOOL_SKIP_LOG", log)
        .env_remove("CI");
    if let Some(ci) = ci {
        command.env("CI", ci);
    }
    command.output().unwrap()
}

#[test]
fn in_ci_a_skip_fails_the_test() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("skips");
    let out = run_probe(Some("true"), &log);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stdout.contains("probe cannot run: the probe has nothing to run against"),
        "{stdout}"
    );
    assert!(!log.exists(), "a failure is not recorded as a skip");
}

#[test]
fn outside_ci_a_skip_passes_and_is_recorded_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("skips");
    for ci in [None, Some("false")] {
        let out = run_probe(ci, &log);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let recorded = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<_> = recorded.lines().collect();
    assert_eq!(lines.len(), 2, "{recorded}");
    for line in lines {
        assert_eq!(
            line,
            "testkit_skip::probe\tthe probe has nothing to run against"
        );
    }
}
