//! The device side of the protocol (`schemas::session::Session`) as a stateful target:
//! random sequences of recordings, connects and disconnects, hub messages, command results,
//! state reports and time, driven the way a real driver drives it, checking after every
//! step that
//!
//! - `hello` is the first message of every connection, and nothing else goes out before
//!   `welcome` answers it;
//! - telemetry sequence numbers on one connection are consecutive and start at the oldest
//!   unacknowledged batch;
//! - nothing acknowledged is sent again;
//! - nothing unacknowledged is dropped: a batch leaves the outbox only when an `ack` (or a
//!   `welcome`) covered its number, and the outbox keeps every other recorded reading in
//!   order.
//!
//! The simulated hub follows the protocol where the device relies on it: it acknowledges
//! only numbers the device sent (its `welcome.last_seq` may be anything the device ever
//! sent, or higher than anything it will send: a device whose counter went backwards).
#![no_main]

use std::collections::HashSet;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use schemas::message::truncated;
use schemas::session::{
    Action, CloseReason, DisconnectCause, MemOutbox, Session, SessionConfig, SessionError,
};
use schemas::{
    Ack, Command, CommandClosed, DeviceMessage, ErrorMessage, HubMessage, Reading, Welcome,
};

#[derive(Arbitrary, Debug)]
enum HubLastSeq {
    /// The hub has this much less than the highest number the device ever sent.
    Behind(u8),
    /// The hub has more than the device will ever send (the device's counter went back).
    Ahead(u8),
}

#[derive(Arbitrary, Debug)]
enum Op {
    Record(u8),
    /// The driver acts on the session's timer (connect, close), after this many ms.
    Wait(u16),
    Disconnect {
        cause: u8,
        random: u32,
    },
    Welcome {
        last_seq: HubLastSeq,
        ping_ms: u16,
        pong_ms: u16,
    },
    /// Acknowledge up to the highest number sent on this connection, minus this.
    Ack(u8),
    Command {
        id: u8,
        deadline_ms: u32,
    },
    Closed(u8),
    Error,
    Finished {
        id: u8,
        ok: bool,
    },
    State(u8),
    Drain,
}

struct Model {
    session: Session<MemOutbox>,
    now: u64,
    connected: bool,
    welcomed: bool,
    /// Messages sent on this connection so far.
    sent_on_conn: usize,
    /// The last telemetry number sent on this connection.
    last_sent_seq: Option<u64>,
    /// The highest telemetry number ever sent.
    max_sent: u64,
    /// The highest number an ack or a welcome covered.
    max_acked: u64,
    next_value: u64,
}

impl Model {
    /// The outbox as (seq, first reading value) per batch, oldest first.
    fn snapshot(&self) -> Vec<(u64, Vec<u64>)> {
        self.session
            .outbox()
            .batches()
            .map(|(seq, readings)| (seq, readings.iter().map(|r| r.value as u64).collect()))
            .collect()
    }

    fn disconnect(&mut self, cause: DisconnectCause, random: u32) {
        self.session.handle_disconnected(self.now, cause, random);
        self.connected = false;
        self.welcomed = false;
    }

    fn deliver(&mut self, msg: HubMessage) -> Option<u64> {
        let covers = match &msg {
            HubMessage::Ack(a) => Some(a.up_to_seq),
            HubMessage::Welcome(w) => Some(w.last_seq),
            _ => None,
        };
        let welcome = matches!(msg, HubMessage::Welcome(_));
        match self.session.handle_message(self.now, msg) {
            Ok(_) => {
                if welcome {
                    self.welcomed = true;
                    self.last_sent_seq = None;
                }
                covers
            }
            Err(SessionError::Protocol(_)) => {
                // What a driver does: close with 4001 and reconnect later.
                self.disconnect(DisconnectCause::Local(CloseReason::ProtocolViolation), 0);
                None
            }
            Err(SessionError::Outbox(e)) => panic!("the RAM outbox failed: {e:?}"),
        }
    }

    fn drain(&mut self) {
        while let Some(msg) = self.session.poll_transmit().expect("RAM outbox") {
            assert!(self.connected, "sent {msg:?} without a connection");
            if self.sent_on_conn == 0 {
                assert!(
                    matches!(msg, DeviceMessage::Hello(_)),
                    "first message {msg:?}"
                );
            } else {
                assert!(!matches!(msg, DeviceMessage::Hello(_)), "a second hello");
                assert!(self.welcomed, "{msg:?} before welcome");
            }
            self.sent_on_conn += 1;
            if let DeviceMessage::Telemetry(t) = &msg {
                assert!(
                    t.seq > self.max_acked,
                    "batch {} sent again after an ack up to {}",
                    t.seq,
                    self.max_acked
                );
                match self.last_sent_seq {
                    Some(prev) => assert_eq!(t.seq, prev + 1, "numbers skip on one connection"),
                    None => assert_eq!(
                        t.seq,
                        self.session.outbox().batches().next().map_or(0, |(s, _)| s),
                        "the first batch of a connection is the oldest one"
                    ),
                }
                self.last_sent_seq = Some(t.seq);
                self.max_sent = self.max_sent.max(t.seq);
            }
        }
    }

