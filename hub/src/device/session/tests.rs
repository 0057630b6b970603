//! Unit tests of the hub session: each drives it through one situation with a virtual clock
//! and checks the frames, effects and end it produces.

use std::time::{Duration, Instant};

use schemas::codec::{encode_json, encode_postcard_vec};
use schemas::message::truncated;
use schemas::{close, CommandAck, DeviceMessage, Hello, Reading, Telemetry};

use super::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn params() -> SessionParams {
    SessionParams {
        ping_interval: ms(1000),
        pong_timeout: ms(500),
        hello_timeout: ms(300),
        max_messages_per_sec: 100,
        command_window: 2,
        ack_drain: ms(2000),
    }
}

fn hello() -> DeviceMessage {
    DeviceMessage::Hello(Hello {
        firmware: truncated("fw-1"),
        capabilities: heapless::Vec::new(),
        last_acked_seq: 0,
    })
}

fn telemetry(seq: u64) -> DeviceMessage {
    let mut readings = heapless::Vec::new();
    let _ = readings.push(Reading {
        metric: truncated("temp"),
        ts: 1,
        value: seq as f64,
    });
    DeviceMessage::Telemetry(Telemetry { seq, readings })
}

fn send(s: &mut HubSession, now: Instant, msg: &DeviceMessage) {
    let bytes = encode_postcard_vec(msg);
    s.handle_frame(now, Inbound::Binary(&bytes));
}

fn effects(s: &mut HubSession) -> Vec<Effect> {
    std::iter::from_fn(|| s.poll_effect()).collect()
}

/// What the session sends, unboxed and with acks as the messages they are, so that tests
/// match on the message (the session's [`super::Transmit`] boxes messages and keeps acks
/// apart for speed).
// Test values, compared and dropped: their size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, PartialEq)]
enum Transmit {
    Message(HubMessage),
    Ping([u8; 8]),
}

fn transmits(s: &mut HubSession) -> Vec<Transmit> {
    std::iter::from_fn(|| s.poll_transmit())
        .map(|t| match t {
            super::Transmit::Message(m) => Transmit::Message(*m),
            super::Transmit::Ack(ack) => Transmit::Message(HubMessage::Ack(ack)),
            super::Transmit::Ping(p) => Transmit::Ping(p),
        })
        .collect()
}

fn cause(s: &HubSession) -> Option<(Option<u16>, &str)> {
    s.end().map(|e| (e.code, e.cause.as_str()))
}

/// A session past `Welcome` with `last_seq` stored, its start effects drained.
fn ready(t0: Instant, last_seq: u64) -> HubSession {
    let mut s = HubSession::new(t0, Arc::from("d1"), Encoding::Postcard, params());
    send(&mut s, t0, &hello());
    assert!(matches!(effects(&mut s)[..], [Effect::Start(_)]));
    assert!(!s.wants_read(), "not read while starting");
    s.handle_started(t0, 1_700_000_000_000, Ok(last_seq));
    assert_eq!(effects(&mut s), [Effect::FetchCommands]);
    match &transmits(&mut s)[..] {
        [Transmit::Message(HubMessage::Welcome(w))] => {
            assert_eq!(w.last_seq, last_seq);
            assert_eq!(w.server_time, 1_700_000_000_000);
            assert_eq!((w.ping_interval_ms, w.pong_timeout_ms), (1000, 500));
        }
        other => panic!("expected a welcome, got {other:?}"),
    }
    assert!(s.is_ready() && s.wants_read());
    s
}

fn ack(up_to_seq: u64) -> Transmit {
    Transmit::Message(HubMessage::Ack(Ack { up_to_seq }))
}

#[test]
fn no_hello_within_the_timeout_closes_with_4004() {
    let t0 = Instant::now();
    let mut s = HubSession::new(t0, Arc::from("d1"), Encoding::Postcard, params());
    assert_eq!(s.poll_timeout(), Some(t0 + ms(300)));
    s.handle_timeout(t0 + ms(299));
    assert!(s.end().is_none());
    s.handle_timeout(t0 + ms(300));
    assert_eq!(
        cause(&s),
        Some((Some(close::HELLO_TIMEOUT), "hello_timeout"))
    );
}

