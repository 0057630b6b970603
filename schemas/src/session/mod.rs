//! The device side of the protocol, written once as a sans-io state machine that both the
//! native agent and the `no_std` firmware drive.
//!
//! It owns sequence numbers, the unacknowledged window, acks, command de-duplication,
//! liveness of the hub, and reconnect backoff with full jitter. It does no I/O and reads no
//! clock and no RNG: the driver passes `now` (milliseconds on any monotonic clock) and
//! random numbers in, performs the [`Action`]s it asks for, sends what
//! [`Session::poll_transmit`] returns, and calls [`Session::handle_timeout`] at
//! [`Session::poll_timeout`]. quinn-proto is the model.
//!
//! Unacknowledged batches live in an [`Outbox`] that the driver provides: a RAM ring on a
//! microcontroller, a file-backed queue on Linux. Sequence numbers are consecutive, so the
//! outbox only needs to know the sequence number of its oldest batch.

use heapless::{Deque, String, Vec};

use crate::close;
use crate::limits::{
    is_valid_name, MAX_CAPABILITIES, MAX_CAPABILITY_LEN, MAX_CHUNK_BYTES, MAX_FIRMWARE_LEN,
    MAX_PROPERTY_KEY_LEN, MAX_READINGS,
};
use crate::message::{
    capability, truncated, Applied, Command, CommandAck, CommandResult, Desired, DeviceMessage,
    ErrorMessage, FirmwareChunk, FirmwareOffer, FirmwareRequest, FirmwareStatus, Hello, HubMessage,
    Property, Reading, State, Telemetry, Welcome,
};

#[cfg(feature = "alloc")]
pub use crate::mem_outbox::{MemOutbox, OutOfRange};

/// What happened when a batch was appended to a full outbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pushed {
    /// How many of the oldest batches were dropped to make room.
    pub evicted_batches: u32,
    /// How many readings those batches held.
    pub evicted_readings: u32,
}

/// Storage for unacknowledged telemetry batches, oldest first, with consecutive sequence
/// numbers. Implementations decide how much they hold and drop the oldest when full.
pub trait Outbox {
    /// Why storage failed (an I/O error, say).
    type Error: core::fmt::Debug;

    /// The sequence number of the oldest stored batch; when empty, the number the next
    /// batch will get. Must survive restarts if the device wants its numbering to.
    fn front_seq(&self) -> u64;
    /// How many batches are stored.
    fn len(&self) -> usize;
    /// Whether no batch is stored.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Appends a batch (it gets sequence `front_seq() + len()`), dropping the oldest ones
    /// if there is no room.
    ///
    /// # Errors
    /// Storage failure; the batch is then not stored.
    fn push_back(&mut self, readings: &[Reading]) -> Result<Pushed, Self::Error>;
    /// Reads the batch at `index` (0 is the oldest) into `out`.
    ///
    /// # Errors
    /// Storage failure, or `index >= len()`.
    fn read(
        &mut self,
        index: usize,
        out: &mut Vec<Reading, MAX_READINGS>,
    ) -> Result<(), Self::Error>;
    /// Drops the `count` oldest batches (acknowledged ones).
    ///
    /// # Errors
    /// Storage failure.
    fn pop_front(&mut self, count: usize) -> Result<(), Self::Error>;
    /// Gives the oldest batch sequence `front_seq` (the others follow consecutively).
    ///
    /// # Errors
    /// Storage failure.
    fn renumber(&mut self, front_seq: u64) -> Result<(), Self::Error>;
}

/// Tunables of the device session. Times are in milliseconds.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Firmware version reported in `Hello`.
    pub firmware: String<MAX_FIRMWARE_LEN>,
    /// Capabilities reported in `Hello`.
    pub capabilities: Vec<String<MAX_CAPABILITY_LEN>, MAX_CAPABILITIES>,
    /// The first reconnect waits up to this long.
    pub backoff_initial_ms: u64,
    /// No reconnect waits longer than this (before jitter is applied).
    pub backoff_max_ms: u64,
    /// After the hub refused the credentials (HTTP 401/403) or superseded this connection,
    /// wait at least this long, plus up to as much again of jitter.
    pub refused_backoff_ms: u64,
    /// How long to wait for `Welcome` after the WebSocket is up.
    pub welcome_timeout_ms: u64,
    /// Most batches sent and not yet acknowledged.
    pub window: usize,
    /// Extra grace on top of the hub's ping interval plus pong timeout before the hub is
    /// considered silent.
    pub silence_grace_ms: u64,
}

