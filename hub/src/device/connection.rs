//! One device connection after the upgrade, as a thin I/O loop around the sans-io
//! [`HubSession`]: it reads frames and hands them to the session, performs the session's
//! effects (store, ledger, presence, registry), sends what the session transmits, sleeps
//! until the session's next timeout, and closes with the code the session chose.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use schemas::codec::{encode_json, encode_postcard_vec};
use schemas::{close, Encoding, Hello};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::session::{
    Effect, End, HubSession, Inbound, ReadError, SessionParams, StartFailure, Transmit,
};
use super::wire_counters::wire;
use super::DeviceContext;
use crate::cluster::LetGo;
use crate::events::HubEvent;
use crate::ingest::{AckSlot, Ingest, IngestError, IngestPermit};
use crate::ledger::{Progress, ProgressMarks};
use crate::presence::{ConnStats, Connection, Raised, Signals};
use crate::store::{now_ms, twin, StoreError};
use crate::token::Claims;

/// What the upgrade established.
#[derive(Debug)]
pub struct Admission {
    /// The verified token.
    pub claims: Claims,
    /// The negotiated encoding.
    pub encoding: Encoding,
    /// The client address a trusted proxy reported (`X-Forwarded-For`), when
    /// `device.forwarded_for` is on.
    pub forwarded_for: Option<String>,
}

/// How long the close handshake may take before the socket is just dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// The socket side of a connection: frames in and out, with limits and counters.
struct Socket<S> {
    ws: WebSocketStream<S>,
    encoding: Encoding,
    stats: Arc<ConnStats>,
    write_timeout: Duration,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Socket<S> {
    /// The WebSocket message for a frame the session asked for.
    fn frame(&self, transmit: Transmit) -> Message {
        let encoded = |msg: &schemas::HubMessage| match self.encoding {
            Encoding::Postcard => Message::binary(encode_postcard_vec(msg)),
            Encoding::Json => Message::text(encode_json(msg)),
        };
        match transmit {
            Transmit::Message(msg) => encoded(&msg),
            // Built in place for the encoder; only the ack's eight bytes are written.
            Transmit::Ack(ack) => encoded(&schemas::HubMessage::Ack(ack)),
            Transmit::Ping(payload) => Message::Ping(payload.to_vec().into()),
        }
    }

    /// Sends one message. `Err(true)` when the write timed out.
    async fn send(&mut self, frame: Message) -> Result<(), bool> {
        let len = frame.len();
        match tokio::time::timeout(self.write_timeout, self.ws.send(frame)).await {
            Ok(Ok(())) => {
                wire().frames_out.increment(1);
                wire().bytes_out.increment(len as u64);
                Ok(())
            }
            Ok(Err(_)) => Err(false),
            Err(_) => Err(true),
        }
    }

    /// Hands one read outcome to the session. True when it was the device's close, whose
    /// answer tungstenite has queued and [`Socket::flush_close`] must send.
    ///
    /// Not async, so the message (and a read error, which is large) is never part of the
    /// connection's future.
    fn deliver(
        &mut self,
        next: Option<Result<Message, WsError>>,
        session: &mut HubSession,
    ) -> bool {
        let msg = match next {
            Some(Ok(msg)) => msg,
            Some(Err(err)) => {
                session.handle_read_error(read_error(err));
                return false;
            }
            None => {
                session.handle_read_error(ReadError::Io);
                return false;
            }
        };
        wire().frames_in.increment(1);
        wire().bytes_in.increment(msg.len() as u64);
        self.stats.last_seen_ms.store(now_ms(), Ordering::Relaxed);
        let closing = matches!(msg, Message::Close(_));
        if let Some(frame) = inbound(&msg) {
            session.handle_frame(Instant::now(), frame);
        }
        closing
    }

    /// Sends the close frame tungstenite queued in answer to the device's (RFC 6455
    /// 5.5.1), so the device sees a clean close.
    async fn flush_close(&mut self) {
        let _ = tokio::time::timeout(CLOSE_GRACE, self.ws.flush()).await;
    }

    /// Closes with the session's code, waits briefly for the peer's close, and shuts TLS
    /// down.
    async fn finish(mut self, end: &End) {
        if let Some(code) = end.code {
            let mut reason = end.reason.clone();
            // A close reason must fit a control frame (123 bytes).
            while reason.len() > 120 {
                reason.pop();
            }
            let frame = CloseFrame {
                code: CloseCode::from(code),
                reason: reason.into(),
            };
            let _ = tokio::time::timeout(CLOSE_GRACE, async {
                if self.ws.close(Some(frame)).await.is_ok() {
                    while let Some(Ok(_)) = self.ws.next().await {}
                }
            })
            .await;
        }
        let _ = tokio::time::timeout(CLOSE_GRACE, self.ws.get_mut().shutdown()).await;
    }
}

/// The session's view of a message tungstenite read; `None` for a raw frame, which reading
/// never yields.
pub fn inbound(msg: &Message) -> Option<Inbound<'_>> {
    Some(match msg {
        Message::Binary(bytes) => Inbound::Binary(bytes),
        Message::Text(text) => Inbound::Text(text.as_str()),
        Message::Ping(_) => Inbound::Ping,
        Message::Pong(payload) => Inbound::Pong(payload),
        Message::Close(frame) => Inbound::Close(frame.as_ref().map(|f| u16::from(f.code))),
        Message::Frame(_) => return None,
    })
}

