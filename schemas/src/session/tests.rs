//! Unit tests of the device session: each drives it through one situation with plain
//! numbers for time and checks what it sends and what it hands to the application.

extern crate std;

use super::*;
use crate::message::Ack;

type TestOutbox = MemOutbox;

fn outbox(cap: usize) -> TestOutbox {
    MemOutbox::with_capacity(cap)
}

fn reading(v: f64) -> Reading {
    Reading {
        metric: truncated("m"),
        ts: 1,
        value: v,
    }
}

fn welcome(last_seq: u64) -> HubMessage {
    HubMessage::Welcome(Welcome {
        server_time: 1_000_000,
        ping_interval_ms: 1000,
        pong_timeout_ms: 500,
        last_seq,
        max_readings: 64,
        max_message_bytes: 16384,
    })
}

fn drain<const R: usize, const S: usize>(
    s: &mut Session<TestOutbox, R, S>,
) -> std::vec::Vec<DeviceMessage> {
    let mut out = std::vec::Vec::new();
    while let Some(m) = s.poll_transmit().expect("outbox") {
        out.push(m);
    }
    out
}

fn connect<const R: usize, const S: usize>(
    s: &mut Session<TestOutbox, R, S>,
    now: u64,
    hub_last: u64,
) {
    assert_eq!(s.handle_timeout(now), Some(Action::Connect));
    s.handle_connected(now);
    let hello = drain(s);
    assert!(matches!(hello.as_slice(), [DeviceMessage::Hello(_)]));
    assert!(matches!(
        s.handle_message(now, welcome(hub_last)),
        Ok(Delivered::Welcome(_))
    ));
}

fn seqs(msgs: &[DeviceMessage]) -> std::vec::Vec<u64> {
    msgs.iter()
        .filter_map(|m| match m {
            DeviceMessage::Telemetry(t) => Some(t.seq),
            _ => None,
        })
        .collect()
}

#[test]
fn resends_unacked_after_reconnect_and_respects_window() {
    let mut config = SessionConfig::new("t");
    config.window = 2;
    let mut s = Session::new(config, outbox(16));
    for i in 0..3 {
        s.record(&[reading(i as f64)]).expect("record");
    }
    connect(&mut s, 0, 0);
    assert_eq!(seqs(&drain(&mut s)), [1, 2]);
    s.handle_message(1, HubMessage::Ack(Ack { up_to_seq: 1 }))
        .expect("ack");
    assert_eq!(seqs(&drain(&mut s)), [3]);
    // The connection drops with 2 and 3 unacknowledged.
    s.handle_disconnected(2, DisconnectCause::Io, 0);
    assert_eq!(s.poll_timeout(), Some(2));
    // The hub had stored 2 before the connection dropped: only 3 is re-sent.
    connect(&mut s, 3, 2);
    assert_eq!(seqs(&drain(&mut s)), [3]);
    s.handle_message(4, HubMessage::Ack(Ack { up_to_seq: 3 }))
        .expect("ack");
    assert_eq!(s.outbox().len(), 0);
    assert_eq!(s.record(&[reading(9.0)]).expect("record").0, 4);
}

#[test]
fn counter_reset_is_renumbered_after_the_hubs_last_seq() {
    let mut s = Session::new(SessionConfig::new("t"), outbox(16));
    s.record(&[reading(1.0)]).expect("record");
    s.record(&[reading(2.0)]).expect("record");
    // The hub has stored up to 10 from this device's previous life.
    connect(&mut s, 0, 10);
    assert_eq!(seqs(&drain(&mut s)), [11, 12]);
}

