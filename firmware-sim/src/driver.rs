//! The async driver: runs a [`Client`] over any `embedded-io-async` transport, with time
//! from a [`Timer`], until it stops or reboots. Executor-agnostic (embassy on a board,
//! tokio on the host) and allocation-free; it is the whole event loop, written once.

use core::fmt::Debug;
use core::future::Future;
use core::pin::pin;

use embassy_futures::select::{select, select3, Either, Either3};
use embedded_io_async::{Read, Write};
use rand_core::RngCore;

use crate::board::Board;
use crate::client::{Client, ClientError, Exit, Io};
use crate::flash::Flash;

/// Opens transports to the hub: TCP (+ TLS) on a board's network stack, or tokio + rustls
/// on the host.
///
/// The trait uses `async fn` like `embedded-io-async`; the futures are `Send` whenever the
/// implementation's are, which the host relies on to run devices on a multi-threaded
/// runtime.
#[allow(async_fn_in_trait)]
pub trait Connector {
    /// An open, bidirectional byte stream. Its `read` must be cancel-safe (dropping a
    /// pending read loses no data), as embassy-net's and tokio's are: the driver races
    /// reads against timers.
    type Transport: Read + Write;
    /// Why a connection could not be opened (only logged by the caller: the client
    /// retries with backoff).
    type Error: Debug;

    /// Opens a connection. It should give up by itself after a while (a TCP connect
    /// timeout); the client's backoff then schedules the next attempt.
    async fn connect(&mut self) -> Result<Self::Transport, Self::Error>;

    /// The `Host` header for the connection just opened (`host[:port]`).
    fn host(&self) -> &str;

    /// The request path for the connection just opened.
    fn path(&self) -> &str {
        schemas::DEVICE_PATH
    }

    /// Closes a transport (TLS close_notify, TCP FIN). Must finish in bounded time.
    async fn disconnect(&mut self, transport: Self::Transport);
}

/// A monotonic millisecond clock that can wait.
#[allow(async_fn_in_trait)]
pub trait Timer {
    /// Milliseconds since an arbitrary start (boot); never goes backwards.
    fn now_ms(&self) -> u64;
    /// Completes at or after `at_ms`. Must be cancel-safe (it is raced against I/O).
    async fn wait_until(&self, at_ms: u64);
}