/// What tungstenite's read error means for the session.
///
/// tungstenite checks the frame length against the limit before anything else and reports
/// a length of 2^63 or more as too long; on a 64-bit target the announced length arrives
/// here unchanged (`usize` is 64 bits), so it is told apart from an honest big message.
pub fn read_error(err: WsError) -> ReadError {
    match err {
        WsError::Capacity(CapacityError::MessageTooLong { size, .. })
            if size as u64 > i64::MAX as u64 =>
        {
            ReadError::LengthTopBit
        }
        WsError::Capacity(CapacityError::MessageTooLong { size, max_size }) => ReadError::TooBig {
            sizes: Some((size, max_size)),
        },
        WsError::Capacity(_) => ReadError::TooBig { sizes: None },
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => ReadError::Reset,
        WsError::Protocol(p) => ReadError::Protocol(p.to_string()),
        // A text message or a close reason that is not UTF-8; tungstenite's text names the
        // bytes.
        WsError::Utf8(why) => ReadError::InvalidUtf8(why),
        _ => ReadError::Io,
    }
}

/// Keeps `hub_connections` right on every way out of [`run`].
struct ConnectionGauge;

impl ConnectionGauge {
    fn open() -> ConnectionGauge {
        metrics::gauge!("hub_connections").increment(1.0);
        ConnectionGauge
    }
}

impl Drop for ConnectionGauge {
    fn drop(&mut self) {
        metrics::gauge!("hub_connections").decrement(1.0);
    }
}

/// A connection that has been welcomed: its registration and its channels from the rest
/// of the hub.
struct Online {
    conn_id: u64,
    signals: Arc<Signals>,
    slot: Arc<AckSlot>,
    /// Its commands' `sent` and `acked` marks being written.
    marks: ProgressMarks,
}

