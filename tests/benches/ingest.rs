//! Benchmark: sustained durable ingest over wss on loopback, in readings per second.
//!
//! Starts the real (release) `hub` binary on its embedded SQLite store with fsync on every
//! group commit, connects many postcard devices from this process (the load generator
//! shares the machine), streams full batches with a window of unacknowledged batches per
//! device, and counts only readings the hub acknowledged, i.e. durably stored.
//!
//! `cargo build --release --bins && cargo bench -p e2e --bench ingest`
//! Environment: BENCH_DEVICES (default 200), BENCH_SECONDS (10), BENCH_WINDOW (8),
//! BENCH_SYNC (full|normal).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::client::Device;
use e2e::{Hub, HubOptions};
use schemas::limits::MAX_READINGS;
use schemas::message::truncated;
use schemas::{DeviceMessage, Hello, HubMessage, Reading, Telemetry};

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let devices = env_num("BENCH_DEVICES", 200);
    let seconds = env_num("BENCH_SECONDS", 10);
    let window = env_num("BENCH_WINDOW", 8);
    let sync = std::env::var("BENCH_SYNC").unwrap_or_else(|_| "full".into());
    let hub = Hub::start(HubOptions {
        env: vec![
            ("HUB_STORAGE__SYNCHRONOUS".into(), sync.clone()),
            ("HUB_LOG__LEVEL".into(), "warn".into()),
        ],
        ..HubOptions::default()
    });
    let tokens: Vec<String> = (0..devices)
        .map(|i| hub.token(&format!("bench-{i}")))
        .collect();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let acked = Arc::new(AtomicU64::new(0));
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    runtime.block_on(async {
        let mut tasks = Vec::new();
        for token in tokens {
            let url = hub.device_url.clone();
            let ca = hub.ca();
            let (acked, measuring, stop) = (acked.clone(), measuring.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let mut d = Device::connect(&url, &ca, &token, false).await;
                d.send(&DeviceMessage::Hello(Hello { firmware: truncated("bench"), capabilities: heapless::Vec::new(), last_acked_seq: 0 })).await;
                let HubMessage::Welcome(_) = d.expect(Duration::from_secs(30)).await else { panic!("no welcome") };
                let mut readings = heapless::Vec::<Reading, MAX_READINGS>::new();
                for i in 0..MAX_READINGS {
                    let _ = readings.push(Reading { metric: truncated(&format!("metric.{}", i % 8)), ts: 0, value: i as f64 });
                }
                let (mut next, mut last_ack) = (1u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    while next - last_ack <= window {
                        for r in readings.iter_mut() {
                            r.ts += 1;
                        }
                        d.send(&DeviceMessage::Telemetry(Telemetry { seq: next, readings: readings.clone() })).await;
                        next += 1;
                    }
                    if let HubMessage::Ack(a) = d.expect(Duration::from_secs(30)).await {
                        if measuring.load(Ordering::Relaxed) {
                            acked.fetch_add((a.up_to_seq - last_ack) * MAX_READINGS as u64, Ordering::Relaxed);
                        }
                        last_ack = a.up_to_seq;
                    }
                }
            }));
        }
        // Warm up, then measure.
        tokio::time::sleep(Duration::from_secs(2)).await;
        measuring.store(true, Ordering::Relaxed);
        let started = Instant::now();
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        let total = acked.load(Ordering::Relaxed);
        let elapsed = started.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        println!(
            "ingest: {:.0} readings/s durably stored and acked ({} devices over wss, {} readings/batch, window {}, synchronous={}, {:.1} s)",
            total as f64 / elapsed,
            devices,
            MAX_READINGS,
            window,
            sync,
            elapsed
        );
        for t in tasks {
            t.abort();
        }
    });
    // Cross-check against the store itself: every counted reading must be there.
    let stored: i64 = hub
        .db()
        .query_row("SELECT count(*) FROM readings", [], |r| r.get(0))
        .expect("count");
    let counted = acked.load(Ordering::Relaxed) as i64;
    assert!(
        stored >= counted,
        "store holds {stored} readings but {counted} were counted as acked"
    );
    println!("ingest: store holds {stored} readings (warm-up included)");
}
