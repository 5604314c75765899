//! Zero-copy relay of one direction between two plain TCP sockets: socket → pipe → socket
//! with splice(2), driven by tokio readiness.
//!
//! This is the only module of the relay with `unsafe`: splice(2), pipe2(2) and fcntl(2)
//! have no safe wrapper in the dependencies we carry, and a wrapper crate would hide the
//! readiness handling that matters here. Every unsafe block only passes owned, open file
//! descriptors and plain integers to the kernel; no memory is shared with it.
//!
//! The EAGAIN from socket → pipe is ambiguous (empty socket, or full pipe). The pump only
//! reads from the socket when the pipe is empty, so an EAGAIN there always means the
//! socket is drained, and `try_io` may clear its readiness. Splicing into a full pipe is
//! thus impossible by construction. A destination that would block keeps the (non-empty)
//! pipe while it waits for `writable()`; a pipe whose destination failed is closed, never
//! pooled. When no pipe can be had (out of fds, or of the user's pipe budget), a burst goes
//! through a pooled buffer instead of failing the connection.
//!
//! splice(2) to a reset socket can raise SIGPIPE; the Rust runtime ignores SIGPIPE in every
//! binary it starts, so the error comes back as EPIPE instead.
#![allow(unsafe_code)]

use std::future::{Future, poll_fn};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::pool::{Buffer, PipeLease};
use super::{Direction, Joint, Meter, Path, Stop};

/// Pipe capacity asked for with F_SETPIPE_SZ (the default `pipe-max-size`). Measured on
/// loopback (one connection, best of five 512 MiB transfers, relay alone on its thread):
/// 1.20–1.25 GB/s and 0.16–0.18 CPU s/GiB, against 0.95–1.10 GB/s and 0.18–0.26 with the
/// 64 KiB default; 256 KiB was no better than the default. A buffered copy took 0.34–0.40.
pub const PIPE_SIZE: usize = 1024 * 1024;

/// Enlarged pipes alive at once, at most: 16 MiB, a quarter of the default per-user
/// `pipe-user-pages-soft` budget, past which the kernel gives new pipes 8 KiB. Pipes past
/// this bound keep the default 64 KiB; so do pipes whose enlargement is refused.
const MAX_LARGE_PIPES: usize = 16;

/// An empty pipe's two ends, both O_CLOEXEC | O_NONBLOCK.
pub(super) struct RawPipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Holds one of the [`MAX_LARGE_PIPES`] slots.
    large: bool,
}

impl RawPipe {
    pub(super) fn new() -> io::Result<Self> {
        let mut fds: [libc::c_int; 2] = [-1, -1];
        // SAFETY: `fds` is a valid, writable array of two c_ints, as pipe2(2) requires.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // Taking the slot before enlarging keeps the bound exact under concurrency.
        let large = LARGE_PIPES.fetch_add(1, Relaxed) < MAX_LARGE_PIPES && enlarge(&write);
        if !large {
            LARGE_PIPES.fetch_sub(1, Relaxed);
        }
        Ok(Self { read, write, large })
    }
}

impl Drop for RawPipe {
    fn drop(&mut self) {
        if self.large {
            LARGE_PIPES.fetch_sub(1, Relaxed);
        }
    }
}

static LARGE_PIPES: AtomicUsize = AtomicUsize::new(0);

/// Asks for a [`PIPE_SIZE`] pipe; false when the kernel refuses.
fn enlarge(pipe: &OwnedFd) -> bool {
    // SAFETY: F_SETPIPE_SZ takes an int argument; `pipe` is an open pipe fd we own.
    let size = unsafe {
        libc::fcntl(
            pipe.as_raw_fd(),
            libc::F_SETPIPE_SZ,
            PIPE_SIZE as libc::c_int,
        )
    };
    size >= PIPE_SIZE as libc::c_int
}

/// Where a pump gets its pipes (tests pass one that always fails).
pub(super) type Pipes = fn() -> io::Result<PipeLease>;

/// Splices both ways until both directions have ended or one fails.
pub(super) async fn duplex(
    client: &TcpStream,
    backend: &TcpStream,
    meter: &Meter<'_>,
    pipes: Pipes,
) -> Result<(), Stop> {
    let mut inbound = pin!(pump(client, backend, Direction::Inbound, meter, pipes));
    let mut outbound = pin!(pump(backend, client, Direction::Outbound, meter, pipes));
    let mut joint = Joint::default();
    poll_fn(|cx| {
        joint.poll(meter, |dir| match dir {
            Direction::Inbound => inbound.as_mut().poll(cx),
            Direction::Outbound => outbound.as_mut().poll(cx),
        })
    })
    .await
}

/// Moves `src` → `dst` until `src` ends (then shuts down `dst`'s write side) or fails.
async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    dir: Direction,
    meter: &Meter<'_>,
    pipes: Pipes,
) -> Result<(), Stop> {
    loop {
        // No pipe is held while the source is quiet.
        src.readable().await.map_err(|e| Stop::on_read(dir, e))?;
        let burst = match pipes() {
            Ok(mut pipe) => move_while_ready(src, dst, &mut pipe, dir, meter).await?,
            // Out of fds or pipe budget: this burst goes through a buffer, and the
            // connection survives (it shows as copy bytes on a spliced pool).
            Err(e) => {
                tracing::debug!(error = %e, "no pipe for splice, copying instead");
                copy_while_ready(src, dst, dir, meter).await?
            }
        };
        if let Drained::Eof = burst {
            break;
        }
    }
    if meter.reset_seen() {
        // The source is the socket found reset while writing to it: its end is that reset.
        return Err(Stop::Reset(dir));
    }
    SockRef::from(dst)
        .shutdown(std::net::Shutdown::Write)
        .map_err(|e| Stop::on_write(dir, e))?;
    meter.half_closed(dir);
    Ok(())
}

