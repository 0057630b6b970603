//! The firmware client as a sans-io state machine: WebSocket framing (embedded-websocket),
//! the hub protocol (driving `schemas::session::Session`, the one copy of the device-side
//! protocol logic), sampling on an interval, commands, and an orderly shutdown or reboot.
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

use embedded_websocket::{
    Error as WsError, WebSocketClient, WebSocketCloseStatusCode, WebSocketKey, WebSocketOptions,
    WebSocketReceiveMessageType, WebSocketSendMessageType, WebSocketState,
};
use heapless::{String, Vec};
use rand_core::RngCore;
use schemas::close;
use schemas::codec::{encode_postcard, Encoding, SUBPROTOCOL_POSTCARD};
use schemas::limits::{MAX_OUTPUT_LEN, MAX_READINGS};
use schemas::link::{self, DataFrame};
use schemas::session::{
    Action, CloseReason, Delivered, DisconnectCause, Outbox, Session, SessionConfig, SessionError,
};
use schemas::{DeviceMessage, HubMessage, Reading};

use crate::board::{AfterDisconnect, Board, CommandContext, Event, Samples};
use crate::flash::Flash;
use crate::ring::{RingError, RingOutbox, MAX_RECORD_LEN};
use crate::rng::MaskRng;

/// Largest postcard encoding of a message this client sends: a telemetry batch of 64
/// maximal readings (command results are at most 1043 bytes).
pub const MAX_DEVICE_MESSAGE: usize = 1 + 10 + MAX_RECORD_LEN;
/// Largest hub frame payload the client accepts. v1 hub messages are at most about 600
/// bytes (a command with 512 bytes of arguments); bigger frames are refused with close
/// code 1009 and a reconnect.
pub const MAX_RX_PAYLOAD: usize = 2048;
/// Smallest transmit buffer: the HTTP upgrade request (built in a 1 KiB buffer by
/// embedded-websocket), or a full command result frame plus a control frame.
pub const MIN_TX_BUFFER: usize = 1280;
/// Smallest receive buffer: the hub's `101` response and any v1 hub message.
pub const MIN_RX_BUFFER: usize = 768;
/// Longest token accepted, so that the upgrade request stays within embedded-websocket's
/// 1 KiB request buffer (hub tokens are about 170 bytes).
pub const MAX_TOKEN_LEN: usize = 384;
/// Longest host name (with port) for the `Host` header.
pub const MAX_HOST_LEN: usize = 253;
/// Longest request path.
pub const MAX_PATH_LEN: usize = 128;
/// Shortest sample interval a command may set.
pub const MIN_INTERVAL_MS: u32 = 100;
/// Longest sample interval a command may set (one day).
pub const MAX_INTERVAL_MS: u32 = 86_400_000;
/// How long a reboot waits for the command result to be written before it closes.
pub const REBOOT_GRACE_MS: u64 = 2_000;

/// WebSocket frame overhead of a client frame: 2-byte header, 2 extended length bytes
/// (payloads of 126..65535 bytes), 4 mask bytes.
const FRAME_OVERHEAD: usize = 8;
/// Room kept free for a pong or close frame (125-byte payload + 6).
const CONTROL_RESERVE: usize = 131;

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientConfig<'a> {
    /// The device token, sent as `Authorization: Bearer <token>`.
    pub token: &'a str,
    /// Session tunables (firmware version, backoff, window), passed to `schemas`.
    pub session: SessionConfig,
    /// Time between samples, milliseconds.
    pub sample_interval_ms: u32,
    /// Limit on the HTTP upgrade (after the transport is open), milliseconds.
    pub handshake_timeout_ms: u32,
}