#[test]
fn messages_before_hello_and_a_second_hello_are_violations() {
    let t0 = Instant::now();
    let mut s = HubSession::new(t0, Arc::from("d1"), Encoding::Postcard, params());
    send(&mut s, t0, &telemetry(1));
    assert_eq!(
        cause(&s),
        Some((Some(close::PROTOCOL_VIOLATION), "protocol:4001"))
    );
    assert_eq!(
        s.end().map(|e| e.reason.as_str()),
        Some("telemetry before hello")
    );
    let mut s = ready(t0, 0);
    send(&mut s, t0, &hello());
    assert_eq!(
        cause(&s),
        Some((Some(close::PROTOCOL_VIOLATION), "protocol:4001"))
    );
}

#[test]
fn a_start_failure_closes_with_1011_or_1001() {
    let t0 = Instant::now();
    let mut s = HubSession::new(t0, Arc::from("d1"), Encoding::Postcard, params());
    send(&mut s, t0, &hello());
    effects(&mut s);
    s.handle_started(t0, 0, Err(StartFailure::Store));
    assert_eq!(cause(&s), Some((Some(close::INTERNAL), "store_failure")));
    assert!(transmits(&mut s).is_empty(), "no welcome");
    let mut s = HubSession::new(t0, Arc::from("d1"), Encoding::Postcard, params());
    send(&mut s, t0, &hello());
    s.handle_started(t0, 0, Err(StartFailure::ShuttingDown));
    assert_eq!(cause(&s), Some((Some(close::GOING_AWAY), "shutdown")));
}

#[test]
fn a_batch_waits_for_the_store_and_is_acked_once_durable() {
    let t0 = Instant::now();
    let mut s = ready(t0, 4);
    send(&mut s, t0, &telemetry(5));
    assert!(s.has_batch() && !s.wants_read(), "backpressure until taken");
    let batch = s.take_batch().expect("batch");
    assert_eq!((batch.seq, batch.readings.len()), (5, 1));
    assert!(s.wants_read());
    assert!(transmits(&mut s).is_empty(), "no ack before the commit");
    s.handle_stored(5, false);
    assert_eq!(transmits(&mut s), [ack(5)]);
    // The same watermark again sends nothing.
    s.handle_stored(5, false);
    assert!(transmits(&mut s).is_empty());
}

#[test]
fn a_resent_batch_is_acked_again_without_the_store() {
    let t0 = Instant::now();
    let mut s = ready(t0, 7);
    send(&mut s, t0, &telemetry(6));
    assert!(!s.has_batch());
    assert_eq!(transmits(&mut s), [ack(7)]);
}

#[test]
fn a_store_failure_closes_with_1011() {
    let t0 = Instant::now();
    let mut s = ready(t0, 0);
    send(&mut s, t0, &telemetry(1));
    s.take_batch();
    s.handle_stored(0, true);
    assert_eq!(cause(&s), Some((Some(close::INTERNAL), "store_failure")));
    assert!(transmits(&mut s).is_empty(), "nothing acknowledged");
}

#[test]
fn pings_measure_rtt_and_silence_ends_the_session() {
    let t0 = Instant::now();
    let mut s = ready(t0, 0);
    assert_eq!(s.poll_timeout(), Some(t0 + ms(1000)));
    s.handle_timeout(t0 + ms(1000));
    let [Transmit::Ping(payload)] = transmits(&mut s)[..] else {
        panic!("ping expected")
    };
    s.handle_frame(t0 + ms(1020), Inbound::Pong(&payload));
    assert_eq!(effects(&mut s), [Effect::Rtt(ms(20))]);
    // Frozen from here on: the next ping at 2000, dead at 2500.
    s.handle_timeout(t0 + ms(2000));
    assert!(matches!(transmits(&mut s)[..], [Transmit::Ping(_)]));
    s.handle_timeout(t0 + ms(2499));
    assert!(s.end().is_none());
    s.handle_timeout(t0 + ms(2500));
    assert_eq!(
        cause(&s),
        Some((Some(close::LIVENESS_TIMEOUT), "pong_timeout"))
    );
}