#[test]
fn commands_are_deduplicated_and_results_repeated() {
    let mut s = Session::new(SessionConfig::new("t"), outbox(4));
    connect(&mut s, 0, 0);
    let cmd = Command {
        id: 7,
        name: truncated("led"),
        args: truncated("{}"),
        deadline: 0,
    };
    let first = s
        .handle_message(1, HubMessage::Command(cmd.clone()))
        .expect("cmd");
    assert_eq!(first, Delivered::Command(cmd.clone()));
    assert_eq!(
        drain(&mut s),
        [DeviceMessage::CommandAck(CommandAck { id: 7 })]
    );
    s.command_finished(7, true, 0, "on");
    let out = drain(&mut s);
    assert!(matches!(&out[..], [DeviceMessage::CommandResult(r)] if r.ok && r.output == "on"));
    let again = s.handle_message(2, HubMessage::Command(cmd)).expect("cmd");
    assert_eq!(again, Delivered::Nothing);
    let out = drain(&mut s);
    assert!(
        matches!(&out[..], [DeviceMessage::CommandAck(_), DeviceMessage::CommandResult(r)] if r.ok)
    );
}

#[test]
fn silent_hub_is_detected_and_backoff_is_bounded() {
    let mut s = Session::new(SessionConfig::new("t"), outbox(4));
    connect(&mut s, 0, 0);
    // ping 1000 + pong 500 + grace 1000.
    assert_eq!(s.poll_timeout(), Some(2500));
    s.handle_activity(2000);
    assert_eq!(s.handle_timeout(2600), None);
    assert_eq!(
        s.handle_timeout(4500),
        Some(Action::Close(CloseReason::HubSilent))
    );
    s.handle_disconnected(
        4500,
        DisconnectCause::Local(CloseReason::HubSilent),
        u32::MAX,
    );
    // First retry waits at most backoff_initial_ms.
    let first = s.poll_timeout().expect("retry") - 4500;
    assert!(first <= 500, "{first}");
    // Many failures later the wait is capped by backoff_max_ms.
    for _ in 0..40 {
        let at = s.poll_timeout().expect("retry");
        assert_eq!(s.handle_timeout(at), Some(Action::Connect));
        s.handle_disconnected(at, DisconnectCause::ConnectFailed, u32::MAX);
    }
    let at = s.poll_timeout().expect("retry");
    s.handle_timeout(at);
    s.handle_disconnected(at, DisconnectCause::ConnectFailed, u32::MAX);
    assert!(s.poll_timeout().expect("retry") - at <= 60_000);
    // A busy hub's Retry-After is honoured, with jitter on top.
    let at = s.poll_timeout().expect("retry");
    s.handle_timeout(at);
    s.handle_disconnected(
        at,
        DisconnectCause::Unavailable {
            retry_after_ms: 30_000,
        },
        7,
    );
    let wait = s.poll_timeout().expect("retry") - at;
    assert!((30_000..=90_000).contains(&wait), "{wait}");
    // A refused token is retried slowly.
    let at = s.poll_timeout().expect("retry");
    s.handle_timeout(at);
    s.handle_disconnected(at, DisconnectCause::Refused, 0);
    assert!(s.poll_timeout().expect("retry") - at >= 60_000);
}

#[test]
fn reconnect_close_comes_back_within_a_second_and_is_not_a_failure() {
    let mut s = Session::new(SessionConfig::new("t"), outbox(4));
    connect(&mut s, 0, 0);
    let mut at = 1_000;
    for random in [0, 7, 999, 1000, u32::MAX] {
        s.handle_disconnected(at, DisconnectCause::Closed(close::RECONNECT), random);
        let retry = s.poll_timeout().expect("retry");
        assert_eq!(retry - at, u64::from(random) % (RECONNECT_SPREAD_MS + 1));
        assert_eq!(s.handle_timeout(retry), Some(Action::Connect));
        at = retry + 1;
    }
    // Five moves did not count as failures: the next failure waits no longer than the
    // first step of the backoff (it would be up to 16 s after five failures).
    s.handle_disconnected(at, DisconnectCause::ConnectFailed, u32::MAX);
    let wait = s.poll_timeout().expect("retry") - at;
    assert!(wait <= 500, "{wait}");
}

#[test]
fn full_outbox_drops_oldest_and_counts_it() {
    let mut s = Session::new(SessionConfig::new("t"), outbox(2));
    for i in 0..5 {
        s.record(&[reading(i as f64), reading(0.0)])
            .expect("record");
    }
    assert_eq!(s.stats().readings_dropped, 6);
    connect(&mut s, 0, 0);
    assert_eq!(seqs(&drain(&mut s)), [4, 5]);
}

