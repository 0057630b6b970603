//! End-to-end tests of the spine: the real `hub` binary on ephemeral loopback ports, with
//! wss clients (a Rust one and a stdlib-only Python one written from PROTOCOL.md).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use e2e::client::{connect, hello, refusal, welcomed, Device, Received};
use e2e::process::signal_pid;
use e2e::{wait_for, wait_for_async, Hub, HubOptions};
use schemas::message::truncated;
use schemas::{close, Ack, DeviceMessage, HubMessage, Reading, Telemetry};
use tokio_tungstenite::tungstenite::Message;

const T: Duration = Duration::from_secs(10);

fn telemetry(seq: u64, n: usize) -> DeviceMessage {
    let mut readings = heapless::Vec::new();
    for i in 0..n {
        readings
            .push(Reading {
                metric: truncated(&format!("m{}", i % 4)),
                ts: 1_700_000_000_000 + seq * 100 + i as u64,
                value: (seq * 1000 + i as u64) as f64,
            })
            .expect("fits");
    }
    DeviceMessage::Telemetry(Telemetry { seq, readings })
}

#[tokio::test(flavor = "multi_thread")]
async fn telemetry_is_acked_once_durable_and_resends_are_not_stored_twice() {
    let hub = Hub::start(HubOptions::default());
    for json in [true, false] {
        let device = if json { "json-dev" } else { "postcard-dev" };
        let (mut d, last) = welcomed(&hub, device, json).await;
        assert_eq!(last, 0);
        for seq in 1..=3 {
            d.send(&telemetry(seq, 10)).await;
        }
        d.wait_ack(3).await;
        assert_eq!(hub.stored_readings(device), 30);
        drop(d);
        // Reconnect: the hub says what it has, and a re-sent batch is acked, not stored.
        let (mut d, last) = welcomed(&hub, device, json).await;
        assert_eq!(last, 3);
        d.send(&telemetry(3, 10)).await;
        d.send(&telemetry(4, 5)).await;
        d.wait_ack(4).await;
        assert_eq!(hub.stored_readings(device), 35);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn golden_vectors_are_accepted_by_the_real_hub() {
    let hub = Hub::start(HubOptions::default());
    let vectors: Vec<serde_json::Value> =
        serde_json::from_str(schemas::golden::V1).expect("vectors");
    let find = |name: &str| {
        vectors
            .iter()
            .find(|v| v["name"] == name)
            .expect("vector")
            .clone()
    };
    for json in [true, false] {
        let device = if json {
            "golden-json"
        } else {
            "golden-postcard"
        };
        let mut d = Device::connect(&hub.device_url, &hub.ca(), &hub.token(device), json).await;
        for name in ["hello", "telemetry"] {
            let v = find(name);
            let frame = if json {
                Message::text(v["message"].to_string())
            } else {
                let mut buf = [0u8; 1024];
                let bytes =
                    schemas::golden::decode_hex(v["postcard_hex"].as_str().expect("hex"), &mut buf)
                        .expect("hex");
                Message::binary(bytes.to_vec())
            };
            d.send_raw(frame).await;
        }
        assert!(matches!(d.expect(T).await, HubMessage::Welcome(_)));
        d.wait_ack(42).await;
        assert_eq!(hub.stored_readings(device), 2);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_tokens_get_401_and_bad_subprotocols_get_400() {
    let hub = Hub::start(HubOptions::default());
    let other = Hub::start(HubOptions::default());
    let url = &hub.device_url;
    let ca = hub.ca();
    let good = hub.token("d1");
    let cases: Vec<(Option<String>, &str)> = vec![
        (None, "missing token"),
        (Some("garbage".into()), "malformed token"),
        (Some(other.token("d1")), "invalid token signature"),
        (Some(good.replace("d1", "d2")), "invalid token signature"),
        // One spelling per token: an uppercased signature is not the token.
        (
            Some({
                let (body, sig) = good.rsplit_once('.').expect("token");
                format!("{body}.{}", sig.to_uppercase())
            }),
            "malformed token",
        ),
    ];
    for (token, reason) in cases {
        let err = connect(url, &ca, token.as_deref(), Some("hub.v1.json"))
            .await
            .expect_err("refused");
        let (status, body) = refusal(&err).expect("http refusal");
        assert_eq!(status, 401, "{reason}");
        assert!(body.contains(reason), "body {body:?} lacks {reason:?}");
    }
    for proto in [None, Some("mqtt"), Some("hub.v2.json")] {
        let err = connect(url, &ca, Some(&good), proto)
            .await
            .expect_err("refused");
        let (status, body) = refusal(&err).expect("http refusal");
        assert_eq!(status, 400);
        assert!(body.contains("hub.v1.postcard, hub.v1.json"), "{body}");
    }
    // The query-parameter fallback works.
    let ws = connect(
        &format!("{url}?token={good}"),
        &ca,
        None,
        Some("hub.v1.json"),
    )
    .await;
    assert!(ws.is_ok());
    // Expired.
    let (code, short, _) = hub.cli(&["token", "issue", "d3", "--ttl", "1s"]);
    assert_eq!(code, 0);
    let short = short.trim().to_string();
    wait_for_async(Duration::from_secs(5), "the token to expire", || async {
        let err = connect(url, &ca, Some(&short), Some("hub.v1.json"))
            .await
            .err()?;
        let (status, body) = refusal(&err)?;
        (status == 401 && body.contains("expired")).then_some(())
    })
    .await;
    // Revoked: the live session is closed with 1008 and new upgrades get 401.
    let (mut live, _) = welcomed(&hub, "d1", true).await;
    let (code, _, err) = hub.cli(&["token", "revoke", "d1"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(live.expect_close(T).await.0, close::POLICY);
    let err = connect(url, &ca, Some(&good), Some("hub.v1.json"))
        .await
        .expect_err("refused");
    assert_eq!(refusal(&err).expect("http").0, 401);
    let fresh = hub.token("d1");
    assert!(connect(url, &ca, Some(&fresh), Some("hub.v1.json"))
        .await
        .is_ok());
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_closes_only_its_own_connection_with_a_defined_code() {
    let hub = Hub::start(HubOptions::default());
    let (mut healthy, _) = welcomed(&hub, "healthy", false).await;
    let long_metric = format!(
        r#"{{"telemetry":{{"seq":1,"readings":[{{"metric":"{}","ts":1,"value":1.0}}]}}}}"#,
        "m".repeat(65)
    );
    let mut nan = telemetry(1, 1);
    if let DeviceMessage::Telemetry(t) = &mut nan {
        t.readings[0].value = f64::NAN;
    }
    let nan_bytes = schemas::codec::encode_postcard_vec(&nan);
    let mut far = telemetry(1, 1);
    if let DeviceMessage::Telemetry(t) = &mut far {
        t.readings[0].ts = u64::MAX;
    }
    let far_bytes = schemas::codec::encode_postcard_vec(&far);
    struct Case {
        name: &'static str,
        json: bool,
        after_hello: bool,
        frame: Message,
        code: u16,
    }
    let cases = vec![
        Case {
            name: "malformed json",
            json: true,
            after_hello: true,
            frame: Message::text("{not json"),
            code: close::INVALID_PAYLOAD,
        },
        Case {
            name: "malformed postcard",
            json: false,
            after_hello: true,
            frame: Message::binary(vec![1, 0xff, 0xff]),
            code: close::INVALID_PAYLOAD,
        },
        Case {
            name: "oversized",
            json: false,
            after_hello: true,
            frame: Message::binary(vec![1u8; 20_000]),
            code: close::TOO_BIG,
        },
        Case {
            name: "telemetry before hello",
            json: true,
            after_hello: false,
            frame: Message::text(schemas::codec::encode_json(&telemetry(1, 1))),
            code: close::PROTOCOL_VIOLATION,
        },
        Case {
            name: "second hello",
            json: true,
            after_hello: true,
            frame: Message::text(schemas::codec::encode_json(&hello("test-1"))),
            code: close::PROTOCOL_VIOLATION,
        },
        Case {
            name: "unknown type (json)",
            json: true,
            after_hello: true,
            frame: Message::text(r#"{"reboot":{}}"#),
            code: close::UNKNOWN_MESSAGE,
        },
        Case {
            name: "unknown type (postcard)",
            json: false,
            after_hello: true,
            frame: Message::binary(vec![17, 0]),
            code: close::UNKNOWN_MESSAGE,
        },
        Case {
            name: "non-finite value",
            json: false,
            after_hello: true,
            frame: Message::binary(nan_bytes),
            code: close::INVALID_PAYLOAD,
        },
        Case {
            name: "over-long metric name",
            json: true,
            after_hello: true,
            frame: Message::text(long_metric),
            code: close::INVALID_PAYLOAD,
        },
        Case {
            name: "bad metric name",
            json: true,
            after_hello: true,
            frame: Message::text(
                r#"{"telemetry":{"seq":1,"readings":[{"metric":"a b","ts":1,"value":1.0}]}}"#,
            ),
            code: close::INVALID_PAYLOAD,
        },
        Case {
            name: "timestamp beyond 2262",
            json: false,
            after_hello: true,
            frame: Message::binary(far_bytes),
            code: close::INVALID_PAYLOAD,
        },
        Case {
            name: "text on postcard",
            json: false,
            after_hello: true,
            frame: Message::text("{}"),
            code: close::UNSUPPORTED_DATA,
        },
    ];
    let cases_count = cases.len();
    for (i, case) in cases.into_iter().enumerate() {
        let token = hub.token(&format!("bad-{i}"));
        let mut d = Device::connect(&hub.device_url, &hub.ca(), &token, case.json).await;
        if case.after_hello {
            d.send(&hello("test-1")).await;
            assert!(
                matches!(d.expect(T).await, HubMessage::Welcome(_)),
                "{}",
                case.name
            );
        }
        d.send_raw(case.frame).await;
        let (code, reason) = d.expect_close(T).await;
        assert_eq!(
            code, case.code,
            "{}: closed with {code} ({reason})",
            case.name
        );
        assert!(!reason.is_empty(), "{}: close reason is empty", case.name);
        // The healthy device is unaffected.
        healthy.send(&telemetry(i as u64 + 1, 3)).await;
        healthy.wait_ack(i as u64 + 1).await;
    }
    assert_eq!(hub.stored_readings("healthy"), 3 * cases_count as i64);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_connection_supersedes_the_first() {
    let hub = Hub::start(HubOptions::default());
    let (mut first, _) = welcomed(&hub, "twin", true).await;
    let (mut second, _) = welcomed(&hub, "twin", true).await;
    assert_eq!(first.expect_close(T).await.0, close::SUPERSEDED);
    second.send(&telemetry(1, 1)).await;
    second.wait_ack(1).await;
    let online: i64 = hub
        .db()
        .query_row("SELECT online FROM devices WHERE id = 'twin'", [], |r| {
            r.get(0)
        })
        .expect("row");
    assert_eq!(
        online, 1,
        "the superseded connection must not mark the device offline"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn hello_must_come_in_time() {
    let hub = Hub::start(HubOptions {
        env: vec![("HUB_DEVICE__HELLO_TIMEOUT".into(), "300ms".into())],
        ..HubOptions::default()
    });
    let mut d = Device::connect(&hub.device_url, &hub.ca(), &hub.token("slow"), true).await;
    assert_eq!(d.expect_close(T).await.0, close::HELLO_TIMEOUT);
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_loses_nothing_that_was_acked() {
    let mut hub = Hub::start(HubOptions::default());
    let (mut d, _) = welcomed(&hub, "crash", false).await;
    // Stream batches without waiting, and kill the hub while acks are flowing.
    let mut acked = 0;
    let mut sent = 0;
    for seq in 1..=400u64 {
        d.send(&telemetry(seq, 16)).await;
        sent = seq;
        if seq == 200 {
            acked = d.wait_ack(50).await;
            hub.kill9();
            break;
        }
    }
    // Collect every ack that made it out before the kill.
    loop {
        match d.recv(T).await {
            Received::Message(HubMessage::Ack(a)) => acked = acked.max(a.up_to_seq),
            Received::Message(_) => {}
            _ => break,
        }
    }
    assert!(acked >= 50);
    hub.restart();
    let stored = hub.stored_readings("crash");
    assert!(
        stored >= (acked * 16) as i64,
        "acked {acked} batches but only {stored} readings survived"
    );
    // The device re-sends everything unacknowledged; the result is exactly what it sent.
    let (mut d, last) = welcomed(&hub, "crash", false).await;
    assert!(last >= acked);
    for seq in last + 1..=sent {
        d.send(&telemetry(seq, 16)).await;
    }
    // If everything was stored before the kill, Welcome said so and there is nothing to ack.
    if last < sent {
        d.wait_ack(sent).await;
    }
    assert_eq!(hub.stored_readings("crash"), (sent * 16) as i64);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_closes_devices_with_1001_and_exits_0() {
    let mut hub = Hub::start(HubOptions::default());
    // A device with history (its earlier batches are stored), one that has not said hello
    // yet, and an operator watching the event stream: none of them may hold shutdown up.
    let (mut d, _) = welcomed(&hub, "shut", true).await;
    d.send(&telemetry(1, 5)).await;
    d.wait_ack(1).await;
    drop(d);
    let (mut d, _) = welcomed(&hub, "shut", true).await;
    let mut silent = Device::connect(&hub.device_url, &hub.ca(), &hub.token("silent"), true).await;
    // Without reconnecting, so that the watcher ends when the hub's stream does.
    let mut watch = hub.cli_child(&["watch", "--json", "--reconnect", "0s"]);
    let watch_out = watch.stdout.take().expect("stdout");
    let (subscribed_tx, subscribed) = std::sync::mpsc::channel();
    let watch_ended = std::thread::spawn(move || {
        for line in BufReader::new(watch_out).lines().map_while(Result::ok) {
            if line.contains("shut-2") {
                let _ = subscribed_tx.send(());
            }
        }
    });
    // Devices come and go until the watcher has seen one: then it is surely subscribed.
    let mut n = 0;
    while subscribed.try_recv().is_err() {
        n += 1;
        let (mut d2, _) = welcomed(&hub, "shut-2", true).await;
        d2.send(&telemetry(n, 1)).await;
        d2.wait_ack(n).await;
        assert!(n < 200, "hub watch never showed an event");
    }
    let started = Instant::now();
    let status = hub.signal_and_wait("TERM", Duration::from_secs(10));
    assert!(status.success(), "exit status {status}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "shutdown took {:?}",
        started.elapsed()
    );
    assert_eq!(d.expect_close(T).await.0, close::GOING_AWAY);
    assert_eq!(silent.expect_close(T).await.0, close::GOING_AWAY);
    watch_ended
        .join()
        .expect("the watch stream ends with the hub");
    // And says so: a watcher that ended in silence would look like a quiet fleet.
    let out = watch.wait_with_output().expect("hub watch");
    assert_eq!(out.status.code(), Some(69));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the hub ended the event stream"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn duplicates_are_acked_again_dotted_ids_work_and_device_closes_are_answered() {
    let hub = Hub::start(HubOptions::default());
    let (mut d, _) = welcomed(&hub, "kitchen.temp.1", false).await;
    d.send(&telemetry(1, 2)).await;
    d.send(&telemetry(2, 2)).await;
    d.wait_ack(2).await;
    // The ack was lost, say: the device sends batch 1 again, and hears about it at once.
    d.send(&telemetry(1, 2)).await;
    assert_eq!(d.expect(T).await, HubMessage::Ack(Ack { up_to_seq: 2 }));
    assert_eq!(hub.stored_readings("kitchen.temp.1"), 4);
    // A close from the device is answered with a close (RFC 6455 5.5.1).
    use futures_util::StreamExt;
    d.ws.close(None).await.expect("close");
    let answered = tokio::time::timeout(T, async {
        while let Some(Ok(msg)) = d.ws.next().await {
            if matches!(msg, Message::Close(_)) {
                return true;
            }
        }
        false
    })
    .await
    .expect("no answer to the close");
    assert!(answered, "the hub did not answer the device's close frame");
}

#[test]
fn a_second_hub_on_the_same_data_directory_refuses_to_start() {
    let hub = Hub::start(HubOptions::default());
    let url_before = hub.admin_url();
    let out = Command::new(e2e::process::binary("hub"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--api-listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(hub.data_dir())
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("another hub") && err.contains(&hub.pid().to_string()),
        "{err}"
    );
    assert_eq!(
        hub.admin_url(),
        url_before,
        "the running hub's files were touched"
    );
}

#[test]
fn invalid_config_names_every_bad_key_and_exits_2() {
    let dir = e2e::TempDir::new("cfg");
    let file = dir.path().join("hub.toml");
    std::fs::write(&file, "[device]\nping_interval = \"often\"\nlisten = \"nowhere\"\nflavour = 1\n[log]\nformat = \"xml\"\n").expect("write");
    let out = Command::new(e2e::process::binary("hub"))
        .args(["serve", "--config"])
        .arg(&file)
        .env("HUB_INGEST__QUEUE", "zero")
        .current_dir(dir.path())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for key in [
        "device.ping_interval",
        "device.listen",
        "device.flavour",
        "log.format",
        "ingest.queue",
    ] {
        assert!(err.contains(key), "stderr does not name {key}:\n{err}");
    }
}

/// Starts the stdlib-only Python device from PROTOCOL.md.
fn python_device(hub: &Hub, device: &str, extra: &[&str]) -> std::process::Child {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/json_device.py");
    Command::new("python3")
        .arg(script)
        .arg(&hub.device_url)
        .arg(hub.token(device))
        .arg(hub.ca())
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python3")
}

#[test]
fn a_third_party_client_written_from_protocol_md_works() {
    let hub = Hub::start(HubOptions::default());
    let mut child = python_device(&hub, "py-1", &["--batches", "5"]);
    let out = BufReader::new(child.stdout.take().expect("stdout"));
    let events: Vec<serde_json::Value> = out
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| serde_json::from_str(&l).ok())
        .collect();
    let _ = child.wait();
    assert!(events.iter().any(|e| e["event"] == "welcome"), "{events:?}");
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "ack" && e["up_to_seq"] == 5),
        "{events:?}"
    );
    assert_eq!(hub.stored_readings("py-1"), 10);
}

#[test]
fn a_frozen_device_is_declared_offline_on_time() {
    let hub = Hub::start(HubOptions {
        ping_interval: "500ms",
        pong_timeout: "500ms",
        ..HubOptions::default()
    });
    let mut child = python_device(&hub, "frozen", &["--batches", "1", "--stay"]);
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    // Wait until it is acked (fully online) and has answered a ping.
    for want in ["\"ack\"", "\"ping\""] {
        while out.read_line(&mut line).expect("read") > 0 && !line.contains(want) {
            line.clear();
        }
        line.clear();
    }
    let db = hub.db();
    let online = || -> i64 {
        db.query_row("SELECT online FROM devices WHERE id = 'frozen'", [], |r| {
            r.get(0)
        })
        .unwrap_or(0)
    };
    assert_eq!(online(), 1);
    signal_pid(child.id(), "STOP");
    let frozen_at = Instant::now();
    wait_for(
        Duration::from_secs(5),
        "the device to be declared offline",
        || (online() == 0).then_some(()),
    );
    let took = frozen_at.elapsed();
    let cause: String = db
        .query_row(
            "SELECT last_cause FROM devices WHERE id = 'frozen'",
            [],
            |r| r.get(0),
        )
        .expect("cause");
    signal_pid(child.id(), "KILL");
    let _ = child.wait();
    assert_eq!(cause, "pong_timeout");
    let rtt: Option<i64> = db
        .query_row("SELECT rtt_us FROM devices WHERE id = 'frozen'", [], |r| {
            r.get(0)
        })
        .expect("rtt");
    assert!(rtt.is_some_and(|v| v > 0), "no RTT recorded");
    // ping_interval + pong_timeout + 1 s.
    assert!(
        took <= Duration::from_millis(2000),
        "declared offline after {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_store_closes_devices_with_1011_and_loses_nothing_acked() {
    // A 1 MiB database fills up like a full disk would.
    let hub = Hub::start(HubOptions {
        env: vec![("HUB_STORAGE__SQLITE_MAX_BYTES".into(), "1048576".into())],
        ..HubOptions::default()
    });
    let (mut d, _) = welcomed(&hub, "filler", false).await;
    let mut acked = 0;
    let (code, reason) = loop {
        d.send(&telemetry(acked + 1, 64)).await;
        // One batch at a time: every stored batch is acknowledged before the next goes.
        match d.recv(Duration::from_secs(30)).await {
            Received::Message(HubMessage::Ack(a)) => acked = a.up_to_seq,
            Received::Message(other) => panic!("unexpected {other:?}"),
            Received::Closed(code, reason) => break (code, reason),
            Received::Ended => panic!("stream ended without a close frame"),
        }
        assert!(acked < 10_000, "the store never filled up");
    };
    assert_eq!(code, close::INTERNAL, "{reason}");
    assert!(reason.contains("store unavailable"), "{reason}");
    assert!(acked > 0);
    // Everything acknowledged is stored, and nothing else.
    assert_eq!(hub.stored_readings("filler"), (acked * 64) as i64);
    // The hub says it is not ready, and why.
    let (status, body) = hub.api("GET", "/readyz", None, None);
    assert_eq!(status, 503);
    assert!(body.to_string().contains("failing"), "{body}");
    assert!(
        hub.log().contains("telemetry commit failed"),
        "the log does not say what happened"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plain_https_request_on_the_device_port_gets_426() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let hub = Hub::start(HubOptions::default());
    let addr = hub.device_addr();
    let tcp = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let connector = tokio_rustls::TlsConnector::from(e2e::client::tls_config(&hub.ca()));
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let mut tls = connector.connect(name, tcp).await.expect("tls");
    tls.write_all(b"GET /v1/device HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .expect("write");
    let mut answer = String::new();
    let _ = tls.read_to_string(&mut answer).await;
    assert!(answer.starts_with("HTTP/1.1 426"), "{answer}");
    assert!(answer.contains("WebSocket client"), "{answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_device_flooding_messages_is_closed_with_4005() {
    let hub = Hub::start(HubOptions {
        env: vec![("HUB_DEVICE__MAX_MESSAGES_PER_SEC".into(), "20".into())],
        ..HubOptions::default()
    });
    let (mut flood, _) = welcomed(&hub, "flood", true).await;
    let (mut calm, _) = welcomed(&hub, "calm", true).await;
    let state = DeviceMessage::State(schemas::State {
        properties: heapless::Vec::new(),
    });
    for _ in 0..100 {
        flood.send(&state).await;
    }
    let (code, reason) = flood.expect_close(T).await;
    // Its own code, so that the device does not mistake it for a refused token.
    assert_eq!(code, close::RATE_LIMITED, "{reason}");
    assert!(reason.contains("rate limit"), "{reason}");
    // Others are not affected.
    calm.send(&telemetry(1, 1)).await;
    calm.wait_ack(1).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_headers_get_431_and_state_keys_are_capped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let hub = Hub::start(HubOptions::default());
    let tcp = tokio::net::TcpStream::connect(hub.device_addr())
        .await
        .expect("connect");
    let connector = tokio_rustls::TlsConnector::from(e2e::client::tls_config(&hub.ca()));
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let mut tls = connector.connect(name, tcp).await.expect("tls");
    let huge = format!(
        "GET /v1/device HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nAuthorization: Bearer {}\r\n\r\n",
        "A".repeat(20_000)
    );
    let _ = tls.write_all(huge.as_bytes()).await;
    let mut answer = String::new();
    let _ = tls.read_to_string(&mut answer).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");

    // A device may report at most 64 distinct state keys; more are refused with an error
    // message, and the connection stays.
    let (mut d, _) = welcomed(&hub, "chatty", true).await;
    for batch in 0..5 {
        let mut properties = heapless::Vec::new();
        for k in 0..16 {
            properties
                .push(schemas::Property {
                    key: truncated(&format!("k{batch}_{k}")),
                    value: truncated("v"),
                })
                .expect("fits");
        }
        d.send(&DeviceMessage::State(schemas::State { properties }))
            .await;
    }
    match d.expect(T).await {
        HubMessage::Error(e) => assert!(e.message.contains("state keys"), "{e:?}"),
        other => panic!("expected an error message, got {other:?}"),
    }
    d.send(&telemetry(1, 1)).await;
    d.wait_ack(1).await;
}
