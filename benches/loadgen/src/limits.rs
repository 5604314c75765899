//! Raising the open-file limit: the idle scenario holds thousands of sockets.

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// Raises the soft RLIMIT_NOFILE to the hard limit and returns it.
pub fn raise_nofile() -> std::io::Result<u64> {
    let limit = getrlimit(Resource::Nofile);
    let raised = Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    setrlimit(Resource::Nofile, raised)?;
    Ok(limit.maximum.unwrap_or(u64::MAX))
}
