//! The hub side of the protocol (`hub::device::session::HubSession`) as a stateful target:
//! random frames (well-formed messages and arbitrary bytes, both encodings, pings, pongs,
//! closes, read errors), timers, store and ledger outcomes, kicks and shutdown, driven the
//! way `connection.rs` drives it, checking after every step that
//!
//! - nothing goes out before `welcome`, and `welcome` goes out at most once;
//! - an `ack` never exceeds what the store reported durable, and acks never go backwards;
//! - a batch is handed to the store only above what was acknowledged, and the session
//!   does not ask to be read while a batch waits (backpressure);
//! - against a model of the ledger (commands created here and handed over in the order
//!   of their ids, created elsewhere, listed by reads, closed): commands go out in
//!   increasing id order (so each at most once per connection), only while open, and
//!   never before an older open command;
//! - a timer that is due moves on or ends the session (no busy loop for the driver);
//! - once the session has ended, nothing more is queued.
#![no_main]

use std::sync::Arc;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use hub::device::session::{
    Effect, HubSession, Inbound, ReadError, SessionParams, StartFailure, Transmit,
};
use hub::presence::CREATED_INBOX;
use libfuzzer_sys::fuzz_target;
use schemas::codec::{encode_json, encode_postcard_vec};
use schemas::message::truncated;
use schemas::{
    capability, close, Command, CommandAck, CommandResult, DeviceMessage, Encoding, Hello,
    HubMessage, Reading, State, Telemetry,
};

#[derive(Arbitrary, Debug)]
enum Frame {
    Hello { closes: bool },
    Telemetry { seq: u8, value: f64 },
    CommandAck(u8),
    CommandResult(u8),
    State,
    Raw(Vec<u8>),
    Text(String),
}

#[derive(Arbitrary, Debug)]
enum Op {
    Frame(Frame),
    Ping,
    /// The pong for the latest ping (or, if false, a pong with other bytes).
    Pong(bool),
    Close(Option<u16>),
    ReadError(u8),
    WriteError(bool),
    Advance(u16),
    Started(Option<u8>),
    TakeBatch,
    Stored {
        up_to: u8,
        failed: bool,
    },
    /// A command created here: handed over, or past the inbox a signal to read.
    Create,
    /// A command created on another node: a nudge to read.
    CreateElsewhere,
    /// The connection takes the commands handed over.
    TakeCreated,
    /// A read of the ledger (its oldest open commands, at most the window).
    Deliverable,
    /// A read of the ledger that failed (the store down); tried again later.
    ReadFailed,
    CommandsReady,
    /// The open command at this index closed by the hub (expired, cancelled); it rings.
    Closed(u8),
    /// The result of the open command at this index recorded (which rings, as `Closed`).
    ResultRecorded(u8),
    /// A result for an id the ledger does not hold open.
    ResultIgnored(u8),
    Refused,
    Kick(u8),
    Shutdown,
}

struct Model {
    session: HubSession,
    encoding: Encoding,
    t0: Instant,
    now: u64,
    started: bool,
    welcomed: bool,
    ended: bool,
    /// The store's durable watermark as reported to the session.
    durable: u64,
    last_ack: u64,
    /// The model ledger: open commands, the next id, the inbox of handed-over ones.
    open: std::collections::BTreeSet<u64>,
    next_id: u64,
    inbox: Vec<u64>,
    /// Commands sent on this connection.
    sent: std::collections::BTreeSet<u64>,
    last_ping: Option<[u8; 8]>,
    /// A `Start` effect waits for its outcome.
    starting: bool,
    /// The highest number handed to the store (or stored before the session started).
    submitted: u64,
    /// The ack sent when the waiting batch was read.
    ack_when_read: Option<u64>,
}

impl Model {
    fn instant(&self) -> Instant {
        self.t0 + Duration::from_millis(self.now)
    }

    fn message(&self, frame: Frame) -> Vec<u8> {
        let msg = match frame {
            Frame::Hello { closes } => {
                let mut capabilities = heapless::Vec::new();
                if closes {
                    let _ = capabilities.push(truncated(capability::COMMAND_CLOSED));
                }
                DeviceMessage::Hello(Hello {
                    firmware: truncated("fuzz"),
                    capabilities,
                    last_acked_seq: 0,
                })
            }
            Frame::Telemetry { seq, value } => {
                let mut readings = heapless::Vec::new();
                let _ = readings.push(Reading {
                    metric: truncated("m"),
                    ts: 1,
                    value,
                });
                DeviceMessage::Telemetry(Telemetry {
                    seq: u64::from(seq),
                    readings,
                })
            }
            Frame::CommandAck(id) => DeviceMessage::CommandAck(CommandAck { id: u64::from(id) }),
            Frame::CommandResult(id) => DeviceMessage::CommandResult(CommandResult {
                id: u64::from(id),
                ok: true,
                code: 0,
                output: truncated("ok"),
            }),
            Frame::State => DeviceMessage::State(State {
                properties: heapless::Vec::new(),
            }),
            Frame::Raw(bytes) => return bytes,
            Frame::Text(text) => return text.into_bytes(),
        };
        match self.encoding {
            Encoding::Postcard => encode_postcard_vec(&msg),
            Encoding::Json => encode_json(&msg).into_bytes(),
        }
    }