#[test]
fn a_device_that_sends_but_never_answers_pings_is_gone() {
    let t0 = Instant::now();
    let mut s = ready(t0, 0);
    s.handle_timeout(t0 + ms(1000));
    let [Transmit::Ping(payload)] = transmits(&mut s)[..] else {
        panic!("ping expected")
    };
    // The device keeps writing (state reports, its own pings, an unsolicited pong) but
    // never reads, so the hub's ping is never answered.
    for t in (1000..1500).step_by(50) {
        let now = t0 + ms(t);
        send(
            &mut s,
            now,
            &DeviceMessage::State(schemas::State {
                properties: heapless::Vec::new(),
            }),
        );
        s.handle_frame(now, Inbound::Ping);
        s.handle_frame(now, Inbound::Pong(b"unsolicited"));
        s.handle_timeout(now);
    }
    assert!(s.end().is_none());
    s.handle_timeout(t0 + ms(1500));
    assert_eq!(
        cause(&s),
        Some((Some(close::LIVENESS_TIMEOUT), "pong_timeout"))
    );
    // The same device answering the ping stays.
    let mut s = ready(t0, 0);
    s.handle_timeout(t0 + ms(1000));
    transmits(&mut s);
    s.handle_frame(t0 + ms(1400), Inbound::Pong(&payload));
    s.handle_timeout(t0 + ms(1500));
    assert!(s.end().is_none());
}

#[test]
fn an_expiring_token_closes_with_1008_at_its_expiry() {
    let t0 = Instant::now();
    let mut s = ready(t0, 0).with_token_expiry(t0 + ms(2200));
    // Pings and pongs go on until then.
    s.handle_timeout(t0 + ms(1000));
    let [Transmit::Ping(p)] = transmits(&mut s)[..] else {
        panic!("ping expected")
    };
    s.handle_frame(t0 + ms(1010), Inbound::Pong(&p));
    s.handle_timeout(t0 + ms(2000));
    transmits(&mut s);
    assert_eq!(s.poll_timeout(), Some(t0 + ms(2200)));
    s.handle_timeout(t0 + ms(2199));
    assert!(s.end().is_none());
    s.handle_timeout(t0 + ms(2200));
    assert_eq!(cause(&s), Some((Some(close::POLICY), "token_expired")));
    assert_eq!(s.end().map(|e| e.reason.as_str()), Some("token expired"));
    // Before hello too, when the token expires before the hello deadline.
    let s = HubSession::new(t0, Arc::from("d1"), Encoding::Postcard, params());
    let mut s = s.with_token_expiry(t0 + ms(100));
    assert_eq!(s.poll_timeout(), Some(t0 + ms(100)));
    s.handle_timeout(t0 + ms(100));
    assert_eq!(cause(&s), Some((Some(close::POLICY), "token_expired")));
}

#[test]
fn silence_during_backpressure_is_not_the_devices() {
    let t0 = Instant::now();
    let mut s = ready(t0, 0);
    send(&mut s, t0, &telemetry(1));
    s.handle_timeout(t0 + ms(1000));
    transmits(&mut s);
    // The batch still waits for the ingest queue, so the hub reads nothing.
    s.handle_timeout(t0 + ms(1600));
    s.handle_timeout(t0 + ms(2100));
    assert!(s.end().is_none(), "{:?}", s.end());
}

#[test]
fn the_rate_limit_closes_with_its_own_code_not_the_tokens() {
    let t0 = Instant::now();
    let mut s = ready(t0, 0);
    // A burst of twice the rate is allowed, then the device is over it.
    for id in 0..200 {
        send(
            &mut s,
            t0,
            &DeviceMessage::CommandAck(CommandAck { id: id + 1 }),
        );
    }
    assert!(s.end().is_none());
    send(
        &mut s,
        t0,
        &DeviceMessage::CommandAck(CommandAck { id: 999 }),
    );
    assert_eq!(cause(&s), Some((Some(close::RATE_LIMITED), "rate_limit")));
}

