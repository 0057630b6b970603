//! One device connection after the upgrade: `Hello`/`Welcome`, then a loop that reads
//! frames, feeds telemetry to the ingest pipeline, sends acks as the writer releases
//! them, pings on the liveness timer, and closes with a code that says why.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use schemas::codec::{decode_json, decode_postcard, encode_json, encode_postcard_vec};
use schemas::limits::{MAX_MESSAGE_BYTES, MAX_READINGS};
use schemas::message::truncated;
use schemas::{
    close, Ack, Command, DecodeError, DeviceMessage, Encoding, ErrorMessage, Hello, HubMessage,
    Welcome,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::liveness::{Liveness, LivenessAction, RateLimit};
use super::DeviceContext;
use crate::events::HubEvent;
use crate::ingest::AckSlot;
use crate::presence::{ConnStats, Connection, Kick};
use crate::store::{now_ms, Batch, StoreError};
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

/// How long shutdown waits for outstanding acks before closing.
const ACK_DRAIN: Duration = Duration::from_secs(2);

/// Why a connection ended: the close code sent (if any) and the presence cause.
#[derive(Debug, Clone)]
struct End {
    code: Option<u16>,
    reason: String,
    cause: String,
}

impl End {
    fn close(code: u16, reason: impl Into<String>, cause: impl Into<String>) -> End {
        End {
            code: Some(code),
            reason: reason.into(),
            cause: cause.into(),
        }
    }
    fn gone(cause: impl Into<String>) -> End {
        End {
            code: None,
            reason: String::new(),
            cause: cause.into(),
        }
    }
}

struct Conn<S> {
    ws: WebSocketStream<S>,
    encoding: Encoding,
    device: Arc<str>,
    ctx: Arc<DeviceContext>,
    stats: Arc<ConnStats>,
    write_timeout: Duration,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    async fn send(&mut self, msg: &HubMessage) -> Result<(), End> {
        let frame = match self.encoding {
            Encoding::Postcard => Message::binary(encode_postcard_vec(msg)),
            Encoding::Json => Message::text(encode_json(msg)),
        };
        self.send_frame(frame).await
    }

    async fn send_frame(&mut self, frame: Message) -> Result<(), End> {
        let len = frame.len();
        match tokio::time::timeout(self.write_timeout, self.ws.send(frame)).await {
            Ok(Ok(())) => {
                metrics::counter!("hub_frames_out_total").increment(1);
                metrics::counter!("hub_bytes_out_total").increment(len as u64);
                Ok(())
            }
            Ok(Err(_)) => Err(End::gone("io_error")),
            Err(_) => Err(End::gone("write_timeout")),
        }
    }

    fn decode(&self, msg: &Message) -> Result<Option<DeviceMessage>, End> {
        let decoded = match (self.encoding, msg) {
            (Encoding::Postcard, Message::Binary(bytes)) => decode_postcard::<DeviceMessage>(bytes),
            (Encoding::Json, Message::Text(text)) => decode_json::<DeviceMessage>(text.as_str()),
            (Encoding::Postcard, Message::Text(_)) => {
                return Err(End::close(
                    close::UNSUPPORTED_DATA,
                    "text frame on a hub.v1.postcard connection",
                    "protocol:1003",
                ))
            }
            (Encoding::Json, Message::Binary(_)) => {
                return Err(End::close(
                    close::UNSUPPORTED_DATA,
                    "binary frame on a hub.v1.json connection",
                    "protocol:1003",
                ))
            }
            _ => return Ok(None),
        };
        match decoded {
            Ok(m) => {
                if let Err(v) = m.validate() {
                    return Err(End::close(
                        close::INVALID_PAYLOAD,
                        v.reason(),
                        "protocol:1007",
                    ));
                }
                Ok(Some(m))
            }
            Err(DecodeError::UnknownType) => Err(End::close(
                close::UNKNOWN_MESSAGE,
                "unknown message type",
                "protocol:4002",
            )),
            Err(err @ DecodeError::Malformed(_)) => Err(End::close(
                close::INVALID_PAYLOAD,
                err.to_string(),
                "protocol:1007",
            )),
        }
    }

    fn count_in(&self, msg: &Message) {
        metrics::counter!("hub_frames_in_total").increment(1);
        metrics::counter!("hub_bytes_in_total").increment(msg.len() as u64);
        self.stats.last_seen_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// Waits for `Hello`, answering pings meanwhile.
    async fn hello(&mut self) -> Result<Hello, End> {
        let deadline = tokio::time::Instant::now() + self.ctx.config.hello_timeout;
        let mut shutdown = self.ctx.shutdown.clone();
        loop {
            let next = tokio::select! {
                _ = crate::stopping(&mut shutdown) => {
                    return Err(End::close(close::GOING_AWAY, "hub shutting down", "shutdown"));
                }
                next = tokio::time::timeout_at(deadline, self.ws.next()) => next.map_err(|_| {
                    End::close(
                        close::HELLO_TIMEOUT,
                        "no hello within the hello timeout",
                        "hello_timeout",
                    )
                })?,
            };
            let msg = read_result(next)?;
            self.count_in(&msg);
            match self.decode(&msg)? {
                Some(DeviceMessage::Hello(hello)) => return Ok(hello),
                Some(other) => {
                    return Err(End::close(
                        close::PROTOCOL_VIOLATION,
                        format!("{} before hello", other.kind()),
                        "protocol:4001",
                    ))
                }
                None => {}
            }
        }
    }

    /// Closes with a code, waits briefly for the peer's close, and shuts TLS down.
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

fn read_result(next: Option<Result<Message, WsError>>) -> Result<Message, End> {
    match next {
        Some(Ok(msg)) => Ok(msg),
        Some(Err(WsError::Capacity(CapacityError::MessageTooLong { size, max_size }))) => {
            Err(End::close(
                close::TOO_BIG,
                format!("message of {size} bytes exceeds the limit of {max_size}"),
                "protocol:1009",
            ))
        }
        Some(Err(WsError::Capacity(_))) => Err(End::close(
            close::TOO_BIG,
            format!("frame exceeds the limit of {MAX_MESSAGE_BYTES} bytes"),
            "protocol:1009",
        )),
        // The peer vanished (a killed process, a proxy that dropped it): not its protocol's fault.
        Some(Err(WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake))) => {
            Err(End::gone("connection_reset"))
        }
        Some(Err(WsError::Protocol(p))) => Err(End::close(
            close::PROTOCOL_ERROR,
            p.to_string(),
            "protocol:1002",
        )),
        Some(Err(_)) => Err(End::gone("io_error")),
        None => Err(End::gone("io_error")),
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

/// Runs one admitted connection to its end.
pub async fn run<S>(
    ws: WebSocketStream<S>,
    admission: Admission,
    remote: SocketAddr,
    ctx: Arc<DeviceContext>,
) where
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
    let mut conn = Conn {
        ws,
        encoding: admission.encoding,
        device: device.clone(),
        write_timeout: ctx.config.write_timeout,
        ctx: ctx.clone(),
        stats: stats.clone(),
    };
    // Counts this connection until the function returns, whichever way.
    let _gauge = ConnectionGauge::open();
    let hello = match conn.hello().await {
        Ok(hello) => hello,
        Err(end) => {
            tracing::debug!(%device, %remote, cause = %end.cause, reason = %end.reason, "connection ended before hello");
            conn.finish(&end).await;
            return;
        }
    };
    let last_seq = match ctx.ingest.last_seq(device.clone()).await {
        Ok(seq) => seq,
        Err(_) if *ctx.shutdown.borrow() => {
            // The writer stopped because the hub is shutting down, not because it failed.
            conn.finish(&End::close(
                close::GOING_AWAY,
                "hub shutting down",
                "shutdown",
            ))
            .await;
            return;
        }
        Err(err) => {
            tracing::error!(%device, error = %err, "cannot read the device's last stored sequence");
            conn.finish(&End::close(
                close::INTERNAL,
                "store unavailable; retry later",
                "store_failure",
            ))
            .await;
            return;
        }
    };
    let kick = Arc::new(Kick::default());
    let commands = Arc::new(Notify::new());
    let conn_id = ctx.presence.next_conn_id();
    let connected_at = now_ms();
    let firmware = hello.firmware.to_string();
    let superseded = ctx.presence.register(
        device.clone(),
        Connection {
            conn_id,
            firmware: firmware.clone(),
            remote: remote.clone(),
            connected_at_ms: connected_at,
            token_issued_ms: admission.claims.issued_at_ms,
            stats: stats.clone(),
            kick: kick.clone(),
            commands: commands.clone(),
        },
    );
    // Why the device's previous connection (if any) ended: replaced here or on another
    // node, or its node died and the device came back through this one.
    let mut previous_end = superseded.map(|_| "superseded".to_string());
    if let Some(cluster) = &ctx.cluster {
        match cluster.claim(&device, conn_id).await {
            Ok(Some(previous)) if previous.node != cluster.node() => {
                if cluster.node_alive(&previous.node).await {
                    // The device was held by another node: that connection must go.
                    cluster
                        .kick(&previous, &device, schemas::close::SUPERSEDED)
                        .await;
                    previous_end = Some("superseded".into());
                } else {
                    previous_end = Some(format!("node_dead:{}", previous.node));
                }
            }
            Ok(_) => {}
            Err(err) => {
                tracing::warn!(%device, error = %err, "cannot record presence on the backplane")
            }
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
    let (d, fw, rem) = (device.clone(), firmware.clone(), remote.clone());
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
    tracing::info!(%device, %remote, firmware = %firmware, encoding = ?conn.encoding, last_seq, "device online");

    let end = session(&mut conn, last_seq, &kick, &commands).await;

    // Presence first (timeliness), then the close handshake.
    let at = now_ms();
    if end.cause == "pong_timeout" {
        metrics::counter!("hub_liveness_timeouts_total").increment(1);
    }
    let mut current = ctx.presence.unregister(&device, conn_id);
    if current {
        if let Some(cluster) = &ctx.cluster {
            // Another node may have taken the device over; then it is not offline.
            current = cluster.release(&device, conn_id).await.unwrap_or_else(|err| {
                tracing::warn!(%device, error = %err, "cannot release presence on the backplane");
                true
            });
        }
    }
    if current {
        ctx.events.publish(HubEvent::Presence {
            device: device.to_string(),
            online: false,
            cause: end.cause.clone(),
            at_ms: at,
        });
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
    conn.finish(&end).await;
}

/// Sends the device's open commands that are within its window and not yet sent on this
/// connection. The window is the oldest `device.command_queue` open commands, so at most
/// that many are outstanding; newer ones wait in the ledger.
async fn deliver_commands<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    delivered_up_to: &mut u64,
) -> Result<(), End> {
    let window = conn.ctx.config.command_queue;
    let open = match conn.ctx.ledger.deliverable(&conn.device, 0, window).await {
        Ok(open) => open,
        Err(err) => {
            tracing::warn!(device = %conn.device, error = %err, "cannot read the command ledger");
            return Ok(());
        }
    };
    let after = *delivered_up_to;
    for record in open.into_iter().filter(|r| r.id > after) {
        let deadline = record
            .deadline
            .unwrap_or_else(|| now_ms() + record.timeout_ms);
        let msg = HubMessage::Command(Command {
            id: record.id,
            name: truncated(&record.name),
            args: truncated(&record.args.to_string()),
            deadline,
        });
        // Recorded before it goes out: a device may answer before a later write lands,
        // and if the send fails the command is re-delivered on the next connection anyway.
        if let Err(err) = conn.ctx.ledger.sent(record.id).await {
            tracing::warn!(device = %conn.device, id = record.id, error = %err, "cannot record a command delivery");
        }
        conn.send(&msg).await?;
        *delivered_up_to = record.id;
    }
    Ok(())
}

/// The main loop after `Welcome`.
async fn session<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    last_seq: u64,
    kick: &Kick,
    commands: &Notify,
) -> End {
    let cfg = conn.ctx.config.clone();
    let welcome = HubMessage::Welcome(Welcome {
        server_time: now_ms(),
        ping_interval_ms: cfg.ping_interval.as_millis().min(u32::MAX as u128) as u32,
        pong_timeout_ms: cfg.pong_timeout.as_millis().min(u32::MAX as u128) as u32,
        last_seq,
        max_readings: MAX_READINGS as u16,
        max_message_bytes: MAX_MESSAGE_BYTES as u32,
    });
    if let Err(end) = conn.send(&welcome).await {
        return end;
    }
    // Starts at what is already stored, so shutdown waits only for batches of this session.
    let slot = Arc::new(AckSlot::starting_at(last_seq));
    let mut sent_ack = last_seq;
    let mut submitted = last_seq;
    // A batch read from the socket that waits for room in the ingest queue. While it
    // waits the socket is not read (backpressure), but commands and pings still flow.
    let mut pending: Option<Batch> = None;
    let mut delivered_up_to = 0u64;
    let mut liveness = Liveness::new(Instant::now(), cfg.ping_interval, cfg.pong_timeout);
    let mut rate = RateLimit::new(Instant::now(), cfg.max_messages_per_sec);
    let mut shutdown = conn.ctx.shutdown.clone();
    let ingest = conn.ctx.ingest.clone();
    // Deliver whatever waited for this device while it was offline.
    commands.notify_one();
    loop {
        let wake = tokio::time::Instant::from_std(liveness.poll_timeout());
        tokio::select! {
            biased;
            _ = crate::stopping(&mut shutdown) => {
                // Let the writer finish what this device already sent, so it gets its acks.
                let _ = tokio::time::timeout(ACK_DRAIN, async {
                    while slot.acked() < submitted && !slot.failed() {
                        slot.notify.notified().await;
                    }
                }).await;
                if slot.acked() > sent_ack {
                    let _ = conn.send(&HubMessage::Ack(Ack { up_to_seq: slot.acked() })).await;
                }
                return End::close(close::GOING_AWAY, "hub shutting down", "shutdown");
            }
            _ = kick.notify.notified() => {
                let (code, reason) = kick.reason().unwrap_or((close::POLICY, "closed by the hub"));
                let cause = if code == close::SUPERSEDED { "superseded".to_string() } else { format!("kicked:{code}") };
                return End::close(code, reason, cause);
            }
            _ = commands.notified() => {
                if let Err(end) = deliver_commands(conn, &mut delivered_up_to).await {
                    return end;
                }
            }
            permit = ingest.reserve(), if pending.is_some() => {
                let Ok(permit) = permit else {
                    return End::close(close::GOING_AWAY, "hub shutting down", "shutdown");
                };
                if let Some(batch) = pending.take() {
                    submitted = submitted.max(batch.seq);
                    if conn.ctx.events.readings_wanted() {
                        conn.ctx.events.publish(HubEvent::Readings {
                            device: batch.device.to_string(),
                            seq: batch.seq,
                            readings: batch.readings.iter().map(|r| (r.metric.to_string(), r.ts, r.value)).collect(),
                        });
                    }
                    permit.send(batch, slot.clone());
                }
            }
            next = conn.ws.next(), if pending.is_none() => {
                let msg = match read_result(next) {
                    Ok(msg) => msg,
                    Err(end) => return end,
                };
                conn.count_in(&msg);
                let now = Instant::now();
                match &msg {
                    Message::Pong(payload) => {
                        if let Some(rtt) = liveness.on_pong(now, payload) {
                            conn.stats.rtt_us.store(rtt.as_micros().max(1) as u64, Ordering::Relaxed);
                            metrics::histogram!("hub_ping_rtt_seconds").record(rtt.as_secs_f64());
                        }
                        continue;
                    }
                    Message::Close(frame) => {
                        let code = frame.as_ref().map(|f| u16::from(f.code)).unwrap_or(close::NORMAL);
                        // tungstenite has queued the answering close frame (RFC 6455 5.5.1);
                        // send it, so the device sees a clean close.
                        let _ = tokio::time::timeout(CLOSE_GRACE, conn.ws.flush()).await;
                        return End { code: None, reason: String::new(), cause: format!("closed:{code}") };
                    }
                    _ => liveness.on_frame(now),
                }
                let decoded = match conn.decode(&msg) {
                    Ok(Some(m)) => m,
                    Ok(None) => continue,
                    Err(end) => return end,
                };
                if !rate.allow(now) {
                    return End::close(close::POLICY, "rate limit: too many messages per second", "rate_limit");
                }
                match decoded {
                    DeviceMessage::Hello(_) => {
                        return End::close(close::PROTOCOL_VIOLATION, "second hello on one connection", "protocol:4001");
                    }
                    DeviceMessage::Telemetry(t) if t.seq <= sent_ack => {
                        // Already stored and acknowledged: a re-send after a lost ack.
                        // Acknowledge it again at once; the store is not touched.
                        metrics::counter!("hub_batches_duplicate_total").increment(1);
                        if let Err(end) = conn.send(&HubMessage::Ack(Ack { up_to_seq: sent_ack })).await {
                            return end;
                        }
                    }
                    DeviceMessage::Telemetry(t) => {
                        conn.stats.readings.fetch_add(t.readings.len() as u64, Ordering::Relaxed);
                        metrics::counter!("hub_readings_received_total").increment(t.readings.len() as u64);
                        pending = Some(Batch { device: conn.device.clone(), seq: t.seq, readings: t.readings.into_iter().collect() });
                    }
                    DeviceMessage::CommandAck(ack) => {
                        if let Err(err) = conn.ctx.ledger.acked(&conn.device, ack.id).await {
                            tracing::warn!(device = %conn.device, id = ack.id, error = %err, "cannot record a command ack");
                        }
                    }
                    DeviceMessage::CommandResult(result) => {
                        match conn.ctx.ledger.finished(&conn.device, result.id, result.ok, result.code, &result.output).await {
                            Ok(true) => {}
                            Ok(false) => {
                                tracing::debug!(device = %conn.device, id = result.id, "late or unknown command result");
                                let note = HubMessage::Error(ErrorMessage {
                                    code: close::PROTOCOL_VIOLATION,
                                    message: truncated(&format!("command {} is unknown or already final; result ignored", result.id)),
                                });
                                if let Err(end) = conn.send(&note).await {
                                    return end;
                                }
                            }
                            Err(err) => tracing::warn!(device = %conn.device, id = result.id, error = %err, "cannot record a command result"),
                        }
                    }
                    DeviceMessage::State(state) => {
                        let props: Vec<(String, String)> =
                            state.properties.iter().map(|p| (p.key.to_string(), p.value.to_string())).collect();
                        let meta = conn.ctx.meta.clone();
                        let device = conn.device.clone();
                        // Awaited, so a device that floods state reports is slowed down
                        // instead of piling up blocking tasks.
                        let stored = tokio::task::spawn_blocking(move || meta.device_state(&device, &props)).await;
                        match stored {
                            Ok(Ok(())) => {}
                            Ok(Err(StoreError::Refused(why))) => {
                                // The device's own doing (too many keys): tell it, keep going.
                                let note = HubMessage::Error(ErrorMessage { code: close::POLICY, message: truncated(&why) });
                                if let Err(end) = conn.send(&note).await {
                                    return end;
                                }
                            }
                            Ok(Err(err)) => tracing::warn!(device = %conn.device, error = %err, "cannot store reported state"),
                            Err(err) => tracing::warn!(device = %conn.device, error = %err, "cannot store reported state"),
                        }
                    }
                }
            }
            _ = slot.notify.notified() => {
                if slot.failed() {
                    return End::close(close::INTERNAL, "store unavailable; keep your data and retry later", "store_failure");
                }
                let acked = slot.acked();
                if acked > sent_ack {
                    sent_ack = acked;
                    if let Err(end) = conn.send(&HubMessage::Ack(Ack { up_to_seq: acked })).await {
                        return end;
                    }
                }
            }
            _ = tokio::time::sleep_until(wake) => {
                if pending.is_some() {
                    // The socket is not being read (backpressure), so silence is ours, not
                    // the device's: do not count it against the device.
                    liveness.on_frame(Instant::now());
                }
                match liveness.handle_timeout(Instant::now()) {
                    Some(LivenessAction::Ping(payload)) => {
                        if let Err(end) = conn.send_frame(Message::Ping(payload.to_vec().into())).await {
                            return end;
                        }
                    }
                    Some(LivenessAction::Dead) => {
                        return End::close(close::LIVENESS_TIMEOUT, "no pong within the pong timeout", "pong_timeout");
                    }
                    None => {}
                }
            }
        }
    }
}
