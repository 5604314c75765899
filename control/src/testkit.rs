//! Test support shared by every test of the workspace (feature `test-util`): the one way a
//! test says it cannot run here, and the look-ups of what tests need from outside the project
//! (a Kubernetes API server, BuildKit's binaries, `openssl`, a static busybox).
//!
//! A skip is never silent. With `CI` set it fails the test: CI provides everything, so a
//! missing piece there is a broken set-up, not a reason to pass. Without `CI` it is printed
//! and, when `BKPOOL_SKIP_LOG` names a file, appended there (one line per skip, test and
//! reason), which `scripts/test.sh` lists after cargo's summary: cargo itself can only count a
//! skipped test as passed.

use std::fmt::Display;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The variable naming the file skips are recorded in.
pub const SKIP_LOG: &str = "BKPOOL_SKIP_LOG";

/// Records that the calling test cannot run, and why. With `CI` set it panics instead, so
/// the test fails. Call it, then return from the test.
///
/// # Panics
/// When `CI` is set (and not `0` or `false`).
pub fn skip(reason: impl Display) {
    let test = current_test();
    if in_ci() {
        panic!("{test} cannot run: {reason} (CI is set, so this is a failure, not a skip)");
    }
    eprintln!("skipped: {test}: {reason}");
    if let Some(path) = std::env::var_os(SKIP_LOG) {
        // One write of one short line with O_APPEND: concurrent tests never interleave.
        let line = format!("{test}\t{reason}\n");
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = written {
            panic!("recording a skip in {}: {e}", Path::new(&path).display());
        }
    }
}

/// Whether the tests run in CI, where nothing may be skipped.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !matches!(v.as_str(), "" | "0" | "false"))
}

/// The kubeconfig of the test cluster from `BKPOOL_TEST_KUBECONFIG`, or a skip.
pub fn kubeconfig() -> Option<PathBuf> {
    match std::env::var_os("BKPOOL_TEST_KUBECONFIG") {
        Some(path) => Some(path.into()),
        None => {
            skip("BKPOOL_TEST_KUBECONFIG is not set (../shared/tools/kube-local/start.sh)");
            None
        }
    }
}

/// `name` found on `PATH`, or a skip.
pub fn program(name: &str) -> Option<PathBuf> {
    let found = on_path(name);
    if found.is_none() {
        skip(format!("{name} is not on PATH"));
    }
    found
}

/// The real BuildKit client and daemon.
#[derive(Debug, Clone)]
pub struct BuildKit {
    pub buildctl: PathBuf,
    pub buildkitd: PathBuf,
}

impl BuildKit {
    /// The directory holding both binaries.
    pub fn bin_dir(&self) -> &Path {
        self.buildkitd.parent().expect("an absolute path")
    }
}

/// `buildctl` and `buildkitd` from `PATH`, able to run builds here (root, `runc`), or a skip.
pub fn buildkit() -> Option<BuildKit> {
    let how = "BIN=$(../shared/tools/buildkit/build.sh); export PATH=$BIN:$PATH";
    let (Some(buildctl), Some(buildkitd)) = (on_path("buildctl"), on_path("buildkitd")) else {
        skip(format!("buildctl and buildkitd are not on PATH ({how})"));
        return None;
    };
    if !rustix::process::geteuid().is_root() {
        skip("buildkitd's OCI worker needs root");
        return None;
    }
    if on_path("runc").is_none() {
        skip("runc (for RUN steps) is not on PATH (apt-get install runc)");
        return None;
    }
    Some(BuildKit {
        buildctl,
        buildkitd,
    })
}

/// A statically linked busybox, runnable in a `FROM scratch` image, or a skip.
pub fn static_busybox() -> Option<PathBuf> {
    let found = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| std::fs::read(p).is_ok_and(|elf| is_static_elf(&elf)));
    if found.is_none() {
        skip("no statically linked busybox (apt-get install busybox-static)");
    }
    found
}

/// `name` in a directory of `PATH`, if it is there.
pub fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Whether `elf` is a 64-bit little-endian ELF file without an interpreter (`PT_INTERP`):
/// one that needs no dynamic loader or libraries.
fn is_static_elf(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 || elf[5] != 1 {
        return false;
    }
    let u16_at = |at: usize| u16::from_le_bytes([elf[at], elf[at + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[32..40].try_into().expect("8 bytes")) as usize;
    let (entry_size, entries) = (u16_at(54), u16_at(56));
    (0..entries).all(|i| {
        let at = phoff + i * entry_size;
        elf.get(at..at + 4)
            .is_some_and(|t| u32::from_le_bytes(t.try_into().expect("4 bytes")) != PT_INTERP)
    })
}

/// The running test as `binary::test`: libtest names each test's thread after the test.
fn current_test() -> String {
    let binary = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_default();
    // Cargo names test binaries `<target>-<hash>`.
    let binary = binary.rsplit_once('-').map_or(binary.as_str(), |(b, _)| b);
    let thread = std::thread::current();
    format!("{binary}::{}", thread.name().unwrap_or("?"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_and_dynamic_executables_are_told_apart() {
        let shell = std::fs::read("/bin/sh").unwrap();
        assert!(!is_static_elf(&shell), "/bin/sh is dynamically linked");
        assert!(!is_static_elf(
            b"#!/bin/sh\necho not an ELF file at all, but long enough"
        ));
        if let Some(busybox) = ["/bin/busybox"].iter().find(|p| Path::new(p).exists()) {
            let elf = std::fs::read(busybox).unwrap();
            // Debian's busybox-static and busybox install the same path: either is fine here,
            // the look-up only has to agree with what the loader would need.
            let needs_loader = elf.windows(11).any(|w| w == b"/lib64/ld-l");
            assert_eq!(is_static_elf(&elf), !needs_loader);
        }
    }

    #[test]
    fn the_test_is_named_after_its_binary_and_thread() {
        let name = current_test();
        assert!(
            name.ends_with("::testkit::tests::the_test_is_named_after_its_binary_and_thread"),
            "{name}"
        );
    }
}
