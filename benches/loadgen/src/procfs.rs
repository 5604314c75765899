//! What the load side reads about the proxy from /proc: CPU time (utime +
//! stime, for handshakes per proxy core-second) and memory (RSS from
//! `status`, PSS from `smaps_rollup`), summed over all of its processes
//! (nginx runs a master and a worker).

use std::fs;
use std::io;
use std::time::Duration;

/// CPU time the processes have used so far.
pub fn cpu_time(pids: &[u32]) -> io::Result<Duration> {
    let ticks_per_s = rustix::param::clock_ticks_per_second();
    let mut ticks = 0;
    for pid in pids {
        ticks += cpu_ticks(*pid)?;
    }
    Ok(Duration::from_secs_f64(ticks as f64 / ticks_per_s as f64))
}

/// CPU time, or `None` when no process is named (the direct path).
pub fn cpu_time_of(pids: &[u32]) -> io::Result<Option<Duration>> {
    if pids.is_empty() {
        return Ok(None);
    }
    cpu_time(pids).map(Some)
}

/// Resident and proportional set sizes, in KiB.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Memory {
    pub rss_kib: u64,
    pub pss_kib: u64,
}

pub fn memory(pids: &[u32]) -> io::Result<Memory> {
    let mut total = Memory::default();
    for pid in pids {
        let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
        let rollup = fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
        total.rss_kib += field_kib(&status, "VmRSS:").unwrap_or(0);
        total.pss_kib += field_kib(&rollup, "Pss:").unwrap_or(0);
    }
    Ok(total)
}

fn cpu_ticks(pid: u32) -> io::Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_cpu_ticks(&stat).ok_or_else(|| io::Error::other(format!("unparsable /proc/{pid}/stat")))
}

/// utime + stime: fields 14 and 15, counted after the parenthesised
/// command name (which may itself contain spaces).
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 2..];
    let mut fields = after_comm.split(' ').skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

fn field_kib(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|line| line.starts_with(name))?;
    line[name.len()..].split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_skip_a_command_name_with_spaces() {
        let stat = "42 (my proc) S 1 42 42 0 -1 4194560 100 0 0 0 7 5 0 0 20 0 1 0";
        assert_eq!(parse_cpu_ticks(stat), Some(12));
    }

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(memory(&[me]).unwrap().rss_kib > 0);
        cpu_time(&[me]).unwrap();
    }

    #[test]
    fn field_in_kib() {
        assert_eq!(field_kib("Rss: 1 kB\nPss:   2048 kB\n", "Pss:"), Some(2048));
    }
}