/// Runs `client` until it stops or asks for a reboot.
///
/// When `stop` completes, the client stops sampling, gets up to `drain_ms` to deliver what
/// is unacknowledged, closes the connection with 1000, and `run` returns
/// [`Exit::Stopped`]. A `reboot` command makes it return [`Exit::Reboot`] after the result
/// was written; the caller then resets the board (or, on a host, builds a new client from
/// the same flash).
///
/// # Errors
/// A fatal [`ClientError`] (storage failure). Connection problems are not errors: the
/// client reconnects with backoff.
///
/// # Cancel safety
/// Not cancel-safe in the protocol sense: dropping the future drops the connection without
/// a close frame (the hub sees a disconnect and the device re-sends what was
/// unacknowledged at its next connection). Use `stop` for an orderly end.
pub async fn run<F, B, R, C, T, S>(
    client: &mut Client<'_, F, B, R>,
    connector: &mut C,
    timer: &T,
    stop: S,
    drain_ms: u32,
) -> Result<Exit, ClientError<F::Error>>
where
    F: Flash,
    B: Board,
    R: RngCore,
    C: Connector,
    T: Timer,
    S: Future<Output = ()>,
{
    // embassy's `select` and `select3` poll in argument order: I/O comes first, so data
    // that is ready is handled before a timer that fired at the same time.
    let mut stop = pin!(stop);
    let mut stopped = false;
    let mut transport: Option<C::Transport> = None;
    loop {
        let now = timer.now_ms();
        let io = client.poll(now)?;
        // Only poll `stop` until it has completed once.
        let stop_fut = if stopped { None } else { Some(stop.as_mut()) };
        match io {
            Io::Exit(exit) => {
                if let Some(t) = transport.take() {
                    connector.disconnect(t).await;
                }
                return Ok(exit);
            }
            Io::Connect => {
                let deadline = client.connect_deadline();
                let mut stop_fut = stop_fut;
                // The connect future borrows only the connector, so the client keeps
                // sampling while it runs (a rate-limited or slow connect can take longer
                // than a sample interval).
                let opened = {
                    let mut connect = pin!(connector.connect());
                    loop {
                        let wake = min_deadline(deadline, client.next_sample_at());
                        let stop_now = stop_fut.as_mut().map(|s| s.as_mut());
                        match select3(connect.as_mut(), wait(timer, wake), or_never(stop_now)).await
                        {
                            Either3::First(result) => break Some(result.ok()),
                            Either3::Second(()) => {
                                let now = timer.now_ms();
                                if deadline.is_some_and(|d| now >= d) {
                                    break Some(None);
                                }
                                client.poll_sampling(now)?;
                            }
                            Either3::Third(()) => break None,
                        }
                    }
                };
                match opened {
                    Some(Some(t)) => {
                        transport = Some(t);
                        let now = timer.now_ms();
                        client.handle_connected(now, connector.host(), connector.path())?;
                    }
                    Some(None) => client.handle_connect_failed(timer.now_ms()),
                    None => {
                        stopped = true;
                        let now = timer.now_ms();
                        client.shutdown(now, drain_ms);
                        client.handle_connect_failed(now);
                    }
                }
            }
            Io::Write => {
                let Some(t) = transport.as_mut() else {
                    client.handle_transport_error();
                    continue;
                };
                let deadline = client.write_deadline();
                match select(t.write(client.pending_tx()), wait(timer, deadline)).await {
                    Either::First(Ok(n)) if n > 0 => {
                        client.tx_written(n);
                        if client.pending_tx().is_empty() {
                            // TLS adapters may hold a record back until flushed.
                            let flushed = select(t.flush(), wait(timer, deadline)).await;
                            if !matches!(flushed, Either::First(Ok(()))) {
                                client.handle_transport_error();
                            }
                        }
                    }
                    // A write of 0 bytes, an error, or a stall past the hub's silence
                    // limit: the connection is gone.
                    _ => client.handle_transport_error(),
                }
            }
            Io::Read { until } => {
                let Some(t) = transport.as_mut() else {
                    client.handle_transport_error();
                    continue;
                };
                let read = t.read(client.rx_space());
                match select3(read, wait(timer, until), or_never(stop_fut)).await {
                    Either3::First(Ok(n)) if n > 0 => client.rx_filled(timer.now_ms(), n)?,
                    Either3::First(_) => client.handle_transport_error(),
                    Either3::Second(()) => {}
                    Either3::Third(()) => {
                        stopped = true;
                        client.shutdown(timer.now_ms(), drain_ms);
                    }
                }
            }
            Io::Sleep { until } => {
                if let Either::Second(()) = select(wait(timer, until), or_never(stop_fut)).await {
                    stopped = true;
                    client.shutdown(timer.now_ms(), drain_ms);
                }
            }
            Io::Close => {
                if let Some(t) = transport.take() {
                    connector.disconnect(t).await;
                }
                client.handle_closed(timer.now_ms());
            }
        }
    }
}

/// The earlier of two optional deadlines.
fn min_deadline(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Waits until `at`, or forever.
async fn wait<T: Timer>(timer: &T, at: Option<u64>) {
    match at {
        Some(at) => timer.wait_until(at).await,
        None => core::future::pending().await,
    }
}

/// Runs `future` if there is one, else never completes: the `stop` branch after `stop` has
/// completed once (a completed future must not be polled again).
async fn or_never<F: Future>(future: Option<F>) -> F::Output {
    match future {
        Some(future) => future.await,
        None => core::future::pending().await,
    }
}
