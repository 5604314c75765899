//! Copy buffers and splice pipes for the relay, lent only while bytes move.
//!
//! An idle connection must hold neither: the relay borrows a [`Buffer`] or a pipe
//! when its source has bytes and hands it back as soon as the source would block with
//! nothing left in it. Both pools are thread-local stacks (no lock, no contention), bounded
//! per thread (the excess is freed), and count what is lent out process-wide so tests and
//! metrics can see that idle connections hold nothing.

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use super::splice::RawPipe;

/// Size of one copy buffer. Large enough to take a whole TLS record (16 KiB) several
/// times over, small enough that a thousand connections stalled on slow readers hold
/// 64 MiB. (256 KiB moved 20–30% more on one loopback connection, at four times that.)
pub const BUFFER_SIZE: usize = 64 * 1024;

/// Buffers kept per thread once returned; more than this are freed.
const MAX_POOLED_BUFFERS: usize = 64;

/// Pipes kept per thread once returned; more than this are closed (each costs two fds and
/// up to a MiB of the user's pipe budget).
const MAX_POOLED_PIPES: usize = 8;

/// What the pools have lent out right now, process-wide.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    pub buffers_outstanding: usize,
    pub pipes_outstanding: usize,
    /// Pipes that could not be created (out of fds or pipe budget) since start.
    pub pipe_failures: u64,
}

/// Buffers and pipes currently borrowed by relays (zero when every connection is idle).
pub fn stats() -> PoolStats {
    PoolStats {
        buffers_outstanding: BUFFERS_OUT.load(Relaxed),
        pipes_outstanding: PIPES_OUT.load(Relaxed),
        pipe_failures: PIPE_FAILURES.load(Relaxed),
    }
}

/// Registers the pools' metrics, read from [`stats`] at each scrape:
/// `bkpool_gateway_relay_buffers_outstanding`, `bkpool_gateway_relay_pipes_outstanding`
/// (gauges) and `bkpool_gateway_relay_pipe_failures_total`.
pub fn register(registry: &mut Registry) {
    registry.register_collector(Box::new(PoolMetrics));
}

/// A copy buffer borrowed from this thread's pool; dropping it gives it back.
pub struct Buffer {
    bytes: Box<[u8]>,
}

impl Buffer {
    /// Borrows a buffer, reusing a pooled one when this thread has any.
    pub fn take() -> Self {
        let pooled = BUFFERS.try_with(|p| p.borrow_mut().pop()).ok().flatten();
        let bytes = pooled.unwrap_or_else(|| vec![0; BUFFER_SIZE].into_boxed_slice());
        BUFFERS_OUT.fetch_add(1, Relaxed);
        Self { bytes }
    }
}

impl Deref for Buffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

impl DerefMut for Buffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.bytes
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        BUFFERS_OUT.fetch_sub(1, Relaxed);
        let bytes = std::mem::take(&mut self.bytes);
        // During thread teardown the pool may be gone; then the buffer is simply freed.
        let _ = BUFFERS.try_with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < MAX_POOLED_BUFFERS {
                p.push(bytes);
            }
        });
    }
}

/// A pipe borrowed from this thread's pool, with the count of bytes sitting in it.
///
/// Dropped empty, it goes back to the pool; dropped with bytes stuck in it (the
/// destination failed), it is closed so no later connection can receive those bytes.
pub(super) struct PipeLease {
    pipe: Option<RawPipe>,
    /// Bytes spliced into the pipe and not yet out of it.
    pub(super) len: usize,
}

impl PipeLease {
    /// Borrows an empty pipe, creating one when this thread has none pooled.
    pub(super) fn take() -> std::io::Result<Self> {
        let pooled = PIPES.try_with(|p| p.borrow_mut().pop()).ok().flatten();
        let pipe = match pooled {
            Some(pipe) => pipe,
            None => RawPipe::new().inspect_err(|_| {
                PIPE_FAILURES.fetch_add(1, Relaxed);
            })?,
        };
        PIPES_OUT.fetch_add(1, Relaxed);
        Ok(Self {
            pipe: Some(pipe),
            len: 0,
        })
    }