impl SessionConfig {
    /// Defaults suited to real fleets, with the given firmware version.
    pub fn new(firmware: &str) -> SessionConfig {
        let mut capabilities = Vec::new();
        let _ = capabilities.push(truncated(capability::COMMANDS));
        // The session handles `CommandClosed` itself.
        let _ = capabilities.push(truncated(capability::COMMAND_CLOSED));
        SessionConfig {
            firmware: truncated(firmware),
            capabilities,
            backoff_initial_ms: 500,
            backoff_max_ms: 60_000,
            refused_backoff_ms: 60_000,
            welcome_timeout_ms: 10_000,
            window: 8,
            silence_grace_ms: 1_000,
        }
    }
}

/// Why the connection ended, as the driver saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisconnectCause {
    /// TCP, TLS or the WebSocket handshake failed.
    ConnectFailed,
    /// The hub refused the credentials (HTTP 401 or 403) or the subprotocol (HTTP 400).
    Refused,
    /// The hub is busy or shutting down (HTTP 503) and asked for at least this long
    /// (its `Retry-After`) before the next attempt.
    Unavailable {
        /// The hub's `Retry-After`, in milliseconds.
        retry_after_ms: u64,
    },
    /// The hub closed the WebSocket with this code.
    Closed(u16),
    /// A read or write failed, or the stream ended without a close frame.
    Io,
    /// The session asked for the close (see [`CloseReason`]).
    Local(CloseReason),
}

/// Why the session wants the connection closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Nothing arrived from the hub within ping interval + pong timeout + grace.
    HubSilent,
    /// No `Welcome` within the welcome timeout.
    WelcomeTimeout,
    /// The hub broke the protocol (a second `Welcome`, say).
    ProtocolViolation,
}

/// What the driver must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Open the transport and the WebSocket now, then call
    /// [`Session::handle_connected`] or [`Session::handle_disconnected`].
    Connect,
    /// Close the connection (close code from [`CloseReason`]), then call
    /// [`Session::handle_disconnected`].
    Close(CloseReason),
}

impl CloseReason {
    /// The WebSocket close code to send.
    pub fn close_code(self) -> u16 {
        match self {
            CloseReason::HubSilent => close::LIVENESS_TIMEOUT,
            CloseReason::WelcomeTimeout => close::HELLO_TIMEOUT,
            CloseReason::ProtocolViolation => close::PROTOCOL_VIOLATION,
        }
    }
}

/// What a message from the hub meant for the application.
#[derive(Debug, Clone, PartialEq)]
pub enum Delivered {
    /// Nothing for the application (an ack, a duplicate command).
    Nothing,
    /// The session is ready; here are the hub's parameters.
    Welcome(Welcome),
    /// A new command to run; report it with [`Session::command_finished`].
    Command(Command),
    /// The hub reported a non-fatal error.
    Error(ErrorMessage),
    /// Desired state to apply: report each value with [`Session::report_state`] or
    /// [`Session::report_refused`], then, after the message with `last` set, call
    /// [`Session::applied`] with its version.
    Desired(Desired),
    /// A firmware update (or, with an empty version, none: the hub takes firmware
    /// messages). Fetch it with [`Session::request_firmware`]; report with
    /// [`Session::report_firmware`].
    FirmwareOffer(FirmwareOffer),
    /// Image bytes answering a [`Session::request_firmware`].
    FirmwareChunk(FirmwareChunk),
}

/// Why [`Session::report_state`] refused a property.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportError {
    /// The key is empty, too long, or outside `[A-Za-z0-9_.:/-]`.
    BadKey,
    /// As many other keys as the session holds are already waiting.
    Full,
}

