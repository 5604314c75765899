//! Pod IPs on loopback: each pod gets its own address in 127.42.0.0/16 (the whole of
//! 127.0.0.0/8 reaches `lo`), so every pod can listen on its container ports as it would in
//! a cluster. Several kubelets (tests in parallel, other test runs on the machine) share the
//! range: an address is reserved by an exclusive `flock` on a file named after it, which the
//! kernel releases when the holder exits, however it exits.

use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use rustix::fs::FlockOperation;

/// Where the reservations live (shared by every kubelet on the machine).
const DIR: &str = "/tmp/bkpool-kubelet-ips";

/// A reserved pod IP, released when dropped.
#[derive(Debug)]
pub struct PodIp {
    pub ip: Ipv4Addr,
    _lock: File,
}

/// Reserves a free address, starting the search at a point that depends on the process and
/// a counter, so concurrent kubelets rarely contend for the same one.
pub fn reserve() -> io::Result<PodIp> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    std::fs::create_dir_all(DIR)?;
    let start = std::process::id().wrapping_mul(7919) + NEXT.fetch_add(1, Ordering::Relaxed);
    // 127.42.0.1 ..= 127.42.255.254: never .0 or .255 in the last octet, to avoid confusion.
    for i in 0..65_536u32 {
        let n = (start + i) % 65_536;
        let (hi, lo) = ((n >> 8) as u8, (n & 0xff) as u8);
        if lo == 0 || lo == 255 {
            continue;
        }
        let ip = Ipv4Addr::new(127, 42, hi, lo);
        if let Some(lock) = try_lock(ip)? {
            return Ok(PodIp { ip, _lock: lock });
        }
    }
    Err(io::Error::other("every pod IP in 127.42.0.0/16 is taken"))
}

fn try_lock(ip: Ipv4Addr) -> io::Result<Option<File>> {
    let path = PathBuf::from(DIR).join(ip.to_string());
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(Some(file)),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_addresses_are_unique_until_released_and_bindable() {
        let a = reserve().unwrap();
        let b = reserve().unwrap();
        assert_ne!(a.ip, b.ip);
        assert_eq!(a.ip.octets()[..2], [127, 42]);
        assert!(try_lock(a.ip).unwrap().is_none(), "held while reserved");
        std::net::TcpListener::bind((a.ip, 0)).expect("a loopback address binds");
        let ip = a.ip;
        drop(a);
        assert!(try_lock(ip).unwrap().is_some(), "free once released");
    }
}
