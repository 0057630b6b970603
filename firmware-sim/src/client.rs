//! The firmware client as a sans-io state machine: the hub protocol (driving
//! `schemas::session::Session`, the one copy of the device-side protocol logic) over a
//! WebSocket [`Link`], sampling on an interval, commands, and an orderly shutdown or reboot.
//! The link owns the upgrade, the framing and the buffers; the client decides when to
//! connect, what to send and when to close.
//!
//! It does no I/O and reads no clock. A driver (the async one in [`crate::driver`], or a
//! board's own loop) calls [`Client::poll`] with the time, performs the [`Io`] it asks
//! for, and reports back:
//!
//! | `Io`            | the driver does                          | then calls                                          |
//! |-----------------|------------------------------------------|-----------------------------------------------------|
//! | `Connect`       | opens TCP (+TLS)                         | [`Client::handle_connected`] / [`Client::handle_connect_failed`] |
//! | `Write`         | writes [`Client::pending_tx`]            | [`Client::tx_written`] / [`Client::handle_transport_error`] |
//! | `Read{until}`   | reads into [`Client::rx_space`] until `until` | [`Client::rx_filled`] / [`Client::handle_transport_error`] / nothing on timeout |
//! | `Sleep{until}`  | waits                                    | nothing                                             |
//! | `Close`         | closes the transport                     | [`Client::handle_closed`]                           |
//! | `Exit(e)`       | stops (reset the MCU for `Reboot`)       | —                                                   |
//!
//! Memory: the client borrows an rx and a tx buffer from the caller (see
//! [`MIN_RX_BUFFER`], [`MIN_TX_BUFFER`]) and holds the session (about 5.5 KiB, most of it
//! the session's queue of four pending command results) plus the board. Encoding a message
//! and decoding a frame use stack buffers of [`MAX_DEVICE_MESSAGE`] and
//! [`MAX_RX_PAYLOAD`] bytes inside synchronous calls, never across an `.await`.

use core::fmt::Debug;

use heapless::{String, Vec};
use rand_core::RngCore;
use schemas::close;
use schemas::codec::{encode_postcard, Encoding};
use schemas::limits::{MAX_OUTPUT_LEN, MAX_READINGS};
use schemas::session::{
    Action, CloseReason, Delivered, DisconnectCause, Outbox, Session, SessionConfig, SessionError,
};
use schemas::{DeviceMessage, HubMessage, Reading, UpdateState};

use crate::board::{AfterDisconnect, Board, CommandContext, Event, Samples};
use crate::flash::Flash;
use crate::link::{Incoming, Link, Upgrade};
use crate::ring::{RingError, RingOutbox, MAX_RECORD_LEN};

pub use crate::link::{MAX_HOST_LEN, MAX_PATH_LEN, MAX_TOKEN_LEN, MIN_RX_BUFFER, MIN_TX_BUFFER};

/// Largest postcard encoding of a message this client sends: a telemetry batch of 64
/// maximal readings (command results are at most 1043 bytes).
pub const MAX_DEVICE_MESSAGE: usize = 1 + 10 + MAX_RECORD_LEN;
/// Largest hub frame payload the client accepts. v1 hub messages are at most about 600
/// bytes (a command with 512 bytes of arguments); bigger frames are refused with close
/// code 1009 and a reconnect.
pub const MAX_RX_PAYLOAD: usize = 2048;
/// Most image bytes the client asks for in one firmware request: a chunk with its
/// envelope (version, offset, lengths) must fit [`MAX_RX_PAYLOAD`].
pub const MAX_CHUNK_REQUEST: u32 = (MAX_RX_PAYLOAD - 128) as u32;
/// Shortest sample interval a command may set.
pub const MIN_INTERVAL_MS: u32 = 100;
/// Longest sample interval a command may set (one day).
pub const MAX_INTERVAL_MS: u32 = 86_400_000;
/// How long a reboot waits for the command result to be written before it closes.
pub const REBOOT_GRACE_MS: u64 = 2_000;

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientConfig<'a> {
    /// The device token, sent as `Authorization: Bearer <token>`; empty when the device
    /// identifies itself by a TLS client certificate (presented by its transport) instead.
    pub token: &'a str,
    /// Session tunables (firmware version, backoff, window), passed to `schemas`.
    pub session: SessionConfig,
    /// Time between samples, milliseconds.
    pub sample_interval_ms: u32,
    /// How long after the client starts it takes its first sample, milliseconds (at
    /// most one interval). Devices that start together (a fleet powered up after an
    /// outage, a simulated fleet) would otherwise sample, and send, in lockstep; giving
    /// each a different phase spreads their readings over the interval.
    pub first_sample_ms: u32,
    /// Limit on the HTTP upgrade (after the transport is open), milliseconds.
    pub handshake_timeout_ms: u32,
}