    pub(super) fn pipe(&self) -> &RawPipe {
        self.pipe
            .as_ref()
            .expect("a lease holds its pipe until dropped")
    }
}

impl Drop for PipeLease {
    fn drop(&mut self) {
        PIPES_OUT.fetch_sub(1, Relaxed);
        let Some(pipe) = self.pipe.take() else { return };
        if self.len != 0 {
            return; // closes it: stale bytes must never reach another connection
        }
        let _ = PIPES.try_with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < MAX_POOLED_PIPES {
                p.push(pipe);
            }
        });
    }
}

/// Pipes pooled on the calling thread (tests check what came back).
#[cfg(test)]
pub(super) fn pooled_pipes_here() -> usize {
    PIPES.with(|p| p.borrow().len())
}

#[derive(Debug)]
struct PoolMetrics;

impl Collector for PoolMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let stats = stats();
        let gauges = [
            (
                "bkpool_gateway_relay_buffers_outstanding",
                "Copy buffers lent to connections moving bytes",
                stats.buffers_outstanding,
            ),
            (
                "bkpool_gateway_relay_pipes_outstanding",
                "Splice pipes lent to connections moving bytes",
                stats.pipes_outstanding,
            ),
        ];
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(value as i64);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        let failures = ConstCounter::new(stats.pipe_failures);
        let name = "bkpool_gateway_relay_pipe_failures";
        let help = "Pipes that could not be created, so bytes were copied instead";
        failures.encode(encoder.encode_descriptor(name, help, None, failures.metric_type())?)
    }
}

static BUFFERS_OUT: AtomicUsize = AtomicUsize::new(0);
static PIPES_OUT: AtomicUsize = AtomicUsize::new(0);
static PIPE_FAILURES: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static BUFFERS: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
    static PIPES: RefCell<Vec<RawPipe>> = const { RefCell::new(Vec::new()) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_and_bounded() {
        let first = Buffer::take();
        let addr = first.as_ptr();
        assert_eq!(first.len(), BUFFER_SIZE);
        drop(first);
        let again = Buffer::take();
        assert_eq!(again.as_ptr(), addr, "a returned buffer is lent again");
        drop(again);

        let many: Vec<_> = (0..MAX_POOLED_BUFFERS + 10)
            .map(|_| Buffer::take())
            .collect();
        drop(many);
        assert_eq!(BUFFERS.with(|p| p.borrow().len()), MAX_POOLED_BUFFERS);
    }

    #[test]
    fn metrics_are_read_at_scrape_time() {
        let mut registry = Registry::default();
        register(&mut registry);
        let held = Buffer::take();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        drop(held);
        for line in [
            "# TYPE bkpool_gateway_relay_buffers_outstanding gauge",
            "# TYPE bkpool_gateway_relay_pipes_outstanding gauge",
            "# TYPE bkpool_gateway_relay_pipe_failures counter",
        ] {
            assert!(text.contains(line), "{line:?} missing from\n{text}");
        }
        // Other tests lend buffers concurrently, so only a lower bound holds.
        let value = |name: &str| -> i64 {
            let line = text
                .lines()
                .find(|l| l.starts_with(&format!("{name} ")))
                .unwrap();
            line.rsplit(' ').next().unwrap().parse().unwrap()
        };
        assert!(value("bkpool_gateway_relay_buffers_outstanding") >= 1);
        value("bkpool_gateway_relay_pipe_failures_total"); // present, and a number
    }

    #[test]
    fn empty_pipes_return_and_pipes_with_bytes_are_closed() {
        let lease = PipeLease::take().unwrap();
        drop(lease);
        assert_eq!(pooled_pipes_here(), 1);

        let mut lease = PipeLease::take().unwrap();
        assert_eq!(pooled_pipes_here(), 0);
        lease.len = 3; // as if the destination failed with bytes still in the pipe
        drop(lease);
        assert_eq!(
            pooled_pipes_here(),
            0,
            "a pipe holding bytes is never pooled"
        );
    }
}