/// A session error: the outbox failed, or the hub broke the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionError<E> {
    /// The outbox failed.
    Outbox(E),
    /// The hub sent something out of order; close with [`CloseReason::ProtocolViolation`].
    Protocol(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Offline { retry_at: u64 },
    Connecting,
    AwaitWelcome { since: u64, hello_sent: bool },
    Ready { silence_limit: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Running,
    Done {
        ok: bool,
        code: i32,
    },
    /// The hub said it closed the command: it will not come again.
    Closed,
}

/// A remembered command: its id, where it stands, and its deadline (hub time, ms).
#[derive(Debug, Clone, Copy)]
struct Remembered {
    id: u64,
    seen: Seen,
    deadline: u64,
}

/// How long after a command's deadline (hub time) the device may forget it: by then the
/// hub has closed it for good. The margin covers the device's estimate of hub time.
pub const DEADLINE_MARGIN_MS: u64 = 10_000;

/// The longest `Retry-After` the session honours.
pub const MAX_RETRY_AFTER_MS: u64 = 3_600_000;

/// After close [`close::RECONNECT`] the next attempt comes within this long (uniformly
/// spread), whatever the backoff state.
pub const RECONNECT_SPREAD_MS: u64 = 1_000;

/// How many reported properties (and refused desired keys) wait for a session by default
/// (see [`Session::report_state`]): a microcontroller answers for a few settings at once; a
/// Linux agent
/// that reports more picks a larger `STATES`, up to [`crate::limits::MAX_PROPERTIES`].
pub const STATE_QUEUE: usize = 4;

/// How many command ids the session remembers for de-duplication. It forgets only commands
/// that cannot come again (the hub sent `CommandClosed`, or their deadline passed), so with
/// a hub that keeps at most this many commands outstanding per connection
/// (`device.command_queue`) a command never runs twice in one boot of the device. With an
/// older hub that never sends `CommandClosed`, it forgets the oldest finished command.
pub const DEDUP_WINDOW: usize = 32;
/// How many acks and results wait for a connection by default (see
/// [`Session::with_reply_capacity`]); when full the oldest is dropped and the hub's command
/// timeout reports it. Each slot holds a result of up to 1 KiB, so constrained devices keep
/// this small.
pub const REPLY_QUEUE: usize = 4;

#[derive(Debug, Clone)]
enum Reply {
    Ack(u64),
    Result(CommandResult),
}

/// Counters a driver can show.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Batches sent (re-sends included).
    pub batches_sent: u64,
    /// Batches acknowledged by the hub.
    pub batches_acked: u64,
    /// Readings dropped because the outbox was full.
    pub readings_dropped: u64,
    /// Commands handed to the application (duplicates excluded).
    pub commands: u64,
    /// Connections that reached `Welcome`.
    pub sessions: u64,
    /// Replies dropped because the reply queue was full.
    pub replies_dropped: u64,
    /// New commands left unacknowledged because every de-duplication slot held a running
    /// command (the hub delivers them again on the next connection).
    pub commands_refused: u64,
}

/// Firmware requests the session holds until they go out (they leave with the next
/// transmit, so a small queue serves any window).
pub const REQUEST_QUEUE: usize = 4;

/// The device-side protocol state machine. See the module documentation.
///
/// `REPLIES` is how many command acks and results can wait while the device is offline;
/// `STATES` how many reported properties can wait for a session (see
/// [`Session::report_state`]).
#[derive(Debug)]
pub struct Session<O: Outbox, const REPLIES: usize = REPLY_QUEUE, const STATES: usize = STATE_QUEUE>
{
    config: SessionConfig,
    outbox: O,
    phase: Phase,
    closing: bool,
    attempts: u32,
    refused: bool,
    last_rx: u64,
    /// Batches (from the front of the outbox) sent on the current connection.
    sent: usize,
    last_acked: u64,
    server_offset: Option<i64>,
    /// Remembered commands, oldest first.
    seen: Vec<Remembered, DEDUP_WINDOW>,
    /// The hub of the current connection sends `CommandClosed`.
    hub_closes: bool,
    replies: Deque<Reply, REPLIES>,
    /// Reported properties waiting for a ready session.
    /// Reported properties waiting for a ready session, each marked whether it is a
    /// refused desired key (its value then the reason); one set of slots for both keeps a
    /// microcontroller's session small.
    state: Vec<(Property, bool), STATES>,
    /// The desired-state version to answer with `Applied`, once the application says so.
    applied: Option<u64>,
    /// The hub of the current connection sent a `FirmwareOffer`: it takes firmware messages.
    hub_updates: bool,
    /// The update status to report, kept across connections until it goes out.
    firmware_status: Option<FirmwareStatus>,
    /// Firmware requests waiting to go out on this connection.
    firmware_requests: Vec<FirmwareRequest, REQUEST_QUEUE>,
    stats: SessionStats,
}