    fn step(&mut self, op: Op) {
        let now = self.instant();
        let s = &mut self.session;
        match op {
            Op::Frame(frame) => {
                if !s.wants_read() {
                    return;
                }
                let binary = matches!(frame, Frame::Raw(_));
                let bytes = self.message(frame);
                let s = &mut self.session;
                match (self.encoding, binary, std::str::from_utf8(&bytes)) {
                    (Encoding::Json, false, Ok(text)) => s.handle_frame(now, Inbound::Text(text)),
                    _ => s.handle_frame(now, Inbound::Binary(&bytes)),
                }
            }
            Op::Ping => s.handle_frame(now, Inbound::Ping),
            Op::Pong(right) => match (right, self.last_ping) {
                (true, Some(p)) => s.handle_frame(now, Inbound::Pong(&p)),
                _ => s.handle_frame(now, Inbound::Pong(b"other")),
            },
            Op::Close(code) => s.handle_frame(now, Inbound::Close(code)),
            Op::ReadError(kind) => s.handle_read_error(match kind % 6 {
                0 => ReadError::TooBig { sizes: None },
                1 => ReadError::TooBig {
                    sizes: Some((usize::from(kind) * 1000, 16_384)),
                },
                2 => ReadError::Protocol("bad".into()),
                3 => ReadError::InvalidUtf8("bad".into()),
                4 => ReadError::LengthTopBit,
                _ => ReadError::Reset,
            }),
            Op::WriteError(timed_out) => s.handle_write_error(timed_out),
            Op::Advance(ms) => {
                self.now += u64::from(ms);
                let now = self.instant();
                let s = &mut self.session;
                if let Some(at) = s.poll_timeout() {
                    if now >= at {
                        s.handle_timeout(now);
                        assert!(
                            s.end().is_some() || s.poll_timeout().is_none_or(|next| next > now),
                            "a due timer neither moved on nor ended the session"
                        );
                    }
                }
            }
            Op::Started(outcome) if self.starting => {
                self.starting = false;
                let outcome = match outcome {
                    Some(seq) => Ok(u64::from(seq)),
                    None => Err(StartFailure::Store),
                };
                if let Ok(seq) = outcome {
                    self.durable = seq;
                    self.submitted = seq;
                }
                s.handle_started(now, 1_700_000_000_000, outcome);
            }
            Op::Started(_) => {}
            Op::TakeBatch => {
                if let Some(batch) = s.take_batch() {
                    let acked = self.ack_when_read.take().unwrap_or(0);
                    assert!(
                        batch.seq > acked,
                        "batch {} waits for the store although {acked} was acknowledged",
                        batch.seq,
                    );
                    self.submitted = self.submitted.max(batch.seq);
                }
            }
            Op::Stored { up_to, failed } => {
                // The store reports more over time, and only of what it was handed.
                self.durable = self.durable.max(u64::from(up_to).min(self.submitted));
                s.handle_stored(self.durable, failed);
            }
            Op::Create => {
                let id = self.next_id;
                self.next_id += 1;
                self.open.insert(id);
                // As `Signals::command_created`.
                if self.inbox.len() < CREATED_INBOX {
                    self.inbox.push(id);
                } else {
                    s.handle_commands_ready();
                }
            }
            Op::CreateElsewhere => {
                self.open.insert(self.next_id);
                self.next_id += 1;
                s.handle_commands_ready();
            }
            Op::TakeCreated => {
                for id in self.inbox.drain(..) {
                    s.handle_command_created(command(id));
                }
            }
            Op::Deliverable => {
                // As the connection does before it reads: the read covers them.
                self.inbox.clear();
                s.handle_deliverable(self.open.iter().take(WINDOW).map(|&id| command(id)));
            }
            Op::ReadFailed => {
                // As the connection does before it reads.
                self.inbox.clear();
                s.handle_deliverable_failed(now);
            }
            Op::CommandsReady => s.handle_commands_ready(),
            Op::Closed(at) => {
                if let Some(id) = nth(&self.open, at) {
                    self.open.remove(&id);
                    s.handle_commands_ready();
                }
            }
            Op::ResultRecorded(at) => {
                if let Some(id) = nth(&self.open, at) {
                    self.open.remove(&id);
                    s.handle_result_recorded(id);
                    // The ledger rings the connection on every final state.
                    s.handle_commands_ready();
                }
            }
            Op::ResultIgnored(id) => {
                let id = u64::from(id);
                if !self.open.contains(&id) {
                    s.handle_result_ignored(id);
                }
            }
            Op::Refused => s.handle_refused("too many keys"),
            // The hub's own reasons: a newer connection, a revoked token, a rebalance.
            Op::Kick(code) => s.handle_kick(
                [close::SUPERSEDED, close::POLICY, close::GOING_AWAY][usize::from(code % 3)],
                "kicked",
            ),
            Op::Shutdown => s.handle_shutdown(now),
        }
        self.drain();
    }