    fn step(&mut self, op: Op) {
        let before = self.snapshot();
        let mut covered = None;
        match op {
            Op::Record(n) => {
                let readings: Vec<Reading> = (0..=n % 3)
                    .map(|_| {
                        self.next_value += 1;
                        Reading {
                            metric: truncated("m"),
                            ts: self.next_value,
                            value: self.next_value as f64,
                        }
                    })
                    .collect();
                self.session.record(&readings).expect("RAM outbox");
            }
            Op::Wait(ms) => {
                self.now += u64::from(ms);
                if let Some(at) = self.session.poll_timeout() {
                    if self.now >= at {
                        match self.session.handle_timeout(self.now) {
                            Some(Action::Connect) => {
                                self.session.handle_connected(self.now);
                                self.connected = true;
                                self.welcomed = false;
                                self.sent_on_conn = 0;
                                self.last_sent_seq = None;
                            }
                            Some(Action::Close(reason)) => {
                                self.disconnect(DisconnectCause::Local(reason), 0)
                            }
                            None => {}
                        }
                    }
                }
            }
            Op::Disconnect { cause, random } if self.connected => {
                let cause = match cause % 6 {
                    0 => DisconnectCause::Io,
                    1 => DisconnectCause::Closed(u16::from(cause) * 37),
                    2 => DisconnectCause::Refused,
                    3 => DisconnectCause::Unavailable {
                        retry_after_ms: u64::from(random),
                    },
                    4 => DisconnectCause::ConnectFailed,
                    _ => DisconnectCause::Closed(schemas::close::RATE_LIMITED),
                };
                self.disconnect(cause, random);
            }
            Op::Disconnect { .. } => {}
            Op::Welcome {
                last_seq,
                ping_ms,
                pong_ms,
            } if self.connected && self.sent_on_conn > 0 => {
                let outbox = self.session.outbox();
                let next = outbox.batches().last().map_or(0, |(s, _)| s + 1);
                let last_seq = match last_seq {
                    HubLastSeq::Behind(b) => self.max_sent.saturating_sub(u64::from(b)),
                    HubLastSeq::Ahead(a) => next.max(self.max_sent + 1) + u64::from(a),
                };
                covered = self.deliver(HubMessage::Welcome(Welcome {
                    server_time: 1_700_000_000_000 + self.now,
                    ping_interval_ms: u32::from(ping_ms).max(50),
                    pong_timeout_ms: u32::from(pong_ms).max(50),
                    last_seq,
                    max_readings: 64,
                    max_message_bytes: 16_384,
                }));
            }
            Op::Ack(back) if self.connected => {
                if let Some(last) = self.last_sent_seq {
                    covered = self.deliver(HubMessage::Ack(Ack {
                        up_to_seq: last.saturating_sub(u64::from(back)),
                    }));
                }
            }
            Op::Command { id, deadline_ms } if self.connected => {
                self.deliver(HubMessage::Command(Command {
                    id: u64::from(id) + 1,
                    name: truncated("led"),
                    args: truncated("{}"),
                    deadline: 1_700_000_000_000 + u64::from(deadline_ms),
                }));
            }
            Op::Closed(id) if self.connected => {
                self.deliver(HubMessage::CommandClosed(CommandClosed {
                    id: u64::from(id),
                }));
            }
            Op::Error if self.connected => {
                self.deliver(HubMessage::Error(ErrorMessage {
                    code: 4001,
                    message: truncated("x"),
                }));
            }
            Op::Finished { id, ok } => {
                self.session
                    .command_finished(u64::from(id) + 1, ok, i32::from(ok), "done")
            }
            Op::State(k) => {
                let _ = self.session.report_state(&format!("k{}", k % 4), "v");
            }
            Op::Drain
            | Op::Welcome { .. }
            | Op::Ack(_)
            | Op::Command { .. }
            | Op::Closed(_)
            | Op::Error => {}
        }
        if self.connected {
            self.drain();
        }
        if let Some(up_to) = covered {
            self.max_acked = self.max_acked.max(up_to);
        }
        self.check_nothing_dropped(&before, covered);
    }

    /// Batches leave the outbox only when covered by an ack or a welcome; every other
    /// recorded reading stays, in order.
    fn check_nothing_dropped(&self, before: &[(u64, Vec<u64>)], covered: Option<u64>) {
        let after = self.snapshot();
        let kept: Vec<u64> = after.iter().flat_map(|(_, v)| v.iter().copied()).collect();
        let kept_set: HashSet<u64> = kept.iter().copied().collect();
        for (seq, values) in before {
            if !values.iter().all(|v| kept_set.contains(v)) {
                assert!(
                    covered.is_some_and(|up_to| *seq <= up_to),
                    "batch {seq} {values:?} left the outbox without an ack covering it"
                );
            }
        }
        let before_set: HashSet<u64> = before.iter().flat_map(|(_, v)| v.iter().copied()).collect();
        let old_kept: Vec<u64> = kept
            .iter()
            .copied()
            .filter(|v| before_set.contains(v))
            .collect();
        assert!(old_kept.windows(2).all(|w| w[0] < w[1]), "order changed");
        assert!(
            kept.len() - old_kept.len() <= 3,
            "a batch appeared from nowhere"
        );
    }
}

fuzz_target!(|ops: Vec<Op>| {
    let mut config = SessionConfig::new("fuzz-1");
    config.window = 4;
    let mut model = Model {
        session: Session::new(config, MemOutbox::unbounded()),
        now: 0,
        connected: false,
        welcomed: false,
        sent_on_conn: 0,
        last_sent_seq: None,
        max_sent: 0,
        max_acked: 0,
        next_value: 0,
    };
    for op in ops.into_iter().take(512) {
        model.step(op);
    }
});