impl<'a> ClientConfig<'a> {
    /// Defaults: sample every 10 s, 10 s for the upgrade, the session's defaults, and the
    /// `desired` capability (the client applies desired state, see [`Board::apply_setting`]).
    pub fn new(token: &'a str, firmware: &str) -> ClientConfig<'a> {
        let mut session = SessionConfig::new(firmware);
        let _ = session
            .capabilities
            .push(heapless::String::try_from(schemas::capability::DESIRED).unwrap_or_default());
        ClientConfig {
            token,
            session,
            sample_interval_ms: 10_000,
            first_sample_ms: 0,
            handshake_timeout_ms: 10_000,
        }
    }
}

/// A fatal client error: the driver stops and reports it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError<E: Debug> {
    /// The ring in flash failed or is corrupt.
    #[error("device storage: {0}")]
    Storage(RingError<E>),
    /// A setting or buffer is unusable (the text says which).
    #[error("invalid client configuration: {0}")]
    Config(&'static str),
    /// A message does not fit the transmit buffer (a batch from a ring written with a
    /// bigger buffer, say).
    #[error("a {len}-byte frame does not fit the {capacity}-byte transmit buffer")]
    FrameTooLarge {
        /// Frame size.
        len: usize,
        /// Buffer size.
        capacity: usize,
    },
}

/// Why the driver stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// A shutdown was requested ([`Client::shutdown`]) and has finished.
    Stopped,
    /// A command asked for a reset; the result has been sent.
    Reboot,
}

/// The I/O the client wants next. See the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Io {
    /// Open the transport.
    Connect,
    /// Write [`Client::pending_tx`].
    Write,
    /// Read into [`Client::rx_space`]; give up at `until` (local ms) and poll again.
    Read {
        /// When to stop waiting (`None`: no deadline).
        until: Option<u64>,
    },
    /// No connection: wait until `until`.
    Sleep {
        /// When to poll again (`None`: no deadline).
        until: Option<u64>,
    },
    /// Close the transport, then call [`Client::handle_closed`].
    Close,
    /// Stop.
    Exit(Exit),
}

/// Where the connection is, as the client sees it.
#[derive(Debug, Clone, Copy)]
enum Phase {
    Down,
    Connecting,
    Upgrading { deadline: u64 },
    Open,
    Closing { cause: DisconnectCause },
}

#[derive(Debug, Clone, Copy)]
struct Shutdown {
    exit: Exit,
    deadline: u64,
    drain: bool,
}

/// Counters since boot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Samples taken.
    pub samples: u64,
    /// Samples skipped for want of a clock.
    pub samples_skipped: u64,
    /// Batches stored in the ring.
    pub batches_recorded: u64,
    /// Readings in them.
    pub readings_recorded: u64,
    /// Readings a sensor produced that were invalid, did not fit a batch, or did not fit
    /// the ring.
    pub readings_rejected: u64,
    /// Batches written to the transport, re-sends included.
    pub batches_sent: u64,
    /// Batches the hub acknowledged.
    pub batches_acked: u64,
    /// Readings in them.
    pub readings_acked: u64,
    /// Readings lost because the ring was full.
    pub readings_evicted: u64,
    /// Commands run (duplicates excluded).
    pub commands: u64,
    /// Connection attempts.
    pub connects: u64,
    /// Connections the hub welcomed.
    pub sessions: u64,
}

/// The firmware client. See the module documentation.
pub struct Client<'a, F: Flash, B: Board, R: RngCore> {
    session: Session<RingOutbox<F>>,
    board: B,
    rng: R,
    link: Link<'a>,
    phase: Phase,
    interval_ms: u32,
    /// [`ClientConfig::first_sample_ms`].
    first_sample_ms: u32,
    next_sample: Option<u64>,
    handshake_timeout_ms: u32,
    shutdown: Option<Shutdown>,
    transmit_idle: bool,
    /// The status of a refused upgrade, for the next [`Event::Disconnected`] (the
    /// session's `DisconnectCause` has no room for it).
    http_status: Option<u16>,
    stats: ClientStats,
}