#[test]
fn bad_frames_get_the_close_code_that_says_why() {
    let t0 = Instant::now();
    let mut s = ready(t0, 0);
    s.handle_frame(t0, Inbound::Text("{}"));
    assert_eq!(
        cause(&s),
        Some((Some(close::UNSUPPORTED_DATA), "protocol:1003"))
    );
    let mut s = ready(t0, 0);
    s.handle_frame(t0, Inbound::Binary(&[9]));
    assert_eq!(
        cause(&s),
        Some((Some(close::UNKNOWN_MESSAGE), "protocol:4002"))
    );
    let mut s = ready(t0, 0);
    s.handle_frame(t0, Inbound::Binary(&[1]));
    assert_eq!(
        cause(&s),
        Some((Some(close::INVALID_PAYLOAD), "protocol:1007"))
    );
    let mut s = ready(t0, 0);
    send(&mut s, t0, &telemetry(0));
    assert_eq!(
        cause(&s),
        Some((Some(close::INVALID_PAYLOAD), "protocol:1007"))
    );
    let mut s = HubSession::new(t0, Arc::from("d1"), Encoding::Json, params());
    s.handle_frame(t0, Inbound::Text(&encode_json(&hello())));
    assert!(matches!(effects(&mut s)[..], [Effect::Start(_)]));
    let mut s = HubSession::new(t0, Arc::from("d1"), Encoding::Json, params());
    s.handle_frame(t0, Inbound::Binary(&[0]));
    assert_eq!(
        cause(&s),
        Some((Some(close::UNSUPPORTED_DATA), "protocol:1003"))
    );
    let mut s = ready(t0, 0);
    s.handle_read_error(ReadError::TooBig {
        sizes: Some((20_000, 16_384)),
    });
    assert_eq!(cause(&s), Some((Some(close::TOO_BIG), "protocol:1009")));
    // Text that is not UTF-8 (a text message, or a close frame's reason), before hello too.
    let mut s = HubSession::new(t0, Arc::from("d1"), Encoding::Json, params());
    s.handle_read_error(ReadError::InvalidUtf8("invalid byte 0xff".into()));
    assert_eq!(
        cause(&s),
        Some((Some(close::INVALID_PAYLOAD), "protocol:1007"))
    );
    // A length of 2^63 or more is broken framing, not a big message.
    let mut s = ready(t0, 0);
    s.handle_read_error(ReadError::LengthTopBit);
    assert_eq!(
        cause(&s),
        Some((Some(close::PROTOCOL_ERROR), "protocol:1002"))
    );
}

#[test]
fn the_devices_close_ends_without_a_close_of_ours() {
    let t0 = Instant::now();
    let mut s = ready(t0, 0);
    s.handle_frame(t0, Inbound::Close(Some(1000)));
    assert_eq!(cause(&s), Some((None, "closed:1000")));
}

fn command(id: u64) -> Command {
    Command {
        id,
        name: truncated("led"),
        args: truncated("{}"),
        deadline: 0,
    }
}

#[test]
fn commands_go_out_once_per_connection_within_the_window_and_are_recorded_first() {
    let t0 = Instant::now();
    let mut s = ready(t0, 0);
    s.handle_deliverable([command(3), command(4), command(5)]);
    assert_eq!(
        effects(&mut s),
        [Effect::CommandSent(3), Effect::CommandSent(4)]
    );
    assert_eq!(
        transmits(&mut s),
        [
            Transmit::Message(HubMessage::Command(command(3))),
            Transmit::Message(HubMessage::Command(command(4)))
        ]
    );
    s.handle_commands_ready();
    s.handle_commands_ready();
    assert_eq!(effects(&mut s), [Effect::FetchCommands], "coalesced");
    // 3 finished; the ledger's window now holds 4 and 5: only 5 is new.
    s.handle_deliverable([command(4), command(5)]);
    assert_eq!(effects(&mut s), [Effect::CommandSent(5)]);
    assert_eq!(transmits(&mut s).len(), 1);
}