impl<O: Outbox> Session<O> {
    /// A session that will connect at the first [`Session::handle_timeout`], with the
    /// default reply queue of [`REPLY_QUEUE`].
    pub fn new(config: SessionConfig, outbox: O) -> Session<O> {
        Session::with_reply_capacity(config, outbox)
    }
}

impl<O: Outbox, const REPLIES: usize, const STATES: usize> Session<O, REPLIES, STATES> {
    /// A session whose reply queue holds `REPLIES` acks and results (a Linux agent that
    /// runs many actions at once wants more than a microcontroller can afford).
    pub fn with_reply_capacity(config: SessionConfig, outbox: O) -> Session<O, REPLIES, STATES> {
        let last_acked = outbox.front_seq().saturating_sub(1);
        Session {
            config,
            outbox,
            phase: Phase::Offline { retry_at: 0 },
            closing: false,
            attempts: 0,
            refused: false,
            last_rx: 0,
            sent: 0,
            last_acked,
            server_offset: None,
            seen: Vec::new(),
            hub_closes: false,
            replies: Deque::new(),
            state: Vec::new(),
            applied: None,
            hub_updates: false,
            firmware_status: None,
            firmware_requests: Vec::new(),
            stats: SessionStats::default(),
        }
    }

    /// The outbox, for inspection.
    pub fn outbox(&self) -> &O {
        &self.outbox
    }

    /// Ends the session and returns its outbox: what survives a reboot on a device whose
    /// outbox lives in flash or on disk.
    pub fn into_outbox(self) -> O {
        self.outbox
    }

    /// Counters since the session was created.
    pub fn stats(&self) -> SessionStats {
        self.stats
    }

    /// Whether the hub has welcomed the current connection.
    pub fn is_ready(&self) -> bool {
        matches!(self.phase, Phase::Ready { .. })
    }

    /// Whether a connection is open or being opened.
    pub fn is_connected(&self) -> bool {
        !matches!(self.phase, Phase::Offline { .. })
    }

    /// The highest sequence number the hub acknowledged.
    pub fn last_acked(&self) -> u64 {
        self.last_acked
    }

    /// The hub's clock at local time `now`, once a `Welcome` has been seen. Devices without
    /// a real-time clock stamp readings with it.
    pub fn server_time(&self, now: u64) -> Option<u64> {
        self.server_offset
            .map(|off| (now as i64).saturating_add(off).max(0) as u64)
    }

    /// When [`Session::handle_timeout`] must be called next, if ever.
    pub fn poll_timeout(&self) -> Option<u64> {
        if self.closing {
            return None;
        }
        match self.phase {
            Phase::Offline { retry_at } => Some(retry_at),
            Phase::Connecting => None,
            Phase::AwaitWelcome { since, .. } => Some(since + self.config.welcome_timeout_ms),
            Phase::Ready { silence_limit } => Some(self.last_rx + silence_limit),
        }
    }

    /// Advances timers. Returns what the driver must do, if anything.
    pub fn handle_timeout(&mut self, now: u64) -> Option<Action> {
        let deadline = self.poll_timeout()?;
        if now < deadline {
            return None;
        }
        match self.phase {
            Phase::Offline { .. } => {
                self.phase = Phase::Connecting;
                Some(Action::Connect)
            }
            Phase::Connecting => None,
            Phase::AwaitWelcome { .. } => {
                self.closing = true;
                Some(Action::Close(CloseReason::WelcomeTimeout))
            }
            Phase::Ready { .. } => {
                self.closing = true;
                Some(Action::Close(CloseReason::HubSilent))
            }
        }
    }

    /// The transport and WebSocket are up: `Hello` goes out next.
    pub fn handle_connected(&mut self, now: u64) {
        self.phase = Phase::AwaitWelcome {
            since: now,
            hello_sent: false,
        };
        self.closing = false;
        self.last_rx = now;
        self.sent = 0;
        // Until this hub says it confirms results, assume it does not.
        self.hub_closes = false;
        // Nor that it takes firmware messages; requests of the last connection are void.
        self.hub_updates = false;
        self.firmware_requests.clear();
    }

