//! Benchmark: a firmware image to many devices at once over their wss connections, and
//! what the transfer does to telemetry ack latency on the same connections.
//!
//! Starts the real `hub`, adds an image, connects the devices from this process (postcard,
//! announcing `firmware`; the load generator shares the machine), and measures the
//! telemetry ack latency with every device sending one batch a second, first without a
//! transfer, then while every device pulls the whole image (chunks of 4 KiB, a window of
//! requests per device). Prints the time until the last device has the whole image and
//! both latency distributions.
//!
//! The hub runs with its default `firmware.max_transfer_rate` unless BENCH_CAP sets one
//! (a size such as `16MiB`, or `0` for no cap); the cap in effect is printed with the
//! machine's load average before and after the run, since the machine may be shared.
//!
//! `cargo bench -p e2e --bench firmware` (builds the release binaries first)
//! Environment: BENCH_DEVICES (default 1000), BENCH_IMAGE_KIB (1024), BENCH_WINDOW (8),
//! BENCH_CAP (the hub's default).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use e2e::client::{Device, Received};
use e2e::{Hub, HubOptions};
use schemas::message::truncated;
use schemas::{capability, DeviceMessage, FirmwareRequest, Hello, HubMessage, Reading, Telemetry};

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Latencies in microseconds, sorted on reading.
#[derive(Default)]
struct Latencies(Mutex<Vec<u64>>);

impl Latencies {
    fn record(&self, d: Duration) {
        if let Ok(mut v) = self.0.lock() {
            v.push(d.as_micros() as u64);
        }
    }
    fn take(&self) -> Vec<u64> {
        let mut v = self
            .0
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default();
        v.sort_unstable();
        v
    }
}

/// Panics when a device task has ended (a connect that failed panics its task).
fn tasks_running(tasks: &[tokio::task::JoinHandle<()>]) {
    let ended = tasks.iter().filter(|t| t.is_finished()).count();
    assert_eq!(ended, 0, "{ended} devices could not connect");
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

/// The load average as `/proc/loadavg` has it (1, 5 and 15 minutes), or "unknown".
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into())
}