impl<F: Flash, B: Board, R: RngCore> Debug for Client<'_, F, B, R> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Client")
            .field("phase", &self.phase)
            .field("link", &self.link)
            .field("interval_ms", &self.interval_ms)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

type Result<T, F> = core::result::Result<T, ClientError<<F as Flash>::Error>>;

impl<'a, F: Flash, B: Board, R: RngCore> Client<'a, F, B, R> {
    /// A client that samples at once and connects at the first [`Client::poll`].
    ///
    /// # Errors
    /// [`ClientError::Config`] when a buffer is smaller than [`MIN_RX_BUFFER`] /
    /// [`MIN_TX_BUFFER`], the token is empty or longer than [`MAX_TOKEN_LEN`], or the
    /// interval is outside [`MIN_INTERVAL_MS`]..=[`MAX_INTERVAL_MS`].
    pub fn new(
        config: ClientConfig<'a>,
        outbox: RingOutbox<F>,
        board: B,
        mut rng: R,
        rx: &'a mut [u8],
        tx: &'a mut [u8],
    ) -> Result<Client<'a, F, B, R>, F> {
        let link = Link::new(rx, tx, config.token, &mut rng)
            .map_err(|err| ClientError::Config(err.reason()))?;
        if !(MIN_INTERVAL_MS..=MAX_INTERVAL_MS).contains(&config.sample_interval_ms) {
            return Err(ClientError::Config(
                "sample interval is outside 100 ms ..= 1 day",
            ));
        }
        Ok(Client {
            session: Session::new(config.session, outbox),
            board,
            rng,
            link,
            phase: Phase::Down,
            interval_ms: config.sample_interval_ms,
            first_sample_ms: config.first_sample_ms.min(config.sample_interval_ms),
            next_sample: None,
            handshake_timeout_ms: config.handshake_timeout_ms,
            shutdown: None,
            transmit_idle: true,
            http_status: None,
            stats: ClientStats::default(),
        })
    }

    /// The board.
    pub fn board(&self) -> &B {
        &self.board
    }

    /// The board, mutably.
    pub fn board_mut(&mut self) -> &mut B {
        &mut self.board
    }

    /// The protocol session (sequence numbers, acks, server time).
    pub fn session(&self) -> &Session<RingOutbox<F>> {
        &self.session
    }

    /// The ring of unacknowledged batches.
    pub fn outbox(&self) -> &RingOutbox<F> {
        self.session.outbox()
    }

    /// The current sample interval in milliseconds.
    pub fn interval_ms(&self) -> u32 {
        self.interval_ms
    }

    /// Whether the hub has welcomed the current connection.
    pub fn is_ready(&self) -> bool {
        self.session.is_ready()
    }

    /// Counters since boot.
    pub fn stats(&self) -> ClientStats {
        let s = self.session.stats();
        let ring = self.session.outbox().stats();
        ClientStats {
            batches_sent: s.batches_sent,
            batches_acked: s.batches_acked,
            readings_acked: ring.acked_readings,
            readings_evicted: ring.evicted_readings,
            sessions: s.sessions,
            ..self.stats
        }
    }

    /// Begins an orderly stop: no more samples; unacknowledged batches and command results
    /// get until `now + drain_ms` to be delivered (reconnecting if needed); then the
    /// connection is closed with 1000 and the driver gets [`Exit::Stopped`].
    pub fn shutdown(&mut self, now: u64, drain_ms: u32) {
        self.shutdown = Some(Shutdown {
            exit: Exit::Stopped,
            deadline: now.saturating_add(u64::from(drain_ms)),
            drain: true,
        });
    }

    /// Advances timers (sampling, the session's connect/liveness timers, the upgrade
    /// timeout, a shutdown) and says what I/O to do next.
    ///
    /// # Errors
    /// A fatal error: the ring failed, or a frame cannot fit the transmit buffer.
    pub fn poll(&mut self, now: u64) -> Result<Io, F> {
        self.poll_sampling(now)?;

        if let Some(sd) = self.shutdown {
            if matches!(self.phase, Phase::Down | Phase::Connecting)
                && (self.shutdown_done(sd) || now >= sd.deadline)
            {
                return Ok(Io::Exit(sd.exit));
            }
        }

        if matches!(self.phase, Phase::Down | Phase::Open) {
            match self.session.handle_timeout(now) {
                Some(Action::Connect) => {
                    self.phase = Phase::Connecting;
                    self.stats.connects += 1;
                    self.board.on_event(&Event::Connecting);
                    return Ok(Io::Connect);
                }
                Some(Action::Close(reason)) => {
                    self.begin_close(DisconnectCause::Local(reason), reason.close_code(), "");
                }
                _ => {}
            }
        }
        if let Phase::Upgrading { deadline } = self.phase {
            if now >= deadline {
                self.phase = Phase::Closing {
                    cause: DisconnectCause::ConnectFailed,
                };
                self.link.drop_output();
            }
        }
        if matches!(self.phase, Phase::Open) {
            self.fill_tx()?;
        }
        if let Some(sd) = self.shutdown {
            if self.shutdown_done(sd) || now >= sd.deadline {
                match self.phase {
                    Phase::Open => {
                        let reason = match sd.exit {
                            Exit::Stopped => "device shutting down",
                            Exit::Reboot => "device rebooting",
                        };
                        self.begin_close(
                            DisconnectCause::Closed(close::NORMAL),
                            close::NORMAL,
                            reason,
                        );
                    }
                    Phase::Upgrading { .. } => {
                        self.phase = Phase::Closing {
                            cause: DisconnectCause::ConnectFailed,
                        };
                        self.link.drop_output();
                    }
                    Phase::Down | Phase::Connecting | Phase::Closing { .. } => {}
                }
            }
        }

        if !self.link.pending_tx().is_empty() {
            return Ok(Io::Write);
        }
        Ok(match self.phase {
            Phase::Closing { .. } => Io::Close,
            Phase::Down => Io::Sleep {
                until: self.next_deadline(),
            },
            // `Connecting` cannot be polled (the driver is connecting); treat it as waiting.
            Phase::Connecting | Phase::Upgrading { .. } | Phase::Open => Io::Read {
                until: self.next_deadline(),
            },
        })
    }

    /// Takes a sample if one is due (and records it in the ring). [`Client::poll`] does
    /// this itself; a driver that waits on something else for long (a connect) calls it at
    /// [`Client::next_sample_at`] so that readings keep being recorded meanwhile.
    ///
    /// # Errors
    /// The ring failed.
    pub fn poll_sampling(&mut self, now: u64) -> Result<(), F> {
        if self.shutdown.is_some() {
            return Ok(());
        }
        let due = *self
            .next_sample
            .get_or_insert(now.saturating_add(u64::from(self.first_sample_ms)));
        if now >= due {
            self.sample(now)?;
            let mut next = due.saturating_add(u64::from(self.interval_ms));
            if next <= now {
                // We fell behind (a write blocked by backpressure): skip, do not burst.
                next = now.saturating_add(u64::from(self.interval_ms));
            }
            self.next_sample = Some(next);
        }
        Ok(())
    }

    /// When the next sample is due (`None` during a shutdown).
    pub fn next_sample_at(&self) -> Option<u64> {
        match self.shutdown {
            Some(_) => None,
            None => self.next_sample,
        }
    }

    /// Whether a shutdown has nothing left to wait for.
    fn shutdown_done(&self, sd: Shutdown) -> bool {
        let idle = self.transmit_idle && self.link.pending_tx().is_empty();
        idle && (!sd.drain || self.session.outbox().is_empty())
    }

    /// The earliest time [`Client::poll`] must run again.
    pub fn next_deadline(&self) -> Option<u64> {
        let mut at = self.session.poll_timeout();
        let mut consider = |t: Option<u64>| {
            if let Some(t) = t {
                at = Some(at.map_or(t, |a| a.min(t)));
            }
        };
        match self.shutdown {
            None => consider(self.next_sample),
            Some(sd) => consider(Some(sd.deadline)),
        }
        if let Phase::Upgrading { deadline } = self.phase {
            consider(Some(deadline));
        }
        at
    }

    /// How long a connect may take before the driver gives up: only bounded during a
    /// shutdown (otherwise the transport's own timeout applies).
    pub fn connect_deadline(&self) -> Option<u64> {
        self.shutdown.map(|sd| sd.deadline)
    }

    /// How long a write may block before the connection counts as dead: the hub's
    /// silence limit (a hub that stops reading for that long is as good as gone), or the
    /// upgrade deadline.
    pub fn write_deadline(&self) -> Option<u64> {
        match self.phase {
            Phase::Upgrading { deadline } => Some(deadline),
            _ => self.session.poll_timeout(),
        }
    }

    /// The transport is open: the upgrade request is prepared (`Host: host`, `GET path`).
    ///
    /// # Errors
    /// [`ClientError::Config`] when `host` or `path` are empty or too long.
    pub fn handle_connected(&mut self, now: u64, host: &str, path: &str) -> Result<(), F> {
        self.link
            .start_upgrade(&mut self.rng, host, path)
            .map_err(|err| ClientError::Config(err.reason()))?;
        self.transmit_idle = false;
        self.http_status = None;
        self.phase = Phase::Upgrading {
            deadline: now.saturating_add(u64::from(self.handshake_timeout_ms)),
        };
        Ok(())
    }

    /// The transport could not be opened.
    pub fn handle_connect_failed(&mut self, now: u64) {
        self.phase = Phase::Closing {
            cause: DisconnectCause::ConnectFailed,
        };
        self.handle_closed(now);
    }

    /// A read or write failed, or the stream ended: the connection is gone. The next
    /// [`Client::poll`] says [`Io::Close`].
    pub fn handle_transport_error(&mut self) {
        if !matches!(self.phase, Phase::Closing { .. }) {
            let cause = match self.phase {
                Phase::Upgrading { .. } | Phase::Connecting => DisconnectCause::ConnectFailed,
                _ => DisconnectCause::Io,
            };
            self.phase = Phase::Closing { cause };
        }
        self.link.drop_output();
    }

    /// The driver closed the transport. Schedules the next attempt (backoff with full
    /// jitter from the board's RNG); during a shutdown or reboot that has nothing left to
    /// do, the event says so instead ([`AfterDisconnect::Exit`]).
    pub fn handle_closed(&mut self, now: u64) {
        let cause = match self.phase {
            Phase::Closing { cause } => cause,
            _ => DisconnectCause::Io,
        };
        let was_ready = self.session.is_ready();
        let random = self.rng.next_u32();
        self.session.handle_disconnected(now, cause, random);
        self.phase = Phase::Down;
        self.link.drop_input();
        self.link.drop_output();
        self.transmit_idle = true;
        let retry_at = self.session.poll_timeout();
        // The same test `poll` makes next: a finished shutdown, or one whose deadline comes
        // before the next attempt, exits instead of reconnecting.
        let next = match self.shutdown {
            Some(sd) if self.shutdown_done(sd) || retry_at.is_none_or(|at| at >= sd.deadline) => {
                AfterDisconnect::Exit(sd.exit)
            }
            _ => AfterDisconnect::RetryIn(retry_at.map_or(0, |at| at.saturating_sub(now))),
        };
        self.board.on_event(&Event::Disconnected {
            cause,
            http_status: self.http_status.take(),
            was_ready,
            next,
        });
    }

    /// The bytes to write next.
    pub fn pending_tx(&self) -> &[u8] {
        self.link.pending_tx()
    }

    /// `n` bytes of [`Client::pending_tx`] were written.
    pub fn tx_written(&mut self, n: usize) {
        self.link.tx_written(n);
    }

    /// Where the driver reads incoming bytes to.
    pub fn rx_space(&mut self) -> &mut [u8] {
        self.link.rx_space()
    }

    /// `n` bytes were read into [`Client::rx_space`]: parses the upgrade response or
    /// frames, and hands messages to the session and commands to the board.
    ///
    /// # Errors
    /// A fatal storage error while handling an acknowledgement.
    pub fn rx_filled(&mut self, now: u64, n: usize) -> Result<(), F> {
        self.link.rx_filled(n);
        self.session.handle_activity(now);
        loop {
            match self.phase {
                Phase::Upgrading { .. } => {
                    if !self.finish_upgrade(now) {
                        break;
                    }
                }
                Phase::Open => {
                    if !self.next_frame(now)? {
                        break;
                    }
                }
                // Nothing more is read once closing; bytes are dropped.
                _ => {
                    self.link.drop_input();
                    break;
                }
            }
        }
        Ok(())
    }

    /// Returns whether more input may be parsed.
    fn finish_upgrade(&mut self, now: u64) -> bool {
        match self.link.accept_upgrade() {
            Upgrade::Pending => false,
            Upgrade::Accepted => {
                self.phase = Phase::Open;
                self.transmit_idle = false;
                self.session.handle_connected(now);
                self.board.on_event(&Event::Connected);
                true
            }
            Upgrade::Refused { cause, http_status } => {
                self.http_status = http_status;
                self.phase = Phase::Closing { cause };
                false
            }
        }
    }

    /// Handles one complete frame if there is one; returns whether more input may be
    /// parsed.
    fn next_frame(&mut self, now: u64) -> Result<bool, F> {
        let mut payload = [0u8; MAX_RX_PAYLOAD];
        match self.link.receive(&mut payload) {
            Incoming::Nothing => return Ok(false),
            Incoming::Data(frame) => {
                match schemas::link::decode_frame::<HubMessage>(Encoding::Postcard, frame) {
                    Ok(msg) => self.handle_message(now, msg)?,
                    Err(refused) => self.protocol_close(refused.code, refused.reason),
                }
            }
            Incoming::Control => {}
            // The echo is queued: drop the transport once it is written.
            Incoming::PeerClosed(cause) => self.phase = Phase::Closing { cause },
            Incoming::CloseCompleted => {
                if !matches!(self.phase, Phase::Closing { .. }) {
                    self.phase = Phase::Closing {
                        cause: DisconnectCause::Io,
                    };
                }
            }
            Incoming::Refused { code, reason } => self.protocol_close(code, reason),
        }
        Ok(matches!(self.phase, Phase::Open))
    }

    fn protocol_close(&mut self, code: u16, reason: &str) {
        self.link.drop_input();
        self.begin_close(
            DisconnectCause::Local(CloseReason::ProtocolViolation),
            code,
            reason,
        );
    }

    fn handle_message(&mut self, now: u64, msg: HubMessage) -> Result<(), F> {
        // Any message may queue a reply (an ack, a result): not idle until polled again.
        self.transmit_idle = false;
        let acked_before = self.session.stats().batches_acked;
        let readings_before = self.session.outbox().stats().acked_readings;
        let delivered = self.session.handle_message(now, msg);
        let acked = self.session.stats().batches_acked - acked_before;
        if acked > 0 {
            // A version on trial has come up, connected, and had its telemetry accepted:
            // it confirms itself, and the hub hears `succeeded`.
            if let Some(updates) = self.board.updates().filter(|u| u.on_trial()) {
                updates
                    .confirm()
                    .map_err(|_| ClientError::Config("firmware update storage failed"))?;
                if let Some(report) = updates.pending_report() {
                    self.session.report_firmware(
                        &report.version,
                        report.state,
                        100,
                        &report.reason,
                    );
                }
            }
            let readings = self.session.outbox().stats().acked_readings - readings_before;
            self.board.on_event(&Event::Acked {
                up_to_seq: self.session.last_acked(),
                batches: acked,
                readings,
            });
        }
        match delivered {
            Ok(Delivered::Nothing) => {}
            Ok(Delivered::Welcome(welcome)) => {
                let outbox = self.session.outbox();
                self.board.on_event(&Event::Welcome {
                    hub_last_seq: welcome.last_seq,
                    pending: outbox.len(),
                    next_seq: outbox.front_seq(),
                });
            }
            Ok(Delivered::Command(cmd)) => self.run_command(now, &cmd),
            Ok(Delivered::Desired(desired)) => self.apply_desired(now, &desired),
            Ok(Delivered::Error(err)) => self.board.on_event(&Event::HubError {
                code: err.code,
                message: &err.message,
            }),
            Ok(Delivered::FirmwareOffer(offer)) => self.firmware_offer(now, &offer)?,
            Ok(Delivered::FirmwareChunk(chunk)) => self.firmware_chunk(now, &chunk)?,
            Err(SessionError::Protocol(why)) => self.begin_close(
                DisconnectCause::Local(CloseReason::ProtocolViolation),
                close::PROTOCOL_VIOLATION,
                why,
            ),
            Err(SessionError::Outbox(err)) => return Err(ClientError::Storage(err)),
        }
        Ok(())
    }

    /// Applies desired state: `interval` (milliseconds, a JSON number; `null` keeps the
    /// current one) here, every other key through the board. Each outcome is reported;
    /// after the last message of a version the hub hears `Applied`.
    fn apply_desired(&mut self, now: u64, desired: &schemas::Desired) {
        for p in &desired.properties {
            let outcome = if p.key == "interval" {
                self.apply_interval(now, &p.value)
            } else {
                self.board.apply_setting(&p.key, &p.value)
            };
            // A full report queue drops the report; the key then stays in the delta and
            // comes again.
            let _ = match outcome {
                Ok(()) => self.session.report_state(&p.key, &p.value),
                Err(why) => self.session.report_refused(&p.key, why),
            };
        }
        if desired.last {
            self.session.applied(desired.version);
        }
    }

    fn apply_interval(&mut self, now: u64, value: &str) -> core::result::Result<(), &'static str> {
        if value == "null" {
            return Ok(());
        }
        let ms =
            interval_ms(value).ok_or("interval: seconds (2, 0.5) or \"500ms\", \"2s\", \"1m\"")?;
        if !(u64::from(MIN_INTERVAL_MS)..=u64::from(MAX_INTERVAL_MS)).contains(&ms) {
            return Err("interval out of range");
        }
        self.interval_ms = ms as u32;
        self.next_sample = Some(now.saturating_add(ms));
        Ok(())
    }

    fn run_command(&mut self, now: u64, cmd: &schemas::Command) {
        let mut output: String<MAX_OUTPUT_LEN> = String::new();
        let mut ctx = CommandContext {
            output: &mut output,
            server_time: self.session.server_time(now),
            interval_ms: self.interval_ms,
            new_interval_ms: None,
            reboot: false,
        };
        let outcome = self.board.execute(cmd, &mut ctx);
        let (new_interval, reboot) = (ctx.new_interval_ms, ctx.reboot);
        if let Some(ms) = new_interval {
            self.interval_ms = ms.clamp(MIN_INTERVAL_MS, MAX_INTERVAL_MS);
            self.next_sample = Some(now.saturating_add(u64::from(self.interval_ms)));
        }
        if reboot && self.shutdown.is_none() {
            self.shutdown = Some(Shutdown {
                exit: Exit::Reboot,
                deadline: now.saturating_add(REBOOT_GRACE_MS),
                drain: false,
            });
        }
        self.session
            .command_finished(cmd.id, outcome.ok, outcome.code, &output);
        self.stats.commands += 1;
        self.board.on_event(&Event::Command {
            id: cmd.id,
            name: &cmd.name,
            outcome,
            output: &output,
        });
    }

    /// The hub's firmware offer: an outcome about the offered version goes out first (the
    /// hub still waits for it), then the board's updater takes the offer.
    fn firmware_offer(&mut self, now: u64, offer: &schemas::FirmwareOffer) -> Result<(), F> {
        let Some(updates) = self.board.updates() else {
            return Ok(());
        };
        updates.handle_connected();
        if let Some(report) = updates.pending_report() {
            if report.version == offer.version {
                self.session
                    .report_firmware(&report.version, report.state, 100, &report.reason);
            }
        }
        let Some(updates) = self.board.updates() else {
            return Ok(());
        };
        let outcome = updates
            .handle_offer(offer)
            .map_err(|_| ClientError::Config("firmware update storage failed"))?;
        self.firmware_outcome(now, outcome);
        Ok(())
    }

    /// Image bytes: stored by the updater; progress, refusal or the reboot into the new
    /// version follow.
    fn firmware_chunk(&mut self, now: u64, chunk: &schemas::FirmwareChunk) -> Result<(), F> {
        let Some(updates) = self.board.updates() else {
            return Ok(());
        };
        let outcome = updates
            .handle_chunk(chunk)
            .map_err(|_| ClientError::Config("firmware update storage failed"))?;
        self.firmware_outcome(now, outcome);
        Ok(())
    }

    fn firmware_outcome(&mut self, now: u64, outcome: crate::update::ChunkOutcome) {
        use crate::update::ChunkOutcome;
        let Some(updates) = self.board.updates() else {
            return;
        };
        match outcome {
            ChunkOutcome::Reboot => {
                // Installed on trial: say so, then reset into it (the grace lets the
                // report out).
                if let Some((version, _)) = updates.downloading() {
                    self.session
                        .report_firmware(&version, UpdateState::Rebooting, 100, "");
                }
                if self.shutdown.is_none() {
                    self.shutdown = Some(Shutdown {
                        exit: Exit::Reboot,
                        deadline: now.saturating_add(REBOOT_GRACE_MS),
                        drain: false,
                    });
                }
            }
            ChunkOutcome::Refused => {
                if let Some(report) = updates.pending_report() {
                    self.session
                        .report_firmware(&report.version, report.state, 0, &report.reason);
                }
            }
            ChunkOutcome::Progress(percent) => {
                if let (Some(p), Some((version, _))) = (percent, updates.downloading()) {
                    self.session
                        .report_firmware(&version, UpdateState::Downloading, p, "");
                }
                self.request_firmware();
            }
            ChunkOutcome::Ignored => self.request_firmware(),
        }
    }

    /// Keeps the updater's window of chunk requests full.
    fn request_firmware(&mut self) {
        while let Some(updates) = self.board.updates() {
            let Some((version, offset, len)) = updates.next_request(MAX_CHUNK_REQUEST) else {
                return;
            };
            if !self.session.request_firmware(&version, offset, len) {
                if let Some(updates) = self.board.updates() {
                    updates.request_not_sent(offset);
                }
                return;
            }
        }
    }

    /// Queues a close frame (when the WebSocket is open) and moves to `Closing`.
    fn begin_close(&mut self, cause: DisconnectCause, code: u16, reason: &str) {
        self.link.close(code, reason);
        self.phase = Phase::Closing { cause };
    }

    /// Moves messages from the session into the transmit buffer. A message is only taken
    /// from the session when the buffer is empty, or has room for the largest possible
    /// message plus a control frame: once taken, it must not be lost.
    fn fill_tx(&mut self) -> Result<(), F> {
        loop {
            if !self.link.can_queue(MAX_DEVICE_MESSAGE) {
                return Ok(());
            }
            let msg = match self.session.poll_transmit() {
                Ok(Some(msg)) => msg,
                Ok(None) => {
                    self.transmit_idle = true;
                    return Ok(());
                }
                Err(err) => return Err(ClientError::Storage(err)),
            };
            self.transmit_idle = false;
            let mut scratch = [0u8; MAX_DEVICE_MESSAGE];
            let bytes =
                encode_postcard(&msg, &mut scratch).map_err(|_| ClientError::FrameTooLarge {
                    len: MAX_DEVICE_MESSAGE + 1,
                    capacity: self.link.tx_capacity(),
                })?;
            self.link
                .send(bytes)
                .map_err(|err| ClientError::FrameTooLarge {
                    len: err.len,
                    capacity: err.capacity,
                })?;
            if let DeviceMessage::Telemetry(t) = &msg {
                self.board.on_event(&Event::Sent {
                    seq: t.seq,
                    readings: t.readings.len(),
                });
            }
        }
    }

    fn sample(&mut self, now: u64) -> Result<(), F> {
        let Some(ts) = self
            .board
            .wall_clock_ms()
            .or_else(|| self.session.server_time(now))
        else {
            self.stats.samples_skipped += 1;
            self.board.on_event(&Event::SampleSkipped);
            return Ok(());
        };
        let mut readings: Vec<Reading, MAX_READINGS> = Vec::new();
        let mut samples = Samples {
            readings: &mut readings,
            ts,
            rejected: 0,
        };
        self.board.sample(now, &mut samples);
        let mut rejected = u64::from(samples.rejected);
        self.stats.samples += 1;
        // Every stored batch must fit one frame of the transmit buffer.
        while !readings.is_empty() && !self.link.frame_fits(telemetry_payload_bound(&readings)) {
            readings.pop();
            rejected += 1;
        }
        if readings.is_empty() {
            self.stats.readings_rejected += rejected;
            return Ok(());
        }
        match self.session.record(&readings) {
            Ok((seq, pushed)) => {
                self.stats.batches_recorded += 1;
                self.stats.readings_recorded += readings.len() as u64;
                self.board.on_event(&Event::Recorded {
                    seq,
                    readings: readings.len(),
                    evicted_readings: pushed.evicted_readings,
                });
            }
            Err(RingError::TooLarge { .. }) => rejected += readings.len() as u64,
            Err(err) => return Err(ClientError::Storage(err)),
        }
        self.stats.readings_rejected += rejected;
        Ok(())
    }
}

/// Upper bound of the payload of the WebSocket frame that carries `readings` as one
/// telemetry message.
fn telemetry_payload_bound(readings: &[Reading]) -> usize {
    let body: usize = readings.iter().map(|r| 1 + r.metric.len() + 10 + 8).sum();
    // variant + seq varint + count + readings.
    1 + 10 + 1 + body
}

/// A desired `interval` as milliseconds: a JSON number of seconds (`2`, `0.5`) or a string
/// with a unit (`"500ms"`, `"2s"`, `"1m"`).
fn interval_ms(value: &str) -> Option<u64> {
    let seconds = |text: &str, scale: f64| -> Option<u64> {
        let v: f64 = text.trim().parse().ok()?;
        (v.is_finite() && v > 0.0).then_some((v * scale) as u64)
    };
    match value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
        None => seconds(value, 1000.0),
        Some(text) => {
            if let Some(n) = text.strip_suffix("ms") {
                seconds(n, 1.0)
            } else if let Some(n) = text.strip_suffix('s') {
                seconds(n, 1000.0)
            } else if let Some(n) = text.strip_suffix('m') {
                seconds(n, 60_000.0)
            } else {
                None
            }
        }
    }
}