    /// The connection is gone (or never came up). Schedules the next attempt with
    /// exponential backoff and full jitter; `random` is any uniformly random number.
    pub fn handle_disconnected(&mut self, now: u64, cause: DisconnectCause, random: u32) {
        self.closing = false;
        self.sent = 0;
        self.refused = matches!(
            cause,
            DisconnectCause::Refused
                | DisconnectCause::Closed(close::SUPERSEDED)
                | DisconnectCause::Closed(close::POLICY)
        );
        if cause == DisconnectCause::Closed(close::RECONNECT) {
            // The hub is moving this device to another node: come back at once, spread
            // over a second so that a fleet asked to move does not arrive in one wave. A
            // planned move is not a failed attempt, so the backoff does not grow.
            self.phase = Phase::Offline {
                retry_at: now + u64::from(random) % (RECONNECT_SPREAD_MS + 1),
            };
            return;
        }
        let mut delay = self.backoff_delay(random);
        if let DisconnectCause::Unavailable { retry_after_ms } = cause {
            // Honour the hub's request (up to an hour, against a misconfigured proxy), and
            // keep the jitter on top so a fleet does not come back in one wave.
            delay = delay.saturating_add(retry_after_ms.min(MAX_RETRY_AFTER_MS));
        }
        if cause == DisconnectCause::Closed(close::RATE_LIMITED) {
            // The token is fine (no slow retry), but coming straight back would flood again:
            // a short fixed wait, with the jitter on top.
            delay = delay.saturating_add(close::RATE_LIMITED_WAIT_MS);
        }
        self.attempts = self.attempts.saturating_add(1);
        self.phase = Phase::Offline {
            retry_at: now + delay,
        };
    }

    /// The delay before the next attempt, for the current attempt count.
    fn backoff_delay(&self, random: u32) -> u64 {
        if self.refused {
            let base = self.config.refused_backoff_ms;
            return base + u64::from(random) % (base + 1);
        }
        let ceiling = self
            .config
            .backoff_initial_ms
            .saturating_mul(1u64 << self.attempts.min(20))
            .min(self.config.backoff_max_ms);
        u64::from(random) % (ceiling + 1)
    }

    /// Something (any frame, a ping included) arrived from the hub.
    pub fn handle_activity(&mut self, now: u64) {
        self.last_rx = self.last_rx.max(now);
    }

    /// A decoded message from the hub arrived.
    ///
    /// # Errors
    /// [`SessionError::Protocol`] when it came out of order (close the connection with
    /// [`CloseReason::ProtocolViolation`]); [`SessionError::Outbox`] when storage failed.
    pub fn handle_message(
        &mut self,
        now: u64,
        msg: HubMessage,
    ) -> Result<Delivered, SessionError<O::Error>> {
        self.handle_activity(now);
        match msg {
            HubMessage::Welcome(welcome) => {
                if !matches!(
                    self.phase,
                    Phase::AwaitWelcome {
                        hello_sent: true,
                        ..
                    }
                ) {
                    return Err(SessionError::Protocol("Welcome outside the handshake"));
                }
                self.apply_hub_last_seq(welcome.last_seq)
                    .map_err(SessionError::Outbox)?;
                let silence_limit = u64::from(welcome.ping_interval_ms)
                    + u64::from(welcome.pong_timeout_ms)
                    + self.config.silence_grace_ms;
                self.phase = Phase::Ready { silence_limit };
                self.attempts = 0;
                self.refused = false;
                self.server_offset = Some(welcome.server_time as i64 - now as i64);
                self.stats.sessions += 1;
                Ok(Delivered::Welcome(welcome))
            }
            HubMessage::Ack(ack) => {
                if !self.is_ready() {
                    return Err(SessionError::Protocol("Ack before Welcome"));
                }
                self.acknowledge(ack.up_to_seq)
                    .map_err(SessionError::Outbox)?;
                Ok(Delivered::Nothing)
            }
            HubMessage::Command(cmd) => {
                if !self.is_ready() {
                    return Err(SessionError::Protocol("Command before Welcome"));
                }
                Ok(self.receive_command(now, cmd))
            }
            HubMessage::Error(err) => Ok(Delivered::Error(err)),
            HubMessage::CommandClosed(closed) => {
                self.command_closed(closed.id);
                Ok(Delivered::Nothing)
            }
            HubMessage::Desired(desired) => {
                if !self.is_ready() {
                    return Err(SessionError::Protocol("Desired before Welcome"));
                }
                Ok(Delivered::Desired(desired))
            }
            HubMessage::FirmwareOffer(offer) => {
                if !self.is_ready() {
                    return Err(SessionError::Protocol("FirmwareOffer before Welcome"));
                }
                self.hub_updates = true;
                // Requests for an older offer are void.
                self.firmware_requests
                    .retain(|r| r.version.as_str() == offer.version.as_str());
                Ok(Delivered::FirmwareOffer(offer))
            }
            HubMessage::FirmwareChunk(chunk) => {
                if !self.is_ready() {
                    return Err(SessionError::Protocol("FirmwareChunk before Welcome"));
                }
                Ok(Delivered::FirmwareChunk(chunk))
            }
        }
    }

