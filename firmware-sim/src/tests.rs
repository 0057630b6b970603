//! Unit tests of the client against a scripted hub: the hub side is embedded-websocket's
//! server role plus `schemas`' codec, so no frame is written by hand, and every step is
//! deterministic (time is a number, the RNG is seeded).

extern crate std;

use std::string::{String, ToString};
use std::vec;
use std::vec::Vec;

use embedded_websocket::{
    WebSocketKey, WebSocketReceiveMessageType, WebSocketSendMessageType, WebSocketServer,
    WebSocketState, WebSocketSubProtocol,
};
use schemas::codec::{decode_postcard, encode_postcard_vec};
use schemas::message::truncated;
use schemas::session::{CloseReason, DisconnectCause, Outbox};
use schemas::{Ack, Command, DeviceMessage, HubMessage, Welcome};

use crate::board::{Board, CommandContext, Event, Outcome, Samples};
use crate::client::{Client, ClientConfig, Exit, Io};
use crate::flash::RamFlash;
use crate::ring::RingOutbox;
use crate::rng::MaskRng;

/// A board with one counter sensor and an `led` actuator; it records events.
#[derive(Default)]
struct TestBoard {
    counter: u64,
    led: bool,
    clock: Option<u64>,
    events: Vec<String>,
    commands: Vec<(u64, String)>,
}

impl Board for TestBoard {
    fn sample(&mut self, _now_ms: u64, samples: &mut Samples<'_>) {
        self.counter += 1;
        let _ = samples.push("counter", self.counter as f64);
        let _ = samples.push("led", if self.led { 1.0 } else { 0.0 });
        // Invalid readings are refused, not sent.
        let _ = samples.push("bad name", 1.0);
        let _ = samples.push("nan", f64::NAN);
    }

    fn execute(&mut self, command: &Command, ctx: &mut CommandContext<'_>) -> Outcome {
        use core::fmt::Write;
        self.commands
            .push((command.id, command.name.as_str().to_string()));
        match command.name.as_str() {
            "led" => {
                self.led = command.args.contains("true");
                let _ = write!(ctx, "led {}", if self.led { "on" } else { "off" });
                Outcome::OK
            }
            "set-interval" => {
                ctx.set_interval_ms(250);
                Outcome::OK
            }
            "reboot" => {
                ctx.request_reboot();
                let _ = write!(ctx, "rebooting");
                Outcome::OK
            }
            _ => Outcome::failed(2),
        }
    }

    fn wall_clock_ms(&mut self) -> Option<u64> {
        self.clock
    }

    fn on_event(&mut self, event: &Event<'_>) {
        self.events.push(std::format!("{event:?}"));
    }
}

/// The hub's end of one connection.
struct FakeHub {
    ws: WebSocketServer,
    inbox: Vec<u8>,
}

impl FakeHub {
    /// Answers the client's upgrade request with 101 and the postcard subprotocol.
    fn accept(request: &[u8]) -> (FakeHub, Vec<u8>) {
        let text = std::str::from_utf8(request).expect("utf8 request");
        assert!(text.starts_with("GET /v1/device HTTP/1.1\r\n"), "{text}");
        assert!(
            text.contains("\r\nAuthorization: Bearer tok-1\r\n"),
            "{text}"
        );
        assert!(
            text.contains("\r\nSec-WebSocket-Protocol: hub.v1.postcard\r\n"),
            "{text}"
        );
        assert!(text.contains("\r\nHost: hub.test:8443\r\n"), "{text}");
        let key = text
            .lines()
            .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
            .expect("key");
        let mut ws = WebSocketServer::new_server();
        let mut buf = [0u8; 1024];
        let proto = WebSocketSubProtocol::from("hub.v1.postcard");
        let n = ws
            .server_accept(&WebSocketKey::from(key), Some(&proto), &mut buf)
            .expect("accept");
        (
            FakeHub {
                ws,
                inbox: Vec::new(),
            },
            buf[..n].to_vec(),
        )
    }