/// The commands among `transmits`, by id.
fn sent_ids(s: &mut HubSession) -> Vec<u64> {
    transmits(s)
        .into_iter()
        .filter_map(|t| match t {
            Transmit::Message(HubMessage::Command(c)) => Some(c.id),
            _ => None,
        })
        .collect()
}

#[test]
fn a_command_handed_over_at_creation_goes_out_without_a_read_once_the_ledger_was_read() {
    let t0 = Instant::now();
    let mut s = ready(t0, 0);
    // Before the first read of the ledger has answered, a handed-over command asks for a
    // read rather than go out.
    s.handle_command_created(command(7));
    assert_eq!(effects(&mut s), [Effect::FetchCommands]);
    s.handle_deliverable([command(7)]);
    assert_eq!(effects(&mut s), [Effect::CommandSent(7)]);
    assert_eq!(sent_ids(&mut s), [7]);
    // The ledger had nothing else: the next one goes out as it is handed over.
    s.handle_command_created(command(8));
    assert_eq!(effects(&mut s), [Effect::CommandSent(8)]);
    assert_eq!(sent_ids(&mut s), [8]);
    // Handed over again (a read listed it first): not sent twice.
    s.handle_command_created(command(8));
    assert_eq!(effects(&mut s), []);
    assert_eq!(sent_ids(&mut s), Vec::<u64>::new());
}

#[test]
fn a_handed_over_command_never_overtakes_one_the_ledger_holds() {
    let t0 = Instant::now();
    let mut s = ready(t0, 0);
    s.handle_deliverable([]);
    // Another node created 8 (a nudge), then 9 was created here.
    s.handle_commands_ready();
    s.handle_command_created(command(9));
    assert_eq!(
        effects(&mut s),
        [Effect::FetchCommands],
        "one read for both"
    );
    assert_eq!(sent_ids(&mut s), Vec::<u64>::new());
    s.handle_deliverable([command(8), command(9)]);
    assert_eq!(sent_ids(&mut s), [8, 9]);
    // A late hand-over of one that went out (and finished) is not sent again.
    s.handle_result_recorded(8);
    s.handle_command_created(command(8));
    assert_eq!(sent_ids(&mut s), Vec::<u64>::new());
    assert_eq!(
        effects(&mut s),
        [Effect::CommandSent(8), Effect::CommandSent(9)]
    );
}

/// Advances the session to `now` and answers its ping, if it sent one; returns its effects
/// but the RTT that answer records.
fn tick_answering_pings(s: &mut HubSession, now: Instant) -> Vec<Effect> {
    s.handle_timeout(now);
    for t in transmits(s) {
        if let Transmit::Ping(p) = t {
            s.handle_frame(now, Inbound::Pong(&p));
        }
    }
    effects(s)
        .into_iter()
        .filter(|e| !matches!(e, Effect::Rtt(_)))
        .collect()
}

#[test]
fn a_failed_read_of_the_ledger_is_tried_again_later_and_longer_while_it_fails() {
    let t0 = Instant::now();
    let mut s = ready(t0, 0);
    s.handle_deliverable_failed(t0);
    assert_eq!(s.poll_timeout(), Some(t0 + ms(1000)));
    assert_eq!(
        tick_answering_pings(&mut s, t0 + ms(1000)),
        [Effect::FetchCommands]
    );
    // Failed again: the next try is 2 s later, not at the next ping.
    s.handle_deliverable_failed(t0 + ms(1000));
    assert_eq!(tick_answering_pings(&mut s, t0 + ms(2000)), []);
    assert_eq!(
        tick_answering_pings(&mut s, t0 + ms(3000)),
        [Effect::FetchCommands]
    );
    // A read that works ends it, and the commands go out.
    s.handle_deliverable([command(4)]);
    assert_eq!(effects(&mut s), [Effect::CommandSent(4)]);
    assert_eq!(s.poll_timeout(), Some(t0 + ms(4000)), "the next ping only");
    assert!(s.end().is_none());
}