#[test]
fn welcome_out_of_order_is_a_protocol_error() {
    let mut s = Session::new(SessionConfig::new("t"), outbox(2));
    connect(&mut s, 0, 0);
    assert!(matches!(
        s.handle_message(1, welcome(0)),
        Err(SessionError::Protocol(_))
    ));
}

#[test]
fn reported_state_waits_for_a_session_and_newer_values_win() {
    let mut s: Session<_, REPLY_QUEUE, { crate::limits::MAX_PROPERTIES }> =
        Session::with_reply_capacity(SessionConfig::new("t"), outbox(4));
    assert_eq!(s.report_state("bad key", "x"), Err(ReportError::BadKey));
    s.report_state("led", "off").expect("report");
    s.report_state("interval", "5s").expect("report");
    s.report_state("led", "on").expect("report");
    for i in 0..14 {
        s.report_state(&std::format!("k{i}"), "v").expect("report");
    }
    assert_eq!(s.report_state("one-too-many", "v"), Err(ReportError::Full));
    connect(&mut s, 0, 0);
    let out = drain(&mut s);
    let [DeviceMessage::State(state)] = &out[..] else {
        panic!("one state message, got {out:?}")
    };
    assert_eq!(state.properties.len(), 16);
    assert_eq!(
        (
            state.properties[0].key.as_str(),
            state.properties[0].value.as_str()
        ),
        ("led", "on")
    );
    assert!(drain(&mut s).is_empty(), "sent once");
}

#[test]
fn running_commands_are_never_forgotten_and_redelivered_ones_are_kept_longest() {
    let mut s = Session::new(SessionConfig::new("t"), outbox(4));
    connect(&mut s, 0, 0);
    let cmd = |id| {
        HubMessage::Command(Command {
            id,
            name: truncated("led"),
            args: truncated("{}"),
            deadline: 0,
        })
    };
    // Command 1 runs for a long time; 2..=32 finish at once.
    for id in 1..=DEDUP_WINDOW as u64 {
        assert!(matches!(
            s.handle_message(1, cmd(id)),
            Ok(Delivered::Command(_))
        ));
        if id > 1 {
            s.command_finished(id, true, 0, "ok");
        }
        drain(&mut s);
    }
    // Many newer commands later, 1 is still remembered: a re-delivery is not run.
    for id in 100..200 {
        assert!(matches!(
            s.handle_message(2, cmd(id)),
            Ok(Delivered::Command(_))
        ));
        s.command_finished(id, true, 0, "ok");
        drain(&mut s);
    }
    assert_eq!(s.handle_message(3, cmd(1)), Ok(Delivered::Nothing));
    // With every slot running, a new command is left unacknowledged rather than
    // risking a second run of a forgotten one.
    let mut s = Session::new(SessionConfig::new("t"), outbox(4));
    connect(&mut s, 0, 0);
    for id in 1..=DEDUP_WINDOW as u64 {
        s.handle_message(1, cmd(id)).expect("command");
    }
    drain(&mut s);
    assert_eq!(s.handle_message(2, cmd(99)), Ok(Delivered::Nothing));
    assert!(
        drain(&mut s).is_empty(),
        "no ack for a command it cannot track"
    );
    assert_eq!(s.stats().commands_refused, 1);
}

