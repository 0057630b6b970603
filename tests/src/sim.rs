//! A test device built on the shared sans-io session (`schemas::session`): it reconnects
//! with backoff, keeps unacknowledged batches in memory and re-sends them, answers
//! commands, and counts what it recorded and what was acknowledged, so tests can compare
//! with what the store holds.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use schemas::codec::encode_postcard_vec;
use schemas::link::{self, DataFrame};
use schemas::message::truncated;
use schemas::session::{
    Action, CloseReason, Delivered, DisconnectCause, MemOutbox, Outbox, Session, SessionConfig,
};
use schemas::{close, Encoding, HubMessage, Reading};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

/// Counters a simulated device keeps.
#[derive(Debug, Default)]
pub struct SimStats {
    /// Readings recorded (handed to the session).
    pub recorded: AtomicU64,
    /// Whether the outbox is empty (everything recorded was acknowledged).
    pub drained: AtomicBool,
    /// Whether a session is up.
    pub online: AtomicBool,
    /// Commands run.
    pub commands: AtomicU64,
    /// Sessions established.
    pub sessions: AtomicU64,
}

/// How a simulated device runs.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// Device URL (wss://).
    pub url: String,
    /// CA to trust.
    pub ca: PathBuf,
    /// Device token.
    pub token: String,
    /// Readings per batch.
    pub batch: usize,
    /// Time between batches.
    pub interval: Duration,
}

/// Runs a device until `stop` is set and (then) everything is acknowledged, or `stop_now`.
pub async fn run(
    opts: SimOptions,
    stats: Arc<SimStats>,
    stop: Arc<AtomicBool>,
    stop_now: Arc<AtomicBool>,
) {
    let mut config = SessionConfig::new("sim-1.0");
    config.backoff_initial_ms = 200;
    config.backoff_max_ms = 2_000;
    config.refused_backoff_ms = 2_000;
    let mut session = Session::new(config, MemOutbox::unbounded());
    let epoch = Instant::now();
    let now = || epoch.elapsed().as_millis() as u64;
    // Backoff jitter only needs numbers that differ between devices and attempts: the
    // standard library's randomly keyed hasher gives them without a generator of our own.
    let keys = std::collections::hash_map::RandomState::new();
    let mut attempt = 0u64;
    let mut random = move || {
        attempt += 1;
        std::hash::BuildHasher::hash_one(&keys, attempt) as u32
    };
    let base_ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let mut counter = 0u64;
    let mut next_batch = tokio::time::Instant::now();
    loop {
        if stop_now.load(Ordering::Relaxed)
            || (stop.load(Ordering::Relaxed) && session.outbox().is_empty())
        {
            stats
                .drained
                .store(session.outbox().is_empty(), Ordering::Relaxed);
            return;
        }
        match session.handle_timeout(now()) {
            Some(Action::Connect) => {}
            _ => {
                let wait = session
                    .poll_timeout()
                    .map(|t| t.saturating_sub(now()))
                    .unwrap_or(50)
                    .min(50);
                tokio::time::sleep(Duration::from_millis(wait)).await;
                continue;
            }
        }
        let ws = crate::client::connect(
            &opts.url,
            &opts.ca,
            Some(&opts.token),
            Some("hub.v1.postcard"),
        )
        .await;
        let mut ws = match ws {
            Ok(ws) => ws,
            Err(err) => {
                let cause = match err.as_ref() {
                    tokio_tungstenite::tungstenite::Error::Http(resp) => {
                        let retry_after = resp
                            .headers()
                            .get("retry-after")
                            .and_then(|v| v.to_str().ok())
                            .and_then(link::parse_retry_after);
                        link::upgrade_refused(resp.status().as_u16(), retry_after)
                    }
                    _ => DisconnectCause::ConnectFailed,
                };
                session.handle_disconnected(now(), cause, random());
                continue;
            }
        };
        session.handle_connected(now());
        let cause = 'conn: loop {
            while let Ok(Some(msg)) = session.poll_transmit() {
                if ws
                    .send(Message::binary(encode_postcard_vec(&msg)))
                    .await
                    .is_err()
                {
                    break 'conn DisconnectCause::Io;
                }
            }
            stats.online.store(session.is_ready(), Ordering::Relaxed);
            stats
                .drained
                .store(session.outbox().is_empty(), Ordering::Relaxed);
            if stop_now.load(Ordering::Relaxed)
                || (stop.load(Ordering::Relaxed) && session.outbox().is_empty())
            {
                let _ = ws.close(None).await;
                break 'conn DisconnectCause::Closed(1000);
            }
            if let Some(Action::Close(reason)) = session.handle_timeout(now()) {
                break 'conn DisconnectCause::Local(reason);
            }
            let timeout = session
                .poll_timeout()
                .map(|t| t.saturating_sub(now()))
                .unwrap_or(1000);
            tokio::select! {
                _ = tokio::time::sleep_until(next_batch), if !stop.load(Ordering::Relaxed) => {
                    next_batch += opts.interval;
                    let readings: Vec<Reading> = (0..opts.batch)
                        .map(|i| {
                            counter += 1;
                            Reading { metric: truncated(&format!("m{i}")), ts: base_ts + counter, value: counter as f64 }
                        })
                        .collect();
                    let _ = session.record(&readings);
                    stats.recorded.fetch_add(readings.len() as u64, Ordering::Relaxed);
                }
                _ = tokio::time::sleep(Duration::from_millis(timeout.min(100))) => {}
                frame = ws.next() => match frame {
                    Some(Ok(Message::Binary(bytes))) => {
                        session.handle_activity(now());
                        let msg = match link::decode_frame::<HubMessage>(Encoding::Postcard, DataFrame::Binary(&bytes)) {
                            Ok(msg) => msg,
                            Err(refused) => break 'conn DisconnectCause::Local(protocol_close(&mut ws, refused.code).await),
                        };
                        match session.handle_message(now(), msg) {
                            Ok(Delivered::Welcome(_)) => { stats.sessions.fetch_add(1, Ordering::Relaxed); }
                            Ok(Delivered::Command(cmd)) => {
                                stats.commands.fetch_add(1, Ordering::Relaxed);
                                session.command_finished(cmd.id, true, 0, &format!("done:{}", cmd.name));
                            }
                            Ok(_) => {}
                            Err(_) => break 'conn DisconnectCause::Local(protocol_close(&mut ws, close::PROTOCOL_VIOLATION).await),
                        }
                    }
                    Some(Ok(Message::Text(_))) => {
                        break 'conn DisconnectCause::Local(protocol_close(&mut ws, close::UNSUPPORTED_DATA).await)
                    }
                    Some(Ok(Message::Close(frame))) => break 'conn link::peer_closed(frame.map(|f| u16::from(f.code))),
                    Some(Ok(_)) => session.handle_activity(now()),
                    Some(Err(_)) | None => break 'conn DisconnectCause::Io,
                },
            }
        };
        stats.online.store(false, Ordering::Relaxed);
        session.handle_disconnected(now(), cause, random());
    }
}

/// Closes the connection with `code` because the hub broke the protocol.
async fn protocol_close<S>(ws: &mut S, code: u16) -> CloseReason
where
    S: futures_util::Sink<Message> + Unpin,
{
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: "".into(),
    };
    let _ = ws.send(Message::Close(Some(frame))).await;
    CloseReason::ProtocolViolation
}
