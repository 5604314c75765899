//! The one place where what a container was told is translated to this machine. A container
//! process runs on the host, not in its own mount and network namespaces, so:
//! - a mount path (`/etc/bkpool/tls`) becomes the directory the volume was materialized in,
//!   wherever it appears as a path in the command, arguments, environment values, working
//!   directory and exec probes (`--tlscert=/etc/bkpool/tls/tls.crt`,
//!   `unix:///run/buildkit/buildkitd.sock`);
//! - the wildcard address `0.0.0.0` becomes the pod's IP, so each pod listens on its own
//!   loopback address instead of every address of the host.
//!
//! Paths a program has compiled in (not named on its command line) are not seen, and
//! `127.0.0.1` stays the host's loopback, shared by every pod.

use std::net::Ipv4Addr;
use std::path::PathBuf;

/// How one container's view maps to the host.
#[derive(Debug, Clone)]
pub struct Rewrite {
    /// Mount path → host directory, longest mount path first.
    mounts: Vec<(String, PathBuf)>,
    pod_ip: Ipv4Addr,
}

impl Rewrite {
    pub fn new(mounts: impl IntoIterator<Item = (String, PathBuf)>, pod_ip: Ipv4Addr) -> Self {
        let mut mounts: Vec<(String, PathBuf)> = mounts
            .into_iter()
            .map(|(path, host)| (path.trim_end_matches('/').to_owned(), host))
            .filter(|(path, _)| !path.is_empty())
            .collect();
        mounts.sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));
        Rewrite { mounts, pod_ip }
    }

    /// `text` as the host must read it.
    pub fn apply(&self, text: &str) -> String {
        let text = self.paths(text);
        text.replace("0.0.0.0", &self.pod_ip.to_string())
    }

    /// Every mount path that starts a path in `text` replaced by its host directory: a path
    /// begins where no other path does (at the start, after a blank, `=`, `:`, a quote...; or
    /// after a URL's `://`, as in `unix:///run/x`) and the mount path must be followed by
    /// `/` or by the end of the path.
    fn paths(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        'scan: while !rest.is_empty() {
            let at_start = !out.ends_with(is_path_char) || out.ends_with("://");
            if at_start && rest.starts_with('/') {
                for (path, host) in &self.mounts {
                    let Some(after) = rest.strip_prefix(path.as_str()) else {
                        continue;
                    };
                    if after.starts_with('/') || !after.starts_with(is_path_char) {
                        out.push_str(&host.to_string_lossy());
                        rest = after;
                        continue 'scan;
                    }
                }
            }
            let c = rest.chars().next().expect("not empty");
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
        out
    }
}

/// A character that can be part of a path: a path never starts or ends next to one.
fn is_path_char(c: char) -> bool {
    c.is_alphanumeric() || matches!(c, '.' | '_' | '-' | '/')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewrite() -> Rewrite {
        Rewrite::new(
            [
                ("/etc/bkpool/tls".into(), PathBuf::from("/k/v/tls")),
                ("/run/buildkit/".into(), PathBuf::from("/k/v/run")),
                ("/etc/buildkit".into(), PathBuf::from("/k/v/config")),
                ("/etc/buildkit/nested".into(), PathBuf::from("/k/v/nested")),
            ],
            Ipv4Addr::new(127, 42, 0, 7),
        )
    }

    #[test]
    fn mount_paths_in_flags_urls_and_plain_arguments_point_at_the_volumes() {
        let r = rewrite();
        assert_eq!(
            r.apply("--tlscert=/etc/bkpool/tls/tls.crt"),
            "--tlscert=/k/v/tls/tls.crt"
        );
        assert_eq!(
            r.apply("--addr=unix:///run/buildkit/buildkitd.sock"),
            "--addr=unix:///k/v/run/buildkitd.sock"
        );
        assert_eq!(r.apply("/etc/buildkit"), "/k/v/config");
        assert_eq!(
            r.apply("/etc/buildkit/nested/x"),
            "/k/v/nested/x",
            "longest first"
        );
        assert_eq!(
            r.apply("a:/etc/buildkit/b,/run/buildkit"),
            "a:/k/v/config/b,/k/v/run"
        );
        assert_eq!(
            r.apply("cat /etc/buildkit\nls '/run/buildkit';(cd /etc/buildkit)"),
            "cat /k/v/config\nls '/k/v/run';(cd /k/v/config)",
            "in a shell script"
        );
    }

    #[test]
    fn look_alike_paths_and_relative_names_stay() {
        let r = rewrite();
        assert_eq!(r.apply("/etc/buildkitd.toml"), "/etc/buildkitd.toml");
        assert_eq!(r.apply("/opt/etc/buildkit/x"), "/opt/etc/buildkit/x");
        assert_eq!(r.apply("etc/buildkit"), "etc/buildkit");
        assert_eq!(r.apply("--debug"), "--debug");
    }

    #[test]
    fn the_wildcard_address_becomes_the_pod_ip() {
        assert_eq!(
            rewrite().apply("--addr=tcp://0.0.0.0:1234"),
            "--addr=tcp://127.42.0.7:1234"
        );
    }
}
