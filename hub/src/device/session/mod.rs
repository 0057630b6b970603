//! The hub side of the device protocol as a deterministic, sans-io state machine: one
//! [`HubSession`] per connection decides what every frame, timer and store outcome means,
//! and the connection task around it only moves bytes and performs [`Effect`]s.
//!
//! quinn-proto is the model. The driver feeds inputs (`handle_frame(now, ..)`,
//! `handle_timeout(now)`, `handle_started(..)`, `handle_stored(..)`, ...), then drains
//! [`HubSession::poll_effect`] (store, ledger and registry work, performed in order) before
//! [`HubSession::poll_transmit`] (frames to send), and sleeps until
//! [`HubSession::poll_timeout`]. The session never reads a clock: `now` is an argument, so
//! tests drive it with a virtual clock (see `hub/tests/session_pair/`, which wires it to
//! the device's `schemas::session::Session` in memory).
//!
//! A connection goes through these phases:
//!
//! ```text
//! AwaitHello ──hello──▶ Starting ──handle_started(Ok)──▶ Ready ──shutdown──▶ Draining
//!      │                   │                               │                    │
//!      └───────────────────┴──────────── any end ──────────┴────────────────────┴──▶ Ended
//! ```
//!
//! Everything it queues is bounded: at most one batch waits for the ingest queue (while it
//! waits, [`HubSession::wants_read`] is false and TCP pushes back on the device), effects and
//! transmits are drained by the driver after every input, and the command window
//! (`command_window`) bounds how many commands one fetch can queue.
//!
//! Firmware chunks are the one large thing a hub sends, so they never wait in the transmit
//! queue ahead of acks, commands or pings: the session keeps the device's chunk requests
//! (at most [`MAX_FIRMWARE_REQUESTS`], the device's window) and answers one only when the
//! driver has nothing else to do ([`HubSession::has_chunk_due`], then
//! [`HubSession::handle_chunk_due`], which asks for the bytes with [`Effect::ReadChunk`]).
//! The hub-wide cap on transfer throughput is the driver's: it reserves
//! [`HubSession::next_chunk_len`] bytes and calls `handle_chunk_due` once they are paid
//! for, while everything else keeps flowing; a request waiting for the cap is just the
//! request, never bytes read ahead.

mod firmware;
mod liveness;
mod read_retry;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use schemas::limits::{
    MAX_CHUNK_BYTES, MAX_FIRMWARE_REQUESTS, MAX_MESSAGE_BYTES, MAX_PROPERTIES, MAX_READINGS,
};
use schemas::link::{decode_frame, DataFrame};
use schemas::message::truncated;
use schemas::{
    capability, close, Ack, Applied, Command, CommandClosed, CommandResult, DecodeError, Desired,
    DeviceMessage, Encoding, ErrorMessage, FirmwareChunk, FirmwareOffer, FirmwareRequest,
    FirmwareStatus, Hello, HubMessage, Property, State, Welcome,
};

use self::liveness::{Liveness, LivenessAction, RateLimit};
use self::read_retry::ReadRetry;
use crate::store::Batch;

/// The protocol settings of one connection (from `device.*` in the configuration).
#[derive(Debug, Clone)]
pub struct SessionParams {
    /// How often the hub pings once the session is ready.
    pub ping_interval: Duration,
    /// Silence after a ping that means the device is gone.
    pub pong_timeout: Duration,
    /// Time allowed between the upgrade and `Hello`.
    pub hello_timeout: Duration,
    /// Messages per second the device may send (bursts of twice that).
    pub max_messages_per_sec: usize,
    /// Most commands outstanding on the connection; newer ones wait in the ledger.
    pub command_window: usize,
    /// How long shutdown waits for the acks of batches already handed to the store.
    pub ack_drain: Duration,
}

impl SessionParams {
    /// The session settings of a hub configured with `config`.
    pub fn from_config(config: &crate::config::DeviceConfig) -> SessionParams {
        SessionParams {
            ping_interval: config.ping_interval,
            pong_timeout: config.pong_timeout,
            hello_timeout: config.hello_timeout,
            max_messages_per_sec: config.max_messages_per_sec,
            command_window: config.command_queue,
            ack_drain: ACK_DRAIN,
        }
    }
}

/// How long shutdown waits for outstanding acks before closing.
pub const ACK_DRAIN: Duration = Duration::from_secs(2);

