//! End-to-end: what the command line writes and says, apart from any one mode: `bkpool demo`
//! writes a directory that works wherever it was written from, and an error names each of
//! its causes once.

use std::path::Path;
use std::process::{Command, Output};

fn bkpool(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bkpool"))
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn demo_with_a_relative_out_writes_a_configuration_that_starts() {
    let dir = tempfile::tempdir().unwrap();
    let demo = bkpool(dir.path(), &["demo", "--out", "demo", "--pool", "a"]);
    assert!(demo.status.success(), "{}", text(&demo));
    assert!(dir.path().join("demo/pki/gateway/server.pem").exists());
    assert!(!dir.path().join("demo/demo").exists(), "{}", text(&demo));

    // From where it was written, and from anywhere else.
    for (cwd, config) in [
        (dir.path().to_path_buf(), "demo/gateway.toml".to_owned()),
        (
            std::env::temp_dir(),
            dir.path().join("demo/gateway.toml").display().to_string(),
        ),
    ] {
        let check = bkpool(&cwd, &["gateway", "--check", "--config", &config]);
        assert!(
            check.status.success(),
            "from {}: {}",
            cwd.display(),
            text(&check)
        );
        assert!(text(&check).contains("configuration OK: 1 pool(s)"));
    }
}

#[test]
fn an_error_names_each_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        "listen = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\
         [[server_cert]]\ncert = \"/bkpool-missing.pem\"\nkey = \"/bkpool-missing.key\"\n\
         [[pool]]\nname = \"a\"\nbackends = [\"127.0.0.1:1\"]\nclient_ca = \"/bkpool-missing-ca.pem\"\n",
    )
    .unwrap();
    let out = bkpool(
        dir.path(),
        &["gateway", "--config", config.to_str().unwrap()],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/bkpool-missing.pem"), "{stderr}");
    assert_eq!(
        stderr.matches("No such file or directory").count(),
        1,
        "{stderr}"
    );
    assert_eq!(stderr.matches("/bkpool-missing.pem").count(), 1, "{stderr}");
}