#[test]
fn handed_over_commands_respect_the_window_and_closed_ones_free_it() {
    let t0 = Instant::now();
    let mut s = ready(t0, 0);
    s.handle_deliverable([]);
    s.handle_command_created(command(1));
    s.handle_command_created(command(2));
    assert_eq!(sent_ids(&mut s), [1, 2]);
    effects(&mut s);
    // The window (2) is full: 3 waits in the ledger.
    s.handle_command_created(command(3));
    assert_eq!(effects(&mut s), [Effect::FetchCommands]);
    s.handle_deliverable([command(1), command(2)]);
    assert_eq!(sent_ids(&mut s), Vec::<u64>::new());
    // 1 finishes here: the read that follows sends 3.
    s.handle_result_recorded(1);
    s.handle_commands_ready();
    assert_eq!(effects(&mut s), [Effect::FetchCommands]);
    s.handle_deliverable([command(2), command(3)]);
    assert_eq!(sent_ids(&mut s), [3]);
    effects(&mut s);
    // 2 and 3 expire in the hub: a read that lists neither frees their slots, and the
    // next hand-over goes out at once.
    s.handle_commands_ready();
    assert_eq!(effects(&mut s), [Effect::FetchCommands]);
    s.handle_deliverable([]);
    s.handle_command_created(command(4));
    s.handle_command_created(command(5));
    assert_eq!(sent_ids(&mut s), [4, 5]);
}

#[test]
fn acks_results_and_state_become_effects_and_refusals_are_reported() {
    let t0 = Instant::now();
    let mut s = ready(t0, 0);
    send(&mut s, t0, &DeviceMessage::CommandAck(CommandAck { id: 3 }));
    let result = CommandResult {
        id: 3,
        ok: true,
        code: 0,
        output: truncated("on"),
    };
    send(&mut s, t0, &DeviceMessage::CommandResult(result.clone()));
    assert_eq!(
        effects(&mut s),
        [
            Effect::CommandAcked(3),
            Effect::CommandFinished(Box::new(result))
        ]
    );
    s.handle_result_ignored(3);
    s.handle_refused("too many keys");
    let out = transmits(&mut s);
    assert!(matches!(&out[..], [
        Transmit::Message(HubMessage::Error(a)),
        Transmit::Message(HubMessage::Error(b)),
    ] if a.code == close::PROTOCOL_VIOLATION && a.message.contains("command 3")
        && b.code == close::POLICY && b.message == "too many keys"));
    assert!(s.end().is_none());
}

#[test]
fn shutdown_waits_for_outstanding_acks_then_closes_with_1001() {
    let t0 = Instant::now();
    let mut s = ready(t0, 0);
    send(&mut s, t0, &telemetry(1));
    s.take_batch();
    send(&mut s, t0, &telemetry(2));
    s.handle_shutdown(t0);
    assert!(
        !s.wants_read() && !s.has_batch(),
        "the unsubmitted batch is dropped"
    );
    assert!(s.end().is_none(), "waits for batch 1");
    s.handle_stored(1, false);
    assert_eq!(transmits(&mut s), [ack(1)]);
    assert_eq!(cause(&s), Some((Some(close::GOING_AWAY), "shutdown")));
    // Without the store's answer the drain ends at its deadline.
    let mut s = ready(t0, 0);
    send(&mut s, t0, &telemetry(1));
    s.take_batch();
    s.handle_shutdown(t0);
    assert_eq!(s.poll_timeout(), Some(t0 + ms(2000)));
    s.handle_timeout(t0 + ms(2000));
    assert_eq!(cause(&s), Some((Some(close::GOING_AWAY), "shutdown")));
    assert!(transmits(&mut s).is_empty());
}