    fn frame(&mut self, kind: WebSocketSendMessageType, payload: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; payload.len() + 16];
        let n = self.ws.write(kind, true, payload, &mut buf).expect("frame");
        buf.truncate(n);
        buf
    }

    fn message(&mut self, msg: &HubMessage) -> Vec<u8> {
        let bytes = encode_postcard_vec(msg);
        self.frame(WebSocketSendMessageType::Binary, &bytes)
    }

    /// Decodes what the client wrote: protocol messages, and control frames as strings.
    fn receive(&mut self, bytes: &[u8]) -> Vec<Got> {
        self.inbox.extend_from_slice(bytes);
        let mut out = Vec::new();
        loop {
            let mut payload = [0u8; 8192];
            let Ok(r) = self.ws.read(&self.inbox, &mut payload) else {
                break;
            };
            assert!(r.end_of_message, "partial frame in test");
            self.inbox.drain(..r.len_from);
            let p = &payload[..r.len_to];
            out.push(match r.message_type {
                WebSocketReceiveMessageType::Binary => {
                    Got::Msg(decode_postcard::<DeviceMessage>(p).expect("device message"))
                }
                WebSocketReceiveMessageType::Pong => Got::Pong(p.to_vec()),
                WebSocketReceiveMessageType::CloseMustReply => {
                    Got::Close(u16::from_be_bytes([p[0], p[1]]))
                }
                other => panic!("unexpected {other:?}"),
            });
            if self.inbox.is_empty() {
                break;
            }
        }
        out
    }
}

#[derive(Debug, PartialEq)]
enum Got {
    Msg(DeviceMessage),
    Pong(Vec<u8>),
    Close(u16),
}

type TestClient<'a> = Client<'a, RamFlash<Vec<u8>>, TestBoard, MaskRng>;

fn client<'a>(rx: &'a mut [u8], tx: &'a mut [u8], flash: Vec<u8>) -> TestClient<'a> {
    let (ring, _) = RingOutbox::mount(RamFlash::new(flash)).expect("ring");
    let mut config = ClientConfig::new("tok-1", "test-1.0");
    config.sample_interval_ms = 1000;
    let board = TestBoard {
        clock: Some(1_764_000_000_000),
        ..TestBoard::default()
    };
    Client::new(config, ring, board, MaskRng::new(7), rx, tx).expect("client")
}

/// Performs every write the client asks for and returns the bytes.
fn drain_tx(c: &mut TestClient<'_>, now: u64) -> (Vec<u8>, Io) {
    let mut out = Vec::new();
    loop {
        match c.poll(now).expect("poll") {
            Io::Write => {
                let n = c.pending_tx().len();
                out.extend_from_slice(c.pending_tx());
                c.tx_written(n);
            }
            other => return (out, other),
        }
    }
}

fn deliver(c: &mut TestClient<'_>, now: u64, bytes: &[u8]) {
    let mut rest = bytes;
    // Deliver in small pieces to exercise partial frames.
    while !rest.is_empty() {
        let space = c.rx_space();
        let n = space.len().min(rest.len()).min(37);
        space[..n].copy_from_slice(&rest[..n]);
        c.rx_filled(now, n).expect("rx");
        rest = &rest[n..];
    }
}

fn welcome(last_seq: u64) -> HubMessage {
    HubMessage::Welcome(Welcome {
        server_time: 1_764_000_000_500,
        ping_interval_ms: 1000,
        pong_timeout_ms: 500,
        last_seq,
        max_readings: 64,
        max_message_bytes: 16384,
    })
}

/// Connects and completes the upgrade; returns the hub end and the `Hello`.
fn connect(c: &mut TestClient<'_>, now: u64) -> (FakeHub, Vec<Got>) {
    assert_eq!(c.poll(now).expect("poll"), Io::Connect);
    c.handle_connected(now, "hub.test:8443", "/v1/device")
        .expect("connected");
    let (request, next) = drain_tx(c, now);
    assert!(matches!(next, Io::Read { .. }));
    let (mut hub, response) = FakeHub::accept(&request);
    deliver(c, now, &response);
    let (bytes, _) = drain_tx(c, now);
    let got = hub.receive(&bytes);
    (hub, got)
}

fn telemetry_seqs(got: &[Got]) -> Vec<u64> {
    got.iter()
        .filter_map(|g| match g {
            Got::Msg(DeviceMessage::Telemetry(t)) => Some(t.seq),
            _ => None,
        })
        .collect()
}

