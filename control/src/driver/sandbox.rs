//! Each replica in its own PID and mount namespace under a tiny init, so that nothing it
//! starts outlives it: not buildkitd, not the `runc` it runs, not a build step's processes,
//! whether bkpool is killed with `kill -9` or buildkitd itself crashes.
//!
//! Why a PID namespace: when the init of a PID namespace dies, the kernel kills every process
//! left in it (and in the namespaces nested in it), at once and without bookkeeping, however
//! deep the tree and whoever reparented it. A cgroup would need a hierarchy bkpool may write
//! (here there is only cgroup v1 with none delegated) and a kill loop racing forks. A mount
//! namespace comes with it for two reasons: a new PID namespace needs its own `/proc` (runc
//! reads `/proc/<pid>` of the pids it sees, which are the namespace's), and the overlay mounts
//! buildkitd makes go away with the namespace instead of staying in the host's table.
//!
//! The process tree of one replica:
//!
//! ```text
//! bkpool ── shim      host pid, group leader: what the driver signals, waits for, reaps
//!             └─ init     pid 1 of the new namespaces: passes signals on, reaps orphans
//!                  └─ replica  pid 2, the exec'd program (buildkitd)
//! ```
//!
//! - The shim passes SIGTERM (and INT, HUP, QUIT, USR1, USR2) to init and exits exactly as
//!   the replica did (init sends it the wait status over a socket pair), so the driver sees
//!   the replica's own exit status. Asked by [`kill`], it SIGKILLs init instead, and exits
//!   once init is gone, which is once the kernel has emptied the namespace: when the driver
//!   has reaped the shim, nothing of the replica is left.
//! - Init passes those signals to the replica (a namespace's init ignores signals it has no
//!   handler for, hence the handlers), reaps every orphan, and exits when the replica does:
//!   the kernel then kills whatever is left. It runs in its own session, so a signal to the
//!   shim's process group reaches the replica once, through the shim, not three times.
//! - bkpool's death kills the shim (the parent-death signal of the spawner thread, see
//!   `spawn`), the shim's death kills init (its own parent-death signal), init's death kills
//!   the rest.
//!
//! All of it runs in forked children before exec: only async-signal-safe system calls, no
//! allocation, no locks. Forks are raw `clone` system calls, so no `atfork` handler of the
//! multi-threaded parent runs in between. Creating namespaces needs root (CAP_SYS_ADMIN);
//! [`available`] finds out once whether this machine allows it.

#![allow(unsafe_code)]

use std::io;
use std::sync::atomic::{AtomicI32, Ordering};

use libc::{c_int, pid_t};

/// The signals passed down from the shim to init to the replica.
const FORWARDED: [c_int; 6] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// Where this process passes forwarded signals (0: nowhere). Set only in a shim or an init,
/// each a process of its own after the fork.
static TARGET: AtomicI32 = AtomicI32::new(0);

/// The signal that asks a shim to kill its namespace (a real-time signal nothing else uses),
/// as the shim knows it.
static KILL_REQUEST: AtomicI32 = AtomicI32::new(0);

/// The signal that asks a shim to kill its namespace.
fn kill_request() -> c_int {
    // glibc keeps the first two real-time signals for itself.
    libc::SIGRTMIN() + 2
}