/// A frame the WebSocket layer delivered.
#[derive(Debug, Clone, Copy)]
pub enum Inbound<'a> {
    /// A binary data message.
    Binary(&'a [u8]),
    /// A text data message (already checked to be UTF-8 by the WebSocket layer).
    Text(&'a str),
    /// A ping (the WebSocket layer answers it).
    Ping,
    /// A pong with its payload. Only the answer to the hub's waiting ping counts for
    /// liveness.
    Pong(&'a [u8]),
    /// The device's close frame with its code, if it gave one. The WebSocket layer has
    /// queued the answering close frame.
    Close(Option<u16>),
}

/// Why reading from the WebSocket failed.
#[derive(Debug, Clone)]
pub enum ReadError {
    /// A message or frame exceeded the limit; `size` and `max` when known.
    TooBig {
        /// The announced size and the limit, for the close reason.
        sizes: Option<(usize, usize)>,
    },
    /// The WebSocket framing was broken; the text says how.
    Protocol(String),
    /// A text message, or the reason of a close frame, was not UTF-8 (RFC 6455 8.1); the
    /// text says where it broke.
    InvalidUtf8(String),
    /// A frame header announced a payload length with its most significant bit set, which
    /// RFC 6455 5.2 forbids: broken framing, not merely a big message.
    LengthTopBit,
    /// The peer vanished without a close handshake (a killed process, a dropped proxy).
    Reset,
    /// Any other I/O failure, or the end of the stream.
    Io,
}

/// A frame the driver must send, in order.
// Held only between an input and the driver's drain, so boxing the message would cost an
// allocation per frame for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Transmit {
    /// A protocol message, in the connection's encoding. Boxed: `HubMessage` is as large
    /// as its largest variant (a firmware chunk, 4 KiB inline), and every transmit is moved
    /// into the queue and out of it again; at one ack per telemetry frame those copies
    /// showed in profiles.
    Message(Box<HubMessage>),
    /// An ack, the message of nearly every frame, small enough to move as it is.
    Ack(Ack),
    /// A WebSocket ping with this payload.
    Ping([u8; 8]),
}

impl Transmit {
    /// A protocol message (boxed, see [`Transmit::Message`]).
    fn message(message: HubMessage) -> Transmit {
        Transmit::Message(Box::new(message))
    }
}

/// Why the start of a session failed (the outcome of [`Effect::Start`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartFailure {
    /// The hub is shutting down.
    ShuttingDown,
    /// The store could not say what it holds for the device.
    Store,
}

/// Work the driver performs for the session, in the order given, before it sends the
/// frames of [`HubSession::poll_transmit`].
// Drained right after every input, like `Transmit`.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// `Hello` arrived: load the device's last stored sequence number, register the
    /// connection, then call [`HubSession::handle_started`].
    Start(Hello),
    /// Read the device's open commands (the oldest `command_window`) and pass them to
    /// [`HubSession::handle_deliverable`].
    FetchCommands,
    /// Record that command `id` is being sent (before it goes out: the device may answer
    /// before a later write lands).
    CommandSent(u64),
    /// The device received command `id`.
    CommandAcked(u64),
    /// The device reported a command's outcome; call [`HubSession::handle_result_recorded`]
    /// when the ledger takes it, [`HubSession::handle_result_ignored`] when it does not
    /// (unknown or already final).
    CommandFinished(Box<CommandResult>),
    /// The device reported properties; if the store refuses them (too many keys), call
    /// [`HubSession::handle_refused`] with the reason.
    StoreState(Box<State>),
    /// A ping round trip was measured.
    Rtt(Duration),
    /// Read the device's desired and reported state and pass it to
    /// [`HubSession::handle_desired`]: with `full` (right after `Welcome`) the whole
    /// desired document, so a device that lost its settings gets them all again; otherwise
    /// the delta, if there is one.
    FetchDesired {
        /// Whether the whole document is wanted.
        full: bool,
    },
    /// The device applied desired state: record it.
    StoreApplied(Box<Applied>),
    /// Find the update this device should install and pass it to
    /// [`HubSession::handle_offer`] (`None` when there is none).
    FetchOffer,
    /// Read bytes `offset..offset + len` of image `version` and pass them to
    /// [`HubSession::handle_chunk_read`].
    ReadChunk(FirmwareRequest),
    /// The device reported where an update stands: record it.
    StoreFirmwareStatus(FirmwareStatus),
}

/// Why a connection ended: the close code to send (if any), its reason, and the cause
/// recorded in presence events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct End {
    /// The close code the hub sends; `None` when the connection is already gone or the
    /// device closed first.
    pub code: Option<u16>,
    /// The close reason (cut to fit a control frame by the driver).
    pub reason: String,
    /// The presence cause: `pong_timeout`, `closed:1000`, `superseded`, `protocol:1007`, ...
    pub cause: String,
}