fn main() {
    let devices = env_num("BENCH_DEVICES", 1000) as usize;
    let image_len = env_num("BENCH_IMAGE_KIB", 1024) as usize * 1024;
    let window = env_num("BENCH_WINDOW", 8);
    let cap = std::env::var("BENCH_CAP").ok();
    println!(
        "firmware: transfer cap {}; load average before: {}",
        cap.as_deref().unwrap_or("the hub's default (4MiB)"),
        load_average()
    );
    let hub = Hub::start(HubOptions {
        env: cap
            .iter()
            .map(|c| ("HUB_FIRMWARE__MAX_TRANSFER_RATE".to_string(), c.clone()))
            .chain([
                ("HUB_STORAGE__SYNCHRONOUS".into(), "normal".into()),
                ("HUB_LOG__LEVEL".into(), "warn".into()),
                // Every device connects from this one address.
                (
                    "HUB_DEVICE__MAX_HANDSHAKES_PER_SOURCE".into(),
                    "4096".into(),
                ),
                ("HUB_DEVICE__MAX_HANDSHAKES".into(), "4096".into()),
                ("HUB_DEVICE__FIRST_BYTE_TIMEOUT".into(), "30s".into()),
                ("HUB_DEVICE__HANDSHAKE_TIMEOUT".into(), "60s".into()),
            ])
            .collect(),
        ..HubOptions::default()
    });
    let file = hub.dir.path().join("bench.bin");
    std::fs::write(
        &file,
        (0..image_len).map(|i| (i % 253) as u8).collect::<Vec<u8>>(),
    )
    .expect("image");
    let (code, _, err) = hub.cli(&[
        "firmware",
        "add",
        file.to_str().expect("utf8"),
        "--version",
        "bench-2",
    ]);
    assert_eq!(code, 0, "{err}");
    let tokens: Vec<(String, String)> = (0..devices)
        .map(|i| {
            let id = format!("fw-bench-{i}");
            let token = hub.token(&id);
            (id, token)
        })
        .collect();
    let latencies = Arc::new(Latencies::default());
    let done = Arc::new(AtomicU64::new(0));
    let bytes = Arc::new(AtomicU64::new(0));
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        // Connect a few at a time: a thousand TLS handshakes at once only measure the CPU.
        let connecting = Arc::new(tokio::sync::Semaphore::new(32));
        let connected = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for (_, token) in &tokens {
            let (url, ca, token) = (hub.device_url.clone(), hub.ca(), token.clone());
            let (latencies, done, bytes) = (latencies.clone(), done.clone(), bytes.clone());
            let (connecting, connected) = (connecting.clone(), connected.clone());
            tasks.push(tokio::spawn(async move {
                let permit = connecting.acquire_owned().await;
                let mut d = Device::connect(&url, &ca, &token, false).await;
                let mut capabilities = heapless::Vec::new();
                let _ = capabilities.push(truncated(capability::FIRMWARE));
                d.send(&DeviceMessage::Hello(Hello { firmware: truncated("bench-1"), capabilities, last_acked_seq: 0 })).await;
                drop(permit);
                connected.fetch_add(1, Ordering::Relaxed);
                let mut seq = 0u64;
                let mut sent_at: Option<(u64, Instant)> = None;
                let (mut next, mut stored, mut outstanding, mut size) = (0u64, 0u64, 0u64, 0u64);
                let mut version = String::new();
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = tick.tick() => {
                            if sent_at.is_none() {
                                seq += 1;
                                let mut readings = heapless::Vec::new();
                                let _ = readings.push(Reading { metric: truncated("temp"), ts: 1_764_000_000_000 + seq, value: 21.0 });
                                d.send(&DeviceMessage::Telemetry(Telemetry { seq, readings })).await;
                                sent_at = Some((seq, Instant::now()));
                            }
                        }
                        got = d.recv(Duration::from_secs(600)) => {
                            let Received::Message(msg) = got else { return };
                            match msg {
                                HubMessage::Ack(a) => {
                                    if let Some((s, at)) = sent_at {
                                        if a.up_to_seq >= s {
                                            latencies.record(at.elapsed());
                                            sent_at = None;
                                        }
                                    }
                                }
                                HubMessage::FirmwareOffer(o) if !o.version.is_empty() => {
                                    version = o.version.to_string();
                                    size = o.size;
                                }
                                HubMessage::FirmwareChunk(c) => {
                                    outstanding -= 1;
                                    stored += c.data.as_slice().len() as u64;
                                    bytes.fetch_add(c.data.as_slice().len() as u64, Ordering::Relaxed);
                                    if stored >= size {
                                        done.fetch_add(1, Ordering::Relaxed);
                                    }
                                }
                                _ => {}
                            }
                            while !version.is_empty() && outstanding < window && next < size {
                                d.send(&DeviceMessage::FirmwareRequest(FirmwareRequest { version: truncated(&version), offset: next, len: 4096 })).await;
                                next += 4096;
                                outstanding += 1;
                            }
                        }
                    }
                }
            }));
        }
        // Baseline: telemetry alone, once every device is connected.
        while connected.load(Ordering::Relaxed) < devices as u64 {
            tasks_running(&tasks);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        latencies.take();
        tokio::time::sleep(Duration::from_secs(5)).await;
        let baseline = latencies.take();
        // The transfer: every device is offered the image.
        let admin = hub.admin_token();
        let started = Instant::now();
        for (id, _) in &tokens {
            let (status, body) = hub.api("POST", &format!("/api/v1/devices/{id}/firmware"), Some(&admin), Some(r#"{"version": "bench-2"}"#));
            assert_eq!(status, 201, "{body}");
        }
        while done.load(Ordering::Relaxed) < devices as u64 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(started.elapsed() < Duration::from_secs(3600), "the transfer did not finish");
        }
        let elapsed = started.elapsed().as_secs_f64();
        let during = latencies.take();
        let total = bytes.load(Ordering::Relaxed);
        println!(
            "firmware: {} KiB to {devices} devices in {elapsed:.1} s ({:.1} MiB/s of image bytes; window {window} x 4 KiB)",
            image_len / 1024,
            total as f64 / elapsed / (1024.0 * 1024.0),
        );
        println!(
            "firmware: telemetry ack latency without a transfer p50 {:.1} ms, p99 {:.1} ms ({} acks); during it p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} acks)",
            percentile(&baseline, 0.5),
            percentile(&baseline, 0.99),
            baseline.len(),
            percentile(&during, 0.5),
            percentile(&during, 0.99),
            percentile(&during, 1.0),
            during.len(),
        );
        println!("firmware: load average after: {}", load_average());
        for t in tasks {
            t.abort();
        }
    });
}
