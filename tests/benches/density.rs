//! Benchmark: hub memory per idle connected wss device, and how fast they connect.
//!
//! Starts the real (release) `hub` binary, reads its resident memory, connects N idle
//! devices over TLS from a separate `firmware-sim fleet` process (the load generator
//! shares the machine), waits until the hub counts all N online and its memory has
//! settled, and prints (RSS with N devices - RSS before) / N. The devices sample once a
//! day, so all that flows is the hub's pings (every 30 s) and their pongs.
//!
//! `cargo build --release --bins && cargo bench -p e2e --bench density`
//! Environment: BENCH_DEVICES (default 19000; the machine allows 20,000 open files per
//! process), BENCH_CONNECT_RATE (default 2000/s).

use std::time::{Duration, Instant};

use e2e::load::{bench_devices, bench_hub, loopback_sources, online, settled_rss, Fleet};

fn main() {
    let devices = bench_devices(19_000);
    let rate = std::env::var("BENCH_CONNECT_RATE").unwrap_or_else(|_| "2000/s".into());
    let hub = bench_hub();
    let pid = hub.pid();
    let before = settled_rss(pid);
    let sources = loopback_sources();
    let mut fleet = Fleet::start(
        &hub,
        devices,
        "dense-",
        &[
            "--ifaddr",
            &sources,
            "--interval",
            "1d",
            // Each device sends its one batch of the day as it boots, as before the fleet
            // spread first samples: its buffers have carried a reading when it goes idle.
            "--aligned",
            "--connect-rate",
            &rate,
            "--drain-timeout",
            "1s",
        ],
    );
    let started = Instant::now();
    let connected = e2e::wait_for(Duration::from_secs(600), "every device online", || {
        fleet.assert_running();
        std::thread::sleep(Duration::from_millis(500));
        (online(&hub)? >= devices).then(|| started.elapsed())
    });
    let with = settled_rss(pid);
    let per_device = with.saturating_sub(before) / devices;
    let summary = fleet.stop();
    e2e::wait_for(Duration::from_secs(120), "every device offline", || {
        std::thread::sleep(Duration::from_millis(500));
        (online(&hub)? == 0).then_some(())
    });
    let after = settled_rss(pid);
    println!(
        "density: {per_device} bytes of hub RSS per idle wss device ({devices} devices; hub RSS {} MiB before, {} MiB with them, {} MiB after they left)",
        before >> 20,
        with >> 20,
        after >> 20
    );
    println!(
        "density: all online after {:.1} s ({:.0} devices/s, limit {rate}); connect latency {}; the load generator held {} bytes per device",
        connected.as_secs_f64(),
        devices as f64 / connected.as_secs_f64(),
        summary["connect_latency"],
        summary["rss_per_device_bytes"],
    );
}
