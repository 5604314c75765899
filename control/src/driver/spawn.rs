//! How replica processes are forked so that none outlives bkpool, even after `kill -9`.
//!
//! The kernel's parent-death signal (`PR_SET_PDEATHSIG`) must be set in the child between
//! fork and exec, which takes `CommandExt::pre_exec`, an `unsafe` API: hence
//! `allow(unsafe_code)` here and nowhere else in the driver. The signal fires when the
//! *thread* that forked exits, and tokio's blocking threads exit when idle, so every fork
//! happens on one long-lived spawner thread fed by a channel.

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
}

struct Job {
    command: Command,
    reply: oneshot::Sender<io::Result<tokio::process::Child>>,
}

impl Spawner {
    /// Starts the spawner thread. Children are registered with `runtime`, which reaps them.
    pub(crate) fn start(runtime: tokio::runtime::Handle) -> io::Result<Self> {
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("bkpool-spawner".into())
            .spawn(move || {
                let _runtime = runtime.enter();
                for job in queue {
                    // Nobody waits for it any more (start() was cancelled): a process nobody
                    // tracks would hold its port until bkpool exits, so end it now.
                    if let Err(Ok(mut unwanted)) = job.reply.send(spawn(job.command)) {
                        let _ = unwanted.start_kill();
                    }
                }
            })?;
        Ok(Spawner { jobs })
    }

    /// Starts `command` in its own process group, bound to die with bkpool.
    pub(crate) async fn spawn(&self, command: Command) -> io::Result<tokio::process::Child> {
        let gone = || io::Error::other("the spawner thread is gone");
        let (reply, answer) = oneshot::channel();
        self.jobs.send(Job { command, reply }).map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

/// Runs on the spawner thread: the forking thread, whose exit the children watch.
fn spawn(mut command: Command) -> io::Result<tokio::process::Child> {
    let parent = rustix::process::getpid();
    // Its own group, so stop() can signal the replica and everything it started at once.
    command.process_group(0);
    // SAFETY: the closure runs in the forked child before exec, where only async-signal-safe
    // operations are allowed. It makes two raw system calls (prctl, getppid) through rustix,
    // allocates nothing, takes no lock and touches no state shared with the parent.
    unsafe {
        command.pre_exec(move || die_with(parent));
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
