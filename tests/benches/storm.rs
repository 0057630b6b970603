//! Benchmark: a reconnect storm. N devices (a separate `firmware-sim fleet` process,
//! sampling every 10 s) are online; the hub is killed with SIGKILL and started again on
//! the same port and data directory, and every device comes back at once. Prints how long
//! after the restart the hub counted every device online again, how many refusals and
//! reconnects that took, and checks that the store holds every reading a device saw
//! acknowledged.
//!
//! `cargo build --release --bins && cargo bench -p e2e --bench storm`
//! Environment: BENCH_DEVICES (default 19000), BENCH_CONNECT_RATE (default 0: devices
//! come back as fast as their own backoff lets them, as a real fleet does).

use std::time::{Duration, Instant};

use e2e::load::{bench_devices, bench_hub, loopback_sources, online, Fleet};

fn main() {
    let devices = bench_devices(19_000);
    let rate = std::env::var("BENCH_CONNECT_RATE").unwrap_or_else(|_| "0".into());
    let mut hub = bench_hub();
    let sources = loopback_sources();
    let mut fleet = Fleet::start(
        &hub,
        devices,
        "storm-",
        &[
            "--ifaddr",
            &sources,
            "--interval",
            "10s",
            "--connect-rate",
            &rate,
            "--drain-timeout",
            "30s",
        ],
    );
    let started = Instant::now();
    e2e::wait_for(Duration::from_secs(600), "every device online", || {
        fleet.assert_running();
        std::thread::sleep(Duration::from_millis(500));
        (online(&hub)? >= devices).then_some(())
    });
    let first = started.elapsed();
    hub.restart();
    let restarted = Instant::now();
    let mut half = None;
    let back = e2e::wait_for(Duration::from_secs(600), "every device back online", || {
        fleet.assert_running();
        std::thread::sleep(Duration::from_millis(200));
        let n = online(&hub)?;
        if half.is_none() && n * 2 >= devices {
            half = Some(restarted.elapsed());
        }
        (n >= devices).then(|| restarted.elapsed())
    });
    // What the restarted hub did: handshakes resumed with a ticket of the first process,
    // full ones, and handshakes that ran out of time.
    let handshakes = [
        r#"hub_tls_handshakes_total{kind="resumed"}"#,
        r#"hub_tls_handshakes_total{kind="full"}"#,
        "hub_handshakes_timed_out_total",
    ]
    .map(|sample| hub.metric(sample).unwrap_or(0.0));
    let summary = fleet.stop();
    let stored: i64 = hub.all_stored_readings();
    let acked = summary["readings_acked"].as_i64().unwrap_or(0);
    println!(
        "storm: {devices} devices back online {:.1} s after a kill -9 and restart (half after {:.1} s; first connect took {:.1} s, connect rate limit {rate})",
        back.as_secs_f64(),
        half.unwrap_or(back).as_secs_f64(),
        first.as_secs_f64(),
    );
    println!(
        "storm: {} connect attempts, {} reconnects, {} refused with 503, connect latency {}",
        summary["connect_attempts"],
        summary["reconnects"],
        summary["refused_busy"],
        summary["connect_latency"],
    );
    println!(
        "storm: the restarted hub resumed {} TLS sessions, made {} full handshakes, {} handshakes timed out",
        handshakes[0], handshakes[1], handshakes[2],
    );
    println!(
        "storm: store holds {stored} readings, devices saw {acked} acknowledged, {} still unacknowledged, errors {}",
        summary["unacked_batches"], summary["errors"],
    );
    assert!(
        stored >= acked,
        "the store lost acknowledged readings: {stored} stored, {acked} acked"
    );
}