#[test]
fn full_session_over_frames() {
    let (mut rx, mut tx) = (vec![0u8; 1024], vec![0u8; 1536]);
    let mut c = client(&mut rx, &mut tx, vec![0u8; 4096]);
    // The first poll samples (seq 1) and connects.
    let (mut hub, got) = connect(&mut c, 0);
    match &got[..] {
        [Got::Msg(DeviceMessage::Hello(h))] => {
            assert_eq!(h.firmware, "test-1.0");
            assert_eq!(h.last_acked_seq, 0);
        }
        other => panic!("expected hello, got {other:?}"),
    }
    let w = hub.message(&welcome(0));
    deliver(&mut c, 10, &w);
    let (bytes, _) = drain_tx(&mut c, 10);
    let got = hub.receive(&bytes);
    assert_eq!(telemetry_seqs(&got), [1]);
    if let [Got::Msg(DeviceMessage::Telemetry(t))] = &got[..] {
        // Only the two valid readings went into the batch.
        assert_eq!(t.readings.len(), 2);
        assert_eq!(t.readings[0].metric, "counter");
        assert_eq!(t.readings[0].ts, 1_764_000_000_000);
    }
    // A second sample a second later, then the ack for both.
    let (bytes, _) = drain_tx(&mut c, 1000);
    assert_eq!(telemetry_seqs(&hub.receive(&bytes)), [2]);
    let ack = hub.message(&HubMessage::Ack(Ack { up_to_seq: 2 }));
    deliver(&mut c, 1001, &ack);
    assert_eq!(c.outbox().len(), 0);
    assert_eq!(c.session().last_acked(), 2);
    let stats = c.stats();
    assert_eq!((stats.batches_acked, stats.readings_acked), (2, 4));
    assert_eq!(stats.readings_rejected, 4);

    // Ping -> pong with the same payload.
    let ping = hub.frame(WebSocketSendMessageType::Ping, b"hi");
    deliver(&mut c, 1100, &ping);
    let (bytes, _) = drain_tx(&mut c, 1100);
    assert_eq!(hub.receive(&bytes), [Got::Pong(b"hi".to_vec())]);

    // A command: ack, then result; a duplicate is acked again and not run twice.
    let cmd = HubMessage::Command(Command {
        id: 7,
        name: truncated("led"),
        args: truncated(r#"{"on":true}"#),
        deadline: 0,
    });
    let frame = hub.message(&cmd);
    deliver(&mut c, 1200, &frame);
    let (bytes, _) = drain_tx(&mut c, 1200);
    let got = hub.receive(&bytes);
    assert!(matches!(&got[0], Got::Msg(DeviceMessage::CommandAck(a)) if a.id == 7));
    assert!(
        matches!(&got[1], Got::Msg(DeviceMessage::CommandResult(r)) if r.ok && r.output == "led on")
    );
    assert!(c.board().led);
    let frame = hub.message(&cmd);
    deliver(&mut c, 1300, &frame);
    let (bytes, _) = drain_tx(&mut c, 1300);
    assert_eq!(hub.receive(&bytes).len(), 2);
    assert_eq!(c.board().commands.len(), 1);

    // The led shows up in the next reading.
    let (bytes, _) = drain_tx(&mut c, 2000);
    let got = hub.receive(&bytes);
    match &got[..] {
        [Got::Msg(DeviceMessage::Telemetry(t))] => {
            assert_eq!(t.seq, 3);
            assert_eq!(t.readings[1].value, 1.0);
        }
        other => panic!("expected telemetry, got {other:?}"),
    }

    // The hub closes with 1001: the client echoes, closes, and backs off.
    let close = {
        let mut buf = [0u8; 64];
        let n = hub
            .ws
            .close(
                embedded_websocket::WebSocketCloseStatusCode::EndpointUnavailable,
                None,
                &mut buf,
            )
            .expect("close");
        buf[..n].to_vec()
    };
    deliver(&mut c, 2100, &close);
    let (bytes, io) = drain_tx(&mut c, 2100);
    assert!(!bytes.is_empty(), "close echoed");
    assert_eq!(io, Io::Close);
    c.handle_closed(2100);
    assert!(c.board().events.iter().any(|e| e.contains("Closed(1001)")));
    match c.poll(2100).expect("poll") {
        Io::Sleep { until: Some(at) } => assert!(at <= 2100 + 500),
        other => panic!("expected backoff sleep, got {other:?}"),
    }

    // Reconnect: the hub stored 3 already, so nothing is re-sent.
    let mut now = 2100;
    loop {
        match c.poll(now).expect("poll") {
            Io::Connect => break,
            Io::Sleep { until: Some(at) } => now = at,
            other => panic!("unexpected {other:?}"),
        }
    }
    c.handle_connected(now, "hub.test:8443", "/v1/device")
        .expect("connected");
    let (request, _) = drain_tx(&mut c, now);
    let (mut hub, response) = FakeHub::accept(&request);
    deliver(&mut c, now, &response);
    let (bytes, _) = drain_tx(&mut c, now);
    match &hub.receive(&bytes)[..] {
        [Got::Msg(DeviceMessage::Hello(h))] => assert_eq!(h.last_acked_seq, 2),
        other => panic!("expected hello, got {other:?}"),
    }
    let w = hub.message(&welcome(3));
    deliver(&mut c, now, &w);
    let (bytes, _) = drain_tx(&mut c, now);
    assert!(telemetry_seqs(&hub.receive(&bytes)).is_empty());
    assert_eq!(c.outbox().len(), 0);
}

#[test]
fn unacked_batches_survive_a_reboot_and_are_resent_after_welcome() {
    let (mut rx, mut tx) = (vec![0u8; 1024], vec![0u8; 1536]);
    let mut c = client(&mut rx, &mut tx, vec![0u8; 4096]);
    // Offline: three samples pile up.
    let (_hub, _) = connect(&mut c, 0);
    c.handle_transport_error();
    assert_eq!(c.poll(0).expect("poll"), Io::Close);
    c.handle_closed(0);
    for t in [1000, 2000] {
        let _ = c.poll(t).expect("poll");
    }
    assert_eq!(c.outbox().len(), 3);
    // "Reboot": a new client over the same flash bytes.
    let flash = c.outbox().flash().bytes().to_vec();
    drop(c);
    let (mut rx, mut tx) = (vec![0u8; 1024], vec![0u8; 1536]);
    let mut c = client(&mut rx, &mut tx, flash);
    assert_eq!((c.outbox().front_seq(), c.outbox().len()), (1, 3));
    let (mut hub, _) = connect(&mut c, 0);
    // The hub had stored 1 before the reboot: 2, 3 and the new sample 4 go out.
    let w = hub.message(&welcome(1));
    deliver(&mut c, 1, &w);
    let mut got = Vec::new();
    for now in [1, 2, 3] {
        let (bytes, _) = drain_tx(&mut c, now);
        got.extend(hub.receive(&bytes));
    }
    assert_eq!(telemetry_seqs(&got), [2, 3, 4]);
    assert!(c
        .board()
        .events
        .iter()
        .any(|e| e.contains("Welcome { hub_last_seq: 1, pending: 3, next_seq: 2 }")));
}

#[test]
fn silent_hub_is_closed_with_4003() {
    let (mut rx, mut tx) = (vec![0u8; 1024], vec![0u8; 1536]);
    let mut c = client(&mut rx, &mut tx, vec![0u8; 4096]);
    let (mut hub, _) = connect(&mut c, 0);
    let w = hub.message(&welcome(0));
    deliver(&mut c, 0, &w);
    let _ = drain_tx(&mut c, 0);
    // ping 1000 + pong 500 + grace 1000 = 2500 ms of silence.
    match c.poll(100).expect("poll") {
        Io::Read { until: Some(at) } => assert!(at <= 1000, "next sample first: {at}"),
        other => panic!("{other:?}"),
    }
    let (bytes, io) = drain_tx(&mut c, 2500);
    assert_eq!(io, Io::Close);
    assert!(hub.receive(&bytes).contains(&Got::Close(4003)));
    c.handle_closed(2500);
    assert!(c.board().events.iter().any(|e| e.contains(&std::format!(
        "{:?}",
        DisconnectCause::Local(CloseReason::HubSilent)
    ))));
}

#[test]
fn refused_upgrade_backs_off_slowly() {
    let (mut rx, mut tx) = (vec![0u8; 1024], vec![0u8; 1536]);
    let mut c = client(&mut rx, &mut tx, vec![0u8; 4096]);
    assert_eq!(c.poll(0).expect("poll"), Io::Connect);
    c.handle_connected(0, "hub.test:8443", "/v1/device")
        .expect("connected");
    let _ = drain_tx(&mut c, 0);
    deliver(
        &mut c,
        5,
        b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 13\r\n\r\ntoken expired",
    );
    assert_eq!(c.poll(5).expect("poll"), Io::Close);
    c.handle_closed(5);
    assert!(matches!(c.poll(5).expect("poll"), Io::Sleep { .. }));
    let retry = c.session().poll_timeout().expect("retry scheduled");
    assert!(retry >= 60_005, "{retry}");
    // The status reaches the board, for a message that says what to do.
    let last = c.board().events.last().cloned().unwrap_or_default();
    assert_eq!(
        last,
        std::format!(
            "Disconnected {{ cause: Refused, http_status: Some(401), was_ready: false, next: RetryIn({}) }}",
            retry - 5
        )
    );
}

#[test]
fn http_status_of_a_refused_upgrade_is_reported_once() {
    let (mut rx, mut tx) = (vec![0u8; 1024], vec![0u8; 1536]);
    let mut c = client(&mut rx, &mut tx, vec![0u8; 4096]);
    let mut now = 0;
    for (response, cause, status) in [
        (
            &b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\nContent-Length: 0\r\n\r\n"[..],
            "Unavailable { retry_after_ms: 5000 }",
            "Some(503)",
        ),
        (
            b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n",
            "Refused",
            "Some(403)",
        ),
        (
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
            "Refused",
            "Some(404)",
        ),
    ] {
        now = c.session().poll_timeout().unwrap_or(now).max(now);
        assert_eq!(c.poll(now).expect("poll"), Io::Connect);
        c.handle_connected(now, "hub.test:8443", "/v1/device")
            .expect("connected");
        let _ = drain_tx(&mut c, now);
        deliver(&mut c, now, response);
        assert_eq!(c.poll(now).expect("poll"), Io::Close);
        c.handle_closed(now);
        let last = c.board().events.last().cloned().unwrap_or_default();
        assert!(
            last.starts_with(&std::format!(
                "Disconnected {{ cause: {cause}, http_status: {status}, was_ready: false, next: RetryIn("
            )),
            "{last}"
        );
    }
    // A connection that fails without an HTTP answer does not inherit the last status.
    now = c.session().poll_timeout().unwrap_or(now).max(now);
    assert_eq!(c.poll(now).expect("poll"), Io::Connect);
    c.handle_connect_failed(now);
    let last = c.board().events.last().cloned().unwrap_or_default();
    assert!(
        last.starts_with("Disconnected { cause: ConnectFailed, http_status: None,"),
        "{last}"
    );
}

#[test]
fn reboot_command_exits_after_the_result_and_interval_changes() {
    let (mut rx, mut tx) = (vec![0u8; 1024], vec![0u8; 1536]);
    let mut c = client(&mut rx, &mut tx, vec![0u8; 4096]);
    let (mut hub, _) = connect(&mut c, 0);
    let w = hub.message(&welcome(0));
    deliver(&mut c, 0, &w);
    let _ = drain_tx(&mut c, 0);
    let cmd = |id, name: &str| {
        HubMessage::Command(Command {
            id,
            name: truncated(name),
            args: truncated("{}"),
            deadline: 0,
        })
    };
    let frame = hub.message(&cmd(1, "set-interval"));
    deliver(&mut c, 10, &frame);
    assert_eq!(c.interval_ms(), 250);
    let _ = drain_tx(&mut c, 10);
    let frame = hub.message(&cmd(2, "reboot"));
    deliver(&mut c, 20, &frame);
    let (bytes, io) = drain_tx(&mut c, 20);
    let got = hub.receive(&bytes);
    assert!(got
        .iter()
        .any(|g| matches!(g, Got::Msg(DeviceMessage::CommandResult(r)) if r.id == 2 && r.ok)));
    assert!(got.contains(&Got::Close(1000)), "{got:?}");
    assert_eq!(io, Io::Close);
    c.handle_closed(20);
    assert_eq!(c.poll(20).expect("poll"), Io::Exit(Exit::Reboot));
}

#[test]
fn shutdown_drains_then_closes_normally() {
    let (mut rx, mut tx) = (vec![0u8; 1024], vec![0u8; 1536]);
    let mut c = client(&mut rx, &mut tx, vec![0u8; 4096]);
    let (mut hub, _) = connect(&mut c, 0);
    let w = hub.message(&welcome(0));
    deliver(&mut c, 0, &w);
    let _ = drain_tx(&mut c, 0);
    c.shutdown(5, 10_000);
    // Batch 1 is unacknowledged: no close yet, and no new samples.
    let (bytes, io) = drain_tx(&mut c, 1500);
    assert!(bytes.is_empty());
    assert!(matches!(io, Io::Read { .. }));
    let ack = hub.message(&HubMessage::Ack(Ack { up_to_seq: 1 }));
    deliver(&mut c, 1600, &ack);
    let (bytes, io) = drain_tx(&mut c, 1600);
    assert_eq!(hub.receive(&bytes), [Got::Close(1000)]);
    assert_eq!(io, Io::Close);
    c.handle_closed(1600);
    // The disconnect says that the device stops, not when it would retry.
    let last = c.board().events.last().cloned().unwrap_or_default();
    assert_eq!(
        last,
        "Disconnected { cause: Closed(1000), http_status: None, was_ready: true, next: Exit(Stopped) }"
    );
    assert_eq!(c.poll(1600).expect("poll"), Io::Exit(Exit::Stopped));
    assert_eq!(c.stats().batches_recorded, 1);
}

#[test]
fn a_connection_lost_while_draining_retries_only_before_the_deadline() {
    let (mut rx, mut tx) = (vec![0u8; 1024], vec![0u8; 1536]);
    let mut c = client(&mut rx, &mut tx, vec![0u8; 4096]);
    let (mut hub, _) = connect(&mut c, 0);
    let w = hub.message(&welcome(0));
    deliver(&mut c, 0, &w);
    let _ = drain_tx(&mut c, 0);
    // Batch 1 is unacknowledged and there is a minute to deliver it: the device retries.
    c.shutdown(5, 60_000);
    c.handle_transport_error();
    assert_eq!(c.poll(10).expect("poll"), Io::Close);
    c.handle_closed(10);
    let last = c.board().events.last().cloned().unwrap_or_default();
    assert!(last.contains("next: RetryIn("), "{last}");
    // A hub that refuses the device: the next attempt would come after the deadline.
    let now = c.session().poll_timeout().expect("retry");
    assert_eq!(c.poll(now).expect("poll"), Io::Connect);
    c.handle_connected(now, "hub.test:8443", "/v1/device")
        .expect("connected");
    let _ = drain_tx(&mut c, now);
    deliver(
        &mut c,
        now,
        b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!(c.poll(now).expect("poll"), Io::Close);
    c.handle_closed(now);
    let last = c.board().events.last().cloned().unwrap_or_default();
    assert!(
        last.ends_with("http_status: Some(401), was_ready: false, next: Exit(Stopped) }"),
        "{last}"
    );
    assert_eq!(
        c.poll(now).expect("poll"),
        Io::Sleep {
            until: Some(60_005)
        }
    );
    assert_eq!(c.poll(60_005).expect("poll"), Io::Exit(Exit::Stopped));
}

#[test]
fn hub_protocol_errors_close_with_the_right_code() {
    for (payload, code) in [
        (vec![9u8, 1, 2], 4002u16),
        (vec![1u8, 0xff, 0xff, 0xff], 1007),
    ] {
        let (mut rx, mut tx) = (vec![0u8; 1024], vec![0u8; 1536]);
        let mut c = client(&mut rx, &mut tx, vec![0u8; 4096]);
        let (mut hub, _) = connect(&mut c, 0);
        let frame = hub.frame(WebSocketSendMessageType::Binary, &payload);
        deliver(&mut c, 1, &frame);
        let (bytes, io) = drain_tx(&mut c, 1);
        assert!(hub.receive(&bytes).contains(&Got::Close(code)));
        assert_eq!(io, Io::Close);
    }
    // An ack before welcome is a protocol violation (4001); an oversized frame is 1009.
    let (mut rx, mut tx) = (vec![0u8; 1024], vec![0u8; 1536]);
    let mut c = client(&mut rx, &mut tx, vec![0u8; 4096]);
    let (mut hub, _) = connect(&mut c, 0);
    let frame = hub.message(&HubMessage::Ack(Ack { up_to_seq: 1 }));
    deliver(&mut c, 1, &frame);
    let (bytes, _) = drain_tx(&mut c, 1);
    assert!(hub.receive(&bytes).contains(&Got::Close(4001)));
    let (mut rx, mut tx) = (vec![0u8; 1024], vec![0u8; 1536]);
    let mut c = client(&mut rx, &mut tx, vec![0u8; 4096]);
    let (mut hub, _) = connect(&mut c, 0);
    let big = hub.frame(WebSocketSendMessageType::Binary, &[0u8; 3000]);
    deliver(&mut c, 1, &big[..1000]);
    let (bytes, _) = drain_tx(&mut c, 1);
    assert!(hub.receive(&bytes).contains(&Got::Close(1009)));
    assert_eq!(hub.ws.state, WebSocketState::CloseReceived);
}

#[test]
fn golden_vectors_decode_through_the_firmware_path() {
    let vectors: Vec<serde_json::Value> =
        serde_json::from_str(schemas::golden::V1).expect("vectors");
    let mut seen = 0;
    for v in vectors.iter().filter(|v| v["direction"] == "hub_to_device") {
        let mut buf = [0u8; 1024];
        let bytes = schemas::golden::decode_hex(v["postcard_hex"].as_str().expect("hex"), &mut buf)
            .expect("hex");
        let msg = crate::decode_hub_message(bytes).expect("golden vector decodes");
        let json: HubMessage =
            schemas::codec::decode_json(&v["message"].to_string()).expect("json");
        assert_eq!(msg, json, "{}", v["name"]);
        seen += 1;
    }
    assert_eq!(seen, 9);

    // And through the whole client: welcome, ack, command, error and command_closed as
    // frames (the firmware announces command_closed, so a hub may send it).
    let (mut rx, mut tx) = (vec![0u8; 1024], vec![0u8; 1536]);
    let mut c = client(&mut rx, &mut tx, vec![0u8; 4096]);
    let (mut hub, _) = connect(&mut c, 0);
    for name in [
        "welcome",
        "ack",
        "command",
        "error",
        "command_closed",
        "desired",
    ] {
        let v = vectors.iter().find(|v| v["name"] == name).expect(name);
        let mut buf = [0u8; 1024];
        let bytes = schemas::golden::decode_hex(v["postcard_hex"].as_str().expect("hex"), &mut buf)
            .expect("hex");
        let frame = hub.frame(WebSocketSendMessageType::Binary, bytes);
        deliver(&mut c, 1, &frame);
    }
    let (bytes, _) = drain_tx(&mut c, 1);
    let got = hub.receive(&bytes);
    assert!(got.iter().all(|g| !matches!(g, Got::Close(_))), "{got:?}");
    assert_eq!(c.board().commands, [(7, "led".to_string())]);
    // The desired vector's interval (2 s) was applied.
    assert_eq!(c.interval_ms(), 2_000);
    let events = c.board().events.join("\n");
    assert!(events.contains("Welcome { hub_last_seq: 41"), "{events}");
    assert!(events.contains("unknown command id 99"), "{events}");
}

#[test]
fn per_device_state_stays_small() {
    let client = core::mem::size_of::<TestClient<'static>>();
    let session = core::mem::size_of::<schemas::session::Session<RingOutbox<RamFlash<Vec<u8>>>>>();
    let link = core::mem::size_of::<crate::link::Link<'static>>();
    std::println!("Client {client} B (of which Session {session} B, Link {link} B)");
    // The documented budget (README "Memory"): about 6.7 KiB, most of it the session.
    assert!(client <= 6_800, "Client grew to {client} bytes");
    assert!(
        client - session <= 512,
        "Client's own state grew to {} bytes",
        client - session
    );
}

/// A network that never connects, for measuring the driver.
struct NoNet;
struct NoTimer;

impl crate::driver::Connector for NoNet {
    type Transport = NoIo;
    type Error = ();
    async fn connect(&mut self) -> Result<NoIo, ()> {
        Err(())
    }
    fn host(&self) -> &str {
        "h"
    }
    async fn disconnect(&mut self, _t: NoIo) {}
}

impl crate::driver::Timer for NoTimer {
    fn now_ms(&self) -> u64 {
        0
    }
    async fn wait_until(&self, _at_ms: u64) {}
}

struct NoIo;
impl embedded_io_async::ErrorType for NoIo {
    type Error = embedded_io_async::ErrorKind;
}
impl embedded_io_async::Read for NoIo {
    async fn read(&mut self, _buf: &mut [u8]) -> Result<usize, Self::Error> {
        Ok(0)
    }
}
impl embedded_io_async::Write for NoIo {
    async fn write(&mut self, buf: &[u8]) -> Result<usize, Self::Error> {
        Ok(buf.len())
    }
}

#[test]
fn driver_future_is_small() {
    // The driver's future is what each device task holds besides the client: it must not
    // capture a buffer or a decoded message across an await.
    let (mut rx, mut tx) = (vec![0u8; 1024], vec![0u8; 1536]);
    let mut c = client(&mut rx, &mut tx, vec![0u8; 4096]);
    let mut net = NoNet;
    let timer = NoTimer;
    let fut = crate::driver::run(&mut c, &mut net, &timer, core::future::ready(()), 0);
    let size = core::mem::size_of_val(&fut);
    std::println!("driver::run future {size} B");
    assert!(size <= 1024, "driver future grew to {size} bytes");
}

/// A clock that advances one second every time the driver waits.
struct SteppingTimer(core::cell::Cell<u64>);

impl crate::driver::Timer for SteppingTimer {
    fn now_ms(&self) -> u64 {
        self.0.get()
    }
    async fn wait_until(&self, at_ms: u64) {
        // Like a real timer: pending at first, then the time has come.
        let mut first = true;
        core::future::poll_fn(|_| {
            if core::mem::take(&mut first) {
                core::task::Poll::Pending
            } else {
                self.0.set(self.0.get().max(at_ms));
                core::task::Poll::Ready(())
            }
        })
        .await
    }
}

/// A network whose connect never completes (a long rate-limit queue, a black hole).
struct StuckNet;

impl crate::driver::Connector for StuckNet {
    type Transport = NoIo;
    type Error = ();
    async fn connect(&mut self) -> Result<NoIo, ()> {
        core::future::pending().await
    }
    fn host(&self) -> &str {
        "h"
    }
    async fn disconnect(&mut self, _t: NoIo) {}
}

#[test]
fn samples_keep_being_recorded_while_a_connect_hangs() {
    use core::future::Future;
    let (mut rx, mut tx) = (vec![0u8; 1024], vec![0u8; 1536]);
    let mut c = client(&mut rx, &mut tx, vec![0u8; 8192]);
    let timer = SteppingTimer(core::cell::Cell::new(0));
    let mut net = StuckNet;
    // Stop once ten seconds have passed on the test clock.
    let stop = core::future::poll_fn(|_| {
        if timer.0.get() >= 10_000 {
            core::task::Poll::Ready(())
        } else {
            core::task::Poll::Pending
        }
    });
    let result = {
        let fut = crate::driver::run(&mut c, &mut net, &timer, stop, 0);
        let mut fut = core::pin::pin!(fut);
        let mut cx = core::task::Context::from_waker(core::task::Waker::noop());
        let mut result = None;
        for _ in 0..10_000 {
            if let core::task::Poll::Ready(r) = fut.as_mut().poll(&mut cx) {
                result = Some(r);
                break;
            }
        }
        result.expect("the driver stops")
    };
    assert_eq!(result, Ok(Exit::Stopped));
    // One sample per second of the 1 s interval, although the connect never finished.
    let stats = c.stats();
    assert_eq!(stats.connects, 1);
    assert!(stats.batches_recorded >= 10, "{stats:?}");
    assert_eq!(c.outbox().len() as u64, stats.batches_recorded);
}

#[test]
fn the_first_sample_waits_for_the_configured_phase_then_follows_the_interval() {
    let (mut rx, mut tx) = (vec![0u8; 1024], vec![0u8; 1536]);
    let (ring, _) = RingOutbox::mount(RamFlash::new(vec![0u8; 8192])).expect("ring");
    let mut config = ClientConfig::new("tok-1", "test-1.0");
    config.sample_interval_ms = 1000;
    config.first_sample_ms = 300;
    let mut c = Client::new(
        config,
        ring,
        TestBoard {
            clock: Some(1_764_000_000_000),
            ..TestBoard::default()
        },
        MaskRng::new(7),
        &mut rx,
        &mut tx,
    )
    .expect("client");
    let recorded = |c: &TestClient<'_>| c.stats().batches_recorded;
    c.poll_sampling(5_000).expect("sample");
    assert_eq!(recorded(&c), 0, "started at 5,000: nothing before 5,300");
    assert_eq!(c.next_sample_at(), Some(5_300));
    c.poll_sampling(5_299).expect("sample");
    assert_eq!(recorded(&c), 0);
    c.poll_sampling(5_300).expect("sample");
    assert_eq!(recorded(&c), 1);
    assert_eq!(c.next_sample_at(), Some(6_300));
    c.poll_sampling(6_300).expect("sample");
    assert_eq!(recorded(&c), 2);
}
