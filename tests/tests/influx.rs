//! End-to-end tests of the InfluxDB telemetry backend: the real `hub` binary with
//! `storage.backend = "influxdb"` writing to a real VictoriaMetrics (from Debian), which
//! accepts InfluxDB's v2 write API. Acked readings must land exactly once, also when the
//! store is down (the disk spool acks them, then drains) and when the hub is killed with
//! data in the spool. VictoriaMetrics has no Flux: the query path is unit-tested in
//! `hub/src/store/influx/query_tests.rs` against recorded InfluxDB answers.
//!
//! VictoriaMetrics runs with `-dedup.minScrapeInterval=1ms` so that it stores like InfluxDB
//! does: InfluxDB replaces a point written again with the same measurement, tags and
//! time, which is what makes the hub's re-writes after a crash harmless; without the flag
//! VictoriaMetrics would keep both copies.
//!
//! `BENCH_INFLUX_DEVICES` / `BENCH_INFLUX_BATCHES` size the ignored throughput measurement
//! (`cargo test -p e2e --test influx -- --ignored --nocapture`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use e2e::client::{welcomed, Received};
use e2e::servers::{ensure_installed, free_port};
use e2e::{wait_for, Hub, HubOptions, TempDir};
use schemas::message::truncated;
use schemas::{DeviceMessage, HubMessage, Reading, Telemetry};

const T: Duration = Duration::from_secs(15);
/// Readings per batch.
const N: u64 = 16;
/// Metrics per device (`m0`..`m3`).
const METRICS: u64 = 4;

/// VictoriaMetrics on a port of our choosing, so a test can start it on the port the hub
/// already points at (after the hub has been spooling).
struct Vm {
    child: Option<Child>,
    port: u16,
    dir: TempDir,
}

impl Vm {
    fn start(port: u16) -> Vm {
        let mut vm = Vm {
            child: None,
            port,
            dir: TempDir::new("vm"),
        };
        vm.spawn();
        vm
    }

    fn spawn(&mut self) {
        let bin = ensure_installed("victoria-metrics", "victoria-metrics");
        let log = std::fs::File::create(self.dir.path().join("vm.log")).expect("log");
        let mut child = Command::new(bin)
            .arg(format!("-httpListenAddr=127.0.0.1:{}", self.port))
            .arg(format!(
                "-storageDataPath={}",
                self.dir.path().join("data").display()
            ))
            .arg("-search.latencyOffset=0s")
            .arg("-search.disableCache")
            .arg("-dedup.minScrapeInterval=1ms")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start victoria-metrics");
        let port = self.port;
        wait_for(T, "victoria-metrics to listen", || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("victoria-metrics exited with {status}");
            }
            TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ())
        });
        self.child = Some(child);
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Every stored `telemetry_value` sample of devices named `prefix*`:
    /// (device, metric) -> (ms, value), after making recent writes searchable.
    fn samples(&self, prefix: &str) -> BTreeMap<(String, String), Vec<(u64, f64)>> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        let _ = agent
            .get(format!("{}/internal/force_flush", self.url()))
            .call();
        let selector = format!("{{__name__=\"telemetry_value\",device=~\"{prefix}.*\"}}");
        let mut resp = agent
            .get(format!("{}/api/v1/export", self.url()))
            .query("match[]", &selector)
            .call()
            .expect("export");
        assert_eq!(resp.status().as_u16(), 200);
        let text = resp
            .body_mut()
            .with_config()
            .limit(256 << 20)
            .read_to_string()
            .expect("export body");
        let mut out: BTreeMap<(String, String), Vec<(u64, f64)>> = BTreeMap::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line).expect("export line");
            let device = v["metric"]["device"].as_str().expect("device").to_string();
            let metric = v["metric"]["metric"].as_str().expect("metric").to_string();
            let ts = v["timestamps"].as_array().expect("timestamps");
            let values = v["values"].as_array().expect("values");
            let entry = out.entry((device, metric)).or_default();
            for (t, x) in ts.iter().zip(values) {
                entry.push((t.as_u64().expect("ms"), x.as_f64().expect("value")));
            }
        }
        for samples in out.values_mut() {
            samples.sort_by_key(|(t, _)| *t);
        }
        out
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop();
    }
}