impl End {
    /// An end that sends a close frame.
    pub fn close(code: u16, reason: impl Into<String>, cause: impl Into<String>) -> End {
        End {
            code: Some(code),
            reason: reason.into(),
            cause: cause.into(),
        }
    }

    /// An end without a close frame (the connection is gone).
    pub fn gone(cause: impl Into<String>) -> End {
        End {
            code: None,
            reason: String::new(),
            cause: cause.into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitHello { deadline: Instant },
    Starting,
    Ready,
    Draining { deadline: Instant },
    Ended,
}

/// The hub-side protocol state of one device connection. See the module documentation.
#[derive(Debug)]
pub struct HubSession {
    device: Arc<str>,
    encoding: Encoding,
    params: SessionParams,
    phase: Phase,
    /// When the device's token expires; the session closes with 1008 then.
    token_expiry: Option<Instant>,
    liveness: Liveness,
    rate: RateLimit,
    /// The highest sequence number acknowledged to the device on this connection.
    sent_ack: u64,
    /// The highest sequence number the store reported durable.
    stored: u64,
    /// The highest sequence number handed to the store.
    submitted: u64,
    store_failed: bool,
    /// A batch read from the socket that waits for room in the ingest queue.
    pending: Option<Batch>,
    /// The highest command id sent on this connection: commands go out in increasing id
    /// order, each at most once.
    delivered_up_to: u64,
    /// Commands sent on this connection that the session has not seen closed (at most
    /// the command window), to know whether a hand-over fits in the window. An id the hub
    /// closed otherwise (expired, cancelled) stays until a read of the ledger shows it gone.
    in_flight: Vec<u64>,
    /// A failed read of the device's commands, tried again later.
    command_read: ReadRetry,
    /// A failed read of the device's desired state, tried again later (in full if a full
    /// one failed).
    desired_read: ReadRetry,
    desired_read_full: bool,
    /// The last read of the ledger listed every open command of the device, all of them are
    /// sent, and nothing since said the ledger has more: a command handed over at its
    /// creation ([`HubSession::handle_command_created`]) can go out without a read.
    caught_up: bool,
    /// The device announced `command_closed`: it is told when it may forget a command.
    closes_commands: bool,
    /// The device announced `desired`: it gets desired-state deltas.
    takes_desired: bool,
    /// The device announced `firmware`: it gets firmware offers and chunks.
    takes_firmware: bool,
    /// What the device was last offered on this connection: `None` before the first
    /// offer, `Some(None)` after an empty one, else the version and its size.
    offered: Option<Option<(String, u64)>>,
    /// Chunk requests not yet answered, oldest first (at most the device's window).
    chunk_requests: VecDeque<FirmwareRequest>,
    /// A chunk is being read ([`Effect::ReadChunk`] is out).
    reading_chunk: bool,
    effects: VecDeque<Effect>,
    transmits: VecDeque<Transmit>,
    end: Option<End>,
}

/// Frees a drained queue's buffer. The queues are empty almost all the time, and they hold
/// effects and messages inline (kilobytes for four), so an idle connection would otherwise
/// keep that memory for its whole life; refilling costs one allocation per busy moment.
fn release<T>(queue: &mut VecDeque<T>) {
    if queue.capacity() > 0 {
        *queue = VecDeque::new();
    }
}

impl HubSession {
    /// A session for `device` whose upgrade completed at `now`; it waits for `Hello`.
    pub fn new(now: Instant, device: Arc<str>, encoding: Encoding, params: SessionParams) -> Self {
        HubSession {
            device,
            encoding,
            phase: Phase::AwaitHello {
                deadline: now + params.hello_timeout,
            },
            token_expiry: None,
            liveness: Liveness::new(now, params.ping_interval, params.pong_timeout),
            rate: RateLimit::new(now, params.max_messages_per_sec),
            params,
            sent_ack: 0,
            stored: 0,
            submitted: 0,
            store_failed: false,
            pending: None,
            delivered_up_to: 0,
            in_flight: Vec::new(),
            command_read: ReadRetry::default(),
            desired_read: ReadRetry::default(),
            desired_read_full: false,
            caught_up: false,
            closes_commands: false,
            takes_desired: false,
            takes_firmware: false,
            offered: None,
            chunk_requests: VecDeque::new(),
            reading_chunk: false,
            effects: VecDeque::new(),
            transmits: VecDeque::new(),
            end: None,
        }
    }

    /// The session ends with close 1008 ("token expired") at `expiry`, when the token
    /// the device connected with stops being valid. The upgrade already refused an expired
    /// token; this ends a connection that outlives its token.
    pub fn with_token_expiry(mut self, expiry: Instant) -> Self {
        self.token_expiry = Some(expiry);
        self
    }

    /// The device this connection belongs to.
    pub fn device(&self) -> &Arc<str> {
        &self.device
    }

    /// Whether the session has welcomed the device and not ended.
    pub fn is_ready(&self) -> bool {
        self.phase == Phase::Ready
    }

    /// Why the session ended, once it has. The driver sends what
    /// [`HubSession::poll_transmit`] still returns, then closes with this.
    pub fn end(&self) -> Option<&End> {
        self.end.as_ref()
    }

    /// Whether the driver should read the next frame. False while a batch waits for the
    /// ingest queue (backpressure), while the session starts, drains or has ended.
    pub fn wants_read(&self) -> bool {
        self.pending.is_none() && matches!(self.phase, Phase::AwaitHello { .. } | Phase::Ready)
    }

    /// Whether a batch waits for room in the ingest queue.
    pub fn has_batch(&self) -> bool {
        self.pending.is_some()
    }

    /// Hands the waiting batch to the driver, which has room for it in the ingest queue.
    pub fn take_batch(&mut self) -> Option<Batch> {
        let batch = self.pending.take()?;
        self.submitted = self.submitted.max(batch.seq);
        Some(batch)
    }

    /// The next effect to perform, in order. Call until `None` after every input.
    pub fn poll_effect(&mut self) -> Option<Effect> {
        let next = self.effects.pop_front();
        if next.is_none() {
            release(&mut self.effects);
        }
        next
    }

    /// The next frame to send, in order. Call until `None` after the effects.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        let next = self.transmits.pop_front();
        if next.is_none() {
            release(&mut self.transmits);
        }
        next
    }

    /// When [`HubSession::handle_timeout`] must run next, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let phase = match self.phase {
            Phase::AwaitHello { deadline } | Phase::Draining { deadline } => Some(deadline),
            Phase::Ready => Some(
                [self.command_read.at, self.desired_read.at]
                    .into_iter()
                    .flatten()
                    .fold(self.liveness.poll_timeout(), Instant::min),
            ),
            Phase::Starting | Phase::Ended => None,
        };
        let expiry = match self.phase {
            Phase::AwaitHello { .. } | Phase::Starting | Phase::Ready => self.token_expiry,
            // Draining closes with 1001 within `ack_drain` anyway.
            Phase::Draining { .. } | Phase::Ended => None,
        };
        match (phase, expiry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Advances the timers: the token's expiry, the hello deadline, pings and the pong
    /// timeout, the shutdown drain.
    pub fn handle_timeout(&mut self, now: Instant) {
        let live = matches!(
            self.phase,
            Phase::AwaitHello { .. } | Phase::Starting | Phase::Ready
        );
        if live && self.token_expiry.is_some_and(|at| now >= at) {
            return self.finish(End::close(close::POLICY, "token expired", "token_expired"));
        }
        match self.phase {
            Phase::AwaitHello { deadline } if now >= deadline => self.finish(End::close(
                close::HELLO_TIMEOUT,
                "no hello within the hello timeout",
                "hello_timeout",
            )),
            Phase::Ready => {
                if self.command_read.take_due(now) {
                    self.handle_commands_ready();
                }
                if self.desired_read.take_due(now) {
                    let full = std::mem::take(&mut self.desired_read_full);
                    self.effects.push_back(Effect::FetchDesired { full });
                }
                if self.pending.is_some() {
                    // The socket is not being read (backpressure), so a pong could not be
                    // seen: the silence is ours, not the device's.
                    self.liveness.hold(now);
                }
                match self.liveness.handle_timeout(now) {
                    Some(LivenessAction::Ping(payload)) => {
                        self.transmits.push_back(Transmit::Ping(payload))
                    }
                    Some(LivenessAction::Dead) => self.finish(End::close(
                        close::LIVENESS_TIMEOUT,
                        "no pong within the pong timeout",
                        "pong_timeout",
                    )),
                    None => {}
                }
            }
            Phase::Draining { deadline } if now >= deadline => self.drained(),
            _ => {}
        }
    }

    /// A frame arrived from the device.
    pub fn handle_frame(&mut self, now: Instant, frame: Inbound<'_>) {
        if matches!(self.phase, Phase::Ended) {
            return;
        }
        let message = match frame {
            Inbound::Close(code) => {
                let code = code.unwrap_or(close::NORMAL);
                return self.finish(End::gone(format!("closed:{code}")));
            }
            Inbound::Pong(payload) => {
                if let Some(rtt) = self.liveness.on_pong(now, payload) {
                    self.effects.push_back(Effect::Rtt(rtt));
                }
                return;
            }
            // Answered by the WebSocket layer. A device's ping shows that it writes, not
            // that it reads, so it does not count for liveness.
            Inbound::Ping => return,
            Inbound::Binary(bytes) => self.decode(DataFrame::Binary(bytes)),
            Inbound::Text(text) => self.decode(DataFrame::Text(text)),
        };
        let message = match message {
            Ok(message) => message,
            Err(end) => return self.finish(end),
        };
        match self.phase {
            Phase::AwaitHello { .. } => match *message {
                DeviceMessage::Hello(hello) => {
                    let has = |cap: &str| hello.capabilities.iter().any(|c| c == cap);
                    self.closes_commands = has(capability::COMMAND_CLOSED);
                    self.takes_desired = has(capability::DESIRED);
                    self.takes_firmware = has(capability::FIRMWARE);
                    self.phase = Phase::Starting;
                    self.effects.push_back(Effect::Start(hello));
                }
                other => self.finish(End::close(
                    close::PROTOCOL_VIOLATION,
                    format!("{} before hello", other.kind()),
                    "protocol:4001",
                )),
            },
            Phase::Ready => {
                if !self.rate.allow(now) {
                    return self.finish(End::close(
                        close::RATE_LIMITED,
                        "rate limit: too many messages per second",
                        "rate_limit",
                    ));
                }
                self.handle_message(message);
            }
            // Not read in these phases; a frame that was already in flight is dropped (a
            // batch is re-sent on the next connection).
            Phase::Starting | Phase::Draining { .. } | Phase::Ended => {}
        }
    }

    fn handle_message(&mut self, message: Box<DeviceMessage>) {
        // Telemetry, the message of every frame, is read in place: a `DeviceMessage` holds
        // room for 64 readings (about 5 KB), and moving it out of its box for each frame
        // showed in profiles as a tenth of the hub's time.
        if let DeviceMessage::Telemetry(t) = &*message {
            if t.seq <= self.sent_ack {
                // Already stored and acknowledged: a re-send after a lost ack. Acknowledge
                // it again at once; the store is not touched.
                metrics::counter!("hub_batches_duplicate_total").increment(1);
                self.transmits.push_back(Transmit::Ack(Ack {
                    up_to_seq: self.sent_ack,
                }));
            } else {
                crate::device::wire_counters::wire()
                    .readings_received
                    .increment(t.readings.len() as u64);
                self.pending = Some(Batch {
                    device: self.device.clone(),
                    seq: t.seq,
                    readings: t.readings.to_vec(),
                });
            }
            return;
        }
        match *message {
            DeviceMessage::Hello(_) => self.finish(End::close(
                close::PROTOCOL_VIOLATION,
                "second hello on one connection",
                "protocol:4001",
            )),
            // Handled above.
            DeviceMessage::Telemetry(_) => {}
            DeviceMessage::CommandAck(ack) => self.effects.push_back(Effect::CommandAcked(ack.id)),
            DeviceMessage::CommandResult(result) => self
                .effects
                .push_back(Effect::CommandFinished(Box::new(result))),
            DeviceMessage::State(state) => {
                self.effects.push_back(Effect::StoreState(Box::new(state)))
            }
            DeviceMessage::Applied(applied) => self
                .effects
                .push_back(Effect::StoreApplied(Box::new(applied))),
            DeviceMessage::FirmwareRequest(request) => self.firmware_request(request),
            DeviceMessage::FirmwareStatus(status) => {
                if self.offered.is_none() {
                    return self.finish(End::close(
                        close::PROTOCOL_VIOLATION,
                        "firmware_status before any firmware_offer",
                        "protocol:4001",
                    ));
                }
                self.effects.push_back(Effect::StoreFirmwareStatus(status));
            }
        }
    }

    fn decode(&self, frame: DataFrame<'_>) -> Result<Box<DeviceMessage>, End> {
        let message = decode_frame::<DeviceMessage>(self.encoding, frame).map_err(|refused| {
            let reason = match &refused.error {
                Some(err @ DecodeError::Malformed(_)) => err.to_string(),
                _ => refused.reason.to_string(),
            };
            End::close(refused.code, reason, format!("protocol:{}", refused.code))
        })?;
        message.validate().map_err(|v| {
            End::close(
                close::INVALID_PAYLOAD,
                v.reason(),
                format!("protocol:{}", close::INVALID_PAYLOAD),
            )
        })?;
        Ok(Box::new(message))
    }

    /// Reading from the WebSocket failed: the session ends with a code that says why.
    pub fn handle_read_error(&mut self, error: ReadError) {
        let end = match error {
            ReadError::TooBig {
                sizes: Some((size, max)),
            } => End::close(
                close::TOO_BIG,
                format!("message of {size} bytes exceeds the limit of {max}"),
                "protocol:1009",
            ),
            ReadError::TooBig { sizes: None } => End::close(
                close::TOO_BIG,
                format!("frame exceeds the limit of {MAX_MESSAGE_BYTES} bytes"),
                "protocol:1009",
            ),
            ReadError::Protocol(why) => End::close(close::PROTOCOL_ERROR, why, "protocol:1002"),
            ReadError::InvalidUtf8(why) => End::close(
                close::INVALID_PAYLOAD,
                format!("text is not UTF-8: {why}"),
                "protocol:1007",
            ),
            ReadError::LengthTopBit => End::close(
                close::PROTOCOL_ERROR,
                "frame length has its most significant bit set (RFC 6455 5.2)",
                "protocol:1002",
            ),
            ReadError::Reset => End::gone("connection_reset"),
            ReadError::Io => End::gone("io_error"),
        };
        self.finish(end);
    }

    /// Writing to the WebSocket failed or timed out (`timed_out`): the device is gone.
    pub fn handle_write_error(&mut self, timed_out: bool) {
        self.finish(End::gone(if timed_out {
            "write_timeout"
        } else {
            "io_error"
        }));
    }

    /// The outcome of [`Effect::Start`]: the device's last stored sequence number, and
    /// `wall_ms` (the hub's clock, ms since the Unix epoch) for `Welcome`. On success the
    /// device is welcomed and its waiting commands are fetched.
    pub fn handle_started(
        &mut self,
        now: Instant,
        wall_ms: u64,
        last_seq: Result<u64, StartFailure>,
    ) {
        if self.phase != Phase::Starting {
            return;
        }
        let last_seq = match last_seq {
            Ok(seq) => seq,
            Err(StartFailure::ShuttingDown) => return self.going_away(),
            Err(StartFailure::Store) => {
                return self.finish(End::close(
                    close::INTERNAL,
                    "store unavailable; retry later",
                    "store_failure",
                ))
            }
        };
        self.sent_ack = last_seq;
        self.stored = last_seq;
        self.submitted = last_seq;
        self.liveness = Liveness::new(now, self.params.ping_interval, self.params.pong_timeout);
        self.rate = RateLimit::new(now, self.params.max_messages_per_sec);
        self.phase = Phase::Ready;
        self.transmits
            .push_back(Transmit::message(HubMessage::Welcome(Welcome {
                server_time: wall_ms,
                ping_interval_ms: millis_u32(self.params.ping_interval),
                pong_timeout_ms: millis_u32(self.params.pong_timeout),
                last_seq,
                max_readings: MAX_READINGS as u16,
                max_message_bytes: MAX_MESSAGE_BYTES as u32,
            })));
        if self.closes_commands {
            // Id 0 is never a command: it tells the device this hub confirms results, before
            // any command of this connection arrives.
            self.command_closed(0);
        }
        // Deliver whatever waited for this device while it was offline: its desired state
        // first (it may change how it runs the commands), then its commands.
        if self.takes_desired {
            self.effects.push_back(Effect::FetchDesired { full: true });
        }
        if self.takes_firmware {
            self.effects.push_back(Effect::FetchOffer);
        }
        self.effects.push_back(Effect::FetchCommands);
    }

    /// The store reports progress for this connection: every batch up to `acked` is
    /// durable, or (`failed`) a commit failed and the device must keep its data.
    pub fn handle_stored(&mut self, acked: u64, failed: bool) {
        self.stored = self.stored.max(acked);
        self.store_failed |= failed;
        match self.phase {
            Phase::Ready if self.store_failed => self.finish(End::close(
                close::INTERNAL,
                "store unavailable; keep your data and retry later",
                "store_failure",
            )),
            Phase::Ready => self.send_ack(),
            Phase::Draining { .. } if self.stored >= self.submitted || self.store_failed => {
                self.drained()
            }
            _ => {}
        }
    }

    fn send_ack(&mut self) {
        if self.stored > self.sent_ack {
            self.sent_ack = self.stored;
            self.transmits.push_back(Transmit::Ack(Ack {
                up_to_seq: self.stored,
            }));
        }
    }

    /// The device's desired state changed.
    pub fn handle_desired_changed(&mut self) {
        if self.phase == Phase::Ready
            && self.takes_desired
            && !self
                .effects
                .iter()
                .any(|e| matches!(e, Effect::FetchDesired { .. }))
        {
            self.effects.push_back(Effect::FetchDesired { full: false });
        }
    }

    /// The read that [`Effect::FetchDesired`] asked for worked (whether or not the device
    /// must hear about it): a retry of a failed one is off.
    pub fn handle_desired_read(&mut self) {
        self.desired_read.succeeded();
        self.desired_read_full = false;
    }

    /// The read that [`Effect::FetchDesired`] (`full` or not) asked for failed: it is
    /// tried again after 1 s, doubling up to 30 s while reads keep failing, in full if a
    /// full one failed.
    pub fn handle_desired_failed(&mut self, now: Instant, full: bool) {
        if self.phase != Phase::Ready || !self.takes_desired {
            return;
        }
        self.desired_read_full |= full;
        self.desired_read.failed(now);
    }

    /// The outcome of [`Effect::FetchDesired`] when the device must hear about it: the
    /// desired version and the keys to apply (key, value as JSON text). They go out in
    /// messages of at most 16 keys, the last one marked; an empty set still carries the
    /// version, so the device can acknowledge it.
    pub fn handle_desired(&mut self, version: u64, delta: &[(String, String)]) {
        if self.phase != Phase::Ready || !self.takes_desired {
            return;
        }
        let mut chunks = delta.chunks(MAX_PROPERTIES).peekable();
        if chunks.peek().is_none() {
            self.transmits
                .push_back(Transmit::message(HubMessage::Desired(Desired {
                    version,
                    properties: heapless::Vec::new(),
                    last: true,
                })));
        }
        while let Some(chunk) = chunks.next() {
            let properties = chunk
                .iter()
                .map(|(key, value)| Property {
                    key: truncated(key),
                    value: truncated(value),
                })
                .collect();
            self.transmits
                .push_back(Transmit::message(HubMessage::Desired(Desired {
                    version,
                    properties,
                    last: chunks.peek().is_none(),
                })));
        }
    }

    /// The ledger may have new commands for this device, or closed some: it is read again
    /// ([`Effect::FetchCommands`]) before a command handed over at its creation goes out.
    pub fn handle_commands_ready(&mut self) {
        self.caught_up = false;
        if self.phase == Phase::Ready && !self.effects.contains(&Effect::FetchCommands) {
            self.effects.push_back(Effect::FetchCommands);
        }
    }

    /// The read that [`Effect::FetchCommands`] asked for failed (the store is down or
    /// timed out): it is tried again after 1 s, doubling up to 30 s while reads keep
    /// failing.
    pub fn handle_deliverable_failed(&mut self, now: Instant) {
        if self.phase != Phase::Ready {
            return;
        }
        self.caught_up = false;
        self.command_read.failed(now);
    }

    /// A command created for this device, handed over by the ledger as it became visible
    /// (in the order of creation: the ledger hands over under the lock it creates under).
    /// It goes out at once when the session knows that nothing older waits in the ledger
    /// and the window has room; otherwise the ledger is read, which lists it in its turn.
    pub fn handle_command_created(&mut self, command: Command) {
        if self.phase != Phase::Ready || command.id <= self.delivered_up_to {
            // Before `Ready` the first read of the ledger is still to come, and it lists the
            // command; at or below what went out, a read listed and sent it already.
            return;
        }
        let fetching = self.effects.contains(&Effect::FetchCommands);
        if self.caught_up && !fetching && self.in_flight.len() < self.params.command_window {
            self.send_command(command);
        } else {
            // When in doubt, read: the ledger has the command (it was created before it was
            // handed over), and a read sends what is open and not yet sent, in order.
            self.handle_commands_ready();
        }
    }

    /// The outcome of [`Effect::FetchCommands`]: the device's open commands, oldest first,
    /// at most the command window of them. Those not yet sent on this connection go out.
    pub fn handle_deliverable(&mut self, commands: impl IntoIterator<Item = Command>) {
        if self.phase != Phase::Ready {
            return;
        }
        self.command_read.succeeded();
        let window = self.params.command_window;
        let open: Vec<Command> = commands.into_iter().take(window).collect();
        // A full window's worth may leave newer open commands out; a shorter list has them
        // all. Sent commands the list does not show (and, when it is complete, does not
        // show past its end either) are closed.
        let complete = open.len() < window;
        let last = open.last().map_or(0, |c| c.id);
        self.in_flight
            .retain(|id| open.iter().any(|c| c.id == *id) || (!complete && *id > last));
        let after = self.delivered_up_to;
        for command in open.into_iter().filter(|c| c.id > after) {
            self.send_command(command);
        }
        self.caught_up = complete;
        self.release_in_flight();
    }

    fn send_command(&mut self, command: Command) {
        self.delivered_up_to = self.delivered_up_to.max(command.id);
        self.in_flight.push(command.id);
        self.effects.push_back(Effect::CommandSent(command.id));
        self.transmits
            .push_back(Transmit::message(HubMessage::Command(command)));
    }

    /// The ledger took the result of command `id`: a device that understands it is told
    /// it may forget the command.
    pub fn handle_result_recorded(&mut self, id: u64) {
        self.settled(id);
        self.command_closed(id);
    }

    /// Command `id` is final in the ledger: its slot in the window is free.
    fn settled(&mut self, id: u64) {
        self.in_flight.retain(|&sent| sent != id);
        self.release_in_flight();
    }

    /// Frees the in-flight list's buffer once it is empty, as [`release`] does for the
    /// queues: an idle connection keeps none.
    fn release_in_flight(&mut self) {
        if self.in_flight.is_empty() && self.in_flight.capacity() > 0 {
            self.in_flight = Vec::new();
        }
    }

    /// The ledger did not take the result of command `id` (unknown, or already final):
    /// the device is told, and the connection goes on.
    pub fn handle_result_ignored(&mut self, id: u64) {
        self.settled(id);
        self.report(
            close::PROTOCOL_VIOLATION,
            &format!("command {id} is unknown or already final; result ignored"),
        );
        self.command_closed(id);
    }

    fn command_closed(&mut self, id: u64) {
        if self.closes_commands && self.phase == Phase::Ready {
            self.transmits
                .push_back(Transmit::message(HubMessage::CommandClosed(
                    CommandClosed { id },
                )));
        }
    }

    /// The store refused something the device sent, for a reason that is the device's own
    /// doing (too many state keys): the device is told, and the connection goes on.
    pub fn handle_refused(&mut self, why: &str) {
        self.report(close::POLICY, why);
    }

    fn report(&mut self, code: u16, message: &str) {
        if self.phase == Phase::Ready {
            self.transmits
                .push_back(Transmit::message(HubMessage::Error(ErrorMessage {
                    code,
                    message: truncated(message),
                })));
        }
    }

    /// The hub closes this connection (superseded, token revoked, rebalanced).
    pub fn handle_kick(&mut self, code: u16, reason: &str) {
        // The cause presence events and `hub devices` show: what happened, in words.
        let cause = match code {
            close::SUPERSEDED => "superseded".to_string(),
            // The hub closes with 1008 only when the device's token was revoked.
            close::POLICY => "token_revoked".to_string(),
            close::RECONNECT => "handed_over".to_string(),
            other => format!("kicked:{other}"),
        };
        self.finish(End::close(code, reason, cause));
    }

    /// The hub is shutting down. A ready session stops reading, waits up to `ack_drain`
    /// for the batches it handed to the store, sends their ack, and closes with 1001.
    pub fn handle_shutdown(&mut self, now: Instant) {
        match self.phase {
            Phase::Ready => {
                // A batch not yet handed to the store is re-sent on the next connection.
                self.pending = None;
                self.phase = Phase::Draining {
                    deadline: now + self.params.ack_drain,
                };
                if self.stored >= self.submitted || self.store_failed {
                    self.drained();
                }
            }
            Phase::AwaitHello { .. } | Phase::Starting => self.going_away(),
            Phase::Draining { .. } | Phase::Ended => {}
        }
    }

    fn drained(&mut self) {
        self.send_ack();
        self.going_away();
    }

    fn going_away(&mut self) {
        self.finish(End::close(
            close::GOING_AWAY,
            "hub shutting down",
            "shutdown",
        ));
    }

    fn finish(&mut self, end: End) {
        if self.end.is_none() {
            self.end = Some(end);
        }
        self.phase = Phase::Ended;
        self.pending = None;
    }
}

fn millis_u32(d: Duration) -> u32 {
    d.as_millis().min(u128::from(u32::MAX)) as u32
}

#[cfg(test)]
mod tests;