    fn drain(&mut self) {
        let ended_before = self.ended;
        let mut produced = false;
        if self.session.has_batch() && self.ack_when_read.is_none() {
            self.ack_when_read = Some(self.last_ack);
        }
        if !self.session.has_batch() && self.ack_when_read.is_some() {
            // Dropped at shutdown or at the end, not taken.
            self.ack_when_read = None;
        }
        while let Some(effect) = self.session.poll_effect() {
            produced = true;
            if let Effect::Start(_) = effect {
                assert!(!self.started, "a second start");
                self.started = true;
                self.starting = true;
            }
        }
        while let Some(transmit) = self.session.poll_transmit() {
            produced = true;
            let msg = match transmit {
                Transmit::Ping(p) => {
                    assert!(self.welcomed, "a ping before welcome");
                    self.last_ping = Some(p);
                    continue;
                }
                Transmit::Message(msg) => *msg,
                Transmit::Ack(ack) => HubMessage::Ack(ack),
            };
            match msg {
                HubMessage::Welcome(_) => {
                    assert!(!self.welcomed, "a second welcome");
                    self.welcomed = true;
                }
                msg => {
                    assert!(self.welcomed, "{msg:?} before welcome");
                    match msg {
                        HubMessage::Ack(a) => {
                            assert!(a.up_to_seq <= self.durable, "ack beyond the store");
                            assert!(a.up_to_seq >= self.last_ack, "ack went backwards");
                            self.last_ack = a.up_to_seq;
                        }
                        HubMessage::Command(c) => {
                            let last = self.sent.last().copied().unwrap_or(0);
                            assert!(c.id > last, "command {} after {last}", c.id);
                            self.sent.insert(c.id);
                            assert!(self.open.contains(&c.id), "closed command {}", c.id);
                            if let Some(older) =
                                self.open.range(..c.id).find(|id| !self.sent.contains(id))
                            {
                                panic!("command {} before the older {older}", c.id);
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        assert!(
            !(ended_before && produced),
            "the session queued work after it ended"
        );
        if self.session.has_batch() {
            assert!(!self.session.wants_read(), "read while a batch waits");
        }
        if let Some(end) = self.session.end() {
            self.ended = true;
            if let Some(code) = end.code {
                assert!(
                    (1000..5000).contains(&code) && code != close::NO_STATUS,
                    "close code {code}"
                );
            }
        }
    }
}

/// The session's command window.
const WINDOW: usize = 4;

fn command(id: u64) -> Command {
    Command {
        id,
        name: truncated("led"),
        args: truncated("{}"),
        deadline: 0,
    }
}

/// The open command at `at` (modulo their number), if any is open.
fn nth(open: &std::collections::BTreeSet<u64>, at: u8) -> Option<u64> {
    let len = open.len();
    (len > 0).then(|| open.iter().nth(usize::from(at) % len).copied())?
}

fuzz_target!(|input: (bool, Vec<Op>)| {
    let (json, ops) = input;
    let encoding = if json {
        Encoding::Json
    } else {
        Encoding::Postcard
    };
    let t0 = Instant::now();
    let params = SessionParams {
        ping_interval: Duration::from_millis(1_000),
        pong_timeout: Duration::from_millis(500),
        hello_timeout: Duration::from_millis(2_000),
        max_messages_per_sec: 50,
        command_window: WINDOW,
        ack_drain: Duration::from_millis(2_000),
    };
    let session = HubSession::new(t0, Arc::from("fuzz"), encoding, params)
        .with_token_expiry(t0 + Duration::from_secs(30));
    let mut model = Model {
        session,
        encoding,
        t0,
        now: 0,
        started: false,
        welcomed: false,
        ended: false,
        durable: 0,
        last_ack: 0,
        open: Default::default(),
        next_id: 1,
        inbox: Vec::new(),
        sent: Default::default(),
        last_ping: None,
        starting: false,
        submitted: 0,
        ack_when_read: None,
    };
    for op in ops.into_iter().take(512) {
        model.step(op);
    }
});