    /// Asks the hub for bytes `offset..offset + len` of the offered image `version` (`len`
    /// is cut to [`MAX_CHUNK_BYTES`]). The application keeps as many requests outstanding
    /// as it likes (its window, at most [`crate::limits::MAX_FIRMWARE_REQUESTS`] on the wire); up to
    /// [`REQUEST_QUEUE`] wait here at a time, and they go out after
    /// telemetry, and only to a hub that offered firmware on this connection. Returns
    /// false when the window is full or no offer came on this connection.
    pub fn request_firmware(&mut self, version: &str, offset: u64, len: u32) -> bool {
        if !self.hub_updates || !self.is_ready() || len == 0 {
            return false;
        }
        self.firmware_requests
            .push(FirmwareRequest {
                version: truncated(version),
                offset,
                len: len.min(MAX_CHUNK_BYTES as u32),
            })
            .is_ok()
    }

    /// Reports where the update to `version` stands; `reason` is cut to the protocol limit.
    /// A newer report replaces one still waiting; it goes out as soon as a hub that takes
    /// firmware messages is ready (an outcome reached offline goes out on the next
    /// connection, after the hub's first `FirmwareOffer`).
    pub fn report_firmware(
        &mut self,
        version: &str,
        state: crate::message::UpdateState,
        percent: u8,
        reason: &str,
    ) {
        self.firmware_status = Some(FirmwareStatus {
            version: truncated(version),
            state,
            percent: percent.min(100),
            reason: truncated(reason),
        });
    }

    /// Reconciles the outbox with what the hub says it has stored.
    fn apply_hub_last_seq(&mut self, hub_last: u64) -> Result<(), O::Error> {
        let front = self.outbox.front_seq();
        let next = front + self.outbox.len() as u64;
        if hub_last >= next {
            // The hub has stored a sequence number this device has not issued yet in its
            // current life: its counter went backwards (storage wiped, re-flashed). The hub
            // only ever stores numbers a device sent, so everything pending is new data.
            // Continue numbering after the hub's.
            self.outbox.renumber(hub_last + 1)?;
            self.last_acked = hub_last;
            return Ok(());
        }
        self.acknowledge(hub_last)
    }

    fn acknowledge(&mut self, up_to: u64) -> Result<(), O::Error> {
        let front = self.outbox.front_seq();
        if up_to >= front {
            let count = ((up_to - front + 1) as usize).min(self.outbox.len());
            if count > 0 {
                self.outbox.pop_front(count)?;
                self.sent = self.sent.saturating_sub(count);
                self.stats.batches_acked += count as u64;
            }
        }
        self.last_acked = self.last_acked.max(up_to);
        Ok(())
    }

