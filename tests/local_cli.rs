//! End-to-end: the `bkpool local` family on the command line: `cert issue` limits and files,
//! `status`, and refusals before anything starts.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use control::health::Health;
use support::local::local;

const POOL: &str =
    "[[pool]]\nname = \"default\"\nmax_cert_ttl = \"30m\"\n[pool.replica]\nstandin = true\n";

fn bkpool(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_bkpool"))
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test]
async fn cert_issue_writes_a_tlsdir_with_a_private_key_and_refuses_long_ttls() {
    let bk = local("31200-31209", POOL);
    let out = bk.dir.path().join("too-long");
    let refused = bk.cert_issue(&["--pool", "default", "--ttl", "2h"], &out);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("max_cert_ttl (30m)"), "{stderr}");
    assert!(!out.exists(), "nothing written when refused");

    let unknown = bk.cert_issue(&["--pool", "other"], &out);
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no pool local/other"));

    let out = bk.dir.path().join("tls");
    let issued = bk.cert_issue(
        &[
            "--pool",
            "default",
            "--ttl",
            "30m",
            "--identity",
            "ci@example",
        ],
        &out,
    );
    assert!(
        issued.status.success(),
        "{}",
        String::from_utf8_lossy(&issued.stderr)
    );
    let stdout = String::from_utf8_lossy(&issued.stdout);
    let dir = out.display();
    assert!(
        stdout.contains(&format!("--tlsdir {dir} build")),
        "{stdout}"
    );
    assert!(
        stdout.contains("docker buildx create --name bkpool --driver remote"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "cacert={dir}/ca.pem,cert={dir}/cert.pem,key={dir}/key.pem"
        )),
        "{stdout}"
    );
    let mode = |f: &str| std::fs::metadata(out.join(f)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("key.pem"), 0o600);
    assert_eq!(mode("cert.pem"), 0o644);
    // The files work: a health check through the gateway with them.
    assert_eq!(bk.health(&out).await.unwrap(), Health::Serving);
}

/// `bkpool cert issue` for pool `default` into `out`, run as a user whose home is `home`,
/// with no state directory named unless `state_dir`.
fn issue_as_user(
    bk: &support::local::Local,
    home: &std::path::Path,
    state_dir: Option<&std::path::Path>,
    out: &std::path::Path,
) -> std::process::Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_bkpool"));
    command
        .args([
            "cert", "issue", "--pool", "default", "--ttl", "10m", "--config",
        ])
        .arg(bk.config_path())
        .arg("--out")
        .arg(out)
        .env("HOME", home)
        .env("XDG_RUNTIME_DIR", bk.dir.path())
        .env_remove("XDG_STATE_HOME")
        .env_remove("BKPOOL_STATE_DIR");
    if let Some(dir) = state_dir {
        command.arg("--state-dir").arg(dir);
    }
    command.output().unwrap()
}

#[tokio::test]
async fn cert_issue_finds_the_running_instances_pki_and_never_makes_a_ca() {
    let mut bk = local("31220-31229", POOL);
    let home = bk.dir.path().join("home");
    let default_state = home.join(".local/state/bkpool");

    // No --state-dir: the running instance's, not the default (which stays untouched).
    let out = bk.dir.path().join("found");
    let issued = issue_as_user(&bk, &home, None, &out);
    let stderr = String::from_utf8_lossy(&issued.stderr);
    assert!(issued.status.success(), "{stderr}");
    assert!(
        !home.exists(),
        "nothing created under the default state directory"
    );
    assert_eq!(bk.health(&out).await.unwrap(), Health::Serving);

    // Another state directory than the running instance's: refused, naming both.
    let other = bk.dir.path().join("other-state");
    let out = bk.dir.path().join("other");
    let refused = issue_as_user(&bk, &home, Some(&other), &out);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    let running = bk.state_dir().display().to_string();
    assert!(
        stderr.contains(&running) && stderr.contains(&other.display().to_string()),
        "{stderr}"
    );
    assert!(!other.exists() && !out.exists(), "nothing created");

    // Nothing running: the default state directory, which has no PKI, and none is made.
    bk.child.kill().unwrap();
    bk.child.wait().unwrap();
    let refused = issue_as_user(&bk, &home, None, &out);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("no PKI in {}", default_state.display())),
        "{stderr}"
    );
    assert!(!home.exists() && !out.exists(), "no CA, no certificate");
}

#[tokio::test]
async fn status_prints_the_pools() {
    let bk = local("31210-31219", POOL);
    let admin = bk.admin.to_string();
    let asleep = bkpool(&["status", "--admin", &admin]);
    assert!(
        asleep.status.success(),
        "{}",
        String::from_utf8_lossy(&asleep.stderr)
    );
    let text = String::from_utf8_lossy(&asleep.stdout).to_string();
    let line = text
        .lines()
        .find(|l| l.starts_with("local/default"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        line.contains("sleeping") && line.contains("0/1") && line.ends_with("never"),
        "{text}"
    );

    let tls = bk.issue("default");
    assert_eq!(bk.health(&tls).await.unwrap(), Health::Serving);
    let awake = bkpool(&["status", "--admin", &admin]);
    let text = String::from_utf8_lossy(&awake.stdout).to_string();
    assert!(text.contains("ready") && text.contains("1/1"), "{text}");
    assert!(
        text.contains("  r0 ") && text.contains("127.0.0.1:3121"),
        "{text}"
    );

    let nobody = bkpool(&["status", "--admin", "127.0.0.1:1"]);
    assert!(!nobody.status.success());
    assert!(String::from_utf8_lossy(&nobody.stderr).contains("is `bkpool local` running?"));
}

#[test]
fn bad_configurations_and_missing_programs_are_refused_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(
        &config,
        "[[pool]]\nname = \"Bad\"\n[pool.scaling]\nidle_after = \"soon\"\n",
    )
    .unwrap();
    let state = dir.path().join("state");
    let out = bkpool(&[
        "local",
        "--config",
        config.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("pool[0].name") && stderr.contains("pool[0].scaling.idle_after"),
        "{stderr}"
    );
    assert!(!state.exists(), "nothing created");

    std::fs::write(
        &config,
        "listen = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n[[pool]]\nname = \"a\"\n[pool.replica]\ncommand = [\"bkpool-no-such-buildkitd\", \"--tlscert={tls}/cert.pem\"]\n",
    )
    .unwrap();
    let out = bkpool(&[
        "local",
        "--config",
        config.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("not on PATH") && stderr.contains("bkpool local --standin"),
        "{stderr}"
    );
}