fn influx_env(port: u16) -> HubOptions {
    HubOptions {
        env: vec![
            ("HUB_STORAGE__BACKEND".into(), "influxdb".into()),
            (
                "HUB_STORAGE__INFLUXDB__URL".into(),
                format!("http://127.0.0.1:{port}"),
            ),
            ("HUB_STORAGE__INFLUXDB__ORG".into(), "acme".into()),
            ("HUB_STORAGE__INFLUXDB__BUCKET".into(), "fleet".into()),
            ("HUB_STORAGE__INFLUXDB__TOKEN".into(), "e2e-token".into()),
            ("HUB_STORAGE__INFLUXDB__TIMEOUT".into(), "2s".into()),
        ],
        ..HubOptions::default()
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The readings of batch `seq`: recent times (VictoriaMetrics drops samples outside its
/// retention), distinct per metric, and integer values (exact in any store).
fn readings(base: u64, seq: u64) -> Vec<(String, u64, f64)> {
    (0..N)
        .map(|i| {
            (
                format!("m{}", i % METRICS),
                base + seq * 100 + i,
                (seq * 1000 + i) as f64,
            )
        })
        .collect()
}

fn telemetry(base: u64, seq: u64) -> DeviceMessage {
    let mut rs = heapless::Vec::new();
    for (metric, ts, value) in readings(base, seq) {
        rs.push(Reading {
            metric: truncated(&metric),
            ts,
            value,
        })
        .expect("fits");
    }
    DeviceMessage::Telemetry(Telemetry { seq, readings: rs })
}

/// What the store must hold for `device` after batches `seqs`.
fn expected(
    device: &str,
    base: u64,
    seqs: impl IntoIterator<Item = u64>,
) -> BTreeMap<(String, String), Vec<(u64, f64)>> {
    let mut out: BTreeMap<(String, String), Vec<(u64, f64)>> = BTreeMap::new();
    for seq in seqs {
        for (metric, ts, value) in readings(base, seq) {
            out.entry((device.to_string(), metric))
                .or_default()
                .push((ts, value));
        }
    }
    for samples in out.values_mut() {
        samples.sort_by_key(|(t, _)| *t);
    }
    out
}

/// Waits until the store holds exactly `want` for devices `prefix*`; shows the difference
/// when it does not in time.
fn wait_stored(vm: &Vm, prefix: &str, want: &BTreeMap<(String, String), Vec<(u64, f64)>>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = vm.samples(prefix);
        if &got == want {
            return;
        }
        if Instant::now() > deadline {
            let count = |m: &BTreeMap<(String, String), Vec<(u64, f64)>>| -> usize {
                m.values().map(Vec::len).sum()
            };
            let dupes: usize = got
                .values()
                .map(|s| s.len() - s.iter().map(|(t, _)| *t).collect::<BTreeSet<_>>().len())
                .sum();
            panic!(
                "victoria-metrics holds {} samples ({} duplicated), want {}",
                count(&got),
                dupes,
                count(want)
            );
        }
        e2e::pause(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn acked_telemetry_lands_in_victoria_metrics_exactly_once() {
    let vm = Vm::start(free_port());
    let hub = Hub::start(influx_env(vm.port));
    let base = now_ms() - 60_000;
    let mut want = BTreeMap::new();
    let started = Instant::now();
    for (k, json) in [(0, true), (1, false), (2, true)] {
        let device = format!("up-{k}");
        let (mut d, last) = welcomed(&hub, &device, json).await;
        assert_eq!(last, 0);
        for seq in 1..=30 {
            d.send(&telemetry(base, seq)).await;
        }
        d.wait_ack(30).await;
        // Reconnect: the hub knows what it has, and a re-sent batch is acked, not re-stored.
        drop(d);
        let (mut d, last) = welcomed(&hub, &device, json).await;
        assert_eq!(last, 30);
        d.send(&telemetry(base, 30)).await;
        d.send(&telemetry(base, 31)).await;
        d.wait_ack(31).await;
        want.extend(expected(&device, base, 1..=31));
    }
    let acked = started.elapsed();
    wait_stored(&vm, "up-", &want);
    eprintln!(
        "{} readings acked in {acked:?}, all in victoria-metrics after {:?}",
        3 * 31 * N,
        started.elapsed()
    );
    assert_eq!(hub.metric("hub_spool_records"), Some(0.0));
    // The query path speaks Flux, which VictoriaMetrics does not: the failure is clear.
    let (code, _, err) = hub.cli(&["query", "up-0", "--since", "1h"]);
    assert_eq!(
        code, 1,
        "a store without Flux is a lasting failure, not an unreachable hub: {err}"
    );
    assert!(
        err.contains("no Flux query API") && !err.contains("retry later"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn while_the_store_is_down_batches_are_spooled_acked_and_drained() {
    // The hub points at a port where nothing listens yet.
    let port = free_port();
    let hub = Hub::start(influx_env(port));
    let base = now_ms() - 60_000;
    let mut devices = Vec::new();
    for (k, json) in [(0, false), (1, true)] {
        let device = format!("down-{k}");
        let (mut d, _) = welcomed(&hub, &device, json).await;
        for seq in 1..=40 {
            d.send(&telemetry(base, seq)).await;
        }
        // Acked although nothing is there to store them: they are in the spool.
        d.wait_ack(40).await;
        devices.push((device, d));
    }
    let spooled = hub.metric("hub_spool_records").expect("hub_spool_records");
    assert!(spooled >= 1.0, "spool records: {spooled}");
    assert!(hub.metric("hub_spool_bytes").expect("hub_spool_bytes") > 0.0);
    assert!(
        hub.log().contains("InfluxDB is unavailable"),
        "{}",
        hub.log()
    );
    // Welcome.last_seq counts spooled batches as stored.
    let (d, last) = welcomed(&hub, "down-0", false).await;
    assert_eq!(last, 40);
    devices[0].1 = d;
    // The store comes up on that port; the spool drains, and new batches queue behind it.
    let vm = Vm::start(port);
    for (_, d) in &mut devices {
        for seq in 41..=50 {
            d.send(&telemetry(base, seq)).await;
        }
        d.wait_ack(50).await;
    }
    let mut want = BTreeMap::new();
    for (device, _) in &devices {
        want.extend(expected(device, base, 1..=50));
    }
    wait_stored(&vm, "down-", &want);
    wait_for(T, "the spool gauge to reach zero", || {
        (hub.metric("hub_spool_records") == Some(0.0)).then_some(())
    });
    assert_eq!(hub.metric("hub_spool_bytes"), Some(0.0));
    assert!(hub.log().contains("spool drained"), "{}", hub.log());
    // Drained: the next batch goes straight to the store.
    let (device, d) = &mut devices[1];
    d.send(&telemetry(base, 51)).await;
    d.wait_ack(51).await;
    want.extend(expected(device, base, 1..=51));
    wait_stored(&vm, "down-", &want);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hub_killed_with_spooled_data_drains_it_after_restart() {
    let port = free_port();
    let mut hub = Hub::start(influx_env(port));
    let base = now_ms() - 60_000;
    let (mut d, _) = welcomed(&hub, "crash-0", false).await;
    // Stream batches and kill the hub while acks for spooled batches are flowing.
    let mut acked = 0;
    let sent = 120u64;
    for seq in 1..=sent {
        d.send(&telemetry(base, seq)).await;
        if seq == 60 {
            acked = d.wait_ack(20).await;
            hub.kill9();
            break;
        }
    }
    loop {
        match d.recv(T).await {
            Received::Message(HubMessage::Ack(a)) => acked = acked.max(a.up_to_seq),
            Received::Message(_) => {}
            _ => break,
        }
    }
    assert!(acked >= 20);
    // Restart; the store comes up; nobody sends anything: the spool drains on its own.
    hub.restart();
    let vm = Vm::start(port);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let stored: usize = vm.samples("crash-").values().map(Vec::len).sum();
        if stored as u64 >= acked * N {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "acked {acked} batches ({} readings) but only {stored} reached the store",
            acked * N
        );
        e2e::pause(Duration::from_millis(100));
    }
    // The device comes back and re-sends what was not acked; the result is exactly what
    // it sent, each reading once.
    let (mut d, last) = welcomed(&hub, "crash-0", false).await;
    assert!(last >= acked, "last_seq {last} < acked {acked}");
    for seq in last + 1..=sent {
        d.send(&telemetry(base, seq)).await;
    }
    d.wait_ack(sent).await;
    wait_stored(&vm, "crash-", &expected("crash-0", base, 1..=sent));
}