/// Runs one admitted connection to its end.
///
/// Everything the connection keeps is made here, before its future exists, and the future
/// uses it in place: an `async fn` keeps its arguments in its future, in every state,
/// beside the locals they are moved into, which doubled the WebSocket with its TLS
/// connection (1.5 KB) in what every idle connection holds.
///
/// Cancel safety: not cancel safe; the listener runs it to completion (it ends on its own
/// at shutdown, closing the device with 1001).
pub fn run<S>(
    ws: WebSocketStream<S>,
    admission: Admission,
    remote: SocketAddr,
    ctx: Arc<DeviceContext>,
) -> impl std::future::Future<Output = ()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let device: Arc<str> = Arc::from(admission.claims.device_id.as_str());
    // Behind a proxy the TCP peer is the proxy; the device is who the proxy says it is.
    let remote: String = match &admission.forwarded_for {
        Some(client) => format!("{client} via {remote}"),
        None => remote.to_string(),
    };
    let stats = Arc::new(ConnStats::default());
    stats.last_seen_ms.store(now_ms(), Ordering::Relaxed);
    let mut socket = Socket {
        ws,
        encoding: admission.encoding,
        stats: stats.clone(),
        write_timeout: ctx.config.write_timeout,
    };
    // Counts this connection until its future ends or is dropped, whichever way.
    let gauge = ConnectionGauge::open();
    let now = Instant::now();
    let mut session = HubSession::new(
        now,
        device.clone(),
        admission.encoding,
        SessionParams::from_config(&ctx.config),
    )
    .with_token_expiry(token_expiry(now, now_ms(), admission.claims.expires_at_s));
    let mut shutdown = ctx.shutdown.clone();
    async move {
        let _gauge = gauge;
        let mut online: Option<Online> = None;
        let mut shutting_down = false;
        // When the bytes of the next chunk, reserved from the hub-wide transfer cap, are
        // paid for.
        let mut chunk_at: Option<Instant> = None;
        loop {
            // Every await but the idle wait below is boxed, and what it works on is moved in
            // inside a block that ends before the await: an async fn's future is as big as its
            // largest state, and a local whose scope spans an await keeps its room in it even
            // after it was moved. These states (store, ledger and backplane calls, effects and
            // messages held inline) would otherwise stay allocated for the life of every
            // connection.
            //
            // What the session decided to send goes out before the effects that came with
            // it are performed: a command reaches its device before its `sent` mark is
            // written, rather than after a write that may wait for the database's lock.
            // Effects still all run before the session's end is looked at.
            let mut writable = true;
            loop {
                while writable {
                    let sending = {
                        let Some(transmit) = session.poll_transmit() else {
                            break;
                        };
                        let frame = socket.frame(transmit);
                        Box::pin(socket.send(frame))
                    };
                    if let Err(timed_out) = sending.await {
                        session.handle_write_error(timed_out);
                        writable = false;
                    }
                }
                let work = {
                    let Some(effect) = session.poll_effect() else {
                        break;
                    };
                    Box::pin(perform(
                        effect,
                        &mut session,
                        &mut online,
                        &ctx,
                        &stats,
                        &admission,
                        &remote,
                    ))
                };
                work.await;
            }
            if session.end().is_some() {
                break;
            }
            // A chunk goes out once the hub-wide cap has the bytes for it: reserved here, when
            // one is due, and waited for by the timer below, so the wait holds up nothing else
            // and costs no second timer in every connection. The request stays in the session
            // meanwhile; nothing is read ahead.
            let cap = ctx.updates.transfer_cap();
            if cap.is_limited() && chunk_at.is_none() && session.has_chunk_due() {
                if let Some(len) = session.next_chunk_len() {
                    let now = Instant::now();
                    let at = cap.reserve(now, len);
                    metrics::histogram!("hub_firmware_cap_wait_seconds")
                        .record((at - now).as_secs_f64());
                    chunk_at = Some(at);
                }
            }
            let chunk_wait = chunk_at.filter(|_| session.has_chunk_due());
            let chunk_ready = chunk_wait.is_none_or(|at| at <= Instant::now());
            let deadline = session.poll_timeout();
            let wake = match (deadline, chunk_wait.filter(|_| !chunk_ready)) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
            .map(tokio::time::Instant::from_std);
            let (signals, slot) = match &online {
                Some(o) => (Some(&*o.signals), Some(&o.slot)),
                None => (None, None),
            };
            tokio::select! {
                biased;
                _ = crate::stopping(&mut shutdown), if !shutting_down => {
                    shutting_down = true;
                    session.handle_shutdown(Instant::now());
                }
                raised = raised(signals) => {
                    if raised.kicked() {
                        let (code, reason) = signals
                            .and_then(|s| s.reason())
                            .unwrap_or((close::POLICY, "closed by the hub"));
                        session.handle_kick(code, reason);
                    }
                    // Read-the-ledger first: commands handed over since are in the ledger
                    // already, and wait for that read rather than overtake what it finds.
                    if raised.commands() {
                        session.handle_commands_ready();
                    }
                    if let (true, Some(signals)) = (raised.created(), signals) {
                        for command in signals.take_created() {
                            session.handle_command_created(command);
                        }
                    }
                    if raised.desired() {
                        session.handle_desired_changed();
                    }
                    if raised.offer() {
                        session.handle_offer_changed();
                    }
                }
                permit = queue_room(&ctx.ingest, session.has_batch()) => match permit {
                    Ok(permit) => {
                        if let (Some(batch), Some(slot)) = (session.take_batch(), slot) {
                            stats.readings.fetch_add(batch.readings.len() as u64, Ordering::Relaxed);
                            if ctx.events.readings_wanted() {
                                ctx.events.publish(HubEvent::Readings {
                                    device: batch.device.to_string(),
                                    seq: batch.seq,
                                    readings: batch.readings.iter().map(|r| (r.metric.to_string(), r.ts, r.value)).collect(),
                                });
                            }
                            permit.send(batch, slot.clone());
                        }
                    }
                    // The writer stopped: the hub is shutting down.
                    Err(_) => session.handle_shutdown(Instant::now()),
                },
                next = socket.ws.next(), if session.wants_read() => {
                    if socket.deliver(next, &mut session) {
                        Box::pin(socket.flush_close()).await;
                    }
                }
                _ = stored(slot) => {
                    if let Some(slot) = slot {
                        session.handle_stored(slot.acked(), slot.failed());
                    }
                }
                _ = sleep_until(wake) => {
                    // The timer may have been the cap's: the session's own deadline may not
                    // have come yet.
                    let now = Instant::now();
                    if deadline.is_some_and(|at| at <= now) {
                        session.handle_timeout(now);
                    }
                }
                // Last, and only when nothing above is ready: a firmware chunk never holds up
                // an ack, a command or a ping.
                () = std::future::ready(()), if session.has_chunk_due() && chunk_ready => {
                    chunk_at = None;
                    session.handle_chunk_due();
                }
            }
        }
        let end = session
            .end()
            .cloned()
            .unwrap_or_else(|| End::gone("io_error"));
        match online {
            Some(online) => Box::pin(offline(&ctx, &device, &stats, online.conn_id, &end)).await,
            None => {
                tracing::debug!(%device, %remote, cause = %end.cause, reason = %end.reason, "connection ended before hello")
            }
        }
        Box::pin(socket.finish(&end)).await;
    }
}