#[test]
fn with_a_hub_that_closes_commands_only_closed_or_expired_ones_are_forgotten() {
    let mut s = Session::new(SessionConfig::new("t"), outbox(4));
    connect(&mut s, 0, 0);
    // welcome() says server_time 1_000_000 at local 0.
    let cmd = |id, deadline| {
        HubMessage::Command(Command {
            id,
            name: truncated("led"),
            args: truncated("{}"),
            deadline,
        })
    };
    let closes = |id| HubMessage::CommandClosed(crate::message::CommandClosed { id });
    s.handle_message(0, closes(0)).expect("announcement");
    for id in 1..=DEDUP_WINDOW as u64 {
        s.handle_message(1, cmd(id, 1_100_000)).expect("command");
        s.command_finished(id, true, 0, "ok");
    }
    drain(&mut s);
    // Finished but not confirmed: the hub may still deliver any of them again.
    assert_eq!(
        s.handle_message(2, cmd(99, 1_100_000)),
        Ok(Delivered::Nothing)
    );
    assert_eq!(s.stats().commands_refused, 1);
    // The hub confirms 5: its slot is free, and 99 (delivered again) runs.
    s.handle_message(3, closes(5)).expect("closed");
    assert!(matches!(
        s.handle_message(4, cmd(99, 1_100_000)),
        Ok(Delivered::Command(_))
    ));
    // Once their deadline (plus margin) has passed, unconfirmed ones are forgotten too.
    let later = 1_100_000 - 1_000_000 + DEADLINE_MARGIN_MS + 1;
    assert!(matches!(
        s.handle_message(later, cmd(100, 0)),
        Ok(Delivered::Command(_))
    ));
    // A new connection to a hub that does not announce it falls back to forgetting the
    // oldest finished command.
    s.handle_disconnected(later, DisconnectCause::Io, 0);
    connect(&mut s, later + 1_000, 0);
    s.command_finished(99, true, 0, "ok");
    s.command_finished(100, true, 0, "ok");
    assert!(matches!(
        s.handle_message(later + 1_001, cmd(101, 0)),
        Ok(Delivered::Command(_))
    ));
}

#[test]
fn desired_state_reaches_the_application_and_applied_answers_it() {
    let mut s: Session<_, REPLY_QUEUE, 4> =
        Session::with_reply_capacity(SessionConfig::new("t"), outbox(4));
    connect(&mut s, 0, 0);
    let mut properties = Vec::new();
    let _ = properties.push(Property {
        key: truncated("interval"),
        value: truncated("2"),
    });
    let desired = crate::message::Desired {
        version: 5,
        properties,
        last: true,
    };
    assert_eq!(
        s.handle_message(1, HubMessage::Desired(desired.clone())),
        Ok(Delivered::Desired(desired))
    );
    s.report_state("interval", "2").expect("report");
    s.report_refused("led", "no led").expect("refuse");
    s.report_state("uptime", "\"3d\"").expect("report");
    s.applied(5);
    let out = drain(&mut s);
    let [DeviceMessage::Applied(a)] = &out[..] else {
        panic!("one applied message, got {out:?}")
    };
    assert_eq!(a.version, 5);
    assert_eq!(a.properties.len(), 2);
    assert_eq!(
        (a.refused[0].key.as_str(), a.refused[0].value.as_str()),
        ("led", "no led")
    );
    // Without `applied`, reported properties go out as plain `state`, and refusals
    // wait for the answer.
    s.report_state("led", "on").expect("report");
    s.report_refused("relay", "none").expect("refuse");
    let out = drain(&mut s);
    assert!(matches!(&out[..], [DeviceMessage::State(st)] if st.properties.len() == 1));
}

#[test]
fn rate_limited_waits_briefly_and_a_refused_token_slowly() {
    let mut s = Session::new(SessionConfig::new("t"), outbox(4));
    connect(&mut s, 0, 0);
    s.handle_disconnected(100, DisconnectCause::Closed(close::RATE_LIMITED), 0);
    let wait = s.poll_timeout().expect("retry") - 100;
    assert_eq!(wait, close::RATE_LIMITED_WAIT_MS, "the short wait, no more");
    s.handle_disconnected(100, DisconnectCause::Closed(close::RATE_LIMITED), u32::MAX);
    let wait = s.poll_timeout().expect("retry") - 100;
    assert!(wait < 60_000, "not the refused-token wait: {wait}");
    s.handle_disconnected(100, DisconnectCause::Closed(close::POLICY), 0);
    let wait = s.poll_timeout().expect("retry") - 100;
    assert!(
        wait >= 60_000,
        "a token refused while connected waits long: {wait}"
    );
}
