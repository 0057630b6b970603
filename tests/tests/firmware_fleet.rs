//! End-to-end tests of `firmware-sim fleet` against the real hub: 50 devices keep every
//! reading exactly once in the store across a hub `kill -9` and restart (on a new port,
//! found again through the data directory's device-url), and a frozen fleet is declared
//! offline on time and comes back when it thaws.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use e2e::process::{binary, signal_pid};
use e2e::{wait_for, Hub, HubOptions, TempDir};
use serde_json::Value;

/// A running `firmware-sim fleet --json --per-device`.
struct Fleet {
    child: Child,
}

impl Fleet {
    fn start(hub: &Hub, dir: &Path, count: usize, extra: &[&str]) -> Fleet {
        let stderr = std::fs::File::create(dir.join("fleet.err")).expect("stderr file");
        let child = Command::new(binary("firmware-sim"))
            .arg("fleet")
            .args(["--count", &count.to_string()])
            .arg("--data-dir")
            .arg(hub.data_dir())
            .args(["--json", "--per-device"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn firmware-sim fleet");
        Fleet { child }
    }

    /// Stops with SIGTERM (devices drain, then the summary is printed).
    fn stop(mut self, timeout: Duration) -> Value {
        signal_pid(self.child.id(), "TERM");
        let status = wait_for(timeout, "the fleet to drain and exit", || {
            self.child.try_wait().expect("try_wait")
        });
        let mut out = String::new();
        if let Some(mut stdout) = self.child.stdout.take() {
            use std::io::Read;
            stdout.read_to_string(&mut out).expect("summary");
        }
        assert!(status.success(), "fleet exited with {status}: {out}");
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("bad summary {out:?}: {e}"))
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// (stored readings, stored high-water mark) per device.
fn stored(hub: &Hub) -> HashMap<String, (i64, i64)> {
    let db = hub.telemetry_db();
    let mut out: HashMap<String, (i64, i64)> = HashMap::new();
    let mut stmt = db
        .prepare(
            "SELECT series.device, count(*) FROM readings \
             JOIN series ON series.id = readings.series GROUP BY series.device",
        )
        .expect("prepare");
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
        .expect("query");
    for row in rows {
        let (device, n) = row.expect("row");
        out.entry(device).or_default().0 = n;
    }
    let mut stmt = db
        .prepare("SELECT device, last_seq FROM last_seqs")
        .expect("prepare");
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
        .expect("query");
    for row in rows {
        let (device, seq) = row.expect("row");
        out.entry(device).or_default().1 = seq;
    }
    out
}

fn duplicate_rows(hub: &Hub) -> i64 {
    hub.telemetry_db()
        .query_row(
            "SELECT count(*) - count(DISTINCT series || ':' || ts) FROM readings",
            [],
            |r| r.get(0),
        )
        .expect("count")
}

/// Waits until every one of `count` devices has a stored high-water mark above `floor`.
fn wait_all_beyond(hub: &Hub, count: usize, floor: &HashMap<String, (i64, i64)>, what: &str) {
    wait_for(Duration::from_secs(60), what, || {
        let now = stored(hub);
        let ahead = (1..=count)
            .filter(|i| {
                let id = format!("sim-{i:05}");
                let before = floor.get(&id).map_or(0, |s| s.1);
                now.get(&id).is_some_and(|s| s.1 > before)
            })
            .count();
        (ahead == count).then_some(())
    });
}

#[test]
fn fleet_of_50_stores_every_reading_exactly_once_across_a_hub_kill_9() {
    const N: usize = 50;
    let mut hub = Hub::start(HubOptions::default());
    let dir = TempDir::new("fw-fleet");
    // A flash big enough for the outage, so that no reading is evicted (checked below).
    let fleet = Fleet::start(
        &hub,
        dir.path(),
        N,
        &[
            "--interval",
            "200ms",
            "--ring-bytes",
            "65536",
            "--drain-timeout",
            "30s",
        ],
    );
    wait_all_beyond(&hub, N, &HashMap::new(), "every device to store readings");

    hub.kill9();
    // The restarted hub listens on a new port; the fleet finds it through device-url.
    hub.restart();
    // Anything stored beyond this snapshot was stored by the restarted hub.
    let after_restart = stored(&hub);
    wait_all_beyond(
        &hub,
        N,
        &after_restart,
        "every device to store readings after the restart",
    );
    // Each device came back with the session ticket the first hub process gave it: the
    // restarted hub opens it with the ticket key in its data directory, so no device
    // needed a full handshake (what keeps a reconnect storm cheap).
    let resumed = hub
        .metric(r#"hub_tls_handshakes_total{kind="resumed"}"#)
        .unwrap_or(0.0);
    assert!(
        resumed >= N as f64,
        "{resumed} of {N} devices resumed their TLS session after the restart"
    );

    let summary = fleet.stop(Duration::from_secs(60));
    assert_eq!(summary["errors"], serde_json::json!([]), "{summary}");
    assert_eq!(summary["devices"], N);
    assert_eq!(summary["unacked_batches"], 0, "{summary}");
    assert_eq!(summary["readings_evicted"], 0, "{summary}");
    assert!(
        summary["reconnects"].as_u64() >= Some(N as u64),
        "every device reconnected after the kill: {summary}"
    );

    let store = stored(&hub);
    let per_device = summary["per_device"].as_array().expect("per_device");
    assert_eq!(per_device.len(), N);
    let mut total = 0;
    for d in per_device {
        let id = d["device"].as_str().expect("device");
        let (readings, last_seq) = store.get(id).copied().unwrap_or_default();
        let recorded = d["readings_recorded"].as_i64().expect("recorded");
        // Everything the device recorded was acknowledged, and the store holds it once.
        assert_eq!(d["unacked_batches"], 0, "{d}");
        assert_eq!(d["readings_acked"].as_i64(), Some(recorded), "{d}");
        assert_eq!(
            readings, recorded,
            "{id}: store holds {readings}, device recorded {recorded}"
        );
        assert_eq!(d["last_acked_seq"].as_i64(), Some(last_seq), "{d}");
        assert_eq!(d["batches_recorded"].as_i64(), Some(last_seq), "{d}");
        total += readings;
    }
    assert_eq!(summary["readings_recorded"].as_i64(), Some(total));
    assert_eq!(duplicate_rows(&hub), 0);
}

#[test]
fn frozen_fleet_is_declared_offline_on_time_and_recovers() {
    const N: usize = 5;
    let hub = Hub::start(HubOptions {
        ping_interval: "1s",
        pong_timeout: "1s",
        ..HubOptions::default()
    });
    let dir = TempDir::new("fw-frozen");
    let fleet = Fleet::start(&hub, dir.path(), N, &["--interval", "500ms"]);
    let online = |hub: &Hub| -> usize {
        let (code, out, err) = hub.cli(&["devices", "--json"]);
        assert_eq!(code, 0, "{err}");
        let devices: Vec<Value> = serde_json::from_str(&out).expect("devices json");
        devices.iter().filter(|d| d["online"] == true).count()
    };
    wait_for(Duration::from_secs(20), "all devices online", || {
        (online(&hub) == N).then_some(())
    });

    // Frozen: the process neither answers pings nor sends anything.
    signal_pid(fleet.child.id(), "STOP");
    let frozen_at = std::time::Instant::now();
    wait_for(
        Duration::from_secs(10),
        "the hub to declare the frozen fleet offline",
        || (online(&hub) == 0).then_some(()),
    );
    // ping interval + pong timeout = 2 s, plus scheduling slack.
    assert!(
        frozen_at.elapsed() < Duration::from_secs(6),
        "{:?}",
        frozen_at.elapsed()
    );

    // Thawed: devices notice the closed connections and come back with backoff.
    signal_pid(fleet.child.id(), "CONT");
    wait_for(
        Duration::from_secs(30),
        "the fleet to come back online",
        || (online(&hub) == N).then_some(()),
    );
    let summary = fleet.stop(Duration::from_secs(30));
    assert_eq!(summary["errors"], serde_json::json!([]), "{summary}");
    assert!(
        summary["reconnects"].as_u64() >= Some(N as u64),
        "{summary}"
    );
    assert_eq!(summary["unacked_batches"], 0, "{summary}");
}

#[test]
fn ifaddr_spreads_the_fleet_over_the_given_source_addresses() {
    let hub = Hub::start(HubOptions::default());
    let dir = TempDir::new("fw-ifaddr");
    let fleet = Fleet::start(
        &hub,
        dir.path(),
        4,
        &["--ifaddr", "127.0.0.2,127.0.0.3", "--interval", "1s"],
    );
    let sources = wait_for(Duration::from_secs(30), "every device online", || {
        let (_, body) = hub.api("GET", "/api/v1/devices", Some(&hub.admin_token()), None);
        let devices = body["devices"].as_array()?;
        let mut sources: Vec<String> = devices
            .iter()
            .filter(|d| d["online"] == true)
            .filter_map(|d| d["remote_addr"].as_str())
            .map(|addr| addr.rsplit_once(':').map_or(addr, |(ip, _)| ip).to_string())
            .collect();
        sources.sort();
        (sources.len() == 4).then_some(sources)
    });
    // Devices take the addresses in turn.
    assert_eq!(
        sources,
        ["127.0.0.2", "127.0.0.2", "127.0.0.3", "127.0.0.3"]
    );
    let summary = fleet.stop(Duration::from_secs(30));
    assert_eq!(summary["errors"], serde_json::json!([]), "{summary}");
}
