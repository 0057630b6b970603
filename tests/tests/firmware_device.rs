//! End-to-end tests of single simulated boards: `firmware-sim flash` then `run` against the
//! real hub — the device shows up, `hub send` switches its LED and the LED shows up in its
//! readings, a SIGKILLed and rebooted device does not re-send what the hub acknowledged,
//! and a damaged image is refused with a message that says what to do.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use e2e::process::{binary, signal_pid};
use e2e::{wait_for, Hub, HubOptions, TempDir};
use serde_json::Value;

const T: Duration = Duration::from_secs(20);

/// A running `firmware-sim run --json`, its events collected as they arrive.
struct Run {
    child: Child,
    events: Arc<Mutex<Vec<Value>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Run {
    fn start(images: &[&Path], dir: &Path) -> Run {
        let stderr = std::fs::File::create(dir.join("run.err")).expect("stderr file");
        let mut child = Command::new(binary("firmware-sim"))
            .arg("run")
            .args(images)
            .arg("--json")
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn firmware-sim run");
        let stdout = child.stdout.take().expect("stdout");
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let v: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("bad event line {line:?}: {e}"));
                sink.lock().expect("events").push(v);
            }
        });
        Run {
            child,
            events,
            reader: Some(reader),
        }
    }

    fn events(&self, kind: &str) -> Vec<Value> {
        self.events
            .lock()
            .expect("events")
            .iter()
            .filter(|e| e["event"] == kind)
            .cloned()
            .collect()
    }

    /// Waits until an `acked` event reaches `seq`.
    fn wait_acked(&self, seq: u64) {
        wait_for(T, &format!("an ack up to seq {seq}"), || {
            self.events("acked")
                .iter()
                .any(|e| e["up_to_seq"].as_u64() >= Some(seq))
                .then_some(())
        });
    }

    /// Stops with `signal` and waits for the exit status and the last event.
    fn stop(mut self, signal: &str) -> (Option<i32>, Vec<Value>) {
        signal_pid(self.child.id(), signal);
        let status = wait_for(T, "firmware-sim to exit", || {
            self.child.try_wait().expect("try_wait")
        });
        if let Some(r) = self.reader.take() {
            r.join().expect("reader");
        }
        let events = self.events.lock().expect("events").clone();
        (status.code(), events)
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn firmware_sim(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(binary("firmware-sim"))
        .args(args)
        .output()
        .expect("run firmware-sim");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn flash(hub: &Hub, dir: &Path, device: &str, interval: &str) -> PathBuf {
    let image = dir.join(format!("{device}.img"));
    let token = hub.token(device);
    let ca = hub.ca();
    let (code, _, err) = firmware_sim(&[
        "flash",
        "--out",
        image.to_str().expect("utf8"),
        "--device",
        device,
        "--hub",
        &hub.device_url,
        "--token",
        &token,
        "--ca",
        ca.to_str().expect("utf8"),
        "--interval",
        interval,
    ]);
    assert_eq!(code, 0, "flash failed: {err}");
    image
}

/// Stored readings of `device`'s `metric` with `value`.
fn stored_with_value(hub: &Hub, device: &str, metric: &str, value: f64) -> i64 {
    hub.telemetry_db()
        .query_row(
            "SELECT count(*) FROM readings JOIN series ON series.id = readings.series \
             WHERE series.device = ?1 AND series.metric = ?2 AND readings.value = ?3",
            rusqlite::params![device, metric, value],
            |r| r.get(0),
        )
        .expect("count")
}

/// Stored rows that share (series, ts) with another row: must be 0 (exactly once).
fn duplicate_rows(hub: &Hub, device: &str) -> i64 {
    hub.telemetry_db()
        .query_row(
            "SELECT count(*) - count(DISTINCT readings.series || ':' || readings.ts) \
             FROM readings JOIN series ON series.id = readings.series WHERE series.device = ?1",
            [device],
            |r| r.get(0),
        )
        .expect("count")
}

fn hub_last_seq(hub: &Hub, device: &str) -> i64 {
    hub.telemetry_db()
        .query_row(
            "SELECT last_seq FROM last_seqs WHERE device = ?1",
            [device],
            |r| r.get(0),
        )
        .unwrap_or(0)
}

#[test]
fn flashed_device_reports_and_hub_send_switches_its_led() {
    let hub = Hub::start(HubOptions::default());
    let dir = TempDir::new("fw-send");
    let image = flash(&hub, dir.path(), "sim-00001", "200ms");
    let run = Run::start(&[&image], dir.path());
    run.wait_acked(2);

    // It is known to the hub and online.
    let (code, out, err) = hub.cli(&["devices"]);
    assert_eq!(code, 0, "{err}");
    let line = out
        .lines()
        .find(|l| l.contains("sim-00001"))
        .unwrap_or_else(|| panic!("sim-00001 missing from `hub devices`:\n{out}"));
    assert!(line.contains("online"), "{line}");
    assert!(line.contains("firmware-sim"), "{line}");
    assert_eq!(stored_with_value(&hub, "sim-00001", "led", 1.0), 0);

    // `hub send` reaches the board, prints the result and exits 0.
    let (code, out, err) = hub.cli(&["send", "sim-00001", "led", "--args", r#"{"on":true}"#]);
    assert_eq!(code, 0, "hub send failed: {out}{err}");
    assert!(out.contains("led on"), "{out}");
    // The actuator shows up in the readings.
    wait_for(T, "a stored led=1 reading", || {
        (stored_with_value(&hub, "sim-00001", "led", 1.0) > 0).then_some(())
    });
    // An unknown command fails on the device, with the device's explanation.
    let (code, out, err) = hub.cli(&["send", "sim-00001", "warp-drive"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        format!("{out}{err}").contains("unknown command"),
        "{out}{err}"
    );

    // Telemetry is queryable through the hub.
    let (code, out, err) = hub.cli(&["query", "sim-00001", "--metric", "temperature"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("temperature"), "{out}");

    let (code, events) = run.stop("INT");
    assert_eq!(code, Some(0));
    let stopped = events
        .iter()
        .find(|e| e["event"] == "stopped")
        .expect("stopped event");
    assert_eq!(stopped["unacked_batches"], 0, "{stopped}");
    // The close at Ctrl-C is the end, not a reason to retry.
    let closed = events
        .iter()
        .rev()
        .find(|e| e["event"] == "disconnected")
        .expect("disconnected event");
    assert_eq!(closed["exit"], "stopped", "{closed}");
    assert!(closed["retry_in_ms"].is_null(), "{closed}");
    let commands: Vec<&Value> = events.iter().filter(|e| e["event"] == "command").collect();
    assert_eq!(commands.len(), 2, "{commands:?}");
    assert_eq!(commands[0]["name"], "led");
    assert_eq!(commands[0]["ok"], true);
    assert_eq!(duplicate_rows(&hub, "sim-00001"), 0);
}

#[test]
fn rebooted_device_does_not_resend_what_the_hub_acknowledged() {
    let hub = Hub::start(HubOptions::default());
    let dir = TempDir::new("fw-reboot");
    let image = flash(&hub, dir.path(), "sim-00007", "100ms");

    let first = Run::start(&[&image], dir.path());
    first.wait_acked(5);
    // Power cut: no drain, no close frame.
    let (_, before) = first.stop("KILL");
    let acked_before = before
        .iter()
        .filter(|e| e["event"] == "acked")
        .filter_map(|e| e["up_to_seq"].as_u64())
        .max()
        .expect("acks before the kill");

    // The image (its flash) kept the sequence counter.
    let (code, out, err) = firmware_sim(&["inspect", image.to_str().expect("utf8"), "--json"]);
    assert_eq!(code, 0, "{err}");
    let state: Value = serde_json::from_str(&out).expect("inspect json");
    assert_eq!(state["booted"], true);
    assert!(
        state["next_seq"].as_u64() > Some(acked_before),
        "image lost the counter: {state} (acked {acked_before})"
    );

    let second = Run::start(&[&image], dir.path());
    second.wait_acked(acked_before + 3);
    let (code, after) = second.stop("TERM");
    assert_eq!(code, Some(0));

    let welcome = after
        .iter()
        .find(|e| e["event"] == "welcome")
        .expect("welcome after reboot");
    let hub_last = welcome["hub_last_seq"].as_u64().expect("hub_last_seq");
    assert!(hub_last >= acked_before, "{welcome}");
    let first_sent = after
        .iter()
        .find(|e| e["event"] == "sent")
        .and_then(|e| e["seq"].as_u64())
        .expect("sent after reboot");
    assert!(
        first_sent > acked_before && first_sent > hub_last,
        "re-sent seq {first_sent}, but the hub had acknowledged up to {acked_before} (welcome says {hub_last})"
    );

    // Exactly once in the store: what the hub holds is the readings of every sequence
    // number up to its high-water mark, each once.
    let mut readings_by_seq = std::collections::HashMap::new();
    for e in before.iter().chain(after.iter()) {
        if e["event"] == "sent" {
            let seq = e["seq"].as_u64().expect("seq");
            let n = e["readings"].as_u64().expect("readings");
            if let Some(old) = readings_by_seq.insert(seq, n) {
                assert_eq!(old, n, "seq {seq} was re-sent with other contents");
            }
        }
    }
    let last = hub_last_seq(&hub, "sim-00007") as u64;
    let stopped = after
        .iter()
        .find(|e| e["event"] == "stopped")
        .expect("stopped");
    assert_eq!(stopped["last_acked_seq"].as_u64(), Some(last), "{stopped}");
    let expected: u64 = (1..=last)
        .map(|seq| {
            *readings_by_seq
                .get(&seq)
                .unwrap_or_else(|| panic!("seq {seq} is stored but was never sent"))
        })
        .sum();
    assert_eq!(hub.stored_readings("sim-00007") as u64, expected);
    assert_eq!(duplicate_rows(&hub, "sim-00007"), 0);
}

#[test]
fn damaged_images_are_refused_with_a_clear_error() {
    let hub = Hub::start(HubOptions::default());
    let dir = TempDir::new("fw-corrupt");
    let image = flash(&hub, dir.path(), "sim-00003", "1s");
    let good = std::fs::read(&image).expect("image");
    let name = image.to_str().expect("utf8");

    // Overwriting needs --force: the image may hold unacknowledged readings.
    let token = hub.token("sim-00003");
    let (code, _, err) = firmware_sim(&[
        "flash",
        "--out",
        name,
        "--device",
        "sim-00003",
        "--hub",
        &hub.device_url,
        "--token",
        &token,
        "--ca",
        hub.ca().to_str().expect("utf8"),
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("--force"), "{err}");

    let cases: Vec<(Vec<u8>, &str)> = vec![
        {
            let mut b = good.clone();
            let last = b.len() - 1;
            b[last] ^= 0x40;
            (b, "image is corrupt (checksum mismatch")
        },
        (good[..good.len() / 2].to_vec(), "image is corrupt"),
        {
            let mut b = good.clone();
            b[8] = 9;
            (b, "image format version 9 is not supported")
        },
        (
            b"#!/bin/sh\necho not an image\n".to_vec(),
            "not a firmware-sim image",
        ),
        (Vec::new(), "the image is empty (0 bytes)"),
    ];
    for (bytes, expected) in cases {
        std::fs::write(&image, &bytes).expect("write");
        for cmd in ["run", "inspect"] {
            let (code, out, err) = firmware_sim(&[cmd, name]);
            assert_eq!(code, 2, "{cmd}: {out}{err}");
            assert!(
                err.contains(name),
                "{cmd}: error does not name the file: {err}"
            );
            assert!(
                err.contains(expected),
                "{cmd}: expected {expected:?} in {err}"
            );
            assert!(
                err.contains("re-flash") || err.contains("firmware-sim flash"),
                "{cmd}: error does not say what to do: {err}"
            );
        }
    }

    // wss without a CA cannot work: refused at flash time.
    let other = dir.path().join("no-ca.img");
    let (code, _, err) = firmware_sim(&[
        "flash",
        "--out",
        other.to_str().expect("utf8"),
        "--device",
        "sim-00004",
        "--hub",
        &hub.device_url,
        "--token",
        &token,
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("--ca"), "{err}");

    // Unreadable or unusable files named on the command line are bad input too.
    let missing = dir.path().join("missing.pem");
    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "hello\n").expect("write");
    let ca = hub.ca();
    for (flag, file, expected) in [
        ("--ca", &missing, "cannot read the CA file"),
        ("--ca", &not_pem, "holds no certificate"),
        ("--token-file", &missing, "cannot read the token file"),
    ] {
        let mut args: Vec<&str> = vec![
            "flash",
            "--out",
            other.to_str().expect("utf8"),
            "--device",
            "sim-00004",
            "--hub",
            &hub.device_url,
            flag,
            file.to_str().expect("utf8"),
        ];
        if flag == "--ca" {
            args.extend(["--token", token.as_str()]);
        } else {
            args.extend(["--ca", ca.to_str().expect("utf8")]);
        }
        let (code, _, err) = firmware_sim(&args);
        assert_eq!(code, 2, "{flag} {}: {err}", file.display());
        assert!(err.contains(expected), "{err}");
    }
}

#[test]
fn a_refused_token_is_reported_with_the_http_status_and_what_to_do() {
    let hub = Hub::start(HubOptions::default());
    let dir = TempDir::new("fw-refused");
    let image = dir.path().join("sim-00009.img");
    let (code, _, err) = firmware_sim(&[
        "flash",
        "--out",
        image.to_str().expect("utf8"),
        "--device",
        "sim-00009",
        "--hub",
        &hub.device_url,
        "--token",
        "v1.sim-00009.1.2.not-a-valid-signature",
        "--ca",
        hub.ca().to_str().expect("utf8"),
    ]);
    assert_eq!(code, 0, "flash failed: {err}");
    let (code, _, err) = firmware_sim(&[
        "run",
        image.to_str().expect("utf8"),
        "--duration",
        "2s",
        "--drain-timeout",
        "200ms",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains(
            "sim-00009 refused by the hub (HTTP 401): token rejected; issue a new one with `hub token issue sim-00009`"
        ),
        "{err}"
    );
}

/// Desired state set while the device is offline reaches it right after `welcome` (no
/// extra round trip): its sampling interval changes, it reports what it applied, and the
/// hub's delta is empty with the reported version equal to the desired one.
#[test]
fn desired_state_set_while_offline_is_applied_on_connect() {
    let hub = Hub::start(HubOptions::default());
    let dir = TempDir::new("fw-desired");
    let image = flash(&hub, dir.path(), "dev-1", "10s");
    let admin = hub.admin_token();
    let (status, v) = hub.api(
        "PATCH",
        "/api/v1/devices/dev-1/state",
        Some(&admin),
        Some(r#"{"desired": {"interval": 1, "led": true, "colour": "red"}}"#),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["desired_version"], 1);
    assert_eq!(v["delta"]["interval"], 1);
    // A stale If-Match is refused with 412.
    let body = r#"{"desired": {"led": false}}"#;
    let (status, v) = hub.api(
        "PATCH",
        "/api/v1/devices/dev-1/state",
        Some(&admin),
        Some(body),
    );
    assert_eq!(status, 200, "{v}");
    let run = Run::start(&[&image], dir.path());
    let state = wait_for(T, "the device to apply desired state", || {
        let (_, v) = hub.api("GET", "/api/v1/devices/dev-1/state", Some(&admin), None);
        (v["reported_version"] == v["desired_version"]).then_some(v)
    });
    assert_eq!(state["desired_version"], 2);
    assert_eq!(state["reported"]["interval"], 1);
    assert_eq!(state["reported"]["led"], false);
    // A key the board does not know is refused, with the board's reason, and is not
    // counted as pending.
    assert!(state["refused"]["colour"]
        .as_str()
        .is_some_and(|r| r.contains("unknown setting")));
    assert_eq!(state["delta"], serde_json::json!({"colour": "red"}));
    // Readings now come every second, not every ten.
    let stamps = wait_for(T, "readings a second apart", || {
        let stamps: Vec<i64> = hub
            .telemetry_db()
            .prepare(
                "SELECT DISTINCT r.ts FROM readings r JOIN series s ON s.id = r.series \
                 WHERE s.device = 'dev-1' ORDER BY r.ts",
            )
            .expect("query")
            .query_map([], |r| r.get(0))
            .expect("rows")
            .collect::<Result<_, _>>()
            .expect("stamps");
        (stamps.len() >= 4).then_some(stamps)
    });
    let gaps: Vec<i64> = stamps.windows(2).skip(1).map(|w| w[1] - w[0]).collect();
    assert!(
        gaps.iter().all(|g| (500..=2_500).contains(g)),
        "gaps between samples: {gaps:?} ms"
    );
    drop(run);
}