/// The instant a token expiring at `expires_at_s` (Unix seconds) stops being valid, given
/// that `now` is `now_ms` on the wall clock. The session's timer runs on the monotonic
/// clock, so a wall clock set later or earlier during the connection does not move it.
fn token_expiry(now: Instant, now_ms: u64, expires_at_s: u64) -> Instant {
    let left_ms = expires_at_s.saturating_mul(1000).saturating_sub(now_ms);
    // A token valid for centuries would overflow `Instant`; a year is as good as forever
    // for one connection.
    now + Duration::from_millis(left_ms.min(365 * 24 * 3600 * 1000))
}

/// Waits for the writer to report on the connection's batches, or forever before it is
/// online.
async fn stored(slot: Option<&Arc<AckSlot>>) {
    match slot {
        Some(slot) => slot.changed().await,
        None => std::future::pending().await,
    }
}

/// Waits for what the rest of the hub raises on the connection, or forever before it is
/// online.
async fn raised(signals: Option<&Signals>) -> Raised {
    match signals {
        Some(signals) => signals.raised().await,
        None => std::future::pending().await,
    }
}

/// Room in the ingest queue once `wanted`, or never. The wait for it is boxed when there
/// is a batch to queue: `select!` makes the futures of its disabled branches too, so
/// inline it would be part of every idle connection.
///
/// Cancel safety: cancel safe, as [`Ingest::reserve`].
async fn queue_room(ingest: &Ingest, wanted: bool) -> Result<IngestPermit<'_>, IngestError> {
    if !wanted {
        return std::future::pending().await;
    }
    Box::pin(ingest.reserve()).await
}

/// Sleeps until `at`, or forever when there is no deadline.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Records a command's progress on the connection's chain of marks (on a chain of its
/// own before the connection is online, which cannot happen: commands are fetched once it
/// is).
async fn progress(ctx: &DeviceContext, online: &mut Option<Online>, device: &str, mark: Progress) {
    let mut alone = ProgressMarks::default();
    let marks = online
        .as_mut()
        .map_or(&mut alone, |online| &mut online.marks);
    ctx.ledger.mark(marks, device, mark).await;
}

