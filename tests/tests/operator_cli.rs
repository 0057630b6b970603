//! The operator CLI's edges a new user runs into: flags after the subcommand, the exit
//! statuses of bad invocations, `hub devices wait`, `hub commands cancel`, `hub watch`
//! refusing unknown devices, keeping one event per line, reconnecting and resuming, JSON
//! start-up logs, the tokens API's times, a revoked device's last cause, and the SQLite
//! telemetry retention.

use std::io::{BufRead, BufReader};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use e2e::client::{hello, Device};
use e2e::process::binary;
use e2e::{wait_for, Hub, HubOptions, TempDir};
use schemas::message::truncated;
use schemas::{CommandAck, CommandResult, DeviceMessage, HubMessage, Reading, Telemetry};

const T: Duration = Duration::from_secs(10);

async fn online(hub: &Hub, device: &str) -> Device {
    let mut d = Device::connect(&hub.device_url, &hub.ca(), &hub.token(device), true).await;
    d.send(&hello("cli-1.0")).await;
    assert!(matches!(d.expect(T).await, HubMessage::Welcome(_)));
    d
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .expect("clock after 1970")
}

/// The device's record through the admin API.
fn device(hub: &Hub, id: &str) -> serde_json::Value {
    hub.api(
        "GET",
        &format!("/api/v1/devices/{id}"),
        Some(&hub.admin_token()),
        None,
    )
    .1
}

fn wait_offline(hub: &Hub, id: &str) {
    wait_for(T, &format!("{id} to be offline"), || {
        (device(hub, id)["online"] == false).then_some(())
    });
}

/// Lines of a child's stdout as they come, on a channel.
fn lines_of(child: &mut std::process::Child) -> mpsc::Receiver<String> {
    let out = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// The next line of `lines` that `wanted` accepts, within `T`.
fn next_line(lines: &mpsc::Receiver<String>, what: &str, wanted: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + T;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if wanted(&line) => return line,
            Ok(_) => {}
            Err(e) => panic!("no line with {what}: {e}"),
        }
    }
}

/// Connects and drops `device` until `lines` (a `hub watch`) shows it going offline: then
/// the watcher is surely subscribed.
async fn until_watched(
    hub: &Hub,
    device: &str,
    lines: &mpsc::Receiver<String>,
    offline: impl Fn(&str) -> bool,
) {
    for _ in 0..100 {
        drop(online(hub, device).await);
        let deadline = Instant::now() + Duration::from_millis(500);
        while let Ok(line) = lines.recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            if offline(&line) {
                return;
            }
        }
    }
    panic!("hub watch never showed {device} going offline");
}