impl<'a> ClientConfig<'a> {
    /// Defaults: sample every 10 s, 10 s for the upgrade, the session's defaults.
    pub fn new(token: &'a str, firmware: &str) -> ClientConfig<'a> {
        ClientConfig {
            token,
            session: SessionConfig::new(firmware),
            sample_interval_ms: 10_000,
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

#[derive(Debug, Clone)]
enum Link {
    Down,
    Connecting,
    Upgrading { key: WebSocketKey, deadline: u64 },
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
    ws: WebSocketClient<MaskRng>,
    token: &'a str,
    rx: &'a mut [u8],
    rx_len: usize,
    tx: &'a mut [u8],
    tx_start: usize,
    tx_end: usize,
    link: Link,
    interval_ms: u32,
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
        if rx.len() < MIN_RX_BUFFER {
            return Err(ClientError::Config(
                "rx buffer is smaller than MIN_RX_BUFFER",
            ));
        }
        if tx.len() < MIN_TX_BUFFER {
            return Err(ClientError::Config(
                "tx buffer is smaller than MIN_TX_BUFFER",
            ));
        }
        if config.token.is_empty() || config.token.len() > MAX_TOKEN_LEN {
            return Err(ClientError::Config(
                "token is empty or longer than 384 bytes",
            ));
        }
        if !(MIN_INTERVAL_MS..=MAX_INTERVAL_MS).contains(&config.sample_interval_ms) {
            return Err(ClientError::Config(
                "sample interval is outside 100 ms ..= 1 day",
            ));
        }
        let ws = WebSocketClient::new_client(MaskRng::new(rng.next_u64()));
        Ok(Client {
            session: Session::new(config.session, outbox),
            board,
            rng,
            ws,
            token: config.token,
            rx,
            rx_len: 0,
            tx,
            tx_start: 0,
            tx_end: 0,
            link: Link::Down,
            interval_ms: config.sample_interval_ms,
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
            if matches!(self.link, Link::Down | Link::Connecting)
                && (self.shutdown_done(sd) || now >= sd.deadline)
            {
                return Ok(Io::Exit(sd.exit));
            }
        }

        if matches!(self.link, Link::Down | Link::Open) {
            match self.session.handle_timeout(now) {
                Some(Action::Connect) => {
                    self.link = Link::Connecting;
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
        if let Link::Upgrading { deadline, .. } = self.link {
            if now >= deadline {
                self.link = Link::Closing {
                    cause: DisconnectCause::ConnectFailed,
                };
                self.tx_start = 0;
                self.tx_end = 0;
            }
        }
        if matches!(self.link, Link::Open) {
            self.fill_tx()?;
        }
        if let Some(sd) = self.shutdown {
            if self.shutdown_done(sd) || now >= sd.deadline {
                match self.link {
                    Link::Open => {
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
                    Link::Upgrading { .. } => {
                        self.link = Link::Closing {
                            cause: DisconnectCause::ConnectFailed,
                        };
                        self.tx_start = 0;
                        self.tx_end = 0;
                    }
                    Link::Down | Link::Connecting | Link::Closing { .. } => {}
                }
            }
        }

        if self.tx_start < self.tx_end {
            return Ok(Io::Write);
        }
        Ok(match self.link {
            Link::Closing { .. } => Io::Close,
            Link::Down => Io::Sleep {
                until: self.next_deadline(),
            },
            // `Connecting` cannot be polled (the driver is connecting); treat it as waiting.
            Link::Connecting | Link::Upgrading { .. } | Link::Open => Io::Read {
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
        let due = *self.next_sample.get_or_insert(now);
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
        let idle = self.transmit_idle && self.tx_start == self.tx_end;
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
        if let Link::Upgrading { deadline, .. } = self.link {
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
        match self.link {
            Link::Upgrading { deadline, .. } => Some(deadline),
            _ => self.session.poll_timeout(),
        }
    }

    /// The transport is open: the upgrade request is prepared (`Host: host`, `GET path`).
    ///
    /// # Errors
    /// [`ClientError::Config`] when `host` or `path` are empty or too long.
    pub fn handle_connected(&mut self, now: u64, host: &str, path: &str) -> Result<(), F> {
        if host.is_empty() || host.len() > MAX_HOST_LEN {
            return Err(ClientError::Config(
                "host is empty or longer than 253 bytes",
            ));
        }
        if !path.starts_with('/') || path.len() > MAX_PATH_LEN {
            return Err(ClientError::Config(
                "path does not start with '/' or is longer than 128 bytes",
            ));
        }
        let mut auth: String<{ 22 + MAX_TOKEN_LEN }> = String::new();
        // Cannot fail: the token length was checked in `new`.
        let _ = auth.push_str("Authorization: Bearer ");
        let _ = auth.push_str(self.token);
        let headers = [auth.as_str()];
        let protocols = [SUBPROTOCOL_POSTCARD];
        let options = WebSocketOptions {
            path,
            host,
            origin: "null",
            sub_protocols: Some(&protocols),
            additional_headers: Some(&headers),
        };
        self.ws = WebSocketClient::new_client(MaskRng::new(self.rng.next_u64()));
        self.rx_len = 0;
        self.tx_start = 0;
        self.tx_end = 0;
        self.transmit_idle = false;
        self.http_status = None;
        // The request is at most 1 KiB (embedded-websocket builds it in a 1 KiB string and
        // fails cleanly beyond), and the tx buffer is at least MIN_TX_BUFFER.
        match self.ws.client_connect(&options, self.tx) {
            Ok((len, key)) => {
                self.tx_end = len;
                self.link = Link::Upgrading {
                    key,
                    deadline: now.saturating_add(u64::from(self.handshake_timeout_ms)),
                };
                Ok(())
            }
            Err(_) => Err(ClientError::Config(
                "the upgrade request does not fit 1 KiB (host, path or token too long)",
            )),
        }
    }

    /// The transport could not be opened.
    pub fn handle_connect_failed(&mut self, now: u64) {
        self.link = Link::Closing {
            cause: DisconnectCause::ConnectFailed,
        };
        self.handle_closed(now);
    }

    /// A read or write failed, or the stream ended: the connection is gone. The next
    /// [`Client::poll`] says [`Io::Close`].
    pub fn handle_transport_error(&mut self) {
        if !matches!(self.link, Link::Closing { .. }) {
            let cause = match self.link {
                Link::Upgrading { .. } | Link::Connecting => DisconnectCause::ConnectFailed,
                _ => DisconnectCause::Io,
            };
            self.link = Link::Closing { cause };
        }
        self.tx_start = 0;
        self.tx_end = 0;
    }

    /// The driver closed the transport. Schedules the next attempt (backoff with full
    /// jitter from the board's RNG); during a shutdown or reboot that has nothing left to
    /// do, the event says so instead ([`AfterDisconnect::Exit`]).
    pub fn handle_closed(&mut self, now: u64) {
        let cause = match self.link {
            Link::Closing { cause } => cause,
            _ => DisconnectCause::Io,
        };
        let was_ready = self.session.is_ready();
        let random = self.rng.next_u32();
        self.session.handle_disconnected(now, cause, random);
        self.link = Link::Down;
        self.rx_len = 0;
        self.tx_start = 0;
        self.tx_end = 0;
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
        &self.tx[self.tx_start..self.tx_end]
    }

    /// `n` bytes of [`Client::pending_tx`] were written.
    pub fn tx_written(&mut self, n: usize) {
        self.tx_start = (self.tx_start + n).min(self.tx_end);
        if self.tx_start == self.tx_end {
            self.tx_start = 0;
            self.tx_end = 0;
        }
    }

    /// Where the driver reads incoming bytes to.
    pub fn rx_space(&mut self) -> &mut [u8] {
        &mut self.rx[self.rx_len..]
    }

    /// `n` bytes were read into [`Client::rx_space`]: parses the upgrade response or
    /// frames, and hands messages to the session and commands to the board.
    ///
    /// # Errors
    /// A fatal storage error while handling an acknowledgement.
    pub fn rx_filled(&mut self, now: u64, n: usize) -> Result<(), F> {
        self.rx_len = (self.rx_len + n).min(self.rx.len());
        self.session.handle_activity(now);
        loop {
            match &self.link {
                Link::Upgrading { key, .. } => {
                    let key = key.clone();
                    if !self.finish_upgrade(now, &key) {
                        break;
                    }
                }
                Link::Open => {
                    if !self.next_frame(now)? {
                        break;
                    }
                }
                // Nothing more is read once closing; bytes are dropped.
                _ => {
                    self.rx_len = 0;
                    break;
                }
            }
        }
        Ok(())
    }

    /// Returns whether more input may be parsed.
    fn finish_upgrade(&mut self, now: u64, key: &WebSocketKey) -> bool {
        match self.ws.client_accept(key, &self.rx[..self.rx_len]) {
            Ok((used, protocol)) => {
                self.consume_rx(used);
                if protocol.as_deref() != Some(SUBPROTOCOL_POSTCARD) {
                    // A hub that ignores the subprotocol would expect another encoding.
                    self.link = Link::Closing {
                        cause: DisconnectCause::Refused,
                    };
                    self.tx_start = 0;
                    self.tx_end = 0;
                    return false;
                }
                self.link = Link::Open;
                self.tx_start = 0;
                self.tx_end = 0;
                self.transmit_idle = false;
                self.session.handle_connected(now);
                self.board.on_event(&Event::Connected);
                true
            }
            Err(WsError::HttpHeaderIncomplete) if self.rx_len < self.rx.len() => false,
            Err(err) => {
                if let WsError::HttpResponseCodeInvalid(code) = err {
                    self.http_status = code;
                }
                // embedded-websocket does not hand over the Retry-After header; the
                // shared rule then waits the default (5 s) after a 503.
                let cause = match err {
                    WsError::HttpResponseCodeInvalid(Some(status)) => {
                        link::upgrade_refused(status, None)
                    }
                    _ => DisconnectCause::ConnectFailed,
                };
                self.link = Link::Closing { cause };
                self.tx_start = 0;
                self.tx_end = 0;
                self.rx_len = 0;
                false
            }
        }
    }

    fn consume_rx(&mut self, used: usize) {
        let used = used.min(self.rx_len);
        self.rx.copy_within(used..self.rx_len, 0);
        self.rx_len -= used;
    }

    /// Handles one complete frame if there is one; returns whether one was handled.
    fn next_frame(&mut self, now: u64) -> Result<bool, F> {
        let (frame_len, payload_len) = match frame_size(&self.rx[..self.rx_len]) {
            FrameSize::Incomplete if self.rx_len < self.rx.len() => return Ok(false),
            FrameSize::Incomplete => {
                self.protocol_close(close::TOO_BIG, "frame larger than the device's buffer");
                return Ok(false);
            }
            FrameSize::Complete {
                frame_len,
                payload_len,
            } => (frame_len, payload_len),
        };
        if frame_len > self.rx.len() || payload_len > MAX_RX_PAYLOAD {
            self.protocol_close(close::TOO_BIG, "frame larger than the device's buffer");
            return Ok(false);
        }
        if frame_len > self.rx_len {
            return Ok(false);
        }
        let mut payload = [0u8; MAX_RX_PAYLOAD];
        let read = self.ws.read(&self.rx[..frame_len], &mut payload);
        self.consume_rx(frame_len);
        let read = match read {
            Ok(read) => read,
            Err(_) => {
                self.protocol_close(close::PROTOCOL_ERROR, "bad websocket frame");
                return Ok(false);
            }
        };
        let payload = &payload[..read.len_to];
        match read.message_type {
            WebSocketReceiveMessageType::Binary if !read.end_of_message => {
                self.protocol_close(close::TOO_BIG, "fragmented messages are not supported");
            }
            WebSocketReceiveMessageType::Binary | WebSocketReceiveMessageType::Text => {
                let frame = if read.message_type == WebSocketReceiveMessageType::Binary {
                    DataFrame::Binary(payload)
                } else {
                    // Refused whatever it holds: this client speaks postcard only.
                    DataFrame::Text(core::str::from_utf8(payload).unwrap_or_default())
                };
                match link::decode_frame::<HubMessage>(Encoding::Postcard, frame) {
                    Ok(msg) => self.handle_message(now, msg)?,
                    Err(refused) => self.protocol_close(refused.code, refused.reason),
                }
            }
            WebSocketReceiveMessageType::Ping => {
                self.queue_frame(WebSocketSendMessageType::Pong, payload);
            }
            WebSocketReceiveMessageType::Pong => {}
            WebSocketReceiveMessageType::CloseMustReply => {
                let cause = link::peer_closed(link::close_code(payload));
                // Echo the close, then drop the transport once it is written.
                self.queue_frame(
                    WebSocketSendMessageType::CloseReply,
                    &payload[..payload.len().min(2)],
                );
                self.link = Link::Closing { cause };
            }
            WebSocketReceiveMessageType::CloseCompleted => {
                if !matches!(self.link, Link::Closing { .. }) {
                    self.link = Link::Closing {
                        cause: DisconnectCause::Io,
                    };
                }
            }
        }
        Ok(matches!(self.link, Link::Open))
    }

    fn protocol_close(&mut self, code: u16, reason: &str) {
        self.rx_len = 0;
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
            Ok(Delivered::Error(err)) => self.board.on_event(&Event::HubError {
                code: err.code,
                message: &err.message,
            }),
            Err(SessionError::Protocol(why)) => self.begin_close(
                DisconnectCause::Local(CloseReason::ProtocolViolation),
                close::PROTOCOL_VIOLATION,
                why,
            ),
            Err(SessionError::Outbox(err)) => return Err(ClientError::Storage(err)),
        }
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

    /// Queues a close frame (when the WebSocket is open) and moves to `Closing`.
    fn begin_close(&mut self, cause: DisconnectCause, code: u16, reason: &str) {
        if self.ws.state == WebSocketState::Open {
            self.compact_tx();
            let free = &mut self.tx[self.tx_end..];
            let reason = if reason.is_empty() {
                None
            } else {
                Some(reason)
            };
            if let Ok(n) = self
                .ws
                .close(WebSocketCloseStatusCode::Custom(code), reason, free)
            {
                self.tx_end += n;
            }
        }
        self.link = Link::Closing { cause };
    }

    /// Appends a control frame if there is room; a pong that does not fit is dropped (the
    /// hub counts any frame as a sign of life, and pings again).
    fn queue_frame(&mut self, kind: WebSocketSendMessageType, payload: &[u8]) {
        self.compact_tx();
        let free = &mut self.tx[self.tx_end..];
        if let Ok(n) = self.ws.write(kind, true, payload, free) {
            self.tx_end += n;
        }
    }

    fn compact_tx(&mut self) {
        if self.tx_start > 0 {
            self.tx.copy_within(self.tx_start..self.tx_end, 0);
            self.tx_end -= self.tx_start;
            self.tx_start = 0;
        }
    }

    /// Moves messages from the session into the transmit buffer. A message is only taken
    /// from the session when the buffer is empty, or has room for the largest possible
    /// message plus a control frame: once taken, it must not be lost.
    fn fill_tx(&mut self) -> Result<(), F> {
        loop {
            self.compact_tx();
            let free = self.tx.len() - self.tx_end;
            if self.tx_end > 0 && free < MAX_DEVICE_MESSAGE + FRAME_OVERHEAD + CONTROL_RESERVE {
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
                    capacity: self.tx.len(),
                })?;
            let len = bytes.len();
            let n = self
                .ws
                .write(
                    WebSocketSendMessageType::Binary,
                    true,
                    bytes,
                    &mut self.tx[self.tx_end..],
                )
                .map_err(|_| ClientError::FrameTooLarge {
                    len: len + FRAME_OVERHEAD,
                    capacity: self.tx.len(),
                })?;
            self.tx_end += n;
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
        while !readings.is_empty() && telemetry_frame_bound(&readings) > self.tx.len() {
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

/// Upper bound of the WebSocket frame that carries `readings` as one telemetry message.
fn telemetry_frame_bound(readings: &[Reading]) -> usize {
    let body: usize = readings.iter().map(|r| 1 + r.metric.len() + 10 + 8).sum();
    // variant + seq varint + count + readings, then the frame header and mask.
    1 + 10 + 1 + body + FRAME_OVERHEAD + 6
}

enum FrameSize {
    Incomplete,
    Complete {
        frame_len: usize,
        payload_len: usize,
    },
}

/// Reads just enough of a frame header to know whether the whole frame is buffered;
/// decoding is embedded-websocket's job.
fn frame_size(bytes: &[u8]) -> FrameSize {
    let [_, b1, rest @ ..] = bytes else {
        return FrameSize::Incomplete;
    };
    let mask = if b1 & 0x80 != 0 { 4 } else { 0 };
    let (payload_len, ext) = match b1 & 0x7F {
        126 => match rest {
            [a, b, ..] => (usize::from(u16::from_be_bytes([*a, *b])), 2),
            _ => return FrameSize::Incomplete,
        },
        127 => match rest.get(..8) {
            Some(b) => {
                let mut be = [0u8; 8];
                be.copy_from_slice(b);
                (
                    usize::try_from(u64::from_be_bytes(be)).unwrap_or(usize::MAX),
                    8,
                )
            }
            None => return FrameSize::Incomplete,
        },
        n => (usize::from(n), 0),
    };
    FrameSize::Complete {
        frame_len: (2 + ext + mask as usize).saturating_add(payload_len),
        payload_len,
    }
}