/// Performs one effect of the session, feeding any outcome back to it.
async fn perform(
    effect: Effect,
    session: &mut HubSession,
    online: &mut Option<Online>,
    ctx: &Arc<DeviceContext>,
    stats: &Arc<ConnStats>,
    admission: &Admission,
    remote: &str,
) {
    let device = session.device().clone();
    match effect {
        Effect::Start(hello) => match start(ctx, &device, &hello, stats, admission, remote).await {
            Ok((last_seq, started)) => {
                *online = Some(started);
                session.handle_started(Instant::now(), now_ms(), Ok(last_seq));
            }
            Err(why) => session.handle_started(Instant::now(), now_ms(), Err(why)),
        },
        Effect::FetchCommands => {
            let window = ctx.config.command_queue;
            // Commands handed over until now are in the ledger already: this read lists
            // those still open, and a stale hand-over (of one closed since) must not send
            // it afterwards.
            if let Some(online) = online.as_ref() {
                online.signals.take_created();
            }
            match ctx.ledger.deliverable(&device, 0, window).await {
                Ok(open) => {
                    let now = now_ms();
                    session.handle_deliverable(open.iter().map(|record| record.to_wire(now)))
                }
                Err(err) => {
                    tracing::warn!(%device, error = %err, "cannot read the command ledger; trying again");
                    session.handle_deliverable_failed(Instant::now());
                }
            }
        }
        // Written in the background, in order, while the connection goes on reading: the
        // device's ack and result are usually already on their way.
        Effect::CommandSent(id) => progress(ctx, online, &device, Progress::Sent(id)).await,
        Effect::CommandAcked(id) => progress(ctx, online, &device, Progress::Acked(id)).await,
        // Not after the command's marks: a result implies them, and a mark that comes after
        // it changes nothing (see `ProgressMarks`).
        Effect::CommandFinished(result) => {
            match ctx
                .ledger
                .finished(&device, result.id, result.ok, result.code, &result.output)
                .await
            {
                Ok(true) => session.handle_result_recorded(result.id),
                Ok(false) => {
                    tracing::debug!(%device, id = result.id, "late or unknown command result");
                    session.handle_result_ignored(result.id);
                }
                Err(err) => {
                    tracing::warn!(%device, id = result.id, error = %err, "cannot record a command result")
                }
            }
        }
        Effect::StoreState(state) => {
            let props: Vec<(String, String)> = state
                .properties
                .iter()
                .map(|p| (p.key.to_string(), p.value.to_string()))
                .collect();
            let meta = ctx.meta.clone();
            let d = device.clone();
            // Awaited, so a device that floods state reports is slowed down instead of
            // piling up blocking tasks.
            match tokio::task::spawn_blocking(move || meta.device_state(&d, &props)).await {
                Ok(Ok(())) => {}
                // The device's own doing (too many keys): tell it, keep going.
                Ok(Err(StoreError::Refused(why))) => session.handle_refused(&why),
                Ok(Err(err)) => {
                    tracing::warn!(%device, error = %err, "cannot store reported state")
                }
                Err(err) => tracing::warn!(%device, error = %err, "cannot store reported state"),
            }
        }
        Effect::FetchDesired { full } => {
            let meta = ctx.meta.clone();
            let d = device.clone();
            let read = match tokio::task::spawn_blocking(move || meta.twin(&d)).await {
                Ok(Ok(twin)) => Ok(twin),
                Ok(Err(err)) => Err(err.to_string()),
                Err(err) => Err(err.to_string()),
            };
            match read {
                Ok(twin) => {
                    session.handle_desired_read();
                    if let Some((version, keys)) =
                        twin.and_then(|t| t.outgoing(full).map(|keys| (t.desired_version, keys)))
                    {
                        session.handle_desired(version, &keys);
                    }
                }
                Err(err) => {
                    tracing::warn!(%device, error = %err, "cannot read desired state; trying again");
                    session.handle_desired_failed(Instant::now(), full);
                }
            }
        }
        Effect::StoreApplied(applied) => {
            let values = twin::applied_values(&applied);
            let refused = twin::refusals(&applied);
            let meta = ctx.meta.clone();
            let d = device.clone();
            let version = applied.version;
            let reported = values.clone();
            let stored = tokio::task::spawn_blocking(move || {
                meta.record_applied(&d, version, &values, &refused)?;
                meta.twin(&d)
            })
            .await;
            match stored {
                Ok(Ok(Some(twin))) => {
                    // What the device just reported may differ from what is desired now
                    // (desired changed while the answer was on its way): send the rest.
                    if twin.reported_stale(&reported) {
                        session.handle_desired_changed();
                    }
                    ctx.events.publish(HubEvent::state(&device, &twin))
                }
                Ok(Ok(None)) => {}
                Ok(Err(err)) => tracing::warn!(%device, error = %err, "cannot store applied state"),
                Err(err) => tracing::warn!(%device, error = %err, "cannot store applied state"),
            }
        }
        Effect::FetchOffer => {
            let updates = ctx.updates.clone();
            let d = device.clone();
            match tokio::task::spawn_blocking(move || updates.offer_for(&d)).await {
                Ok(Ok(offer)) => session.handle_offer(offer),
                Ok(Err(err)) => {
                    tracing::warn!(%device, error = %err, "cannot read the device's firmware update");
                    session.handle_offer(None);
                }
                Err(err) => {
                    tracing::warn!(%device, error = %err, "cannot read the device's firmware update")
                }
            }
        }
        Effect::ReadChunk(request) => {
            let firmware = ctx.updates.firmware().clone();
            let (version, offset, len) = (
                request.version.to_string(),
                request.offset,
                request.len as usize,
            );
            match tokio::task::spawn_blocking(move || firmware.read_chunk(&version, offset, len))
                .await
            {
                Ok(Ok(bytes)) => {
                    metrics::counter!("hub_firmware_bytes_sent_total")
                        .increment(bytes.len() as u64);
                    session.handle_chunk_read(&request, Ok(&bytes));
                }
                Ok(Err(err)) => session.handle_chunk_read(&request, Err(err.to_string())),
                Err(err) => session.handle_chunk_read(&request, Err(err.to_string())),
            }
        }
        Effect::StoreFirmwareStatus(status) => {
            let updates = ctx.updates.clone();
            let d = device.clone();
            match tokio::task::spawn_blocking(move || updates.report(&d, &status)).await {
                Ok(Ok(Some(record))) if record.stage.is_final() => session.handle_offer_changed(),
                Ok(Ok(_)) => {}
                Ok(Err(err)) => {
                    tracing::warn!(%device, error = %err, "cannot record a firmware status")
                }
                Err(err) => {
                    tracing::warn!(%device, error = %err, "cannot record a firmware status")
                }
            }
        }
        Effect::Rtt(rtt) => {
            stats
                .rtt_us
                .store(rtt.as_micros().max(1) as u64, Ordering::Relaxed);
            metrics::histogram!("hub_ping_rtt_seconds").record(rtt.as_secs_f64());
        }
    }
}