/// How a burst of bytes ended: the source would block, or it sent FIN.
enum Drained {
    WouldBlock,
    Eof,
}

/// Alternates fill (source → empty pipe) and drain (pipe → destination, all of it).
async fn move_while_ready(
    src: &TcpStream,
    dst: &TcpStream,
    pipe: &mut PipeLease,
    dir: Direction,
    meter: &Meter<'_>,
) -> Result<Drained, Stop> {
    loop {
        let write_end = pipe.pipe().write.as_raw_fd();
        // The pipe is empty here, so EAGAIN means the socket is empty and clearing its
        // readiness is right.
        let filled = src.try_io(Interest::READABLE, || {
            splice(src.as_raw_fd(), write_end, PIPE_SIZE)
        });
        match filled {
            Ok(0) => return Ok(Drained::Eof),
            Ok(n) => pipe.len = n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Drained::WouldBlock),
            Err(e) => return Err(Stop::on_read(dir, e)),
        }
        drain(dst, pipe, dir, meter).await?;
        // try_io does not count against tokio's cooperative budget; without this, two
        // sockets that are always ready would keep this worker from everything else.
        tokio::task::consume_budget().await;
    }
}

/// Moves bytes through a pooled buffer until the source would block or ends.
async fn copy_while_ready(
    src: &TcpStream,
    dst: &TcpStream,
    dir: Direction,
    meter: &Meter<'_>,
) -> Result<Drained, Stop> {
    let mut buf = Buffer::take();
    loop {
        let end = match src.try_read(&mut buf) {
            Ok(0) => return Ok(Drained::Eof),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Drained::WouldBlock),
            Err(e) => return Err(Stop::on_read(dir, e)),
        };
        let mut pos = 0;
        while pos < end {
            match dst.try_write(&buf[pos..end]) {
                Ok(n) => {
                    pos += n;
                    meter.moved(dir, Path::Copy, n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    dst.writable().await.map_err(|e| Stop::on_write(dir, e))?;
                }
                Err(e) => return Err(Stop::on_write(dir, e)),
            }
        }
        tokio::task::consume_budget().await;
    }
}

/// Empties the pipe into `dst`, waiting for `writable()` whenever it is full.
async fn drain(
    dst: &TcpStream,
    pipe: &mut PipeLease,
    dir: Direction,
    meter: &Meter<'_>,
) -> Result<(), Stop> {
    while pipe.len > 0 {
        let read_end = pipe.pipe().read.as_raw_fd();
        match dst.try_io(Interest::WRITABLE, || {
            splice(read_end, dst.as_raw_fd(), pipe.len)
        }) {
            Ok(0) => return Err(Stop::on_write(dir, io::ErrorKind::WriteZero.into())),
            Ok(n) => {
                pipe.len -= n;
                meter.moved(dir, Path::Splice, n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                dst.writable().await.map_err(|e| Stop::on_write(dir, e))?;
            }
            Err(e) => return Err(Stop::on_write(dir, e)),
        }
    }
    Ok(())
}

/// One splice(2) call between two fds, non-blocking, moving pages where the kernel can.
fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    let flags = libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK;
    // SAFETY: both fds are open for the duration of the call (borrowed from a live
    // TcpStream or a PipeLease); null offsets are valid for sockets and pipes.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            flags,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capacity(pipe: &RawPipe) -> libc::c_int {
        // SAFETY: F_GETPIPE_SZ takes no argument; the fd is an open pipe we own.
        unsafe { libc::fcntl(pipe.write.as_raw_fd(), libc::F_GETPIPE_SZ) }
    }

    #[test]
    fn pipes_are_nonblocking_cloexec_and_enlarged() {
        let pipe = RawPipe::new().unwrap();
        for fd in [pipe.read.as_raw_fd(), pipe.write.as_raw_fd()] {
            // SAFETY: F_GETFL/F_GETFD take no argument; the fd is open.
            let (fl, fd_flags) = unsafe {
                (
                    libc::fcntl(fd, libc::F_GETFL),
                    libc::fcntl(fd, libc::F_GETFD),
                )
            };
            assert_ne!(fl & libc::O_NONBLOCK, 0);
            assert_ne!(fd_flags & libc::FD_CLOEXEC, 0);
        }
        // Raising the size may be refused (per-user pipe budget); then the default stays.
        let capacity = capacity(&pipe);
        assert!(
            capacity == PIPE_SIZE as libc::c_int || capacity <= 65536,
            "{capacity}"
        );
    }

    #[test]
    fn only_a_bounded_number_of_pipes_are_enlarged() {
        // Other tests create pipes concurrently; the bound holds whatever they do.
        let pipes: Vec<_> = (0..MAX_LARGE_PIPES + 4)
            .map(|_| RawPipe::new().unwrap())
            .collect();
        let large = pipes
            .iter()
            .filter(|p| capacity(p) == PIPE_SIZE as libc::c_int)
            .count();
        assert!(large <= MAX_LARGE_PIPES, "{large} enlarged");
        assert!(
            pipes
                .iter()
                .all(|p| p.large == (capacity(p) == PIPE_SIZE as libc::c_int))
        );
        assert!(LARGE_PIPES.load(Relaxed) <= MAX_LARGE_PIPES);
    }

    #[test]
    fn splice_from_an_empty_pipe_would_block() {
        let a = RawPipe::new().unwrap();
        let b = RawPipe::new().unwrap();
        let err = splice(a.read.as_raw_fd(), b.write.as_raw_fd(), 4096).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
    }
}
