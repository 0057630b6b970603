//! Benchmark: how fast the web console shows the first page of a large fleet's device list,
//! from a fresh page load to the rows on screen, in headless Chromium against the real
//! (release) hub. Fails when the median is 1 s or more.
//!
//! `cargo build --release --bins && cargo bench -p e2e --bench console`
//! Environment: BENCH_DEVICES (default 20000), BENCH_RUNS (default 5).

use std::time::Duration;

use e2e::console::{console_link, load_device_list, register_fleet};
use e2e::webdriver::Browser;
use e2e::{Hub, HubOptions};

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let devices = env_num("BENCH_DEVICES", 20_000);
    let runs = env_num("BENCH_RUNS", 5).max(1);
    let hub = Hub::start(HubOptions {
        env: vec![("HUB_LOG__LEVEL".into(), "warn".into())],
        ..HubOptions::default()
    });
    register_fleet(&hub, devices);
    let browser = Browser::start();
    browser.navigate(&console_link(&hub));
    browser.wait_for("#top:not([hidden])", Duration::from_secs(30));
    let url = format!("{}/#/devices", hub.admin_url());
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| load_device_list(&browser, &url, Duration::from_secs(30)))
        .collect();
    times.sort();
    let median = times[times.len() / 2];
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "console: first page of the device list with {devices} devices: median {:.0} ms, min {:.0} ms, max {:.0} ms over {runs} loads",
        ms(median),
        ms(times[0]),
        ms(times[times.len() - 1])
    );
    assert!(
        median < Duration::from_secs(1),
        "the first page took {median:?} (median)"
    );
}