/// Starts a session after `Hello`: reads what the store holds for the device, registers
/// the connection (here and on the backplane, superseding an older one), records it, and
/// announces it.
async fn start(
    ctx: &Arc<DeviceContext>,
    device: &Arc<str>,
    hello: &Hello,
    stats: &Arc<ConnStats>,
    admission: &Admission,
    remote: &str,
) -> Result<(u64, Online), StartFailure> {
    let last_seq = match ctx.ingest.last_seq(device.clone()).await {
        Ok(seq) => seq,
        // The writer stopped because the hub is shutting down, not because it failed.
        Err(_) if *ctx.shutdown.borrow() => return Err(StartFailure::ShuttingDown),
        Err(err) => {
            tracing::error!(%device, error = %err, "cannot read the device's last stored sequence");
            return Err(StartFailure::Store);
        }
    };
    let signals = Arc::new(Signals::default());
    let conn_id = ctx.presence.next_conn_id();
    let connected_at = now_ms();
    let firmware = hello.firmware.to_string();
    let superseded = ctx.presence.register(
        device.clone(),
        Connection {
            conn_id,
            firmware: firmware.clone(),
            remote: remote.to_string(),
            connected_at_ms: connected_at,
            token_issued_ms: admission.claims.issued_at_ms,
            stats: stats.clone(),
            signals: signals.clone(),
        },
    );
    // Why the device's previous connection (if any) ended: replaced here or on another
    // node, or its node died and the device came back through this one.
    let mut previous_end = superseded.map(|_| "superseded".to_string());
    if let Some(cluster) = &ctx.cluster {
        if let Some(elsewhere) = cluster.hold(device, conn_id).await {
            previous_end = Some(elsewhere);
        }
    }
    if let Some(cause) = previous_end {
        ctx.events.publish(HubEvent::Presence {
            device: device.to_string(),
            online: false,
            cause,
            at_ms: connected_at,
        });
    }
    let capabilities = hello
        .capabilities
        .iter()
        .map(|c| c.as_str())
        .collect::<Vec<_>>()
        .join(",");
    let meta = ctx.meta.clone();
    let (d, fw, rem) = (device.clone(), firmware.clone(), remote.to_string());
    let recorded = tokio::task::spawn_blocking(move || {
        meta.device_connected(&d, &fw, &capabilities, &rem, connected_at)
    })
    .await;
    if !matches!(recorded, Ok(Ok(()))) {
        tracing::warn!(%device, "could not record the connection in the device table");
    }
    ctx.events.publish(HubEvent::Presence {
        device: device.to_string(),
        online: true,
        cause: "connected".into(),
        at_ms: connected_at,
    });
    tracing::info!(%device, %remote, firmware = %firmware, encoding = ?admission.encoding, last_seq, "device online");
    Ok((
        last_seq,
        Online {
            conn_id,
            signals,
            // Starts at what is already stored, so shutdown waits only for batches of this
            // session.
            slot: Arc::new(AckSlot::starting_at(last_seq)),
            marks: ProgressMarks::default(),
        },
    ))
}