    fn receive_command(&mut self, now: u64, cmd: Command) -> Delivered {
        let id = cmd.id;
        if let Some(index) = self.seen.iter().position(|r| r.id == id) {
            // The hub still has it open, so it becomes the most recently seen: it is the last
            // to be forgotten.
            let remembered = self.seen.remove(index);
            let _ = self.seen.push(remembered);
            // At-least-once delivery: acknowledge again, and if it already finished, report
            // the outcome again (the first report was evidently lost).
            self.queue_reply(Reply::Ack(id));
            if let Seen::Done { ok, code } = remembered.seen {
                self.queue_reply(Reply::Result(CommandResult {
                    id,
                    ok,
                    code,
                    output: truncated("duplicate delivery; the result was reported before"),
                }));
            }
            return Delivered::Nothing;
        }
        if self.seen.is_full() && !self.forget_one(now) {
            // Every remembered command may still come again: forgetting one could run it
            // twice. Leave this one unacknowledged instead; the hub keeps it open and
            // delivers it again on the next connection.
            self.stats.commands_refused += 1;
            return Delivered::Nothing;
        }
        let _ = self.seen.push(Remembered {
            id,
            seen: Seen::Running,
            deadline: cmd.deadline,
        });
        self.queue_reply(Reply::Ack(id));
        self.stats.commands += 1;
        Delivered::Command(cmd)
    }

    /// Forgets one remembered command that cannot come again, oldest first: one the hub
    /// closed; one whose deadline passed (the hub closed it, even if its `CommandClosed` was
    /// lost); or, with a hub that never sends `CommandClosed`, the oldest finished one.
    /// Never a running one. False when there is none.
    fn forget_one(&mut self, now: u64) -> bool {
        let hub_now = self.server_time(now).unwrap_or(0);
        let hub_closes = self.hub_closes;
        let forgettable = |r: &Remembered| match r.seen {
            Seen::Closed => 0,
            Seen::Done { .. }
                if r.deadline != 0 && r.deadline.saturating_add(DEADLINE_MARGIN_MS) < hub_now =>
            {
                1
            }
            Seen::Done { .. } if !hub_closes => 2,
            _ => 3,
        };
        let best = self
            .seen
            .iter()
            .enumerate()
            .map(|(i, r)| (forgettable(r), i))
            .filter(|(rank, _)| *rank < 3)
            .min();
        match best {
            Some((_, index)) => {
                self.seen.remove(index);
                true
            }
            None => false,
        }
    }

    fn command_closed(&mut self, id: u64) {
        // Id 0 (never a command) is the hub saying, right after `Welcome`, that it confirms
        // results on this connection.
        self.hub_closes = true;
        if let Some(r) = self.seen.iter_mut().find(|r| r.id == id && id != 0) {
            r.seen = Seen::Closed;
        }
    }

    fn queue_reply(&mut self, reply: Reply) {
        if self.replies.is_full() {
            self.replies.pop_front();
            self.stats.replies_dropped += 1;
        }
        let _ = self.replies.push_back(reply);
    }

    /// The application finished command `id`; its result goes out as soon as a session is
    /// ready. `output` is cut to the protocol limit.
    pub fn command_finished(&mut self, id: u64, ok: bool, code: i32, output: &str) {
        if let Some(r) = self.seen.iter_mut().find(|r| r.id == id) {
            // A command the hub already closed (cancelled, timed out) stays closed.
            if r.seen == Seen::Running {
                r.seen = Seen::Done { ok, code };
            }
        }
        self.queue_reply(Reply::Result(CommandResult {
            id,
            ok,
            code,
            output: truncated(output),
        }));
    }

    /// Reports a property of the device (its view of its own configuration or state). It
    /// goes out in one `State` message with the others reported meanwhile, as soon as a
    /// session is ready, after pending command replies; a newer value of a waiting key
    /// replaces the older one. What is waiting when the connection drops goes out on the
    /// next one. The value is cut to the protocol limit.
    ///
    /// # Errors
    /// [`ReportError::BadKey`] for a key outside the name alphabet or over 32 bytes;
    /// [`ReportError::Full`] when `STATES` other keys are already waiting.
    pub fn report_state(&mut self, key: &str, value: &str) -> Result<(), ReportError> {
        self.report(key, value, false)
    }

    /// Refuses a desired key, with a reason the operator sees (`hub state show`). It goes
    /// out with the next [`Session::applied`]. The reason is cut to 64 bytes.
    ///
    /// # Errors
    /// As [`Session::report_state`].
    pub fn report_refused(&mut self, key: &str, reason: &str) -> Result<(), ReportError> {
        self.report(key, reason, true)
    }

