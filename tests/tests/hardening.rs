//! End-to-end tests of what a hostile or broken client does to the real `hub` binary: frames
//! built by hand that break RFC 6455 (text that is not UTF-8, a length with its top bit
//! set), a token that expires while the device is connected, a device that writes but
//! never reads, and a flood of idle TCP connections. (A device over its message rate is in
//! `spine.rs`.)

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use e2e::client::{hello, masked_frame, welcomed, Device};
use e2e::{wait_for, Hub, HubOptions};
use schemas::{close, DeviceMessage, HubMessage};

const T: Duration = Duration::from_secs(10);

const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CONTINUATION: u8 = 0x0;
const CLOSE: u8 = 0x8;

/// The device's `online` flag and last disconnect cause in the hub's device table.
fn presence(hub: &Hub, device: &str) -> (i64, String) {
    hub.db()
        .query_row(
            "SELECT online, COALESCE(last_cause, '') FROM devices WHERE id = ?1",
            [device],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap_or((0, String::new()))
}

#[tokio::test(flavor = "multi_thread")]
async fn text_that_is_not_utf8_is_closed_with_1007() {
    let hub = Hub::start(HubOptions::default());
    // "é" is c3 a9: cut after c3 it is an incomplete sequence; ff is never UTF-8.
    let hello_json = schemas::codec::encode_json(&hello("test-1"));
    let cases: Vec<(&str, bool, Vec<Vec<u8>>)> = vec![
        (
            "one text frame",
            true,
            vec![masked_frame(true, TEXT, b"{\"a\":\"\xff\"}")],
        ),
        (
            "fragmented, broken in the second fragment",
            true,
            vec![
                masked_frame(
                    false,
                    TEXT,
                    b"{\"state\":{\"properties\":[{\"key\":\"k\",\"value\":\"",
                ),
                masked_frame(true, CONTINUATION, b"\xc3\"}]}}"),
            ],
        ),
        (
            "fragmented, a sequence cut at the end of the message",
            true,
            vec![
                masked_frame(false, TEXT, b"{\"a\":1}"),
                masked_frame(true, CONTINUATION, b"\xc3"),
            ],
        ),
        (
            "before hello",
            false,
            vec![masked_frame(true, TEXT, b"\xfe\xff")],
        ),
        (
            "a close frame whose reason is not UTF-8",
            true,
            vec![masked_frame(true, CLOSE, b"\x03\xe8bye \xff")],
        ),
    ];
    for (i, (name, after_hello, frames)) in cases.into_iter().enumerate() {
        let token = hub.token(&format!("utf8-{i}"));
        let mut d = Device::connect(&hub.device_url, &hub.ca(), &token, true).await;
        if after_hello {
            d.send_bytes(&masked_frame(true, TEXT, hello_json.as_bytes()))
                .await;
            assert!(
                matches!(d.expect(T).await, HubMessage::Welcome(_)),
                "{name}"
            );
        }
        for frame in frames {
            d.send_bytes(&frame).await;
        }
        let (code, reason) = d.expect_close(T).await;
        assert_eq!(code, close::INVALID_PAYLOAD, "{name}: {code} ({reason})");
        assert!(reason.contains("UTF-8"), "{name}: {reason}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frame_length_with_its_top_bit_set_is_a_protocol_error() {
    let hub = Hub::start(HubOptions::default());
    let (mut d, _) = welcomed(&hub, "top-bit", false).await;
    // FIN + binary, masked, 64-bit length 2^63, the mask; no payload follows.
    let mut header = vec![0x80 | BINARY, 0x80 | 127];
    header.extend_from_slice(&(1u64 << 63).to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]);
    d.send_bytes(&header).await;
    let (code, reason) = d.expect_close(T).await;
    assert_eq!(code, close::PROTOCOL_ERROR, "{reason}");
    assert!(reason.contains("most significant bit"), "{reason}");
    // Just under it is merely too big.
    let (mut d, _) = welcomed(&hub, "big", false).await;
    let mut header = vec![0x80 | BINARY, 0x80 | 127];
    header.extend_from_slice(&((1u64 << 63) - 1).to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]);
    d.send_bytes(&header).await;
    assert_eq!(d.expect_close(T).await.0, close::TOO_BIG);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_that_expires_while_connected_ends_the_session_with_1008() {
    let hub = Hub::start(HubOptions::default());
    let (code, token, err) = hub.cli(&["token", "issue", "short-lived", "--ttl", "3s"]);
    assert_eq!(code, 0, "{err}");
    let token = token.trim();
    let expires_at_s: u64 = token
        .rsplit('.')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("expiry in the token");
    let mut d = Device::connect(&hub.device_url, &hub.ca(), token, true).await;
    d.send(&hello("test-1")).await;
    assert!(matches!(d.expect(T).await, HubMessage::Welcome(_)));
    let (code, reason) = d.expect_close(T).await;
    let closed_at_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    assert_eq!(code, close::POLICY, "{reason}");
    assert_eq!(reason, "token expired");
    // At its expiry, not before, and not much after.
    assert!(closed_at_ms >= expires_at_s * 1000, "closed early");
    assert!(
        closed_at_ms < expires_at_s * 1000 + 1_000,
        "closed {} ms after the expiry",
        closed_at_ms - expires_at_s * 1000
    );
    wait_for(T, "the device to be recorded offline", || {
        let (online, cause) = presence(&hub, "short-lived");
        (online == 0 && cause == "token_expired").then_some(())
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn a_device_that_writes_but_never_reads_is_declared_offline() {
    let hub = Hub::start(HubOptions {
        ping_interval: "300ms",
        pong_timeout: "300ms",
        ..HubOptions::default()
    });
    let (mut d, _) = welcomed(&hub, "deaf", true).await;
    let state = DeviceMessage::State(schemas::State {
        properties: heapless::Vec::new(),
    });
    // Write a message every 50 ms and never read: pings arrive, no pong ever goes back.
    let started = Instant::now();
    let offline_after = loop {
        let (online, cause) = presence(&hub, "deaf");
        if online == 0 {
            assert_eq!(cause, "pong_timeout");
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "still online after 5 s of writing without reading"
        );
        // Once the hub has closed, writes fail; that is fine, only the verdict counts.
        let _ = futures_util::SinkExt::send(
            &mut d.ws,
            tokio_tungstenite::tungstenite::Message::text(schemas::codec::encode_json(&state)),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // ping interval + pong timeout, plus scheduling slack.
    assert!(
        offline_after < Duration::from_millis(1_600),
        "declared offline after {offline_after:?}"
    );
}

/// Opens a TCP connection to `to` from the loopback address `from` and sends nothing.
async fn idle_connection(from: Ipv4Addr, to: SocketAddr) -> Option<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4().ok()?;
    socket.bind(SocketAddr::from((from, 0))).ok()?;
    tokio::time::timeout(Duration::from_secs(5), socket.connect(to))
        .await
        .ok()?
        .ok()
}

/// Whether the hub has closed this connection (end of stream or reset).
fn closed_by_hub(stream: &tokio::net::TcpStream) -> bool {
    let mut byte = [0u8; 1];
    match stream.try_read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

/// One machine floods the device port with idle TCP connections from one address
/// (127.0.0.2, standing for one client on the network); a device on another address
/// (127.0.0.1) still connects within a second, because one source may hold only its share
/// of the handshake slots. The first-byte deadline is set long here, so the share alone is
/// what lets the device in.
#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_idle_connections_from_one_address_does_not_lock_devices_out() {
    let hub = Hub::start(HubOptions {
        env: vec![
            ("HUB_DEVICE__FIRST_BYTE_TIMEOUT".into(), "60s".into()),
            ("HUB_DEVICE__HANDSHAKE_TIMEOUT".into(), "60s".into()),
            ("HUB_DEVICE__MAX_HANDSHAKES".into(), "1024".into()),
            ("HUB_DEVICE__MAX_HANDSHAKES_PER_SOURCE".into(), "256".into()),
        ],
        ..HubOptions::default()
    });
    let addr: SocketAddr = hub.device_addr().parse().expect("device address");
    let flooder = Ipv4Addr::new(127, 0, 0, 2);
    let mut flood = Vec::new();
    for _ in 0..1100 {
        if let Some(conn) = idle_connection(flooder, addr).await {
            flood.push(conn);
        }
    }
    assert!(
        flood.len() > 1024,
        "only {} connections opened",
        flood.len()
    );
    // The hub keeps the source's share and closes the rest at once.
    let open = wait_for(T, "the hub to close the flood beyond its share", || {
        let open = flood.iter().filter(|c| !closed_by_hub(c)).count();
        (open <= 256).then_some(open)
    });
    assert_eq!(open, 256, "the share is held, not less");
    for attempt in 0..3 {
        let started = Instant::now();
        let (mut d, _) = welcomed(&hub, "real-device", false).await;
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(1),
            "attempt {attempt}: connecting took {took:?} during the flood"
        );
        d.send_raw(tokio_tungstenite::tungstenite::Message::Close(None))
            .await;
    }
    assert!(flood.iter().filter(|c| !closed_by_hub(c)).count() <= 256);
    let (_, metrics) = hub.api("GET", "/metrics", Some(&hub.admin_token()), None);
    let metrics = metrics.as_str().unwrap_or_default().to_string();
    let refused: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("hub_handshakes_refused_source_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no refusal counter in {metrics}"));
    assert!(refused >= (flood.len() - 256) as f64, "{refused}");
}

/// Connections that send nothing are closed at the first-byte deadline and give their slot
/// back; a device that speaks at once is not affected.
#[tokio::test(flavor = "multi_thread")]
async fn idle_connections_are_closed_at_the_first_byte_deadline() {
    let hub = Hub::start(HubOptions {
        env: vec![
            ("HUB_DEVICE__FIRST_BYTE_TIMEOUT".into(), "300ms".into()),
            ("HUB_DEVICE__MAX_HANDSHAKES".into(), "4".into()),
            ("HUB_DEVICE__MAX_HANDSHAKES_PER_SOURCE".into(), "4".into()),
        ],
        ..HubOptions::default()
    });
    let addr: SocketAddr = hub.device_addr().parse().expect("device address");
    let started = Instant::now();
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(
            idle_connection(Ipv4Addr::LOCALHOST, addr)
                .await
                .expect("connect"),
        );
    }
    let took = wait_for(T, "the idle connections to be closed", || {
        idle.iter().all(closed_by_hub).then(|| started.elapsed())
    });
    assert!(took >= Duration::from_millis(300), "closed after {took:?}");
    assert!(took < Duration::from_millis(1_500), "closed after {took:?}");
    // All four slots are free again.
    let (mut d, _) = welcomed(&hub, "after-idle", true).await;
    d.send(&hello("test-1")).await;
    assert_eq!(d.expect_close(T).await.0, close::PROTOCOL_VIOLATION);
}