/// Kills the replica whose shim is `shim`, with everything in its namespace. The shim exits
/// once all of it is gone.
pub(crate) fn kill(shim: u32) -> io::Result<()> {
    let pid = pid_t::try_from(shim).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: kill(2) of a process this driver started and has not reaped yet.
    if unsafe { libc::kill(pid, kill_request()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether replicas can get their own namespaces here: tried once, in a throwaway child that
/// makes them and mounts its `/proc` the way [`enter`] does.
pub(crate) fn available() -> bool {
    // SAFETY: the child makes only raw system calls (mount, _exit) before exiting; the parent
    // waits for that exact pid, which no one else reaps (it is not a tokio child).
    unsafe {
        let pid = clone(libc::CLONE_NEWPID | libc::CLONE_NEWNS);
        if pid == 0 {
            let code = if mount_own_proc().is_ok() { 0 } else { 1 };
            libc::_exit(code);
        }
        if pid < 0 {
            return false;
        }
        let status = wait_for(pid);
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0
    }
}

/// Runs in the child forked for a replica, before exec: becomes the shim, forks init into new
/// namespaces, which forks the replica. Returns `Ok` only in the replica, which then execs;
/// the shim and init never return. `parent` is bkpool's pid, to notice that it died before
/// the parent-death signal was set.
///
/// # Safety
/// Only in a forked child before exec (`CommandExt::pre_exec`), where nothing but
/// async-signal-safe calls may run.
pub(crate) unsafe fn enter(parent: pid_t) -> io::Result<()> {
    // SAFETY (whole function): raw system calls on this process's own state, on file
    // descriptors it just made, and on its own children; no allocation and no lock.
    unsafe {
        // Signals stay pending until each process has its handlers, so none is lost.
        let mut all = std::mem::zeroed::<libc::sigset_t>();
        libc::sigfillset(&mut all);
        libc::sigprocmask(libc::SIG_BLOCK, &all, std::ptr::null_mut());
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::getppid() != parent {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        KILL_REQUEST.store(kill_request(), Ordering::Relaxed);
        // The shim's end [0] tells init the shim is alive and receives the exit status.
        let mut pair = [0; 2];
        let flags = libc::SOCK_STREAM | libc::SOCK_CLOEXEC;
        if libc::socketpair(libc::AF_UNIX, flags, 0, pair.as_mut_ptr()) != 0 {
            return Err(io::Error::last_os_error());
        }
        let init = clone(libc::CLONE_NEWPID | libc::CLONE_NEWNS);
        match init {
            -1 => Err(io::Error::last_os_error()),
            0 => {
                libc::close(pair[0]);
                init_then_replica(pair[1])
            }
            init => {
                libc::close(pair[1]);
                shim(init, pair[0])
            }
        }
    }
}

/// The shim: passes signals to init, waits for it, and exits as the replica did.
unsafe fn shim(init: pid_t, status_from_init: c_int) -> ! {
    // SAFETY: see `enter`.
    unsafe {
        // std's exec-error pipe (and anything else inherited) is the replica's business.
        close_all_but(status_from_init);
        TARGET.store(init, Ordering::Relaxed);
        handle_forwarded();
        handle(KILL_REQUEST.load(Ordering::Relaxed));
        unblock_all();
        let init_status = wait_for(init);
        let mut raw = [0u8; 4];
        let got = libc::read(status_from_init, raw.as_mut_ptr().cast(), raw.len());
        let status = if got == 4 {
            c_int::from_ne_bytes(raw)
        } else {
            init_status
        };
        exit_as(status)
    }
}

/// Pid 1 of the new namespaces: mounts its `/proc`, starts the replica, then reaps until it
/// exits. Returns `Ok` in the replica only.
unsafe fn init_then_replica(to_shim: c_int) -> io::Result<()> {
    // SAFETY: see `enter`.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        // The shim may have died before that took effect: then no one holds its end.
        let mut poll = libc::pollfd {
            fd: to_shim,
            events: libc::POLLIN,
            revents: 0,
        };
        if libc::poll(&mut poll, 1, 0) != 0 && poll.revents & libc::POLLHUP != 0 {
            libc::_exit(1);
        }
        mount_own_proc()?;
        // Its own session and group: the driver's group signals stop at the shim.
        libc::setsid();
        let replica = clone(0);
        match replica {
            -1 => Err(io::Error::last_os_error()),
            0 => {
                unblock_all();
                Ok(())
            }
            replica => {
                close_all_but(to_shim);
                TARGET.store(replica, Ordering::Relaxed);
                handle_forwarded();
                unblock_all();
                let status = reap_until(replica);
                let raw = status.to_ne_bytes();
                libc::write(to_shim, raw.as_ptr().cast(), raw.len());
                // Init cannot die of a signal it sends itself; the shim mirrors it instead.
                let code = if libc::WIFEXITED(status) {
                    libc::WEXITSTATUS(status)
                } else {
                    128 + libc::WTERMSIG(status)
                };
                libc::_exit(code)
            }
        }
    }
}

/// Reaps every child (orphans land here) until `replica` exits; returns its wait status.
unsafe fn reap_until(replica: pid_t) -> c_int {
    // SAFETY: waitpid on this process's own children.
    unsafe {
        loop {
            let mut status = 0;
            let pid = libc::waitpid(-1, &mut status, 0);
            if pid == replica {
                return status;
            }
            if pid < 0 && *libc::__errno_location() != libc::EINTR {
                // No child left at all: the replica is gone without a status.
                return 127 << 8;
            }
        }
    }
}

/// A private mount table, and a `/proc` that shows this PID namespace.
unsafe fn mount_own_proc() -> io::Result<()> {
    let none = std::ptr::null();
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    // SAFETY: mount(2) with static NUL-terminated strings.
    unsafe {
        let private = libc::MS_REC | libc::MS_PRIVATE;
        if libc::mount(none, c"/".as_ptr(), none, private, std::ptr::null()) != 0
            || libc::mount(
                c"proc".as_ptr(),
                c"/proc".as_ptr(),
                c"proc".as_ptr(),
                flags,
                std::ptr::null(),
            ) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Exits with `status`: the same code, or death by the same signal.
unsafe fn exit_as(status: c_int) -> ! {
    // SAFETY: resets one signal to its default action and sends it to this very process.
    unsafe {
        if libc::WIFSIGNALED(status) {
            let signal = libc::WTERMSIG(status);
            libc::signal(signal, libc::SIG_DFL);
            libc::kill(libc::getpid(), signal);
            libc::_exit(128 + signal);
        }
        libc::_exit(libc::WEXITSTATUS(status))
    }
}

/// Waits for `pid`, through interruptions; its wait status.
unsafe fn wait_for(pid: pid_t) -> c_int {
    // SAFETY: waitpid on this process's own child.
    unsafe {
        let mut status = 0;
        while libc::waitpid(pid, &mut status, 0) < 0 {
            if *libc::__errno_location() != libc::EINTR {
                return 127 << 8;
            }
        }
        status
    }
}

/// A fork by the raw system call (with `flags` for new namespaces): 0 in the child.
unsafe fn clone(flags: c_int) -> pid_t {
    let flags = libc::c_long::from(flags | libc::SIGCHLD);
    // SAFETY: clone without CLONE_VM and without a new stack is fork: the child runs on a
    // copy of this stack. The result is a pid, 0 or -1.
    unsafe { libc::syscall(libc::SYS_clone, flags, 0, 0, 0, 0) as pid_t }
}

fn handle_forwarded() {
    for signal in FORWARDED {
        handle(signal);
    }
}

/// Installs the handler that passes `signal` on to [`TARGET`] (a kill request as SIGKILL).
fn handle(signal: c_int) {
    extern "C" fn forward(signal: c_int) {
        let target = TARGET.load(Ordering::Relaxed);
        let signal = if signal == KILL_REQUEST.load(Ordering::Relaxed) {
            libc::SIGKILL
        } else {
            signal
        };
        if target > 0 {
            // SAFETY: kill(2) is async-signal-safe.
            unsafe { libc::kill(target, signal) };
        }
    }
    // SAFETY: installs a handler that only reads atomics and calls kill(2).
    unsafe {
        let mut action = std::mem::zeroed::<libc::sigaction>();
        action.sa_sigaction = forward as extern "C" fn(c_int) as usize;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(signal, &action, std::ptr::null_mut());
    }
}

fn unblock_all() {
    // SAFETY: sets this thread's signal mask to empty.
    unsafe {
        let mut none = std::mem::zeroed::<libc::sigset_t>();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
    }
}

/// Closes every file descriptor from 3 up, except `keep`.
unsafe fn close_all_but(keep: c_int) {
    let close_range = |first: c_int, last: c_int| {
        if first > last {
            return;
        }
        // SAFETY: close_range(2) on this process's own descriptors.
        let done =
            unsafe { libc::syscall(libc::SYS_close_range, first as u32, last as u32, 0_u32) };
        if done != 0 {
            // An older kernel: close one by one, up to a generous bound.
            for fd in first..=last.min(65_535) {
                // SAFETY: as above.
                unsafe { libc::close(fd) };
            }
        }
    };
    close_range(3, keep - 1);
    close_range(keep + 1, c_int::MAX);
}