#[test]
fn a_kick_closes_with_its_code() {
    let t0 = Instant::now();
    let mut s = ready(t0, 0);
    s.handle_kick(close::SUPERSEDED, "superseded by a newer connection");
    assert_eq!(cause(&s), Some((Some(close::SUPERSEDED), "superseded")));
    let mut s = ready(t0, 0);
    s.handle_kick(close::POLICY, "token revoked");
    assert_eq!(cause(&s), Some((Some(close::POLICY), "token_revoked")));
    let mut s = ready(t0, 0);
    s.handle_kick(close::RECONNECT, "moving to another node");
    assert_eq!(cause(&s), Some((Some(close::RECONNECT), "handed_over")));
}

#[test]
fn a_device_that_understands_it_is_told_when_a_command_is_closed() {
    let t0 = Instant::now();
    let mut caps = heapless::Vec::new();
    let _ = caps.push(truncated(schemas::capability::COMMAND_CLOSED));
    let hello_closes = DeviceMessage::Hello(Hello {
        firmware: truncated("fw-2"),
        capabilities: caps,
        last_acked_seq: 0,
    });
    let mut s = HubSession::new(t0, Arc::from("d1"), Encoding::Postcard, params());
    send(&mut s, t0, &hello_closes);
    effects(&mut s);
    s.handle_started(t0, 0, Ok(0));
    effects(&mut s);
    let start = transmits(&mut s);
    assert!(
        matches!(
            &start[..],
            [
                Transmit::Message(HubMessage::Welcome(_)),
                Transmit::Message(HubMessage::CommandClosed(CommandClosed { id: 0 })),
            ]
        ),
        "the hub says it confirms results before any command: {start:?}"
    );
    s.handle_result_recorded(3);
    s.handle_result_ignored(4);
    let out = transmits(&mut s);
    assert!(
        matches!(&out[..], [
            Transmit::Message(HubMessage::CommandClosed(a)),
            Transmit::Message(HubMessage::Error(_)),
            Transmit::Message(HubMessage::CommandClosed(b)),
        ] if a.id == 3 && b.id == 4),
        "{out:?}"
    );
    // A device that did not announce the capability never gets the new message type.
    let mut s = ready(t0, 0);
    s.handle_result_recorded(3);
    assert!(transmits(&mut s).is_empty());
}

/// A session of a device that announced `desired`, just started: its effects (the reads
/// the start asks for) are not taken yet.
fn started_with_desired(t0: Instant) -> HubSession {
    let mut caps = heapless::Vec::new();
    let _ = caps.push(truncated(schemas::capability::DESIRED));
    let mut s = HubSession::new(t0, Arc::from("d1"), Encoding::Postcard, params());
    send(
        &mut s,
        t0,
        &DeviceMessage::Hello(Hello {
            firmware: truncated("fw-2"),
            capabilities: caps,
            last_acked_seq: 0,
        }),
    );
    effects(&mut s);
    s.handle_started(t0, 0, Ok(0));
    s
}

#[test]
fn a_failed_read_of_the_desired_state_is_tried_again_in_full() {
    let t0 = Instant::now();
    let mut s = started_with_desired(t0);
    assert_eq!(
        effects(&mut s),
        [Effect::FetchDesired { full: true }, Effect::FetchCommands]
    );
    transmits(&mut s);
    s.handle_deliverable([]);
    // The full read at the start failed; a change read (not full) fails too.
    s.handle_desired_failed(t0, true);
    s.handle_desired_failed(t0, false);
    assert_eq!(tick_answering_pings(&mut s, t0 + ms(1000)), []);
    // Second failure in a row: 2 s. The retry is a full read.
    assert_eq!(
        tick_answering_pings(&mut s, t0 + ms(2000)),
        [Effect::FetchDesired { full: true }]
    );
    s.handle_desired_read();
    assert_eq!(s.poll_timeout(), Some(t0 + ms(3000)), "the next ping only");
    assert!(s.end().is_none());
}

