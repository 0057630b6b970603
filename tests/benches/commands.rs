//! Benchmark: command round trip under load. A hub holds N devices (default 10,000, a
//! separate `firmware-sim fleet` process) that together send about 50,000 readings per
//! second; once all are online the fleet also sends `led` commands through the admin API
//! at a steady rate, each timed from the API call to the device's result. Prints the
//! round-trip percentiles, the background ingest rate, the ack latency, and where the
//! round trip went by the hub's own ledger timestamps (created, sent, acked, finished).
//!
//! `cargo bench -p e2e --bench commands`
//! Environment: BENCH_DEVICES (default 10000), BENCH_COMMAND_RATE (default 50/s),
//! BENCH_INTERVAL (default 1400ms: every device samples its 7 sensors, so 10,000 devices
//! send 50,000 readings/s), BENCH_SECONDS (default 60: how long commands are measured).

use std::time::{Duration, Instant};

use e2e::load::{bench_devices, bench_hub, loopback_sources, online, Fleet};

fn main() {
    let devices = bench_devices(10_000);
    let command_rate = std::env::var("BENCH_COMMAND_RATE").unwrap_or_else(|_| "50/s".into());
    let interval = std::env::var("BENCH_INTERVAL").unwrap_or_else(|_| "1400ms".into());
    let seconds: u64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let hub = bench_hub();
    let sources = loopback_sources();
    let mut fleet = Fleet::start(
        &hub,
        devices,
        "cmd-",
        &[
            "--ifaddr",
            &sources,
            "--interval",
            &interval,
            "--connect-rate",
            "2000/s",
            "--commands",
            &command_rate,
            "--drain-timeout",
            "10s",
        ],
    );
    e2e::wait_for(Duration::from_secs(600), "every device online", || {
        fleet.assert_running();
        std::thread::sleep(Duration::from_millis(500));
        (online(&hub)? >= devices).then_some(())
    });
    // Commands start once the fleet sees every device connected; the measurement is
    // everything from then until the stop.
    let measured = Instant::now();
    std::thread::sleep(Duration::from_secs(seconds));
    fleet.assert_running();
    let stored_before: i64 = hub.all_stored_readings();
    let window = Instant::now();
    std::thread::sleep(Duration::from_secs(10));
    let stored_after: i64 = hub.all_stored_readings();
    let ingest = (stored_after - stored_before) as f64 / window.elapsed().as_secs_f64();
    let elapsed = measured.elapsed();
    let summary = fleet.stop();
    println!(
        "commands: round trip (API call to the device's result) {} with {devices} devices online, {} commands issued ({} failed) at {command_rate} over {:.0} s",
        summary["command_round_trip"],
        summary["commands_issued"],
        summary["commands_failed"],
        elapsed.as_secs_f64(),
    );
    println!(
        "commands: background ingest {ingest:.0} readings/s stored (interval {interval}); ack latency {} for batches sent from 5 s after every device was online ({} from the start)",
        summary["ack_latency_all_online"],
        summary["ack_latency"],
    );
    // Where the round trip went, from the hub's own ledger timestamps (milliseconds).
    let db = hub.db();
    let mut stmt = db
        .prepare(
            "SELECT sent_at - created_at, acked_at - sent_at, finished_at - acked_at,
                    finished_at - created_at
             FROM commands WHERE state = 'succeeded' AND sent_at IS NOT NULL",
        )
        .expect("ledger query");
    let mut stages: [Vec<i64>; 4] = Default::default();
    let rows = stmt
        .query_map([], |r| {
            Ok([r.get::<_, i64>(0)?, r.get(1)?, r.get(2)?, r.get(3)?])
        })
        .expect("ledger rows");
    for row in rows.flatten() {
        for (stage, v) in stages.iter_mut().zip(row) {
            stage.push(v);
        }
    }
    let names = [
        "created -> sent",
        "sent -> acked",
        "acked -> finished",
        "created -> finished",
    ];
    let line: Vec<String> = names
        .iter()
        .zip(stages.iter_mut())
        .map(|(name, v)| {
            v.sort_unstable();
            let at = |q: f64| {
                v.get(((v.len() as f64 - 1.0) * q) as usize)
                    .copied()
                    .unwrap_or(0)
            };
            format!(
                "{name} p50 {} / p99 {} / max {} ms",
                at(0.5),
                at(0.99),
                at(1.0)
            )
        })
        .collect();
    println!("commands: in the hub's ledger: {}", line.join("; "));
    let restarts = |file: &str| {
        hub.metric(&format!("hub_sqlite_wal_restarts_total{{file=\"{file}\"}}"))
            .unwrap_or(0.0)
    };
    println!(
        "commands: WAL restarts (the log grew past 8,192 pages) over the run: hub.db {}, telemetry.db {}",
        restarts("hub.db"),
        restarts("telemetry.db")
    );
}
