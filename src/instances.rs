//! Running `bkpool local` instances, so that a command run beside one (`bkpool cert issue`)
//! uses its state directory instead of guessing one. While it runs, each instance keeps a
//! record (its pid, state directory and configuration file) in the runtime directory
//! (`$XDG_RUNTIME_DIR/bkpool`, else `bkpool-<uid>` in the temporary directory, 0700) and
//! removes it when it stops; a record whose process is gone (`kill -9`) is ignored and removed.

use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One running `bkpool local`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Instance {
    pub pid: u32,
    pub state_dir: PathBuf,
    /// Its configuration file (absolute), `None` for the embedded default.
    pub config: Option<PathBuf>,
}

/// This process's record, removed on drop.
pub struct Registration(Option<PathBuf>);

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(path) = &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Records this process as a `bkpool local` with `state_dir` and `config`. A failure only
/// costs the finding, so it is logged, not returned.
pub fn register(state_dir: &Path, config: Option<&Path>) -> Registration {
    let pid = std::process::id();
    let record = Instance {
        pid,
        state_dir: absolute(state_dir),
        config: config.map(absolute),
    };
    let written = runtime_dir().and_then(|dir| {
        let path = dir.join(format!("local-{pid}.json"));
        let text = serde_json::to_vec(&record).map_err(std::io::Error::other)?;
        std::fs::write(&path, text)?;
        Ok(path)
    });
    match written {
        Ok(path) => Registration(Some(path)),
        Err(error) => {
            tracing::warn!(%error, "cannot record this instance: `bkpool cert issue` will need --state-dir");
            Registration(None)
        }
    }
}

/// The `bkpool local` instances running now with configuration `config` (`None`: the
/// embedded default).
pub fn running_with(config: Option<&Path>) -> Vec<Instance> {
    let config = config.map(absolute);
    running()
        .into_iter()
        .filter(|i| i.config.as_deref().map(absolute) == config)
        .collect()
}

/// Every `bkpool local` instance running now.
fn running() -> Vec<Instance> {
    let Ok(dir) = runtime_dir() else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for path in entries.flatten().map(|e| e.path()) {
        let is_record = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("local-") && n.ends_with(".json"));
        if !is_record {
            continue;
        }
        let record = std::fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<Instance>(&bytes).ok());
        match record {
            Some(instance) if is_bkpool(instance.pid) => found.push(instance),
            // Left by an instance that did not stop cleanly.
            _ => {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    found.sort_by_key(|i| i.pid);
    found
}

/// Whether `pid` is a live `bkpool` process (not another that reused the pid).
fn is_bkpool(pid: u32) -> bool {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"));
    let ours = std::env::current_exe();
    match (exe, ours) {
        (Ok(exe), Ok(ours)) => exe.file_name() == ours.file_name(),
        _ => false,
    }
}

/// The runtime directory, created 0700 if missing; refused if another user owns it.
fn runtime_dir() -> std::io::Result<PathBuf> {
    let dir = match std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        Some(runtime) => PathBuf::from(runtime).join("bkpool"),
        None => std::env::temp_dir().join(format!("bkpool-{}", uid()?)),
    };
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    // In a shared temporary directory, someone else may have made it first.
    let meta = std::fs::symlink_metadata(&dir)?;
    if !meta.is_dir() || meta.uid() != uid()? {
        return Err(std::io::Error::other(format!(
            "{} is not a directory of this user",
            dir.display()
        )));
    }
    Ok(dir)
}

/// This process's user id.
fn uid() -> std::io::Result<u32> {
    Ok(std::fs::metadata("/proc/self")?.uid())
}

fn absolute(path: &Path) -> PathBuf {
    std::fs::canonicalize(path)
        .or_else(|_| std::path::absolute(path))
        .unwrap_or_else(|_| path.to_path_buf())
}