    fn report(&mut self, key: &str, value: &str, refused: bool) -> Result<(), ReportError> {
        if !is_valid_name(key, MAX_PROPERTY_KEY_LEN) {
            return Err(ReportError::BadKey);
        }
        let value = truncated(value);
        if let Some((p, is_refused)) = self.state.iter_mut().find(|(p, _)| p.key == key) {
            p.value = value;
            *is_refused = refused;
            return Ok(());
        }
        self.state
            .push((
                Property {
                    key: truncated(key),
                    value,
                },
                refused,
            ))
            .map_err(|_| ReportError::Full)
    }

    /// The application has applied desired-state `version`: what it reported and refused
    /// since goes out as one `Applied` message, as soon as a session is ready.
    pub fn applied(&mut self, version: u64) {
        self.applied = Some(self.applied.map_or(version, |v| v.max(version)));
    }

    /// Appends a batch of readings to the outbox. Returns its sequence number and what the
    /// outbox dropped to make room.
    ///
    /// # Errors
    /// The outbox failed; the batch is not recorded.
    pub fn record(&mut self, readings: &[Reading]) -> Result<(u64, Pushed), O::Error> {
        let pushed = self.outbox.push_back(readings)?;
        self.sent = self.sent.saturating_sub(pushed.evicted_batches as usize);
        self.stats.readings_dropped += u64::from(pushed.evicted_readings);
        let seq = self.outbox.front_seq() + self.outbox.len() as u64 - 1;
        Ok((seq, pushed))
    }

    /// The next message to send on the current connection, if any. Call until `None`
    /// after every event.
    ///
    /// # Errors
    /// The outbox failed to read a batch.
    pub fn poll_transmit(&mut self) -> Result<Option<DeviceMessage>, O::Error> {
        if self.closing {
            return Ok(None);
        }
        match &mut self.phase {
            Phase::AwaitWelcome { hello_sent, .. } if !*hello_sent => {
                *hello_sent = true;
                Ok(Some(DeviceMessage::Hello(Hello {
                    firmware: self.config.firmware.clone(),
                    capabilities: self.config.capabilities.clone(),
                    last_acked_seq: self.last_acked,
                })))
            }
            Phase::Ready { .. } => {
                if let Some(reply) = self.replies.pop_front() {
                    return Ok(Some(match reply {
                        Reply::Ack(id) => DeviceMessage::CommandAck(CommandAck { id }),
                        Reply::Result(result) => DeviceMessage::CommandResult(result),
                    }));
                }
                if let Some(version) = self.applied.take() {
                    let pick = |want: bool| {
                        self.state
                            .iter()
                            .filter(|(_, refused)| *refused == want)
                            .map(|(p, _)| p.clone())
                            .collect()
                    };
                    let (properties, refused) = (pick(false), pick(true));
                    self.state.clear();
                    return Ok(Some(DeviceMessage::Applied(Applied {
                        version,
                        properties,
                        refused,
                    })));
                }
                if self.state.iter().any(|(_, refused)| !refused) {
                    let properties = self
                        .state
                        .iter()
                        .filter(|(_, refused)| !refused)
                        .map(|(p, _)| p.clone())
                        .collect();
                    self.state.retain(|(_, refused)| *refused);
                    return Ok(Some(DeviceMessage::State(State { properties })));
                }
                if self.hub_updates {
                    if let Some(status) = self.firmware_status.take() {
                        return Ok(Some(DeviceMessage::FirmwareStatus(status)));
                    }
                }
                if self.sent < self.outbox.len() && self.sent < self.config.window {
                    let mut readings = Vec::new();
                    self.outbox.read(self.sent, &mut readings)?;
                    let seq = self.outbox.front_seq() + self.sent as u64;
                    self.sent += 1;
                    self.stats.batches_sent += 1;
                    return Ok(Some(DeviceMessage::Telemetry(Telemetry { seq, readings })));
                }
                // Image requests come last: telemetry within its window goes first, so a
                // transfer never holds readings back.
                if !self.firmware_requests.is_empty() {
                    let request = self.firmware_requests.remove(0);
                    return Ok(Some(DeviceMessage::FirmwareRequest(request)));
                }
                Ok(None)
            }
            _ => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests;
