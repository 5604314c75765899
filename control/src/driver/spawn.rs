//! How replica processes are forked so that none outlives bkpool, even after `kill -9`, and
//! nothing a replica starts outlives the replica.
//!
//! Where the machine allows it (root), each replica runs in its own PID and mount namespace
//! under a tiny init ([`super::sandbox`]). Elsewhere it runs as a plain child in its own
//! process group, which covers the replica but not what it leaves behind if it crashes; that
//! is said once, in a warning, when the spawner starts.
//!
//! Either way the kernel's parent-death signal (`PR_SET_PDEATHSIG`) is set in the child
//! between fork and exec, which takes `CommandExt::pre_exec`, an `unsafe` API: hence
//! `allow(unsafe_code)` here and in `sandbox`, and nowhere else in the driver. The signal
//! fires when the *thread* that forked exits, and tokio's blocking threads exit when idle, so
//! every fork happens on one long-lived spawner thread fed by a channel.

#![allow(unsafe_code)]

use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::mpsc;

use rustix::io::Errno;
use rustix::process::{Pid, Signal};
use tokio::sync::oneshot;

/// The handle to the spawner thread. Dropping the last one ends the thread, and with it
/// (by the parent-death signal) every process it started.
pub(crate) struct Spawner {
    jobs: mpsc::Sender<Job>,
    isolated: bool,
}

struct Job {
    command: Command,
    reply: oneshot::Sender<io::Result<tokio::process::Child>>,
}

impl Spawner {
    /// Starts the spawner thread. Children are registered with `runtime`, which reaps them.
    pub(crate) fn start(runtime: tokio::runtime::Handle) -> io::Result<Self> {
        let isolated = isolation();
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("bkpool-spawner".into())
            .spawn(move || {
                let _runtime = runtime.enter();
                for job in queue {
                    // Nobody waits for it any more (start() was cancelled): a process nobody
                    // tracks would hold its port until bkpool exits, so end it now.
                    let spawned = spawn(job.command, isolated);
                    if let Err(Ok(mut unwanted)) = job.reply.send(spawned) {
                        let _ = unwanted.start_kill();
                    }
                }
            })?;
        Ok(Spawner { jobs, isolated })
    }

    /// Whether processes get their own PID and mount namespaces.
    pub(crate) fn isolated(&self) -> bool {
        self.isolated
    }

    /// Kills process `pid` started here and everything it started: its whole namespace
    /// (reaping `pid` then means all of it is gone), or else its process group. One that is
    /// gone already is fine.
    pub(crate) fn kill(&self, pid: u32) -> io::Result<()> {
        let killed = if self.isolated {
            super::sandbox::kill(pid)
        } else {
            let pgid = i32::try_from(pid).ok().and_then(Pid::from_raw);
            let pgid = pgid.ok_or_else(|| io::Error::from_raw_os_error(libc::ESRCH))?;
            rustix::process::kill_process_group(pgid, Signal::KILL).map_err(io::Error::from)
        };
        match killed {
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            other => other,
        }
    }

    /// Starts `command` in its own process group, bound to die with bkpool.
    pub(crate) async fn spawn(&self, command: Command) -> io::Result<tokio::process::Child> {
        let gone = || io::Error::other("the spawner thread is gone");
        let (reply, answer) = oneshot::channel();
        self.jobs.send(Job { command, reply }).map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

/// Whether the sandbox works here, found once per process (and said once).
fn isolation() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        let available = super::sandbox::available();
        if !available {
            tracing::warn!(
                "replicas run without their own PID namespace (it takes root): a replica that \
                 crashes can leave the processes it started behind"
            );
        }
        available
    })
}

/// Runs on the spawner thread: the forking thread, whose exit the children watch.
fn spawn(mut command: Command, isolated: bool) -> io::Result<tokio::process::Child> {
    let parent = rustix::process::getpid();
    // Its own group, so stop() can signal the replica and everything it started at once.
    command.process_group(0);
    // SAFETY: the closure runs in the forked child before exec, where only async-signal-safe
    // operations are allowed. `die_with` makes two raw system calls (prctl, getppid) through
    // rustix; `sandbox::enter` is written for exactly this place (see its safety section).
    // Neither allocates, takes a lock or touches state shared with the parent.
    unsafe {
        if isolated {
            let parent = parent.as_raw_nonzero().get();
            command.pre_exec(move || super::sandbox::enter(parent));
        } else {
            command.pre_exec(move || die_with(parent));
        }
    }
    tokio::process::Command::from(command).spawn()
}

/// In the child: ask for SIGKILL when the forking thread exits, then make sure the parent
/// did not already die before the request took effect (it would never fire then).
fn die_with(parent: Pid) -> io::Result<()> {
    rustix::process::set_parent_process_death_signal(Some(Signal::KILL))?;
    if rustix::process::getppid() != Some(parent) {
        return Err(Errno::SRCH.into());
    }
    Ok(())
}