/// Records the end of a welcomed connection: presence (here and on the backplane), the
/// offline event with its cause, and the device table.
async fn offline(
    ctx: &Arc<DeviceContext>,
    device: &Arc<str>,
    stats: &Arc<ConnStats>,
    conn_id: u64,
    end: &End,
) {
    let at = now_ms();
    if end.cause == "pong_timeout" {
        metrics::counter!("hub_liveness_timeouts_total").increment(1);
    }
    let mut current = ctx.presence.unregister(device, conn_id);
    let mut record = current;
    if current {
        if let Some(cluster) = &ctx.cluster {
            match cluster.let_go(device, conn_id).await {
                LetGo::Offline => {}
                // Another node may have taken the device over; then it is not offline.
                LetGo::Elsewhere => current = false,
                // The shared registry is out of reach; the backplane records it later.
                LetGo::Deferred => record = false,
            }
        }
    }
    if current {
        ctx.events.publish(HubEvent::Presence {
            device: device.to_string(),
            online: false,
            cause: end.cause.clone(),
            at_ms: at,
        });
    }
    if current && record {
        let meta = ctx.meta.clone();
        let (d, cause) = (device.clone(), end.cause.clone());
        let last_seen = stats.last_seen_ms.load(Ordering::Relaxed);
        let rtt = stats.rtt();
        let _ = tokio::task::spawn_blocking(move || {
            meta.device_disconnected(&d, at, &cause, last_seen, rtt)
        })
        .await;
    }
    tracing::info!(%device, cause = %end.cause, code = ?end.code, reason = %end.reason, "device offline");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tungstenite_read_errors_become_what_the_session_closes_with() {
        let top_bit = read_error(WsError::Capacity(CapacityError::MessageTooLong {
            size: 1 << 63,
            max_size: 16_384,
        }));
        assert!(matches!(top_bit, ReadError::LengthTopBit), "{top_bit:?}");
        let big = read_error(WsError::Capacity(CapacityError::MessageTooLong {
            size: (1 << 63) - 1,
            max_size: 16_384,
        }));
        assert!(
            matches!(big, ReadError::TooBig { sizes: Some((s, 16_384)) } if s == (1 << 63) - 1),
            "{big:?}"
        );
        let utf8 = read_error(WsError::Utf8("invalid utf-8 sequence".into()));
        assert!(matches!(utf8, ReadError::InvalidUtf8(_)), "{utf8:?}");
        let reset = read_error(WsError::Protocol(
            ProtocolError::ResetWithoutClosingHandshake,
        ));
        assert!(matches!(reset, ReadError::Reset), "{reset:?}");
    }

    #[test]
    fn the_token_expiry_is_its_wall_clock_time_on_the_monotonic_clock() {
        let now = Instant::now();
        let at = token_expiry(now, 1_000_000_250, 1_000_010);
        assert_eq!(at - now, Duration::from_millis(9_750));
        // Already expired (the upgrade refuses that, but a second may have passed).
        assert_eq!(token_expiry(now, 5_000, 4), now);
        // Centuries away: capped at a year.
        let far = token_expiry(now, 0, u64::MAX);
        assert_eq!(far - now, Duration::from_secs(365 * 24 * 3600));
    }
}