#[test]
fn desired_state_comes_right_after_welcome_in_chunks_and_applied_is_stored() {
    let t0 = Instant::now();
    let mut s = started_with_desired(t0);
    // The whole desired document is fetched before anything else the device waits for.
    assert_eq!(
        effects(&mut s),
        [Effect::FetchDesired { full: true }, Effect::FetchCommands]
    );
    let keys: Vec<(String, String)> = (0..20).map(|i| (format!("k{i}"), i.to_string())).collect();
    s.handle_desired(3, &keys);
    let out = transmits(&mut s);
    let desired: Vec<&Desired> = out
        .iter()
        .filter_map(|t| match t {
            Transmit::Message(HubMessage::Desired(d)) => Some(d),
            _ => None,
        })
        .collect();
    assert!(matches!(out[0], Transmit::Message(HubMessage::Welcome(_))));
    assert_eq!(desired.len(), 2, "16 keys, then 4");
    assert_eq!(
        (
            desired[0].properties.len(),
            desired[0].last,
            desired[0].version
        ),
        (16, false, 3)
    );
    assert_eq!((desired[1].properties.len(), desired[1].last), (4, true));
    // A change while connected asks for the delta, once however often it is signalled.
    s.handle_desired_changed();
    s.handle_desired_changed();
    assert_eq!(effects(&mut s), [Effect::FetchDesired { full: false }]);
    // The device's answer becomes an effect.
    let applied = Applied {
        version: 3,
        properties: heapless::Vec::new(),
        refused: heapless::Vec::new(),
    };
    send(&mut s, t0, &DeviceMessage::Applied(applied.clone()));
    assert_eq!(effects(&mut s), [Effect::StoreApplied(Box::new(applied))]);
    // A device without the capability never hears of desired state.
    let mut s = ready(t0, 0);
    s.handle_desired_changed();
    s.handle_desired(1, &keys);
    assert!(effects(&mut s).is_empty() && transmits(&mut s).is_empty());
}

#[test]
fn the_next_chunks_length_is_what_the_read_will_return_and_nothing_is_read_ahead() {
    let t0 = Instant::now();
    let mut s = HubSession::new(t0, Arc::from("d1"), Encoding::Postcard, params());
    let mut capabilities = heapless::Vec::new();
    let _ = capabilities.push(truncated(schemas::capability::FIRMWARE));
    send(
        &mut s,
        t0,
        &DeviceMessage::Hello(Hello {
            firmware: truncated("fw-1"),
            capabilities,
            last_acked_seq: 0,
        }),
    );
    effects(&mut s);
    s.handle_started(t0, 1_700_000_000_000, Ok(0));
    assert!(effects(&mut s).contains(&Effect::FetchOffer));
    transmits(&mut s);
    // A 10,000-byte image: two whole chunks and a short last one.
    s.handle_offer(Some(FirmwareOffer {
        version: truncated("fw-2"),
        size: 10_000,
        sha256: truncated(&"0".repeat(64)),
        signature: truncated(&"0".repeat(128)),
    }));
    transmits(&mut s);
    assert_eq!(s.next_chunk_len(), None, "no request yet");
    let request = |offset, len| {
        DeviceMessage::FirmwareRequest(FirmwareRequest {
            version: truncated("fw-2"),
            offset,
            len,
        })
    };
    send(&mut s, t0, &request(8192, 4096));
    send(&mut s, t0, &request(0, 1000));
    // The oldest request first, cut at the end of the image.
    assert_eq!(s.next_chunk_len(), Some(10_000 - 8192));
    assert!(s.has_chunk_due());
    // While the driver waits for the cap, an ack goes out and nothing is read.
    send(&mut s, t0, &telemetry(1));
    let batch = s.take_batch().expect("a batch");
    assert_eq!(batch.seq, 1);
    s.handle_stored(1, false);
    assert!(!s.has_chunk_due(), "the ack goes first");
    assert_eq!(transmits(&mut s), [ack(1)]);
    assert!(effects(&mut s).is_empty(), "no chunk read ahead");
    s.handle_chunk_due();
    match &effects(&mut s)[..] {
        [Effect::ReadChunk(r)] => assert_eq!((r.offset, r.len), (8192, 4096)),
        other => panic!("expected one chunk read, got {other:?}"),
    }
    assert_eq!(s.next_chunk_len(), Some(1000));
}