fn json(line: &str) -> serde_json::Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn flags_after_the_subcommand_and_bad_invocations_get_the_documented_statuses() {
    let hub = Hub::start(HubOptions::default());
    let _lamp = online(&hub, "lamp").await;
    // The example in `hub devices show --help`.
    let (code, out, err) = hub.cli(&["devices", "show", "lamp", "--json"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out)["id"], "lamp");
    // A zero TTL or timeout would end the command before it began: refused, exit 2.
    for flag in ["--ttl", "--timeout"] {
        let (code, _, err) = hub.cli(&["send", "lamp", "led", flag, "0"]);
        assert_eq!(code, 2, "{flag} 0: {err}");
        assert!(err.contains("longer than 0"), "{err}");
    }
    // A device id no device can have says so, as `token issue` does.
    for args in [
        &["send", "bad id!", "led"][..],
        &["token", "issue", "bad id!"],
    ] {
        let (code, _, err) = hub.cli(args);
        assert_eq!(code, 2, "{args:?}");
        assert!(err.contains("invalid device id"), "{args:?}: {err}");
    }
    let hub_cli = |args: &[&str]| {
        let out = Command::new(binary("hub"))
            .args(args)
            .env_remove("HUB_API")
            .env_remove("HUB_ADMIN_TOKEN")
            .current_dir(hub.dir.path())
            .output()
            .expect("hub");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // Not a URL: a bad invocation (2), not an unreachable hub.
    let (code, err) = hub_cli(&["devices", "--api", "not a url", "--token", "t"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("not a base URL"), "{err}");
    // No hub there: 69, saying what is missing.
    let (code, err) = hub_cli(&["devices", "--data-dir", "/nonexistent/hub-data"]);
    assert_eq!(code, Some(69), "{err}");
    assert!(err.contains("does not exist"), "{err}");
    let empty = TempDir::new("no-hub");
    let (code, err) = hub_cli(&["devices", "--data-dir", &empty.path().display().to_string()]);
    assert_eq!(code, Some(69), "{err}");
    assert!(
        err.contains("no hub is running with the data directory"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn devices_wait_and_commands_cancel() {
    let hub = Hub::start(HubOptions::default());
    let (code, _, err) = hub.cli(&["devices", "wait", "ghost", "--timeout", "300ms"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("never connected"), "{err}");
    // Waiting for a device that comes online while `wait` waits.
    let waiter = hub.cli_child(&["devices", "wait", "late", "--timeout", "30s"]);
    let d = online(&hub, "late").await;
    let out = tokio::task::spawn_blocking(move || waiter.wait_with_output().expect("wait"))
        .await
        .expect("join");
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("late is online"));
    drop(d);
    wait_offline(&hub, "late");
    let (code, _, err) = hub.cli(&["devices", "wait", "late", "--timeout", "200ms"]);
    assert_eq!(code, 3);
    assert!(err.contains("still offline"), "{err}");

    // Cancel a queued command; cancelling it again says it is over (exit 1).
    let (code, id, _) = hub.cli(&["send", "late", "reboot", "--no-wait"]);
    assert_eq!(code, 4, "queued for an offline device");
    let id = id.trim();
    let (code, out, err) = hub.cli(&["commands", "cancel", id]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("cancelled command {id} (reboot for late)")),
        "{out}"
    );
    let (code, _, err) = hub.cli(&["commands", "cancel", id]);
    assert_eq!(code, 1);
    assert!(err.contains("already cancelled"), "{err}");
    let (code, _, err) = hub.cli(&["commands", "cancel", "999999"]);
    assert_eq!(code, 2);
    assert!(err.contains("no command 999999"), "{err}");
    // And the history still works beside the subcommand.
    let (code, out, _) = hub.cli(&["commands", "late", "--json"]);
    assert_eq!(code, 0);
    assert_eq!(json(&out)[0]["state"], "cancelled");
}

#[tokio::test(flavor = "multi_thread")]
async fn hub_watch_refuses_unknown_devices_and_keeps_one_event_per_line() {
    let hub = Hub::start(HubOptions::default());
    let (code, _, err) = hub.cli(&["watch", "nobody"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("unknown device"), "{err}");

    drop(online(&hub, "poet").await);
    let mut watch = hub.cli_child(&["watch", "poet"]);
    let lines = lines_of(&mut watch);
    until_watched(&hub, "poet", &lines, |l| {
        l.contains("presence  poet  offline")
    })
    .await;
    let mut d = online(&hub, "poet").await;
    let child = hub.cli_child(&["send", "poet", "verse"]);
    let cmd = loop {
        if let HubMessage::Command(c) = d.expect(T).await {
            break c;
        }
    };
    d.send(&DeviceMessage::CommandAck(CommandAck { id: cmd.id }))
        .await;
    d.send(&DeviceMessage::CommandResult(CommandResult {
        id: cmd.id,
        ok: true,
        code: 0,
        output: truncated("roses\nare\tred"),
    }))
    .await;
    let line = next_line(&lines, "the command's result", |l| l.contains("succeeded"));
    assert!(line.ends_with(r"-> succeeded: roses\nare\tred"), "{line}");
    // No line is the rest of a multi-line output.
    assert!(
        lines.try_iter().all(|l| l.contains("  poet  ")),
        "an event across lines"
    );
    let _ = watch.kill();
    let _ = watch.wait();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().expect("send"))
        .await
        .expect("join");
    assert_eq!(out.status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn hub_watch_reconnects_to_a_restarted_hub_and_gives_up_when_it_is_gone() {
    let mut hub = Hub::start(HubOptions::default());
    let mut watch = hub.cli_child(&["watch", "--json"]);
    let lines = lines_of(&mut watch);
    until_watched(&hub, "w1", &lines, |l| {
        l.contains(r#""device":"w1""#) && l.contains(r#""online":false"#)
    })
    .await;
    // The hub dies and comes back (on another admin port): the watcher finds it again,
    // says that what happened in between is not known, and goes on.
    hub.restart();
    let _d = online(&hub, "w1").await;
    let lagged = next_line(&lines, "the gap", |l| l.contains(r#""type":"lagged""#));
    assert_eq!(json(&lagged)["missed"], serde_json::Value::Null, "{lagged}");
    next_line(&lines, "w1 online again", |l| {
        l.contains(r#""device":"w1""#) && l.contains(r#""online":true"#)
    });
    let _ = watch.kill();
    let out = watch.wait_with_output().expect("watch");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("reconnected to http://127.0.0.1:"), "{err}");

    // Gone for good: it says so and exits 69 once --reconnect is over.
    drop(_d);
    let mut watch = hub.cli_child(&["watch", "--reconnect", "1s"]);
    let lines = lines_of(&mut watch);
    until_watched(&hub, "w1", &lines, |l| l.contains("presence  w1  offline")).await;
    hub.kill9();
    let status = wait_for(T, "hub watch to give up", || {
        watch.try_wait().expect("wait")
    });
    assert_eq!(status.code(), Some(69));
    let mut err = String::new();
    std::io::Read::read_to_string(&mut watch.stderr.take().expect("stderr"), &mut err)
        .expect("stderr");
    assert!(err.contains("gave up after 1s"), "{err}");
}

/// Reads one Server-Sent Events stream until `enough` holds for the events so far.
fn read_events(
    hub: &Hub,
    last_event_id: Option<&str>,
    enough: impl Fn(&[(String, String, Option<String>)]) -> bool,
) -> Vec<(String, String, Option<String>)> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut req = agent
        .get(format!("{}/api/v1/events", hub.admin_url()))
        .header("Authorization", format!("Bearer {}", hub.admin_token()));
    if let Some(id) = last_event_id {
        req = req.header("Last-Event-ID", id);
    }
    let resp = req.call().expect("event stream");
    assert_eq!(resp.status().as_u16(), 200);
    let mut events = Vec::new();
    let (mut name, mut data, mut id) = (String::new(), String::new(), None);
    for line in BufReader::new(resp.into_body().into_reader()).lines() {
        let line = line.expect("stream line");
        if line.is_empty() {
            events.push((
                std::mem::take(&mut name),
                std::mem::take(&mut data),
                id.take(),
            ));
            if enough(&events) {
                return events;
            }
        } else if let Some(v) = line.strip_prefix("event: ") {
            name = v.to_string();
        } else if let Some(v) = line.strip_prefix("data: ") {
            data = v.to_string();
        } else if let Some(v) = line.strip_prefix("id: ") {
            id = Some(v.to_string());
        }
    }
    panic!("the stream ended after {events:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_event_stream_resumes_after_the_last_event_id() {
    let hub = Hub::start(HubOptions::default());
    // A new stream starts with the hub's position: an event with only an id.
    let first = read_events(&hub, None, |e| !e.is_empty());
    let (name, data, position) = &first[0];
    assert!(name.is_empty() && data.is_empty(), "{first:?}");
    let position = position.clone().expect("an id");
    // While nobody listens, a device comes and goes.
    drop(online(&hub, "r1").await);
    wait_offline(&hub, "r1");
    // Resuming after the position gives exactly those events, numbered in order.
    let resumed = read_events(&hub, Some(&position), |e| {
        e.iter().filter(|(n, _, _)| n == "presence").count() >= 2
    });
    let presence: Vec<_> = resumed.iter().filter(|(n, _, _)| n == "presence").collect();
    assert_eq!(json(&presence[0].1)["online"], true);
    assert_eq!(json(&presence[1].1)["online"], false);
    let seq = |id: &Option<String>| -> u64 {
        id.as_deref()
            .and_then(|i| i.rsplit('-').next())
            .and_then(|n| n.parse().ok())
            .expect("numbered")
    };
    let start = seq(&Some(position.clone()));
    assert_eq!(seq(&presence[0].2), start + 1);
    assert_eq!(seq(&presence[1].2), start + 2);
    // An id from another run of the hub: told that events are missing.
    let other = read_events(&hub, Some("1-1"), |e| !e.is_empty());
    assert_eq!(other[0].0, "lagged");
    assert_eq!(json(&other[0].1)["missed"], serde_json::Value::Null);
}

#[test]
fn with_json_logs_the_start_up_banner_is_json_too() {
    let dir = TempDir::new("json-logs");
    let log = |name: &str| std::fs::File::create(dir.path().join(name)).expect("log file");
    let mut child = Command::new(binary("hub"))
        .args([
            "serve",
            "--data-dir",
            "data",
            "--listen",
            "127.0.0.1:0",
            "--api-listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ])
        .current_dir(dir.path())
        .env_remove("HUB_LOG__FORMAT")
        .stdout(log("stdout"))
        .stderr(log("stderr"))
        .spawn()
        .expect("hub serve");
    let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap_or_default();
    let started = wait_for(T, "the start-up log line", || {
        read("stderr")
            .lines()
            .find(|l| l.contains("hub started"))
            .map(str::to_string)
    });
    let _ = child.kill();
    let _ = child.wait();
    let banner = json(&started);
    assert!(
        banner["fields"]["device_url"]
            .as_str()
            .is_some_and(|u| u.starts_with("wss://127.0.0.1:")),
        "{banner}"
    );
    assert!(banner["fields"]["ca_file"].is_string(), "{banner}");
    for name in ["stdout", "stderr"] {
        for line in read(name).lines() {
            json(line);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn token_times_are_ms_and_a_revoked_device_says_token_revoked() {
    let hub = Hub::start(HubOptions::default());
    let before = now_ms();
    let (status, v) = hub.api(
        "POST",
        "/api/v1/tokens",
        Some(&hub.admin_token()),
        Some(r#"{"device_id": "t1", "ttl": "1h"}"#),
    );
    assert_eq!(status, 200, "{v}");
    let expires = v["expires_at"].as_u64().expect("expires_at");
    // Milliseconds, whole seconds of them (tokens count seconds), an hour from now.
    assert_eq!(expires % 1000, 0);
    assert!(expires >= before / 1000 * 1000 + 3_600_000, "{expires}");
    assert!(expires <= now_ms() + 3_600_000, "{expires}");
    let token = v["token"].as_str().expect("token");
    let in_token: u64 = token
        .rsplit('.')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("the token's expiry");
    assert_eq!(expires, in_token * 1000);

    let mut d = online(&hub, "t1").await;
    let (code, _, err) = hub.cli(&["token", "revoke", "t1"]);
    assert_eq!(code, 0, "{err}");
    d.expect_close(T).await;
    wait_offline(&hub, "t1");
    assert_eq!(device(&hub, "t1")["last_cause"], "token_revoked");
    let (code, show, _) = hub.cli(&["devices", "show", "t1"]);
    assert_eq!(code, 0);
    assert!(show.contains("last cause:    token revoked"), "{show}");
}

#[tokio::test(flavor = "multi_thread")]
async fn readings_older_than_the_retention_are_deleted_and_the_rest_kept() {
    let mut hub = Hub::start(HubOptions::default());
    let mut d = online(&hub, "old").await;
    let now = now_ms();
    let mut readings = heapless::Vec::new();
    for i in 0..20u64 {
        // Ten from two hours ago, ten from now.
        let ts = if i < 10 { now - 7_200_000 + i } else { now + i };
        readings
            .push(Reading {
                metric: truncated("m"),
                ts,
                value: i as f64,
            })
            .expect("fits");
    }
    d.send(&DeviceMessage::Telemetry(Telemetry { seq: 1, readings }))
        .await;
    d.wait_ack(1).await;
    drop(d);
    assert_eq!(hub.stored_readings("old"), 20);
    // Restarted with a retention of an hour: the first round runs at start.
    hub.options.env.push((
        "HUB_STORAGE__TELEMETRY_RETENTION".to_string(),
        "1h".to_string(),
    ));
    hub.restart();
    wait_for(T, "the old readings to go", || {
        (hub.stored_readings("old") == 10).then_some(())
    });
    let oldest: i64 = hub
        .telemetry_db()
        .query_row("SELECT min(ts) FROM readings", [], |r| r.get(0))
        .expect("min ts");
    assert!(oldest >= now as i64, "{oldest} < {now}");
    // The pruner logs after its transaction commits, so the count can drop first.
    wait_for(T, "the pruner to log its round", || {
        hub.log()
            .contains("deleted readings older than the retention")
            .then_some(())
    });
    // Ingest goes on with the pruner running.
    let mut d = online(&hub, "old").await;
    let mut readings = heapless::Vec::new();
    readings
        .push(Reading {
            metric: truncated("m"),
            ts: now_ms(),
            value: 1.0,
        })
        .expect("fits");
    d.send(&DeviceMessage::Telemetry(Telemetry { seq: 2, readings }))
        .await;
    d.wait_ack(2).await;
    assert_eq!(hub.stored_readings("old"), 11);
}
