//! Relay of both directions through pooled buffers, for pairs where at least one side is
//! TLS (or otherwise not a bare socket): one future polls both directions over the two
//! streams, so no stream is split and no lock is taken.
//!
//! A buffer is borrowed around each read and given back when the read is `Pending`, or as
//! soon as everything read has been written; only a destination that would block keeps one.
//! A bare TCP source is first polled for readiness, so a quiet one never borrows at all;
//! a TLS source may hold decrypted plaintext without socket readiness, so it is read
//! directly with a borrowed buffer.
//!
//! End of a source: EOF (FIN, or close_notify) flushes the destination and shuts it down
//! with `poll_shutdown` — FIN for TCP, close_notify then FIN for TLS. A TLS peer that
//! closes TCP without close_notify (`UnexpectedEof`) is treated as EOF too: the bytes it
//! sent were authenticated record by record, and buildkit clients routinely close that
//! way; refusing them would turn normal exits into errors without protecting anything.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::ReadBuf;

use super::pool::Buffer;
use super::{Direction, Joint, Leg, Meter, Path, Stop};

/// Moves bytes both ways until both directions have ended or one fails.
pub(super) async fn duplex<C: Leg, B: Leg>(
    client: &mut C,
    backend: &mut B,
    meter: &Meter<'_>,
) -> Result<(), Stop> {
    let mut inbound = Half::new(Direction::Inbound);
    let mut outbound = Half::new(Direction::Outbound);
    let mut joint = Joint::default();
    poll_fn(|cx| {
        joint.poll(meter, |dir| match dir {
            Direction::Inbound => inbound.poll(cx, client, backend, meter),
            Direction::Outbound => outbound.poll(cx, backend, client, meter),
        })
    })
    .await
}

/// One direction's progress.
struct Half {
    dir: Direction,
    state: State,
}

enum State {
    /// Waiting for the source; `flush` when bytes were written since the last flush.
    Reading {
        flush: bool,
    },
    /// Bytes `pos..end` of `buf` are owed to the destination.
    Writing {
        buf: Buffer,
        pos: usize,
        end: usize,
    },
    /// The source ended: flush and shut down the destination's write side.
    ShuttingDown,
    /// The source was reset: flush what the destination is owed, then report it.
    Resetting,
    Done,
}

impl Half {
    fn new(dir: Direction) -> Self {
        Self {
            dir,
            state: State::Reading { flush: false },
        }
    }

    fn poll<S: Leg, D: Leg>(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut S,
        dst: &mut D,
        meter: &Meter<'_>,
    ) -> Poll<Result<(), Stop>> {
        let dir = self.dir;
        loop {
            self.state = match &mut self.state {
                State::Reading { flush } => match read(cx, src, dir) {
                    Poll::Pending => {
                        if *flush {
                            ready!(Pin::new(&mut *dst).poll_flush(cx))
                                .map_err(|e| Stop::on_write(dir, e))?;
                            *flush = false;
                        }
                        return Poll::Pending;
                    }
                    Poll::Ready(Read::Bytes(buf, end)) => State::Writing { buf, pos: 0, end },
                    // After the other side was found reset, this source's end is that reset.
                    Poll::Ready(Read::Eof) if meter.reset_seen() => State::Resetting,
                    Poll::Ready(Read::Eof) => State::ShuttingDown,
                    Poll::Ready(Read::Failed(Stop::Reset(_))) => State::Resetting,
                    Poll::Ready(Read::Failed(stop)) => return Poll::Ready(Err(stop)),
                },
                State::Writing { buf, pos, end } => {
                    let written = ready!(Pin::new(&mut *dst).poll_write(cx, &buf[*pos..*end]));
                    let n = match written {
                        Ok(0) => Err(io::ErrorKind::WriteZero.into()),
                        other => other,
                    }
                    .map_err(|e| Stop::on_write(dir, e))?;
                    meter.moved(dir, Path::Copy, n);
                    *pos += n;
                    if *pos < *end {
                        continue;
                    }
                    State::Reading { flush: true } // drops the buffer back into the pool
                }
                State::ShuttingDown => {
                    ready!(Pin::new(&mut *dst).poll_shutdown(cx))
                        .map_err(|e| Stop::on_write(dir, e))?;
                    meter.half_closed(dir);
                    State::Done
                }
                State::Resetting => {
                    // Whatever the flush says, the reset is what gets reported.
                    let _ = ready!(Pin::new(&mut *dst).poll_flush(cx));
                    return Poll::Ready(Err(Stop::Reset(dir)));
                }
                State::Done => return Poll::Ready(Ok(())),
            };
        }
    }
}

/// What one read from the source gave.
enum Read {
    Bytes(Buffer, usize),
    Eof,
    Failed(Stop),
}

/// Reads once into a borrowed buffer; the buffer goes back to the pool unless bytes came.
fn read<S: Leg>(cx: &mut Context<'_>, src: &mut S, dir: Direction) -> Poll<Read> {
    // A bare socket is polled first, so a quiet source never borrows a buffer.
    if !src.buffers_plaintext()
        && let Err(e) = ready!(src.socket().poll_read_ready(cx))
    {
        return Poll::Ready(Read::Failed(Stop::on_read(dir, e)));
    }
    let mut buf = Buffer::take();
    let mut read_buf = ReadBuf::new(&mut buf);
    let polled = Pin::new(&mut *src).poll_read(cx, &mut read_buf);
    let filled = read_buf.filled().len();
    Poll::Ready(match ready!(polled) {
        Ok(()) if filled == 0 => Read::Eof,
        Ok(()) => Read::Bytes(buf, filled),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Read::Eof,
        Err(e) => Read::Failed(Stop::on_read(dir, e)),
    })
}
